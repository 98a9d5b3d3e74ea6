"""PNG plots of a training run (matplotlib, Agg backend): curves, samples, reconstructions, tau.

``plot_run(run_dir)`` writes into ``run_dir/plots/``:

* ``curves.png``: the training objective (mean ``info["bound"]``: the IWAE-S bound of the first
  chain state for the CIS-based estimators, the ELBO / IWAE bound otherwise) per epoch, the test
  log-likelihood where it was evaluated during training (and ``eval.json``'s final value), the
  mean and max meeting time, the ESS, the meeting-time tail index, the capped fraction and the
  throughput (examples/s) per epoch, with the end of a warm start marked;
* ``samples.png``: decoder means of x ~ p(x | z), z ~ N(0, I) from the latest checkpoint;
* ``reconstructions.png``: test images (top rows) above their reconstructions (bottom rows);
* ``meeting_times.png``: the histogram of the last epoch's per-example meeting times tau
  (``meeting_times.npy``); estimators without coupled chains have none and say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_run",
    "plot_training_curves",
    "plot_image_grid",
    "plot_reconstructions",
    "plot_meeting_times",
]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_training_curves(
    metrics: list[dict], path: str | Path, final_eval: dict | None = None
) -> Path:
    """Six panels of the per-epoch ``metrics.jsonl`` records; returns the PNG's path.

    Objective (and test log-likelihood), meeting times, capped lanes, ESS, the meeting-time tail
    index and throughput, against whole epochs. A dotted line marks where a warm start ends;
    statistics a phase does not have (meeting times of a warm-start IWAE epoch, ``null`` in the
    records) are left out, not drawn as zeros.
    """
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig, axes = plt.subplots(3, 2, figsize=(10, 10))
    ep = np.array([r["epoch"] for r in metrics])
    warm = [r["epoch"] for r in metrics if r.get("phase") == "warm_start"]
    boundary = max(warm) + 0.5 if warm and max(warm) < ep.max() else None

    def col(name):
        return np.array([np.nan if r.get(name) is None else r[name] for r in metrics], float)

    def finish(ax, ylabel, title, legend=False):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(ep):  # every panel spans the whole run, whatever epochs it has data for
            ax.set_xlim(ep.min() - 0.5, ep.max() + 0.5)
        if boundary is not None:
            ax.axvline(boundary, color="grey", ls=":", lw=1, label="warm start ends")
        if legend or boundary is not None:
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=8)

    def curve(ax, name, label=None):
        y = col(name)
        if len(ep) and np.isfinite(y).any():
            ax.plot(ep, y, ".-", label=label)
        return y

    ax = axes[0, 0]
    curve(ax, "objective", "train objective (mean bound)")
    ll = col("test_log_likelihood")
    ok = np.isfinite(ll)
    if ok.any():
        se = col("test_log_likelihood_stderr")[ok]
        ax.errorbar(ep[ok], ll[ok], yerr=se, fmt="o-", label="test log-likelihood (IS)")
    if final_eval:
        ax.axhline(
            final_eval["test_log_likelihood"],
            color="k",
            ls="--",
            label=f"final test LL, K={final_eval.get('num_samples')}",
        )
    finish(ax, "nats per example", "objective", legend=True)

    ax = axes[0, 1]
    curve(ax, "meeting_time_mean", "mean")
    curve(ax, "meeting_time_max", "max")
    finish(ax, "meeting time tau", "coupled chains: meeting time", legend=True)

    ax = axes[1, 0]
    curve(ax, "ess_mean")
    finish(ax, "ESS of the S importance weights", "effective sample size (mean)")

    ax = axes[1, 1]
    alpha = curve(ax, "tail_index", "alpha")
    if np.isfinite(alpha).any():
        ax.axhline(2.0, color="r", ls="--", lw=1, label="2: finite variance needs alpha > 2")
    finish(ax, "tail index alpha", "meeting-time tail: P(tau > t) ~ t^-alpha", legend=True)

    ax = axes[2, 0]
    curve(ax, "capped_fraction")
    finish(ax, "fraction", "chains stopped at --max-iters (capped)")

    ax = axes[2, 1]
    curve(ax, "examples_per_second")
    finish(ax, "examples / s", "throughput")
    fig.tight_layout()
    return _save(fig, path)


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    side = int(round(math.sqrt(x.shape[-1])))
    if side * side != x.shape[-1]:
        raise ValueError(f"cannot show vectors of length {x.shape[-1]} as square images.")
    return x.reshape(-1, side, side)


def _tile(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = im
    return grid


def plot_image_grid(x: np.ndarray, path: str | Path, title: str = "", cols: int = 8) -> Path:
    """Vectors (N, D) with D a square, shown as a grid of grey images in [0, 1]."""
    images = _as_images(x)
    grid = _tile(images, min(cols, len(images)))
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 25, grid.shape[0] / 25 + 0.4))
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))


def plot_reconstructions(
    x: np.ndarray, recon: np.ndarray, path: str | Path, cols: int = 8, title: str = ""
) -> Path:
    """Originals and reconstructions in alternating row blocks (originals above)."""
    xi, ri = _as_images(x), _as_images(recon)
    blocks = []
    for start in range(0, len(xi), cols):
        blocks.append(_tile(xi[start : start + cols], cols))
        blocks.append(_tile(ri[start : start + cols], cols))
    grid = np.concatenate(blocks, axis=0)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 25, grid.shape[0] / 25 + 0.4))
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title or "test images (odd rows) and reconstructions (even rows)", fontsize=9)
    return _save(fig, Path(path))


def plot_meeting_times(meeting_times: np.ndarray | None, path: str | Path, note: str = "") -> Path:
    """Histogram of per-example meeting times (integers >= 1), log-scaled counts."""
    fig, ax = plt.subplots(figsize=(6, 4))
    mt = None if meeting_times is None else np.asarray(meeting_times).ravel()
    if mt is None or mt.size == 0 or mt.max() <= 0:
        ax.text(
            0.5,
            0.5,
            note or "no meeting times (this estimator runs no coupled chains)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        ax.set_axis_off()
    else:
        bins = np.arange(0.5, mt.max() + 1.5, 1.0) if mt.max() <= 100 else 50
        # matplotlib's stubs type bins as int | Sequence[float]; an ndarray works (documented)
        ax.hist(mt, bins=bins, log=True)  # type: ignore[arg-type]
        ax.set_xlabel("meeting time tau")
        ax.set_ylabel("examples (log scale)")
        ax.set_title(
            f"last epoch: mean {mt.mean():.2f}, max {int(mt.max())}, n = {mt.size}"
            + (f" ({note})" if note else ""),
            fontsize=9,
        )
    return _save(fig, Path(path))


def plot_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    num_samples: int = 64,
    seed: int = 0,
    data_dir: str | None = None,
) -> list[Path]:
    """Write the four PNGs of a run (see the module docstring); returns their paths.

    Curves and the meeting-time histogram need only ``metrics.jsonl`` / ``meeting_times.npy``;
    samples and reconstructions need a checkpoint and the test data.
    """
    import jax

    from vaeml_jax.training import (
        MEETING_TIMES_FILE,
        RunDirError,
        load_data,
        load_run,
        read_config,
        read_metrics,
    )

    run_dir = Path(run_dir)
    if read_config(run_dir) is None:
        raise RunDirError(f"{run_dir} holds no vaeml run (no config.json).")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    paths = []
    final_eval = None
    if (run_dir / "eval.json").exists():
        try:
            final_eval = json.loads((run_dir / "eval.json").read_text())
        except json.JSONDecodeError:
            final_eval = None
    paths.append(plot_training_curves(read_metrics(run_dir), out / "curves.png", final_eval))

    config, vae, params, epoch = load_run(run_dir)
    mt_path = run_dir / MEETING_TIMES_FILE
    mt = np.load(mt_path) if mt_path.exists() else None
    paths.append(
        plot_meeting_times(
            mt, out / "meeting_times.png", note=f"{config.estimator}, S={config.num_particles}"
        )
    )

    key_s, key_r = jax.random.split(jax.random.key(seed))
    samples = np.asarray(vae.sample(params, key_s, num_samples))
    paths.append(
        plot_image_grid(
            samples, out / "samples.png", title=f"samples, {config.estimator}, epoch {epoch}"
        )
    )
    x = load_data(config, data_dir)[2][:16]
    recon = np.asarray(vae.reconstruct(params, x, key_r))
    paths.append(plot_reconstructions(x, recon, out / "reconstructions.png"))
    return paths
