"""Shared pieces of the gradient estimators: the returned types, argument checks, keys, batched
evaluation, losses."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypedDict, get_args

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from vaeml_jax import diagnostics
from vaeml_jax.couplings.cis import normalized_weights
from vaeml_jax.models.interface import LatentVariableModel, check_batch, sample_and_log_proposal

Params = Any  # a pytree of arrays
EncoderObjective = Literal["elbo", "iwae", "inclusive_kl", "iwae_dreg", "chi2"]
ENCODER_OBJECTIVES: tuple[str, ...] = get_args(EncoderObjective)
# Objectives computed by :func:`encoder_loss` on reparameterised draws z = g_phi(eps).
REPARAM_OBJECTIVES = ("elbo", "iwae", "iwae_dreg", "chi2")


class GradientInfo(TypedDict):
    r"""What every estimator reports about one call ``estimator(params, x, key)``, per example.

    A plain dict at run time (a pytree: it goes through ``jax.jit``, ``vmap`` and ``shard_map``
    as is); the type names its fields. Every estimator returns every field; where a field has no
    meaning for an estimator it holds zeros (or NaN), as said below. B is the batch size, C the
    number of coupled pairs per example (``num_chains``; 1 for every other estimator).

    Attributes:
      meeting_time: (B, C) int32. Unbiased: tau, the first t >= 1 with X_t = Y_{t-1}, per
        example and pair; for a capped lane a lower bound (its last t + 1). Zeros for the other
        estimators (no coupled chains).
      num_iters: (B, C) int32, the iterations each lane ran. Unbiased: coupled iterations (each
        advances both chains once); MCMC: T = ``num_steps`` for every example; SUMO: J, the
        number of Delta terms used; MLMC: the level min(L, ``max_level``); zeros for ELBO and
        IWAE.
      capped: (B, C) bool. Unbiased: the lane stopped at ``max_iters`` before meeting (its
        correction is truncated: the estimator's one source of bias); SUMO: J was cut at
        ``max_terms``; MLMC: L exceeded ``max_level``; False for the others.
      num_log_joint_evals: () int32, the ``log_joint`` evaluations the call executed for the
        whole batch, masked lanes and re-evaluations included (the cost, in model evaluations;
        each estimator's docstring gives its formula).
      bound: (B,) float. ELBO: the per-example ELBO estimate of the draws; IWAE, MCMC and
        unbiased: the IWAE-S bound log (1/S) sum_s w_s of the initial draws (averaged over
        pairs) (MLMC: of the first n_0 draws); SUMO: the SUMO estimate of log p(x_i). For
        monitoring.
      ess: (B,) float32, the effective sample size (sum_s w_s)^2 / sum_s w_s^2 of the initial
        draws' S importance weights, in [1, S]
        (:func:`vaeml_jax.diagnostics.importance_diagnostics`, averaged over pairs); NaN for SUMO
        (no fixed S).
      log1p_chi2: (B,) float32, log(S / ESS), the plug-in log(1 + chi^2(p(z|x) || q(z|x))), in
        [0, log S]: a lower bound on the truth when the proposal is poor; NaN for SUMO.
      log_weight_std: (B,) float32, the standard deviation of the initial draws' log weights
        (nats), which keeps resolving where ESS saturates; NaN for SUMO.
    """

    meeting_time: jax.Array
    num_iters: jax.Array
    capped: jax.Array
    num_log_joint_evals: jax.Array
    bound: jax.Array
    ess: jax.Array
    log1p_chi2: jax.Array
    log_weight_std: jax.Array


class LossGradient(NamedTuple):
    r"""What an estimator returns: ``grads, info = estimator(params, x, key)``.

    Attributes:
      grads: the structure of ``params``: the gradient of the LOSS, on theta (the parameters
        ``log_joint`` reads) an estimate of :math:`-\nabla_\theta (1/B) \sum_i \log p_\theta(x_i)`
        (unbiased or not, depending on the estimator), on phi (the parameters only the proposal
        reads) the gradient of the encoder objective's loss. Descent-ready: pass it to an optax
        optimiser as is. A parameter read by both gets the sum.
      info: :class:`GradientInfo`, per-example diagnostics and the cost of the call.
    """

    grads: Params
    info: GradientInfo


def check_int(name: str, value, minimum: int, why: str = "") -> int:
    """A Python int >= minimum, or a clear error (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{why}, got {value}.")
    return int(value)


def check_num_particles(num_particles, cis_based: bool) -> int:
    if cis_based:
        return check_int(
            "num_particles",
            num_particles,
            2,
            " for the CIS-based estimators (with one particle the kernel never moves)",
        )
    return check_int("num_particles", num_particles, 1)


def check_encoder_objective(encoder_objective: Any) -> EncoderObjective | None:
    if encoder_objective is not None and encoder_objective not in ENCODER_OBJECTIVES:
        raise ValueError(
            f"encoder_objective must be one of {ENCODER_OBJECTIVES} or None, "
            f"got {encoder_objective!r}."
        )
    return encoder_objective


def check_encoder_particles(encoder_particles, encoder_objective, num_particles: int):
    """Resolve ``encoder_particles`` -> (K, own_draws).

    None (default) means K = S (the estimator's particle count) and the encoder objective reuses
    the estimator's first S draws (same keys: no extra draws). Any other K draws its own K
    particles from independent keys (:func:`encoder_keys`), unless K == S. Only the
    reparameterised objectives (:data:`REPARAM_OBJECTIVES`) have a particle count of their own.
    """
    if encoder_particles is None:
        return num_particles, False
    K = check_int("encoder_particles", encoder_particles, 1)
    if encoder_objective not in REPARAM_OBJECTIVES:
        raise ValueError(
            f"encoder_particles applies to the reparameterised encoder objectives "
            f"{REPARAM_OBJECTIVES}; with encoder_objective={encoder_objective!r} leave it None."
        )
    return K, K != num_particles


def encoder_keys(keys: jax.Array) -> jax.Array:
    """Per-lane keys (B, C) for an encoder objective's own draws, independent of ``keys``' uses."""
    return jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, 0x5EED)))(keys)


