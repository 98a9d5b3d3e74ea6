"""The H_{k:m} driver of vaeml_jax.couplings: unbiasedness, planted bugs, signed measure, errors.

Target: the correlated 2-D Gaussian N(0, [[1, .8], [.8, 1]]); chains start from N(3, I), far from
it, so the bias correction carries real weight. h = (x, x^2, x_1 x_2): 5 coordinates with closed
forms. R independent pairs (vmapped) give replicate estimates; the statistic is max |z| over the
coordinates against the closed form (tests/_stats.py): a correct configuration must pass below
the Bonferroni threshold at family-wise level 1e-4 (4.42 for 5 coordinates) with no capped pair,
and every planted bug must be rejected, by max |z| > 2 x threshold or by capped pairs, under the
same statistic, R and seed. Plants (broken copies from tests/_couplings_plants.py, swapped in
with monkeypatch):

* ``off_by_one``: the correction weights one step early (debias._correction_count),
* ``uncoupled``: RWM proposals with independent noise (maximal.reflection_maximal): the chains
  never meet, every pair is capped (and the truncated correction is biased),
* ``no_correction``: MALA's acceptance ratio without the proposal densities q(x|x')/q(x'|x)
  (mala._log_acceptance_ratio): the chain targets a wrong law and H_{k:m} inherits its bias.

Measured numbers are in the test ids' docstrings below and in the report of the couplings branch.
"""

import functools
import itertools

import _couplings_plants as plants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _couplings_targets import EXACT, h, kernels, logdensity, rinit, run_estimator, statistic
from _stats import REJECT_FACTOR

from vaeml_jax import couplings as cp
from vaeml_jax.couplings import debias, mala, maximal
from vaeml_jax.estimators import unbiased as U

# (kind, lag, k, m): every kernel with lag 1 and lag 2. MALA with lag 1 has a longer window
# (m = 30) so that its planted wrong acceptance ratio, a bias of the chain's stationary law,
# carries weight (with k = 0, m = 2 it measured z ~ 3, not rejected).
CONFIGS = [
    ("rwm", 1, 0, 2),
    ("rwm", 2, 1, 3),
    ("mala", 1, 5, 30),
    ("mala", 2, 1, 3),
    ("hmc", 1, 0, 2),
    ("hmc", 2, 1, 3),
]


def num_pairs(kind, lag):
    """R: 160k for RWM with lag 1 (its off-by-one plant measured z ~ 6.5 at 50k), else 40k."""
    return 160_000 if (kind, lag) == ("rwm", 1) else 40_000


@functools.cache
def _reference(kind, lag, k, m):
    out = run_estimator(kind, lag, k, m, num_pairs(kind, lag))
    z, threshold = statistic(out)
    return z, threshold, int(np.asarray(out.capped).sum())


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(c, marks=pytest.mark.slow) if c[0] != "rwm" else c
        for c in CONFIGS  # the MALA/HMC programs are the slow ones to compile
    ],
    ids=[f"{c[0]}-lag{c[1]}-k{c[2]}-m{c[3]}" for c in CONFIGS],
)
def test_unbiased_on_correlated_gaussian(config):
    z, threshold, capped = _reference(*config)
    print(f"{config}: max|z| = {z:.2f} (threshold {threshold:.2f}), capped {capped}")
    assert capped == 0, config
    assert z < threshold, (config, z, threshold)


# bug -> ((module, name, broken copy) swapped in, configuration the statistic is computed on)
PLANTS = {
    None: (None, ("rwm", 1, 0, 2)),
    "off_by_one": ((debias, "_correction_count", plants.off_by_one_count), ("rwm", 1, 0, 2)),
    "uncoupled": ((maximal, "reflection_maximal", plants.independent_draw), ("rwm", 1, 0, 2)),
    "no_correction": (
        (mala, "_log_acceptance_ratio", plants.no_proposal_correction),
        ("mala", 1, 5, 30),
    ),
}


