r"""Training a VAE by (approximate or unbiased) maximum likelihood: config, train step, loop.

The loop is the Flax-examples shape: a pure, jitted ``train_step(state, batch, key)`` that calls one
of the gradient estimators (``grads, info = grad_fn(params, x, key)``) and applies Optax Adam;
per-step metrics are written into on-device buffers and brought to the host once per epoch.

Randomness is a pure function of the seed and the epoch: with ``root = jax.random.key(seed)``,
parameters are initialised from ``fold_in(root, 0)``, epoch ``e`` (0-based) draws its permutation,
dynamic binarisation and estimator keys from ``fold_in(fold_in(root, 1), e)`` and its in-training
evaluation from ``fold_in(fold_in(root, 2), e)``. The learning rate is a function of the optimizer's
step count. Hence a run resumed from the checkpoint of epoch ``e`` (params + optimizer state) ends
with exactly the parameters of an uninterrupted run with the same config (on the same backend).

Run directory (``out_dir``)::

    config.json          the resolved TrainConfig (written at start)
    metrics.jsonl        one JSON line per epoch
    meeting_times.npy    the last epoch's per-example meeting times, (examples, num_chains) int32
    checkpoints/<epoch>/ Orbax checkpoints (params, Adam state, epoch, config); last few kept

References: Ruiz, Titsias, Cemgil & Doucet (UAI 2021) for the unbiased estimator; Burda, Grosse &
Salakhutdinov (ICLR 2016) for the IWAE learning-rate schedule (``schedule="iwae"``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vaeml_jax.checkpoint import Checkpointer

__all__ = [
    "TrainConfig",
    "TrainState",
    "ConfigError",
    "RunDirError",
    "TrainingDiverged",
    "available_estimators",
    "iwae_learning_rate",
    "learning_rate",
    "make_optimizer",
    "set_learning_rate",
    "make_estimator",
    "make_train_step",
    "build_vae",
    "load_data",
    "train",
    "read_config",
    "read_metrics",
    "IWAE_SCHEDULE_EPOCHS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "MEETING_TIMES_FILE",
    "CHECKPOINT_DIR",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MEETING_TIMES_FILE = "meeting_times.npy"
CHECKPOINT_DIR = "checkpoints"

BASE_ESTIMATORS = ("elbo", "iwae", "mcmc", "unbiased")
ENCODER_OBJECTIVE_CHOICES = ("auto", "elbo", "iwae", "inclusive_kl", "sumo_variance", "none")
SCHEDULES = ("constant", "iwae")
BINARIZATIONS = ("auto", "dynamic", "static", "none")
LIKELIHOODS = ("bernoulli", "gaussian")
# The IWAE paper's schedule: stage i = 1..8 lasts 3^(i-1) epochs (3,280 in all).
IWAE_SCHEDULE_STAGES = 8
IWAE_SCHEDULE_EPOCHS = sum(3**i for i in range(IWAE_SCHEDULE_STAGES))
DEFAULT_EPOCHS = 100
# Fields that may change when a run is resumed (they do not change the trajectory up to the
# resumed epoch). Everything else must match the stored config.
RESUMABLE_FIELDS = (
    "epochs",
    "lr",  # e.g. a lower one to get past a divergence (the trajectory then differs from there)
    "eval_every",
    "eval_num_samples",
    "eval_max_examples",
    "checkpoint_every",
    "keep_checkpoints",
    "data_dir",
    "devices",  # a run may move between machines: the sharded step computes the same estimate
)


class ConfigError(ValueError):
    """A training option is invalid; the message names it and the allowed values."""


class RunDirError(ValueError):
    """The output directory holds another run (or an unreadable one)."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; nothing from that epoch was saved."""


