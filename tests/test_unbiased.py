"""Unbiasedness of make_unbiased_grad against the closed forms of the linear-Gaussian model.

For one example x, R independent replicates of the estimator (vmapped over keys, batch of one) are
compared coordinate by coordinate with the exact expectation: on the decoder the gradient of the
LOSS -log p(x) (``jax.grad`` of ``linear_gaussian_log_marginal``), on the encoder, with
``encoder_objective="inclusive_kl"``, the gradient of KL(p(z|x) || q(z|x)) and with None exact
zeros. The statistic is max |z| over all coordinates (see ``_stats``); a correct configuration
passes below the Bonferroni threshold at family-wise level 1e-4 and each planted bug must exceed
twice that threshold under the same statistic, replicate count and seed:

* IWAE with S=2 (the biased estimator H_{k:m} corrects; its encoder part is reweighted wake-sleep),
* the correction's ramp min(1, (t-k)/(m-k+1)) shifted by one step either way (planted by
  monkeypatching ``unbiased.jacob_coefficients``, which the estimator looks up at trace time).

(An off-by-one at the correction's upper limit tau - 1 cannot be planted through the coefficients
and would not matter in one direction: at t = tau the two tuples are equal, so h(X_t) - h(Y_{t-1})
is exactly zero. Capping by ``max_iters`` is checked in test_validation.py.)

Measured (max |z|; pass below 4.56, reject above 9.12): reference configuration 1.43 (128k
replicates), S2-k0-m0 1.21 and S3-k1-m3-C2 1.00 (32k); IWAE-2 189, ramp late 26.9, ramp early 13.8
(128k, same seed as the reference).

Rejuvenation (kept particles moved by MALA + a reflection-maximal random walk between CIS steps)
is checked the same way, and a MALA whose Metropolis ratio drops the proposal densities (an
unadjusted, biased move) must be rejected: measured 1.95 and 16.8 (96k replicates).
"""

import functools

import jax.numpy as jnp
import pytest
from _stats import REJECT_FACTOR, exact_grads, pass_threshold, replicate_grads, toy, z_scores

import vaeml_jax as vj
from vaeml_jax.estimators import _rejuvenation as RJ
from vaeml_jax.estimators import unbiased as U

QUALITY = 0.3  # a poor proposal: long chains, a large IWAE bias, a large correction
# The plain loop: the reference the work queue is checked against, bit for bit (test_scheduled.py).
MAIN = dict(
    num_particles=2, k=0, m=1, encoder_objective="inclusive_kl", loop=vj.LoopOptions(num_slots=None)
)
R_MAIN = 96_000  # replicates of the reference and its plants (96k: early-ramp plant still z ~12)
R_OTHER = 32_000
SEED = 0
_original_coefficients = U.jacob_coefficients


def statistic(estimator, encoder, num_replicates, seed=SEED):
    """(max |z|, pass threshold) of ``estimator`` on the toy example against the closed form."""
    model, params, x = toy(quality=QUALITY)
    exact = exact_grads(params, x, encoder)
    samples = replicate_grads(estimator, params, x, num_replicates, seed=seed, batch=32_000)
    samples = {name: samples[name] for name in exact}  # encoder "iwae"/"elbo": decoder only
    z = z_scores(samples, exact)
    return float(abs(z).max()), pass_threshold(z.size)


@functools.cache
def _main_statistic():
    model, _, _ = toy(quality=QUALITY)
    return statistic(vj.make_unbiased_grad(model, **MAIN), "inclusive_kl", R_MAIN)


def test_reference_configuration_matches_closed_form():
    """S=2, k=0, m=1 with the inclusive-KL encoder gradient: 20 coordinates, 128k replicates."""
    z, threshold = _main_statistic()
    assert z < threshold, (z, threshold)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_particles=2, k=0, m=0, encoder_objective=None),  # H_0: IWAE + its correction
        dict(num_particles=3, k=1, m=3, num_chains=2, encoder_objective="inclusive_kl"),
    ],
    ids=["S2-k0-m0", "S3-k1-m3-C2-inclusive"],
)
def test_other_configurations_match_closed_form(kwargs):
    model, _, _ = toy(quality=QUALITY)
    z, threshold = statistic(
        vj.make_unbiased_grad(model, **kwargs), kwargs["encoder_objective"], R_OTHER
    )
    assert z < threshold, (kwargs, z, threshold)


