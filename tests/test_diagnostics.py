"""Diagnostics of the importance weights and meeting times (vaeml_jax.diagnostics)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fast_compile import fast_jit

import vaeml_jax as vj
from vaeml_jax import diagnostics
from vaeml_jax.testing import linear_gaussian_model, linear_gaussian_params


def test_importance_diagnostics_extremes_and_formula():
    S = 8
    equal = diagnostics.importance_diagnostics(jnp.zeros((S,)))
    np.testing.assert_allclose(equal.ess, S, rtol=1e-6)
    np.testing.assert_allclose(equal.log1p_chi2, 0.0, atol=1e-6)
    np.testing.assert_allclose(equal.log_weight_std, 0.0, atol=1e-6)
    one = diagnostics.importance_diagnostics(jnp.array([0.0] + [-1e3] * (S - 1)))
    np.testing.assert_allclose(one.ess, 1.0, rtol=1e-6)
    np.testing.assert_allclose(one.log1p_chi2, math.log(S), rtol=1e-6)
    lw = np.random.default_rng(0).normal(size=(3, 5, S)) * 3
    d = diagnostics.importance_diagnostics(jnp.asarray(lw))
    w = np.exp(lw - lw.max(-1, keepdims=True))
    ess = w.sum(-1) ** 2 / (w**2).sum(-1)
    np.testing.assert_allclose(d.ess, ess, rtol=1e-5)
    np.testing.assert_allclose(d.log1p_chi2, np.log(S / ess), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.log_weight_std, lw.std(-1, ddof=1), rtol=1e-5)


def test_log1p_chi2_matches_closed_form():
    # q = N(0, 1), p = N(mu, 1): 1 + chi^2(p || q) = exp(mu^2). The plug-in estimate from n draws
    # has relative error ~ sqrt(Var_q[w^2]) / (sqrt(n) E_q[w^2]) = sqrt(exp(4 mu^2) - 1)/sqrt(n)
    # on E_q[w^2] (1.6% at mu = 0.4, n = 2e5): the tolerance 0.08 nats is > 4 such SEs.
    mu, n = 0.4, 200_000
    z = jax.random.normal(jax.random.key(0), (n,))
    lw = -0.5 * (z - mu) ** 2 + 0.5 * z**2
    d = diagnostics.importance_diagnostics(lw)
    assert abs(float(d.log1p_chi2) - mu**2) < 0.08
    # A planted error (chi^2 of q to itself: mu = 0) is rejected by the same tolerance.
    assert abs(float(d.log1p_chi2) - 0.0) > 0.08


def test_nonfinite_weights_give_zero_ess_not_nan_crash():
    lw = jnp.array([[jnp.nan, -jnp.inf, jnp.nan], [0.0, jnp.nan, 1.0]])
    d = diagnostics.importance_diagnostics(lw)
    assert float(d.ess[0]) == 0.0 and np.isnan(d.log1p_chi2[0]) and np.isnan(d.log_weight_std[0])
    assert np.isfinite(d.ess[1]) and 1.0 <= float(d.ess[1]) <= 2.0


@pytest.mark.parametrize("alpha", [1.2, 3.0])
def test_hill_tail_index_recovers_pareto_exponent(alpha):
    # Pareto(alpha) samples; the Hill estimate on the top n = 2,500 has SE ~ alpha / sqrt(n)
    # (2% here); the tolerance is 5 SEs.
    rng = np.random.default_rng(1)
    tau = rng.pareto(alpha, size=50_000) + 1.0
    est = diagnostics.hill_tail_index(tau)
    assert abs(est - alpha) < 5 * alpha / math.sqrt(2_500)


def test_hill_tail_index_too_few_or_flat_is_nan():
    assert math.isnan(diagnostics.hill_tail_index(np.arange(1, 50)))
    assert math.isnan(diagnostics.hill_tail_index(np.full(10_000, 1002)))
    with pytest.raises(ValueError, match="tail_fraction"):
        diagnostics.hill_tail_index(np.arange(100), tail_fraction=0.0)


def test_health_warnings_name_the_problem_and_the_knobs():
    assert diagnostics.health_warnings({"tail_index": 3.1, "capped_fraction": 0.0}) == []
    lines = diagnostics.health_warnings(
        {"tail_index": 1.3, "capped_fraction": 1.0, "nonfinite_weight_fraction": 0.25},
        max_iters=50,
    )
    assert len(lines) == 3
    text = "\n".join(lines)
    assert "25% of examples had no finite importance weight" in text
    assert "100% of lanes hit the iteration cap (--max-iters 50)" in text
    assert "tail index 1.30 < 2" in text and "--num-particles" in text
    # NaN tail index (too few lanes) is never warned about.
    assert diagnostics.health_warnings({"tail_index": float("nan")}) == []


def _lg_setup(B=6):
    model = linear_gaussian_model()
    params = linear_gaussian_params(jax.random.key(0), data_dim=3, latent_dim=2)
    x = jax.random.normal(jax.random.key(1), (B, 3))
    return model, params, x


@pytest.mark.parametrize(
    "make",
    [
        lambda m: vj.make_unbiased_grad(m, num_particles=4, num_chains=2),
        lambda m: vj.make_unbiased_grad(m, num_particles=4, loop=vj.LoopOptions(num_slots=3)),
        lambda m: vj.make_iwae_grad(m, num_particles=4),
        lambda m: vj.make_elbo_grad(m, num_particles=3),
        lambda m: vj.make_mcmc_grad(m, num_particles=4, num_steps=2),
    ],
)
def test_estimators_report_importance_diagnostics(make):
    model, params, x = _lg_setup()
    _, info = fast_jit(make(model))(params, x, jax.random.key(2))
    for name in ("ess", "log1p_chi2", "log_weight_std"):
        assert info[name].shape == (x.shape[0],), name
        assert np.all(np.isfinite(info[name])), name
    assert np.all(info["ess"] >= 1.0 - 1e-5)


def test_plain_and_work_queue_loops_report_the_same_diagnostics():
    model, params, x = _lg_setup(B=8)
    key = jax.random.key(3)
    plain, queue = vj.LoopOptions(num_slots=None), vj.LoopOptions(num_slots=3)
    _, a = fast_jit(vj.make_unbiased_grad(model, num_particles=4, loop=plain))(params, x, key)
    _, b = fast_jit(vj.make_unbiased_grad(model, num_particles=4, loop=queue))(params, x, key)
    for name in ("ess", "log1p_chi2", "log_weight_std"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)


def test_nan_log_joint_gives_a_clear_summary_not_a_crash():
    model, params, x = _lg_setup(B=4)

    def nan_joint(p, xi, z):  # the first example's density is NaN everywhere
        return jnp.where(xi[0] == x[0, 0], jnp.nan, model.log_joint(p, xi, z))

    bad = vj.LatentVariableModel(nan_joint, model.sample_proposal, model.log_proposal)
    _, info = fast_jit(vj.make_unbiased_grad(bad, num_particles=4, max_iters=20))(
        params, x, jax.random.key(4)
    )
    assert float(info["ess"][0]) == 0.0
    summary = diagnostics.summarize(
        info["meeting_time"],
        info["capped"],
        info["ess"],
        info["log1p_chi2"],
        info["log_weight_std"],
    )
    assert summary["nonfinite_weight_fraction"] == pytest.approx(0.25)
    assert all(np.isfinite(v) for k, v in summary.items() if k != "tail_index")
    assert any("no finite importance weight" in w for w in diagnostics.health_warnings(summary))


@pytest.mark.parametrize(
    "estimator, needle",
    [
        ("unbiased", "100% of lanes hit the iteration cap (--max-iters 9)"),
        ("mlmc", "100% of examples drew a level above the cap (--max-level 9)"),
        ("sumo", "100% of examples hit the term cap (--max-terms 9)"),
    ],
)
def test_health_warnings_name_each_estimators_cap(estimator, needle):
    (line,) = diagnostics.health_warnings({"capped_fraction": 1.0}, 9, estimator=estimator)
    assert needle in line and "bias" in line
