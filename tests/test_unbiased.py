"""Unbiasedness of make_unbiased_grad against the closed-form gradient of the linear-Gaussian model.

Every statistic here is also run on planted bugs (IWAE with few particles, an off-by-one in the
bias-correction sum, a truncated correction) that it must reject by a wide margin, so a pass means
something.
"""

import jax
import jax.numpy as jnp
import pytest
from _stats import PASS_Z, REJECT_Z, exact_decoder_grad, max_abs_z, replicate_grads, toy

import vaeml_jax as vj
from vaeml_jax import testing as T
from vaeml_jax.estimators import unbiased as U

R = 8000  # replicates for the extra configurations
R_MAIN = 48000  # the reference configuration, whose statistic is shown to reject planted bugs
MAIN = dict(num_particles=2, k=0, m=1)
orig_coefficients = U.jacob_coefficients


def _z(estimator, params, x, seed=0, num=R):
    samples = replicate_grads(estimator, params, x, num, seed=seed)
    return max_abs_z(samples["decoder"], exact_decoder_grad(params, x))


def test_reference_configuration_matches_closed_form():
    """S=2, k=0, m=1 with a poor proposal (long chains): the statistic the planted bugs fail."""
    model, params, x = toy(quality=0.3)
    z = _z(vj.make_unbiased_grad(model, **MAIN), params, x, num=R_MAIN)
    assert z < PASS_Z, z  # measured 1.57


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_particles=2, k=0, m=0),
        dict(num_particles=3, k=0, m=0, num_chains=2),
        dict(num_particles=5, k=1, m=3),
        dict(num_particles=2, k=2, m=2),
    ],
)
def test_unbiased_matches_closed_form(kwargs):
    model, params, x = toy()
    z = _z(vj.make_unbiased_grad(model, **kwargs), params, x)
    assert z < PASS_Z, (kwargs, z)


def test_same_statistic_rejects_iwae_with_few_particles():
    model, params, x = toy(quality=0.3)
    z = _z(vj.make_iwae_grad(model, num_particles=2), params, x, num=R_MAIN)
    assert z > REJECT_Z, z


def _off_by_one(t, met, k, m):
    """Planted bug: the ramp of the correction shifted by one, (t-k+1)/(m-k+1)."""
    n = m - k + 1
    t = jnp.asarray(t)
    mcmc = jnp.where((t >= k) & (t <= m), 1.0 / n, 0.0)
    correction = jnp.where((t >= k + 1) & ~met, jnp.minimum(1.0, (t - k + 1) / n), 0.0)
    return mcmc + correction, correction


def _skips_first_term(t, met, k, m):
    """Planted bug: the correction sum starts at t = k+2 instead of k+1."""
    alpha, beta = orig_coefficients(t, met, k, m)
    first = jnp.asarray(t) == k + 1
    return jnp.where(first, alpha - beta, alpha), jnp.where(first, 0.0, beta)


@pytest.mark.parametrize("plant", [_off_by_one, _skips_first_term])
def test_same_statistic_rejects_planted_correction_bugs(monkeypatch, plant):
    model, params, x = toy(quality=0.3)
    monkeypatch.setattr(U, "jacob_coefficients", plant)
    z = _z(vj.make_unbiased_grad(model, **MAIN), params, x, num=R_MAIN)
    assert z > REJECT_Z, z  # measured 8.4 (off-by-one), 10.4 (skipped first term)


def test_capping_is_the_one_source_of_bias():
    """max_iters=1 truncates most corrections: the statistic sees the bias, info reports it."""
    model, params, x = toy(quality=0.3)
    est = vj.make_unbiased_grad(model, **MAIN, max_iters=1)
    z = _z(est, params, x, num=16000)
    _, info = est(params, jnp.tile(x, (500, 1)), jax.random.key(1))
    assert float(info["capped"].mean()) > 0.2
    assert z > REJECT_Z, z  # measured 21.4 at 48000 replicates, so ~12 here


def test_inclusive_kl_encoder_gradient_matches_closed_form():
    model, params, x = toy()
    est = vj.make_unbiased_grad(model, num_particles=3, encoder_objective="inclusive_kl")
    samples = replicate_grads(est, params, x, R, seed=7)
    exact = T.linear_gaussian_inclusive_kl_grad(params, x)
    assert max_abs_z(samples["encoder"], exact) < PASS_Z
    # The self-normalised (IWAE / reweighted-wake-sleep) version with 2 particles is biased.
    biased = replicate_grads(
        vj.make_iwae_grad(model, num_particles=2, encoder_objective="inclusive_kl"),
        params, x, R, seed=7)
    assert max_abs_z(biased["encoder"], exact) > REJECT_Z


def test_scheduled_loop_is_unbiased_too():
    model, params, x = toy()
    z = _z(vj.make_unbiased_grad(model, num_particles=3, k=0, m=1, num_slots=300), params, x,
           num=4000)
    assert z < PASS_Z, z