def available_estimators() -> tuple[str, ...]:
    """The estimators ``--estimator`` accepts: the four built-ins, plus ``sumo`` if installed."""
    try:
        has_sumo = importlib.util.find_spec("vaeml_jax.estimators.sumo") is not None
    except (ImportError, ValueError):  # pragma: no cover
        has_sumo = False
    return BASE_ESTIMATORS + (("sumo",) if has_sumo else ())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (stored as ``config.json`` in the run directory).

    Defaults are the paper-sized one-layer model (784-200-200-50, tanh, Bernoulli decoder) on
    dynamically binarized MNIST, trained with the unbiased estimator H_{0:0} (S = 10 particles,
    one coupled pair per example) and an IWAE-bound encoder, Adam lr 1e-3, batch 100, 100 epochs.

    ``num_slots="auto"`` resolves to B*C/4 work-queue slots on CPU and to None (the plain loop)
    on accelerators, for the unbiased estimator (both give the same estimate for the same key).

    ``binarization``: ``"dynamic"`` (a fresh Bernoulli draw of every pixel each epoch, on device),
    ``"static"`` (binarized once, seed 0), ``"none"`` (the intensities themselves, for a Gaussian
    decoder); ``"auto"`` resolves to ``"dynamic"`` for a Bernoulli decoder and ``"none"`` for a
    Gaussian one. The test set is always the one of :func:`load_data`.

    ``encoder_objective="auto"`` resolves to ``"elbo"`` for the ELBO estimator and ``"iwae"``
    otherwise; ``"none"`` leaves the encoder at its initialisation. ``epochs=None`` resolves to
    100 (constant schedule) or 3,280 (the full IWAE schedule). ``max_train_examples`` keeps the
    first N training examples (quick runs). ``checkpoint_every=0`` saves only at the end.
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    binarization: str = "auto"
    estimator: str = "unbiased"
    num_particles: int = 10
    k: int = 0
    m: int = 0
    num_chains: int = 1
    max_iters: int = 1000
    num_slots: int | str | None = "auto"
    num_steps: int = 5
    burn_in: int = 0
    min_terms: int = 1
    max_terms: int = 128
    encoder_objective: str = "auto"
    hidden: tuple[int, ...] = (200, 200)
    latent_dim: int = 50
    two_layer: bool = False
    likelihood: str = "bernoulli"
    epochs: int | None = None
    batch_size: int = 100
    lr: float = 1e-3
    schedule: str = "constant"
    seed: int = 0
    max_train_examples: int | None = None
    eval_every: int = 0
    eval_num_samples: int = 100
    eval_max_examples: int = 1000
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    devices: int | None = None  # None: every visible device (data parallel over the batch)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` (default: the defaults) updated with ``d``; keys may use ``-`` or ``_``."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}.")
        clean = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - set(cls.fields()))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {unknown}; valid keys: {', '.join(cls.fields())}."
            )
        if "hidden" in clean and clean["hidden"] is not None:
            clean["hidden"] = _parse_hidden(clean["hidden"])
        return dataclasses.replace(base or cls(), **clean)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def resolved(self) -> TrainConfig:
        """Fill the automatic values (epochs, encoder objective) and validate everything."""
        cfg = self
        if isinstance(cfg.dataset, str) and "-" in cfg.dataset:  # fashion-mnist == fashion_mnist
            cfg = dataclasses.replace(cfg, dataset=cfg.dataset.replace("-", "_"))
        if cfg.epochs is None:
            n = IWAE_SCHEDULE_EPOCHS if cfg.schedule == "iwae" else DEFAULT_EPOCHS
            cfg = dataclasses.replace(cfg, epochs=n)
        if cfg.binarization == "auto":
            auto_b = "none" if cfg.likelihood == "gaussian" else "dynamic"
            cfg = dataclasses.replace(cfg, binarization=auto_b)
        if cfg.num_slots == "auto":
            cfg = dataclasses.replace(cfg, num_slots=_auto_num_slots(cfg))
        elif isinstance(cfg.num_slots, str) and cfg.num_slots.lower() == "none":
            cfg = dataclasses.replace(cfg, num_slots=None)
        if cfg.encoder_objective == "auto":
            auto = {"elbo": "elbo", "sumo": "sumo_variance"}.get(cfg.estimator, "iwae")
            cfg = dataclasses.replace(cfg, encoder_objective=auto)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option."""
        from vaeml_jax.data import DATASETS

        def choice(name, allowed):
            v = getattr(self, name)
            if v not in allowed:
                raise ConfigError(f"unknown {name} {v!r}; choose one of: {', '.join(allowed)}.")

        choice("dataset", tuple(DATASETS))
        choice("estimator", available_estimators())
        choice("encoder_objective", ENCODER_OBJECTIVE_CHOICES)
        choice("schedule", SCHEDULES)
        choice("binarization", BINARIZATIONS)
        choice("likelihood", LIKELIHOODS)
        ints = {
            "num_particles": 2 if self.estimator in ("mcmc", "unbiased") else 1,
            "k": 0,
            "m": 0,
            "num_chains": 1,
            "max_iters": 1,
            "num_steps": 0,
            "burn_in": 0,
            "min_terms": 1,
            "max_terms": 1,
            "latent_dim": 1,
            "epochs": 1,
            "batch_size": 1,
            "seed": 0,
            "eval_every": 0,
            "eval_num_samples": 1,
            "eval_max_examples": 1,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}.")
        if (
            self.num_slots is not None
            and self.num_slots != "auto"
            and (
                isinstance(self.num_slots, bool)
                or not isinstance(self.num_slots, int)
                or self.num_slots < 1
            )
        ):
            raise ConfigError(
                f"num_slots must be a positive integer, 'auto' or none, got {self.num_slots!r}."
            )
        if self.devices is not None and (
            isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1
        ):
            raise ConfigError(f"devices must be a positive integer, got {self.devices!r}.")
        if self.max_train_examples is not None:
            v = self.max_train_examples
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"max_train_examples must be a positive integer, got {v!r}.")
        if not self.hidden or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden
        ):
            raise ConfigError(
                f"hidden must be one or more positive layer widths, got {self.hidden!r}."
            )
        if not isinstance(self.two_layer, bool):
            raise ConfigError(f"two_layer must be true or false, got {self.two_layer!r}.")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}.")
        if self.k > self.m:
            raise ConfigError(
                f"k must be <= m for the estimator H_{{k:m}}, got k={self.k} > m={self.m}; "
                f"e.g. --k {self.k} --m {self.k} or larger m."
            )
        if self.estimator == "unbiased" and self.max_iters < max(self.m, 1):
            raise ConfigError(f"max_iters must be >= m = {self.m}, got {self.max_iters}.")
        if self.burn_in > self.num_steps:
            raise ConfigError(
                f"burn_in must be <= num_steps, got burn_in={self.burn_in} > "
                f"num_steps={self.num_steps}."
            )
        sumo_only = self.encoder_objective == "sumo_variance"
        if sumo_only and self.estimator != "sumo":
            raise ConfigError("encoder_objective sumo_variance needs --estimator sumo.")
        if self.estimator == "sumo" and self.encoder_objective == "inclusive_kl":
            raise ConfigError(
                "the sumo estimator takes encoder_objective sumo_variance, elbo, iwae or none."
            )
        if self.max_train_examples is not None and self.max_train_examples < self.batch_size:
            raise ConfigError(
                f"max_train_examples ({self.max_train_examples}) is smaller than batch_size "
                f"({self.batch_size}): an epoch would have no batch."
            )


def _auto_num_slots(cfg: TrainConfig) -> int | None:
    """The unbiased estimator's loop: a work queue of B*C/4 slots on CPU (its cost follows the
    batch-mean number of coupled iterations, 3-6x faster there at the same estimate), the plain
    all-lanes loop on accelerators (fewest sequential iterations)."""
    if cfg.estimator != "unbiased" or jax.default_backend() != "cpu":
        return None
    return max(1, cfg.batch_size * cfg.num_chains // 4)


def _parse_hidden(value) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p for p in value.replace(",", " ").split() if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(
                f"hidden must be layer widths like '200,200', got {value!r}."
            ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ConfigError(f"hidden must be a list of layer widths, got {value!r}.")


# ------------------------------------------------------------------------------------------------
# Learning rate, optimizer, model, estimator
# ------------------------------------------------------------------------------------------------
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


def set_learning_rate(opt_state, lr: float):
    """``opt_state`` of :func:`make_optimizer` with its learning rate replaced by ``lr``."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, dtype=jnp.float32)
    return opt_state._replace(hyperparams=hp)


