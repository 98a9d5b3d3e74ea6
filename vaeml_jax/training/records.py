"""The per-epoch record: what ``metrics.jsonl`` holds, the progress bar shows and the log prints.

:func:`epoch_record` is the ONE place where an epoch's host-side metrics (the per-step buffers of
:func:`vaeml_jax.training.step.make_train_step`, brought to the host once per epoch) become the
JSON record; a new per-epoch statistic (a diagnostic of the meeting times, say) is added there.
:func:`evaluate_during_training` gives the ``--eval-every`` entries it merges in.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vaeml_jax import diagnostics
from vaeml_jax.training.config import TrainConfig

__all__ = [
    "epoch_record",
    "epoch_diagnostics",
    "has_chains",
    "record_summary",
    "HealthMonitor",
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
    phase: str = "main",
    estimator: str | None = None,
) -> dict[str, Any]:
    """The record of 1-based ``epoch`` written to ``metrics.jsonl``.

    Args:
      host: the epoch's per-step metrics on the host, each (steps, ...): ``bound``, ``finite``,
        ``num_log_joint_evals``, ``meeting_time``/``num_iters``/``capped`` (steps, B, C).
      seconds: wall time of the epoch's steps (compilation excluded).
      compile_seconds: set on the epoch that compiled the step.
      evaluation: the entries of :func:`evaluate_during_training`, when the epoch evaluated.
      phase, estimator: ``"warm_start"`` or ``"main"``, and the estimator the epoch used.

    Every statistic is JSON ``null`` where it is undefined, never NaN and never a stand-in 0: the
    meeting times and capped fraction of an estimator without coupled chains (a warm-start IWAE
    epoch, say), the diagnostics (:func:`epoch_diagnostics`) without importance weights or with too
    few lanes for the tail index.
    """
    steps = host["bound"].shape[0]
    mt = host["meeting_time"].astype(np.float64)
    it = host["num_iters"].astype(np.float64)
    chains = has_chains(host)
    iterates = chains or bool(np.any(it > 0))  # MCMC runs one chain: iterations, no meeting
    capped = chains or estimator in CAPPED_ESTIMATORS  # estimators with a cap that biases
    examples = steps * batch_size
    record: dict[str, Any] = {
        "epoch": epoch,
        "objective": float(np.mean(host["bound"].astype(np.float64))),
        "meeting_time_mean": float(mt.mean()) if chains else None,
        "meeting_time_max": int(mt.max()) if chains else None,
        "num_iters_mean": float(it.mean()) if iterates else None,
        "num_iters_max": int(it.max()) if iterates else None,
        "capped_fraction": float(np.mean(host["capped"])) if capped else None,
        "num_log_joint_evals": int(np.sum(host["num_log_joint_evals"].astype(np.int64))),
        "steps": steps,
        "examples": examples,
        "wall_time": seconds,
        "examples_per_second": examples / seconds if seconds > 0 else None,
        "lr": lr,
        "num_devices": num_devices,
        "phase": phase,
    }
    if estimator is not None:
        record["estimator"] = estimator
    record.update(_json_floats(epoch_diagnostics(host)))
    if compile_seconds is not None:
        record["compile_seconds"] = compile_seconds
    if evaluation:
        record.update(evaluation)
    return record


# Estimators without coupled chains whose cap (levels, terms) is reported as biased.
CAPPED_ESTIMATORS = ("mlmc", "sumo")


def has_chains(host: dict[str, np.ndarray]) -> bool:
    """Whether the epoch ran coupled chains (a meeting time is >= 1 wherever chains ran; the
    estimators without chains report 0)."""
    return bool(np.any(host["meeting_time"] > 0))


DIAGNOSTIC_KEYS = (
    "ess_mean",
    "log1p_chi2_mean",
    "log_weight_std_mean",
    "nonfinite_weight_fraction",
    "tail_index",
)


def epoch_diagnostics(host: dict[str, np.ndarray]) -> dict[str, float]:
    """:func:`vaeml_jax.diagnostics.summarize` of the epoch's steps: the numbers a custom loop gets.

    Estimators without importance weights (SUMO, a custom one) report NaN ``ess``; their
    weight statistics are then NaN too, not "every weight non-finite" (which a NaN ESS would
    otherwise count as). Meeting times are only summarised where lanes ran (all zero otherwise).
    """
    ess = host.get("ess")
    has_weights = ess is not None and bool(np.any(~np.isnan(ess)))
    mt = host["meeting_time"]
    out = diagnostics.summarize(
        meeting_time=mt if np.any(mt > 0) else None,
        capped=host["capped"],
        ess=ess if has_weights else None,
        log1p_chi2=host["log1p_chi2"] if has_weights else None,
        log_weight_std=host["log_weight_std"] if has_weights else None,
    )
    out.pop("capped_fraction", None)  # in the record already, from the same buffer
    return {k: out.get(k, math.nan) for k in DIAGNOSTIC_KEYS}


def _json_floats(d: dict[str, float]) -> dict[str, float | None]:
    """NaN and inf become None: ``metrics.jsonl`` must stay strict JSON."""
    return {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in d.items()}


def record_summary(record: dict[str, Any]) -> dict[str, float]:
    """The :func:`~vaeml_jax.diagnostics.summarize` dict of a record (None back to NaN), for
    :func:`~vaeml_jax.diagnostics.health_warnings`."""
    keys = (*DIAGNOSTIC_KEYS, "capped_fraction")
    return {k: math.nan if record.get(k) is None else float(record[k]) for k in keys if k in record}


class HealthMonitor:
    """The per-epoch health warning, throttled so a persistent problem does not flood the log.

    :func:`~vaeml_jax.diagnostics.health_warnings` lines of an epoch are joined into ONE line,
    logged the first time, again whenever the set of categories (non-finite weights, capped
    lanes, heavy tail) changes, and otherwise at most every ``repeat_every`` epochs. An epoch
    without warnings resets it, so a problem that comes back is reported at once.
    """

    CATEGORIES = (
        ("nonfinite", "finite importance weight"),
        ("capped", "iteration cap"),
        ("tail", "tail index"),
    )

    def __init__(self, log, repeat_every: int = 10):
        self.log = log
        self.repeat_every = repeat_every
        self._last: tuple[frozenset, int] | None = None

    @classmethod
    def categories(cls, lines: list[str]) -> frozenset:
        return frozenset(
            name for name, needle in cls.CATEGORIES if any(needle in ln for ln in lines)
        )

    def check(
        self, summary: dict, epoch: int, max_iters: int | None = None, estimator: str = "unbiased"
    ) -> str | None:
        """Log (and return) the warning line of 1-based ``epoch``, or None when it is withheld
        (``max_iters``: the cap of ``estimator``, named in the line)."""
        lines = diagnostics.health_warnings(summary, max_iters, estimator=estimator)
        if not lines:
            self._last = None
            return None
        cats = self.categories(lines)
        if self._last is not None:
            last_cats, last_epoch = self._last
            if cats == last_cats and epoch - last_epoch < self.repeat_every:
                return None
        self._last = (cats, epoch)
        line = f"vaeml: warning: epoch {epoch}: " + " | ".join(lines)
        self.log(line)
        return line


def progress_postfix(
    host: dict[str, np.ndarray], done: int, elapsed: float, batch_size: int
) -> dict[str, str]:
    """The progress bar's statistics after ``done`` steps of an epoch."""
    if done == 0:
        return {}
    mt = host["meeting_time"][:done]
    post = {
        "obj": f"{float(np.mean(host['bound'][:done])):.2f}",
        "ex/s": f"{done * batch_size / max(elapsed, 1e-9):.0f}",
    }
    if np.any(mt > 0):  # mean/max meeting time: only where coupled chains ran
        post["tau"] = f"{float(mt.mean()):.2f}/{int(mt.max())}"
    ess = host.get("ess")
    if ess is not None and np.any(np.isfinite(ess[:done])):
        post["ess"] = f"{float(np.nanmean(ess[:done])):.1f}"
    if np.any(mt > 0):  # the running tail index of the epoch's lanes so far
        alpha = diagnostics.hill_tail_index(mt)
        post["alpha"] = f"{alpha:.2f}" if math.isfinite(alpha) else "-"
    return post


