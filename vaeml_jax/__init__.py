r"""vaeml-jax: maximum-likelihood VAEs with unbiased log-likelihood gradients from coupled chains.

Example::

    import vaeml_jax as vj
    model = vj.LatentVariableModel(log_joint=..., sample_proposal=..., log_proposal=...)
    unbiased_grad = vj.make_unbiased_grad(model, num_particles=10)
    grads, info = unbiased_grad(params, x, key)   # grads of the LOSS -(1/B) sum_i log p(x_i)

Where things live (one concept per module):

=============================  ===================================================================
``vaeml_jax.estimators``       the gradient estimators, one interface ``(params, x, key)``:
                               unbiased (coupled chains), IWAE, ELBO, MCMC, SUMO, MLMC
``vaeml_jax.couplings``        Markov kernels and their couplings for any log density: the CIS
                               kernel and its maximal coupling (``couplings.cis``), RWM, MALA,
                               HMC, and the H_{k:m} debiasing driver
``vaeml_jax.models``           the model interface (:class:`LatentVariableModel`) and the
                               library's Flax networks (:class:`VAE`, encoders)
``vaeml_jax.diagnostics``      importance-weight and meeting-time diagnostics
``vaeml_jax.data``             datasets (packaged MNIST, files under ``$VAEML_DATA_DIR``, TFDS)
``vaeml_jax.training``         :func:`train`: config, train step, the epoch loop, run directory
``vaeml_jax.evaluation``       test log-likelihood by importance sampling and AIS
``vaeml_jax.checkpoint``       atomic, resumable Orbax checkpoints
``vaeml_jax.distributed``      meshes over devices and processes, ``jax.distributed`` set-up
``vaeml_jax.ground_truth``     exact log-likelihoods and gradients by quadrature for small models
``vaeml_jax.plot``             the run directory's curves
``vaeml_jax.testing``          small models with closed forms, for tests
``vaeml_jax.cli``              the ``vaeml`` command
=============================  ===================================================================

Conventions. Estimators: the model is the only positional argument of ``make_*_grad``, the rest
are keywords, and every estimator is ``estimator(params, x, key) -> (grads, info)``, a
:class:`LossGradient` whose ``grads`` is the gradient of the LOSS (descent-ready for optax) and
whose ``info`` is a :class:`GradientInfo`. Keys: functions of data take the key after the data
(``estimator(params, x, key)``, ``model.sample_proposal(params, x, key, num)``); Markov kernels
and couplings take it first, as in blackjax (``step(key, state, ...)``,
``couplings.cis.init(key, model, params, x, num_particles)``, ``maximal_coupling(key, p, q)``).
"""

from importlib.metadata import PackageNotFoundError, version

from vaeml_jax import couplings, diagnostics
from vaeml_jax.estimators import (
    GradientEstimator,
    GradientInfo,
    LoopOptions,
    LossGradient,
    Rejuvenation,
    make_elbo_grad,
    make_iwae_grad,
    make_mcmc_grad,
    make_mlmc_grad,
    make_sumo_grad,
    make_unbiased_grad,
    sumo_log_likelihood,
)
from vaeml_jax.models import VAE, LatentVariableModel, VAEConfig

try:
    __version__ = version("vaeml-jax")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LatentVariableModel",
    "VAE",
    "VAEConfig",
    "Rejuvenation",
    "LoopOptions",
    "GradientEstimator",
    "GradientInfo",
    "LossGradient",
    "diagnostics",
    "make_unbiased_grad",
    "make_iwae_grad",
    "make_elbo_grad",
    "make_mcmc_grad",
    "make_sumo_grad",
    "make_mlmc_grad",
    "sumo_log_likelihood",
    "couplings",
]
