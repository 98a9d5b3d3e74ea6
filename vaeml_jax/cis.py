r"""Conditional importance sampling (iterated SIR): the single-chain Markov kernel.

The state is the augmented tuple Z = (z_1, ..., z_S) of the IWAE. Its target is the extended
distribution

.. math:: \bar\pi(z_{1:S}) \propto \hat Z(z_{1:S}) \prod_s q(z_s | x),
          \qquad \hat Z = \frac1S \sum_s \frac{p(x, z_s)}{q(z_s | x)},

under which one particle drawn with probability \bar w_s is an exact posterior draw and
h(Z) = \sum_s \bar w_s \nabla_\theta \log p(x, z_s) has expectation \nabla_\theta \log p(x).

One step: resample an index b ~ Cat(\bar w(Z)), keep z_b in slot 0 and refresh slots 1..S-1 with
fresh draws from q. It leaves \bar\pi invariant up to the order of the particles (h and \hat Z
are symmetric, so that order never matters), and the kept particle of a stationary chain is a
posterior draw. Functions here act on ONE example; vmap them over a batch.

Kernels follow blackjax: ``init`` and ``build_kernel(...) -> step`` over NamedTuple states.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.model import LatentVariableModel, log_weights

__all__ = ["CISState", "CISInfo", "init", "build_kernel", "refresh", "normalized_weights"]


class CISState(NamedTuple):
    """State of one CIS chain for one example.

    Attributes:
      particles: (S, *latent_shape) the augmented tuple z_{1:S}.
      log_joint: (S,) log p(x, z_s).
      log_proposal: (S,) log q(z_s | x).
    """

    particles: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array

    @property
    def log_weights(self) -> jax.Array:
        lw = self.log_joint - self.log_proposal
        return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


class CISInfo(NamedTuple):
    """What one step did: the resampled index (into the previous tuple)."""

    index: jax.Array


def normalized_weights(log_w: jax.Array) -> jax.Array:
    """Self-normalised weights softmax(log w) on the last axis; all -inf gives uniform, not NaN."""
    all_bad = jnp.all(jnp.isneginf(log_w), axis=-1, keepdims=True)
    log_w = jnp.where(all_bad, jnp.zeros_like(log_w), log_w)
    return jax.nn.softmax(log_w, axis=-1)


def init(model: LatentVariableModel, params, x, key, num_particles: int) -> CISState:
    """X_0 ~ q^S: draw the tuple from the proposal (particles are not differentiated)."""
    z = jax.lax.stop_gradient(model.sample_proposal(params, x, key, num_particles))
    lj, lq, _ = log_weights(model, params, x, z)
    return CISState(z, lj, lq)


def refresh(model: LatentVariableModel, params, x, key, kept: jax.Array, num_particles: int):
    """The tuple (kept, z'_1, ..., z'_{S-1}) with z' ~ q fresh; returns the new particles."""
    fresh = jax.lax.stop_gradient(model.sample_proposal(params, x, key, num_particles - 1))
    return jnp.concatenate([kept[None].astype(fresh.dtype), fresh], axis=0)


def build_kernel(model: LatentVariableModel, num_particles: int):
    """Return ``step(key, state, params, x) -> (state, CISInfo)``, one CIS transition.

    Costs S-1 evaluations of log_joint: the kept particle's values are carried over.
    """

    def step(key, state: CISState, params, x):
        key_index, key_fresh = jax.random.split(key)
        index = jax.random.categorical(key_index, state.log_weights)
        index = jnp.where(jnp.all(jnp.isneginf(state.log_weights)), 0, index)
        fresh = jax.lax.stop_gradient(
            model.sample_proposal(params, x, key_fresh, num_particles - 1)
        )
        lj_f, lq_f, _ = log_weights(model, params, x, fresh)
        particles = jnp.concatenate([state.particles[index][None], fresh], axis=0)
        new = CISState(
            particles,
            jnp.concatenate([state.log_joint[index][None], lj_f]),
            jnp.concatenate([state.log_proposal[index][None], lq_f]),
        )
        return new, CISInfo(index)

    return step
