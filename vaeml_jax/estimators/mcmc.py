r"""The ablation: the average of h along ONE CIS chain, without the bias correction (biased).

.. math:: \mathrm{MCMC}_{b:T} = \frac{1}{T-b+1} \sum_{t=b}^{T} h(X_t),
          \qquad X_0 \sim q^S,\; X_t \sim K(X_{t-1}),

with b = ``burn_in`` and T = ``num_steps``. This is exactly the first term of H_{b:T} in
:mod:`vaeml_jax.estimators.unbiased`; the difference between the two is the correction that
removes the bias of starting the chain at q^S. Its bias decays with T like the chain's mixing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vaeml_jax.couplings.cis import normalized_weights
from vaeml_jax.estimators import _common
from vaeml_jax.estimators._common import EncoderObjective, GradientEstimator, LossGradient
from vaeml_jax.models.interface import LatentVariableModel, check_model

__all__ = ["make_mcmc_grad"]


def make_mcmc_grad(
    model: LatentVariableModel,
    *,
    num_particles: int = 10,
    num_steps: int = 5,
    burn_in: int = 0,
    encoder_objective: EncoderObjective | None = "iwae",
    encoder_particles: int | None = None,
) -> GradientEstimator:
    r"""Average of the IWAE theta-gradient h along one CIS chain per example (biased), as the
    gradient of the loss -(1/B) \sum_i \log p(x_i).

    Args:
      model: a :class:`LatentVariableModel` (the only positional argument).
      num_particles: S >= 2.
      num_steps: T >= 0 CIS transitions after X_0.
      burn_in: 0 <= b <= T; h is averaged over t = b, ..., T (b = 0 includes X_0, the IWAE draw).
      encoder_objective: ``"iwae"``/``"elbo"``/``"iwae_dreg"``/``"chi2"`` (reparameterised,
        on X_0; see :func:`vaeml_jax.estimators._common.encoder_loss`), ``"inclusive_kl"``
        (the same chain average applied to \nabla_\phi \log q: biased RWS-like) or None.
      encoder_particles: as in :func:`vaeml_jax.make_unbiased_grad` (None: X_0's S draws;
        another K: K draws of its own, + B K evaluations).

    Returns:
      A :class:`GradientEstimator` ``grad_fn(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`, as :func:`make_unbiased_grad`: ``grads`` is the
      (biased) estimate of the gradient of -(1/B) sum_i log p(x_i) on theta and of the encoder
      loss on phi; ``info["num_iters"]`` is T for every example, ``num_log_joint_evals`` is
      B (S + (S-1) b' + S (T - b')) with b' = max(b, 1) - 1 burn-in-only steps.
    """
    check_model(model)
    S = _common.check_num_particles(num_particles, cis_based=True)
    T = _common.check_int("num_steps", num_steps, 0)
    b = _common.check_int("burn_in", burn_in, 0)
    if b > T:
        raise ValueError(f"burn_in must be <= num_steps, got burn_in={b} > num_steps={T}.")
    _common.check_encoder_objective(encoder_objective)
    K, own_draws = _common.check_encoder_particles(encoder_particles, encoder_objective, S)
    inclusive = encoder_objective == "inclusive_kl"
    reparam_objective = encoder_objective in _common.REPARAM_OBJECTIVES
    n = T - b + 1
    burn_only = max(b, 1) - 1  # transitions before the first averaged state (t = 1 .. b-1)

    def grad_fn(params: Any, x: jax.Array, keys: jax.Array) -> LossGradient:
        B = x.shape[0]
        scale = -1.0 / B
        split = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 2)))(keys)
        key_x0, key_loop = split[..., 0], split[..., 1]

        def init_fn(p):
            z = jax.lax.stop_gradient(_common.sample_lanes(model, p, x, key_x0, S))
            lj, lq = _common.eval_lanes(model, p, x, z, inclusive)
            enc = jnp.zeros((), lj.dtype)
            if reparam_objective:
                enc_keys = _common.encoder_keys(key_x0) if own_draws else key_x0
                enc, _ = _common.encoder_loss(model, p, x, enc_keys, K, encoder_objective)
            return (lj, lq, enc), z

        (lj, lq, _), init_vjp, z = jax.vjp(init_fn, params, has_aux=True)
        lw0 = _common.safe_log_weights(lj, lq)
        c0 = (scale * (1.0 / n if b == 0 else 0.0) * normalized_weights(lw0)).astype(lj.dtype)
        (grads,) = init_vjp((c0, c0 if inclusive else jnp.zeros_like(c0), jnp.ones((), lj.dtype)))

        def propose(t, z, lj, lq):
            step = jax.vmap(jax.vmap(jax.random.fold_in))(key_loop, jnp.full((B, 1), t))
            pair = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 2)))(step)
            lw = _common.safe_log_weights(lj, lq)
            idx = jax.vmap(jax.vmap(jax.random.categorical))(pair[..., 0], lw)
            idx = jnp.where(jnp.all(jnp.isneginf(lw), axis=-1), 0, idx)
            kept = jax.vmap(jax.vmap(lambda a, i: a[i]))(z, idx)[:, :, None]
            fresh = jax.lax.stop_gradient(
                _common.sample_lanes(model, params, x, pair[..., 1], S - 1)
            )
            return kept, fresh, idx

        def gather_last(a, idx):
            return jax.vmap(jax.vmap(lambda ai, ii: ai[ii]))(a, idx)[..., None]

        def burn_step(carry, t):  # forward only: S-1 new evaluations
            z, lj, lq = carry
            kept, fresh, idx = propose(t, z, lj, lq)
            ljf, lqf = _common.eval_lanes(model, params, x, fresh)
            z = jnp.concatenate([kept, fresh], axis=2)
            lj = jnp.concatenate([gather_last(lj, idx), ljf], axis=-1)
            lq = jnp.concatenate([gather_last(lq, idx), lqf], axis=-1)
            return (z, lj, lq), None

        def avg_step(carry, t):  # one vjp over the S particles of X_t
            z, lj, lq, g = carry
            kept, fresh, _ = propose(t, z, lj, lq)
            z = jnp.concatenate([kept, fresh], axis=2)
            (lj, lq), vjp = jax.vjp(lambda p: _common.eval_lanes(model, p, x, z, inclusive), params)
            c = (scale / n * normalized_weights(_common.safe_log_weights(lj, lq))).astype(lj.dtype)
            (gt,) = vjp((c, c if inclusive else jnp.zeros_like(c)))
            return (z, lj, lq, jax.tree.map(jnp.add, g, gt)), None

        carry = (z, lj, lq)
        if burn_only:
            carry, _ = jax.lax.scan(burn_step, carry, jnp.arange(1, burn_only + 1))
        first_avg = max(b, 1)
        if T >= first_avg:
            (_, _, _, grads), _ = jax.lax.scan(
                avg_step, (*carry, grads), jnp.arange(first_avg, T + 1)
            )
        bound = _common.log_mean_exp(lw0)[:, 0]
        evals = B * (S + (S - 1) * burn_only + S * max(T - first_avg + 1, 0))
        evals += B * K if own_draws else 0
        info = _common.base_info(B, 1, bound, evals, lw0)
        info["num_iters"] = jnp.full((B, 1), T, jnp.int32)
        return LossGradient(grads, info)

    return _common.GradientEstimator("mcmc", 1, grad_fn, model)