@pytest.mark.parametrize("bug", list(PLANTS), ids=[str(b) for b in PLANTS])
def test_statistic_rejects_planted_bugs(monkeypatch, bug):
    plant, config = PLANTS[bug]
    if bug is None:
        z, threshold, capped = _reference(*config)
        assert capped == 0 and z < threshold, (z, threshold, capped)
        return
    monkeypatch.setattr(*plant)
    # An uncoupled pair runs to the cap: it is rejected by capping, which 4k pairs show as well.
    max_iters, R = (100, 4000) if bug == "uncoupled" else (1000, num_pairs(*config[:2]))
    out = run_estimator(*config, R, max_iters=max_iters)
    z, threshold = statistic(out)
    capped = int(np.asarray(out.capped).sum())
    print(f"plant {bug}: max|z| = {z:.1f} (threshold {threshold:.2f}), capped {capped}/{R}")
    assert capped > 0 or z > REJECT_FACTOR * threshold, (bug, z, threshold, capped)


def test_lag_one_weights_match_the_fused_estimator():
    """For L = 1 the driver's weights are unbiased.jacob_coefficients (the VAE loop's)."""
    t = jnp.arange(0, 15)
    for (k, m), met in itertools.product([(0, 0), (0, 1), (2, 5), (3, 3)], [False, True]):
        a1, b1 = debias.coefficients(t, met, k, m, 1)
        a2, b2 = U.jacob_coefficients(t, met, k, m)
        np.testing.assert_allclose(a1, a2, rtol=1e-6)
        np.testing.assert_allclose(b1, b2, rtol=1e-6)


def test_lag_weights_count_the_telescoping_terms():
    """c_t = #{j >= 1 : k <= t - jL <= m} by brute force, for many (k, m, L, t)."""
    for k, m, lag in itertools.product(range(4), range(7), range(1, 5)):
        if k > m:
            continue
        t = np.arange(0, 30)
        _, beta = debias.coefficients(jnp.asarray(t), False, k, m, lag)
        count = [sum(1 for j in range(1, 40) if k <= tt - j * lag <= m) for tt in t]
        np.testing.assert_allclose(np.asarray(beta) * (m - k + 1), count, atol=1e-5)
    # k = m = 0, L = 2: only the even times telescope (weight min(1, ceil(t/2)) would be biased).
    _, beta = debias.coefficients(jnp.arange(6), False, 0, 0, 2)
    assert list(np.asarray(beta)) == [0, 0, 1, 0, 1, 0]


def test_signed_measure_agrees_with_online_estimate():
    """Same key: identical meeting times and weights; integrals equal the online H_{k:m}."""
    single, coupled = kernels("rwm")
    kw = dict(k=1, m=3, lag=2, max_iters=300)
    est = cp.build_estimator(single, coupled, rinit, h, **kw)
    sample = cp.build_signed_measure(single, coupled, rinit, **kw)

    def both(key):
        measure = sample(key)
        return est(key), measure, cp.evaluate_signed_measure(measure, h)

    out, measure, integral = jax.jit(lambda key: cp.run_pairs(both, key, 256))(jax.random.key(3))
    np.testing.assert_array_equal(out.meeting_time, measure.meeting_time)
    assert not np.asarray(out.capped).any()
    total = np.asarray(measure.x_weights).sum(1) + np.asarray(measure.y_weights).sum(1)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out.estimate), jax.tree.leaves(integral), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Several functionals from one run: the same measure integrates another h.
    fourth = jax.vmap(lambda mm: cp.evaluate_signed_measure(mm, lambda s: s.position**4))(measure)
    assert np.isfinite(np.asarray(fourth)).all()


