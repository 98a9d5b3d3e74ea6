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

Kernels follow blackjax: ``init`` and ``build_kernel(...) -> step`` over NamedTuple states, and
every random function here takes its key FIRST (``init(key, ...)``, ``step(key, state, ...)``,
``maximal_coupling(key, p, q)``), as every kernel of :mod:`vaeml_jax.couplings` does; the
estimators built on them take it last, ``estimator(params, x, key)``.
The same kernels in the general driver's ``step(key, state)`` form, closed over (params, x), are
in :mod:`vaeml_jax.couplings.vae_reference`.

**The coupling** of two CIS chains so that they meet: shared fresh proposals, maximally coupled
resampling.

The pair (X_t, Y_{t-1}) is stored compactly as S+1 *atoms*::

    atoms = [kept_x, kept_y, f_1, ..., f_{S-1}]
    X_t     = atoms[0, 2, ..., S]        Y_{t-1} = atoms[1, 2, ..., S]

because both chains use the same S-1 fresh proposals f. Each chain's resampling distribution is a
categorical over atoms (X puts no mass on atom 1, Y none on atom 0), and the two are drawn from
their *maximal coupling*: the next kept particles coincide with probability

.. math:: P(\text{meet}) = \sum_{j \ge 2} \min(\bar w^X_j, \bar w^Y_j),

the overlap of the two resampling distributions, which is the largest meeting probability any
coupling of these two draws can have. Once the kept particles coincide the two tuples are equal,
both distributions are identical and the coupling keeps them equal forever (faithfulness).

What this guarantees, and how it is tested: each chain alone is a CIS chain with the single-chain
kernel's law (the coupling only correlates the two); meeting happens exactly with the overlap
probability; met chains stay met. Meeting in finite time (with probability one) follows from the
overlap being positive whenever the fresh proposals have positive weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.models.interface import LatentVariableModel, log_weights

__all__ = [
    "CISState",
    "CISInfo",
    "init",
    "build_kernel",
    "refresh",
    "normalized_weights",
    "AtomPair",
    "maximal_coupling",
    "overlap",
    "resampling_distributions",
    "coupled_select",
    "chain_views",
]


class CISState(NamedTuple):
    """State of one CIS chain for one example.

    Attributes:
      particles: ``(S, *latent_shape)`` the augmented tuple z_{1:S}.
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

    index: jax.Array  # type: ignore[assignment]  # a field, named like tuple.index


def normalized_weights(log_w: jax.Array) -> jax.Array:
    """Self-normalised weights softmax(log w) on the last axis; all -inf gives uniform, not NaN."""
    all_bad = jnp.all(jnp.isneginf(log_w), axis=-1, keepdims=True)
    log_w = jnp.where(all_bad, jnp.zeros_like(log_w), log_w)
    return jax.nn.softmax(log_w, axis=-1)


def init(
    key: jax.Array, model: LatentVariableModel, params: Any, x: jax.Array, num_particles: int
) -> CISState:
    """X_0 ~ q^S: draw the tuple from the proposal (particles are not differentiated)."""
    z = jax.lax.stop_gradient(model.sample_proposal(params, x, key, num_particles))
    lj, lq, _ = log_weights(model, params, x, z)
    return CISState(z, lj, lq)


def refresh(
    key: jax.Array,
    model: LatentVariableModel,
    params: Any,
    x: jax.Array,
    kept: jax.Array,
    num_particles: int,
) -> jax.Array:
    """The tuple (kept, z'_1, ..., z'_{S-1}) with z' ~ q fresh; returns the new particles."""
    fresh = jax.lax.stop_gradient(model.sample_proposal(params, x, key, num_particles - 1))
    return jnp.concatenate([kept[None].astype(fresh.dtype), fresh], axis=0)


def build_kernel(
    model: LatentVariableModel, num_particles: int
) -> Callable[[jax.Array, CISState, Any, jax.Array], tuple[CISState, CISInfo]]:
    """Return ``step(key, state, params, x) -> (state, CISInfo)``, one CIS transition.

    Costs S-1 evaluations of log_joint: the kept particle's values are carried over.
    """

    def step(
        key: jax.Array, state: CISState, params: Any, x: jax.Array
    ) -> tuple[CISState, CISInfo]:
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


