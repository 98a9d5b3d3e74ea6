r"""A work-queue loop for the unbiased estimator: cost follows the batch-MEAN number of iterations.

The plain loop of :mod:`vaeml_jax.estimators.unbiased` advances all B*C (example, chain) lanes
together until the slowest has met, so its cost is B*C*(S+1) evaluations times the batch-MAX
number of iterations, most of them on masked lanes. Here a fixed number P of *slots* is advanced
instead; a slot whose lane is done is immediately refilled with the next lane that has not
started. The total work is then about (sum over lanes of their iterations) + a tail of at most
P * (longest lane), i.e. it follows the batch-mean number of iterations when P << B*C.

The randomness of every lane is exactly that of the plain loop (same keys, same draws, same
coefficients), so both return the same estimate up to the order of floating-point sums: the test
suite checks this, which makes the plain loop the reference implementation of this one.

The cascade (default). Once the queue is empty the P slots drain one by one, and the last lanes
would run at the full P-slot cost. Instead the loop is a cascade of stages of P, P/2, ..., 1 slots,
each its own ``while_loop`` with static shapes: a stage stops when the queue is empty and its live
lanes fit in the next stage's width, and the live slots are compacted into that width. The tail of
the meeting times then runs at the width-1 cost. Lanes keep their keys and time indices, so the
estimate is unchanged.

Deferred backward passes in the narrow stages (default). An iteration of a few slots is not
proportionally cheaper on a CPU: its backward pass writes a params-sized gradient for a handful
of atoms (measured, library VAE at S = 5: 41 us per atom for a forward and backward pass at
width 1, 29 at width 4, 14 at width 100; the forward alone 11, 7 and 6). Stages of at most
:data:`DEFER_AT_MOST` slots therefore run forward passes only and append their live rows (lane,
S+1 atoms, coefficients) to a buffer of :func:`buffer_rows` rows; a full buffer, and whatever is
left at the end, is differentiated in one batched vjp. The atoms are evaluated twice (counted in
``num_log_joint_evals``); the gradient is the same sum, in another order.

The proposal's x-dependent part once per example. In the plain loop x is loop-invariant and XLA
hoists the encoder out of the loop; here each slot's example changes, so drawing the fresh
proposals would re-run the encoder on the gathered x every iteration. With the model's
``proposal_features`` / ``sample_from_features`` pair the encoder output is computed once per
example and gathered instead, and log q comes with the draws (the kept atoms carry theirs), so
the body evaluates log p only (log q too for ``inclusive_kl``, whose gradient needs it).
Measured 0.94x the queue's time at S = 5 and 10 (benchmarks/RESULTS.md).

Trade-off: fewer slots mean less work but more (sequential) loop iterations. On a CPU, where an
iteration costs in proportion to its lanes, small P wins; on an accelerator an iteration of
B*C lanes often costs little more than one of P lanes, and the plain loop is faster in wall time.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.couplings.cis import coupled_select, normalized_weights
from vaeml_jax.estimators import _common
from vaeml_jax.models.interface import proposal_sampler

# Stages this narrow run forward passes only and batch their backward passes (see above).
DEFER_AT_MOST = 4


class _Slots(NamedTuple):
    lane: jax.Array  # (P,) int: the (example, chain) lane a slot works on, -1 when empty
    atoms: jax.Array  # (P, S+1, *latent)
    log_joint: jax.Array  # (P, S+1)
    log_proposal: jax.Array  # (P, S+1)
    met: jax.Array  # (P,) bool
    t: jax.Array  # (P,) int: time index of the slot's X_t (0: X_0 only, not yet coupled)
    meeting_time: jax.Array  # (P,) int


class _Buffer(NamedTuple):
    """Rows whose backward pass waits: the atoms and coefficients of one slot-iteration each."""

    lane: jax.Array  # (R,) int
    atoms: jax.Array  # (R, S+1, *latent)
    coef: jax.Array  # (R, S+1): zero beyond the filled rows
    size: jax.Array  # () int: rows filled


class _Carry(NamedTuple):
    slots: _Slots
    buffer: _Buffer
    flushed_rows: jax.Array  # () int: rows differentiated from the buffer (S+1 evals each)
    next_lane: jax.Array  # () int: first lane not yet given to a slot
    slot_steps: jax.Array  # () int: sum over loop iterations of the stage width (S+1 evals each)
    meeting_time: jax.Array  # (L,) per-lane results
    num_iters: jax.Array  # (L,)
    capped: jax.Array  # (L,)
    grads: Any


def scheduled_estimate(
    model,
    params,
    x,
    keys,
    *,
    S,
    k,
    m,
    C,
    max_iters,
    num_slots,
    inclusive,
    reparam_objective,
    encoder_objective,
    coefficients_fn,
    atom_coefficients_fn,
    encoder_particles=None,
    cascade=True,
    deferred_backward=True,
):
    """H_{k:m} for a batch with a P-slot work queue. Same inputs/outputs as the plain loop.

    ``cascade=True`` shrinks the queue P, P/2, ..., 1 as it drains (:func:`stage_widths`);
    ``deferred_backward=True`` batches the backward passes of stages of at most
    :data:`DEFER_AT_MOST` slots.
    """
    B = x.shape[0]
    L = B * C
    P = min(num_slots, L)
    scale = -1.0 / (B * C)
    split = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 4)))(keys)
    key_x0, key_y0, key_sel, key_loop = (split[..., i].reshape(L) for i in range(4))

    # ---- Phase 1, whole batch: X_0 ~ q^S, its h coefficient (k = 0) and the encoder objective.
    def init_fn(p):
        zx = jax.lax.stop_gradient(_common.sample_lanes(model, p, x, key_x0.reshape(B, C), S))
        lj, lq = _common.eval_lanes(model, p, x, zx, inclusive)
        enc = jnp.zeros((), lj.dtype)
        if reparam_objective:  # X_0's draws, or K of its own (encoder_particles=K)
            enc_keys = key_x0.reshape(B, C)
            if encoder_particles is not None:
                enc_keys = _common.encoder_keys(enc_keys)
            num = S if encoder_particles is None else encoder_particles
            enc, _ = _common.encoder_loss(model, p, x, enc_keys, num, encoder_objective)
        return (lj, lq, enc), zx

    (lj0, lq0, _), init_vjp, zx = jax.vjp(init_fn, params, has_aux=True)
    dtype = lj0.dtype
    lw_x0 = _common.safe_log_weights(lj0, lq0)
    alpha0, _ = coefficients_fn(0, False, k, m)
    c0 = (scale * alpha0 * normalized_weights(lw_x0)).astype(dtype)
    (grads0,) = init_vjp((c0, c0 if inclusive else jnp.zeros_like(c0), jnp.ones((), dtype)))
    b = jax.vmap(jax.vmap(jax.random.categorical))(key_sel.reshape(B, C), lw_x0)
    b = jnp.where(jnp.all(jnp.isneginf(lw_x0), axis=-1), 0, b)

    def pick(a):  # (B, C, S, ...) at b -> (L, ...)
        g = jax.vmap(jax.vmap(lambda ai, ii: ai[ii]))(a, b)
        return g.reshape((L,) + g.shape[2:])

    kept_z0, kept_lq0 = pick(zx), pick(lq0)
    # Y_0 of every lane (and its log q), drawn once here rather than by every slot at every
    # iteration.
    y0_all, y0_lq = jax.lax.stop_gradient(
        _common.sample_lanes_with_log_q(model, params, x, key_y0.reshape(B, C), S)
    )
    y0_all, y0_lq = (a.reshape((L,) + a.shape[2:]) for a in (y0_all, y0_lq))
    bound = jnp.mean(_common.log_mean_exp(lw_x0), axis=-1)

    # The proposal's x-dependent part (for the library VAE the encoder's output), once per
    # example: the slots draw from it without re-running the encoder on their gathered x.
    features_fn, sample_fn = proposal_sampler(model)
    frozen = jax.lax.stop_gradient(params)
    features = jax.vmap(features_fn, in_axes=(None, 0))(frozen, x)

    # ---- Phase 2: P slots, refilled from the queue of lanes.
    def needs_step(t, met):
        return ((t + 1 <= m) | ~met) & (t - 1 < max_iters)

    def make_cond(next_width):
        """Stage condition: run while lanes are live, and (if a narrower stage follows) while the
        queue still holds lanes or the live lanes do not fit in ``next_width`` slots."""

        def cond(c: _Carry):
            live = c.slots.lane >= 0
            if next_width is None:
                return jnp.any(live)
            fits = (c.next_lane >= L) & (jnp.sum(live) <= next_width)
            return jnp.any(live) & ~fits

        return cond

    def eval_rows(p, lanes, atoms):
        """(R,) lanes, (R, S+1, *latent) atoms -> (log p,) or, for inclusive_kl (whose gradient
        needs it), (log p, log q), each (R, S+1). Otherwise log q is carried from the draws."""
        lj, lq = _common.eval_lanes(model, p, x[lanes // C], atoms[:, None], inclusive)
        return (lj[:, 0], lq[:, 0]) if inclusive else (lj[:, 0],)

    def rows_grad(lanes, atoms, coef):
        """sum over rows and atoms of coef * grad log p (and * grad log q for inclusive_kl)."""
        outs, vjp = jax.vjp(lambda p: eval_rows(p, lanes, atoms), params)
        (g,) = vjp((coef,) * len(outs))
        return g

    def flush_full(c: _Carry) -> _Carry:
        buf = c.buffer
        g = rows_grad(buf.lane, buf.atoms, buf.coef)
        empty = buf._replace(coef=jnp.zeros_like(buf.coef), size=jnp.zeros_like(buf.size))
        return c._replace(
            buffer=empty,
            flushed_rows=c.flushed_rows + buf.lane.shape[0],
            grads=jax.tree.map(jnp.add, c.grads, g),
        )

    def body(c: _Carry, deferred: bool):
        sl = c.slots
        on = sl.lane >= 0
        lane = jnp.maximum(sl.lane, 0)
        feats = jax.tree.map(lambda f: f[lane // C], features)

        def propose(lane_i, feats_i, atoms, lj, lq, met, t):
            step = jax.random.split(jax.random.fold_in(key_loop[lane_i], t), 2)
            i, j, _ = coupled_select(step[0], _common.safe_log_weights(lj, lq), met)
            fresh, fresh_lq = sample_fn(frozen, feats_i, step[1], S - 1)
            # t = 0 -> 1: the first coupled state's X_0 atom and Y_0, drawn in phase 1.
            is_first = t == 0
            kept_x = jnp.where(is_first, kept_z0[lane_i], atoms[i])
            kept_y = jnp.where(is_first, y0_all[lane_i, 0], atoms[j])
            fresh = jnp.where(is_first, y0_all[lane_i, 1:], fresh)
            new = jnp.concatenate([kept_x[None], kept_y[None], fresh], axis=0)
            lq_x = jnp.where(is_first, kept_lq0[lane_i], lq[i])
            lq_y = jnp.where(is_first, y0_lq[lane_i, 0], lq[j])
            fresh_lq = jnp.where(is_first, y0_lq[lane_i, 1:], fresh_lq)
            new_lq = jnp.concatenate([lq_x[None], lq_y[None], fresh_lq], axis=0)
            return new, new_lq, jnp.where(is_first, False, met | (i == j))

        atoms, lq, met = jax.vmap(propose)(
            lane, feats, sl.atoms, sl.log_joint, sl.log_proposal, sl.met, sl.t
        )

        if deferred:  # forward only; the backward pass waits in the buffer
            outs = eval_rows(frozen, lane, atoms)
        else:
            outs, vjp = jax.vjp(lambda p: eval_rows(p, lane, atoms), params)
        lj = outs[0]
        lq = outs[1] if inclusive else lq
        t = sl.t + 1
        coef = atom_coefficients_fn(lj[:, None], lq[:, None], met[:, None], t[:, None], k, m)
        coef = (scale * coef[:, 0] * on[:, None]).astype(lj.dtype)
        buf, grads = c.buffer, c.grads
        if deferred:  # the stage loop guarantees room for this iteration's rows
            pos = jnp.where(on, buf.size + _count(on, cumulative=True) - 1, buf.lane.shape[0])
            buf = _Buffer(
                lane=buf.lane.at[pos].set(lane, mode="drop"),
                atoms=buf.atoms.at[pos].set(atoms, mode="drop"),
                coef=buf.coef.at[pos].set(coef, mode="drop"),
                size=buf.size + _count(on),
            )
        else:
            (g,) = vjp((coef,) * len(outs))
            grads = jax.tree.map(jnp.add, grads, g)
        meeting = jnp.where(met, jnp.where(sl.met, sl.meeting_time, t), 0)

        done = on & ~needs_step(t, met)
        # Record finished lanes, then hand their slots the next lanes of the queue.
        out_idx = jnp.where(done, lane, L)  # L is out of bounds: dropped
        capped_now = ~met
        rec_meeting = jnp.where(capped_now, t + 1, meeting)
        meeting_time = c.meeting_time.at[out_idx].set(rec_meeting, mode="drop")
        num_iters = c.num_iters.at[out_idx].set(t - 1, mode="drop")
        capped = c.capped.at[out_idx].set(capped_now, mode="drop")
        rank = _count(done, cumulative=True) - 1
        new_lane = jnp.where(c.next_lane + rank < L, c.next_lane + rank, -1)
        lane_next = jnp.where(done, new_lane, sl.lane)
        restart = done

        def reset(new, fresh_value):
            mask = restart.reshape(restart.shape + (1,) * (new.ndim - 1))
            return jnp.where(mask, fresh_value, new)

        slots = _Slots(
            lane=lane_next,
            atoms=atoms,
            log_joint=lj,
            log_proposal=lq,
            met=reset(met, False),
            t=reset(t, 0),
            meeting_time=reset(meeting, 0),
        )
        return _Carry(
            slots=slots,
            buffer=buf,
            flushed_rows=c.flushed_rows,
            next_lane=jnp.minimum(c.next_lane + _count(done), L),
            slot_steps=c.slot_steps + sl.lane.shape[0],
            meeting_time=meeting_time,
            num_iters=num_iters,
            capped=capped,
            grads=grads,
        )

    latent = zx.shape[3:]
    init_slots = _Slots(
        lane=jnp.arange(P, dtype=jnp.int32),
        atoms=jnp.zeros((P, S + 1) + latent, zx.dtype),
        log_joint=jnp.zeros((P, S + 1), dtype),
        log_proposal=jnp.zeros((P, S + 1), dtype),
        met=jnp.zeros((P,), bool),
        t=jnp.zeros((P,), jnp.int32),
        meeting_time=jnp.zeros((P,), jnp.int32),
    )
    R = buffer_rows(S)
    carry = _Carry(
        slots=init_slots,
        buffer=_Buffer(
            lane=jnp.zeros((R,), jnp.int32),
            atoms=jnp.zeros((R, S + 1) + latent, zx.dtype),
            coef=jnp.zeros((R, S + 1), dtype),
            size=jnp.zeros((), jnp.int32),
        ),
        flushed_rows=jnp.zeros((), jnp.int32),
        next_lane=jnp.asarray(P, jnp.int32),
        slot_steps=jnp.zeros((), jnp.int32),
        meeting_time=jnp.zeros((L,), jnp.int32),
        num_iters=jnp.zeros((L,), jnp.int32),
        capped=jnp.zeros((L,), bool),
        grads=grads0,
    )
    widths = stage_widths(P) if cascade else (P,)
    for width, next_width in zip(widths, widths[1:] + (None,), strict=True):
        carry = carry._replace(slots=compact_slots(carry.slots, width))
        cond = make_cond(next_width)
        if deferred_backward and width <= DEFER_AT_MOST:
            carry = _run_deferred(cond, functools.partial(body, deferred=True), flush_full, carry)
        else:
            carry = jax.lax.while_loop(cond, functools.partial(body, deferred=False), carry)
    final = carry
    if deferred_backward and widths[-1] <= DEFER_AT_MOST:
        final = _flush_rest(final, rows_grad, R)
    evals = L * S + (S + 1) * (final.slot_steps + final.flushed_rows) + L * (encoder_particles or 0)
    info = _common.base_info(B, C, bound, evals, lw_x0)
    info.update(
        meeting_time=final.meeting_time.reshape(B, C),
        num_iters=final.num_iters.reshape(B, C),
        capped=final.capped.reshape(B, C),
    )
    return final.grads, info


def _count(mask: jax.Array, cumulative: bool = False) -> jax.Array:
    """How many entries of a bool mask are set (or the running count), as int32: the loop
    carries' dtype, also under ``jax.enable_x64`` (where sums of bools are int64)."""
    return jnp.cumsum(mask, dtype=jnp.int32) if cumulative else jnp.sum(mask, dtype=jnp.int32)


