"""Shared targets, kernels and replicate statistics for the tests/test_couplings_*.py files."""

import jax
import jax.numpy as jnp
import numpy as np
from _stats import pass_threshold, z_scores

from vaeml_jax import couplings as cp

COV = jnp.array([[1.0, 0.8], [0.8, 1.0]])
PRECISION = jnp.linalg.inv(COV)
START = 3.0  # rinit: N(START, I), far from the target's mean 0, so the correction matters


def logdensity(x):
    """The correlated 2-D Gaussian N(0, COV), up to a constant."""
    return -0.5 * x @ PRECISION @ x


def rinit(key):
    return cp.init(jax.random.normal(key, (2,)) + START, logdensity)


def h(state):
    """Means, second moments and the cross moment: 5 coordinates with closed forms."""
    x = state.position
    return {"mean": x, "square": x**2, "cross": x[0] * x[1]}


EXACT = {"mean": jnp.zeros(2), "square": jnp.diag(COV), "cross": COV[0, 1]}

RWM_SCALE = 0.8
MEET_SCALE = 0.3  # the maximal-coupling RWM component of the MALA/HMC mixtures
P_MAXIMAL = 0.1
MALA_STEP = 0.8
HMC_STEP, HMC_STEPS = 0.3, 4


def kernels(kind, target=logdensity):
    """(single, coupled) kernels: "rwm", "mala" or "hmc" (the latter two mixed with maximal RWM)."""
    if kind == "rwm":
        return (
            cp.rwm.build_kernel(target, RWM_SCALE),
            cp.rwm.build_coupled_kernel(target, RWM_SCALE),
        )
    if kind == "mala":
        single = cp.mala.build_kernel(target, MALA_STEP)
        coupled = cp.mala.build_coupled_kernel(target, MALA_STEP)
    elif kind == "hmc":
        single = cp.hmc.build_kernel(target, HMC_STEP, HMC_STEPS)
        coupled = cp.hmc.build_coupled_kernel(target, HMC_STEP, HMC_STEPS)
    else:
        raise ValueError(kind)
    return (
        cp.mixture.build_kernel(single, cp.rwm.build_kernel(target, MEET_SCALE), P_MAXIMAL),
        cp.mixture.build_coupled_kernel(
            coupled, cp.rwm.build_coupled_kernel(target, MEET_SCALE), P_MAXIMAL
        ),
    )


def run_estimator(kind, lag, k, m, num_pairs, seed=0, max_iters=1000):
    """num_pairs independent H_{k:m} of h (vmapped, one compiled call): an Estimate of arrays."""
    single, coupled = kernels(kind)
    est = cp.build_estimator(single, coupled, rinit, h, k=k, m=m, lag=lag, max_iters=max_iters)
    return jax.jit(lambda key: cp.run_pairs(est, key, num_pairs))(jax.random.key(seed))


def statistic(out, exact=EXACT):
    """(max |z| over coordinates, Bonferroni pass threshold) of the replicate estimates."""
    z = z_scores(jax.tree.map(np.asarray, out.estimate), exact)
    return float(np.abs(z).max()), pass_threshold(z.size)


def two_sample_z(a, b):
    """Per-coordinate two-sample z of the means of a (N, P) and b (M, P)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    se = np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
    return (a.mean(0) - b.mean(0)) / se
