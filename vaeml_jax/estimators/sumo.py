r"""SUMO: an unbiased estimate of log p(x) by Russian roulette over the IWAE bounds.

Luo, Beatson, Norouzi, Zhu, Duvenaud, Adams & Chen, "SUMO: Unbiased Estimation of Log Marginal
Probability for Latent Variable Models", ICLR 2020.

For one example x, draw z_1, z_2, ... ~ q_phi(z | x) i.i.d. (ONE sequence) and let
IWAE_k = log (1/k) \sum_{i<=k} p(x, z_i) / q(z_i | x), the k-sample bound on the first k draws,
Delta_k = IWAE_{k+1} - IWAE_k. With m = ``min_terms`` and an independent number of Delta terms
J >= 1,

.. math::
   \mathrm{SUMO}(x) = \mathrm{IWAE}_m + \sum_{j=1}^{J} \frac{\Delta_{m+j-1}}{P(J \ge j)},

which uses the first m + J draws. Term j is present with probability P(J >= j) and reweighted by
its inverse, so E[SUMO] = E IWAE_m + \sum_j E Delta_{m+j-1} = lim_k E IWAE_k = log p(x) for ANY
law of J with P(J >= j) > 0 for all j. (The paper writes K = m + J - 1, k = m .. K.)

The law of J. The paper's analysis uses P(J >= j) = 1/j (E[J] = infinity); its reference code
(``reverse_cdf(k, alpha=80, b=0.1)``, as reproduced in J. Tan's 2020 JAX write-up) flattens the
tail into a geometric one beyond alpha = ``tail_start``:

.. math:: P(J \ge j) = 1/j \;\; (j < \alpha), \qquad \alpha^{-1} (1 - b)^{j - \alpha}
          \;\; (j \ge \alpha),

with alpha = 80 and b = ``tail_decay`` = 0.1 by default (b = 0 keeps the pure 1/j tail); then
E[J] ~ 5.08 (:func:`sumo_expected_num_terms`).

The cap, and the bias it leaves. J is capped at J_max = ``max_terms`` (lanes with J > J_max are
reported in ``info["capped"]``). A capped estimator never looks past m + J_max draws, so its mean
is exactly E IWAE_{m+J_max}, not log p(x): the bias is that of an IWAE bound with m + J_max
samples (~ Var(w/p(x)) / (2 (m + J_max))), however rarely a lane is actually capped. The work
of a call hardly grows with J_max (only the (B, m + J_max) buffer does); the largest importance
weight 1/P(J >= J_max) does, and is checked to stay finite.

Variance. Delta_k fluctuates like (w_{k+1}/p(x) - 1)/k, so every included term adds O(1) noise
after reweighting: with the 1/j tail Var[SUMO] grows like Var(w/p) log J_max, and faster in the
geometric part of the tail (weights alpha (1-b)^{-(j-alpha)}); hence the paper trains the encoder
to minimise Var[SUMO] (``encoder_objective="sumo_variance"``).

Computation: cost that follows each example's own J. J is drawn first for every example; example
i's draws come in blocks of ``block_size`` (block b from ``fold_in(key_i, b)``), and it needs
n_i = ceil((m + J_i) / block_size) of them. The blocks of all examples are laid end to end in one
work list, run ``blocks_per_step`` blocks per step (default B) by a ``lax.while_loop``. Pass 1
fills a (B, ceil((m + J_max) / block_size), block_size) buffer of log weights. SUMO and every
objective are cheap functions of that buffer, so their derivatives with respect to each log
weight are exact coefficients c_ij (``jax.grad`` of the buffer function). Pass 2 re-draws the
same blocks and accumulates ``vjp(c)`` of the log weights (one forward and one backward pass per
step; a second backward pass, for phi, when an encoder objective is set). With the defaults an
example USES E[m + J] ~ 6.08 draws, 2 (m + J_i) evaluations over both passes
(``own_log_joint_evals``); it executes 2 block_size n_i, and the batch that plus the last step's
padding (``num_log_joint_evals``, ~32 per example at B >= 20 with the defaults): a batch where one
example draws J = 100 pays 13 blocks for that example only, not for all. (Running every example
to the batch's largest m + J instead costs ~171 evaluations per example at B = 100 and ~214 at
B = 512, since the max of B heavy-tailed J's is large; the work list gives the same draws, hence
the same estimate, for a fraction of that: ``benchmarks/RESULTS.md``.)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp

from vaeml_jax.estimators import _common
from vaeml_jax.estimators._common import GradientEstimator, GradientInfo, LossGradient
from vaeml_jax.models.interface import LatentVariableModel, check_batch, check_model

__all__ = ["sumo_log_likelihood", "make_sumo_grad", "sumo_expected_num_terms", "SumoInfo"]

SumoEncoderObjective = Literal["sumo_variance", "elbo", "iwae"]
ENCODER_OBJECTIVES: tuple[str, ...] = get_args(SumoEncoderObjective)
_MAX_WEIGHT = 1e30  # the largest 1/P(J >= j) allowed (finite in float32, with room)


class SumoInfo(GradientInfo):
    """The :class:`GradientInfo` of :func:`make_sumo_grad`, with one more field.

    Attributes:
      own_log_joint_evals: (B,) int32, the ``log_joint`` evaluations example i's estimate needs
        on its own, 2 (m + J_i) (both passes). ``num_log_joint_evals`` - sum(own_log_joint_evals)
        is the schedule's overhead: each example's last block rounded up to ``block_size`` draws,
        and the padding of the last loop step.
    """

    own_log_joint_evals: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    min_terms: int
    max_terms: int
    tail_start: int
    tail_decay: float
    block_size: int
    blocks_per_step: int | None

    @property
    def max_blocks(self) -> int:
        return -(-(self.min_terms + self.max_terms) // self.block_size)


def _check_config(
    min_terms, max_terms, tail_start, tail_decay, block_size, blocks_per_step=None
) -> _Config:
    m = _common.check_int("min_terms", min_terms, 1, " (IWAE_m needs at least one draw)")
    j_max = _common.check_int("max_terms", max_terms, 1)
    alpha = _common.check_int("tail_start", tail_start, 1)
    if isinstance(tail_decay, bool) or not isinstance(tail_decay, numbers.Real):
        raise TypeError(f"tail_decay must be a float in [0, 1), got {tail_decay!r}.")
    b = float(tail_decay)
    if not 0.0 <= b < 1.0:
        raise ValueError(
            "tail_decay must be in [0, 1) (0 keeps the 1/j tail; b > 0 makes P(J >= j) decay "
            f"like (1-b)^j beyond tail_start), got {tail_decay}."
        )
    size = _common.check_int("block_size", block_size, 1)
    if blocks_per_step is not None:
        blocks_per_step = _common.check_int("blocks_per_step", blocks_per_step, 1)
    cfg = _Config(m, j_max, alpha, b, size, blocks_per_step)
    w_max = _inverse_tail_py(j_max, cfg)
    if not w_max <= _MAX_WEIGHT:
        raise ValueError(
            f"max_terms={j_max} gives the last term the importance weight 1/P(J >= {j_max}) = "
            f"{w_max:.3g} (> {_MAX_WEIGHT:.0e}): it overflows float32 and the variance is useless; "
            "lower max_terms or tail_decay, or raise tail_start."
        )
    return cfg


def _check_encoder_objective(encoder_objective):
    if encoder_objective is not None and encoder_objective not in ENCODER_OBJECTIVES:
        raise ValueError(
            f"encoder_objective must be one of {ENCODER_OBJECTIVES} or None for SUMO, "
            f"got {encoder_objective!r}."
        )
    return encoder_objective


def _inverse_tail_py(j: int, cfg: _Config) -> float:
    """1/P(J >= j) as a Python float (for checks and expected costs)."""
    if cfg.tail_decay == 0.0 or j < cfg.tail_start:
        return float(j)
    return cfg.tail_start * math.exp(-(j - cfg.tail_start) * math.log1p(-cfg.tail_decay))


def _inverse_tail(j, cfg: _Config, dtype):
    """1/P(J >= j) for an int array j >= 1 (clipped at max_terms, beyond which it is never used)."""
    jf = jnp.minimum(j, cfg.max_terms).astype(dtype)
    if cfg.tail_decay == 0.0:
        return jf
    geometric = cfg.tail_start * jnp.exp(-(jf - cfg.tail_start) * math.log1p(-cfg.tail_decay))
    return jnp.where(jf < cfg.tail_start, jf, geometric).astype(dtype)


def _draw_num_terms(key, cfg: _Config):
    """J >= 1 by inversion of P(J >= j); returns (min(J, J_max) int32, J > J_max)."""
    u = jax.random.uniform(key, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    # P(J >= j) = P(U <= S(j)), S decreasing with S(1) = 1, so J = max{j : S(j) >= U}.
    j = jnp.floor(1.0 / u)  # the 1/j part: 1/j >= u  <=>  j <= 1/u
    if cfg.tail_decay > 0.0:
        alpha = float(cfg.tail_start)
        tail = alpha + jnp.floor(jnp.log(u * alpha) / math.log1p(-cfg.tail_decay))
        j = jnp.where(u * alpha >= 1.0, j, tail)
    j = jnp.minimum(j, cfg.max_terms + 1.0).astype(jnp.int32)  # bounded before the int cast
    return jnp.minimum(j, cfg.max_terms), j > cfg.max_terms


def sumo_expected_num_terms(
    max_terms: int = 128, tail_start: int = 80, tail_decay: float = 0.1
) -> float:
    """E[min(J, J_max)] = sum_{j=1}^{J_max} P(J >= j): the mean number of Delta terms.

    An example USES ``min_terms`` plus this many draws on average; a batch executes more (the
    batch-max, see the module docstring).
    """
    cfg = _check_config(1, max_terms, tail_start, tail_decay, 1)
    return float(sum(1.0 / _inverse_tail_py(j, cfg) for j in range(1, cfg.max_terms + 1)))


def _tril_logsumexp(a, strict: bool = False):
    """log sum_{i<=k} exp(a_i) along the last axis (n small): one masked logsumexp per k."""
    n = a.shape[-1]
    mask = jnp.tril(jnp.ones((n, n), bool), -1 if strict else 0)
    return jax.nn.logsumexp(jnp.where(mask, a[..., None, :], -jnp.inf), axis=-1)


def _cumlogsumexp(log_w, size: int):
    """Cumulative logsumexp of (B, n * size), exact in every prefix (each has its own maximum).

    Within each block, then across block totals: O(B (P size + n^2)) work, and far cheaper to
    compile on CPU than ``lax.cumlogsumexp``'s gradient.
    """
    B, P = log_w.shape
    blocks = log_w.reshape(B, P // size, size)
    within = _tril_logsumexp(blocks)  # (B, n, size)
    before = _tril_logsumexp(within[..., -1], strict=True)  # (B, n): the blocks before, -inf first
    return jnp.logaddexp(before[..., None], within).reshape(B, P)


def _sumo_from_log_weights(log_w, num_terms, cfg: _Config):
    """SUMO per example from log weights (B, P) of the draws in order and J (B,), m + J <= P.

    Entries past an example's m + J are ignored (they may be -inf).
    """
    P = log_w.shape[-1]
    m = cfg.min_terms
    k = jnp.arange(1, P + 1, dtype=log_w.dtype)
    iwae = _cumlogsumexp(log_w, cfg.block_size) - jnp.log(k)  # IWAE_k, k = 1..P
    deltas = iwae[:, m:] - iwae[:, m - 1 : -1]  # Delta_{m+j-1}, j = 1..P-m
    j = jnp.arange(1, P - m + 1)
    used = j[None, :] <= num_terms[:, None]
    weights = jnp.where(used, _inverse_tail(j, cfg, log_w.dtype), 0.0)
    return iwae[:, m - 1] + jnp.sum(weights * jnp.where(used, deltas, 0.0), axis=-1)


def _split_keys(keys):
    """Lane keys (B, 1) -> (keys for J, keys for the draws), each (B,)."""
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys[:, 0])
    return split[:, 0], split[:, 1]


def _block_log_weights(model: LatentVariableModel, p_joint, p_prop, x, key_z, b, size: int):
    """Block b of one example's draws z = g_{p_prop}(eps): (log p(x, z), log w), each (size,).

    ``p_joint`` is what log_joint reads, ``p_prop`` what the proposal reads: passing the params
    twice lets one forward pass serve a theta-only and a phi-only backward pass.
    """
    z = model.sample_proposal(p_prop, x, jax.random.fold_in(key_z, b), size)
    lj = jax.vmap(model.log_joint, (None, None, 0))(p_joint, x, z)
    lq = jax.vmap(model.log_proposal, (None, None, 0))(p_prop, x, z)
    return lj, _common.safe_log_weights(lj, lq)


def _work_list(cfg: _Config, num_terms) -> _common.WorkList:
    """Example i's ceil((m + J_i) / block_size) blocks of draws, ``blocks_per_step`` (default B)
    list positions per loop step."""
    blocks = (cfg.min_terms + num_terms + cfg.block_size - 1) // cfg.block_size
    return _common.WorkList(blocks, cfg.blocks_per_step)


def _fill_log_weights(model, params, x, key_z, work: _common.WorkList, cfg: _Config):
    """Pass 1: log weights (B, P_max) of every example's own blocks, -inf after them."""
    B, size = x.shape[0], cfg.block_size
    run = jax.vmap(lambda xe, ke, b: _block_log_weights(model, params, params, xe, ke, b, size))
    dtype = jax.eval_shape(run, x, key_z, jnp.zeros((B,), jnp.int32))[1].dtype
    buf = jnp.full((B, cfg.max_blocks, size), -jnp.inf, dtype)

    def body(state):
        step, buf = state
        e, b, valid = work.positions(step)
        _, lw = run(x[e], key_z[e], b)
        return step + 1, buf.at[jnp.where(valid, e, B), b].set(lw.astype(dtype), mode="drop")

    _, buf = jax.lax.while_loop(lambda s: s[0] < work.num_steps, body, (jnp.int32(0), buf))
    return buf.reshape(B, cfg.max_blocks * size)