def load_data(config: TrainConfig, data_dir: str | None = None):
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


def build_vae(config: TrainConfig):
    """The VAE of ``config`` (vaeml_jax.models)."""
    from vaeml_jax.models import VAE, VAEConfig

    return VAE(
        VAEConfig(
            hidden=tuple(config.hidden),
            latent_dim=config.latent_dim,
            two_layer=config.two_layer,
            likelihood=config.likelihood,
        )
    )


def make_estimator(config: TrainConfig, model):
    """The gradient estimator ``grads, info = f(params, x, key)`` chosen by ``config``."""
    import vaeml_jax as vj

    enc = None if config.encoder_objective == "none" else config.encoder_objective
    if config.estimator == "elbo":
        return vj.make_elbo_grad(model, encoder_objective=enc, num_samples=config.num_particles)
    if config.estimator == "iwae":
        return vj.make_iwae_grad(model, num_particles=config.num_particles, encoder_objective=enc)
    if config.estimator == "mcmc":
        return vj.make_mcmc_grad(
            model,
            num_particles=config.num_particles,
            num_steps=config.num_steps,
            burn_in=config.burn_in,
            encoder_objective=enc,
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
            **({} if config.num_slots is None else {"num_slots": config.num_slots}),
        )
    if config.estimator == "sumo":
        from vaeml_jax.estimators.sumo import make_sumo_grad

        return make_sumo_grad(
            model, min_terms=config.min_terms, max_terms=config.max_terms, encoder_objective=enc
        )
    raise ConfigError(f"unknown estimator {config.estimator!r}")  # pragma: no cover


