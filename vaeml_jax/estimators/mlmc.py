r"""Multilevel Monte Carlo (MLMC) unbiased gradients: the IWAE gradient debiased over levels.

Shi & Cornish, "On Multilevel Monte Carlo Unbiased Gradient Estimation for Deep Latent Variable
Models", AISTATS 2021.

Levels. For one example x and level l = 0, 1, 2, ... let n_l = n_0 2^l and

.. math:: Y_l = \sum_{s \le n_l} \bar w_s \nabla_\theta \log p_\theta(x, z_s), \qquad
          \bar w_s = w_s / \textstyle\sum_{s' \le n_l} w_{s'}, \quad w_s = p(x, z_s) / q(z_s|x),

the self-normalised IWAE theta-gradient of n_l draws z_s ~ q_phi(z | x). It is consistent:
E[Y_l] -> \nabla_\theta \log p_\theta(x) as l grows (bias O(1/n_l)). The antithetic difference

.. math:: \Delta_l = Y_l(z_{1:n_l})
          - \tfrac12 \big(Y_{l-1}(z_{1:n_l/2}) + Y_{l-1}(z_{n_l/2+1:n_l})\big), \qquad l \ge 1,

has E[\Delta_l] = E[Y_l] - E[Y_{l-1}], so
E[Y_0] + \sum_{l \ge 1} E[\Delta_l] = \nabla_\theta \log p(x).
Where the importance weights have enough moments (bounded weights, for instance), the two halves'
errors cancel to first order and Var(\Delta_l) = O(2^{-2l}) (tested on a model with bounded
weights).

The random level. L >= 0 with P(L = l) = (1 - 2^{-r}) 2^{-r l}, i.e. P(L >= l) = 2^{-r l}. An
example's draws are ONE sequence z_1, ..., z_{n_L} (n_0 2^L draws); every level uses a prefix of
it, and the estimators are

.. math::
   \text{single term:}\quad Y_0 + \frac{\Delta_L}{P(L = l)}\Big|_{l = L}\,
   \mathbf 1[L \ge 1], \qquad
   \text{roulette:}\quad Y_0 + \sum_{l=1}^{L} \frac{\Delta_l}{P(L \ge l)},

both unbiased for \nabla_\theta \log p(x) by linearity (sharing draws between levels changes the
variance, never the mean). The expected number of draws is n_0 E[2^L] =
n_0 (1 - 2^{-r}) / (1 - 2^{1-r}), finite for r > 1 (2.2 n_0 at r = 1.5). The single-term
estimator's variance \sum_l E[\Delta_l^2] / P(L = l) is finite when Var(\Delta_l) decays faster
than 2^{-r l}: with the antithetic 2^{-2l}, for every r < 2. Hence 1 < r < 2; r near 1 spends more
draws on high levels (lower variance), r near 2 fewer (the cheapest with a finite variance).
(The paper's single-term estimator also draws level 0 at random, \Delta_0 = Y_0; here Y_0 is
always kept, on the first n_0 draws, which removes the 1/P(L = 0) noise at no extra draw.)

The cap, and the bias it leaves. L is capped at ``max_level`` = L_max: the capped level
min(L, L_max) takes the probability P(L >= L_max) at L_max, and the weights are those of the
capped law (1/P(L >= L_max) for the single term at L_max; the roulette's 1/P(L >= l) are unchanged
for l <= L_max). The capped estimator is then exactly unbiased for E[Y_{L_max}], the gradient of
the IWAE bound with n_0 2^{L_max} draws: its bias is that bound's (O(2^{-L_max} / n_0)), however
rarely an example is capped; ``info["capped"]`` reports the examples whose L exceeded L_max.

Computation: cost that follows each example's own level. Levels are drawn first; each example's
2^L blocks of n_0 draws (block b of example i from ``fold_in(key_i, b)``) are laid end to end in
one work list, run ``blocks_per_step`` blocks per step (default B) by a ``lax.while_loop``
(pass 1: log weights into a (B, 2^{L_max}, n_0) buffer). The estimate is linear in
\nabla_\theta \log p(x_i, z_{ij}) with coefficients c_{ij} that are functions of the log weights
alone (the combination of softmaxes above), so pass 2 re-draws the same blocks and accumulates
``vjp(c)``, as SUMO's estimator does. A batch where one example draws level 10 pays 1,024 n_0
draws for that example only, not for all: the executed evaluations are
2 n_0 (\sum_i 2^{L_i} + the last step's padding), reported in ``info["num_log_joint_evals"]``
beside each example's own share (``info["own_log_joint_evals"]``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from vaeml_jax.estimators import _common
from vaeml_jax.estimators._common import GradientEstimator, GradientInfo, LossGradient
from vaeml_jax.models.interface import LatentVariableModel, check_model, proposal_sampler

__all__ = [
    "make_mlmc_grad",
    "mlmc_level_probabilities",
    "mlmc_expected_num_draws",
    "MLMCInfo",
    "MLMCEstimator",
    "MLMCEncoderObjective",
]

MLMCEstimator = Literal["roulette", "single_term"]
ESTIMATORS: tuple[str, ...] = get_args(MLMCEstimator)
MLMCEncoderObjective = Literal["iwae", "elbo", "iwae_dreg", "chi2", "inclusive_kl"]
ENCODER_OBJECTIVES: tuple[str, ...] = get_args(MLMCEncoderObjective)
_MAX_BUFFER = 2**24  # n_0 2^{L_max}: the largest per-example draw buffer allowed


class MLMCInfo(GradientInfo):
    """The :class:`GradientInfo` of :func:`make_mlmc_grad`, with one more field.

    Attributes:
      own_log_joint_evals: (B,) int32, the ``log_joint`` evaluations example i's estimate needs
        on its own, 2 n_0 2^{L_i} (both passes; + K for a reparameterised encoder objective).
        ``num_log_joint_evals`` - sum(own_log_joint_evals) is the padding of the last loop step.
    """

    own_log_joint_evals: jax.Array


@dataclasses.dataclass(frozen=True)
class _Config:
    num_particles: int  # n_0
    rate: float  # r
    max_level: int  # L_max
    estimator: str

    @property
    def max_blocks(self) -> int:
        return 2**self.max_level


def _check_config(num_particles, rate, max_level, estimator) -> _Config:
    n0 = _common.check_int("num_particles", num_particles, 1, " (n_0 draws at level 0)")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise TypeError(f"rate must be a float r in (1, 2), got {rate!r}.")
    r = float(rate)
    if not (math.isfinite(r) and r > 0.0):
        raise ValueError(
            f"rate must be a finite r > 0 (P(L = l) proportional to 2^(-r l)), got {rate}; "
            "use 1 < r < 2."
        )
    if not 1.0 < r < 2.0:
        why = (
            "r <= 1: the expected cost grows with max_level instead of staying bounded"
            if r <= 1.0
            else "r >= 2: the variance grows with max_level instead of staying bounded"
        )
        warnings.warn(
            f"make_mlmc_grad(rate={r}): {why} (finite only because of the cap). "
            "1 < r < 2 keeps both finite when Var(Delta_l) decays like 2^(-2l).",
            UserWarning,
            stacklevel=3,
        )
    lmax = _common.check_int("max_level", max_level, 1)
    if n0 * 2**lmax > _MAX_BUFFER:
        raise ValueError(
            f"max_level={lmax} with num_particles={n0} gives n_0 2^max_level = {n0 * 2**lmax} "
            f"draws for a capped example (> {_MAX_BUFFER}); the (B, n_0 2^max_level) buffer "
            "would not fit. Lower max_level (the bias of the cap is that of IWAE with "
            "n_0 2^max_level draws)."
        )
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    return _Config(n0, r, lmax, estimator)


def mlmc_level_probabilities(rate: float = 1.5, max_level: int = 10) -> np.ndarray:
    """P(min(L, L_max) = l) for l = 0..L_max: (1 - 2^-r) 2^(-r l), and 2^(-r L_max) at L_max."""
    r, lmax = float(rate), int(max_level)
    p = (1.0 - 2.0**-r) * 2.0 ** (-r * np.arange(lmax + 1))
    p[lmax] = 2.0 ** (-r * lmax)
    return p


def mlmc_expected_num_draws(
    num_particles: int = 5, rate: float = 1.5, max_level: int = 10
) -> float:
    """n_0 E[2^min(L, L_max)]: the draws one example uses on average (each pass)."""
    p = mlmc_level_probabilities(rate, max_level)
    return float(num_particles * np.sum(p * 2.0 ** np.arange(max_level + 1)))


def _draw_level(key, cfg: _Config):
    """L by inversion, P(L >= l) = 2^(-r l): returns (min(L, L_max) int32, L > L_max)."""
    u = jax.random.uniform(key, (), jnp.float32, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)
    level = jnp.floor(-jnp.log2(u) / cfg.rate)
    level = jnp.minimum(level, cfg.max_level + 1.0).astype(jnp.int32)  # bounded before the cast
    return jnp.minimum(level, cfg.max_level), level > cfg.max_level


def _level_weights(levels, cfg: _Config, dtype):
    """Weights (B, L_max + 1) of Delta_l, l = 0..L_max, in each example's estimate (column 0 is
    zero: Y_0 has weight one). Single term: 1[L = l] / P(L_capped = l); roulette:
    1[l <= L] / P(L >= l)."""
    lv = jnp.arange(cfg.max_level + 1)
    probs = jnp.asarray(mlmc_level_probabilities(cfg.rate, cfg.max_level), dtype)
    if cfg.estimator == "single_term":
        used = lv[None, :] == levels[:, None]
        inv = 1.0 / probs
    else:
        used = lv[None, :] <= levels[:, None]
        inv = jnp.asarray(2.0 ** (cfg.rate * np.arange(cfg.max_level + 1)), dtype)
    return jnp.where(used & (lv[None, :] >= 1), inv[None, :], jnp.zeros((), dtype))


def _coarse_term(m, log_z_first, log_z_second, second_half: bool):
    r"""The coarse level's part of \Delta_l's coefficient (per unit of exp(log w - m)): the
    antithetic mean (Y_{l-1}(first half) + Y_{l-1}(second half)) / 2 gives a draw of the half it
    lies in the weight exp(log w - log Z_half) / 2."""
    return 0.5 * jnp.exp(m - (log_z_second if second_half else log_z_first))


def _coefficients(log_w, levels, cfg: _Config):
    r"""c (B, n_0 2^L_max): example i's estimate is \sum_j c_ij \nabla \log p(x_i, z_ij).

    ``log_w`` (B, n_0 2^L_max) holds each example's draws in order; entries past its n_0 2^L_i are
    never read (they may be -inf). Work O(B n_0 2^L_max + B L_max^2), by tiers: tier 0 is the first
    n_0 draws, tier t >= 1 the draws n_0 2^(t-1) .. n_0 2^t - 1 (those level t adds). A draw j of
    tier t enters Y_0 (t = 0) and every \Delta_l with l >= max(t, 1), with the coefficient

    .. math:: w_l \Big( \frac{e^{\log w_j}}{Z_l} - \frac{e^{\log w_j}}{2 Z_{l, half(t)}} \Big),

    Z_l the sum of the weights of level l's prefix and Z_{l, half} that of the half of it the draw
    lies in (the prefix of level l - 1 when t < l, tier l itself when t = l). Every exponent is
    taken relative to m_t, the largest log weight of tier t (<= every log Z above): no overflow.
    """
    n0, lmax = cfg.num_particles, cfg.max_level
    weights = _level_weights(levels, cfg, log_w.dtype)
    bounds = [(0, n0)] + [(n0 * 2 ** (t - 1), n0 * 2**t) for t in range(1, lmax + 1)]
    tiers = [log_w[:, a:b] for a, b in bounds]
    tier_max = [jnp.max(lw, axis=-1) for lw in tiers]
    tier_lse = [logsumexp(lw, axis=-1) for lw in tiers]
    prefix = [tier_lse[0]]  # log Z_l, l = 0..L_max
    for t in range(1, lmax + 1):
        prefix.append(jnp.logaddexp(prefix[-1], tier_lse[t]))
    out = []
    for t in range(lmax + 1):
        m = tier_max[t]
        g = jnp.exp(m - prefix[0]) if t == 0 else jnp.zeros_like(m)
        for lev in range(max(t, 1), lmax + 1):
            w = weights[:, lev]
            coarse = _coarse_term(m, prefix[lev - 1], tier_lse[lev], second_half=t == lev)
            g = g + jnp.where(w != 0, w * (jnp.exp(m - prefix[lev]) - coarse), 0.0)
        used = levels >= t
        c = jnp.exp(tiers[t] - m[:, None]) * g[:, None]
        out.append(jnp.where(used[:, None], c, 0.0))
    return jnp.concatenate(out, axis=-1)


def make_mlmc_grad(
    model: LatentVariableModel,
    *,
    num_particles: int = 5,
    rate: float = 1.5,
    max_level: int = 10,
    estimator: MLMCEstimator = "roulette",
    encoder_objective: MLMCEncoderObjective | None = "iwae",
    encoder_particles: int | None = None,
    blocks_per_step: int | None = None,
) -> GradientEstimator:
    r"""The MLMC-debiased IWAE gradient (Shi & Cornish, AISTATS 2021) behind the common interface.

    theta (the parameters ``log_joint`` reads): the gradient of the LOSS
    :math:`-(1/B) \sum_i \log p_\theta(x_i)`, estimated without bias by the single-term or the
    Russian-roulette combination of antithetic level differences of the self-normalised IWAE
    gradient (module docstring), up to the cap ``max_level``.

    Variance. Unbiased is not low-variance: the variance is finite without the cap only when
    E||Delta_l||^2 decays faster than 2^{-r l}. On the MNIST VAE (784-200-200-50) it was measured
    to decay like 2^{-0.2 l} to 2^{-0.5 l} up to 2,560 draws, at initialization and after 3,000
    IWAE-5 steps (benchmarks/RESULTS.md, mlmc_levels.py): there every level adds about 2x to the
    variance and ``max_level`` sets it. Measure the decay on your model before relying on it.

    phi (the parameters only the proposal reads), with theta held fixed:

    * ``"iwae"`` (default): the reparameterised IWAE-n_0 bound of each example's first n_0 draws
      (as :func:`make_iwae_grad`); also ``"elbo"``, ``"iwae_dreg"``, ``"chi2"`` on those draws
      (:func:`vaeml_jax.estimators._common.encoder_loss`). These take one more pass over the
      n_0 draws (B n_0 evaluations, counted), or over K draws of their own
      (``encoder_particles``).
    * ``"inclusive_kl"``: the reweighted-wake-sleep update made unbiased, an estimate of
      :math:`\nabla_\phi KL(p(z|x) \| q_\phi(z|x)) = -E_{p(z|x)}[\nabla_\phi \log q_\phi(z|x)]` by
      the same levels, draws and coefficients applied to :math:`\nabla_\phi \log q(z_s|x)` at fixed
      z_s (no extra evaluation of ``log_joint``).
    * None: zeros.

    A parameter read by both functions gets the sum of its two parts.

    Args:
      model: a :class:`LatentVariableModel`.
      num_particles: n_0 >= 1, the draws of level 0 (level l has n_0 2^l).
      rate: r of P(L = l) proportional to 2^{-r l}; 1 < r < 2 keeps the expected cost and (when
        Var(Delta_l) decays like 2^{-2l}) the variance finite without the cap; a value outside
        warns. Default 1.5: n_0 E[2^L] ~ 2.2 n_0 draws per example.
      max_level: L_max >= 1, the cap on the level: the capped estimator is unbiased for the
        gradient of the IWAE bound with n_0 2^{L_max} draws (module docstring). Memory: a buffer
        of B n_0 2^{L_max} log weights.
      estimator: ``"roulette"`` (default: Y_0 + \sum_{l \le L} \Delta_l / P(L \ge l)) or
        ``"single_term"`` (Y_0 + \Delta_L / P(L = l)); same draws, same cost.
      encoder_objective: ``"iwae"``, ``"elbo"``, ``"iwae_dreg"``, ``"chi2"``, ``"inclusive_kl"``
        or None (above).
      encoder_particles: K >= 1 particles of a reparameterised encoder objective. None (default)
        reuses each example's first n_0 draws (same keys); another K draws K of its own from
        independent keys. Either way B K evaluations, counted.
      blocks_per_step: blocks of n_0 draws evaluated at once per loop step (default None: the
        batch size B, so a batch at level 0 takes one step). Smaller: less padding, more
        sequential steps. The estimate does not depend on it.

    Returns:
      A :class:`GradientEstimator` ``grad_fn(params, x, key) -> (grads, info)``, a
      :class:`LossGradient`. ``info``, an :class:`MLMCInfo`: ``bound``
      (B,) the IWAE-n_0 bound of each example's first n_0 draws (a monitor); ``num_iters`` (B, 1)
      the level min(L_i, L_max); ``capped`` (B, 1) whether L_i exceeded ``max_level``;
      ``meeting_time`` (B, 1) zeros (no chains); ``num_log_joint_evals`` () the evaluations
      executed for the batch (both passes, the last step's padding included, + B K for a
      reparameterised encoder objective); ``own_log_joint_evals`` (B,) each example's own share
      (2 n_0 2^{L_i}, + K for a reparameterised encoder objective), so that executed - sum(own)
      is the padding; ``ess``, ``log1p_chi2``, ``log_weight_std`` of the first n_0 draws.

    The function is pure: it works under ``jax.jit``, ``jax.vmap`` and ``jax.shard_map``
    (:func:`vaeml_jax.distributed.data_parallel`); an example's randomness depends only on its
    key, so the estimate does not depend on how the batch is split.
    """
    check_model(model)
    cfg = _check_config(num_particles, rate, max_level, estimator)
    if encoder_objective is not None and encoder_objective not in ENCODER_OBJECTIVES:
        raise ValueError(
            f"encoder_objective must be one of {ENCODER_OBJECTIVES} or None for MLMC, "
            f"got {encoder_objective!r}."
        )
    if blocks_per_step is not None:
        blocks_per_step = _common.check_int("blocks_per_step", blocks_per_step, 1)
    n0 = cfg.num_particles
    K, own_draws = _common.check_encoder_particles(encoder_particles, encoder_objective, n0)
    inclusive = encoder_objective == "inclusive_kl"
    reparam = encoder_objective is not None and not inclusive
    features_fn, sample_fn = proposal_sampler(model)
    log_joint_draws = jax.vmap(model.log_joint, (None, None, 0))
    log_proposal_draws = jax.vmap(model.log_proposal, (None, None, 0))

    def grad_fn(params: Any, x: jax.Array, keys: jax.Array) -> LossGradient:
        B = x.shape[0]
        split = jax.vmap(lambda k: jax.random.split(k, 2))(keys[:, 0])
        key_level, key_z = split[:, 0], split[:, 1]
        levels, capped = jax.vmap(lambda k: _draw_level(k, cfg))(key_level)

        # The work list: example i's 2^L_i blocks, laid end to end.
        work = _common.WorkList(jnp.left_shift(jnp.int32(1), levels), blocks_per_step)
        blocks, num_steps = work.blocks, work.num_steps

        frozen = jax.lax.stop_gradient(params)
        feats = jax.vmap(features_fn, (None, 0))(frozen, x)

        def draws(e, b):
            """The fixed draws of blocks (e, b): z (K, n_0, *latent), log q (K, n_0), x_e."""
            fe = jax.tree.map(lambda a: a[e], feats)
            ke = jax.vmap(jax.random.fold_in)(key_z[e], b)
            z, lq = jax.vmap(lambda f, k: sample_fn(frozen, f, k, n0))(fe, ke)
            return jax.lax.stop_gradient(z), jax.lax.stop_gradient(lq), x[e]

        def block_log_weights(c):
            e, b, valid = work.positions(c)
            z, lq, xe = draws(e, b)
            lj = jax.vmap(log_joint_draws, (None, 0, 0))(frozen, xe, z)
            return _common.safe_log_weights(lj, lq), e, b, valid

        # Pass 1: log weights into the per-example buffer (B, 2^L_max, n_0).
        lw_dtype = jax.eval_shape(lambda: block_log_weights(0)[0]).dtype
        buf = jnp.full((B, cfg.max_blocks, n0), -jnp.inf, lw_dtype)

        def fill(state):
            c, buf = state
            lw, e, b, valid = block_log_weights(c)
            buf = buf.at[jnp.where(valid, e, B), b].set(lw, mode="drop")
            return c + 1, buf

        _, buf = jax.lax.while_loop(lambda s: s[0] < num_steps, fill, (jnp.int32(0), buf))
        log_w = buf.reshape(B, cfg.max_blocks * n0)
        coef = _coefficients(log_w, levels, cfg).reshape(B, cfg.max_blocks, n0)
        coef = jax.lax.stop_gradient(-coef / B)  # d loss / d log p(x_i, z_ij)

        # Pass 2: the same draws, vjp of the coefficients.
        def accumulate(state):
            c, grads = state
            e, b, valid = work.positions(c)
            z, _, xe = draws(e, b)
            ct = jnp.where(valid[:, None], coef[e, b], 0.0)

            def f(p):
                lj = jax.vmap(log_joint_draws, (None, 0, 0))(p, xe, z)
                if not inclusive:
                    return lj
                return lj, jax.vmap(log_proposal_draws, (None, 0, 0))(p, xe, z)

            out, vjp = jax.vjp(f, params)
            cts = jax.tree.map(lambda o: ct.astype(o.dtype), out)
            (g,) = vjp(cts)
            return c + 1, jax.tree.map(jnp.add, grads, g)

        zeros = jax.tree.map(jnp.zeros_like, params)
        _, grads = jax.lax.while_loop(lambda s: s[0] < num_steps, accumulate, (jnp.int32(0), zeros))

        base_lw = jax.lax.stop_gradient(buf[:, 0, :])
        own = 2 * n0 * blocks
        evals = 2 * n0 * work.per_step * num_steps
        if reparam:  # the first n_0 draws again, reparameterised (same keys as block 0)
            assert encoder_objective is not None  # reparam implies it
            keys0 = jax.vmap(jax.random.fold_in)(key_z, jnp.zeros((B,), jnp.int32))[:, None]
            enc_keys = _common.encoder_keys(keys0) if own_draws else keys0
            enc = jax.grad(
                lambda p: _common.encoder_loss(model, p, x, enc_keys, K, encoder_objective)[0]
            )(params)
            grads = jax.tree.map(jnp.add, grads, enc)
            own, evals = own + K, evals + B * K
        info = _common.base_info(B, 1, _common.log_mean_exp(base_lw), evals, base_lw[:, None, :])
        info = MLMCInfo(
            **info,
            own_log_joint_evals=own.astype(jnp.int32),
        )
        info["num_iters"] = levels[:, None]
        info["capped"] = capped[:, None]
        return LossGradient(grads, info)

    return GradientEstimator("mlmc", 1, grad_fn, model)
