"""The run directory: its files, their atomic writes and readers, and :func:`load_run`.

::

    config.json          the resolved TrainConfig (written at start)
    metrics.jsonl        one JSON line per epoch
    meeting_times.npy    the last epoch's per-example meeting times, (examples, num_chains) int32
    checkpoints/<epoch>/ Orbax checkpoints (params, Adam state, epoch, config); last few kept

In a run of several processes, process 0 alone writes ``config.json``, ``metrics.jsonl`` and
``meeting_times.npy``; the checkpoints are written by all of them together (Orbax), into a
directory they all see.

:func:`prepare_run_dir` decides whether ``--out`` may be written (a fresh directory, or the same
run with ``--resume``); :func:`load_run` opens a finished or running run for evaluation and plots,
on whatever devices this process has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vaeml_jax.checkpoint import Checkpointer
from vaeml_jax.training.build import build_vae
from vaeml_jax.training.config import RESUMABLE_FIELDS, ConfigError, TrainConfig
from vaeml_jax.training.optim import make_optimizer

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MEETING_TIMES_FILE",
    "CHECKPOINT_DIR",
    "RunDirError",
    "write_atomic",
    "save_npy_atomic",
    "read_config",
    "read_metrics",
    "write_config",
    "environment",
    "append_metrics",
    "truncate_metrics",
    "save_meeting_times",
    "prepare_run_dir",
    "load_run",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MEETING_TIMES_FILE = "meeting_times.npy"
CHECKPOINT_DIR = "checkpoints"


class RunDirError(ValueError):
    """The output directory holds another run (or an unreadable one)."""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
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


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR))


def config_diff(a: TrainConfig, b: TrainConfig, ignore=()) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} -> {db[k]!r}" for k in da if k not in ignore and da[k] != db[k]]


def prepare_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> bool:
    """Check ``run_dir`` against ``config``; return True if a previous run is to be continued."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a directory.")
    stored = read_config(run_dir) if run_dir.is_dir() else None
    if not resume:
        if run_dir.is_dir() and holds_run(run_dir):
            if stored is None:
                what = "holds files of another run (metrics or checkpoints, no config.json)"
            else:
                diff = config_diff(stored, config)
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
    diff = config_diff(stored, config, ignore=RESUMABLE_FIELDS)
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


def environment() -> dict:
    """The software and hardware a run or an evaluation ran on: the versions of vaeml-jax, jax,
    jaxlib, flax and optax, JAX's backend, the kind and number of devices, and Python's version
    (stored as ``"environment"`` in ``config.json`` and ``eval.json``)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    devices = jax.devices()
    return {
        "vaeml_jax": v("vaeml-jax"),
        **{name: v(name) for name in ("jax", "jaxlib", "flax", "optax")},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "python": platform.python_version(),
    }


def write_config(run_dir: Path, config: TrainConfig) -> None:
    """Write the resolved ``config`` as ``run_dir/config.json`` (atomically), with the
    :func:`environment` it runs on under ``"environment"`` (not an option: ignored when read)."""
    record = {**config.to_dict(), "environment": environment()}
    write_atomic(run_dir / CONFIG_FILE, json.dumps(record, indent=2) + "\n")


def truncate_metrics(run_dir: Path, last_epoch: int) -> list[dict]:
    """Keep the records of epochs <= ``last_epoch`` (the work after the checkpoint a run resumes
    from is lost); returns them."""
    records = [r for r in read_metrics(run_dir) if r["epoch"] <= last_epoch]
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    return records


def append_metrics(run_dir: Path, record: dict) -> None:
    """Append one epoch record to ``metrics.jsonl`` (a torn last line is skipped on reading)."""
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def save_meeting_times(run_dir: Path, meeting_time: np.ndarray) -> None:
    """The epoch's per-step meeting times (steps, B, C) as (examples, C) ``meeting_times.npy``."""
    save_npy_atomic(run_dir / MEETING_TIMES_FILE, meeting_time.reshape(-1, meeting_time.shape[-1]))


def load_run(
    run_dir: str | Path, epoch: int | None = None, *, mesh: Any = None
) -> tuple[Any, Any, Any, int]:
    """Load a trained run: ``(config, vae, params, epoch)`` from its config and a checkpoint.

    ``epoch=None`` takes the latest readable checkpoint. The parameters come back on this
    process's first device, or replicated over ``mesh`` (a :class:`jax.sharding.Mesh`, possibly
    spanning several processes: every process then calls this together). Whatever the number of
    devices and processes that wrote the checkpoint. Raises RunDirError if ``run_dir`` holds no
    run, CheckpointError if no checkpoint can be read.
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
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params, opt_state = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
            (params, opt_state),
        )
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