# ------------------------------------------------------------------------------------------------
# The train step
# ------------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    """Everything that changes during training (and is checkpointed)."""

    params: Any
    opt_state: Any


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(grad_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """A pure ``train_step(state, batch, key) -> (state, metrics)`` (jit it, or shard its batch).

    ``metrics`` holds ``bound`` (mean over the batch of ``info["bound"]``), ``finite`` (the loss
    monitor and every gradient are finite), ``num_log_joint_evals`` and the per-example
    ``meeting_time``, ``num_iters``, ``capped`` (B, C). A non-finite step leaves the state unchanged
    (and is reported through ``finite``); the training loop then stops without saving.
    """

    def train_step(state: TrainState, batch, key):
        grads, info = grad_fn(state.params, batch, key)
        bound = jnp.mean(info["bound"])
        finite = _all_finite(grads) & jnp.isfinite(bound)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {
            "bound": bound.astype(jnp.float32),
            "finite": finite,
            "num_log_joint_evals": jnp.asarray(info["num_log_joint_evals"], jnp.int32),
            "meeting_time": jnp.asarray(info["meeting_time"], jnp.int32),
            "num_iters": jnp.asarray(info["num_iters"], jnp.int32),
            "capped": jnp.asarray(info["capped"], bool),
        }
        return new, metrics

    return train_step


def _metric_shapes(grad_fn, train_step, state, batch, key) -> dict:
    """Shapes of train_step's metrics; known in advance for the built-in estimators (saves a
    trace of the whole step), else found with jax.eval_shape."""
    num_chains = getattr(grad_fn, "num_chains", None)
    if not isinstance(num_chains, int):
        return jax.eval_shape(train_step, state, batch, key)[1]
    lanes = jax.ShapeDtypeStruct((batch.shape[0], num_chains), jnp.int32)
    return {
        "bound": jax.ShapeDtypeStruct((), jnp.float32),
        "finite": jax.ShapeDtypeStruct((), bool),
        "num_log_joint_evals": jax.ShapeDtypeStruct((), jnp.int32),
        "meeting_time": lanes,
        "num_iters": lanes,
        "capped": jax.ShapeDtypeStruct(lanes.shape, bool),
    }


def _make_epoch_runner(train_step: Callable):
    """Jitted ``(state, buffers, batches, i, steps_key) -> (state, buffers)``: step i of an epoch.

    The step's key is ``fold_in(steps_key, i)``; its metrics are written at row i of the on-device
    ``buffers`` (donated, so no copy per step).
    """

    def run(state, buffers, batches, i, steps_key):
        batch = jax.lax.dynamic_index_in_dim(batches, i, keepdims=False)
        state, metrics = train_step(state, batch, jax.random.fold_in(steps_key, i))
        buffers = jax.tree.map(lambda buf, v: buf.at[i].set(v), buffers, metrics)
        return state, buffers

    return jax.jit(run, donate_argnums=(1,))


# ------------------------------------------------------------------------------------------------
# Run directory helpers
# ------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def read_config(run_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig stored in ``run_dir/config.json`` (None if there is none)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        return TrainConfig.from_dict(d)
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise RunDirError(f"{path} is not a valid vaeml config ({e}).") from e


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "epoch" in rec:
            out.append(rec)
    return out


def _holds_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR))


