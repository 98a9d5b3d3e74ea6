"""The pieces of the training loop: the job a config builds, and the runner of one epoch.

:func:`build_job` turns a resolved config into a :class:`Job` (data, mesh, model, estimator, the
jitted step; it checks the data and writes nothing). :class:`EpochRunner` runs the steps of one
epoch (compiling the step once, ahead of time, so epoch timings exclude compilation), drives the
progress bar, prints the run's estimated length once its first steps are timed, and returns the
epoch's per-step metrics on the host. :func:`check_finite` turns a non-finite step into
:class:`TrainingDiverged`.

Randomness: with ``root = jax.random.key(seed)``, parameters come from ``fold_in(root, 0)``,
epoch ``e`` (0-based) draws its permutation, binarisation and estimator keys from
``fold_in(fold_in(root, 1), e)`` and its in-training evaluation from
``fold_in(fold_in(root, 2), e)``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vaeml_jax.training.build import build_vae, load_data, make_estimator
from vaeml_jax.training.config import ConfigError, TrainConfig
from vaeml_jax.training.optim import make_optimizer
from vaeml_jax.training.records import format_duration, progress_postfix
from vaeml_jax.training.step import TrainState, make_epoch_runner, make_train_step, metric_shapes

__all__ = [
    "TrainingDiverged",
    "Job",
    "build_job",
    "describe",
    "EpochRunner",
    "PhaseRunners",
    "check_finite",
    "first_bad_step",
]

# Steps timed (after compilation) for the estimate of the run's length.
ESTIMATE_STEPS = 20


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; nothing from that epoch was saved."""


@dataclasses.dataclass
class Job:
    """Everything a training run builds from its config before anything is written."""

    config: TrainConfig
    vae: Any
    mesh: jax.sharding.Mesh
    num_devices: int
    train_x: np.ndarray
    eval_x: np.ndarray | None
    steps_per_epoch: int
    optimizer: optax.GradientTransformation
    grad_fn: Callable
    train_step: Callable
    root: jax.Array
    train_dev: jax.Array  # the training images on device
    binarize: bool  # redraw Bernoulli pixels every epoch
    run_config: TrainConfig | None = None  # the whole run's config (``config`` is the phase's)
    phase: str = "main"

    def for_phase(self, phase: str) -> Job:
        """This job with the estimator and train step of ``phase`` (the data, model, mesh and
        optimizer are shared, so the Adam state carries over from one phase to the next)."""
        run_config = self.run_config or self.config
        if phase == "main":
            return (
                dataclasses.replace(self, config=run_config, phase="main")
                if self.phase != phase
                else self
            )
        config = run_config.warm_start_config()
        grad_fn, train_step = _estimator_and_step(config, self.vae, self.mesh, self.optimizer)
        return dataclasses.replace(
            self, config=config, grad_fn=grad_fn, train_step=train_step, phase=phase
        )

    def epoch_data(self, epoch: int) -> tuple[jax.Array, jax.Array]:
        """``(batches, steps_key)`` of 0-based ``epoch``: (steps, B, D) sharded over the mesh."""
        from vaeml_jax import distributed
        from vaeml_jax.data import epoch_batches

        train_root = jax.random.fold_in(self.root, 1)
        data_key, steps_key = jax.random.split(jax.random.fold_in(train_root, epoch))
        batches = epoch_batches(
            data_key, self.train_dev, self.config.batch_size, binarize=self.binarize
        )
        return distributed.shard_batches(batches, self.mesh), steps_key

    def eval_key(self, epoch: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.root, 2), epoch)

    def initial_state(self) -> TrainState:
        """Parameters from ``fold_in(root, 0)`` (decoder bias from the data mean), fresh Adam."""
        data_mean = jnp.asarray(self.train_x.mean(0))
        params = self.vae.init(jax.random.fold_in(self.root, 0), data_mean=data_mean)
        return TrainState(params, self.optimizer.init(params))


