r"""Maximal couplings of two Gaussians with a common diagonal covariance (reflection coupling).

For :math:`X \sim N(\mu_1, \Sigma)`, :math:`Y \sim N(\mu_2, \Sigma)` with
:math:`\Sigma = \mathrm{diag}(s^2)`, the reflection-maximal coupling (Jacob, O'Leary & Atchade
2020, Sec. 4.1; Bou-Rabee, Eberle & Zimmer 2020) is, with :math:`z = (\mu_1 - \mu_2) / s` and
:math:`e = z / \|z\|`:

1. draw :math:`\xi \sim N(0, I)` and set :math:`X = \mu_1 + s\,\xi`;
2. with probability :math:`\min\{1, \varphi(\xi + z) / \varphi(\xi)\}` set :math:`Y = X`;
3. otherwise :math:`Y = \mu_2 + s\,(\xi - 2 (e^\top \xi) e)` (reflect :math:`\xi` in the
   hyperplane orthogonal to :math:`z`).

Guarantees: X and Y have exactly the two Gaussian marginals, and
:math:`P(X = Y) = 1 - d_{TV}(N(\mu_1,\Sigma), N(\mu_2,\Sigma)) = 2\Phi(-\|z\|/2)`, the largest
possible. Equal means (z = 0) give X = Y always.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["ReflectionDraw", "reflection_maximal", "meeting_probability"]


class ReflectionDraw(NamedTuple):
    """A coupled draw: x (d,), y (d,) and whether they are equal (() bool)."""

    x: jax.Array
    y: jax.Array
    equal: jax.Array


def reflection_maximal(key, mu1: jax.Array, mu2: jax.Array, scale: jax.Array) -> ReflectionDraw:
    r"""One draw of the reflection-maximal coupling of N(mu1, diag(scale^2)) and N(mu2, same).

    Args:
      key: a PRNG key.
      mu1, mu2: (d,) means.
      scale: (d,) standard deviations (> 0).
    Returns:
      :class:`ReflectionDraw` with x ~ N(mu1, .), y ~ N(mu2, .), P(x == y) maximal.
    """
    key_xi, key_u = jax.random.split(key)
    xi = jax.random.normal(key_xi, mu1.shape, mu1.dtype)
    z = (mu1 - mu2) / scale
    norm = jnp.sqrt(jnp.sum(z**2))
    e = z / jnp.where(norm > 0, norm, 1.0)
    # log phi(xi + z) - log phi(xi) = -(2 xi.z + |z|^2) / 2
    log_ratio = -0.5 * (2.0 * jnp.dot(xi, z) + norm**2)
    equal = jnp.log(jax.random.uniform(key_u, (), mu1.dtype)) < jnp.minimum(0.0, log_ratio)
    x = mu1 + scale * xi
    y = jnp.where(equal, x, mu2 + scale * _reflect(xi, e))
    return ReflectionDraw(x, y, equal)


def _reflect(xi: jax.Array, e: jax.Array) -> jax.Array:
    """xi reflected in the hyperplane orthogonal to the unit vector e: xi - 2 (e.xi) e."""
    return xi - 2.0 * jnp.dot(e, xi) * e


def meeting_probability(mu1: jax.Array, mu2: jax.Array, scale: jax.Array) -> jax.Array:
    r"""P(X = Y) under the reflection-maximal coupling: :math:`2\Phi(-\|(\mu_1-\mu_2)/s\|/2)`."""
    norm = jnp.sqrt(jnp.sum(((mu1 - mu2) / scale) ** 2))
    return 2.0 * jax.scipy.stats.norm.cdf(-0.5 * norm)
