r"""The Metropolis-adjusted Langevin algorithm (MALA) and its common-random-numbers coupling.

Single kernel: propose :math:`x' = \mu(x) + \epsilon\sqrt{M^{-1}}\odot\xi` with
:math:`\mu(x) = x + \tfrac{\epsilon^2}{2}M^{-1}\odot\nabla\log\pi(x)` and accept when

.. math:: \log U < \log\pi(x') - \log\pi(x) + \log q(x | x') - \log q(x' | x).

(see :mod:`~vaeml_jax.couplings.proposals`). It is :math:`\pi`-reversible.

Coupled kernel: common random numbers, the SAME :math:`\xi` and U for both chains. Each chain
alone is a MALA chain (exact marginals); under strong log-concavity the chains contract towards
each other but, being continuous, never meet exactly: mix it with a maximal-coupling RWM step
(:func:`vaeml_jax.couplings.mixture.build_coupled_kernel`, Heng & Jacob 2019) to get meetings.
It is faithful: equal states get equal proposals and equal decisions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from vaeml_jax.couplings import _checks, proposals
from vaeml_jax.couplings.base import (
    CoupledInfo,
    CoupledState,
    Info,
    State,
    check_logdensity_fn,
    evaluate,
    init,
    select,
    states_equal,
)

__all__ = ["init", "build_kernel", "build_coupled_kernel"]


def _transition(logdensity_fn, state: State, xi, log_u, step_size, inverse_mass):
    """Propose from ``state`` with noise xi (d,), accept with log_u; returns (state, Info)."""
    flat, unravel = ravel_pytree(state.position)
    grad, _ = ravel_pytree(state.logdensity_grad)
    minv = _checks.flat_scale("inverse_mass", inverse_mass, state.position)
    mean = proposals.langevin_mean(flat, grad, step_size, minv)
    prop_flat = mean + proposals.langevin_scale(step_size, minv) * xi
    new = evaluate(logdensity_fn, unravel(prop_flat))
    new_grad, _ = ravel_pytree(new.logdensity_grad)
    log_ratio = _log_acceptance_ratio(state, new, flat, prop_flat, grad, new_grad, step_size, minv)
    log_ratio = jnp.where(jnp.isnan(log_ratio), -jnp.inf, log_ratio)
    accepted = log_u < log_ratio
    return select(accepted, new, state), Info(accepted, log_ratio)


def _log_acceptance_ratio(state, new, flat, prop_flat, grad, new_grad, step_size, minv):
    """log pi(x') - log pi(x) + log q(x | x') - log q(x' | x), x = flat, x' = prop_flat."""
    return (
        new.logdensity
        - state.logdensity
        + proposals.langevin_log_density(flat, prop_flat, new_grad, step_size, minv)
        - proposals.langevin_log_density(prop_flat, flat, grad, step_size, minv)
    )


def _noise(key, state: State):
    flat, _ = ravel_pytree(state.position)
    key_xi, key_u = jax.random.split(key)
    xi = jax.random.normal(key_xi, flat.shape, flat.dtype)
    return xi, jnp.log(jax.random.uniform(key_u, (), flat.dtype))


def build_kernel(logdensity_fn: Callable, step_size, inverse_mass=1.0) -> Callable:
    """Return ``step(key, state) -> (State, Info)``, one MALA transition.

    Args:
      logdensity_fn: position -> () log pi(position).
      step_size: epsilon > 0 (scalar).
      inverse_mass: diagonal M^{-1} > 0: scalar, (d,) vector or a position-like pytree.
    """
    check_logdensity_fn(logdensity_fn)
    _checks.check_positive("step_size", step_size)
    _checks.check_positive("inverse_mass", inverse_mass)

    def step(key, state: State):
        xi, log_u = _noise(key, state)
        return _transition(logdensity_fn, state, xi, log_u, step_size, inverse_mass)

    return step


def build_coupled_kernel(logdensity_fn: Callable, step_size, inverse_mass=1.0) -> Callable:
    """Return ``step(key, CoupledState) -> (CoupledState, CoupledInfo)``: MALA with common noise.

    Both chains' marginal transitions are exactly :func:`build_kernel`'s (same key use).
    """
    check_logdensity_fn(logdensity_fn)
    _checks.check_positive("step_size", step_size)
    _checks.check_positive("inverse_mass", inverse_mass)

    def step(key, state: CoupledState):
        xi, log_u = _noise(key, state.x)
        new_x, info_x = _transition(logdensity_fn, state.x, xi, log_u, step_size, inverse_mass)
        new_y, info_y = _transition(logdensity_fn, state.y, xi, log_u, step_size, inverse_mass)
        equal = states_equal(state.x, state.y)
        new_y = select(equal, new_x, new_y)
        return CoupledState(new_x, new_y), CoupledInfo(info_x.accepted, info_y.accepted, equal)

    return step
