"""Optimizer and learning-rate schedules: Adam with its learning rate in the optimizer state.

The learning rate is a function of the 0-based epoch alone (:func:`learning_rate`: constant, or the
IWAE paper's 8-stage schedule :func:`iwae_learning_rate`); the loop writes it into the optimizer
state at the start of every epoch (:func:`set_learning_rate`), so a resumed run follows exactly the
schedule of an uninterrupted one and one compiled train step serves every learning rate.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from vaeml_jax.training.config import IWAE_SCHEDULE_STAGES, TrainConfig

__all__ = ["iwae_learning_rate", "learning_rate", "make_optimizer", "set_learning_rate"]


def iwae_learning_rate(epoch: int, base: float = 1e-3) -> float:
    r"""The IWAE schedule's learning rate for 0-based ``epoch``.

    Stage i = 1..8 lasts 3^(i-1) epochs with lr = base * 10^(-(i-1)/7), the multiplier rounded to
    one decimal in the mantissa (1.0, 0.72, 0.52, 0.37, ...: 1e-3 decaying to 1e-4). Epochs past
    the 3,280 of the schedule keep the last stage's rate.
    """
    start = 0
    stage = IWAE_SCHEDULE_STAGES
    for i in range(1, IWAE_SCHEDULE_STAGES + 1):
        start += 3 ** (i - 1)
        if epoch < start:
            stage = i
            break
    mult = 10.0 ** (-(stage - 1) / 7)
    mult = float(f"{mult:.1e}")  # one decimal in the mantissa
    return base * mult


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate used during 0-based ``epoch``."""
    if config.schedule == "iwae":
        return iwae_learning_rate(epoch, config.lr)
    return float(config.lr)


def make_optimizer(config: TrainConfig | None = None) -> optax.GradientTransformation:
    """Adam with its learning rate held in the optimizer state (``optax.inject_hyperparams``).

    The training loop sets it at the start of every epoch with :func:`set_learning_rate`
    (``learning_rate(config, epoch)``), so the schedule is a function of the epoch alone (exact on
    resume) and one compiled train step serves every learning rate.
    """
    lr = 1e-3 if config is None else float(config.lr)
    return optax.inject_hyperparams(optax.adam)(learning_rate=lr)


def set_learning_rate(opt_state: Any, lr: float) -> Any:
    """``opt_state`` of :func:`make_optimizer` with its learning rate replaced by ``lr``."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, dtype=jnp.float32)
    return opt_state._replace(hyperparams=hp)
