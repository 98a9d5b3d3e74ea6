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

The CIS kernels in the driver's form (``build_rinit``, ``build_kernel``, ``build_coupled_kernel``):
The state is a :class:`vaeml_jax.couplings.cis.CISState` (S particles with their log joint and log
proposal) for ONE example x; ``params`` and x are closed over at build time, so the kernels are
``step(key, state) -> (state, info)`` like every other kernel here and plug into
:mod:`~vaeml_jax.couplings.debias`.

Coupled kernel (Ruiz et al. 2021): both chains use the SAME S-1 fresh proposals and their
resampling indices are drawn from the maximal coupling
(:func:`vaeml_jax.couplings.cis.maximal_coupling`) of the two resampling distributions over the
2S particles of (X, Y), with Y's mass on a particle
that is bit-identical to X's particle in the same slot moved onto X's copy. After the first coupled
step the slots 1..S-1 are shared, so this is exactly the atom form of
:func:`vaeml_jax.couplings.cis.chain_views` (kept_x, kept_y, shared fresh); before it (independent
X_0, Y_0) no slot is shared and the coupling is over 2S distinct atoms. Guarantees:

* each chain alone is the single CIS kernel: X keeps particle b ~ Cat(wbar(X)), Y keeps
  b' ~ Cat(wbar(Y)) (the moved mass lands on an identical particle), both refresh S-1 slots from q;
* the kept particles coincide with probability sum_a min(p_x(a), p_y(a)), the largest possible,
  and then the two tuples are identical (same fresh proposals);
* equal states stay equal (faithful).

Costs S-1 ``log_joint`` evaluations per coupled step (the fresh proposals are shared).
In the degenerate case where every log weight is -inf the single kernel keeps slot 0 and the
coupled kernel resamples uniformly; the two then differ in law (a zero-probability event for
models with positive weights).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vaeml_jax.couplings import _checks, debias
from vaeml_jax.couplings import cis as _cis
from vaeml_jax.couplings.base import CoupledInfo, CoupledState
from vaeml_jax.models.interface import LatentVariableModel, check_model, log_weights

__all__ = [
    "build_rinit",
    "build_kernel",
    "build_coupled_kernel",
    "iwae_gradient",
    "build_vae_gradient",
]


def _check(model, num_particles):
    check_model(model)
    return _checks.check_int(
        "num_particles", num_particles, 2, " (with one particle the CIS kernel never moves)"
    )


def build_rinit(model: LatentVariableModel, params, x, num_particles: int) -> Callable:
    """``rinit(key) -> CISState``: X_0 ~ q(.|x)^S (:func:`vaeml_jax.couplings.cis.init`)."""
    S = _check(model, num_particles)
    return lambda key: _cis.init(key, model, params, x, S)


def build_kernel(model: LatentVariableModel, params, x, num_particles: int) -> Callable:
    """``step(key, CISState) -> (CISState, CISInfo)``: :func:`.cis.build_kernel` for x."""
    S = _check(model, num_particles)
    inner = _cis.build_kernel(model, S)
    return lambda key, state: inner(key, state, params, x)


def build_coupled_kernel(model: LatentVariableModel, params, x, num_particles: int) -> Callable:
    """``step(key, CoupledState) -> (CoupledState, CoupledInfo)``: the coupled CIS kernel for x."""
    S = _check(model, num_particles)

    def step(key, state: CoupledState):
        sx, sy = state.x, state.y
        key_index, key_fresh = jax.random.split(key)
        axes = tuple(range(1, sx.particles.ndim))
        same = (
            jnp.all(sx.particles == sy.particles, axis=axes)
            & (sx.log_joint == sy.log_joint)
            & (sx.log_proposal == sy.log_proposal)
        )  # (S,) slots holding bit-identical particles
        w_x = _cis.normalized_weights(sx.log_weights)
        w_y = _cis.normalized_weights(sy.log_weights)
        p_x = jnp.concatenate([w_x, jnp.zeros_like(w_y)])
        p_y = jnp.concatenate([jnp.where(same, w_y, 0.0), jnp.where(same, 0.0, w_y)])
        i, j = _cis.maximal_coupling(key_index, p_x, p_y)
        atoms = jnp.concatenate([sx.particles, sy.particles])
        lj = jnp.concatenate([sx.log_joint, sy.log_joint])
        lq = jnp.concatenate([sx.log_proposal, sy.log_proposal])
        fresh = jax.lax.stop_gradient(model.sample_proposal(params, x, key_fresh, S - 1))
        lj_f, lq_f, _ = log_weights(model, params, x, fresh)

        def tuple_of(a):
            return _cis.CISState(
                jnp.concatenate([atoms[a][None].astype(fresh.dtype), fresh]),
                jnp.concatenate([lj[a][None], lj_f]),
                jnp.concatenate([lq[a][None], lq_f]),
            )

        meet = i == j
        true = jnp.ones((), bool)
        return CoupledState(tuple_of(i), tuple_of(j)), CoupledInfo(true, true, meet)

    return step


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
    S = _check(model, num_particles)
    debias.check_window(k, m, lag, max_iters)

    def grad_fn(params, x, key):
        estimate = debias.build_estimator(
            build_kernel(model, params, x, S),
            build_coupled_kernel(model, params, x, S),
            build_rinit(model, params, x, S),
            iwae_gradient(model, params, x),
            k=k,
            m=m,
            lag=lag,
            max_iters=max_iters,
        )
        return estimate(key)

    return grad_fn