class AtomPair(NamedTuple):
    """A coupled pair (X_t, Y_{t-1}) for one example, in atom form.

    Attributes:
      atoms: ``(S+1, *latent_shape)`` [kept_x, kept_y, shared fresh ...].
      log_joint: (S+1,) log p(x, atom).
      log_proposal: (S+1,) log q(atom | x).
      met: () bool, X_t == Y_{t-1} (then atoms 0 and 1 are the same particle).
    """

    atoms: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array
    met: jax.Array


def maximal_coupling(key: jax.Array, p: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Draw (i, j) with i ~ p, j ~ q and P(i = j) = \sum_a \min(p_a, q_a), the maximum possible.

    With probability omega = sum min(p, q) draw i = j ~ min(p, q) / omega; otherwise draw i from the
    residual (p - min) / (1 - omega) and j from (q - min) / (1 - omega) independently (their
    supports are disjoint, so i != j there).

    Args:
      key: a PRNG key.
      p, q: (A,) probability vectors over the same atoms.
    Returns:
      ``(i, j)`` int32 scalars.
    """
    key_u, key_common, key_i, key_j = jax.random.split(key, 4)
    common = jnp.minimum(p, q)
    omega = jnp.sum(common)
    tiny = jnp.finfo(p.dtype).tiny

    def log_of(v):
        return jnp.where(v > 0, jnp.log(jnp.maximum(v, tiny)), -jnp.inf)

    same = jax.random.uniform(key_u, dtype=p.dtype) < omega
    i_common = jax.random.categorical(key_common, log_of(common))
    res_p = jnp.maximum(p - common, 0.0)
    res_q = jnp.maximum(q - common, 0.0)
    # If a residual is all zero (p == q up to rounding) fall back to the common draw.
    i_res = jnp.where(jnp.sum(res_p) > 0, jax.random.categorical(key_i, log_of(res_p)), i_common)
    j_res = jnp.where(jnp.sum(res_q) > 0, jax.random.categorical(key_j, log_of(res_q)), i_common)
    i = jnp.where(same, i_common, i_res)
    j = jnp.where(same, i_common, j_res)
    return i.astype(jnp.int32), j.astype(jnp.int32)


def overlap(p: jax.Array, q: jax.Array) -> jax.Array:
    """sum_a min(p_a, q_a): the probability that a maximal coupling of p and q draws i = j."""
    return jnp.sum(jnp.minimum(p, q))


def chain_views(log_w_atoms: jax.Array, met: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log weights of X's tuple (atoms 0,2..S) and Y's tuple (atoms 1,2..S) as (S+1,) vectors.

    The atom a chain does not own gets -inf. When met, Y's kept particle is the same particle as
    X's, so Y's mass on it is placed on atom 0 (the two distributions then coincide exactly).
    """
    neg_inf = jnp.full((1,), -jnp.inf, log_w_atoms.dtype)
    lw_x = jnp.concatenate([log_w_atoms[:1], neg_inf, log_w_atoms[2:]])
    lw_y_unmet = jnp.concatenate([neg_inf, log_w_atoms[1:2], log_w_atoms[2:]])
    lw_y = jnp.where(met, lw_x, lw_y_unmet)
    return lw_x, lw_y


def resampling_distributions(log_w_atoms: jax.Array, met: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two chains' resampling distributions over the S+1 atoms: (p_x, p_y)."""
    lw_x, lw_y = chain_views(log_w_atoms, met)
    return normalized_weights(lw_x), normalized_weights(lw_y)


def coupled_select(
    key: jax.Array, log_w_atoms: jax.Array, met: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Maximally coupled resampling: atom indices (i, j) kept by X and Y, and whether they meet."""
    p_x, p_y = resampling_distributions(log_w_atoms, met)
    i, j = maximal_coupling(key, p_x, p_y)
    return i, j, i == j
