r"""The lower-bound baselines: the standard VAE (ELBO) and the IWAE, behind the common interface.

Both return ``grads, info = grad_fn(params, x, key)`` like :func:`make_unbiased_grad`. On the
parameters ``log_joint`` reads (theta) ``grads`` is the gradient of the LOSS

.. math:: -\frac1B \sum_i \mathcal L(x_i),

with \mathcal L the ELBO or the IWAE-S bound, i.e. a biased estimate of -\nabla_\theta \log p(x)
(the bias is what the unbiased estimator removes). On parameters only the proposal reads (phi) it
is the gradient of the chosen encoder objective with theta held fixed; ``None`` gives zeros there.
A parameter read by both functions receives the sum of the two.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from vaeml_jax.estimators import _common
from vaeml_jax.estimators._common import EncoderObjective, GradientEstimator, LossGradient
from vaeml_jax.models.interface import LatentVariableModel, check_model

__all__ = ["make_iwae_grad", "make_elbo_grad"]


def _make_bound_grad(
    model: LatentVariableModel,
    num_particles: int,
    encoder_objective: EncoderObjective | None,
    bound: Literal["elbo", "iwae"],
    encoder_particles: int | None,
) -> GradientEstimator:
    K, own_draws = _common.check_encoder_particles(
        encoder_particles, encoder_objective, num_particles
    )
    # the textbook estimator: one surrogate, one backward pass
    fused = encoder_objective == bound and not own_draws

    def grad_fn(params: Any, x: jax.Array, keys: jax.Array) -> LossGradient:
        batch = x.shape[0]

        def loss_fn(p):
            if fused:
                loss, lw = _common.encoder_loss_joint(model, p, x, keys, num_particles, bound)
                return loss, lw
            z = jax.lax.stop_gradient(_common.sample_lanes(model, p, x, keys, num_particles))
            lj, lq = _common.eval_lanes(model, p, x, z)
            lw = _common.safe_log_weights(lj, lq)
            if bound == "iwae":
                coef = jax.nn.softmax(lw, axis=-1)
            else:
                coef = jnp.full_like(lw, 1.0 / num_particles)
            coef = jax.lax.stop_gradient(coef)
            loss = -jnp.sum(coef * lj) / batch
            if encoder_objective == "inclusive_kl":
                loss = loss - jnp.sum(coef * lq) / batch
            elif encoder_objective is not None:
                enc_keys = _common.encoder_keys(keys) if own_draws else keys
                enc, _ = _common.encoder_loss(model, p, x, enc_keys, K, encoder_objective)
                loss = loss + enc
            return loss, lw

        grads, lw = jax.grad(loss_fn, has_aux=True)(params)
        lw = jax.lax.stop_gradient(lw)
        per_example = _common.log_mean_exp(lw) if bound == "iwae" else jnp.mean(lw, axis=-1)
        evals = batch * (num_particles + (K if own_draws else 0))
        info = _common.base_info(batch, 1, per_example[:, 0], evals, lw)
        return LossGradient(grads, info)

    return _common.GradientEstimator(bound, 1, grad_fn, model)


def make_iwae_grad(
    model: LatentVariableModel,
    *,
    num_particles: int = 10,
    encoder_objective: EncoderObjective | None = "iwae",
    encoder_particles: int | None = None,
) -> GradientEstimator:
    r"""IWAE gradient estimator (Burda, Grosse & Salakhutdinov, 2016) of the loss -(1/B) \sum_i
    IWAE_S(x_i).

    theta: h(Z) = \sum_s \bar w_s \nabla_\theta \log p(x, z_s) with Z ~ q^S, whose expectation is
    the gradient of the IWAE-S bound, not of \log p(x) (bias O(1/S)).

    Args:
      model: a :class:`LatentVariableModel` (the only positional argument).
      num_particles: S >= 1 importance samples per example.
      encoder_objective: ``"iwae"`` (default, the bound itself by reparameterisation; then theta
        and phi come from a single backward pass), ``"elbo"``, ``"iwae_dreg"`` (the IWAE bound's
        doubly-reparameterised gradient: same expectation, lower variance),
        ``"chi2"`` (minimise the chi^2 upper bound log E_q[w^2]: the importance weights'
        variance), ``"inclusive_kl"`` (the reweighted-wake-sleep update
        -\sum_s \bar w_s \nabla_\phi \log q(z_s|x), self-normalised and hence biased) or None.
        See :func:`vaeml_jax.estimators._common.encoder_loss`.
      encoder_particles: K >= 1 particles of the reparameterised encoder objective. None
        (default): K = S on the estimator's own draws. Another K draws K fresh particles per
        example (independent keys), counted in ``num_log_joint_evals``.

    Returns:
      A :class:`GradientEstimator` ``grad_fn(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`, with x of shape (B, ...): ``grads`` the gradient of the loss above
      on theta (descent-ready), of the encoder objective's loss on phi. ``info``, a
      :class:`GradientInfo`: per example ``bound`` (B,) the IWAE-S bound of the draw,
      ``meeting_time``/``num_iters``/``capped`` (B, 1) zeros (no chains), ``ess``,
      ``log1p_chi2``, ``log_weight_std`` (B,) the draws' importance diagnostics, and
      ``num_log_joint_evals`` = B*S (+ B*K for an encoder objective with its own K draws).
    """
    check_model(model)
    num_particles = _common.check_num_particles(num_particles, cis_based=False)
    _common.check_encoder_objective(encoder_objective)
    return _make_bound_grad(model, num_particles, encoder_objective, "iwae", encoder_particles)


def make_elbo_grad(
    model: LatentVariableModel,
    *,
    num_particles: int = 1,
    encoder_objective: EncoderObjective | None = "elbo",
    encoder_particles: int | None = None,
) -> GradientEstimator:
    r"""Standard VAE gradient (Kingma & Welling, 2014) of the loss -(1/B) \sum_i ELBO(x_i), the
    ELBO by reparameterisation.

    theta: (1/S) \sum_s \nabla_\theta \log p(x, z_s), z_s ~ q; the gradient of the ELBO, biased
    for \nabla_\theta \log p(x) by the posterior mismatch.

    Args:
      model: a :class:`LatentVariableModel` (the only positional argument).
      num_particles: S >= 1 Monte-Carlo samples of z per example (default 1).
      encoder_objective: ``"elbo"`` (default, the standard VAE: one backward pass), ``"iwae"``,
        ``"iwae_dreg"``, ``"chi2"``, ``"inclusive_kl"`` or None (see :func:`make_iwae_grad`).
      encoder_particles: as in :func:`make_iwae_grad` (None: the same S draws).

    Returns:
      A :class:`GradientEstimator` ``grad_fn(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`; ``grads`` as in :func:`make_iwae_grad`, ``info`` a
      :class:`GradientInfo` whose ``bound`` is the per-example ELBO estimate and
      ``num_log_joint_evals`` = B * S (+ B*K for an encoder objective with its own K draws).
    """
    check_model(model)
    num_particles = _common.check_num_particles(num_particles, cis_based=False)
    _common.check_encoder_objective(encoder_objective)
    return _make_bound_grad(model, num_particles, encoder_objective, "elbo", encoder_particles)
