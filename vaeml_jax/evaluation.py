r"""Held-out log-likelihood: importance sampling (the literature's protocol) and annealed IS.

Both estimators use only a :class:`~vaeml_jax.LatentVariableModel` (no Flax), work per example,
and are stochastic LOWER bounds of log p(x) in expectation: each averages weights w with
E[w] = p(x) and takes the log, so by Jensen E[log mean w] <= log p(x). Higher is better, and the
tighter of two estimates is the better one.

* :func:`importance_log_likelihood`: the protocol of Burda, Grosse & Salakhutdinov (2016),

      log p(x) ~= log (1/K) sum_{k=1}^K p(x, z_k) / q(z_k | x),   z_k ~ q(z | x),   K = 5000,

  streamed over chunks of ``chunk_size`` samples with a running (max, sum) logsumexp, so memory is
  O(batch_size * chunk_size) latents whatever K, and float32 is safe for log weights of any size.
* :func:`elbo`: (1/K) sum_k log p(x, z_k) / q(z_k | x), the same draws' plain average of logs.
* :func:`ais_log_likelihood`: annealed importance sampling (Neal 2001; Wu, Burda, Salakhutdinov &
  Grosse 2017, "On the quantitative analysis of decoder-based generative models") from q(z|x) to
  p(z|x) along log f_b(z) = (1 - b) log q(z|x) + b log p(x, z) with HMC transitions.
* :func:`evaluate`: either estimator plus the ELBO, as a dict for ``eval.json``.

Randomness (what does and does not change a result for a fixed ``key``):

* example n uses ``jax.random.split(key, N)[n]``, so an estimate does not depend on
  ``batch_size`` or on the example's neighbours in a batch (only on N and n);
* IS/ELBO sample k of an example is ``sample_proposal(params, x, fold_in(example_key, k), 1)``:
  which latents are drawn does not depend on ``chunk_size`` either, so chunked and one-chunk
  estimates agree up to float rounding of the sums. And K = 1 IS equals the 1-sample ELBO exactly.

The Python functions loop over batches of examples (padding the last one by repeating its first
example; padded results are dropped); each batch is ONE jitted call, with the model and all sizes
static and ``params`` traced (changing params, e.g. every epoch during training, does not
recompile). :func:`ais_log_weights_batch` is the jit-able AIS core for callers that want their
own loop.

Data parallel: with ``mesh=`` (a :func:`vaeml_jax.distributed.make_mesh` mesh, over the devices of
one or several processes) every batch is split over the mesh's devices with
:func:`jax.shard_map` (the batch size is rounded up to a multiple of the device count); the loop
over batches stays on the host, in every process, and the per-example results are gathered to
every process. Since example n's randomness depends only on (key, N, n), the estimate is the same
on any number of devices and processes, up to float rounding. With several processes, every
process calls the function with the same arguments.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.sharding import PartitionSpec

from vaeml_jax import distributed
from vaeml_jax.estimators._common import as_key, check_int
from vaeml_jax.models.interface import (
    LatentVariableModel,
    check_batch,
    check_model,
    sample_and_log_proposal,
)

__all__ = [
    "importance_log_likelihood",
    "elbo",
    "ais_log_likelihood",
    "ais_log_weights",
    "ais_log_weights_batch",
    "ais_num_log_joint_evals",
    "annealing_schedule",
    "evaluate",
]

Array = jax.Array
SCHEDULES = ("sigmoid", "linear")
METHODS = ("is", "ais")
AIS_OPTIONS = (
    "num_steps",
    "num_chains",
    "leapfrog_steps",
    "step_size",
    "schedule",
    "adapt_chains",
    "target_accept",
    "adapt_rate",
)


# --------------------------------------------------------------------------- argument checks


def _check_positive(name: str, value) -> int:
    return check_int(name, value, 1)


def _check_float(name: str, value, lo: float, hi: float = math.inf) -> float:
    """A real number in the open interval (lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not (math.isfinite(value) and lo < value < hi):
        raise ValueError(f"{name} must be finite and in ({lo}, {hi}), got {value}.")
    return value


def _prepare(model, params, x, key):
    """Validate (model, x, key) at the boundary; returns (x as a jax array, one PRNG key)."""
    check_model(model)
    try:
        hash(model)
    except TypeError as e:  # the model is a static argument of the jitted batch functions
        raise TypeError(
            f"the model's functions must be hashable (plain functions or bound methods): {e}"
        ) from e
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            "the evaluation functions loop over batches in Python and cannot be traced; call "
            "them outside jit (ais_log_weights_batch is the jit-able AIS core)."
        )
    if x.ndim < 2:
        raise ValueError(
            f"x must have shape (N, *example_shape) with a leading example axis, got shape "
            f"{x.shape}; for ONE example pass x[None]."
        )
    if x.shape[0] < 1:
        raise ValueError(f"x holds no examples (shape {x.shape}).")
    # finite values and the model functions' shapes, with the failing function named
    _, latent_dtype = check_batch(model, params, x)
    return jnp.asarray(x), as_key(key), latent_dtype


