r"""Gaussian proposals of the position kernels, on flat (d,) vectors.

* random walk: :math:`x' = x + s \odot \xi`, symmetric, so it needs no density correction;
* Langevin (MALA): :math:`x' = \mu(x) + \epsilon \sqrt{M^{-1}} \odot \xi` with
  :math:`\mu(x) = x + \tfrac{\epsilon^2}{2} M^{-1} \odot \nabla \log\pi(x)` and
  :math:`\log q(x' | x) = -\|(x' - \mu(x)) / (\epsilon\sqrt{M^{-1}})\|^2 / 2 + \text{const}`.

M^{-1} is a diagonal inverse mass (preconditioner), a (d,) vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["langevin_mean", "langevin_scale", "langevin_log_density"]


def langevin_mean(x: jax.Array, grad: jax.Array, step_size, inverse_mass: jax.Array) -> jax.Array:
    """(d,) mean of the MALA proposal from x (d,) with gradient grad (d,)."""
    return x + 0.5 * step_size**2 * inverse_mass * grad


def langevin_scale(step_size, inverse_mass: jax.Array) -> jax.Array:
    """(d,) standard deviations of the MALA proposal."""
    return step_size * jnp.sqrt(inverse_mass)


def langevin_log_density(x_new, x, grad, step_size, inverse_mass) -> jax.Array:
    """() log q(x_new | x) of the MALA proposal, up to a constant that cancels in MH ratios."""
    r = (x_new - langevin_mean(x, grad, step_size, inverse_mass)) / langevin_scale(
        step_size, inverse_mass
    )
    return -0.5 * jnp.sum(r**2)
