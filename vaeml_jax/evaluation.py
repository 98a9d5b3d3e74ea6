r"""Held-out log-likelihood: importance sampling (the literature's protocol) and annealed IS.

Both estimators are model-agnostic (they use only a :class:`~vaeml_jax.LatentVariableModel`),
per example, and stochastic LOWER bounds of log p(x) in expectation (Jensen), so higher is
better and the tighter of two is the better estimate.

* :func:`importance_log_likelihood`: log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z|x), K = 5000
  by default (Burda et al. 2016), streamed over chunks of K with a running logsumexp so memory is
  O(batch * chunk) whatever K.
* :func:`ais_log_likelihood`: annealed importance sampling (Neal 2001; Wu et al. 2017, "On the
  quantitative analysis of decoder-based generative models") from q(z|x) to p(z|x) through
  f_b(z) = q(z|x)^{1-b} p(x, z)^b with HMC transitions.

Randomness: every example gets its own key, ``jax.random.split(key, N)[n]``, so a result does not
depend on ``batch_size`` or on the example's neighbours. For IS, chunk c of an example draws with
``fold_in(example_key, c)``: changing ``chunk_size`` changes which draws are made (not their law).
"""

from __future__ import annotations

import math
import numbers
import time

import jax
import jax.numpy as jnp
import numpy as np

from vaeml_jax.model import LatentVariableModel

__all__ = [
    "importance_log_likelihood",
    "elbo",
    "ais_log_likelihood",
    "sigmoid_schedule",
    "evaluate",
]


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _check_x(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, ...) with a leading example axis, got {x.shape}.")
    if x.shape[0] < 1:
        raise ValueError("x holds no examples.")
    if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("x contains NaN or inf values; the evaluation would be meaningless.")
    return x


def _batched(fn, x, keys, batch_size):
    """Apply jitted ``fn(x_batch, keys_batch) -> (b,)`` over padded batches; returns (N,) numpy."""
    n = x.shape[0]
    batch_size = min(batch_size, n)
    pad = (-n) % batch_size
    if pad:  # repeat the first example; its results are dropped
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)])
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)])
    out = []
    for start in range(0, n + pad, batch_size):
        out.append(np.asarray(fn(x[start : start + batch_size], keys[start : start + batch_size])))
    return np.concatenate(out)[:n]