def _config_diff(a: TrainConfig, b: TrainConfig, ignore=()) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in ignore and da[k] != db[k]]


def _prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> bool:
    """Check ``run_dir`` against ``config``; return True if a previous run is to be continued."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a directory.")
    stored = read_config(run_dir) if run_dir.is_dir() else None
    if not resume:
        if run_dir.is_dir() and _holds_run(run_dir):
            if stored is None:
                what = "holds files of another run (metrics or checkpoints, no config.json)"
            else:
                diff = _config_diff(stored, config)
                what = (
                    "already holds a run with this config"
                    if not diff
                    else "holds another run with a different config (" + "; ".join(diff) + ")"
                )
            raise RunDirError(
                f"output directory {run_dir} {what}. Pass --resume to continue it, or choose "
                "another --out."
            )
        return False
    if stored is None:
        if run_dir.is_dir() and (run_dir / CHECKPOINT_DIR).exists():
            raise RunDirError(
                f"{run_dir} has checkpoints but no {CONFIG_FILE}; it cannot be resumed safely. "
                "Choose another --out."
            )
        return False
    diff = _config_diff(stored, config, ignore=RESUMABLE_FIELDS)
    if diff:
        raise RunDirError(
            f"--resume: the run in {run_dir} was started with a different config ("
            + "; ".join(diff)
            + "). Only "
            + ", ".join(RESUMABLE_FIELDS)
            + " may change on resume; drop the other flags (the stored config is the default "
            "with --resume) or choose another --out."
        )
    return True


# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------
def _epoch_record(
    host: dict, epoch: int, seconds: float, batch_size: int, lr: float, num_devices: int = 1
) -> dict:
    steps = host["bound"].shape[0]
    mt = host["meeting_time"].astype(np.float64)
    it = host["num_iters"].astype(np.float64)
    examples = steps * batch_size
    return {
        "epoch": epoch,
        "objective": float(np.mean(host["bound"].astype(np.float64))),
        "meeting_time_mean": float(mt.mean()),
        "meeting_time_max": int(mt.max()),
        "num_iters_mean": float(it.mean()),
        "num_iters_max": int(it.max()),
        "capped_fraction": float(np.mean(host["capped"])),
        "num_log_joint_evals": int(np.sum(host["num_log_joint_evals"].astype(np.int64))),
        "steps": steps,
        "examples": examples,
        "wall_time": seconds,
        "examples_per_second": examples / seconds if seconds > 0 else float("nan"),
        "lr": lr,
        "num_devices": num_devices,
    }


def _progress_postfix(host: dict, done: int, elapsed: float, batch_size: int) -> dict:
    if done == 0:
        return {}
    mt = host["meeting_time"][:done]
    return {
        "obj": f"{float(np.mean(host['bound'][:done])):.2f}",
        "ex/s": f"{done * batch_size / max(elapsed, 1e-9):.0f}",
        "tau": f"{float(mt.mean()):.2f}/{int(mt.max())}",
    }


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
      out_dir: the run directory (see the module docstring for its contents).
      resume: continue the run in ``out_dir`` up to ``config.epochs`` epochs in total (starting
        from scratch if it holds no run yet). Without it, a directory holding a run is refused.
      progress: show a tqdm bar per epoch (objective, examples/s, mean/max meeting time). Its
        statistics are fetched from the device at most every ``progress_interval`` seconds; with
        ``progress=False`` the device is synchronised once per epoch only.
      log: where one summary line per epoch goes (default: stderr).

    Returns:
      A summary dict: ``out_dir``, ``epoch`` (epochs completed), ``start_epoch``, ``metrics``
      (the last epoch's record, or None if nothing was run), ``params`` (final, on host).

    Raises:
      ConfigError, RunDirError, vaeml_jax.data.DataError, ValueError (data the model cannot take),
      TrainingDiverged (non-finite loss or gradients: that epoch is not saved, the last good
      checkpoint stays), CheckpointError.
    """
    from tqdm.auto import tqdm

    from vaeml_jax import distributed
    from vaeml_jax.data import epoch_batches

    if log is None:

        def log(msg: str) -> None:
            tqdm.write(msg, file=sys.stderr)

    config = config.resolved()
    run_dir = Path(out_dir)
    continuing = _prepare_run_dir(config, run_dir, resume)

    # ---- data and model (before anything is written, so bad input leaves no trace) ----------
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
    steps_per_epoch = n_train // config.batch_size
    # One code path for 1 or N devices (and hosts): the batch is sharded over a mesh.
    try:
        mesh = distributed.make_mesh(config.devices)
        distributed.check_divisible(config.batch_size, mesh)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    n_devices = distributed.num_devices(mesh)
    vae = build_vae(config)
    train_dev = jnp.asarray(train_x)
    root = jax.random.key(config.seed)
    train_root = jax.random.fold_in(root, 1)
    eval_root = jax.random.fold_in(root, 2)

    def epoch_data(epoch: int):
        data_key, steps_key = jax.random.split(jax.random.fold_in(train_root, epoch))
        batches = epoch_batches(data_key, train_dev, config.batch_size, binarize=binarize)
        return distributed.shard_batches(batches, mesh), steps_key

    # The data the model will see must suit its likelihood (non-binary pixels for a Bernoulli
    # decoder, NaNs, wrong width): checked on the first batch before anything is written.
    first_batches, _ = epoch_data(0)
    vae.check_data(np.asarray(first_batches[0]))

    optimizer = make_optimizer(config)
    grad_fn = make_estimator(config, vae.model)
    train_step = make_train_step(distributed.data_parallel(grad_fn, mesh), optimizer)
    run_step = _make_epoch_runner(train_step)

    init_params = vae.init(jax.random.fold_in(root, 0), data_mean=jnp.asarray(train_x.mean(0)))
    state = TrainState(init_params, optimizer.init(init_params))

    eval_x = None
    if config.eval_every:
        eval_x = test_x[: config.eval_max_examples]

    # ---- run directory ------------------------------------------------------------------------
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / CONFIG_FILE, json.dumps(config.to_dict(), indent=2) + "\n")
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=config.keep_checkpoints)
    start_epoch = 0
    log(
        f"vaeml train: {config.estimator} estimator (S={config.num_particles}"
        + (
            f", k={config.k}, m={config.m}, C={config.num_chains}"
            if config.estimator == "unbiased"
            else ""
        )
        + f") on {config.dataset} ({config.binarization}, {n_train} examples), "
        f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr:g} "
        f"({config.schedule}) -> {run_dir}"
    )
    try:
        if continuing and ckpt.latest_epoch() is not None:
            restored, _, start_epoch = ckpt.restore(
                {"params": state.params, "opt_state": state.opt_state}
            )
            state = TrainState(restored["params"], restored["opt_state"])
            log(f"resuming {run_dir} from the checkpoint of epoch {start_epoch}")
        # Fresh and restored states placed alike (committed to the device), so a resumed run
        # compiles to the same program as an uninterrupted one (and hits the compilation cache).
        state = distributed.replicate(state, mesh)
        # Drop the records of epochs whose work was lost (after the checkpoint we resume from).
        records = [r for r in read_metrics(run_dir) if r["epoch"] <= start_epoch]
        _write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
        if start_epoch >= config.epochs:
            log(
                f"{run_dir} has already been trained for {start_epoch} epochs (--epochs "
                f"{config.epochs}); nothing to do."
            )
            return {
                "out_dir": str(run_dir),
                "epoch": start_epoch,
                "start_epoch": start_epoch,
                "metrics": records[-1] if records else None,
                "params": jax.device_get(state.params),
            }

        record = None
        compiled_step = metric_shapes = None
        for epoch in range(start_epoch, config.epochs):
            lr = learning_rate(config, epoch)
            state = state._replace(opt_state=set_learning_rate(state.opt_state, lr))
            batches, steps_key = epoch_data(epoch)
            if metric_shapes is None:
                metric_shapes = _metric_shapes(grad_fn, train_step, state, batches[0], steps_key)
            buffers = jax.tree.map(
                lambda s: jnp.zeros((steps_per_epoch, *s.shape), s.dtype), metric_shapes
            )
            bar = tqdm(
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{config.epochs}",
                disable=not progress,
                leave=False,
                file=sys.stderr,
                unit="step",
            )
            compile_seconds = None
            if compiled_step is None:  # compiled ahead of time so epoch timings exclude it
                tc = time.perf_counter()
                compiled_step = run_step.lower(state, buffers, batches, 0, steps_key).compile()
                compile_seconds = time.perf_counter() - tc
            t0 = time.perf_counter()
            last_refresh, shown = t0, 0
            for i in range(steps_per_epoch):
                state, buffers = compiled_step(state, buffers, batches, i, steps_key)
                now = time.perf_counter()
                if progress and (now - last_refresh >= progress_interval or i == 0):
                    host = jax.device_get(buffers)  # waits for step i: timings below are real
                    if not np.all(host["finite"][: i + 1]):
                        break  # reported below, with the step number
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(_progress_postfix(host, i + 1, elapsed, config.batch_size))
                    bar.update(i + 1 - shown)
                    shown, last_refresh = i + 1, time.perf_counter()
            host = jax.device_get(buffers)  # the one sync of the epoch
            seconds = time.perf_counter() - t0
            if progress:
                final = _progress_postfix(host, steps_per_epoch, seconds, config.batch_size)
                bar.set_postfix(final)
            bar.update(steps_per_epoch - shown)
            bar.close()
            bad = np.flatnonzero(~host["finite"])
            if bad.size:
                good = ckpt.latest_epoch()
                raise TrainingDiverged(
                    f"non-finite loss or gradients at epoch {epoch + 1}, step {int(bad[0]) + 1} "
                    f"of {steps_per_epoch} (lr {lr:g}); stopped without saving that epoch. "
                    + (
                        f"The last good checkpoint (epoch {good}) in {run_dir / CHECKPOINT_DIR} "
                        "is intact: lower --lr and pass --resume to continue from it, or start "
                        "afresh in another --out."
                        if good is not None
                        else "No checkpoint had been saved yet; lower --lr and start again."
                    )
                )
            record = _epoch_record(host, epoch + 1, seconds, config.batch_size, lr, n_devices)
            if compile_seconds is not None:
                record["compile_seconds"] = compile_seconds
            if eval_x is not None and ((epoch + 1) % config.eval_every == 0):
                record.update(
                    _evaluate_during_training(
                        vae, state.params, eval_x, config, jax.random.fold_in(eval_root, epoch)
                    )
                )
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            _save_npy_atomic(
                run_dir / MEETING_TIMES_FILE,
                host["meeting_time"].reshape(-1, host["meeting_time"].shape[-1]),
            )
            last = epoch + 1 == config.epochs
            if last or (config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0):
                ckpt.save(
                    epoch + 1,
                    {"params": state.params, "opt_state": state.opt_state},
                    {"epoch": epoch + 1, "config": config.to_dict(), "version": _version()},
                )
            log(_format_record(record, config.epochs))
    finally:
        ckpt.close()
    return {
        "out_dir": str(run_dir),
        "epoch": config.epochs,
        "start_epoch": start_epoch,
        "metrics": record,
        "params": jax.device_get(state.params),
    }


