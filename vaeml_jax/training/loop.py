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
``fold_in(fold_in(root, 2), e)``; the steps timed ahead of the main phase (their results dropped)
use ``fold_in(root, 3)``.
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

from vaeml_jax import distributed
from vaeml_jax.checkpoint import Checkpointer
from vaeml_jax.training.build import build_vae, load_data, make_estimator
from vaeml_jax.training.config import ConfigError, TrainConfig
from vaeml_jax.training.optim import learning_rate, make_optimizer, set_learning_rate
from vaeml_jax.training.records import (
    HealthMonitor,
    epoch_diagnostics,
    epoch_record,
    evaluate_during_training,
    format_duration,
    format_record,
    progress_postfix,
    record_summary,
)
from vaeml_jax.training.rundir import (
    CHECKPOINT_DIR,
    append_metrics,
    prepare_run_dir,
    read_metrics,
    save_meeting_times,
    truncate_metrics,
    write_config,
)
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
        """``(batches, steps_key)`` of 0-based ``epoch``: (steps, B, D) sharded over the mesh.

        Every process derives the same epoch from ``(seed, epoch)`` (:meth:`whole_epoch`) and
        supplies the rows of its own devices: no data moves between processes.
        """
        batches, steps_key = self.whole_epoch(epoch)
        return distributed.shard_batches(batches, self.mesh), steps_key

    def whole_epoch(self, epoch: int) -> tuple[jax.Array, jax.Array]:
        """``(batches, steps_key)`` of 0-based ``epoch`` on this process's first device: every
        batch whole, (steps, B, D), the same in every process."""
        from vaeml_jax.data import epoch_batches

        train_root = jax.random.fold_in(self.root, 1)
        data_key, steps_key = jax.random.split(jax.random.fold_in(train_root, epoch))
        batches = epoch_batches(
            data_key, self.train_dev, self.config.batch_size, binarize=self.binarize
        )
        return batches, steps_key

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
    raises here, before anything is written. With several processes, an error in one stops all
    of them, and processes that were given different configs or data are refused
    (:class:`vaeml_jax.distributed.DistributedError`).
    """
    job = distributed.agree(lambda: _build_job(config), "to set up the run")
    same = {"the training config": _fingerprint(config), "the training data": job.train_x}
    if job.eval_x is not None:
        same["the evaluation data"] = np.ascontiguousarray(job.eval_x)
    distributed.check_same(same)
    return job


def _fingerprint(config: TrainConfig) -> str:
    """The config as the processes of a run must share it (``data_dir`` is each host's own)."""
    import json

    d = config.to_dict()
    d.pop("data_dir", None)
    return json.dumps(d, sort_keys=True, default=str)


def _build_job(config: TrainConfig) -> Job:
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
    # decoder, NaNs, wrong width): checked on the first batch before anything is written (on
    # this process's own copy of it).
    first_batches, _ = job.whole_epoch(0)
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
      log: where the compile lines and the estimate of the run's length go (once, after the
        first timed steps).
      end_epoch: the epoch this runner's estimate runs to (default: the run's last).
      label: what the estimate is of (``"warm-start phase"``); default ``"total"`` or
        ``"remaining"``.
      later_seconds: the estimated seconds of the phases after this one, or None while one of them
        is untimed (default: no later phase); the bar's time left is the whole run's.
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
        later_seconds: Callable[[], float | None] | None = None,
    ):
        self.job = job
        self.later_seconds = later_seconds
        if end_epoch is None:
            assert job.config.epochs is not None  # the job's config is resolved (build_job)
            end_epoch = job.config.epochs
        self.end_epoch: int = end_epoch
        self.label = label
        self.start_epoch = start_epoch
        self.progress = progress
        self.progress_interval = progress_interval
        self.log = log
        self._run_step = make_epoch_runner(job.train_step, job.mesh)
        self._compiled: Callable | None = None  # the ahead-of-time compiled step (compile())
        self._metric_shapes: Any = None
        self._compile_seconds: float | None = None  # reported with the phase's first epoch
        self._timed = False  # this phase's own first steps timed (not only probed)
        self.seconds_per_step: float | None = None  # measured after compilation

    @property
    def step_name(self) -> str:
        """``"unbiased training step (S=10)"``, ``"iwae warm-start step (S=5)"``."""
        c = self.job.config
        kind = "warm-start step" if self.job.phase == "warm_start" else "training step"
        return f"{c.estimator} {kind} (S={c.num_particles})"

    def compile(self, state: TrainState, epoch: int) -> None:
        """Compile the step ahead of time (once; epoch timings then exclude it), with a line
        before and after: on CPU the unbiased step takes about a minute, which would otherwise
        pass in silence."""
        if self._compiled is not None:
            return
        job = self.job
        batches, steps_key = job.epoch_data(epoch)
        self.log(f"vaeml: compiling the {self.step_name} ...")
        tc = time.perf_counter()
        self._metric_shapes = metric_shapes(
            job.grad_fn, job.train_step, state, batches[0], steps_key
        )
        buffers = self._buffers()
        self._compiled = self._run_step.lower(state, buffers, batches, 0, steps_key).compile()
        self._compile_seconds = time.perf_counter() - tc
        self.log(f"vaeml: compiling the {self.step_name}: done in {self._compile_seconds:.0f} s")

    def _buffers(self):
        steps = self.job.steps_per_epoch
        zeros = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), s.dtype), self._metric_shapes)
        return distributed.replicate(zeros, self.job.mesh)  # as the step returns them

    def probe(self, state: TrainState, epoch: int, key: jax.Array, num_steps: int) -> float:
        """Time ``num_steps`` steps from ``state`` on 0-based ``epoch``'s batches and ``key``
        (their results are dropped: the run's randomness and state do not change); returns and
        keeps the seconds per step, the estimate of this phase before it starts."""
        self.compile(state, epoch)
        assert self._compiled is not None  # set by compile()
        batches, _ = self.job.epoch_data(epoch)
        buffers = self._buffers()
        num_steps = min(num_steps, self.job.steps_per_epoch)
        t0 = time.perf_counter()
        for i in range(num_steps):
            state, buffers = self._compiled(state, buffers, batches, i, key)
        jax.block_until_ready((state, buffers))
        self.seconds_per_step = (time.perf_counter() - t0) / num_steps
        return self.seconds_per_step

    def phase_seconds(self) -> float | None:
        """Estimated seconds of this phase's epochs, from its (probed or timed) step time."""
        if self.seconds_per_step is None:
            return None
        epochs = self.end_epoch - self.start_epoch
        return self.seconds_per_step * epochs * self.job.steps_per_epoch

    def run(self, state: TrainState, epoch: int) -> tuple[TrainState, dict, float, float | None]:
        """Run 0-based ``epoch``: ``(state, host_metrics, seconds, compile_seconds or None)``.

        ``host_metrics`` holds the per-step metrics of the whole epoch, (steps, ...) arrays;
        ``seconds`` is the epoch's wall time without compilation.
        """
        from tqdm.auto import tqdm

        job, config, steps = self.job, self.job.config, self.job.steps_per_epoch
        self.compile(state, epoch)  # ahead of time, so epoch timings exclude it
        assert self._compiled is not None  # set by compile()
        compile_seconds, self._compile_seconds = self._compile_seconds, None
        batches, steps_key = job.epoch_data(epoch)
        buffers = self._buffers()
        bar = tqdm(  # opened after compiling, so its rate and ETA are the steps' alone
            total=steps,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not self.progress or not distributed.is_primary(),
            leave=False,
            file=sys.stderr,
            unit="step",
        )
        timing = not self._timed
        solo = jax.process_count() == 1  # several processes run every step together
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
                if solo and not np.all(host["finite"][: i + 1]):
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
        """Steps left in this runner's phase."""
        return (self.end_epoch - epoch) * self.job.steps_per_epoch - done

    def _postfix(self, host: dict, done: int, elapsed: float, epoch: int) -> dict[str, str]:
        post = progress_postfix(host, done, elapsed, self.job.config.batch_size)
        if done:
            left = elapsed / done * self._steps_left(epoch, done)
            later = self.later_seconds() if self.later_seconds else 0.0
            post["run left"] = (
                format_duration(left + later)
                if later is not None
                else format_duration(left) + " + next phase"  # untimed until it is probed
            )
        return post

    def _estimate(self, done: int, seconds: float, epoch: int) -> None:
        """Log the run's estimated length from its first ``done`` timed steps (once)."""
        config, steps = self.job.config, self.job.steps_per_epoch
        self.seconds_per_step = seconds / done
        self._timed = True
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
    """The :class:`EpochRunner` of each phase of a run (warm start, main) from ``start_epoch`` on.

    :meth:`compile` compiles the step of every phase still to run, up front (a run resumed in its
    main phase never compiles the warm start's), so that the time left on the bar is the whole
    run's: the current phase at its measured speed plus the main phase at the speed
    :meth:`after_epoch` measures once the warm start has trained for an epoch
    (``ESTIMATE_STEPS`` steps of the main estimator from the current parameters, their results
    dropped). Each phase's own length estimate is still timed on its own first steps.
    """

    def __init__(self, job: Job, *, start_epoch: int, **runner_kwargs):
        self.job = job
        self.start_epoch = start_epoch
        self.log = runner_kwargs.get("log", _log_to_stderr)
        config = job.run_config or job.config
        warm = config.warm_start_epochs
        self._runners: dict[str, EpochRunner] = {}
        if start_epoch < warm:
            self._runners["warm_start"] = EpochRunner(
                job.for_phase("warm_start"),
                start_epoch=start_epoch,
                end_epoch=warm,
                label="warm-start phase",
                later_seconds=lambda: self._runners["main"].phase_seconds(),
                **runner_kwargs,
            )
        self._runners["main"] = EpochRunner(
            job.for_phase("main"),
            start_epoch=max(start_epoch, warm),
            end_epoch=config.epochs,
            label="main phase" if warm else None,
            **runner_kwargs,
        )

    def for_epoch(self, epoch: int) -> EpochRunner:
        """The runner of 0-based ``epoch``'s phase."""
        config = self.job.run_config or self.job.config
        return self._runners[config.phase(epoch)]

    def compile(self, state: TrainState) -> None:
        """Compile every remaining phase's step now, each announced with its compile time.

        The phases compile side by side (XLA compiles one program on about one core): the warm
        start's step is ready within the main step's compile time, not before it."""
        from concurrent.futures import ThreadPoolExecutor

        runners = list(self._runners.values())
        with ThreadPoolExecutor(max_workers=len(runners)) as pool:
            done = [pool.submit(r.compile, state, r.start_epoch) for r in runners]
            for future in done:
                future.result()  # re-raises a compile error here

    def after_epoch(self, state: TrainState, epoch: int) -> None:
        """After 0-based ``epoch`` of the warm start, if more warm-start epochs follow and the main
        phase is untimed: time ``ESTIMATE_STEPS`` main-phase steps from ``state`` (dropped) and log
        the whole run's estimated length."""
        warm = self._runners.get("warm_start")
        main = self._runners["main"]
        if warm is None or main.seconds_per_step is not None or epoch + 1 >= warm.end_epoch:
            return
        key = jax.random.fold_in(self.job.root, 3)
        per_step = main.probe(state, main.start_epoch, key, ESTIMATE_STEPS)
        steps = self.job.steps_per_epoch
        warm_left = (warm.seconds_per_step or 0.0) * (warm.end_epoch - epoch - 1) * steps
        main_seconds = main.phase_seconds()
        assert main_seconds is not None  # probe() has just timed the main phase
        self.log(
            f"vaeml: estimated run left {format_duration(warm_left + main_seconds)}: "
            f"warm-start phase {format_duration(warm_left)}, main phase "
            f"{format_duration(main_seconds)} ({per_step:.2g} s/step, timed on "
            f"{min(ESTIMATE_STEPS, steps)} {main.job.config.estimator} steps after epoch "
            f"{epoch + 1})"
        )


