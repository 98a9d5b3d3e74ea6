r"""States shared by every kernel of :mod:`vaeml_jax.couplings`, and the initial-state check.

A single chain on a target :math:`\pi(x) \propto \exp(\log\pi(x))` over ANY pytree ``x`` carries
:class:`State` (position, log density, its gradient). A coupled pair carries
:class:`CoupledState` ``(x, y)``; with a lag L the driver stores (X_t, Y_{t-L}) in it.

Guarantee used by the debiasing driver: every coupled kernel here is *faithful*: once
``x`` and ``y`` are equal (every leaf, bit for bit) they stay equal forever, because the kernels
copy the X-state into Y whenever the two proposals coincide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "State",
    "Info",
    "CoupledState",
    "CoupledInfo",
    "init",
    "evaluate",
    "check_logdensity_fn",
    "states_equal",
    "select",
]

PyTree = Any


class State(NamedTuple):
    """One chain.

    Attributes:
      position: the point x, any pytree of float arrays.
      logdensity: () log pi(x) up to a constant.
      logdensity_grad: grad_x log pi(x), same pytree as ``position``.
    """

    position: PyTree
    logdensity: jax.Array
    logdensity_grad: PyTree


class Info(NamedTuple):
    """What one single-chain step did: the MH decision and log acceptance ratio (both ())."""

    accepted: jax.Array
    log_accept_ratio: jax.Array


class CoupledState(NamedTuple):
    """A coupled pair of chain states (any NamedTuple state, e.g. :class:`State` or CISState)."""

    x: Any
    y: Any


class CoupledInfo(NamedTuple):
    """What one coupled step did.

    Attributes:
      accepted_x, accepted_y: () bool, the MH decision of each chain (True for kernels without one).
      proposals_equal: () bool, the two proposals coincided exactly (a maximal-coupling success).
    """

    accepted_x: jax.Array
    accepted_y: jax.Array
    proposals_equal: jax.Array


def check_logdensity_fn(logdensity_fn) -> Callable:
    """``logdensity_fn`` must be callable: a TypeError naming the problem otherwise."""
    if not callable(logdensity_fn):
        raise TypeError(
            f"logdensity_fn must be a callable position -> scalar log density, "
            f"got {type(logdensity_fn).__name__}."
        )
    return logdensity_fn


def init(position: PyTree, logdensity_fn: Callable) -> State:
    r"""The chain state at ``position``: log pi and its gradient (one ``value_and_grad``).

    Raises:
      TypeError: ``logdensity_fn`` is not callable, or returns a non-scalar.
      ValueError: log pi(position) is not finite (NaN or +-inf) when it can be checked, i.e.
        outside ``jit``/``vmap`` (inside them the value is traced and cannot be inspected).
    """
    check_logdensity_fn(logdensity_fn)
    out = jax.eval_shape(logdensity_fn, position)
    if not hasattr(out, "shape") or out.shape != ():
        raise TypeError(f"logdensity_fn must return a scalar, got {out}.")
    value, grad = jax.value_and_grad(logdensity_fn)(position)
    if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)):
        raise ValueError(
            f"the initial log density is not finite (log pi = {float(value)}): start the chain "
            "where the target has positive density."
        )
    return State(position, value, grad)


def evaluate(logdensity_fn: Callable, position: PyTree) -> State:
    """The state at ``position`` without checks (for use inside kernels, under jit and vmap)."""
    value, grad = jax.value_and_grad(logdensity_fn)(position)
    return State(position, value, grad)


def states_equal(a: PyTree, b: PyTree) -> jax.Array:
    """() bool: every leaf of ``a`` equals the matching leaf of ``b`` exactly."""
    eq = jax.tree.map(lambda u, v: jnp.all(u == v), a, b)
    return jnp.all(jnp.stack(jax.tree.leaves(eq)))


def select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``where(pred, on_true, on_false)`` for a scalar predicate."""
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), on_true, on_false)
