r"""Random-walk Metropolis (RWM) and its reflection-maximal coupling, for any pytree position.

Single kernel: :math:`x' = x + s \odot \xi`, :math:`\xi \sim N(0, I)`, accepted when
:math:`\log U < \log\pi(x') - \log\pi(x)`. It is :math:`\pi`-reversible.

Coupled kernel (Jacob, O'Leary & Atchade 2020, Sec. 4.1): the two proposals are drawn from the
reflection-maximal coupling of :math:`N(x, s^2)` and :math:`N(y, s^2)`
(:mod:`~vaeml_jax.couplings.maximal`) and both chains use the SAME uniform U. Guarantees: each
chain alone moves by the single kernel (so both marginals are exact); the proposals coincide with
the maximal probability :math:`2\Phi(-\|(x - y)/s\|/2)`, and then both chains accept or reject
together once they are equal, so met chains stay met (faithful). The Y-state is copied from X
whenever the proposals coincide, so equality is bitwise.

Positions are flattened with ``jax.flatten_util.ravel_pytree``; ``scale`` is a scalar, a flat
(d,) vector or a pytree like the position. Every step costs one ``value_and_grad`` per chain (the
gradient is kept in the state so RWM can be mixed with MALA/HMC, see
:mod:`~vaeml_jax.couplings.mixture`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from vaeml_jax.couplings import _checks, maximal
from vaeml_jax.couplings.base import (
    CoupledInfo,
    CoupledState,
    Info,
    State,
    check_logdensity_fn,
    evaluate,
    init,
    select,
)

__all__ = ["init", "build_kernel", "build_coupled_kernel"]


def _accept(log_u, new: State, old: State):
    log_ratio = new.logdensity - old.logdensity
    log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
    return log_u < log_ratio, log_ratio


def build_kernel(logdensity_fn: Callable, scale) -> Callable:
    """Return ``step(key, state) -> (State, Info)``, one RWM transition.

    Args:
      logdensity_fn: position -> () log pi(position), up to a constant.
      scale: proposal standard deviation(s) > 0: scalar, (d,) vector or a position-like pytree.
    """
    check_logdensity_fn(logdensity_fn)
    _checks.check_positive("scale", scale)

    def step(key, state: State):
        flat, unravel = ravel_pytree(state.position)
        s = _checks.flat_scale("scale", scale, state.position)
        key_prop, key_u = jax.random.split(key)
        proposal = evaluate(
            logdensity_fn, unravel(flat + s * jax.random.normal(key_prop, flat.shape, flat.dtype))
        )
        accepted, log_ratio = _accept(
            jnp.log(jax.random.uniform(key_u, (), flat.dtype)), proposal, state
        )
        return select(accepted, proposal, state), Info(accepted, log_ratio)

    return step


def build_coupled_kernel(logdensity_fn: Callable, scale) -> Callable:
    """Return ``step(key, CoupledState) -> (CoupledState, CoupledInfo)``: reflection-maximal RWM.

    Both chains' marginal transitions are exactly :func:`build_kernel`'s with the same ``scale``.
    """
    check_logdensity_fn(logdensity_fn)
    _checks.check_positive("scale", scale)

    def step(key, state: CoupledState):
        fx, unravel = ravel_pytree(state.x.position)
        fy, _ = ravel_pytree(state.y.position)
        if fx.shape != fy.shape:
            raise ValueError(f"the two chains' positions differ in size: {fx.shape} vs {fy.shape}.")
        s = _checks.flat_scale("scale", scale, state.x.position)
        key_prop, key_u = jax.random.split(key)
        draw = maximal.reflection_maximal(key_prop, fx, fy, s)
        equal = draw.equal
        new_x = evaluate(logdensity_fn, unravel(draw.x))
        new_y = select(equal, new_x, evaluate(logdensity_fn, unravel(draw.y)))
        log_u = jnp.log(jax.random.uniform(key_u, (), fx.dtype))
        acc_x, _ = _accept(log_u, new_x, state.x)
        acc_y, _ = _accept(log_u, new_y, state.y)
        out = CoupledState(select(acc_x, new_x, state.x), select(acc_y, new_y, state.y))
        return out, CoupledInfo(acc_x, acc_y, equal)

    return step
