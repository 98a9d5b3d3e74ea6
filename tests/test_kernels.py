"""The CIS kernel and the maximal coupling: invariance, marginals, meeting, faithfulness.

Each statistical check is paired with a planted variant the same statistic rejects.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _stats import PASS_Z, REJECT_Z, toy

from vaeml_jax import cis, coupling
from vaeml_jax import testing as T

N = 20000


def _moment_z(samples, mean, cov):
    """max |z| of the sample mean and of the sample second central moments against exact ones."""
    samples = np.asarray(samples, np.float64)
    n = samples.shape[0]
    z_mean = np.abs(samples.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    centred = samples - np.asarray(mean)
    sq = centred**2
    z_var = np.abs(sq.mean(0) - np.diag(cov)) / (sq.std(0) / np.sqrt(n))
    return float(max(z_mean.max(), z_var.max()))


def _kept_after_steps(model, params, x, start, num_particles, num_steps, key):
    step = cis.build_kernel(model, num_particles)

    def one(z0, k):
        k_init, k_run = jax.random.split(k)
        state = cis.init(model, params, x, k_init, num_particles)
        # Put the start particle in slot 0 with its own log densities.
        lj = model.log_joint(params, x, z0)
        lq = model.log_proposal(params, x, z0)
        state = cis.CISState(state.particles.at[0].set(z0), state.log_joint.at[0].set(lj),
                             state.log_proposal.at[0].set(lq))

        def body(s, kk):
            s, _ = step(kk, s, params, x)
            return s, None

        state, _ = jax.lax.scan(body, state, jax.random.split(k_run, num_steps))
        return state.particles[0]

    return jax.jit(jax.vmap(one))(start, jax.random.split(key, start.shape[0]))


def test_cis_kernel_leaves_the_posterior_invariant():
    model, params, x = toy(quality=0.3)
    mean, cov = (np.asarray(a) for a in T.linear_gaussian_posterior(params, x))
    start = jax.random.multivariate_normal(jax.random.key(0), mean, cov, (N,))
    kept = _kept_after_steps(model, params, x, start, 3, 4, jax.random.key(1))
    assert _moment_z(kept, mean, cov) < PASS_Z
    # Plant: the same statistic on draws of the proposal (what a chain that forgot to resample
    # by weight would keep) must fail.
    q_draws = jax.vmap(lambda k: model.sample_proposal(params, x, k, 1)[0])(
        jax.random.split(jax.random.key(2), N))
    assert _moment_z(q_draws, mean, cov) > REJECT_Z


def test_cis_chain_from_the_proposal_converges_to_the_posterior():
    model, params, x = toy(quality=0.3)
    mean, cov = (np.asarray(a) for a in T.linear_gaussian_posterior(params, x))
    start = jax.vmap(lambda k: model.sample_proposal(params, x, k, 1)[0])(
        jax.random.split(jax.random.key(3), N))
    kept = _kept_after_steps(model, params, x, start, 5, 30, jax.random.key(4))
    assert _moment_z(kept, mean, cov) < PASS_Z


def _random_probs(key, n):
    return jax.nn.softmax(2.0 * jax.random.normal(key, (n,)))


def test_maximal_coupling_marginals_and_meeting_probability():
    p, q = _random_probs(jax.random.key(5), 6), _random_probs(jax.random.key(6), 6)
    keys = jax.random.split(jax.random.key(7), 200_000)
    i, j = jax.jit(jax.vmap(coupling.maximal_coupling, (0, None, None)))(keys, p, q)
    i, j = np.asarray(i), np.asarray(j)
    n = i.size
    for draws, target in ((i, p), (j, q)):
        freq = np.bincount(draws, minlength=6) / n
        se = np.sqrt(np.asarray(target) * (1 - np.asarray(target)) / n) + 1e-12
        assert np.max(np.abs(freq - target) / se) < PASS_Z
    omega = float(coupling.overlap(p, q))
    meet = float(np.mean(i == j))
    assert abs(meet - omega) / np.sqrt(omega * (1 - omega) / n) < PASS_Z
    # Plant: independent draws have the right marginals but meet with probability sum p q.
    ki, kj = jax.random.split(jax.random.key(8))
    ind_i = jax.random.categorical(ki, jnp.log(p), shape=(n,))
    ind_j = jax.random.categorical(kj, jnp.log(q), shape=(n,))
    meet_ind = float(np.mean(np.asarray(ind_i) == np.asarray(ind_j)))
    assert abs(meet_ind - omega) / np.sqrt(omega * (1 - omega) / n) > REJECT_Z


def test_coupled_select_meets_with_the_overlap_of_the_two_chains():
    """Atoms [kept_x, kept_y, shared...]: each chain's marginal is its own resampling law."""
    S = 4
    log_w = 1.5 * jax.random.normal(jax.random.key(9), (S + 1,))
    met = jnp.asarray(False)
    p_x, p_y = coupling.resampling_distributions(log_w, met)
    assert float(p_x[1]) == 0.0 and float(p_y[0]) == 0.0
    # Single-chain law of X's resampling: softmax over X's own tuple (atoms 0, 2..S).
    own = jax.nn.softmax(jnp.concatenate([log_w[:1], log_w[2:]]))
    np.testing.assert_allclose(np.concatenate([p_x[:1], p_x[2:]]), own, rtol=1e-6)
    keys = jax.random.split(jax.random.key(10), 100_000)
    i, j, meet = jax.jit(jax.vmap(coupling.coupled_select, (0, None, None)))(keys, log_w, met)
    n = keys.shape[0]
    for draws, target in ((np.asarray(i), p_x), (np.asarray(j), p_y)):
        freq = np.bincount(draws, minlength=S + 1) / n
        se = np.sqrt(np.asarray(target) * (1 - np.asarray(target)) / n) + 1e-12
        assert np.max(np.abs(freq - target) / se) < PASS_Z
    omega = float(jnp.sum(jnp.minimum(p_x, p_y)))
    assert abs(float(np.mean(meet)) - omega) / np.sqrt(omega * (1 - omega) / n) < PASS_Z
    # Meeting only ever happens on a shared atom.
    assert not np.any(np.asarray(meet) & (np.asarray(i) < 2))


@pytest.mark.parametrize("seed", range(3))
def test_met_chains_stay_met(seed):
    log_w = jax.random.normal(jax.random.key(seed), (6,))
    log_w = log_w.at[1].set(log_w[0])  # met: atoms 0 and 1 are the same particle
    keys = jax.random.split(jax.random.key(100 + seed), 20_000)
    i, j, meet = jax.vmap(coupling.coupled_select, (0, None, None))(keys, log_w, True)
    assert bool(jnp.all(i == j)) and bool(jnp.all(meet))
    assert not bool(jnp.any(i == 1))  # Y's copy of the kept particle is never used once met


def test_normalized_weights_handle_zero_weight_particles():
    w = cis.normalized_weights(jnp.array([[-jnp.inf, 0.0, -jnp.inf], [-jnp.inf] * 3]))
    np.testing.assert_allclose(w[0], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(w[1], [1 / 3] * 3)  # all-zero weights: uniform, never NaN
