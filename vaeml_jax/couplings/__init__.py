r"""Unbiased MCMC with couplings for any JAX log density (and for the VAE's CIS chains).

Pure functions over NamedTuple states, blackjax style: ``init``, ``build_kernel(...) -> step``,
``build_coupled_kernel(...) -> step`` with configuration closed over at build time, and an
R ``unbiasedmcmc``-style driver taking the single kernel, the coupled kernel, ``rinit``, the test
function h, k, m, lag and max_iters separately.

Modules:

* :mod:`.base`: chain states, ``init``, exact state equality.
* :mod:`.maximal`: reflection-maximal coupling of two Gaussians.
* :mod:`.proposals`, :mod:`.integrators`: MALA proposal densities, leapfrog.
* :mod:`.rwm`, :mod:`.mala`, :mod:`.hmc`: single and coupled kernels for any log density.
* :mod:`.mixture`: the Heng & Jacob (2019) mixture of a CRN kernel with a maximal RWM step.
* :mod:`.cis`: the VAE's conditional-importance-sampling kernel and its maximal coupling.
* :mod:`.debias`: the H_{k:m} driver, its signed-measure form, vmapping over pairs.
* :mod:`.vae_reference`: the CIS kernels in ``step(key, state)`` form and the VAE gradient for one
  example through the general driver (a reference for the fused estimators).

Meeting-time diagnostics (sampled meeting times, L-lag TV bounds, choosing k and m) live in
:mod:`vaeml_jax.diagnostics` and are re-exported here.

Example::

    from vaeml_jax import couplings as cp
    logdensity = lambda x: -0.5 * jnp.sum(x**2)
    single = cp.hmc.build_kernel(logdensity, step_size=0.3, num_steps=5)
    crn = cp.hmc.build_coupled_kernel(logdensity, step_size=0.3, num_steps=5)
    meet = cp.rwm.build_coupled_kernel(logdensity, scale=0.1)
    single = cp.mixture.build_kernel(single, cp.rwm.build_kernel(logdensity, 0.1), 0.1)
    coupled = cp.mixture.build_coupled_kernel(crn, meet, 0.1)
    rinit = lambda key: cp.init(jax.random.normal(key, (3,)) + 2.0, logdensity)
    est = cp.build_estimator(single, coupled, rinit, lambda s: s.position, k=10, m=50)
    out = cp.run_pairs(est, key, 1000)  # out.estimate: (1000, 3), each unbiased for E[x]
"""

from vaeml_jax.couplings import (
    base,
    cis,
    debias,
    hmc,
    integrators,
    mala,
    maximal,
    mixture,
    proposals,
    rwm,
    vae_reference,
)
from vaeml_jax.couplings.base import CoupledInfo, CoupledState, Info, State, init
from vaeml_jax.couplings.debias import (
    Estimate,
    SignedMeasure,
    build_estimator,
    build_signed_measure,
    evaluate_signed_measure,
    run_pairs,
)
from vaeml_jax.couplings.vae_reference import build_vae_gradient
from vaeml_jax.diagnostics import (
    MeetingTimes,
    sample_meeting_times,
    suggest_k_m,
    tv_upper_bound,
)

__all__ = [
    "base",
    "cis",
    "debias",
    "hmc",
    "integrators",
    "mala",
    "maximal",
    "mixture",
    "proposals",
    "rwm",
    "vae_reference",
    "State",
    "Info",
    "CoupledState",
    "CoupledInfo",
    "init",
    "Estimate",
    "SignedMeasure",
    "build_estimator",
    "build_signed_measure",
    "evaluate_signed_measure",
    "run_pairs",
    "MeetingTimes",
    "sample_meeting_times",
    "tv_upper_bound",
    "suggest_k_m",
    "build_vae_gradient",
]
