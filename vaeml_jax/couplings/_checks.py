"""Argument checks shared by the kernels and the driver (clear errors at build time)."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["check_int", "check_positive", "check_probability", "flat_scale"]


def check_int(name: str, value, minimum: int, why: str = "") -> int:
    """A Python int >= minimum, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}.")
    return int(value)


def check_positive(name: str, value):
    """Every entry of a (pytree of) concrete number(s) is finite and > 0; tracers pass through."""
    for leaf in jax.tree.leaves(value):
        if isinstance(leaf, jax.core.Tracer):
            continue
        a = np.asarray(leaf)
        if not np.issubdtype(a.dtype, np.number):
            raise TypeError(f"{name} must be numeric, got {a.dtype}.")
        if a.size == 0 or not np.all(np.isfinite(a)) or not np.all(a > 0):
            raise ValueError(f"{name} must be finite and > 0, got {leaf!r}.")
    return value


def check_probability(name: str, value) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    return v


def flat_scale(name: str, scale, position) -> jax.Array:
    """``scale`` as a flat (d,) vector matching ``ravel_pytree(position)``.

    Accepted: a scalar (same scale everywhere); a pytree with the structure of ``position`` whose
    leaves broadcast to the position's leaves; or a flat (d,) vector. Anything else is a ValueError
    naming both shapes.
    """
    flat_pos, _ = ravel_pytree(position)
    d = flat_pos.shape[0]
    if not jax.tree.leaves(scale):
        raise ValueError(f"{name} is empty.")
    pos_def = jax.tree.structure(position)
    same_structure = bool(jax.tree.structure(scale) == pos_def)  # type: ignore[operator]
    if not jax.tree_util.treedef_is_leaf(pos_def) and same_structure:
        try:
            leaves = jax.tree.map(
                lambda s, p: jnp.broadcast_to(jnp.asarray(s, p.dtype), jnp.shape(p)),
                scale,
                position,
            )
        except ValueError as e:
            raise ValueError(
                f"{name} has the position's structure but a leaf does not broadcast: {e}"
            ) from None
        return ravel_pytree(leaves)[0]
    s = jnp.asarray(scale, flat_pos.dtype)
    if s.ndim == 0:
        return jnp.full((d,), s)
    if s.shape == (d,):
        return s
    if jax.tree_util.treedef_is_leaf(pos_def) and s.shape == jnp.shape(position):
        return s.reshape(-1)
    raise ValueError(
        f"{name} of shape {s.shape} does not match the position, which has {d} coordinates "
        f"(structure {pos_def}); give a scalar, a ({d},) vector or a pytree like the position."
    )
