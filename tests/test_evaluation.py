"""Held-out log-likelihood estimators against the exact log p(x) of the linear-Gaussian model.

Statistical checks use fixed seeds and thresholds in standard errors over examples (SE =
std / sqrt(n) of per-example differences, paired where two estimators see the same examples).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaeml_jax import evaluation as E
from vaeml_jax import testing as T

MODEL = T.linear_gaussian_model()


def _setup(quality, n=40, data_dim=5, latent_dim=3, scale=2.0, seed=0):
    params = T.linear_gaussian_params(
        jax.random.key(seed), data_dim=data_dim, latent_dim=latent_dim, proposal_quality=quality
    )
    x = scale * jax.random.normal(jax.random.key(seed + 1), (n, data_dim))
    return params, x, _exact(params, x)


def _exact(params, x):
    return np.asarray(jax.vmap(lambda xi: T.linear_gaussian_log_marginal(params, xi))(x))


def _se(a):
    return float(np.std(a) / math.sqrt(a.size))


def test_is_matches_exact_with_a_good_proposal():
    params, x, exact = _setup(0.9)
    errs = []
    for seed in (2, 3):  # examples x keys
        est = E.importance_log_likelihood(
            MODEL, params, x, jax.random.key(seed), num_samples=1000, chunk_size=100, batch_size=40
        )
        assert est.shape == exact.shape
        errs.append(np.asarray(est) - exact)
    err = np.concatenate(errs)
    # Bias ~ -Var(w/p) / (2K): negligible next to the sampling error
    # (measured: mean +0.004, SE 0.002, RMS 0.022).
    assert abs(err.mean()) < 3 * _se(err) + 1e-3, (err.mean(), _se(err))
    # Per example the estimate is within a few hundredths of a nat (measured RMS 0.02).
    assert np.sqrt(np.mean(err**2)) < 0.05, np.sqrt(np.mean(err**2))


def test_is_is_a_lower_bound_that_tightens_with_k_and_k1_is_the_elbo():
    params, x, exact = _setup(0.5, n=200)
    key = jax.random.key(4)
    gaps = {}
    for k in (1, 10, 100, 1000):
        est = E.importance_log_likelihood(
            MODEL, params, x, key, num_samples=k, chunk_size=100, batch_size=40
        )
        gaps[k] = exact - np.asarray(est)
    # Paired over examples. Measured mean gaps (SE) for K = 1, 10, 100, 1000: 5.16 (0.50),
    # 0.54 (0.10), 0.12 (0.03), 0.04 (0.02): strictly tighter while the gap is large; at K=1000 the
    # estimate has converged to within its noise, so that last step is only "not looser".
    for k_small, k_big in ((1, 10), (10, 100)):
        d = gaps[k_small] - gaps[k_big]
        assert d.mean() > 3 * _se(d), (k_small, k_big, d.mean(), _se(d))
    d = gaps[100] - gaps[1000]
    assert d.mean() > -3 * _se(d), (d.mean(), _se(d))
    assert gaps[1000].mean() > -3 * _se(gaps[1000])  # a lower bound (no significant overshoot)
    assert gaps[1].mean() > 0.3  # the ELBO gap of this proposal is far from zero
    # K = 1 with the same key draws the same z as the one-sample ELBO: identical values ...
    el = np.asarray(E.elbo(MODEL, params, x, key, num_samples=1, batch_size=40))
    np.testing.assert_allclose(exact - el, gaps[1], rtol=1e-6, atol=1e-5)
    # ... and with independent keys the same expectation (means over examples, paired).
    el2 = np.asarray(E.elbo(MODEL, params, x, jax.random.key(5), num_samples=1, batch_size=40))
    d = (exact - el2) - gaps[1]
    assert abs(d.mean()) < 3 * _se(d), (d.mean(), _se(d))


def test_chunk_size_and_batch_size_do_not_change_the_draws():
    params, x, _ = _setup(0.5, n=43)
    key = jax.random.key(6)

    def est(chunk, batch, key=key):
        return np.asarray(
            E.importance_log_likelihood(
                MODEL, params, x, key, num_samples=100, chunk_size=chunk, batch_size=batch
            )
        )

    one_chunk = est(100, 40)  # 43 = 40 + 3: the last batch padded
    # 100 = 14 * 7 + 2: a ragged last chunk whose 5 overhanging samples must be masked out.
    np.testing.assert_allclose(est(7, 40), one_chunk, rtol=1e-5, atol=1e-5)
    # 43 = 5 * 8 + 3: each example's estimate does not depend on its neighbours.
    np.testing.assert_allclose(est(100, 8), one_chunk, rtol=1e-5, atol=1e-5)
    # A different key does change the result (the checks above can fail).
    assert np.max(np.abs(est(100, 40, jax.random.key(7)) - one_chunk)) > 1e-3


def _reference_is(params, x, key, k):
    """The documented draws, weights computed one by one, logsumexp in float64 numpy."""
    out = []
    for xi, ki in zip(x, jax.random.split(key, x.shape[0]), strict=True):
        z = jax.vmap(
            lambda j, xi=xi, ki=ki: MODEL.sample_proposal(params, xi, jax.random.fold_in(ki, j), 1)[
                0
            ]
        )(jnp.arange(k))
        lw = jax.vmap(
            lambda zz, xi=xi: MODEL.log_joint(params, xi, zz) - MODEL.log_proposal(params, xi, zz)
        )(z)
        lw = np.asarray(lw, np.float64)
        m = lw.max()
        out.append(m + math.log(np.exp(lw - m).sum()) - math.log(k))
    return np.array(out)


def test_float32_stable_with_extreme_log_weights():
    params, _, _ = _setup(0.9)
    far = jnp.stack([jnp.full((5,), 120.0), jnp.full((5,), -100.0), jnp.linspace(-150.0, 150.0, 5)])
    exact = _exact(params, far)
    assert np.all(exact < -1e3) and np.min(exact) < -1e4  # log weights around -1e3 .. -1e4
    key = jax.random.key(8)
    est = np.asarray(
        E.importance_log_likelihood(MODEL, params, far, key, num_samples=300, chunk_size=64)
    )
    assert est.dtype == np.float32 and np.all(np.isfinite(est))
    # exp(-1e4) underflows float32 (and float64): only the running-max logsumexp survives. The
    # streamed float32 value equals a float64 logsumexp of the very same weights to float32
    # rounding of numbers of size 1e4 (ulp ~ 1e-3).
    np.testing.assert_allclose(est, _reference_is(params, far, key, 300), rtol=2e-6, atol=1e-3)
    # ... and a lower bound, loose this far from the data (measured 1.4-2.4% of |log p(x)|).
    assert np.all(est < exact) and np.all(est > exact - 0.05 * np.abs(exact))


def test_ais_beats_is_with_the_same_budget_and_a_poor_proposal():
    # A prior-like proposal (quality 0) in 8 latent dimensions with 20 observed ones: the posterior
    # is much narrower than q, so IS needs exp(KL) samples.
    params, x, exact = _setup(0.0, n=48, data_dim=20, latent_dim=8, scale=1.0)
    cfg = dict(num_steps=100, num_chains=4, leapfrog_steps=5, adapt_chains=4)
    budget = E.ais_num_log_joint_evals(**cfg)
    assert budget == (4 + 4) * (1 + 99 * 5)
    ais = np.asarray(
        E.ais_log_likelihood(MODEL, params, x, jax.random.key(9), batch_size=48, **cfg)
    )
    is_ = np.asarray(
        E.importance_log_likelihood(
            MODEL,
            params,
            x,
            jax.random.key(9),
            num_samples=budget,
            chunk_size=budget,
            batch_size=48,
        )
    )
    gap_ais, gap_is = exact - ais, exact - is_
    # Measured: AIS 1.37 (SE 0.22) nats below log p(x), IS 4.13 (0.58); paired 2.75 (0.57).
    d = gap_is - gap_ais
    assert d.mean() > 3 * _se(d), (gap_ais.mean(), gap_is.mean(), _se(d))
    assert gap_ais.mean() > -3 * _se(gap_ais)  # both are lower bounds in expectation
    assert gap_is.mean() > -3 * _se(gap_is)


def test_ais_with_many_steps_matches_exact():
    params, x, exact = _setup(0.0, n=24)
    num_chains = 16
    logw = np.asarray(
        E.ais_log_weights(
            MODEL,
            params,
            x,
            jax.random.key(10),
            num_steps=1000,
            num_chains=num_chains,
            leapfrog_steps=5,
            batch_size=24,
        ),
        np.float64,
    )
    assert logw.shape == (24, num_chains) and np.all(np.isfinite(logw))
    est = np.logaddexp.reduce(logw, axis=1) - math.log(num_chains)
    gap = exact - est
    var = logw.var(axis=1, ddof=1).mean()  # measured 0.18 (it falls as 1/T)
    # Tolerance: for near-Gaussian log w with E[w] = p(x), E[log p - log mean_c w_c] ~ Var(log
    # w) / (2C) (delta method), 0.006 here; plus 3 SE of sampling noise over examples
    # (measured gap 0.011, SE 0.018).
    assert -3 * _se(gap) < gap.mean() < var / (2 * num_chains) + 3 * _se(gap), (gap.mean(), var)
    assert abs(gap.mean()) < 0.03
    # The weights themselves are right: E[w] = p(x) with log w ~ N(mu, s^2) forces
    # mu = log p(x) - s^2 / 2 (measured 0.096 against s^2 / 2 = 0.091).
    chain_gap = exact[:, None] - logw
    assert abs(chain_gap.mean() - var / 2) < 0.25 * var / 2 + 3 * _se(chain_gap.mean(1))
    # With these settings evaluate(method="ais") is one more call of the same compiled code.
    res = E.evaluate(
        MODEL,
        params,
        x,
        jax.random.key(11),
        method="ais",
        batch_size=24,
        elbo_samples=2,
        num_steps=1000,
        num_chains=num_chains,
        leapfrog_steps=5,
    )
    assert res["method"] == "ais" and res["num_samples"] == num_chains
    assert res["per_example"].shape == (24,)
    assert res["num_log_joint_evals_per_example"] == (16 + 4) * (1 + 999 * 5)
    assert abs(res["test_log_likelihood"] - exact.mean()) < 0.03
    assert res["test_elbo"] < res["test_log_likelihood"]


def test_evaluate_dict_no_recompile_and_errors():
    # Settings whose compiled batch functions the tests above already built.
    params, x, exact = _setup(0.9, n=43)
    settings = dict(num_samples=100, chunk_size=100, batch_size=40, elbo_samples=1)
    res = E.evaluate(MODEL, params, np.asarray(x), jax.random.key(12), **settings)
    expected = {
        "method",
        "test_log_likelihood",
        "test_log_likelihood_stderr",
        "test_elbo",
        "test_elbo_stderr",
        "num_examples",
        "num_samples",
        "seconds",
        "per_example",
    }
    assert expected <= set(res)
    assert res["num_examples"] == 43 and res["per_example"].shape == (43,)
    assert res["num_samples"] == 100 and res["method"] == "is"
    assert res["test_log_likelihood_stderr"] == pytest.approx(
        np.std(res["per_example"]) / math.sqrt(43)
    )
    assert res["test_elbo"] < res["test_log_likelihood"] < float(np.mean(exact)) + 0.05
    # New params values reuse the compiled batch function (params are traced, not constants).
    size = E._is_batch._cache_size()
    params2 = jax.tree.map(lambda a: a * 1.01, params)
    E.evaluate(MODEL, params2, x, jax.random.key(12), **settings)
    assert E._is_batch._cache_size() == size

    key = jax.random.key(0)
    bad = [
        (dict(method="exact"), ValueError, "method must be one of"),
        (dict(method="is", num_chains=4), ValueError, "given with method='is'"),
        (dict(method="ais", num_chain=4), TypeError, "unknown evaluate"),
        (dict(num_samples=0), ValueError, "num_samples must be >= 1"),
        (dict(num_samples=10.0), TypeError, "num_samples must be an int"),
        (dict(chunk_size=-1), ValueError, "chunk_size must be >= 1"),
        (dict(elbo_samples=0), ValueError, "elbo_samples must be >= 1"),
        (dict(method="ais", schedule="cosine"), ValueError, "schedule must be one of"),
        (dict(method="ais", step_size=0.0), ValueError, "step_size must be finite"),
        (dict(method="ais", target_accept=1.5), ValueError, "target_accept must be"),
        (dict(method="ais", adapt_chains=-1), ValueError, "adapt_chains must be >= 0"),
    ]
    for kwargs, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            E.evaluate(MODEL, params, x, key, **kwargs)
    with pytest.raises(ValueError, match="NaN or inf"):
        E.importance_log_likelihood(MODEL, params, x.at[0, 0].set(jnp.nan), key)
    with pytest.raises(ValueError, match="leading example axis"):
        E.importance_log_likelihood(MODEL, params, x[0], key)
    with pytest.raises(ValueError, match="sample_proposal"):
        E.elbo(MODEL, params, x[:, :3], key)  # wrong data dimension: the function is named
    with pytest.raises(TypeError, match="PRNG key"):
        E.ais_log_likelihood(MODEL, params, x, 0)
    with pytest.raises(TypeError, match="LatentVariableModel"):
        E.importance_log_likelihood((MODEL.log_joint,), params, x, key)


@pytest.mark.parametrize("encoder", ["diag", "iaf"])
def test_is_estimate_is_the_same_with_the_one_pass_proposal_hook(encoder):
    """With sample_with_log_proposal log q comes with the draw (no IAF inversion): same numbers."""
    from vaeml_jax.models import build_vae

    vae = build_vae(data_dim=6, hidden=(5,), latent_dim=3, encoder=encoder)
    params = vae.init(jax.random.key(0))
    x = (jax.random.uniform(jax.random.key(1), (5, 6)) < 0.4).astype(jnp.float32)
    plain = vae.model._replace(sample_with_log_proposal=None)
    kw = dict(num_samples=30, chunk_size=7, batch_size=4)
    one_pass = E.importance_log_likelihood(vae.model, params, x, jax.random.key(2), **kw)
    two_pass = E.importance_log_likelihood(plain, params, x, jax.random.key(2), **kw)
    np.testing.assert_allclose(one_pass, two_pass, rtol=1e-5, atol=1e-4)
