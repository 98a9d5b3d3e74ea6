"""What a config builds: its data (:func:`load_data`), model (:func:`build_vae`) and gradient
estimator (:func:`make_estimator`)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from vaeml_jax.training.config import ConfigError, TrainConfig, parse_rejuvenation

__all__ = ["load_data", "build_vae", "make_estimator"]


def load_data(config: TrainConfig, data_dir: str | None = None) -> tuple[Any, bool, np.ndarray]:
    """``(dataset, binarize_train, test_x)`` for a resolved config.

    ``binarize_train``: whether :func:`vaeml_jax.data.epoch_batches` redraws Bernoulli pixels
    each epoch. ``test_x`` is the test set every command evaluates on: binarized once with seed 0
    (``binarized_test_set``) unless ``binarization="none"`` (the intensities). ``data_dir``
    overrides the config's.
    """
    from vaeml_jax.data import binarized_test_set, load_dataset

    dd = data_dir if data_dir is not None else config.data_dir
    b = config.binarization
    dataset = load_dataset(
        config.dataset, dd, binarization="static" if b == "static" else "dynamic", seed=0
    )
    if b == "none":
        return dataset, False, np.asarray(dataset.test, np.float32)
    test_x = np.asarray(binarized_test_set(dataset, seed=0), np.float32)
    return dataset, not dataset.binarized, test_x


def build_vae(config: TrainConfig) -> Any:
    """The VAE of ``config`` (vaeml_jax.models)."""
    from vaeml_jax.models import VAE, VAEConfig

    return VAE(
        VAEConfig(
            hidden=tuple(config.hidden),
            latent_dim=config.latent_dim,
            two_layer=config.two_layer,
            likelihood=config.likelihood,
            encoder=config.encoder,
            iaf_layers=config.iaf_layers,
            iaf_hidden=tuple(config.iaf_hidden),
        )
    )


def make_estimator(config: TrainConfig, model: Any) -> Any:
    """The gradient estimator ``grads, info = f(params, x, key)`` chosen by ``config``."""
    import vaeml_jax as vj

    # Validated strings (TrainConfig.validate): the constructors' Literal types by construction.
    enc: Any = None if config.encoder_objective == "none" else config.encoder_objective
    k_enc = config.encoder_particles
    own = {} if k_enc is None else {"encoder_particles": k_enc}  # the objective's own draws
    if config.estimator == "elbo":
        return vj.make_elbo_grad(
            model, num_particles=config.num_particles, encoder_objective=enc, **own
        )
    if config.estimator == "iwae":
        return vj.make_iwae_grad(
            model, num_particles=config.num_particles, encoder_objective=enc, **own
        )
    if config.estimator == "mcmc":
        return vj.make_mcmc_grad(
            model,
            num_particles=config.num_particles,
            num_steps=config.num_steps,
            burn_in=config.burn_in,
            encoder_objective=enc,
            **own,
        )
    if config.estimator == "unbiased":
        return vj.make_unbiased_grad(
            model,
            num_particles=config.num_particles,
            k=config.k,
            m=config.m,
            num_chains=config.num_chains,
            max_iters=config.max_iters,
            encoder_objective=enc,
            rejuvenation=(
                None if config.rejuvenation is None else parse_rejuvenation(config.rejuvenation)
            ),
            loop=vj.LoopOptions(num_slots=cast(Any, config.num_slots)),
            **own,
        )
    if config.estimator == "mlmc":
        return vj.make_mlmc_grad(
            model,
            num_particles=config.num_particles,
            rate=config.level_rate,
            max_level=config.max_level,
            estimator=cast(Any, config.mlmc_estimator),
            encoder_objective=enc,
            **own,
        )
    if config.estimator == "sumo":
        from vaeml_jax.estimators.sumo import make_sumo_grad

        return make_sumo_grad(
            model, min_terms=config.min_terms, max_terms=config.max_terms, encoder_objective=enc
        )
    raise ConfigError(f"unknown estimator {config.estimator!r}")  # pragma: no cover