def _batched(fn, x, keys, batch_size: int, mesh=None, on_batch=None) -> Array:
    """``fn(x_batch, keys_batch) -> (b, ...)`` over padded batches of ``batch_size``; (N, ...).

    With a ``mesh``, ``fn`` is an :func:`_over_mesh` function: each batch (``batch_size`` rounded
    up to a multiple of the device count) is split over the mesh, the results gathered at the end.
    ``on_batch(n)``: called on the host once each batch has finished, with its number of real
    (unpadded) examples, e.g. to advance a progress bar.
    """
    n = x.shape[0]
    batch_size = min(batch_size, n)
    if mesh is not None:
        devices = distributed.num_devices(mesh)
        batch_size = -(-batch_size // devices) * devices
    pad = (-n) % batch_size
    if pad:  # repeat the first example of the tail; its results are dropped below
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)])
    starts = range(0, n + pad, batch_size)

    def done(o, s):
        if on_batch is not None:
            jax.block_until_ready(o)
            on_batch(min(batch_size, n - s))
        return o

    if mesh is None:
        out = [done(fn(x[s : s + batch_size], keys[s : s + batch_size]), s) for s in starts]
        return jnp.concatenate(out)[:n]
    key_data = jax.random.key_data(keys)
    out = []
    for s in starts:  # one batch over all devices at a time
        xb = distributed.shard_batch(x[s : s + batch_size], mesh)
        kb = distributed.shard_batch(key_data[s : s + batch_size], mesh)
        out.append(done(fn(xb, kb), s))
    return jnp.asarray(np.concatenate([distributed.to_host(o) for o in out])[:n])


def _over_mesh(batch_fn, model, params, keys, mesh, *consts, **static):
    """``batch_fn(model, params, x, keys, *consts, **static)`` as ``f(x, key_data)`` with x and the
    keys' data sharded over ``mesh`` (shard_map; params and consts replicated)."""
    run = _shard_mapped(
        batch_fn, model, mesh, jax.random.key_impl(keys), len(consts), tuple(sorted(static.items()))
    )
    params, consts = distributed.replicate((params, consts), mesh)
    return lambda xb, kb: run(params, xb, kb, *consts)


@functools.lru_cache(maxsize=32)
def _shard_mapped(batch_fn, model, mesh, impl, num_consts: int, static: tuple):
    """Jitted shard_map of ``batch_fn``; cached, so a new ``params`` (every epoch's in-training
    evaluation) does not recompile."""
    batch = PartitionSpec(distributed.BATCH_AXIS)

    def local(params, xb, kb, *consts):
        keys = jax.random.wrap_key_data(kb, impl=impl)
        return batch_fn(model, params, xb, keys, *consts, **dict(static))

    return jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), batch, batch, *[PartitionSpec()] * num_consts),
            out_specs=batch,
            check_vma=False,
        )
    )


