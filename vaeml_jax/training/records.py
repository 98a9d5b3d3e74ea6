"""The per-epoch record: what ``metrics.jsonl`` holds, the progress bar shows and the log prints.

:func:`epoch_record` is the ONE place where an epoch's host-side metrics (the per-step buffers of
:func:`vaeml_jax.training.step.make_train_step`, brought to the host once per epoch) become the
JSON record; a new per-epoch statistic (a diagnostic of the meeting times, say) is added there.
:func:`evaluate_during_training` gives the ``--eval-every`` entries it merges in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vaeml_jax.training.config import TrainConfig

__all__ = [
    "epoch_record",
    "progress_postfix",
    "format_record",
    "evaluate_during_training",
    "format_duration",
]


def epoch_record(
    host: dict[str, np.ndarray],
    *,
    epoch: int,
    seconds: float,
    batch_size: int,
    lr: float,
    num_devices: int = 1,
    compile_seconds: float | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of 1-based ``epoch`` written to ``metrics.jsonl``.

    Args:
      host: the epoch's per-step metrics on the host, each (steps, ...): ``bound``, ``finite``,
        ``num_log_joint_evals``, ``meeting_time``/``num_iters``/``capped`` (steps, B, C).
      seconds: wall time of the epoch's steps (compilation excluded).
      compile_seconds: set on the epoch that compiled the step.
      evaluation: the entries of :func:`evaluate_during_training`, when the epoch evaluated.
    """
    steps = host["bound"].shape[0]
    mt = host["meeting_time"].astype(np.float64)
    it = host["num_iters"].astype(np.float64)
    examples = steps * batch_size
    record: dict[str, Any] = {
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
    if compile_seconds is not None:
        record["compile_seconds"] = compile_seconds
    if evaluation:
        record.update(evaluation)
    return record


def progress_postfix(
    host: dict[str, np.ndarray], done: int, elapsed: float, batch_size: int
) -> dict[str, str]:
    """The progress bar's statistics after ``done`` steps of an epoch."""
    if done == 0:
        return {}
    mt = host["meeting_time"][:done]
    return {
        "obj": f"{float(np.mean(host['bound'][:done])):.2f}",
        "ex/s": f"{done * batch_size / max(elapsed, 1e-9):.0f}",
        "tau": f"{float(mt.mean()):.2f}/{int(mt.max())}",
    }


def format_record(r: dict[str, Any], epochs: int) -> str:
    """The one log line per epoch."""
    s = (
        f"epoch {r['epoch']}/{epochs}  objective {r['objective']:.3f}  "
        f"tau mean {r['meeting_time_mean']:.2f} max {r['meeting_time_max']}  "
        f"capped {r['capped_fraction']:.2%}  {r['examples_per_second']:.0f} ex/s  "
        f"{r['wall_time']:.1f}s"
    )
    if "test_log_likelihood" in r:
        s += f"  test LL {r['test_log_likelihood']:.2f} (K={r['eval_num_samples']})"
    return s


def format_duration(seconds: float) -> str:
    """``~40 s``, ``~12 min``, ``~8.5 h``."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


def evaluate_during_training(vae, params, eval_x, config: TrainConfig, key) -> dict[str, Any]:
    """``--eval-every``: the IS test log-likelihood (K = ``eval_num_samples``) and ELBO."""
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
