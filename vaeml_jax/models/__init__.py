"""Models: the interface every estimator takes, and the library's Flax networks.

* :mod:`.interface`: :class:`LatentVariableModel`, three pure functions of ONE example and ONE
  latent over a params pytree (any model plugs in; nothing there depends on Flax), and its checks.
* :mod:`.vae`: the IWAE paper's VAE (:class:`VAE`, :class:`VAEConfig`) as Flax NNX networks.
* :mod:`.encoders`: richer proposal families for the VAE (full-covariance Gaussian, IAF).
"""

from vaeml_jax.models.encoders import (
    IAF_S_BIAS,
    MADE,
    FullCovGaussianMLP,
    IAFGaussianMLP,
    full_cov_log_prob,
    made_masks,
)
from vaeml_jax.models.interface import (
    LatentVariableModel,
    check_batch,
    check_model,
    log_weights,
    proposal_sampler,
    sample_and_log_proposal,
)
from vaeml_jax.models.vae import (
    MLP,
    VAE,
    BernoulliMLP,
    GaussianDecoderMLP,
    GaussianMLP,
    VAEConfig,
    bernoulli_log_prob,
    build_vae,
    gaussian_log_prob,
)

__all__ = [
    "LatentVariableModel",
    "log_weights",
    "sample_and_log_proposal",
    "proposal_sampler",
    "check_model",
    "check_batch",
    "VAEConfig",
    "VAE",
    "build_vae",
    "MLP",
    "GaussianMLP",
    "BernoulliMLP",
    "GaussianDecoderMLP",
    "bernoulli_log_prob",
    "gaussian_log_prob",
    "made_masks",
    "MADE",
    "FullCovGaussianMLP",
    "IAFGaussianMLP",
    "full_cov_log_prob",
    "IAF_S_BIAS",
]
