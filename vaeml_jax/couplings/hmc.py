r"""Hamiltonian Monte Carlo (fixed step size and number of leapfrog steps) and its CRN coupling.

Single kernel: draw :math:`p \sim N(0, M)` (M diagonal, given by its inverse :math:`M^{-1}`), run
``num_steps`` leapfrog steps of size :math:`\epsilon` (:mod:`~vaeml_jax.couplings.integrators`)
and accept :math:`(x', p')` when :math:`\log U < H(x, p) - H(x', p')`,
:math:`H = -\log\pi(x) + \tfrac12 p^\top M^{-1} p`. It is :math:`\pi`-invariant.

Coupled kernel (Heng & Jacob 2019): common random numbers, the SAME momentum noise and U for both
chains. Each chain alone is an HMC chain (exact marginals); on log-concave targets the chains
contract but do not meet exactly: use :func:`vaeml_jax.couplings.mixture.build_coupled_kernel`
with a maximal-coupling RWM step to make them meet. Faithful: equal states stay equal.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from vaeml_jax.couplings import _checks, integrators
from vaeml_jax.couplings.base import (
    CoupledInfo,
    CoupledState,
    Info,
    State,
    check_logdensity_fn,
    init,
    select,
    states_equal,
)

__all__ = ["init", "build_kernel", "build_coupled_kernel"]


def _transition(logdensity_fn, state: State, xi, log_u, step_size, num_steps, inverse_mass):
    flat, unravel = ravel_pytree(state.position)
    grad, _ = ravel_pytree(state.logdensity_grad)
    minv = _checks.flat_scale("inverse_mass", inverse_mass, state.position)

    def value_and_grad_flat(v):
        value, g = jax.value_and_grad(logdensity_fn)(unravel(v))
        return value, ravel_pytree(g)[0]

    p0 = xi / jnp.sqrt(minv)  # p ~ N(0, M), M = diag(1 / inverse_mass)
    x1, p1, value1, grad1 = integrators.leapfrog(
        value_and_grad_flat, flat, p0, grad, step_size, num_steps, inverse_mass=minv
    )
    h0 = -state.logdensity + integrators.kinetic_energy(p0, minv)
    h1 = -value1 + integrators.kinetic_energy(p1, minv)
    log_ratio = jnp.where(jnp.isnan(h0 - h1), -jnp.inf, h0 - h1)
    accepted = log_u < log_ratio
    _, unravel_grad = ravel_pytree(state.logdensity_grad)
    new = State(unravel(x1), value1, unravel_grad(grad1))
    return select(accepted, new, state), Info(accepted, log_ratio)


def _noise(key, state: State):
    flat, _ = ravel_pytree(state.position)
    key_xi, key_u = jax.random.split(key)
    xi = jax.random.normal(key_xi, flat.shape, flat.dtype)
    return xi, jnp.log(jax.random.uniform(key_u, (), flat.dtype))


def _check(logdensity_fn, step_size, num_steps, inverse_mass):
    check_logdensity_fn(logdensity_fn)
    _checks.check_positive("step_size", step_size)
    _checks.check_int("num_steps", num_steps, 1)
    _checks.check_positive("inverse_mass", inverse_mass)


def build_kernel(logdensity_fn: Callable, step_size, num_steps: int, inverse_mass=1.0) -> Callable:
    """Return ``step(key, state) -> (State, Info)``, one HMC transition.

    Args:
      logdensity_fn: position -> () log pi(position).
      step_size: leapfrog epsilon > 0.
      num_steps: leapfrog steps per transition (>= 1); each costs one ``value_and_grad``.
      inverse_mass: diagonal M^{-1} > 0: scalar, (d,) vector or a position-like pytree.
    """
    _check(logdensity_fn, step_size, num_steps, inverse_mass)

    def step(key, state: State):
        xi, log_u = _noise(key, state)
        return _transition(logdensity_fn, state, xi, log_u, step_size, num_steps, inverse_mass)

    return step


def build_coupled_kernel(
    logdensity_fn: Callable, step_size, num_steps: int, inverse_mass=1.0
) -> Callable:
    """Return ``step(key, CoupledState) -> (CoupledState, CoupledInfo)``: HMC with common noise.

    Both chains' marginal transitions are exactly :func:`build_kernel`'s (same key use).
    """
    _check(logdensity_fn, step_size, num_steps, inverse_mass)

    def step(key, state: CoupledState):
        xi, log_u = _noise(key, state.x)
        args = (step_size, num_steps, inverse_mass)
        new_x, info_x = _transition(logdensity_fn, state.x, xi, log_u, *args)
        new_y, info_y = _transition(logdensity_fn, state.y, xi, log_u, *args)
        equal = states_equal(state.x, state.y)
        new_y = select(equal, new_x, new_y)
        return CoupledState(new_x, new_y), CoupledInfo(info_x.accepted, info_y.accepted, equal)

    return step
