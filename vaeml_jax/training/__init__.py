r"""Training a VAE by (approximate or unbiased) maximum likelihood: :func:`train`.

The loop is the Flax-examples shape: a pure, jitted ``train_step(state, batch, key)`` that calls one
of the gradient estimators (``grads, info = grad_fn(params, x, key)``) and applies Optax Adam;
per-step metrics are written into on-device buffers and brought to the host once per epoch.

Randomness is a pure function of the seed and the epoch and the learning rate a function of the
epoch, so a run resumed from the checkpoint of epoch ``e`` (params + optimizer state) ends with
exactly the parameters of an uninterrupted run with the same config (on the same backend).

====================  ==========================================================================
``config``            :class:`TrainConfig`, its defaults, choices and validation, ``ConfigError``
``optim``             Adam and the learning-rate schedules
``build``             the data, model and gradient estimator a config names
``step``              :class:`TrainState`, ``make_train_step``, the jitted epoch runner
``records``           the per-epoch record (``metrics.jsonl``), the log line, in-training eval
``loop``              :func:`train`: the job a config builds, the epoch loop, the length estimate
``rundir``            the run directory's files, ``read_config``/``read_metrics``, ``load_run``
====================  ==========================================================================

References: Ruiz, Titsias, Cemgil & Doucet (UAI 2021) for the unbiased estimator; Burda, Grosse &
Salakhutdinov (ICLR 2016) for the IWAE learning-rate schedule (``schedule="iwae"``).
"""

from vaeml_jax.training.build import build_vae, load_data, make_estimator
from vaeml_jax.training.config import (
    IWAE_SCHEDULE_EPOCHS,
    RECIPE_FIELDS,
    ConfigError,
    TrainConfig,
    available_estimators,
    with_measured_recipe,
)
from vaeml_jax.training.loop import TrainingDiverged, train
from vaeml_jax.training.optim import (
    iwae_learning_rate,
    learning_rate,
    make_optimizer,
    set_learning_rate,
)
from vaeml_jax.training.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    MEETING_TIMES_FILE,
    METRICS_FILE,
    RunDirError,
    load_run,
    read_config,
    read_metrics,
)
from vaeml_jax.training.step import TrainState, make_train_step

__all__ = [
    "train",
    "TrainConfig",
    "TrainState",
    "ConfigError",
    "RunDirError",
    "TrainingDiverged",
    "available_estimators",
    "with_measured_recipe",
    "iwae_learning_rate",
    "learning_rate",
    "make_optimizer",
    "set_learning_rate",
    "make_estimator",
    "make_train_step",
    "build_vae",
    "load_data",
    "load_run",
    "read_config",
    "read_metrics",
    "IWAE_SCHEDULE_EPOCHS",
    "RECIPE_FIELDS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MEETING_TIMES_FILE",
    "CHECKPOINT_DIR",
]
