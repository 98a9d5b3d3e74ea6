r"""The leapfrog (velocity Verlet) integrator with a diagonal inverse mass, on flat vectors.

For :math:`H(x, p) = -\log\pi(x) + \tfrac12 p^\top M^{-1} p`, one leapfrog step of size
:math:`\epsilon` is

.. math:: p \leftarrow p + \tfrac{\epsilon}{2}\nabla\log\pi(x),\quad
          x \leftarrow x + \epsilon M^{-1} p,\quad
          p \leftarrow p + \tfrac{\epsilon}{2}\nabla\log\pi(x).

It is volume-preserving and reversible (with a momentum flip), which is what makes the HMC
acceptance ratio :math:`\exp(H(x,p) - H(x',p'))` exact.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["leapfrog", "kinetic_energy"]


def kinetic_energy(momentum: jax.Array, inverse_mass: jax.Array) -> jax.Array:
    """() 0.5 p^T diag(inverse_mass) p."""
    return 0.5 * jnp.sum(inverse_mass * momentum**2)


def leapfrog(
    value_and_grad_fn: Callable,
    x: jax.Array,
    momentum: jax.Array,
    grad: jax.Array,
    step_size,
    num_steps: int,
    inverse_mass: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``num_steps`` leapfrog steps from (x, p) with current gradient ``grad`` (all (d,)).

    ``value_and_grad_fn(flat_x) -> (log pi, grad)``. Returns ``(x, p, logdensity, grad)`` at the
    end of the trajectory; one gradient evaluation per step.
    """

    def one(_, carry):
        x, p, _, g = carry
        p = p + 0.5 * step_size * g
        x = x + step_size * inverse_mass * p
        value, g = value_and_grad_fn(x)
        p = p + 0.5 * step_size * g
        return x, p, value, g

    init = (x, momentum, jnp.zeros((), x.dtype), grad)
    return jax.lax.fori_loop(0, num_steps, one, init)