def format_record(r: dict[str, Any], epochs: int) -> str:
    """The one log line per epoch."""
    s = f"epoch {r['epoch']}/{epochs}  objective {r['objective']:.3f}  "
    if r.get("meeting_time_mean") is not None:  # coupled chains ran
        s += (
            f"tau mean {r['meeting_time_mean']:.2f} max {r['meeting_time_max']}  "
            f"capped {r['capped_fraction']:.2%}  "
        )
    elif r.get("capped_fraction") is not None:  # MLMC's levels, SUMO's terms: capped examples
        s += f"capped {r['capped_fraction']:.2%}  "
    if r.get("examples_per_second") is not None:
        s += f"{r['examples_per_second']:.0f} ex/s  "
    s += f"{r['wall_time']:.1f}s"
    if r.get("ess_mean") is not None:
        s += f"  ess {r['ess_mean']:.2f}"
    if r.get("tail_index") is not None:
        s += f"  alpha {r['tail_index']:.2f}"
    if r.get("phase") == "warm_start":
        s += f"  (warm start: {r.get('estimator')})"
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


def evaluate_during_training(
    vae, params, eval_x, config: TrainConfig, key, mesh=None
) -> dict[str, Any]:
    """``--eval-every``: the IS test log-likelihood (K = ``eval_num_samples``) and ELBO, its
    examples split over the devices of ``mesh`` (the training mesh) when one is given."""
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
        mesh=mesh,
    )
    return {
        "test_log_likelihood": float(res["test_log_likelihood"]),
        "test_log_likelihood_stderr": float(res["test_log_likelihood_stderr"]),
        "test_elbo": float(res["test_elbo"]),
        "eval_num_samples": int(config.eval_num_samples),
        "eval_examples": int(eval_x.shape[0]),
        "eval_seconds": float(res["seconds"]),
    }