def build_job(config: TrainConfig) -> Job:
    """Data, mesh, model, estimator and train step of a resolved ``config``.

    Bad input (data the model cannot take, a batch size that does not divide over the devices)
    raises here, before anything is written.
    """
    from vaeml_jax import distributed

    dataset, binarize, test_x = load_data(config)
    train_x = np.asarray(dataset.train, np.float32)
    if config.max_train_examples is not None:
        train_x = train_x[: config.max_train_examples]
    if train_x.ndim != 2 or not np.all(np.isfinite(train_x)):
        raise ValueError(
            f"the training data of {config.dataset!r} must be a finite (N, D) array; "
            f"got shape {train_x.shape}"
            + ("" if np.all(np.isfinite(train_x)) else " with non-finite values")
            + ". Check the data files."
        )
    n_train = train_x.shape[0]
    if n_train < config.batch_size:
        raise ConfigError(
            f"the training set has {n_train} examples, fewer than batch_size "
            f"{config.batch_size}; lower --batch-size."
        )
    # One code path for 1 or N devices (and hosts): the batch is sharded over a mesh.
    try:
        mesh = distributed.make_mesh(config.devices)
        distributed.check_divisible(config.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    vae = build_vae(config)
    optimizer = make_optimizer(config)
    grad_fn, train_step = _estimator_and_step(config, vae, mesh, optimizer)
    job = Job(
        config=config,
        vae=vae,
        mesh=mesh,
        num_devices=distributed.num_devices(mesh),
        train_x=train_x,
        eval_x=test_x[: config.eval_max_examples] if config.eval_every else None,
        steps_per_epoch=n_train // config.batch_size,
        optimizer=optimizer,
        grad_fn=grad_fn,
        train_step=train_step,
        root=jax.random.key(config.seed),
        train_dev=jnp.asarray(train_x),
        binarize=binarize,
        run_config=config,
    )
    # The data the model will see must suit its likelihood (non-binary pixels for a Bernoulli
    # decoder, NaNs, wrong width): checked on the first batch before anything is written.
    first_batches, _ = job.epoch_data(0)
    vae.check_data(np.asarray(first_batches[0]))
    return job


def _estimator_and_step(config: TrainConfig, vae, mesh, optimizer) -> tuple[Callable, Callable]:
    """The estimator a (phase's) config names and its train step, sharded over ``mesh``."""
    from vaeml_jax import distributed

    grad_fn = make_estimator(config, vae.model)
    return grad_fn, make_train_step(distributed.data_parallel(grad_fn, mesh), optimizer)


def describe(job: Job, run_dir: Path) -> str:
    """The line that opens a run's log."""
    c = job.config
    window = f", k={c.k}, m={c.m}, C={c.num_chains}" if c.estimator == "unbiased" else ""
    warm = ""
    if c.warm_start_epochs:
        w = c.warm_start_config()
        warm = (
            f" after {c.warm_start_epochs} warm-start "
            + ("epoch" if c.warm_start_epochs == 1 else "epochs")
            + f" of {w.estimator} "
            f"(S={w.num_particles}, lr {w.lr:g})"
        )
    return (
        f"vaeml train: {c.estimator} estimator (S={c.num_particles}{window}){warm} on "
        f"{c.dataset} ({c.binarization}, {job.train_x.shape[0]} examples), {c.epochs} epochs, "
        f"batch {c.batch_size}, lr {c.lr:g} ({c.schedule}) -> {run_dir}"
    )


class EpochRunner:
    """Runs the steps of an epoch; compiled on first use, with progress bar and length estimate.

    Args:
      job: what :func:`build_job` built.
      start_epoch: the first epoch this process runs (0, or the resumed checkpoint's).
      progress: show a tqdm bar per epoch (objective, examples/s, mean/max meeting time, time
        left in the run); its statistics are fetched from the device at most every
        ``progress_interval`` seconds. Without it the device is synchronised once per epoch, and
        once more after the first timed steps.
      log: where the estimate of the run's length goes (once, after the first timed steps).
      end_epoch: the epoch this runner's estimate runs to (default: the run's last).
      label: what the estimate is of (``"warm-start phase"``); default ``"total"`` or
        ``"remaining"``.
    """

    def __init__(
        self,
        job: Job,
        *,
        start_epoch: int,
        progress: bool,
        progress_interval: float,
        log: Callable[[str], None],
        end_epoch: int | None = None,
        label: str | None = None,
    ):
        self.job = job
        self.end_epoch = job.config.epochs if end_epoch is None else end_epoch
        self.label = label
        self.start_epoch = start_epoch
        self.progress = progress
        self.progress_interval = progress_interval
        self.log = log
        self._run_step = make_epoch_runner(job.train_step)
        self._compiled = None
        self._metric_shapes = None
        self.seconds_per_step: float | None = None  # measured after compilation

    def run(self, state: TrainState, epoch: int) -> tuple[TrainState, dict, float, float | None]:
        """Run 0-based ``epoch``: ``(state, host_metrics, seconds, compile_seconds or None)``.

        ``host_metrics`` holds the per-step metrics of the whole epoch, (steps, ...) arrays;
        ``seconds`` is the epoch's wall time without compilation.
        """
        from tqdm.auto import tqdm

        job, config, steps = self.job, self.job.config, self.job.steps_per_epoch
        batches, steps_key = job.epoch_data(epoch)
        if self._metric_shapes is None:
            self._metric_shapes = metric_shapes(
                job.grad_fn, job.train_step, state, batches[0], steps_key
            )
        buffers = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), s.dtype), self._metric_shapes)
        compile_seconds = None
        if self._compiled is None:  # compiled ahead of time so epoch timings exclude it
            tc = time.perf_counter()
            self._compiled = self._run_step.lower(state, buffers, batches, 0, steps_key).compile()
            compile_seconds = time.perf_counter() - tc
        bar = tqdm(  # opened after compiling, so its rate and ETA are the steps' alone
            total=steps,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not self.progress,
            leave=False,
            file=sys.stderr,
            unit="step",
        )
        timing = self.seconds_per_step is None
        t0 = time.perf_counter()
        last_refresh, shown = t0, 0
        for i in range(steps):
            state, buffers = self._compiled(state, buffers, batches, i, steps_key)
            if timing and i + 1 == min(ESTIMATE_STEPS, steps):
                jax.block_until_ready(state)
                self._estimate(i + 1, time.perf_counter() - t0, epoch)
            now = time.perf_counter()
            if self.progress and (now - last_refresh >= self.progress_interval or i == 0):
                host = jax.device_get(buffers)  # waits for step i: timings below are real
                if not np.all(host["finite"][: i + 1]):
                    break  # reported by check_finite, with the step number
                elapsed = time.perf_counter() - t0
                bar.set_postfix(self._postfix(host, i + 1, elapsed, epoch))
                bar.update(i + 1 - shown)
                shown, last_refresh = i + 1, time.perf_counter()
        host = jax.device_get(buffers)  # the one sync of the epoch
        seconds = time.perf_counter() - t0
        if self.progress:
            bar.set_postfix(self._postfix(host, steps, seconds, epoch))
        bar.update(steps - shown)
        bar.close()
        return state, host, seconds, compile_seconds

    def _steps_left(self, epoch: int, done: int) -> int:
        return (self.job.config.epochs - epoch) * self.job.steps_per_epoch - done

    def _postfix(self, host: dict, done: int, elapsed: float, epoch: int) -> dict[str, str]:
        post = progress_postfix(host, done, elapsed, self.job.config.batch_size)
        if done:
            post["run left"] = format_duration(elapsed / done * self._steps_left(epoch, done))
        return post

    def _estimate(self, done: int, seconds: float, epoch: int) -> None:
        """Log the run's estimated length from its first ``done`` timed steps (once)."""
        config, steps = self.job.config, self.job.steps_per_epoch
        self.seconds_per_step = seconds / done
        epochs = self.end_epoch - self.start_epoch
        total = self.seconds_per_step * epochs * steps
        what = self.label or ("total" if self.start_epoch == 0 else "remaining")
        line = (
            f"vaeml: estimated {what} {format_duration(total)} (first {done} steps: "
            f"{self.seconds_per_step:.2g} s/step, {steps} steps/epoch, {epochs} "
            + ("epoch" if epochs == 1 else "epochs")
            + (", plus evaluations" if config.eval_every else "")
            + ")"
        )
        if total > 30 * 60:
            line += "; use --epochs/--max-train-examples for a quicker run"
        self.log(line)