def sumo_log_likelihood(
    model: LatentVariableModel,
    params: Any,
    x: jax.Array,
    key: jax.Array,
    *,
    min_terms: int = 1,
    max_terms: int = 128,
    tail_start: int = 80,
    tail_decay: float = 0.1,
    block_size: int = 8,
    blocks_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""SUMO estimates of log p(x_i) for a batch x (B, ...), independent randomness per example.

    Args:
      model, params: a :class:`LatentVariableModel` and its parameters.
      x: (B, ...) examples. key: one ``jax.random.key``, split per example like the gradient
        estimators (example i's draws depend only on the key and i).
      min_terms: m >= 1, the base bound IWAE_m (larger m: lower variance, more draws).
      max_terms: J_max >= 1, the cap on the number of Delta terms: the capped estimator is
        unbiased for E IWAE_{m+J_max}, not exactly log p(x) (module docstring).
      tail_start, tail_decay: alpha >= 1 and b in [0, 1) of P(J >= j) (1/j, geometric beyond
        alpha; b = 0 keeps 1/j up to the cap).
      block_size: draws per block (an example's work is rounded up to whole blocks).
      blocks_per_step: blocks evaluated at once per loop step (default None: the batch size B).
        Smaller: less padding in the last step, more sequential steps; memory ~ blocks_per_step
        block_size latents. The estimate does not depend on it (nor on ``block_size``'s padding).

    Returns:
      ``(estimates, num_terms)``: SUMO(x_i) (B,) and J_i (B,) int32, the number of Delta terms
      used (example i used m + J_i draws; J_i = max_terms where capped).

    Pure and jit-able once the keyword arguments are fixed (e.g. with ``functools.partial``).
    """
    check_model(model)
    cfg = _check_config(min_terms, max_terms, tail_start, tail_decay, block_size, blocks_per_step)
    check_batch(model, params, x)
    keys = _common.lane_keys(_common.as_key(key), x.shape[0], 1)
    key_j, key_z = _split_keys(keys)
    num_terms, _ = jax.vmap(lambda k: _draw_num_terms(k, cfg))(key_j)
    log_w = _fill_log_weights(model, params, x, key_z, _work_list(cfg, num_terms), cfg)
    return _sumo_from_log_weights(log_w, num_terms, cfg), num_terms


def make_sumo_grad(
    model: LatentVariableModel,
    *,
    min_terms: int = 1,
    max_terms: int = 128,
    tail_start: int = 80,
    tail_decay: float = 0.1,
    block_size: int = 8,
    blocks_per_step: int | None = None,
    encoder_objective: SumoEncoderObjective | None = "sumo_variance",
) -> GradientEstimator:
    r"""The SUMO gradient estimator behind the common interface.

    theta (the parameters ``log_joint`` reads): the gradient of the LOSS -(1/B) \sum_i SUMO(x_i)
    with the draws held fixed, \sum_j c_ij \nabla_\theta \log p(x_i, z_ij) with
    c_ij = -(1/B) \partial SUMO(x_i) / \partial \log w_ij; unbiased for
    -\nabla_\theta (1/B) \sum_i \log p(x_i) up to the cap of the module docstring (and under the
    usual conditions for exchanging \nabla with the limit of the series).

    phi (the parameters only the proposal reads), with theta held fixed and the draws
    reparameterised:

    * ``"sumo_variance"`` (default, the paper's choice): (1/B) \sum_i \nabla_\phi SUMO(x_i)^2, an
      unbiased estimate of \nabla_\phi Var[SUMO(x_i)] because E[SUMO] = log p(x) does not depend
      on phi;
    * ``"iwae"``: -\nabla_\phi of the IWAE bound of each example's m + J_i draws (the bound of a
      random number of samples); ``"elbo"``: of their ELBO (mean log weight);
    * None: zeros.

    A parameter read by both functions gets the sum of its two parts.

    Args:
      model: a :class:`LatentVariableModel` (the only positional argument).
      min_terms, max_terms, tail_start, tail_decay, block_size, blocks_per_step: as in
        :func:`sumo_log_likelihood`.
      encoder_objective: ``"sumo_variance"``, ``"elbo"``, ``"iwae"`` or None.

    Returns:
      A :class:`GradientEstimator` ``grad_fn(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`. ``info``, a :class:`SumoInfo`: ``bound``
      (B,) the SUMO estimate of each example; ``num_iters`` (B, 1) the number J of Delta terms
      used; ``capped`` (B, 1) whether J was cut at ``max_terms``; ``meeting_time`` (B, 1) zeros
      (no chains); ``num_log_joint_evals`` () the evaluations executed for the batch, 2
      blocks_per_step block_size per loop step (both passes, the last step's padding included);
      ``own_log_joint_evals`` (B,) what each example needs, 2 (m + J_i); ``ess``,
      ``log1p_chi2``, ``log_weight_std`` NaN (no fixed number of draws).
    """
    check_model(model)
    cfg = _check_config(min_terms, max_terms, tail_start, tail_decay, block_size, blocks_per_step)
    _check_encoder_objective(encoder_objective)
    size = cfg.block_size

    def objectives(log_w, num_terms):
        """(theta loss, encoder loss) as functions of the log-weight buffer (B, P_max)."""
        sumo = _sumo_from_log_weights(log_w, num_terms, cfg)
        theta_loss = -jnp.mean(sumo)
        if encoder_objective == "sumo_variance":
            enc = jnp.mean(sumo**2)
        elif encoder_objective in ("iwae", "elbo"):
            n_used = cfg.min_terms + num_terms
            used = jnp.arange(log_w.shape[-1])[None, :] < n_used[:, None]
            n_used = n_used.astype(log_w.dtype)
            if encoder_objective == "iwae":
                masked = jnp.where(used, log_w, -jnp.inf)
                bound = jax.nn.logsumexp(masked, axis=-1) - jnp.log(n_used)
            else:
                bound = jnp.sum(jnp.where(used, log_w, 0.0), axis=-1) / n_used
            enc = -jnp.mean(bound)
        else:
            enc = jnp.zeros((), log_w.dtype)
        return theta_loss, enc, sumo

    def grad_fn(params: Any, x: jax.Array, keys: jax.Array) -> LossGradient:
        B = x.shape[0]
        key_j, key_z = _split_keys(keys)
        num_terms, capped = jax.vmap(lambda k: _draw_num_terms(k, cfg))(key_j)
        work = _work_list(cfg, num_terms)
        log_w = _fill_log_weights(model, params, x, key_z, work, cfg)

        # Exact coefficients d loss / d log w_ij of each objective (zero past each m + J_i).
        def per_block(c):
            return c.reshape(B, cfg.max_blocks, size)

        c_theta = per_block(jax.grad(lambda lw: objectives(lw, num_terms)[0])(log_w))
        if encoder_objective is not None:
            c_phi = per_block(jax.grad(lambda lw: objectives(lw, num_terms)[1])(log_w))
        _, _, sumo = objectives(log_w, num_terms)
        frozen = jax.lax.stop_gradient(params)

        def blocks(pj, pq, e, b):
            run = jax.vmap(lambda xe, ke, bb: _block_log_weights(model, pj, pq, xe, ke, bb, size))
            return run(x[e], key_z[e], b)

        def body(state):
            step, grads = state
            e, b, valid = work.positions(step)
            # padding positions may hold NaN coefficients (all -inf blocks): select, not multiply
            ct = jnp.where(valid[:, None], c_theta[e, b], 0.0)
            if encoder_objective is None:
                (lj, _), vjp = jax.vjp(lambda pj: blocks(pj, frozen, e, b), params)
                (g,) = vjp((ct.astype(lj.dtype), jnp.zeros_like(lj)))
            else:
                # One forward pass; theta-only and phi-only backward passes (params given twice).
                (lj, lw), vjp = jax.vjp(lambda pj, pq: blocks(pj, pq, e, b), params, params)
                cp = jnp.where(valid[:, None], c_phi[e, b], 0.0)
                g_theta, _ = vjp((ct.astype(lj.dtype), jnp.zeros_like(lw)))
                _, g_phi = vjp((jnp.zeros_like(lj), cp.astype(lw.dtype)))
                g = jax.tree.map(jnp.add, g_theta, g_phi)
            return step + 1, jax.tree.map(jnp.add, grads, g)

        zeros = jax.tree.map(jnp.zeros_like, params)
        _, grads = jax.lax.while_loop(lambda s: s[0] < work.num_steps, body, (jnp.int32(0), zeros))
        info = SumoInfo(
            **_common.base_info(B, 1, sumo, 2 * work.per_step * size * work.num_steps),
            own_log_joint_evals=(2 * (cfg.min_terms + num_terms)).astype(jnp.int32),
        )
        info["num_iters"] = num_terms[:, None]
        info["capped"] = capped[:, None]
        return LossGradient(grads, info)

    return _common.GradientEstimator("sumo", 1, grad_fn, model)
