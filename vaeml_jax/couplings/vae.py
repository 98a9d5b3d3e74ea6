r"""The VAE log-likelihood gradient of Ruiz et al. (2021) for ONE example, via the general driver.

With the CIS kernels of :mod:`~vaeml_jax.couplings.cis` and the test function

.. math:: h(Z) = \sum_{s=1}^S \bar w_s(Z)\, \nabla_\theta \log p_\theta(x, z_s),
          \qquad \bar w_s \propto \frac{p_\theta(x, z_s)}{q_\phi(z_s | x)},

(the IWAE theta-gradient: ``jax.grad`` of the self-normalised, stop-gradient-weighted log joint),
:func:`~vaeml_jax.couplings.debias.build_estimator` returns H_{k:m} with
:math:`E[H_{k:m}] = \nabla_\theta \log p_\theta(x)` exactly (up to ``max_iters`` capping), for
any lag L >= 1. This is the same estimator as :func:`vaeml_jax.make_unbiased_grad` with
``encoder_objective=None``, built from reusable pieces: it is a reference and a template, not the
fast path. Differences from the fused loop:

* sign and scope: it estimates the gradient of +log p(x) for one example, over the whole params
  pytree (zeros on parameters that ``log_joint`` does not read); the fused estimator returns the
  gradient of the LOSS -(1/B) sum_i log p(x_i);
* key streams differ (the fused loop reuses Y_0's particles as X_1's fresh proposals and folds
  keys differently), so the two agree in distribution, not draw by draw;
* cost: h is a full forward-backward pass over S particles for each chain at each step
  (2S log_joint evaluations + 2 backward passes, plus S-1 for the kernel), where the fused loop
  accumulates one vjp over the S+1 distinct atoms (see ``benchmarks/couplings_cost.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vaeml_jax import cis as _cis
from vaeml_jax.couplings import cis, debias
from vaeml_jax.model import LatentVariableModel

__all__ = ["iwae_gradient", "build_vae_gradient"]


def iwae_gradient(model: LatentVariableModel, params, x) -> Callable:
    """``h(CISState) -> params-shaped``: sum_s wbar_s grad_params log p(x, z_s), wbar held fixed."""

    def h(state: _cis.CISState):
        wbar = jax.lax.stop_gradient(_cis.normalized_weights(state.log_weights))

        def weighted(p):
            lj = jax.vmap(model.log_joint, in_axes=(None, None, 0))(p, x, state.particles)
            return jnp.sum(wbar * jnp.where(wbar > 0, lj, 0.0))

        return jax.grad(weighted)(params)

    return h


def build_vae_gradient(
    model: LatentVariableModel,
    num_particles: int = 10,
    k: int = 0,
    m: int = 0,
    lag: int = 1,
    max_iters: int = 1000,
) -> Callable:
    """Build ``grad_fn(params, x, key) -> Estimate`` for ONE example x (vmap over a batch).

    ``Estimate.estimate`` is an unbiased estimate of grad_params log p(x) (params-shaped);
    ``meeting_time``, ``num_coupled_steps`` and ``capped`` are as in
    :class:`~vaeml_jax.couplings.debias.Estimate`. Argument checks happen here, at build time.
    """
    S = cis._check(model, num_particles)
    debias.check_window(k, m, lag, max_iters)

    def grad_fn(params, x, key):
        estimate = debias.build_estimator(
            cis.build_kernel(model, params, x, S),
            cis.build_coupled_kernel(model, params, x, S),
            cis.build_rinit(model, params, x, S),
            iwae_gradient(model, params, x),
            k=k,
            m=m,
            lag=lag,
            max_iters=max_iters,
        )
        return estimate(key)

    return grad_fn