class PhaseRunners:
    """The :class:`EpochRunner` of each phase of a run (warm start, main), each built when its
    phase's first epoch comes: a run resumed in its main phase never compiles the warm start's
    step, and each phase's length estimate is timed on its own steps."""

    def __init__(self, job: Job, *, start_epoch: int, **runner_kwargs):
        self.job = job
        self.start_epoch = start_epoch
        self.runner_kwargs = runner_kwargs
        self._runners: dict[str, EpochRunner] = {}

    def for_epoch(self, epoch: int) -> EpochRunner:
        """The runner of 0-based ``epoch``'s phase."""
        config = self.job.run_config or self.job.config
        phase = config.phase(epoch)
        if phase not in self._runners:
            warm = config.warm_start_epochs
            if phase == "warm_start":
                start, end, label = self.start_epoch, warm, "warm-start phase"
            else:
                start, end = max(self.start_epoch, warm), config.epochs
                label = "main phase" if warm else None
            self._runners[phase] = EpochRunner(
                self.job.for_phase(phase),
                start_epoch=start,
                end_epoch=end,
                label=label,
                **self.runner_kwargs,
            )
        return self._runners[phase]


def first_bad_step(host: dict) -> int | None:
    """The 0-based index of the first non-finite step of an epoch's metrics, None if none."""
    bad = np.flatnonzero(~host["finite"])
    return int(bad[0]) if bad.size else None


def check_finite(host: dict, epoch: int, steps: int, lr: float, good: int | None, where: Path):
    """Raise :class:`TrainingDiverged` if a step of 0-based ``epoch`` was not finite.

    ``good``: the epoch of the last saved checkpoint (None if none), in ``where``.
    """
    bad = np.flatnonzero(~host["finite"])
    if not bad.size:
        return
    raise TrainingDiverged(
        f"non-finite loss or gradients at epoch {epoch + 1}, step {int(bad[0]) + 1} "
        f"of {steps} (lr {lr:g}); stopped without saving that epoch. "
        + (
            f"The last good checkpoint (epoch {good}) in {where} "
            "is intact: lower --lr and pass --resume to continue from it, or start "
            "afresh in another --out."
            if good is not None
            else "No checkpoint had been saved yet; lower --lr and start again."
        )
    )
