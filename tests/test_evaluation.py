"""Held-out log-likelihood estimators against the exact log p(x) of the linear-Gaussian model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaeml_jax import evaluation as E
from vaeml_jax import testing as T

MODEL = T.linear_gaussian_model()


def _setup(quality, n=40):
    params = T.linear_gaussian_params(
        jax.random.key(0), data_dim=5, latent_dim=3, proposal_quality=quality
    )
    x = 2.0 * jax.random.normal(jax.random.key(1), (n, 5))
    exact = np.asarray(jax.vmap(lambda xi: T.linear_gaussian_log_marginal(params, xi))(x))
    return params, x, exact


def test_is_matches_exact_with_a_good_proposal():
    params, x, exact = _setup(0.9)
    est = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(2), num_samples=2000, chunk_size=256, batch_size=16
    )
    assert est.shape == exact.shape
    err = est - exact
    # IS is a lower bound in expectation; with a near-posterior proposal the gap is tiny.
    assert abs(np.mean(err)) < 0.02, np.mean(err)
    assert np.max(np.abs(err)) < 0.1


def test_is_is_a_lower_bound_that_tightens_with_k():
    params, x, exact = _setup(0.3)
    gaps = []
    for k in (1, 10, 1000):
        est = E.importance_log_likelihood(
            MODEL, params, x, jax.random.key(3), num_samples=k, chunk_size=100
        )
        gaps.append(float(np.mean(exact - est)))
    assert gaps[0] > gaps[1] > gaps[2] > -0.05, gaps
    # K = 1 is the ELBO estimator: the same expectation (replicates of 4 examples, 4-SE bound).
    reps = jnp.tile(x[:4], (300, 1))
    k1 = E.importance_log_likelihood(
        MODEL, params, reps, jax.random.key(4), num_samples=1, batch_size=400
    ).reshape(300, 4)
    el = E.elbo(MODEL, params, reps, jax.random.key(5), num_samples=1, batch_size=400).reshape(
        300, 4
    )
    diff = k1.mean(0) - el.mean(0)
    se = np.sqrt(k1.var(0) / 300 + el.var(0) / 300)
    assert np.all(np.abs(diff) < 4 * se), (diff, se)


def test_result_does_not_depend_on_batch_size_and_pads_ragged_batches():
    params, x, _ = _setup(0.5, n=23)
    a = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(5), num_samples=300, chunk_size=64, batch_size=23
    )
    b = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(5), num_samples=300, chunk_size=64, batch_size=4
    )  # 23 = 5*4 + 3: padded
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ... and each example's estimate does not depend on how examples are grouped.
    np.testing.assert_allclose(
        E.importance_log_likelihood(
            MODEL, params, x, jax.random.key(5), num_samples=300, chunk_size=64, batch_size=1
        ),
        a,
        atol=1e-5,
    )


def test_k_not_a_multiple_of_the_chunk_uses_exactly_k_samples():
    params, x, _ = _setup(0.5, n=5)
    # With chunk_size >= K, K samples are drawn in one chunk; with a ragged last chunk the
    # overhanging samples must be masked: compare K=1 through chunking against the ELBO of 1 draw.
    one = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(6), num_samples=1, chunk_size=1
    )
    also_one = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(6), num_samples=1, chunk_size=7
    )  # chunk clipped to K
    np.testing.assert_allclose(one, also_one, atol=1e-6)
    a = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(6), num_samples=10, chunk_size=4
    )  # chunks 4 + 4 + 2 (2 masked)
    assert np.all(np.isfinite(a))


def test_float32_stable_with_extreme_log_weights():
    params, _, _ = _setup(0.9)
    far = jnp.full((3, 5), 300.0)  # log weights around -1e4 .. -1e5
    est = E.importance_log_likelihood(
        MODEL, params, far, jax.random.key(7), num_samples=500, chunk_size=100
    )
    exact = np.asarray(jax.vmap(lambda xi: T.linear_gaussian_log_marginal(params, xi))(far))
    assert np.all(np.isfinite(est)) and np.all(exact < -1e4)
    assert np.all(est <= exact + 1.0) and np.all(est > exact - 0.05 * np.abs(exact))


def test_ais_beats_is_with_a_poor_proposal_and_approaches_exact():
    params, x, exact = _setup(0.0, n=24)
    ais = E.ais_log_likelihood(
        MODEL,
        params,
        x,
        jax.random.key(8),
        num_steps=100,
        num_chains=8,
        leapfrog_steps=5,
        batch_size=24,
    )
    # The same number of final weights (one per AIS chain) with plain IS is far looser.
    is_ = E.importance_log_likelihood(
        MODEL, params, x, jax.random.key(8), num_samples=8, batch_size=24
    )
    gap_ais, gap_is = float(np.mean(exact - ais)), float(np.mean(exact - is_))
    assert gap_ais < 0.25 * gap_is, (gap_ais, gap_is)
    # A stochastic lower bound; 100 temperatures bring it within 0.3 nats (measured ~0.1-0.3).
    assert -0.1 < gap_ais < 0.3, gap_ais


def test_evaluate_dict_and_errors():
    params, x, exact = _setup(0.9, n=10)
    res = E.evaluate(
        MODEL,
        params,
        np.asarray(x),
        jax.random.key(9),
        num_samples=200,
        chunk_size=50,
        batch_size=4,
        elbo_samples=3,
    )
    for name in (
        "method",
        "test_log_likelihood",
        "test_log_likelihood_stderr",
        "test_elbo",
        "test_elbo_stderr",
        "num_examples",
        "num_samples",
        "seconds",
        "per_example",
    ):
        assert name in res
    assert res["num_examples"] == 10 and res["per_example"].shape == (10,)
    assert res["test_elbo"] < res["test_log_likelihood"] < float(np.mean(exact)) + 0.05
    with pytest.raises(ValueError, match="method must be"):
        E.evaluate(MODEL, params, x, jax.random.key(0), method="exact")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        E.importance_log_likelihood(MODEL, params, x, jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        E.importance_log_likelihood(MODEL, params, x.at[0, 0].set(jnp.nan), jax.random.key(0))
    with pytest.raises(ValueError, match="leading example axis"):
        E.importance_log_likelihood(MODEL, params, x[0], jax.random.key(0))