def _run_deferred(stage_cond, body, flush_full, carry: _Carry) -> _Carry:
    """A deferred stage: forward-only iterations while the buffer has room for a full-width
    iteration, then one batched backward pass of the full buffer, until the stage ends.

    The inner loop leaves ``grads`` alone, so the params-sized accumulator is neither read nor
    written (nor copied through a conditional) by the per-iteration work.
    """
    R = carry.buffer.lane.shape[0]
    width = carry.slots.lane.shape[0]

    def room(c: _Carry):
        return c.buffer.size + width <= R

    def chunk(c: _Carry) -> _Carry:
        c = jax.lax.while_loop(lambda c: stage_cond(c) & room(c), body, c)
        return jax.lax.cond(room(c), lambda c: c, flush_full, c)

    return jax.lax.while_loop(stage_cond, chunk, carry)


def _flush_rest(carry: _Carry, rows_grad, R: int) -> _Carry:
    """Differentiate the buffer's filled rows with the smallest of a few static sizes that holds
    them (R/4, R/2, R), so that a nearly empty buffer does not cost a full R-row pass."""
    buf = carry.buffer
    sizes = sorted({max(1, -(-R // 4)), max(1, -(-R // 2)), R})

    def of_size(n):
        def branch(grads):
            g = rows_grad(buf.lane[:n], buf.atoms[:n], buf.coef[:n])
            return jax.tree.map(jnp.add, grads, g), jnp.asarray(n, jnp.int32)

        return branch

    def nothing(grads):
        return grads, jnp.zeros((), jnp.int32)

    index = jnp.where(buf.size == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes), buf.size))
    grads, rows = jax.lax.switch(index, [nothing] + [of_size(n) for n in sizes], carry.grads)
    return carry._replace(grads=grads, flushed_rows=carry.flushed_rows + rows)


def buffer_rows(num_particles: int) -> int:
    """Rows of the deferred-backward buffer: about 256 atoms (S+1 per row), at least 8 rows."""
    return max(8, 256 // (num_particles + 1))


def stage_widths(num_slots: int) -> tuple[int, ...]:
    """Slot counts of the cascade: P, ceil(P/2), ..., 1 (e.g. 10 -> (10, 5, 3, 2, 1)).

    Halving keeps the stages few (log2 P + 1 compiled loop bodies) while a stage never runs
    with more than twice the live lanes it needs, once the queue is empty.
    """
    widths = [num_slots]
    while widths[-1] > 1:
        widths.append((widths[-1] + 1) // 2)
    return tuple(widths)


def compact_slots(slots: _Slots, width: int) -> _Slots:
    """The live slots (lane >= 0) moved to the front and the state cut to ``width`` slots.

    Every field is (P, ...) -> (width, ...). The caller guarantees that at most ``width`` slots
    are live (a stage only ends when they fit), so no lane is dropped; a stable sort keeps the
    live lanes' order. Padding slots are empty (lane -1).
    """
    P = slots.lane.shape[0]
    if width == P:
        return slots
    order = jnp.argsort(slots.lane < 0, stable=True)[:width]
    return jax.tree.map(lambda a: a[order], slots)