def _sampled_log_w(model, params, xi, key, idx):
    """log w_k = log p(x, z_k) - log q(z_k | x) at z_k = sample_proposal(params, x,
    fold_in(key, k), 1)[0] for k in idx: (len,); NaN mapped to -inf (weight zero).

    log q comes with the draw when the model has ``sample_with_log_proposal`` (no flow inversion
    for an IAF), else from ``log_proposal``.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    z, lq = jax.vmap(lambda k: sample_and_log_proposal(model, params, xi, k, 1))(keys)
    z, lq = z[:, 0], lq[:, 0]
    lw = jax.vmap(model.log_joint, (None, None, 0))(params, xi, z) - lq
    return jnp.where(jnp.isnan(lw), -jnp.inf, lw)


# --------------------------------------------------------------------------- importance sampling


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "chunk_size"))
def _is_batch(model, params, x, keys, num_samples: int, chunk_size: int) -> Array:
    num_chunks = -(-num_samples // chunk_size)
    idx0 = jnp.arange(1)

    def one(xi, ki):
        def body(carry, c):
            run_max, run_sum = carry  # log sum_k w_k = run_max + log run_sum
            idx = c * chunk_size + jnp.arange(chunk_size)
            lw = _sampled_log_w(model, params, xi, ki, idx)
            lw = jnp.where(idx < num_samples, lw, -jnp.inf)  # the last chunk may overhang K
            new_max = jnp.maximum(run_max, jnp.max(lw))
            safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # all -inf so far: no rescale
            run_sum = run_sum * jnp.exp(run_max - safe) + jnp.sum(jnp.exp(lw - safe))
            return (new_max, run_sum), None

        dtype = jax.eval_shape(lambda: _sampled_log_w(model, params, xi, ki, idx0)).dtype
        init = (jnp.asarray(-jnp.inf, dtype), jnp.asarray(0.0, dtype))
        (m, s), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
        return m + jnp.log(s) - math.log(num_samples)

    return jax.vmap(one)(x, keys)


def importance_log_likelihood(
    model: LatentVariableModel,
    params: Any,
    x: Any,
    key: Array,
    *,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    mesh: jax.sharding.Mesh | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Array:
    r"""Per-example IS estimate log (1/K) \sum_k w_k, w_k = p(x, z_k) / q(z_k | x), z_k ~ q(z|x).

    Burda et al. (2016)'s test log-likelihood with K = ``num_samples``: a stochastic lower bound of
    log p(x) (E over the draws <= log p(x)), tightening monotonically in expectation as K grows
    (Burda et al., Theorem 1); K = 1 is the one-sample ELBO.

    Args:
      model, params: the model and its parameters.
      x: ``(N, *example_shape)`` examples, N arbitrary (the last batch is padded, nothing dropped).
      key: a PRNG key; example n uses ``split(key, N)[n]``, its sample k ``fold_in(that, k)``.
      num_samples: K.
      chunk_size: samples evaluated at once per example; memory ~ batch_size * chunk_size
        latents and decoder outputs. Does not change which samples are drawn.
      batch_size: examples per jitted call.
      mesh: split every batch over this mesh's devices (see the module docstring); None: one
        device.
      on_batch: called on the host after each batch with its number of examples (progress).
    Returns:
      (N,) estimates in nats (float of the model's log densities; float32 is exact enough: the
      running logsumexp never exponentiates a positive number).
    """
    num_samples = _check_positive("num_samples", num_samples)
    chunk_size = min(_check_positive("chunk_size", chunk_size), num_samples)
    batch_size = _check_positive("batch_size", batch_size)
    x, key, _ = _prepare(model, params, x, key)
    keys = jax.random.split(key, x.shape[0])
    static = dict(num_samples=num_samples, chunk_size=chunk_size)
    if mesh is None:
        fn = functools.partial(_is_batch, model, params, **static)
    else:
        fn = _over_mesh(_is_batch, model, params, keys, mesh, **static)
    return _batched(fn, x, keys, batch_size, mesh, on_batch)


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def _elbo_batch(model, params, x, keys, num_samples: int) -> Array:
    def one(xi, ki):
        idx = jnp.arange(num_samples)
        return jnp.mean(_sampled_log_w(model, params, xi, ki, idx))

    return jax.vmap(one)(x, keys)


def elbo(
    model: LatentVariableModel,
    params: Any,
    x: Any,
    key: Array,
    *,
    num_samples: int = 1,
    batch_size: int = 100,
    mesh: jax.sharding.Mesh | None = None,
) -> Array:
    r"""Per-example ELBO estimate (1/K) \sum_k log p(x, z_k) / q(z_k | x), z_k ~ q(z|x).

    Unbiased for ELBO(x) = E_q[log p(x, z) - log q(z|x)] <= log p(x). Draws exactly as
    :func:`importance_log_likelihood` does (same key, same z_k), so for one sample the two agree;
    ``mesh`` as there. Returns (N,) values in nats.
    """
    num_samples = _check_positive("num_samples", num_samples)
    batch_size = _check_positive("batch_size", batch_size)
    x, key, _ = _prepare(model, params, x, key)
    keys = jax.random.split(key, x.shape[0])
    if mesh is None:
        fn = functools.partial(_elbo_batch, model, params, num_samples=num_samples)
    else:
        fn = _over_mesh(_elbo_batch, model, params, keys, mesh, num_samples=num_samples)
    return _batched(fn, x, keys, batch_size, mesh)


# --------------------------------------------------------------------------- AIS


def annealing_schedule(num_steps: int, schedule: str = "sigmoid", delta: float = 4.0) -> np.ndarray:
    r"""Inverse temperatures 0 = b_0 < b_1 < ... < b_T = 1, T = ``num_steps``, float64 numpy.

    ``"sigmoid"``: b_t proportional to sigmoid(-delta + 2 delta t / T), shifted and rescaled to
    [0, 1] (Grosse, Maddison & Salakhutdinov 2013; the schedule of Wu et al. 2017): dense at both
    ends, where f_b changes fastest relative to its neighbours. ``"linear"``: b_t = t / T.
    """
    num_steps = _check_positive("num_steps", num_steps)
    if schedule == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-np.linspace(-delta, delta, num_steps + 1)))
        b = (s - s[0]) / (s[-1] - s[0])
    elif schedule == "linear":
        b = np.linspace(0.0, 1.0, num_steps + 1)
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
    b[0], b[-1] = 0.0, 1.0
    return b


def ais_num_log_joint_evals(
    num_steps: int = 500, num_chains: int = 16, leapfrog_steps: int = 10, adapt_chains: int = 4
) -> int:
    """log_joint evaluations (each with its z-gradient) per example of :func:`ais_log_likelihood`.

    Per chain: 1 at z_0, then ``leapfrog_steps`` per transition, T - 1 transitions (none at
    b_T = 1: it would not change the weight); the step-size pilot adds the same for its
    ``adapt_chains`` chains. log_proposal is evaluated (with its gradient) as often.
    """
    per_chain = 1 + (num_steps - 1) * leapfrog_steps
    return (num_chains + adapt_chains) * per_chain


def _value_and_grads(model, params, xi, shape):
    """zf (flat latent) -> (log p(x, z), log q(z|x), their z-gradients (flat))."""

    def lj(zf):
        return model.log_joint(params, xi, zf.reshape(shape))

    def lq(zf):
        return model.log_proposal(params, xi, zf.reshape(shape))

    def vg(zf):
        a, ga = jax.value_and_grad(lj)(zf)
        b, gb = jax.value_and_grad(lq)(zf)
        return a, b, ga, gb

    return vg


def _ais_chains(
    model,
    params,
    xi,
    key,
    betas,
    eps,
    *,
    num_chains,
    leapfrog_steps,
    adapt,
    target_accept,
    adapt_rate,
):
    """AIS for one example: (C,) log weights and the (T-1,) step sizes used.

    ``adapt=False``: ``eps`` is the (T-1,) step-size schedule, fixed in advance.
    ``adapt=True``: ``eps`` is the initial step size; after the transition at b_t,
    log eps += adapt_rate * (mean over chains of the acceptance probability - target_accept).
    """
    k0, kloop = jax.random.split(key)
    z0 = model.sample_proposal(params, xi, k0, num_chains)
    shape = z0.shape[1:]
    zf = z0.reshape(num_chains, -1)
    vg = jax.vmap(_value_and_grads(model, params, xi, shape))
    num_transitions = betas.shape[0] - 2

    def transition(state, beta, step, k):
        """One HMC transition leaving f_beta invariant, for all chains at once."""
        z, lj, lq, glj, glq = state
        kp, ku = jax.random.split(k)
        p0 = jax.random.normal(kp, z.shape, z.dtype)
        step = step.astype(z.dtype)

        def grad_f(glj_, glq_):
            return beta * glj_ + (1.0 - beta) * glq_

        def leap(carry, _):
            z_, p, _lj, _lq, glj_, glq_ = carry
            p = p + 0.5 * step * grad_f(glj_, glq_)
            z_ = z_ + step * p
            lj_, lq_, glj_, glq_ = vg(z_)
            p = p + 0.5 * step * grad_f(glj_, glq_)
            return (z_, p, lj_, lq_, glj_, glq_), None

        (z1, p1, lj1, lq1, glj1, glq1), _ = jax.lax.scan(
            leap, (z, p0, lj, lq, glj, glq), None, length=leapfrog_steps
        )
        h0 = -(beta * lj + (1.0 - beta) * lq) + 0.5 * jnp.sum(p0**2, -1)
        h1 = -(beta * lj1 + (1.0 - beta) * lq1) + 0.5 * jnp.sum(p1**2, -1)
        log_acc = h0 - h1
        log_acc = jnp.where(jnp.isfinite(h1) & ~jnp.isnan(log_acc), log_acc, -jnp.inf)  # reject
        accept = jnp.log(jax.random.uniform(ku, log_acc.shape, z.dtype)) < log_acc
        acc_prob = jnp.exp(jnp.minimum(log_acc, 0.0))

        def sel(new, old):
            a = accept.reshape(accept.shape + (1,) * (new.ndim - 1))
            return jnp.where(a, new, old)

        new = tuple(map(sel, (z1, lj1, lq1, glj1, glq1), state))
        return new, acc_prob

    def body(carry, inp):
        state, logw, log_eps = carry
        t, eps_t = inp
        _, lj, lq, _, _ = state
        logw = logw + (betas[t] - betas[t - 1]) * (lj - lq)
        step = jnp.exp(log_eps) if adapt else eps_t
        state, acc_prob = transition(state, betas[t], step, jax.random.fold_in(kloop, t))
        if adapt:
            log_eps = log_eps + adapt_rate * (jnp.mean(acc_prob) - target_accept)
        return (state, logw, log_eps), step

    lj0, lq0, glj0, glq0 = vg(zf)
    state = (zf, lj0, lq0, glj0, glq0)
    dtype = lj0.dtype
    logw = jnp.zeros(num_chains, dtype)
    if adapt:
        log_eps0, xs_eps = jnp.log(jnp.asarray(eps, dtype)), jnp.zeros(num_transitions, dtype)
    else:
        log_eps0, xs_eps = jnp.zeros((), dtype), eps.astype(dtype)
    (state, logw, _), used = jax.lax.scan(
        body, (state, logw, log_eps0), (jnp.arange(1, num_transitions + 1), xs_eps)
    )
    _, lj, lq, _, _ = state
    logw = logw + (betas[-1] - betas[-2]) * (lj - lq)
    return jnp.where(jnp.isnan(logw), -jnp.inf, logw), used


@functools.partial(
    jax.jit,
    static_argnames=(
        "model",
        "num_chains",
        "leapfrog_steps",
        "adapt_chains",
        "target_accept",
        "adapt_rate",
    ),
)
def ais_log_weights_batch(
    model: LatentVariableModel,
    params: Any,
    x: Array,
    keys: Array,
    betas: Array,
    step_size: float | Array,
    *,
    num_chains: int,
    leapfrog_steps: int,
    adapt_chains: int,
    target_accept: float = 0.65,
    adapt_rate: float = 0.25,
) -> tuple[Array, Array]:
    """The jit-able AIS core: (B, C) log weights and (B, T-1) step sizes, one key per example.

    See :func:`ais_log_likelihood` for the algorithm; ``keys`` is (B,) PRNG keys, ``betas`` the
    (T+1,) temperatures. With ``adapt_chains`` > 0 the step sizes come from a pilot run on the
    key's first half and the weights from the run on its second half.
    """
    num_transitions = betas.shape[0] - 2
    common = dict(leapfrog_steps=leapfrog_steps, target_accept=target_accept, adapt_rate=adapt_rate)

    def one(xi, ki):
        k_pilot, k_main = jax.random.split(ki)
        if adapt_chains > 0:
            _, eps = _ais_chains(
                model,
                params,
                xi,
                k_pilot,
                betas,
                step_size,
                num_chains=adapt_chains,
                adapt=True,
                **common,
            )
        else:
            eps = jnp.full((num_transitions,), step_size)
        return _ais_chains(
            model, params, xi, k_main, betas, eps, num_chains=num_chains, adapt=False, **common
        )

    return jax.vmap(one)(x, keys)


def ais_log_weights(
    model: LatentVariableModel,
    params: Any,
    x: Any,
    key: Array,
    *,
    num_steps: int = 500,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    batch_size: int = 100,
    schedule: str = "sigmoid",
    adapt_chains: int = 4,
    target_accept: float = 0.65,
    adapt_rate: float = 0.25,
    mesh: jax.sharding.Mesh | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Array:
    """(N, num_chains) AIS log weights log w_c of :func:`ais_log_likelihood` (same arguments).

    E[w_c] = p(x) for every chain; the chains of one example are independent given the step-size
    schedule. Useful to judge an estimate: the spread of log w_c over chains tells how far
    log mean_c w_c may sit below log p(x) (about Var(log w) / (2C) when that variance is small).
    """
    num_steps = _check_positive("num_steps", num_steps)
    num_chains = _check_positive("num_chains", num_chains)
    leapfrog_steps = _check_positive("leapfrog_steps", leapfrog_steps)
    batch_size = _check_positive("batch_size", batch_size)
    adapt_chains = check_int("adapt_chains", adapt_chains, 0)
    step_size = _check_float("step_size", step_size, 0.0)
    target_accept = _check_float("target_accept", target_accept, 0.0, 1.0)
    adapt_rate = _check_float("adapt_rate", adapt_rate, 0.0)
    schedule_betas = annealing_schedule(num_steps, schedule)
    x, key, latent_dtype = _prepare(model, params, x, key)
    betas = jnp.asarray(schedule_betas, latent_dtype)
    if num_steps == 1:
        adapt_chains = 0  # no transitions: plain IS with num_chains samples, nothing to adapt
    keys = jax.random.split(key, x.shape[0])
    if mesh is not None:
        static = dict(
            num_chains=num_chains,
            leapfrog_steps=leapfrog_steps,
            adapt_chains=adapt_chains,
            target_accept=target_accept,
            adapt_rate=adapt_rate,
        )
        consts = (betas, jnp.asarray(step_size))
        run = _over_mesh(ais_log_weights_batch, model, params, keys, mesh, *consts, **static)
        return _batched(lambda xb, kb: run(xb, kb)[0], x, keys, batch_size, mesh, on_batch)

    def fn(xb, kb):
        logw, _ = ais_log_weights_batch(
            model,
            params,
            xb,
            kb,
            betas,
            step_size,
            num_chains=num_chains,
            leapfrog_steps=leapfrog_steps,
            adapt_chains=adapt_chains,
            target_accept=target_accept,
            adapt_rate=adapt_rate,
        )
        return logw

    return _batched(fn, x, keys, batch_size, on_batch=on_batch)


def ais_log_likelihood(
    model: LatentVariableModel,
    params: Any,
    x: Any,
    key: Array,
    *,
    num_steps: int = 500,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    batch_size: int = 100,
    schedule: str = "sigmoid",
    adapt_chains: int = 4,
    target_accept: float = 0.65,
    adapt_rate: float = 0.25,
    mesh: jax.sharding.Mesh | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Array:
    r"""Per-example AIS estimate of log p(x), annealing from q(z|x) to p(z|x) with HMC.

    Algorithm (Neal 2001; Wu et al. 2017, Sec. 3), per example and for each of C = ``num_chains``
    independent chains, with temperatures 0 = b_0 < ... < b_T = 1 (:func:`annealing_schedule`,
    T = ``num_steps``) and log f_b(z) = (1 - b) log q(z|x) + b log p(x, z)::

        z_0 ~ q(z|x),  log w = 0
        for t = 1..T:  log w += (b_t - b_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1}|x)]
                       z_t = HMC_{f_{b_t}}(z_{t-1})       (for t < T; at t = T it is not needed)

    Then E[w_c] = Z_T / Z_0 = p(x) (f_0 = q is normalised), and the estimate
    log (1/C) sum_c w_c is a stochastic lower bound of log p(x), tight as T grows.

    HMC transition: identity mass matrix, fresh momentum p ~ N(0, I), ``leapfrog_steps`` leapfrog
    steps on log f_b with z-gradients by ``jax.grad`` (carried between steps: one gradient of
    log p and of log q per leapfrog step), Metropolis accept/reject on the Hamiltonian (a
    non-finite end point is rejected).

    Step-size adaptation (toward acceptance ``target_accept``, 0.65 by default): a PILOT AIS run
    of ``adapt_chains`` chains, on independent randomness, starts at ``step_size`` and after the
    transition at each b_t updates log eps += ``adapt_rate`` * (mean acceptance probability of its
    chains - target_accept); this Robbins-Monro-style rule has its fixed point at the target rate
    and tracks it as b moves. The step sizes it used, eps_1..eps_{T-1} (one per temperature, per
    example), are then FIXED for the C measured chains. Unlike adapting inside the measured chains
    (Wu et al.'s code, which adapts on the fly), this keeps every transition a fixed
    f_{b_t}-invariant kernel, so E[w_c] = p(x) holds exactly. ``adapt_chains=0`` turns adaptation
    off (eps = ``step_size`` throughout).

    Cost per example: :func:`ais_num_log_joint_evals` evaluations of log p (and of log q), each
    with its gradient. Everything runs in ``lax.scan`` loops, vmapped over chains and examples.

    Args:
      model, params, x, key, batch_size: as in :func:`importance_log_likelihood`.
      num_steps: T, the number of temperatures after b_0.
      num_chains: C, independent AIS chains per example, combined by logmeanexp.
      leapfrog_steps, step_size: HMC settings (step_size: the initial/fixed step size).
      schedule: ``"sigmoid"`` or ``"linear"``.
      adapt_chains, target_accept, adapt_rate: the step-size pilot described above.
      mesh: split every batch over this mesh's devices (see the module docstring).
      on_batch: called on the host after each batch with its number of examples (progress).
    Returns:
      (N,) estimates in nats.
    """
    logw = ais_log_weights(
        model,
        params,
        x,
        key,
        num_steps=num_steps,
        num_chains=num_chains,
        leapfrog_steps=leapfrog_steps,
        step_size=step_size,
        batch_size=batch_size,
        schedule=schedule,
        adapt_chains=adapt_chains,
        target_accept=target_accept,
        adapt_rate=adapt_rate,
        mesh=mesh,
        on_batch=on_batch,
    )
    return logsumexp(logw, axis=1) - math.log(logw.shape[1])


# --------------------------------------------------------------------------- evaluate


def evaluate(
    model: LatentVariableModel,
    params: Any,
    x: Any,
    key: Array,
    *,
    method: str = "is",
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    elbo_samples: int = 10,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
    **ais_kwargs,
) -> dict:
    """Test log-likelihood (``method`` "is" or "ais") and test ELBO, as a dict for eval.json.

    ``key`` is split in two: the log-likelihood estimator gets the first half, the ELBO (with
    ``elbo_samples`` draws per example) the second. ``num_samples`` and ``chunk_size`` are the IS
    settings; with ``method="ais"`` they are not used and ``ais_kwargs`` (any of
    ``AIS_OPTIONS``) go to :func:`ais_log_likelihood`. ``mesh``: split every batch of examples
    over this mesh's devices, of one or several processes (see the module docstring); the result
    is the same as on one device up to float rounding. ``progress(n)`` is called on the host as
    each batch of the log-likelihood estimator finishes, with its number of examples (the ELBO
    pass that follows is cheap and not reported).

    Returns:
      ``{"method", "test_log_likelihood", "test_log_likelihood_stderr", "test_elbo",
      "test_elbo_stderr", "num_examples", "num_samples", "seconds", "per_example",
      "elbo_samples", "num_log_joint_evals_per_example"}`` plus ``"ais"`` (the AIS settings) for
      AIS. Values in nats per example, higher is better; standard errors are std / sqrt(N) over
      examples (sampling error of the test-set mean; the estimator's own bias is not in them).
      ``num_samples`` is K for IS and the number of chains for AIS; ``per_example`` is an (N,)
      float64 numpy array; ``seconds`` covers both estimators (including compilation).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    unknown = sorted(set(ais_kwargs) - set(AIS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown evaluate() options {unknown}; AIS options are {AIS_OPTIONS}.")
    if method == "is" and ais_kwargs:
        raise ValueError(
            f"AIS options {sorted(ais_kwargs)} were given with method='is'; pass method='ais'."
        )
    elbo_samples = _check_positive("elbo_samples", elbo_samples)
    x, key, _ = _prepare(model, params, x, key)
    t0 = time.perf_counter()
    key_ll, key_elbo = jax.random.split(key)
    extra: dict = {}
    per_example: Array | np.ndarray  # on device, then on host as float64
    if method == "is":
        per_example = importance_log_likelihood(
            model,
            params,
            x,
            key_ll,
            num_samples=num_samples,
            chunk_size=chunk_size,
            batch_size=batch_size,
            mesh=mesh,
            on_batch=progress,
        )
        k_used, evals = int(num_samples), int(num_samples)
    else:
        per_example = ais_log_likelihood(
            model,
            params,
            x,
            key_ll,
            batch_size=batch_size,
            mesh=mesh,
            on_batch=progress,
            **ais_kwargs,
        )
        kwdefaults = ais_log_likelihood.__kwdefaults__
        assert kwdefaults is not None  # its options are keyword-only, with defaults
        defaults = {n: kwdefaults[n] for n in AIS_OPTIONS}
        settings = {**defaults, **ais_kwargs}
        k_used = int(settings["num_chains"])
        evals = ais_num_log_joint_evals(
            settings["num_steps"],
            settings["num_chains"],
            settings["leapfrog_steps"],
            settings["adapt_chains"] if settings["num_steps"] > 1 else 0,
        )
        extra["ais"] = settings
    elbos: Array | np.ndarray = elbo(
        model, params, x, key_elbo, num_samples=elbo_samples, batch_size=batch_size, mesh=mesh
    )
    per_example = np.asarray(per_example, np.float64)
    elbos = np.asarray(elbos, np.float64)
    seconds = time.perf_counter() - t0
    n = per_example.shape[0]
    return {
        "method": method,
        "test_log_likelihood": float(np.mean(per_example)),
        "test_log_likelihood_stderr": float(np.std(per_example) / math.sqrt(n)),
        "test_elbo": float(np.mean(elbos)),
        "test_elbo_stderr": float(np.std(elbos) / math.sqrt(n)),
        "num_examples": int(n),
        "num_samples": k_used,
        "seconds": seconds,
        "per_example": per_example,
        "elbo_samples": elbo_samples,
        "num_log_joint_evals_per_example": int(evals),
        **extra,
    }
