"""The single-chain CIS kernel: invariance of the posterior, bookkeeping, degenerate weights.

Invariance is tested where the posterior is known exactly: on the linear-Gaussian model of
:mod:`vaeml_jax.testing`, the kept particle is started from the exact posterior p(z | x) (the other
S-1 from the proposal q), the kernel is run for a few steps, and the mean and covariance of the kept
particle after every step are compared with the exact ones by z-scores against their standard
errors (max |z| over all moments and steps, Bonferroni threshold). Two planted kernel bugs, a
resampling that forgets log q and a uniform resampling, are rejected by the same statistic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vaeml_jax import testing as T
from vaeml_jax.couplings import cis
from vaeml_jax.models.interface import LatentVariableModel

NUM_CHAINS = 10_000
NUM_STEPS = 4
S = 3
ALPHA = 1e-4  # false-alarm probability of the invariance test
X = jnp.array([1.0, -0.5, 2.0])


def _setup():
    model = T.linear_gaussian_model()
    # A poor proposal (0.3 of the way from the prior to the posterior), so resampling matters.
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=0.3)
    return model, params


def kept_particle_moments_z(seed=0):
    """z-scores (NUM_STEPS, 5) of the kept particle's mean (2) and centred second moments (3).

    Each chain starts at (z* ~ p(z|x), z_2..z_S ~ q); after step t the kept particle
    ``particles[0]`` must again be an exact posterior draw. For each step and each moment the
    z-score is (empirical mean - exact) / (empirical std / sqrt(NUM_CHAINS)).
    """
    model, params = _setup()
    mean, cov = T.linear_gaussian_posterior(params, X)
    chol = jnp.linalg.cholesky(cov)
    step = cis.build_kernel(model, S)

    def one_chain(key):
        k_post, k_init, k_run = jax.random.split(key, 3)
        z_star = mean + chol @ jax.random.normal(k_post, mean.shape)
        fresh = model.sample_proposal(params, X, k_init, S - 1)
        particles = jnp.concatenate([z_star[None], fresh])
        lj, lq, _ = cis.log_weights(model, params, X, particles)
        state = cis.CISState(particles, lj, lq)

        def body(state, k):
            new, _ = step(k, state, params, X)
            return new, new.particles[0]

        _, kept = jax.lax.scan(body, state, jax.random.split(k_run, NUM_STEPS))
        return kept  # (NUM_STEPS, d)

    keys = jax.random.split(jax.random.key(seed), NUM_CHAINS)
    kept = np.asarray(jax.jit(jax.vmap(one_chain))(keys), np.float64)  # (N, T, d)
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    c = kept - mean
    per_chain = np.stack(  # (N, T, 5): statistics whose expectations are known
        [c[..., 0], c[..., 1], c[..., 0] ** 2, c[..., 1] ** 2, c[..., 0] * c[..., 1]], axis=-1
    )
    exact = np.array([0.0, 0.0, cov[0, 0], cov[1, 1], cov[0, 1]])
    se = per_chain.std(0, ddof=1) / np.sqrt(NUM_CHAINS)
    return (per_chain.mean(0) - exact) / se


def _threshold(num_stats):
    return stats.norm.isf(ALPHA / (2 * num_stats))


@pytest.fixture
def plant(monkeypatch):
    """Replace the log-weight computation the kernel uses (looked up at call time)."""

    def apply(kind):
        def log_weights(model, params, x, particles):
            lj, lq, _ = _real_log_weights(model, params, x, particles)
            if kind == "forgets_log_q":  # resample in proportion to p(x, z) instead of p / q
                return lj, jnp.zeros_like(lq), lj
            zeros = jnp.zeros_like(lj)  # uniform resampling: every particle gets weight 1
            return zeros, zeros, zeros

        monkeypatch.setattr(cis, "log_weights", log_weights)

    return apply


_real_log_weights = cis.log_weights


def test_kernel_leaves_posterior_invariant():
    z = kept_particle_moments_z(seed=1)
    assert np.max(np.abs(z)) < _threshold(z.size), z


@pytest.mark.parametrize("kind", ["forgets_log_q", "uniform_resampling"])
def test_invariance_statistic_rejects_planted_kernels(plant, kind):
    plant(kind)
    z = kept_particle_moments_z(seed=1)
    assert np.max(np.abs(z)) > 3 * _threshold(z.size), z


# --------------------------------------------------------------------------- bookkeeping
def test_step_carries_the_kept_particle_and_its_values():
    model, params = _setup()
    state = cis.init(jax.random.key(3), model, params, X, S)
    assert state.particles.shape == (S, 2) and state.log_joint.shape == (S,)
    step = jax.jit(cis.build_kernel(model, S))
    for t in range(5):
        new, info = step(jax.random.key(10 + t), state, params, X)
        b = int(info.index)
        assert 0 <= b < S
        np.testing.assert_array_equal(new.particles[0], state.particles[b])
        assert float(new.log_joint[0]) == float(state.log_joint[b])
        assert float(new.log_proposal[0]) == float(state.log_proposal[b])
        lj, lq, lw = cis.log_weights(model, params, X, new.particles)  # carried == recomputed
        np.testing.assert_allclose(new.log_joint, lj, rtol=1e-5)
        np.testing.assert_allclose(new.log_proposal, lq, rtol=1e-5)
        np.testing.assert_allclose(new.log_weights, lw, rtol=1e-5, atol=1e-5)
        state = new


def test_refresh_keeps_the_given_particle_first():
    model, params = _setup()
    kept = jnp.array([0.5, -0.25])
    out = cis.refresh(jax.random.key(0), model, params, X, kept, S)
    assert out.shape == (S, 2)
    np.testing.assert_array_equal(out[0], kept)


def test_normalized_weights_degenerate_cases():
    w = cis.normalized_weights(jnp.full((4,), -jnp.inf))
    np.testing.assert_allclose(w, 0.25)  # all weights zero: uniform, not NaN
    w = cis.normalized_weights(jnp.array([0.0, -jnp.inf, 1.0]))
    assert float(w[1]) == 0.0
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    w = cis.normalized_weights(jnp.array([[1000.0, 1000.0], [-1000.0, -1001.0]]))
    assert bool(jnp.all(jnp.isfinite(w)))  # no overflow / underflow on the last axis


def test_nan_particle_is_never_resampled():
    """A particle whose log joint is NaN gets weight 0 (not a NaN normaliser)."""

    def log_joint(params, x, z):
        return jnp.where(z[0] > 0, jnp.nan, -0.5 * jnp.sum(z**2))

    def sample_proposal(params, x, key, num):
        return jax.random.normal(key, (num, 1))

    def log_proposal(params, x, z):
        return -0.5 * jnp.sum(z**2)

    model = LatentVariableModel(log_joint, sample_proposal, log_proposal)
    step = jax.jit(cis.build_kernel(model, 4))
    particles = jnp.array([[-1.0], [2.0], [-0.5], [3.0]])
    lj, lq, lw = cis.log_weights(model, None, None, particles)
    assert bool(jnp.isneginf(lw[1])) and bool(jnp.isneginf(lw[3]))
    state = cis.CISState(particles, lj, lq)
    idx = jax.vmap(lambda k: step(k, state, None, None)[1].index)(
        jax.random.split(jax.random.key(0), 2000)
    )
    assert set(np.unique(np.asarray(idx))) <= {0, 2}


def test_all_zero_weights_keep_slot_zero():
    def log_joint(params, x, z):
        return jnp.asarray(-jnp.inf)

    def sample_proposal(params, x, key, num):
        return jax.random.normal(key, (num, 1))

    def log_proposal(params, x, z):
        return jnp.zeros(())

    model = LatentVariableModel(log_joint, sample_proposal, log_proposal)
    state = cis.init(jax.random.key(0), model, None, None, 3)
    new, info = cis.build_kernel(model, 3)(jax.random.key(1), state, None, None)
    assert int(info.index) == 0
    np.testing.assert_array_equal(new.particles[0], state.particles[0])
