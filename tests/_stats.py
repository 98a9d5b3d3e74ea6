"""Replicate statistics for the unbiasedness tests: z-scores of replicate means vs exact values."""

import jax
import jax.numpy as jnp
import numpy as np

from vaeml_jax import testing as T

PASS_Z = 4.0  # max |z| over ~10 coordinates: P(false alarm) < 1e-3 for a correct estimator
REJECT_Z = 6.0  # planted bugs must be rejected by a wide margin, not by luck


def toy(quality=0.5, seed=0):
    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(seed), proposal_quality=quality)
    x = jnp.array([1.0, -0.5, 2.0])
    return model, params, x


def exact_decoder_grad(params, x):
    """Gradient of the loss -log p(x) in params["decoder"]."""
    return jax.grad(lambda p: -T.linear_gaussian_log_marginal(p, x))(params)["decoder"]


def replicate_grads(estimator, params, x, num_replicates, seed=0, batch=16000):
    """Per-replicate gradients: one example, independent keys; returns a tree of (R, ...) arrays."""
    fn = jax.jit(jax.vmap(lambda k: estimator(params, x[None], k)[0]))
    chunks = []
    for i in range(0, num_replicates, batch):
        keys = jax.random.split(jax.random.key(seed + i), min(batch, num_replicates - i))
        chunks.append(fn(keys))
    return jax.tree.map(lambda *a: np.concatenate([np.asarray(v) for v in a]), *chunks)


def max_abs_z(samples, exact):
    """max over coordinates of |mean - exact| / (std / sqrt(R))."""
    zs = jax.tree.map(
        lambda s, e: np.abs(s.mean(0) - np.asarray(e)) / (s.std(0) / np.sqrt(s.shape[0]) + 1e-30),
        samples, exact)
    return float(max(np.max(z) for z in jax.tree.leaves(zs)))
