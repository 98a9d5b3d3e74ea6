"""Gradient estimators with one interface: ``grads, info = grad_fn(params, x, key)``.

Every constructor takes the model as its only positional argument and everything else by keyword
(``num_particles``, ``encoder_objective``, ``encoder_particles`` mean the same in all of them).
The estimator returns a :class:`LossGradient` ``(grads, info)``: ``grads`` is the gradient of the
LOSS (on theta an estimate of -(1/B) sum_i grad log p(x_i)), ready for an optax update;
``info`` is a :class:`GradientInfo` (a dict with documented fields).
"""

from vaeml_jax.estimators._common import (
    EncoderObjective,
    GradientEstimator,
    GradientInfo,
    LossGradient,
)
from vaeml_jax.estimators.bounds import make_elbo_grad, make_iwae_grad
from vaeml_jax.estimators.mcmc import make_mcmc_grad
from vaeml_jax.estimators.mlmc import (
    MLMCInfo,
    make_mlmc_grad,
    mlmc_expected_num_draws,
    mlmc_level_probabilities,
)
from vaeml_jax.estimators.sumo import (
    SumoEncoderObjective,
    SumoInfo,
    make_sumo_grad,
    sumo_expected_num_terms,
    sumo_log_likelihood,
)
from vaeml_jax.estimators.unbiased import (
    LoopOptions,
    Rejuvenation,
    auto_num_slots,
    jacob_coefficients,
    make_unbiased_grad,
)

__all__ = [
    "make_unbiased_grad",
    "make_iwae_grad",
    "make_elbo_grad",
    "make_mcmc_grad",
    "make_sumo_grad",
    "make_mlmc_grad",
    "mlmc_level_probabilities",
    "mlmc_expected_num_draws",
    "MLMCInfo",
    "SumoInfo",
    "sumo_log_likelihood",
    "sumo_expected_num_terms",
    "jacob_coefficients",
    "auto_num_slots",
    "LoopOptions",
    "Rejuvenation",
    "GradientEstimator",
    "GradientInfo",
    "LossGradient",
    "EncoderObjective",
    "SumoEncoderObjective",
]