def importance_log_likelihood(
    model: LatentVariableModel,
    params,
    x,
    key,
    *,
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
) -> np.ndarray:
    r"""Per-example IS estimate log (1/K) \sum_k w_k, w_k = p(x, z_k)/q(z_k|x), z_k ~ q(z|x).

    Args:
      model, params: the model and its parameters.
      x: (N, ...) examples (N arbitrary: the last batch is padded, nothing is dropped).
      key: a PRNG key.
      num_samples: K.
      chunk_size: samples drawn at once per example (memory ~ batch_size * chunk_size latents).
      batch_size: examples per jitted call.
    Returns:
      (N,) float numpy array of estimates in nats.
    """
    num_samples = _check_positive("num_samples", num_samples)
    chunk = min(_check_positive("chunk_size", chunk_size), num_samples)
    batch_size = _check_positive("batch_size", batch_size)
    x = jnp.asarray(_check_x(x))
    num_chunks = -(-num_samples // chunk)

    def one(xi, ki):
        def body(carry, c):
            run_max, run_sum = carry
            z = model.sample_proposal(params, xi, jax.random.fold_in(ki, c), chunk)
            lj = jax.vmap(model.log_joint, (None, None, 0))(params, xi, z)
            lq = jax.vmap(model.log_proposal, (None, None, 0))(params, xi, z)
            lw = lj - lq
            valid = c * chunk + jnp.arange(chunk) < num_samples  # the last chunk may overhang K
            lw = jnp.where(valid & ~jnp.isnan(lw), lw, -jnp.inf)
            new_max = jnp.maximum(run_max, jnp.max(lw))
            safe = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            run_sum = run_sum * jnp.exp(run_max - safe) + jnp.sum(jnp.exp(lw - safe))
            return (new_max, run_sum), None

        dtype = jnp.result_type(float)
        init = (jnp.asarray(-jnp.inf, dtype), jnp.asarray(0.0, dtype))
        (m, s), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
        return m + jnp.log(s) - math.log(num_samples)

    fn = jax.jit(jax.vmap(one))
    keys = jax.random.split(key, x.shape[0])
    return _batched(fn, x, keys, batch_size)


def elbo(
    model: LatentVariableModel, params, x, key, *, num_samples: int = 1, batch_size: int = 100
) -> np.ndarray:
    """Per-example ELBO estimate, mean_k log w_k over ``num_samples`` draws z_k ~ q(z|x)."""
    num_samples = _check_positive("num_samples", num_samples)
    batch_size = _check_positive("batch_size", batch_size)
    x = jnp.asarray(_check_x(x))

    def one(xi, ki):
        z = model.sample_proposal(params, xi, ki, num_samples)
        lj = jax.vmap(model.log_joint, (None, None, 0))(params, xi, z)
        lq = jax.vmap(model.log_proposal, (None, None, 0))(params, xi, z)
        return jnp.mean(lj - lq)

    keys = jax.random.split(jax.random.fold_in(key, 1), x.shape[0])
    return _batched(jax.jit(jax.vmap(one)), x, keys, batch_size)


def sigmoid_schedule(num_steps: int, delta: float = 4.0) -> np.ndarray:
    """Inverse temperatures 0 = b_0 < ... < b_T = 1 (Grosse et al. 2015's sigmoid schedule)."""
    t = np.linspace(-delta, delta, num_steps + 1)
    s = 1.0 / (1.0 + np.exp(-t))
    return (s - s[0]) / (s[-1] - s[0])


def ais_log_likelihood(
    model: LatentVariableModel,
    params,
    x,
    key,
    *,
    num_steps: int = 500,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    step_size: float = 0.05,
    batch_size: int = 100,
    target_accept: float = 0.65,
) -> np.ndarray:
    r"""Per-example AIS estimate of log p(x), annealing from q(z|x) to p(z|x) with HMC.

    For each of ``num_chains`` chains: z_0 ~ q(z|x); for t = 1..T,
    log w += (b_t - b_{t-1}) [log p(x, z) - log q(z|x)] at the current z, then one HMC transition
    (``leapfrog_steps`` leapfrog steps, Metropolis correction) leaving f_{b_t} invariant. The
    estimate is log mean_c exp(log w_c): unbiased for p(x), a lower bound for log p(x) in
    expectation. Each chain's step size is multiplied by 1.02 after an accepted and by 0.98 after a
    rejected move (pushing acceptance towards ~0.65): the step size used at t depends only on the
    chain's past, so every transition still leaves its f_{b_t} invariant given the past and the
    weights stay valid.

    Cost: T * (leapfrog_steps + 1) gradient evaluations of log f per chain and example.
    """
    del target_accept  # the 1.02/0.98 rule's fixed point; kept in the signature for clarity
    num_steps = _check_positive("num_steps", num_steps)
    num_chains = _check_positive("num_chains", num_chains)
    leapfrog_steps = _check_positive("leapfrog_steps", leapfrog_steps)
    batch_size = _check_positive("batch_size", batch_size)
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}.")
    x = jnp.asarray(_check_x(x))
    betas = jnp.asarray(sigmoid_schedule(num_steps))

    def one(xi, ki):
        k0, kloop = jax.random.split(ki)
        z0 = model.sample_proposal(params, xi, k0, num_chains)
        shape = z0.shape[1:]

        def parts(zf):
            z = zf.reshape(shape)
            return model.log_joint(params, xi, z), model.log_proposal(params, xi, z)

        def log_f(zf, beta):
            lj, lq = parts(zf)
            return (1.0 - beta) * lq + beta * lj

        grad_f = jax.grad(log_f)

        def hmc(zf, eps, beta, k):
            kp, ku = jax.random.split(k)
            p0 = jax.random.normal(kp, zf.shape, zf.dtype)

            def leap(carry, _):
                z, p = carry
                p = p + 0.5 * eps * grad_f(z, beta)
                z = z + eps * p
                p = p + 0.5 * eps * grad_f(z, beta)
                return (z, p), None

            (z1, p1), _ = jax.lax.scan(leap, (zf, p0), None, length=leapfrog_steps)
            h0 = -log_f(zf, beta) + 0.5 * jnp.sum(p0**2)
            h1 = -log_f(z1, beta) + 0.5 * jnp.sum(p1**2)
            log_accept = jnp.where(jnp.isfinite(h1), h0 - h1, -jnp.inf)
            accept = jnp.log(jax.random.uniform(ku, dtype=zf.dtype)) < log_accept
            return jnp.where(accept, z1, zf), jnp.where(accept, eps * 1.02, eps * 0.98)

        def step(carry, t):
            zf, logw, eps = carry
            lj, lq = jax.vmap(parts)(zf)
            logw = logw + (betas[t] - betas[t - 1]) * (lj - lq)
            keys = jax.random.split(jax.random.fold_in(kloop, t), num_chains)
            zf, eps = jax.vmap(hmc, (0, 0, None, 0))(zf, eps, betas[t], keys)
            return (zf, logw, eps), None

        zf = z0.reshape(num_chains, -1)
        init = (zf, jnp.zeros(num_chains, zf.dtype), jnp.full(num_chains, step_size, zf.dtype))
        # The last transition (at b_T = 1) does not change the weight; it is skipped.
        (_, logw, _), _ = jax.lax.scan(step, init, jnp.arange(1, num_steps + 1))
        logw = jnp.where(jnp.isnan(logw), -jnp.inf, logw)
        return jax.scipy.special.logsumexp(logw) - math.log(num_chains)

    keys = jax.random.split(key, x.shape[0])
    return _batched(jax.jit(jax.vmap(one)), x, keys, batch_size)


