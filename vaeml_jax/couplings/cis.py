r"""The CIS kernel of the VAE estimator (:mod:`vaeml_jax.cis`) in this package's kernel form.

The state is a :class:`vaeml_jax.cis.CISState` (S particles with their log joint and log
proposal) for ONE example x; ``params`` and x are closed over at build time, so the kernels are
``step(key, state) -> (state, info)`` like every other kernel here and plug into
:mod:`~vaeml_jax.couplings.debias`.

Coupled kernel (Ruiz et al. 2021): both chains use the SAME S-1 fresh proposals and their
resampling indices are drawn from the maximal coupling (:func:`vaeml_jax.coupling.maximal_coupling`)
of the two resampling distributions over the 2S particles of (X, Y), with Y's mass on a particle
that is bit-identical to X's particle in the same slot moved onto X's copy. After the first coupled
step the slots 1..S-1 are shared, so this is exactly the atom form of
:func:`vaeml_jax.coupling.chain_views` (kept_x, kept_y, shared fresh); before it (independent
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

from vaeml_jax import cis as _cis
from vaeml_jax import coupling as _coupling
from vaeml_jax.couplings import _checks
from vaeml_jax.couplings.base import CoupledInfo, CoupledState
from vaeml_jax.model import LatentVariableModel, check_model, log_weights

__all__ = ["build_rinit", "build_kernel", "build_coupled_kernel"]


def _check(model, num_particles):
    check_model(model)
    return _checks.check_int(
        "num_particles", num_particles, 2, " (with one particle the CIS kernel never moves)"
    )


def build_rinit(model: LatentVariableModel, params, x, num_particles: int) -> Callable:
    """``rinit(key) -> CISState``: X_0 ~ q(.|x)^S (:func:`vaeml_jax.cis.init`)."""
    S = _check(model, num_particles)
    return lambda key: _cis.init(model, params, x, key, S)


def build_kernel(model: LatentVariableModel, params, x, num_particles: int) -> Callable:
    """``step(key, CISState) -> (CISState, CISInfo)``: :func:`vaeml_jax.cis.build_kernel` for x."""
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
        i, j = _coupling.maximal_coupling(key_index, p_x, p_y)
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
