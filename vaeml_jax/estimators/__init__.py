"""Gradient estimators with one interface: ``grads, info = grad_fn(params, x, key)``."""

from vaeml_jax.estimators.bounds import make_elbo_grad, make_iwae_grad
from vaeml_jax.estimators.mcmc import make_mcmc_grad
from vaeml_jax.estimators.unbiased import jacob_coefficients, make_unbiased_grad

__all__ = [
    "make_unbiased_grad",
    "make_iwae_grad",
    "make_elbo_grad",
    "make_mcmc_grad",
    "jacob_coefficients",
]