def evaluate(
    model: LatentVariableModel,
    params,
    x,
    key,
    *,
    method: str = "is",
    num_samples: int = 5000,
    chunk_size: int = 500,
    batch_size: int = 100,
    elbo_samples: int = 10,
    **ais_kwargs,
) -> dict:
    """Test log-likelihood (``method`` "is" or "ais") and test ELBO, as a dict for eval.json.

    Returns ``{"method", "test_log_likelihood", "test_log_likelihood_stderr", "test_elbo",
    "test_elbo_stderr", "num_examples", "num_samples", "seconds", "per_example"}`` in nats per
    example (higher is better); the standard errors are std / sqrt(N) over examples.
    """
    if method not in ("is", "ais"):
        raise ValueError(f"method must be 'is' or 'ais', got {method!r}.")
    if method == "is" and ais_kwargs:
        raise ValueError(f"AIS options {sorted(ais_kwargs)} given with method='is'.")
    x = _check_x(x)
    t0 = time.perf_counter()
    key_ll, key_elbo = jax.random.split(key)
    if method == "is":
        per_example = importance_log_likelihood(
            model,
            params,
            x,
            key_ll,
            num_samples=num_samples,
            chunk_size=chunk_size,
            batch_size=batch_size,
        )
        k_used = num_samples
    else:
        per_example = ais_log_likelihood(
            model, params, x, key_ll, batch_size=batch_size, **ais_kwargs
        )
        k_used = int(ais_kwargs.get("num_chains", 16))
    elbos = elbo(model, params, x, key_elbo, num_samples=elbo_samples, batch_size=batch_size)
    n = per_example.shape[0]
    return {
        "method": method,
        "test_log_likelihood": float(np.mean(per_example)),
        "test_log_likelihood_stderr": float(np.std(per_example) / math.sqrt(n)),
        "test_elbo": float(np.mean(elbos)),
        "test_elbo_stderr": float(np.std(elbos) / math.sqrt(n)),
        "num_examples": int(n),
        "num_samples": int(k_used),
        "seconds": time.perf_counter() - t0,
        "per_example": per_example,
    }
