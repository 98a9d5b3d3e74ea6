r"""The unbiased log-likelihood gradient: coupled CIS chains debiased by H_{k:m}.

Ruiz, Titsias, Cemgil & Doucet (UAI 2021), "Unbiased Gradient Estimation for Variational
Auto-Encoders using Coupled Markov Chains", with the time-averaged estimator of Jacob, O'Leary &
Atchade (JRSS-B 2020).

For each example, two CIS chains on the augmented space (see :mod:`vaeml_jax.couplings.cis`) are
run with a lag of one: X_0, Y_0 ~ q^S, X_1 ~ K(X_0) (its fresh proposals are Y_0's last S-1
particles, which is a valid coupling of the two initial laws and saves S-1 evaluations), then
(X_{t+1}, Y_t) ~ \bar K((X_t, Y_{t-1})) with the coupled kernel of :mod:`vaeml_jax.couplings.cis`.
With tau = inf{t >= 1 : X_t = Y_{t-1}},

.. math::
   H_{k:m} = \frac{1}{m-k+1}\sum_{t=k}^{m} h(X_t)
           + \sum_{t=k+1}^{\tau-1} \min\Big(1, \frac{t-k}{m-k+1}\Big) \big(h(X_t) - h(Y_{t-1})\big)

and :math:`E[H_{k:m}] = E_{\bar\pi}[h] = \nabla_\theta \log p_\theta(x)` exactly: no bound, no bias
(H_0 = h(X_0) + correction, the IWAE gradient plus its bias correction).

Cost. h is linear in \nabla_\theta \log p(x, z) with weights that are constants of the particles, so
every iteration contributes ``vjp(coefficients)`` of the S+1 atoms it evaluates
(2 kept + S-1 shared fresh): S+1 ``log_joint`` evaluations and one backward pass, accumulated in
the ``lax.while_loop`` carry. Nothing is re-run to get gradients. The plain loop (here) is written
over the whole batch: it runs until the slowest (example, chain) lane is done, finished lanes are
masked (their states frozen, their coefficients zero), so the wall time follows the batch-max
number of iterations. On CPU the default is the work queue of
``vaeml_jax.estimators._scheduled`` instead, whose cost follows the batch-mean number of
iterations; both give the same estimate (:class:`LoopOptions`).

The one source of bias is ``max_iters``: a lane that has not met after ``max_iters`` coupled
iterations is stopped, its correction truncated, and reported in ``info["capped"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.couplings.cis import chain_views, coupled_select, normalized_weights
from vaeml_jax.estimators import _common, _rejuvenation, _scheduled
from vaeml_jax.estimators._common import (
    EncoderObjective,
    GradientEstimator,
    LossGradient,
)
from vaeml_jax.estimators._rejuvenation import Rejuvenation
from vaeml_jax.models.interface import LatentVariableModel, check_model

__all__ = [
    "make_unbiased_grad",
    "LoopOptions",
    "auto_num_slots",
    "jacob_coefficients",
    "Rejuvenation",
]


def jacob_coefficients(t: Any, met: Any, k: int, m: int) -> tuple[jax.Array, jax.Array]:
    r"""Weights of h(X_t) and of h(Y_{t-1}) in H_{k:m} at time t (arrays broadcast).

    alpha_t = 1[k <= t <= m] / (m-k+1) + 1[k+1 <= t < tau] min(1, (t-k)/(m-k+1))
    beta_t  = 1[k+1 <= t < tau] min(1, (t-k)/(m-k+1)),  where t < tau  <=>  not met at t.
    """
    n = m - k + 1
    t = jnp.asarray(t)
    mcmc = jnp.where((t >= k) & (t <= m), 1.0 / n, 0.0)
    ramp = jnp.minimum(1.0, (t - k) / n)
    correction = jnp.where((t >= k + 1) & ~met, ramp, 0.0)
    return mcmc + correction, correction


class _LoopState(NamedTuple):
    atoms: jax.Array  # (B, C, S+1, *latent)
    log_joint: jax.Array  # (B, C, S+1)
    log_proposal: jax.Array  # (B, C, S+1)
    met: jax.Array  # (B, C) bool: X_t == Y_{t-1}
    t: jax.Array  # (B, C) int: the time index of X_t
    meeting_time: jax.Array  # (B, C) int
    iteration: jax.Array  # () int: loop iterations run (batch-wide)
    grads: Any  # params-shaped accumulator


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    r"""How the unbiased estimator schedules its coupled iterations. For benchmarking: every
    setting gives the same estimate for the same key (up to the order of floating-point sums,
    tested), only the time and ``num_log_joint_evals`` differ. The defaults are the fastest
    measured configuration on the backend in use.

    Attributes:
      num_slots: ``"auto"`` (default): the work queue with B*C/4 slots on CPU, the plain loop on
        accelerators (:func:`auto_num_slots`), resolved from the batch when the estimator is
        traced; the plain loop too with ``rejuvenation`` or ``unroll > 1``, which need it.
        ``None``: the plain loop, all B*C lanes advanced together until the slowest has met (the
        fewest sequential iterations, wall time following the batch-MAX number of iterations).
        An int P: a work queue of P slots refilled as lanes finish
        (``vaeml_jax.estimators._scheduled``), whose work follows the batch-MEAN number of
        iterations.
      slot_cascade: with the work queue, shrink it to P/2, P/4, ..., 1 slots (live lanes
        compacted) once it is empty and the live lanes fit, so that the tail of the meeting
        times runs at the width-1 cost (default True; False keeps P slots to the end).
      deferred_backward: with the work queue, stages of at most 4 slots run forward passes only
        and take their backward passes in batches (default True): on a CPU a backward pass over a
        few atoms costs 2-3x per atom what a batched one does. Their atoms are evaluated twice
        (counted in ``num_log_joint_evals``).
      unroll: U >= 1 coupled iterations per ``while_loop`` step of the plain loop (default 1).
        On an accelerator an iteration at training batch sizes is launch-latency bound, and each
        loop step also pays its condition's device-to-host round trip; U > 1 pays that once per U
        iterations, at the price of up to U - 1 extra iterations at the end, fully masked
        (counted in ``num_log_joint_evals``). Plain loop only.

    What ``"auto"`` picks, and the measurements behind it, are in benchmarks/RESULTS.md.
    """

    num_slots: int | Literal["auto"] | None = "auto"
    slot_cascade: bool = True
    deferred_backward: bool = True
    unroll: int = 1


def auto_num_slots(num_lanes: int, backend: str | None = None) -> int | None:
    """What ``LoopOptions(num_slots="auto")`` resolves to for ``num_lanes`` = B*C lanes.

    On CPU a work queue of ``max(1, num_lanes // 4)`` slots: an iteration there costs in
    proportion to its lanes, and the queue's cost follows the batch-mean number of coupled
    iterations instead of the max (measured 8-11x faster at batch 100, the same estimate). On
    accelerators (``"gpu"``, ``"tpu"``, ...) None, the plain loop: an iteration over all lanes
    costs about what one over a few does, and the plain loop runs the fewest sequential
    iterations. ``backend`` defaults to ``jax.default_backend()``.
    """
    num_lanes = _common.check_int("num_lanes", num_lanes, 1)
    if (backend or jax.default_backend()) != "cpu":
        return None
    return max(1, num_lanes // 4)


def _check_loop(loop: LoopOptions | None, rejuvenation: Rejuvenation | None) -> LoopOptions:
    if loop is None:
        loop = LoopOptions()
    if not isinstance(loop, LoopOptions):
        raise TypeError(
            "loop must be None or vaeml_jax.estimators.LoopOptions(num_slots=..., ...), "
            f"got {type(loop).__name__}."
        )
    num_slots = loop.num_slots
    if isinstance(num_slots, str):
        if num_slots != "auto":
            raise ValueError(f"num_slots must be 'auto', None or an int >= 1, got {num_slots!r}.")
    elif num_slots is not None:
        num_slots = _common.check_int("num_slots", num_slots, 1)
    if not isinstance(loop.slot_cascade, bool):
        raise TypeError(f"slot_cascade must be a bool, got {loop.slot_cascade!r}.")
    if not isinstance(loop.deferred_backward, bool):
        raise TypeError(f"deferred_backward must be a bool, got {loop.deferred_backward!r}.")
    unroll = _common.check_int("unroll", loop.unroll, 1)
    if unroll > 1 and isinstance(num_slots, int):
        raise ValueError(
            f"unroll={unroll} applies to the plain loop (num_slots=None); the work queue's stages "
            "have their own sizes: leave unroll=1 with num_slots."
        )
    if rejuvenation is not None and isinstance(num_slots, int):
        raise ValueError(
            "rejuvenation runs in the plain loop only: pass loop=LoopOptions(num_slots=None) (the "
            "work queue does not move kept particles)."
        )
    if num_slots == "auto" and (rejuvenation is not None or unroll > 1):
        num_slots = None  # both need the plain loop
    return dataclasses.replace(loop, num_slots=num_slots, unroll=unroll)


def make_unbiased_grad(
    model: LatentVariableModel,
    *,
    num_particles: int = 10,
    k: int = 0,
    m: int = 0,
    num_chains: int = 1,
    max_iters: int = 1000,
    encoder_objective: EncoderObjective | None = "iwae",
    encoder_particles: int | None = None,
    rejuvenation: Rejuvenation | None = None,
    loop: LoopOptions | None = None,
) -> GradientEstimator:
    r"""Build the unbiased estimator of the gradient of the loss -(1/B) \sum_i \log p(x_i).

    ``grads, info = make_unbiased_grad(model)(params, x, key)``: on theta ``grads`` is an
    unbiased estimate of :math:`-\nabla_\theta (1/B) \sum_i \log p_\theta(x_i)`, the gradient of
    the LOSS (descent-ready for optax; negate it for :math:`\nabla \log p`).

    Variance. Unbiased is not low-variance: meeting times have a power-law tail (P(tau > t) ~
    t^-alpha, alpha ~1.3-1.8 measured on MNIST), so the decoder gradient's variance was 600-2,000x
    IWAE-S's at the same S after 300 steps; larger S shortens the tail, small (k, m) windows do not.

    Args:
      model: a :class:`LatentVariableModel` (the only positional argument).
      num_particles: S >= 2, particles of the CIS kernel (the IWAE's number of samples).
      k, m: 0 <= k <= m, the window of H_{k:m}. ``k = m = 0`` (the default) is the cheapest:
        the IWAE gradient plus its bias correction. Larger k makes the correction vanish more
        often (lower variance) at the cost of >= m iterations.
      num_chains: C >= 1 independent coupled pairs per example, averaged (variance / C; the pairs
        share one batched loop).
      max_iters: cap on coupled iterations per lane (>= max(m, 1)); lanes that hit it are
        reported in ``info["capped"]`` and are the only source of bias.
      encoder_objective: what the proposal's parameters phi follow, with theta held fixed:
        ``"iwae"`` (the IWAE-S bound of X_0 by reparameterisation), ``"elbo"`` (ELBO of X_0's S
        draws), ``"inclusive_kl"`` (an unbiased estimate of :math:`\nabla_\phi KL(p(z|x) \|
        q_\phi) = -E_{p(z|x)}[\nabla_\phi \log q_\phi(z|x)]`, H_{k:m} applied to the same chains:
        the reweighted-wake-sleep update made unbiased) or None (zeros). The default is ``"iwae"``
        from a measured comparison (paper-sized model, 3,000 MNIST images, S=10, same seed, first
        epoch): ``"iwae"`` gave mean/max meeting time 5.6/524, no capped lane and a train bound
        of -208 nats; ``"inclusive_kl"`` 8.5/1002 with 0.1% of lanes capped at 1000 and -227
        nats. It also reuses X_0's draws, so it costs no extra ``log_joint`` evaluation. Over 3
        epochs (10,000 images, S=5; ``benchmarks/RESULTS.md``, variance.py) ``"inclusive_kl"``
        doubled the mean meeting time and the model degraded every epoch. Also
        ``"iwae_dreg"`` (the IWAE bound's doubly-reparameterised gradient: same expectation as
        ``"iwae"``, lower variance for large S) and ``"chi2"`` (minimises log E_q[w^2], the
        importance weights' variance, which drives CIS meeting; high-variance gradient); see
        :func:`vaeml_jax.estimators._common.encoder_loss`.
      encoder_particles: K >= 1 particles of a reparameterised encoder objective. None (default)
        uses X_0's S draws (same keys: no extra draws). Another K (e.g. K = 64 for
        ``"iwae_dreg"`` while the chains use S = 10) draws K particles of its own from
        independent keys: B*C*K extra ``log_joint`` evaluations, counted in
        ``num_log_joint_evals``.
      rejuvenation: None (plain CIS) or a :class:`Rejuvenation`: between the resampling and the
        refresh, both chains' kept particles are moved by MALA with common random numbers and a
        reflection-maximal coupled random-walk step (posterior-invariant, so still unbiased), so
        that kept particles of high weight can meet without waiting for a shared fresh proposal.
        Costs ``2 (1 + num_steps + 1)`` more log_joint evaluations (with gradients in z) per
        iteration and lane (counted in ``num_log_joint_evals``). Runs in the plain loop
        (``"auto"`` picks it). Measured on MNIST (benchmarks/RESULTS.md, variance_options.py):
        with MALA steps it makes meeting much SLOWER there (posterior-typical kept particles
        outweigh the fresh proposals); it helps on low-dimensional targets.
      loop: None (default: ``LoopOptions()``, the fastest measured schedule on the backend in
        use: a work queue on CPU, the plain loop on accelerators) or a :class:`LoopOptions`.
        Every setting gives the same estimate; only the time differs.

    Returns:
      A :class:`GradientEstimator`: ``unbiased_grad(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`, for a batch x of shape (B, ...):

      * ``grads`` (structure of ``params``): on theta an unbiased estimate of the gradient of the
        LOSS :math:`-(1/B) \sum_i \log p_\theta(x_i)` (descent-ready for optax); on phi the
        gradient of the encoder objective's loss; a parameter read by both functions gets the sum.
      * ``info``: a :class:`GradientInfo`: ``meeting_time`` (B, C) int, tau per example and
        chain (for capped lanes a lower bound, the last t + 1); ``num_iters`` (B, C) coupled
        iterations, each advancing both chains once; ``capped`` (B, C) bool;
        ``num_log_joint_evals`` () int, evaluations executed for the batch, masked lanes
        included (plain loop: B C (2S + (S+1) * loop iterations), + B C K for an encoder
        objective with its own K draws; work queue: B C S + (S+1) * (slot iterations + rows
        re-evaluated for deferred backward passes)); ``bound`` (B,) the IWAE-S bound
        log (1/S) sum_s w_s of X_0 (averaged over chains) for monitoring; ``ess``,
        ``log1p_chi2``, ``log_weight_std`` (B,) the importance diagnostics of X_0's weights.

    The function is pure: it works under ``jax.jit``, ``jax.vmap`` and inside ``jax.grad`` of
    surrounding code, in float32 and float64, for any latent shape.
    """
    check_model(model)
    S = _common.check_num_particles(num_particles, cis_based=True)
    k = _common.check_int("k", k, 0)
    m = _common.check_int("m", m, 0)
    if k > m:
        raise ValueError(f"k must be <= m for H_{{k:m}}, got k={k} > m={m}.")
    C = _common.check_int("num_chains", num_chains, 1)
    max_iters = _common.check_int(
        "max_iters",
        max_iters,
        max(m, 1),
        " (it must at least reach m, else the MCMC average is truncated)",
    )
    _common.check_encoder_objective(encoder_objective)
    K, own_draws = _common.check_encoder_particles(encoder_particles, encoder_objective, S)
    inclusive = encoder_objective == "inclusive_kl"
    reparam_objective = encoder_objective in _common.REPARAM_OBJECTIVES

    rejuvenation = _rejuvenation.check_rejuvenation(rejuvenation)
    loop = _check_loop(loop, rejuvenation)
    unroll = loop.unroll
    rej_init, rej_coupled = _rejuvenation.extra_evals(rejuvenation)

    def resolved_num_slots(batch_size: int) -> int | None:
        if loop.num_slots == "auto":
            return auto_num_slots(batch_size * C)
        return loop.num_slots

    def unbiased_grad(params: Any, x: jax.Array, keys: jax.Array) -> LossGradient:
        num_slots = resolved_num_slots(x.shape[0])
        if num_slots is not None:
            grads, info = _scheduled.scheduled_estimate(
                model,
                params,
                x,
                keys,
                S=S,
                k=k,
                m=m,
                C=C,
                max_iters=max_iters,
                num_slots=num_slots,
                inclusive=inclusive,
                reparam_objective=reparam_objective,
                encoder_objective=encoder_objective,
                coefficients_fn=jacob_coefficients,
                atom_coefficients_fn=_atom_coefficients,
                encoder_particles=K if own_draws else None,
                cascade=loop.slot_cascade,
                deferred_backward=loop.deferred_backward,
            )
            return LossGradient(grads, info)
        B = x.shape[0]
        scale = -1.0 / (B * C)  # loss = -(1/B) sum_i mean_c H_{k:m}
        split = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 4)))(keys)
        key_x0, key_y0, key_sel, key_loop = (split[..., i] for i in range(4))
        if rejuvenation is not None:
            rsplit = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 2)))(key_sel)
            key_sel, key_scale = rsplit[..., 0], rsplit[..., 1]
            mover = _lane_mover(model, params, x, key_scale, rejuvenation)

        # ---- t = 0 and t = 1: X_0, Y_0 ~ q^S; X_1 = (X_0[b], Y_0[1:]); one vjp over 2S particles.
        def init_fn(p):
            zx = jax.lax.stop_gradient(_common.sample_lanes(model, p, x, key_x0, S))
            zy = jax.lax.stop_gradient(_common.sample_lanes(model, p, x, key_y0, S))
            z = jnp.concatenate([zx, zy], axis=2)
            lj, lq = _common.eval_lanes(model, p, x, z, inclusive)
            enc = jnp.zeros((), lj.dtype)
            if reparam_objective:  # the same draws X_0 (same keys), now differentiable in phi,
                # or K draws of its own
                enc_keys = _common.encoder_keys(key_x0) if own_draws else key_x0
                enc, _ = _common.encoder_loss(model, p, x, enc_keys, K, encoder_objective)
            return (lj, lq, enc), z

        (lj0, lq0, _), init_vjp, z0 = jax.vjp(init_fn, params, has_aux=True)
        dtype = lj0.dtype
        lw0 = _common.safe_log_weights(lj0, lq0)
        lw_x0 = lw0[..., :S]
        wx0 = normalized_weights(lw_x0)
        b = jax.vmap(jax.vmap(jax.random.categorical))(key_sel, lw_x0)  # (B, C)
        b = jnp.where(jnp.all(jnp.isneginf(lw_x0), axis=-1), 0, b)

        def gather(a, idx):  # a (B, C, P, ...), idx (B, C) -> (B, C, ...)
            return jax.vmap(jax.vmap(lambda ai, ii: ai[ii]))(a, idx)

        kept_x1 = gather(z0[:, :, :S], b)
        if rejuvenation is not None:  # X_1 = K(X_0) moves X_0's kept particle too
            # t = 0 is never a loop step's key index (the loop starts at t = 1).
            key_move1 = jax.vmap(jax.vmap(jax.random.fold_in))(
                key_loop, jnp.zeros((B, C), jnp.int32)
            )
            kept_x1 = mover.single(key_move1, kept_x1)
            (lj_k, lq_k), kept_vjp = jax.vjp(
                lambda p: _common.eval_lanes(model, p, x, kept_x1[:, :, None], inclusive), params
            )
        atoms1 = jnp.concatenate([kept_x1[:, :, None], z0[:, :, S:]], axis=2)
        if rejuvenation is None:
            lj_k = gather(lj0[..., :S], b)[..., None]
            lq_k = gather(lq0[..., :S], b)[..., None]
        lj1 = jnp.concatenate([lj_k, lj0[..., S:]], axis=-1)
        lq1 = jnp.concatenate([lq_k, lq0[..., S:]], axis=-1)
        met1 = jnp.zeros((B, C), bool)  # X_1's kept particle is X_0's, never one of Y_0's
        t1 = jnp.ones((B, C), jnp.int32)
        c_atoms1 = _atom_coefficients(lj1, lq1, met1, t1, k, m)  # (B, C, S+1)
        alpha0, _ = jacob_coefficients(0, False, k, m)
        # Map the t = 1 atom coefficients back onto the 2S initial particles (X_1's kept atom is
        # X_0[b] itself, unless it was moved: then it gets its own vjp).
        c_x0 = alpha0 * wx0
        if rejuvenation is None:
            c_x0 = c_x0 + jax.nn.one_hot(b, S, dtype=dtype) * c_atoms1[..., :1]
        c_y0 = jnp.concatenate([c_atoms1[..., 1:2], c_atoms1[..., 2:]], axis=-1)
        c0 = (scale * jnp.concatenate([c_x0, c_y0], axis=-1)).astype(dtype)
        (grads0,) = init_vjp((c0, c0 if inclusive else jnp.zeros_like(c0), jnp.ones((), dtype)))
        if rejuvenation is not None:
            ck = (scale * c_atoms1[..., :1]).astype(dtype)
            (gk,) = kept_vjp((ck, ck if inclusive else jnp.zeros_like(ck)))
            grads0 = jax.tree.map(jnp.add, grads0, gk)

        def active(state: _LoopState):
            need = (state.t + 1 <= m) | ~state.met
            return need & (state.t - 1 < max_iters)

        def cond(state):
            return jnp.any(active(state))

        def body(state: _LoopState):
            on = active(state)
            step_keys = jax.vmap(jax.vmap(jax.random.fold_in))(key_loop, state.t)
            pair = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 2)))(step_keys)
            lw = _common.safe_log_weights(state.log_joint, state.log_proposal)
            i, j, _ = jax.vmap(jax.vmap(coupled_select))(pair[..., 0], lw, state.met)
            fresh = jax.lax.stop_gradient(
                _common.sample_lanes(model, params, x, pair[..., 1], S - 1)
            )
            kept_x, kept_y = gather(state.atoms, i), gather(state.atoms, j)
            if rejuvenation is not None:
                key_move = jax.vmap(jax.vmap(lambda kk: jax.random.fold_in(kk, 1)))(pair[..., 0])
                kept_x, kept_y = mover.coupled(key_move, kept_x, kept_y)
                i = jnp.where(_same_particle(kept_x, kept_y), j, i)  # met by the move
            atoms = jnp.concatenate([kept_x[:, :, None], kept_y[:, :, None], fresh], axis=2)

            def eval_fn(p):
                return _common.eval_lanes(model, p, x, atoms, inclusive)

            (lj, lq), vjp = jax.vjp(eval_fn, params)
            met = state.met | (i == j)
            t = state.t + 1
            c = scale * _atom_coefficients(lj, lq, met, t, k, m) * on[..., None]
            c = c.astype(lj.dtype)
            (g,) = vjp((c, c if inclusive else jnp.zeros_like(c)))

            def keep(new, old):
                mask = on.reshape(on.shape + (1,) * (new.ndim - 2))
                return jnp.where(mask, new, old)

            return _LoopState(
                atoms=keep(atoms, state.atoms),
                log_joint=keep(lj, state.log_joint),
                log_proposal=keep(lq, state.log_proposal),
                met=keep(met, state.met),
                t=keep(t, state.t),
                meeting_time=jnp.where(on & met & ~state.met, t, state.meeting_time),
                iteration=state.iteration + 1,
                grads=jax.tree.map(jnp.add, state.grads, g),
            )

        init_state = _LoopState(
            atoms1,
            lj1,
            lq1,
            met1,
            t1,
            jnp.zeros((B, C), jnp.int32),
            jnp.zeros((), jnp.int32),
            grads0,
        )

        def unrolled_body(state: _LoopState):
            # Iterations past a lane's end are masked in `body`, so a chunk may overshoot.
            for _ in range(unroll):
                state = body(state)
            return state

        final = jax.lax.while_loop(cond, unrolled_body, init_state)

        capped = ~final.met
        meeting_time = jnp.where(capped, final.t + 1, final.meeting_time)
        bound = jnp.mean(_common.log_mean_exp(lw_x0), axis=-1)
        evals = (
            B
            * C
            * (2 * S + rej_init + (S + 1 + rej_coupled) * final.iteration + (K if own_draws else 0))
        )
        info = _common.base_info(B, C, bound, evals, lw_x0)
        info["meeting_time"] = meeting_time
        info["num_iters"] = final.t - 1
        info["capped"] = capped
        return LossGradient(final.grads, info)

    return _common.GradientEstimator("unbiased", C, unbiased_grad, model)


def _atom_coefficients(lj, lq, met, t, k, m):
    """alpha_t wbar^X - beta_t wbar^Y on the S+1 atoms (B, C, S+1); beta = 0 once met."""
    lw = _common.safe_log_weights(lj, lq)
    lw_x, lw_y = jax.vmap(jax.vmap(chain_views))(lw, met)
    alpha, beta = jacob_coefficients(t, met, k, m)
    return alpha[..., None] * normalized_weights(lw_x) - beta[..., None] * normalized_weights(lw_y)


def _same_particle(a, b):
    """(B, C): the two lanes' particles (B, C, *latent) are the same point."""
    return jnp.all((a == b).reshape(a.shape[:2] + (-1,)), axis=-1)


class _LaneMover(NamedTuple):
    single: Any  # (keys (B, C), z (B, C, *latent)) -> z'
    coupled: Any  # (keys, zx, zy) -> (zx', zy')


def _lane_mover(model, params, x, key_scale, cfg: Rejuvenation) -> _LaneMover:
    """The rejuvenation moves of every lane, targeting p(z | x_i) with theta held fixed.

    The preconditioner is the per-coordinate std of ``cfg.scale_draws`` proposal draws made with
    their own keys (independent of the chains, so the kernel is fixed before they start).
    """
    frozen = jax.lax.stop_gradient(params)
    draws = jax.lax.stop_gradient(
        _common.sample_lanes(model, frozen, x, key_scale, cfg.scale_draws)
    )
    latent_shape = draws.shape[3:]
    flat = draws.reshape(draws.shape[:3] + (-1,))
    scales = jnp.maximum(jnp.std(flat, axis=2), 1e-6 * (1.0 + jnp.abs(jnp.mean(flat, axis=2))))

    def logdensity_of(xi):
        return lambda zf: model.log_joint(frozen, xi, zf.reshape(latent_shape))

    def single_lane(xi, key, scale, z):
        out = _rejuvenation.single_move(key, z.reshape(-1), logdensity_of(xi), scale, cfg)
        return out.reshape(latent_shape)

    def coupled_lane(xi, key, scale, zx, zy):
        ox, oy = _rejuvenation.coupled_move(
            key, zx.reshape(-1), zy.reshape(-1), logdensity_of(xi), scale, cfg
        )
        return ox.reshape(latent_shape), oy.reshape(latent_shape)

    # vmap over chains (x shared), then over examples.
    single = jax.vmap(jax.vmap(single_lane, in_axes=(None, 0, 0, 0)))
    coupled = jax.vmap(jax.vmap(coupled_lane, in_axes=(None, 0, 0, 0, 0)))
    return _LaneMover(
        single=lambda keys, z: jax.lax.stop_gradient(single(x, keys, scales, z)),
        coupled=lambda keys, zx, zy: jax.lax.stop_gradient(coupled(x, keys, scales, zx, zy)),
    )
