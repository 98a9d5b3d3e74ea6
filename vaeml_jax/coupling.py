r"""Coupling two CIS chains so that they meet: shared fresh proposals, maximally coupled resampling.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.cis import normalized_weights

__all__ = [
    "CoupledState",
    "maximal_coupling",
    "overlap",
    "resampling_distributions",
    "coupled_select",
    "chain_views",
]


class CoupledState(NamedTuple):
    """A coupled pair (X_t, Y_{t-1}) for one example, in atom form.

    Attributes:
      atoms: (S+1, *latent_shape) [kept_x, kept_y, shared fresh ...].
      log_joint: (S+1,) log p(x, atom).
      log_proposal: (S+1,) log q(atom | x).
      met: () bool, X_t == Y_{t-1} (then atoms 0 and 1 are the same particle).
    """

    atoms: jax.Array
    log_joint: jax.Array
    log_proposal: jax.Array
    met: jax.Array


def maximal_coupling(key, p: jax.Array, q: jax.Array):
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


def chain_views(log_w_atoms: jax.Array, met: jax.Array):
    """Log weights of X's tuple (atoms 0,2..S) and Y's tuple (atoms 1,2..S) as (S+1,) vectors.

    The atom a chain does not own gets -inf. When met, Y's kept particle is the same particle as
    X's, so Y's mass on it is placed on atom 0 (the two distributions then coincide exactly).
    """
    neg_inf = jnp.full((1,), -jnp.inf, log_w_atoms.dtype)
    lw_x = jnp.concatenate([log_w_atoms[:1], neg_inf, log_w_atoms[2:]])
    lw_y_unmet = jnp.concatenate([neg_inf, log_w_atoms[1:2], log_w_atoms[2:]])
    lw_y = jnp.where(met, lw_x, lw_y_unmet)
    return lw_x, lw_y


def resampling_distributions(log_w_atoms: jax.Array, met: jax.Array):
    """The two chains' resampling distributions over the S+1 atoms: (p_x, p_y)."""
    lw_x, lw_y = chain_views(log_w_atoms, met)
    return normalized_weights(lw_x), normalized_weights(lw_y)


def coupled_select(key, log_w_atoms: jax.Array, met: jax.Array):
    """Maximally coupled resampling: atom indices (i, j) kept by X and Y, and whether they meet."""
    p_x, p_y = resampling_distributions(log_w_atoms, met)
    i, j = maximal_coupling(key, p_x, p_y)
    return i, j, i == j
