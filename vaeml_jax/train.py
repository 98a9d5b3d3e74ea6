r"""Training a VAE by (approximate or unbiased) maximum likelihood: :func:`train`.

The loop is the Flax-examples shape: a pure, jitted ``train_step(state, batch, key)`` that calls one
of the gradient estimators (``grads, info = grad_fn(params, x, key)``) and applies Optax Adam;
per-step metrics are written into on-device buffers and brought to the host once per epoch.

Randomness is a pure function of the seed and the epoch (see :mod:`vaeml_jax.training.loop`) and
the learning rate a function of the epoch, so a run resumed from the checkpoint of epoch ``e``
(params + optimizer state) ends with exactly the parameters of an uninterrupted run with the same
config (on the same backend).

The pieces live in :mod:`vaeml_jax.training`:

====================  ==========================================================================
``config``            :class:`TrainConfig`, its defaults, choices and validation, ``ConfigError``
``optim``             Adam and the learning-rate schedules
``build``             the data, model and gradient estimator a config names
``step``              :class:`TrainState`, ``make_train_step``, the jitted epoch runner
``records``           the per-epoch record (``metrics.jsonl``), the log line, in-training eval
``loop``              the job a config builds, the runner of one epoch, the length estimate
``rundir``            the run directory's files, ``read_config``/``read_metrics``, ``load_run``
====================  ==========================================================================

Every public name of those modules that this module has always offered is re-exported here.

References: Ruiz, Titsias, Cemgil & Doucet (UAI 2021) for the unbiased estimator; Burda, Grosse &
Salakhutdinov (ICLR 2016) for the IWAE learning-rate schedule (``schedule="iwae"``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from vaeml_jax.checkpoint import Checkpointer
from vaeml_jax.training.build import build_vae, load_data, make_estimator
from vaeml_jax.training.config import (  # noqa: F401 (re-exported constants)
    BASE_ESTIMATORS,
    BINARIZATIONS,
    DEFAULT_EPOCHS,
    ENCODER_OBJECTIVE_CHOICES,
    IWAE_SCHEDULE_EPOCHS,
    IWAE_SCHEDULE_STAGES,
    LIKELIHOODS,
    RECIPE_FIELDS,
    RESUMABLE_FIELDS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
    available_estimators,
    with_measured_recipe,
)
from vaeml_jax.training.loop import (
    EpochRunner,
    PhaseRunners,
    TrainingDiverged,
    build_job,
    check_finite,
    describe,
    first_bad_step,
)
from vaeml_jax.training.optim import (
    iwae_learning_rate,
    learning_rate,
    make_optimizer,
    set_learning_rate,
)
from vaeml_jax.training.records import (
    HealthMonitor,
    epoch_diagnostics,
    epoch_record,
    evaluate_during_training,
    format_record,
    record_summary,
)
from vaeml_jax.training.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    MEETING_TIMES_FILE,
    METRICS_FILE,
    RunDirError,
    append_metrics,
    load_run,
    prepare_run_dir,
    read_config,
    read_metrics,
    save_meeting_times,
    truncate_metrics,
    write_atomic,
    write_config,
)
from vaeml_jax.training.step import TrainState, make_train_step

# Earlier private name, still imported by scripts written against it.
_write_atomic = write_atomic

__all__ = [
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
    "train",
    "read_config",
    "read_metrics",
    "IWAE_SCHEDULE_EPOCHS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MEETING_TIMES_FILE",
    "CHECKPOINT_DIR",
]


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    progress_interval: float = 1.0,
) -> dict:
    """Train (or continue training) the VAE of ``config``, writing into ``out_dir``.

    Args:
      config: a :class:`TrainConfig` (resolved and validated here).
      out_dir: the run directory (see :mod:`vaeml_jax.training.rundir` for its contents).
      resume: continue the run in ``out_dir`` up to ``config.epochs`` epochs in total (starting
        from scratch if it holds no run yet). Without it, a directory holding a run is refused.
      progress: show a tqdm bar per epoch (objective, examples/s, mean/max meeting time, ESS,
        the running meeting-time tail index alpha, time left). Its statistics are fetched from
        the device at most every ``progress_interval`` seconds; with ``progress=False`` the
        device is synchronised once per epoch only (and once after the first steps, timed for
        the estimate of the run's length).
      log: where the opening line, the length estimate, one summary line per epoch and the
        (throttled) ``vaeml: warning:`` line of :class:`~vaeml_jax.training.records.HealthMonitor`
        go (default: stderr).

    Returns:
      A summary dict: ``out_dir``, ``epoch`` (epochs completed), ``start_epoch``, ``metrics``
      (the last epoch's record, or None if nothing was run), ``params`` (final, on host).

    Raises:
      ConfigError, RunDirError, vaeml_jax.data.DataError, ValueError (data the model cannot take),
      TrainingDiverged (non-finite loss or gradients: that epoch is not saved, the last good
      checkpoint stays), CheckpointError.
    """
    from vaeml_jax import distributed

    log = log or _log_to_stderr
    config = config.resolved()
    run_dir = Path(out_dir)
    continuing = prepare_run_dir(config, run_dir, resume)
    job = build_job(config)  # data, model, estimator: bad input fails here, nothing written yet
    state = job.initial_state()

    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    log(describe(job, run_dir))
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep_checkpoints) as ckpt:
        start_epoch = 0
        if continuing and ckpt.latest_epoch() is not None:
            state, start_epoch = _restore(ckpt, state)
            log(f"resuming {run_dir} from the checkpoint of epoch {start_epoch}")
        # Fresh and restored states placed alike (committed to the device), so a resumed run
        # compiles to the same program as an uninterrupted one (and hits the compilation cache).
        state = distributed.replicate(state, job.mesh)
        records = truncate_metrics(run_dir, start_epoch)
        if start_epoch >= config.epochs:
            log(
                f"{run_dir} has already been trained for {start_epoch} epochs (--epochs "
                f"{config.epochs}); nothing to do."
            )
            last_record = records[-1] if records else None
            return _summary(run_dir, start_epoch, start_epoch, last_record, state)

        runners = PhaseRunners(
            job,
            start_epoch=start_epoch,
            progress=progress,
            progress_interval=progress_interval,
            log=log,
        )
        health = HealthMonitor(log)
        record = None
        for epoch in range(start_epoch, config.epochs):
            runner = runners.for_epoch(epoch)  # the warm start's, then the main estimator's
            state, record = _train_epoch(runner, state, epoch, run_dir, ckpt, health)
            log(format_record(record, config.epochs))
    return _summary(run_dir, config.epochs, start_epoch, record, state)


def _train_epoch(
    runner: EpochRunner,
    state: TrainState,
    epoch: int,
    run_dir: Path,
    ckpt: Checkpointer,
    health: HealthMonitor,
) -> tuple[TrainState, dict]:
    """One epoch of the runner's phase: set its learning rate, run its steps, check them, record,
    warn about its diagnostics, checkpoint."""
    job = runner.job
    config = job.config  # the phase's: its estimator and learning rate
    lr = learning_rate(config, epoch)
    state = state._replace(opt_state=set_learning_rate(state.opt_state, lr))
    state, host, seconds, compile_seconds = runner.run(state, epoch)
    good = ckpt.latest_epoch()
    _warn_before_divergence(host, epoch, config, health)
    check_finite(host, epoch, job.steps_per_epoch, lr, good, run_dir / CHECKPOINT_DIR)
    evaluation = None
    if job.eval_x is not None and (epoch + 1) % config.eval_every == 0:
        evaluation = evaluate_during_training(
            job.vae, state.params, job.eval_x, config, job.eval_key(epoch)
        )
    record = epoch_record(
        host,
        epoch=epoch + 1,
        seconds=seconds,
        batch_size=config.batch_size,
        lr=lr,
        num_devices=job.num_devices,
        compile_seconds=compile_seconds,
        evaluation=evaluation,
        phase=job.phase,
        estimator=config.estimator,
    )
    append_metrics(run_dir, record)
    save_meeting_times(run_dir, host["meeting_time"])
    health.check(record_summary(record), epoch + 1, _max_iters(config))
    last = epoch + 1 == config.epochs
    if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
        ckpt.save(
            epoch + 1,
            {"params": state.params, "opt_state": state.opt_state},
            {"epoch": epoch + 1, "config": job.run_config.to_dict(), "version": _version()},
        )
    return state, record


def _max_iters(config: TrainConfig) -> int | None:
    return config.max_iters if config.estimator == "unbiased" else None


def _warn_before_divergence(host: dict, epoch: int, config: TrainConfig, health) -> None:
    """A diverged epoch's diagnostics up to its bad step (NaN importance weights say why), logged
    before :func:`check_finite` stops the run."""
    bad = first_bad_step(host)
    if bad is not None:
        steps = {k: v[: bad + 1] for k, v in host.items()}  # later rows were never run
        health.check(epoch_diagnostics(steps) | _capped(steps), epoch + 1, _max_iters(config))


def _capped(host: dict) -> dict:
    return {"capped_fraction": float(host["capped"].mean()) if host["capped"].size else 0.0}


def _restore(ckpt: Checkpointer, state: TrainState) -> tuple[TrainState, int]:
    """The latest readable checkpoint, restored into the structure of ``state``."""
    restored, _, epoch = ckpt.restore({"params": state.params, "opt_state": state.opt_state})
    return TrainState(restored["params"], restored["opt_state"]), epoch


def _summary(run_dir: Path, epoch: int, start_epoch: int, record: Any, state: TrainState) -> dict:
    return {
        "out_dir": str(run_dir),
        "epoch": epoch,
        "start_epoch": start_epoch,
        "metrics": record,
        "params": jax.device_get(state.params),
    }


def _log_to_stderr(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _version() -> str:
    from vaeml_jax import __version__

    return __version__
