"""vaeml-jax: maximum-likelihood VAEs with unbiased log-likelihood gradients from coupled chains.

Example::

    import vaeml_jax as vj
    model = vj.LatentVariableModel(log_joint=..., sample_proposal=..., log_proposal=...)
    unbiased_grad = vj.make_unbiased_grad(model, num_particles=10, k=0, m=0)
    grads, info = unbiased_grad(params, x, key)
"""

from vaeml_jax import cis, coupling, couplings, diagnostics
from vaeml_jax.estimators import (
    Rejuvenation,
    make_elbo_grad,
    make_iwae_grad,
    make_mcmc_grad,
    make_sumo_grad,
    make_unbiased_grad,
    sumo_log_likelihood,
)
from vaeml_jax.model import LatentVariableModel

__version__ = "0.1.0"

__all__ = [
    "LatentVariableModel",
    "Rejuvenation",
    "diagnostics",
    "make_unbiased_grad",
    "make_iwae_grad",
    "make_elbo_grad",
    "make_mcmc_grad",
    "make_sumo_grad",
    "sumo_log_likelihood",
    "cis",
    "coupling",
    "couplings",
]
