"""Gradient estimators with one interface: ``grads, info = grad_fn(params, x, key)``."""

from vaeml_jax.estimators.bounds import make_elbo_grad, make_iwae_grad
from vaeml_jax.estimators.mcmc import make_mcmc_grad
from vaeml_jax.estimators.sumo import make_sumo_grad, sumo_expected_num_terms, sumo_log_likelihood
from vaeml_jax.estimators.unbiased import Rejuvenation, jacob_coefficients, make_unbiased_grad

__all__ = [
    "make_unbiased_grad",
    "make_iwae_grad",
    "make_elbo_grad",
    "make_mcmc_grad",
    "make_sumo_grad",
    "sumo_log_likelihood",
    "sumo_expected_num_terms",
    "jacob_coefficients",
    "Rejuvenation",
]