def _evaluate_during_training(vae, params, eval_x, config: TrainConfig, key) -> dict:
    from vaeml_jax.evaluation import evaluate

    res = evaluate(
        vae.model,
        params,
        eval_x,
        key,
        method="is",
        num_samples=config.eval_num_samples,
        chunk_size=min(500, config.eval_num_samples),
        batch_size=min(100, eval_x.shape[0]),
    )
    return {
        "test_log_likelihood": float(res["test_log_likelihood"]),
        "test_log_likelihood_stderr": float(res["test_log_likelihood_stderr"]),
        "test_elbo": float(res["test_elbo"]),
        "eval_num_samples": int(config.eval_num_samples),
        "eval_examples": int(eval_x.shape[0]),
        "eval_seconds": float(res["seconds"]),
    }


def _format_record(r: dict, epochs: int) -> str:
    s = (
        f"epoch {r['epoch']}/{epochs}  objective {r['objective']:.3f}  "
        f"tau mean {r['meeting_time_mean']:.2f} max {r['meeting_time_max']}  "
        f"capped {r['capped_fraction']:.2%}  {r['examples_per_second']:.0f} ex/s  "
        f"{r['wall_time']:.1f}s"
    )
    if "test_log_likelihood" in r:
        s += f"  test LL {r['test_log_likelihood']:.2f} (K={r['eval_num_samples']})"
    return s


def _version() -> str:
    from vaeml_jax import __version__

    return __version__


def load_run(run_dir: str | Path, epoch: int | None = None):
    """Load a trained run: ``(config, vae, params, epoch)`` from its config and a checkpoint.

    ``epoch=None`` takes the latest readable checkpoint. Raises RunDirError if ``run_dir`` holds
    no run, CheckpointError if no checkpoint can be read.
    """
    from vaeml_jax.checkpoint import CheckpointError

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if config is None:
        raise RunDirError(
            f"{run_dir} holds no vaeml run (no {CONFIG_FILE}); train one with "
            f"`vaeml train --out {run_dir}`."
        )
    config = config.resolved()
    vae = build_vae(config)
    params = jax.eval_shape(lambda k: vae.init(k), jax.random.key(0))
    opt_state = jax.eval_shape(make_optimizer(config).init, params)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(
            f"{run_dir} has no checkpoints yet (training has not finished an epoch); "
            f"continue it with `vaeml train --out {run_dir} --resume`."
        )
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, read_only=True)
    try:
        state, _, epoch = ckpt.restore({"params": params, "opt_state": opt_state}, epoch)
    finally:
        ckpt.close()
    return config, vae, state["params"], epoch