def first_bad_step(host: dict) -> int | None:
    """The 0-based index of the first non-finite step of an epoch's metrics, None if none."""
    bad = np.flatnonzero(~host["finite"])
    return int(bad[0]) if bad.size else None


def check_finite(
    host: dict, epoch: int, steps: int, lr: float, good: int | None, where: Path
) -> None:
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


# ------------------------------------------------------------------ the entry point


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
      ConfigError: an option value that is not valid.
      RunDirError: ``out_dir`` holds another run, or has nothing to resume.
      vaeml_jax.data.DataError: a missing or corrupt data file.
      ValueError: data the model cannot take.
      TrainingDiverged: a non-finite loss or gradient (that epoch is not saved; the last good
        checkpoint stays).
      vaeml_jax.checkpoint.CheckpointError: a checkpoint that cannot be read.
    """
    # Several processes: all run the same steps; process 0 alone logs and writes the run
    # directory's files, the checkpoints are written by all together (Orbax).
    primary = distributed.is_primary()
    log = (log or _log_to_stderr) if primary else _silent
    config = config.resolved()
    assert config.epochs is not None  # resolved() fills it
    run_dir = Path(out_dir)
    continuing = distributed.agree(
        lambda: prepare_run_dir(config, run_dir, resume), f"to check --out {run_dir}"
    )
    job = build_job(config)  # data, model, estimator: bad input fails here, nothing written yet
    # Fresh and restored states placed alike (replicated over the mesh, committed), so a resumed
    # run compiles to the same program as an uninterrupted one (and hits the compilation cache).
    state = distributed.replicate(job.initial_state(), job.mesh)

    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config)
    distributed.sync("vaeml train: run directory written")
    log(describe(job, run_dir))
    with Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep_checkpoints) as ckpt:
        start_epoch = 0
        if continuing and ckpt.latest_epoch() is not None:
            state, start_epoch = _restore(ckpt, state)
            log(f"resuming {run_dir} from the checkpoint of epoch {start_epoch}")
        state = distributed.replicate(state, job.mesh)
        if primary:
            records = truncate_metrics(run_dir, start_epoch)
        else:
            records = [r for r in read_metrics(run_dir) if r["epoch"] <= start_epoch]
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
        runners.compile(state)  # every phase's step, up front and announced
        health = HealthMonitor(log)
        record = None
        for epoch in range(start_epoch, config.epochs):
            runner = runners.for_epoch(epoch)  # the warm start's, then the main estimator's
            state, record = _train_epoch(runner, state, epoch, run_dir, ckpt, health)
            log(format_record(record, config.epochs))
            runners.after_epoch(state, epoch)  # times the main phase early (warm start only)
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
            job.vae, state.params, job.eval_x, config, job.eval_key(epoch), mesh=job.mesh
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
    if distributed.is_primary():
        append_metrics(run_dir, record)
        save_meeting_times(run_dir, host["meeting_time"])
    health.check(record_summary(record), epoch + 1, *_cap(config))
    last = epoch + 1 == config.epochs
    if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
        run_config = job.run_config
        assert run_config is not None  # build_job sets it (the whole run's config)
        ckpt.save(
            epoch + 1,
            {"params": state.params, "opt_state": state.opt_state},
            {"epoch": epoch + 1, "config": run_config.to_dict(), "version": _version()},
        )
    return state, record


def _cap(config: TrainConfig) -> tuple[int | None, str]:
    """The estimator's cap (iterations, levels or terms) and its name, for the warning line."""
    cap = {"unbiased": config.max_iters, "mlmc": config.max_level, "sumo": config.max_terms}
    return cap.get(config.estimator), config.estimator


def _warn_before_divergence(host: dict, epoch: int, config: TrainConfig, health) -> None:
    """A diverged epoch's diagnostics up to its bad step (NaN importance weights say why), logged
    before :func:`check_finite` stops the run."""
    bad = first_bad_step(host)
    if bad is not None:
        steps = {k: v[: bad + 1] for k, v in host.items()}  # later rows were never run
        health.check(epoch_diagnostics(steps) | _capped(steps), epoch + 1, *_cap(config))


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
        "params": distributed.to_host(state.params),
    }


def _silent(msg: str) -> None:
    """The log of every process but 0."""


def _log_to_stderr(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _version() -> str:
    from vaeml_jax import __version__

    return __version__