def test_capped_pairs_are_reported():
    """An uncoupled-by-construction pair (independent RWM noise) hits max_iters and says so."""
    single, _ = kernels("rwm")

    def independent(key, pair):
        kx, ky = jax.random.split(key)
        return cp.CoupledState(single(kx, pair.x)[0], single(ky, pair.y)[0]), None

    est = cp.build_estimator(single, independent, rinit, h, k=0, m=2, max_iters=25)
    out = jax.jit(lambda key: cp.run_pairs(est, key, 8))(jax.random.key(0))
    assert np.asarray(out.capped).all()
    np.testing.assert_array_equal(out.num_coupled_steps, 25)
    np.testing.assert_array_equal(out.meeting_time, 1 + 25 + 1)  # lower bound: last t + 1


def test_bad_inputs_raise_clear_errors():
    single, coupled = kernels("rwm")
    with pytest.raises(ValueError, match="k must be <= m"):
        cp.build_estimator(single, coupled, rinit, h, k=3, m=2)
    with pytest.raises(ValueError, match="lag must be >= 1"):
        cp.build_estimator(single, coupled, rinit, h, lag=0)
    with pytest.raises(ValueError, match="max_iters must be >= 10"):
        cp.build_estimator(single, coupled, rinit, h, k=0, m=10, max_iters=5)
    with pytest.raises(TypeError, match="lag must be an int"):
        cp.build_signed_measure(single, coupled, rinit, lag=1.5)
    with pytest.raises(TypeError, match="h must be callable"):
        cp.build_estimator(single, coupled, rinit, "x")
    with pytest.raises(TypeError, match="rinit must be callable"):
        cp.build_estimator(single, coupled, None, h)
    with pytest.raises(TypeError, match="logdensity_fn must be a callable"):
        cp.rwm.build_kernel(np.ones(2), 0.5)
    with pytest.raises(ValueError, match="initial log density is not finite"):
        cp.init(jnp.array([1.0, 2.0]), lambda x: jnp.log(-jnp.sum(x)))
    with pytest.raises(TypeError, match="must return a scalar"):
        cp.init(jnp.array([1.0, 2.0]), lambda x: x)
    for bad in (0.0, -0.1, float("nan"), jnp.array([0.5, -1.0])):
        with pytest.raises(ValueError, match="step_size must be finite and > 0"):
            cp.mala.build_kernel(logdensity, bad)
        with pytest.raises(ValueError, match="step_size must be finite and > 0"):
            cp.hmc.build_coupled_kernel(logdensity, bad, 3)
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            cp.rwm.build_coupled_kernel(logdensity, bad)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        cp.hmc.build_kernel(logdensity, 0.1, 0)
    with pytest.raises(ValueError, match="p_maximal must be in"):
        cp.mixture.build_coupled_kernel(coupled, coupled, 1.5)
    state = cp.init(jnp.zeros(2), logdensity)
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) does not match"):
        cp.rwm.build_kernel(logdensity, jnp.ones(3))(jax.random.key(0), state)
    with pytest.raises(ValueError, match="positions differ in size"):
        other = cp.init(jnp.zeros(3), lambda x: -jnp.sum(x**2))
        coupled(jax.random.key(0), cp.CoupledState(state, other))
    pytree = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    pstate = cp.init(pytree, lambda p: -jnp.sum(p["a"] ** 2) - p["b"] ** 2)
    with pytest.raises(ValueError, match="does not broadcast"):
        cp.rwm.build_kernel(lambda p: 0.0, {"a": jnp.ones(3), "b": 1.0})(jax.random.key(0), pstate)

    def wrong_rinit(key):  # a bare array, not a kernel state
        return jnp.zeros(2)

    with pytest.raises((ValueError, AttributeError, TypeError)):
        cp.build_estimator(single, coupled, wrong_rinit, h)(jax.random.key(0))


def test_exact_values_are_those_of_the_target():
    """Guard against a test that compares with the wrong closed form."""
    assert float(EXACT["cross"]) == pytest.approx(0.8)
    np.testing.assert_allclose(EXACT["square"], [1.0, 1.0])