def as_key(key) -> jax.Array:
    """Accept a new-style key (jax.random.key) or a legacy uint32[2] key; refuse anything else."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"key must be ONE PRNG key, got a key array of shape {key.shape}; "
                "the estimator splits it per example itself."
            )
        return key
    if hasattr(key, "dtype") and key.dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got {key!r}.")


def lane_keys(key, batch_size: int, num_chains: int) -> jax.Array:
    """Independent keys, one per (example, chain), shape (B, C)."""
    return jax.random.split(key, batch_size * num_chains).reshape(batch_size, num_chains)


def sample_lanes(model: LatentVariableModel, params, x, keys, num: int):
    """z ~ q(.|x_i) for every lane: keys (B, C) -> particles (B, C, num, *latent)."""
    per_chain = jax.vmap(lambda xi, k: model.sample_proposal(params, xi, k, num), in_axes=(None, 0))
    return jax.vmap(per_chain)(x, keys)


def sample_lanes_with_log_q(model: LatentVariableModel, params, x, keys, num: int):
    """Draws (B, C, num, *latent) as :func:`sample_lanes` and their log q (B, C, num), in one
    pass when the model has ``sample_with_log_proposal`` (:func:`sample_and_log_proposal`)."""
    per_chain = jax.vmap(
        lambda xi, k: sample_and_log_proposal(model, params, xi, k, num), in_axes=(None, 0)
    )
    return jax.vmap(per_chain)(x, keys)


def eval_lanes(model: LatentVariableModel, params, x, particles, proposal_grad: bool = True):
    """log p(x_i, z) and log q(z | x_i) for particles (B, C, P, *latent) -> two (B, C, P) arrays.

    ``proposal_grad=False`` cuts log q's dependence on params, so a vjp through this function
    does no backward pass for a proposal term whose cotangent would be zero anyway.
    """

    def per_example(p, xi, zi):
        pq = p if proposal_grad else jax.lax.stop_gradient(p)
        lj = jax.vmap(jax.vmap(model.log_joint, (None, None, 0)), (None, None, 0))(p, xi, zi)
        lq = jax.vmap(jax.vmap(model.log_proposal, (None, None, 0)), (None, None, 0))(pq, xi, zi)
        return lj, lq

    return jax.vmap(per_example, in_axes=(None, 0, 0))(params, x, particles)


def safe_log_weights(lj, lq):
    lw = lj - lq
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


def log_mean_exp(lw, axis=-1):
    """log (1/S) sum exp(lw) along ``axis``; -inf only if every weight is zero."""
    return logsumexp(lw, axis=axis) - math.log(lw.shape[axis])


def encoder_loss(
    model: LatentVariableModel, params, x, keys, num: int, objective: str, freeze_theta: bool = True
):
    r"""Reparameterised encoder loss, mean over lanes; by default log_joint's parameters fixed.

    With z_s = g_phi(eps_s), s = 1..S (S = ``num``) and
    log w_s = log p_{sg(theta)}(x, z_s) - log q_phi(z_s | x):

    * ``"elbo"``: -mean_s log w_s.
    * ``"iwae"``: -log (1/S) sum_s w_s.
    * ``"iwae_dreg"``: the doubly-reparameterised IWAE surrogate (Tucker, Lawson, Gu & Maddison,
      "Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives", ICLR 2019, eq. 5)

      .. math:: -\sum_s \mathrm{sg}(\bar w_s^2)\, \log \tilde w_s, \qquad
                \log \tilde w_s = \log p(x, z_s) - \log q_{\mathrm{sg}(\phi)}(z_s | x),

      whose phi-gradient is -\sum_s \bar w_s^2 (\partial \log w_s / \partial z_s)
      (\partial z_s / \partial \phi): the score term of q's parameters is cut (log q is
      evaluated with stop-gradient params at the differentiable z_s). Its expectation equals the
      IWAE phi-gradient's, and its variance stays bounded as S grows (the IWAE one's
      signal-to-noise ratio decays like S^{-1/2}, Rainforth et al. 2018). Its value is not the
      bound: use it for gradients only.
    * ``"chi2"``: the chi^2 upper bound (CUBO, n = 2; Dieng, Tran, Ranganath, Paisley & Blei,
      "Variational Inference via chi Upper Bound Minimization", NeurIPS 2017), MINIMISED:

      .. math:: L = \log \frac1S \sum_s w_s^2 \approx \log E_q[w^2]
                = 2 \log p(x) + \log(1 + \chi^2(p(z|x) \| q)),

      i.e. the variance of the importance weights (Var_q[w / p(x)] = chi^2), the quantity that
      drives CIS mixing and meeting. Its gradient is the self-normalised sum_s v_s 2 grad log w_s
      with v = softmax(2 log w): consistent for grad log E_q[w^2] (bias O(1/S), as IWAE's is for
      grad log p) but of HIGH variance: w^2 is heavier-tailed than w, so one draw with a large
      weight dominates (E_q[w^4] may be infinite when q is narrower than the posterior, where the
      estimator's variance is then infinite). With few draws the bias is systematic, towards a
      NARROW q: the self-normalised weights v put almost all mass on the best draw, and the MC
      estimate never sees the region q misses. Measured: SGD on the linear-Gaussian model
      (Adam 1e-2) with S = 100 lowers log(1 + chi^2) from 0.41 to 0.03, with S = 5 it drives q
      to an infinite chi^2 (NaN); on a small MNIST VAE (IWAE-5 decoder, Adam 1e-3) the encoder
      diverged within 20 steps at S = 5, at K = 100 draws (``encoder_particles``) and after a
      150-step IWAE warm start (``benchmarks/proposals.py``). Use it with large S only.

    With ``freeze_theta=False`` theta is not frozen (``"elbo"``/``"iwae"`` only): the textbook
    VAE / IWAE loss whose one backward pass gives theta and phi together.
    Returns ``(loss, log_w)`` with log_w of shape (B, C, num), the log weights of the draws.
    """
    if not freeze_theta and objective not in ("elbo", "iwae"):
        raise ValueError(f"encoder objective {objective!r} is defined with theta frozen only.")
    if objective == "iwae_dreg":  # log q at the differentiable z, the proposal's params stopped
        z = sample_lanes(model, params, x, keys, num)
        _, lq = eval_lanes(model, params, x, z, proposal_grad=False)
    else:
        z, lq = sample_lanes_with_log_q(model, params, x, keys, num)
    frozen = jax.lax.stop_gradient(params) if freeze_theta else params
    lj = jax.vmap(
        jax.vmap(jax.vmap(lambda xi, zz: model.log_joint(frozen, xi, zz), (None, 0)), (None, 0))
    )(x, z)
    lw = safe_log_weights(lj, lq)
    if objective == "elbo":
        loss = -jnp.mean(lw, axis=-1)
    elif objective == "iwae":
        loss = -log_mean_exp(lw)
    elif objective == "iwae_dreg":
        wbar = jax.lax.stop_gradient(normalized_weights(lw))
        loss = -jnp.sum(jnp.square(wbar) * lw, axis=-1)
    elif objective == "chi2":
        loss = log_mean_exp(2.0 * lw)
    else:  # pragma: no cover - guarded by check_encoder_objective
        raise ValueError(objective)
    return jnp.mean(loss), lw


def encoder_loss_joint(model: LatentVariableModel, params, x, keys, num: int, objective: str):
    """The textbook fused loss: :func:`encoder_loss` with theta not frozen."""
    return encoder_loss(model, params, x, keys, num, objective, freeze_theta=False)


class WorkList:
    """Every example's blocks of work laid end to end, ``per_step`` list positions per loop step.

    Example i owns blocks 0 .. blocks[i] - 1 (its own cost, not the batch's largest): step s runs
    list positions s per_step .. (s + 1) per_step - 1, each an (example, block) pair; positions
    past the end are padding (``valid`` False), evaluated and discarded so that every step has one
    static shape. ``per_step`` None: the batch size, so a batch of one block each takes one step.
    Used by MLMC (2^L blocks of n_0 draws) and SUMO (ceil((m + J) / block_size) blocks).
    """

    def __init__(self, blocks: jax.Array, per_step: int | None = None):
        self.batch = blocks.shape[0]
        per_step = self.batch if per_step is None else per_step
        self.per_step = per_step
        self.blocks = blocks
        self.ends = jnp.cumsum(blocks)
        self.starts = self.ends - blocks
        self.num_steps = (self.ends[-1] + per_step - 1) // per_step

    def positions(self, step):
        """(example, block, valid), each (per_step,), of loop step ``step``'s list positions."""
        p = step * self.per_step + jnp.arange(self.per_step)
        e = jnp.minimum(jnp.searchsorted(self.ends, p, side="right"), self.batch - 1)
        return e, p - self.starts[e], p < self.ends[-1]


def base_info(
    batch_size: int, num_chains: int, bound: jax.Array, num_log_joint_evals: Any, log_weights=None
) -> GradientInfo:
    """The info dict every estimator returns (zeros where a field has no meaning for it).

    ``log_weights`` (B, C, S): the log importance weights of the initial draws; they give the
    per-example ``ess``, ``log1p_chi2`` and ``log_weight_std`` of :mod:`vaeml_jax.diagnostics`
    (averaged over chains), NaN when None (the estimator has no such draws).
    """
    zeros = jnp.zeros((batch_size, num_chains), jnp.int32)
    if log_weights is None:
        nan = jnp.full((batch_size,), jnp.nan, jnp.float32)
        diag = diagnostics.ImportanceDiagnostics(nan, nan, nan)
    else:
        per_lane = diagnostics.importance_diagnostics(jax.lax.stop_gradient(log_weights))
        diag = jax.tree.map(lambda a: jnp.mean(a, axis=-1).astype(jnp.float32), per_lane)
    return GradientInfo(
        meeting_time=zeros,
        num_iters=zeros,
        capped=jnp.zeros((batch_size, num_chains), bool),
        num_log_joint_evals=jnp.asarray(num_log_joint_evals, jnp.int32),
        bound=bound,
        ess=diag.ess,
        log1p_chi2=diag.log1p_chi2,
        log_weight_std=diag.log_weight_std,
    )


@dataclasses.dataclass(frozen=True)
class GradientEstimator:
    """A gradient estimator: ``grads, info = estimator(params, x, key)``, a :class:`LossGradient`.

    ``params`` is the model's parameter pytree, ``x`` a batch (B, ...), ``key`` ONE
    ``jax.random.key`` (the estimator splits it per example and chain): data first, then the key.

    ``with_lane_keys(params, x, keys)`` is the same computation given one key per (example, chain),
    shape (B, num_chains): the randomness of an example then does not depend on where it sits in
    the batch, which is what data-parallel sharding (vaeml_jax.distributed) relies on.
    """

    name: str
    num_chains: int
    with_lane_keys: Callable[[Params, jax.Array, jax.Array], LossGradient]
    model: LatentVariableModel

    def __call__(self, params: Params, x: jax.Array, key: jax.Array) -> LossGradient:
        check_batch(self.model, params, x)
        keys = lane_keys(as_key(key), x.shape[0], self.num_chains)
        return self.with_lane_keys(params, x, keys)