def test_same_statistic_rejects_iwae_with_few_particles():
    model, _, _ = toy(quality=QUALITY)
    iwae = vj.make_iwae_grad(model, num_particles=2, encoder_objective="inclusive_kl")
    z, threshold = statistic(iwae, "inclusive_kl", R_MAIN)
    assert z > REJECT_FACTOR * threshold, (z, threshold)


def _ramp_late(t, met, k, m):
    """Planted bug: ramp min(1, (t-k-1)/(m-k+1)), one step late (drops the first correction)."""
    n = m - k + 1
    t = jnp.asarray(t)
    mcmc = jnp.where((t >= k) & (t <= m), 1.0 / n, 0.0)
    correction = jnp.where((t >= k + 1) & ~met, jnp.minimum(1.0, (t - k - 1) / n), 0.0)
    return mcmc + correction, correction


def _ramp_early(t, met, k, m):
    """Planted bug: ramp min(1, (t-k+1)/(m-k+1)), one step early (over-weights the correction)."""
    n = m - k + 1
    t = jnp.asarray(t)
    mcmc = jnp.where((t >= k) & (t <= m), 1.0 / n, 0.0)
    correction = jnp.where((t >= k + 1) & ~met, jnp.minimum(1.0, (t - k + 1) / n), 0.0)
    return mcmc + correction, correction


def test_planted_coefficients_differ_from_the_real_ones():
    """The planted variants are genuine off-by-ones of H_{k:m}'s weights (not no-ops)."""
    t, met = jnp.arange(6), jnp.zeros(6, bool)
    alpha, beta = _original_coefficients(t, met, 0, 1)
    assert list(beta) == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert list(alpha) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert list(_ramp_late(t, met, 0, 1)[1]) == [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    assert list(_ramp_early(t, met, 0, 1)[1]) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    # The weights of h(X_t) sum to 1 over the window k..m: the MCMC average is an average.
    alpha, beta = _original_coefficients(jnp.arange(2, 7), jnp.ones(5, bool), 2, 5)
    assert float(alpha.sum()) == pytest.approx(1.0) and float(beta.sum()) == 0.0


@pytest.mark.parametrize("plant", [_ramp_late, _ramp_early], ids=["ramp-late", "ramp-early"])
def test_same_statistic_rejects_planted_correction_bugs(monkeypatch, plant):
    monkeypatch.setattr(U, "jacob_coefficients", plant)
    model, _, _ = toy(quality=QUALITY)
    z, threshold = statistic(vj.make_unbiased_grad(model, **MAIN), "inclusive_kl", R_MAIN)
    assert z > REJECT_FACTOR * threshold, (plant.__name__, z, threshold)


REJUVENATED = dict(MAIN, rejuvenation=U.Rejuvenation(step_size=1.0, meet_scale=0.5))


@pytest.mark.slow
def test_rejuvenated_chains_match_closed_form():
    model, _, _ = toy(quality=QUALITY)
    z, threshold = statistic(vj.make_unbiased_grad(model, **REJUVENATED), "inclusive_kl", R_MAIN)
    assert z < threshold, (z, threshold)


@pytest.mark.slow
def test_same_statistic_rejects_unadjusted_rejuvenation(monkeypatch):
    """Planted bug: MALA accepting on the density ratio alone (proposal densities dropped)."""
    monkeypatch.setattr(RJ, "_mala_proposal_logpdf", lambda *args: jnp.zeros(()))
    model, _, _ = toy(quality=QUALITY)
    z, threshold = statistic(vj.make_unbiased_grad(model, **REJUVENATED), "inclusive_kl", R_MAIN)
    assert z > REJECT_FACTOR * threshold, (z, threshold)
