r"""Gradient variance against cost, meeting times and encoder objectives.

Four measurements on the IWAE paper's one-layer MNIST VAE (``vaeml_jax.training.build_vae``):

1. **Brief training** through the product (``vaeml_jax.training.train``) with the unbiased estimator
   H_{0:0} (S particles) under each encoder objective in ``--encoder-objectives`` (``elbo``,
   ``iwae``, ``inclusive_kl``): the run is resumed one epoch at a time so the per-example meeting
   times of EVERY epoch (``meeting_times.npy``) are kept, with the capped fraction and wall time;
   each final model gets an IS test log-likelihood (K = ``--eval-samples``). The ``iwae`` run's
   final parameters are "the briefly trained model" of parts 2-3.
2. **Gradient variance against cost**, at initialization (the same initialization ``train`` uses)
   and at the briefly trained model, for ONE fixed minibatch (the first ``--var-batch`` training
   images, binarized once with seed 0): R = ``--replicates`` independent calls of each estimator
   (keys ``fold_in(key, r)``); for the decoder's parameters theta_d (the ones whose gradient the
   estimators target; the encoder gets its own objective's gradient) the trace of the covariance

       tr Cov = sum_j Var(g_j) ~= R/(R-1) mean_r ||g_r - g_bar||^2,

   with standard error std_r(||g_r - g_bar||^2)/sqrt(R), against the ``log_joint`` evaluations per
   example: ``executed`` is ``info["num_log_joint_evals"]/B`` (the plain loop runs masked lanes
   to the batch maximum), ``own`` is each lane's own 2S + (S+1) num_iters (what a perfect scheduler
   pays). IWAE-S for S in ``--iwae-s`` and the unbiased estimator for S in ``--unbiased-s`` at
   k = m = 0 and for (k, m) in ``--km`` at S = ``--num-particles``. Because the unbiased estimator
   has mean grad log p(x) exactly (up to capped lanes), the squared bias of IWAE-S,
   ||E g_IWAE - E g_unb||^2, is estimated as ||g_bar_IWAE - g_bar_ref||^2 minus the two noise
   terms tr Cov/R, with the unbiased configuration of smallest tr Cov/R as the reference.
   Beside them, on the same minibatch, states and keys: SUMO (``make_sumo_grad``, one row per
   max_terms in ``--sumo``; own evaluations 2(1 + J), both passes over the draws it uses) and the
   MLMC estimators (``make_mlmc_grad``, one row per ``estimator,max_level`` in ``--mlmc`` at
   n_0 = ``--mlmc-particles``, rate ``--mlmc-rate``; own evaluations the library's
   ``own_log_joint_evals``, 2 n_0 2^L + n_0), whose squared distance to the reference mean is
   reported the same way (a consistency check: both are unbiased up to their caps). Because an
   estimator with an infinite variance still gives a finite sample tr Cov, every row also gets a
   robust spread (median / p90 / p99 / max of ||g_r - g_bar||), the largest replicate's share of
   the summed squared deviations, and tr Cov from the first R/8, R/4, R/2 and R replicates.
3. **Meeting-time distributions** over S (the lanes of part 2, init and trained) and over training
   (part 1, per epoch), as survival functions P(tau > t), with the fraction of capped lanes.
4. **Encoder objective**: meeting times per epoch and test log-likelihood per objective (part 1).

Outputs: ``--json`` (default ``runs/variance/variance.json``), a markdown summary on stdout, and
PNG figures in ``--plots`` (default ``benchmarks/plots``): ``variance_vs_cost.png``,
``meeting_times_by_s.png``, ``meeting_times_training.png``.

    python benchmarks/variance.py                  # CPU defaults (see RESULTS.md for the time)
    python benchmarks/variance.py --quick --plots /tmp/p --json /tmp/v.json   # smoke run

Part 4 over more seeds: ``--encoder-only --seed N`` runs part 1 alone (into
``runs/variance_seedN``, figures there too, so the recorded seed-0 run is not overwritten), and
``--encoder-summary A.json B.json ...`` tabulates the encoder objectives across those runs (one per
seed, same settings): final-epoch meeting times and test log-likelihood, mean +- SE over seeds,
differences to ``iwae`` paired by seed.

    python benchmarks/variance.py --train-examples 10000 --encoder-only --seed 1
    python benchmarks/variance.py --encoder-summary runs/variance/variance.json \
        runs/variance_seed1/variance.json runs/variance_seed2/variance.json

Part 2 over more seeds: ``--encoder-objectives iwae --seed N`` trains the ``iwae`` run alone and
measures part 2 at its states; ``--variance-summary A.json B.json ...`` tabulates tr Cov, own
evaluations and their product per estimator and state across those runs, mean +- SE over seeds.

    python benchmarks/variance.py --train-examples 10000 --encoder-objectives iwae --seed 1
    python benchmarks/variance.py --variance-summary runs/variance/variance.json \
        runs/variance_seed1/variance.json runs/variance_seed2/variance.json

References: Luo et al. (SUMO, ICLR 2020); Shi & Cornish (MLMC, AISTATS 2021); Ruiz, Titsias,
Cemgil & Doucet (UAI 2021); Jacob, O'Leary & Atchade (JRSS-B 2020);
Burda, Grosse & Salakhutdinov (ICLR 2016).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reproduce import machine_info  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.data import binarize_static, binarized_test_set, load_dataset  # noqa: E402
from vaeml_jax.evaluation import evaluate  # noqa: E402
from vaeml_jax.training import (  # noqa: E402
    MEETING_TIMES_FILE,
    TrainConfig,
    build_vae,
    read_metrics,
    train,
)

PRESETS = {
    "cpu": dict(
        train_examples=2000,
        epochs=3,
        batch_size=100,
        num_particles=5,
        encoder_objectives=["elbo", "iwae", "inclusive_kl"],
        eval_samples=1000,
        eval_examples=500,
        var_batch=20,
        replicates=48,
        iwae_s=[2, 5, 10, 50],
        unbiased_s=[2, 5, 10, 20],
        km=["0,2", "2,4"],
        sumo=[128],
        mlmc=["roulette,10", "single_term,10", "roulette,6", "single_term,6"],
        hidden=[200, 200],
        latent_dim=50,
    ),
    "quick": dict(
        train_examples=200,
        epochs=2,
        batch_size=50,
        num_particles=3,
        encoder_objectives=["iwae", "inclusive_kl"],
        eval_samples=20,
        eval_examples=20,
        var_batch=4,
        replicates=4,
        iwae_s=[2],
        unbiased_s=[2],
        km=["0,1"],
        sumo=[],
        mlmc=[],
        hidden=[16],
        latent_dim=4,
    ),
}


# ------------------------------------------------------------------------------------ statistics
def trace_cov(g: np.ndarray) -> tuple[float, float]:
    """tr Cov of R vectors g (R, P): R/(R-1) mean ||g_r - g_bar||^2, and its standard error."""
    r = g.shape[0]
    d = np.sum((g - g.mean(0)) ** 2, axis=1) * r / (r - 1)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(r)) if r > 1 else float("nan")


def survival(tau: np.ndarray, t_max: int) -> tuple[np.ndarray, np.ndarray]:
    """P(tau > t) for t = 0..t_max (the empirical survival function)."""
    t = np.arange(t_max + 1)
    tau = np.sort(np.asarray(tau).ravel())
    return t, 1.0 - np.searchsorted(tau, t, side="right") / tau.size


def tail_index(tau: np.ndarray, top: float = 0.05) -> float:
    """Hill estimate of alpha in P(tau > t) ~ t^(-alpha) from the largest ``top`` fraction.

    alpha <= 2 means tau has no finite variance, and then neither, in general, has H_{k:m}: its
    correction sum has tau - k - 1 terms.
    """
    t = np.sort(np.asarray(tau, np.float64).ravel())[::-1]
    k = max(2, int(t.size * top))
    if t.size <= k or t[k] <= 0:
        return float("nan")
    return float(1.0 / np.mean(np.log(t[:k] / t[k])))


def tau_stats(tau: np.ndarray) -> dict:
    tau = np.asarray(tau, np.float64).ravel()
    return {
        "lanes": int(tau.size),
        "mean": float(tau.mean()),
        "median": float(np.median(tau)),
        "p90": float(np.percentile(tau, 90)),
        "p99": float(np.percentile(tau, 99)),
        "max": int(tau.max()),
        "tail_index": tail_index(tau),
    }


# ----------------------------------------------------------------------------------- the parts
def brief_training(a, log) -> dict:
    """Part 1: unbiased-estimator runs per encoder objective, one epoch at a time."""
    out = {}
    ds = load_dataset(a.dataset, a.data_dir)
    test_x = np.asarray(binarized_test_set(ds, seed=0), np.float32)[: a.eval_examples]
    for obj in a.encoder_objectives:
        cfg = TrainConfig(
            dataset=a.dataset,
            data_dir=a.data_dir,
            estimator="unbiased",
            num_particles=a.num_particles,
            encoder_objective=obj,
            hidden=tuple(a.hidden),
            latent_dim=a.latent_dim,
            batch_size=a.batch_size,
            max_train_examples=a.train_examples,
            seed=a.seed,
            checkpoint_every=1,
            keep_checkpoints=1,
        )
        run_dir = Path(a.work) / f"train_{obj}"
        shutil.rmtree(run_dir, ignore_errors=True)
        taus, params = [], None
        for epoch in range(1, a.epochs + 1):
            res = train(
                TrainConfig.from_dict({"epochs": epoch}, base=cfg),
                run_dir,
                resume=epoch > 1,
                progress=False,
                log=lambda m: log("    " + m),
            )
            taus.append(np.load(run_dir / MEETING_TIMES_FILE))
            params = res["params"]
        records = read_metrics(run_dir)
        vae = build_vae(cfg.resolved())
        ev = evaluate(
            vae.model,
            params,
            test_x,
            jax.random.key(a.eval_seed),
            num_samples=a.eval_samples,
            chunk_size=min(500, a.eval_samples),
        )
        out[obj] = {
            "params": params,
            "vae": vae,
            "meeting_times": taus,
            "record": {
                "per_epoch": [
                    {
                        **tau_stats(t),
                        "capped_fraction": r["capped_fraction"],
                        "objective": r["objective"],
                        "wall_time": r["wall_time"],
                        "evals_per_example": r["num_log_joint_evals"] / r["examples"],
                    }
                    for t, r in zip(taus, records, strict=True)
                ],
                "test_ll": ev["test_log_likelihood"],
                "test_ll_stderr_examples": ev["test_log_likelihood_stderr"],
                "test_elbo": ev["test_elbo"],
                "eval_samples": a.eval_samples,
                "eval_examples": int(test_x.shape[0]),
            },
        }
        log(
            f"  encoder {obj}: test LL {ev['test_log_likelihood']:.2f}, per epoch tau "
            + ", ".join(f"{p['mean']:.2f}/{p['max']}" for p in out[obj]["record"]["per_epoch"])
        )
    return out


def spread_stats(g: np.ndarray) -> dict:
    """Robust spread of R gradient vectors g (R, P) and how tr Cov moves with the replicate count.

    ``norm_*``: median, 90th and 99th percentile and max of ||g_r - g_bar||; ``max_share``: the
    largest replicate's share of sum_r ||g_r - g_bar||^2 (about a few / R for a light-tailed
    estimator, near 1 when one replicate carries the estimate, the sign of an infinite variance);
    ``trace_cov_by_r``: tr Cov from the first R/8, R/4, R/2 and all R replicates (each with its
    own mean). With a finite variance they agree within their noise; with an infinite one the
    estimate tends to grow with R, and jumps whenever a new extreme replicate arrives.
    """
    r = g.shape[0]
    d = np.sqrt(np.sum((g - g.mean(0)) ** 2, axis=1))
    by_r = {}
    for n in sorted({max(2, r // 8), max(2, r // 4), max(2, r // 2), r}):
        by_r[str(n)] = trace_cov(g[:n])[0]
    return {
        "norm_median": float(np.median(d)),
        "norm_p90": float(np.percentile(d, 90)),
        "norm_p99": float(np.percentile(d, 99)),
        "norm_max": float(d.max()),
        "max_share": float(np.max(d**2) / np.sum(d**2)),
        "trace_cov_by_r": by_r,
    }


def level_stats(n: np.ndarray) -> dict:
    """The random level L (MLMC) or number of terms J (SUMO) over all lanes of all replicates."""
    n = np.asarray(n, np.float64).ravel()
    return {
        "mean": float(n.mean()),
        "p99": float(np.percentile(n, 99)),
        "max": int(n.max()),
    }


def estimator_configs(a) -> list[dict]:
    cfgs = [{"name": f"iwae S={s}", "kind": "iwae", "S": s, "k": 0, "m": 0} for s in a.iwae_s]
    cfgs += [
        {"name": f"unbiased S={s} k=0 m=0", "kind": "unbiased", "S": s, "k": 0, "m": 0}
        for s in a.unbiased_s
    ]
    for km in a.km:
        k, m = (int(v) for v in km.split(","))
        cfgs.append(
            {
                "name": f"unbiased S={a.num_particles} k={k} m={m}",
                "kind": "unbiased",
                "S": a.num_particles,
                "k": k,
                "m": m,
            }
        )
    for j in a.sumo:
        cfgs.append(
            {"name": f"sumo J_max={j}", "kind": "sumo", "S": 1, "k": 0, "m": 0, "max_terms": j}
        )
    for spec in a.mlmc:
        est, lmax = spec.split(",")
        cfgs.append(
            {
                "name": f"mlmc {est} n0={a.mlmc_particles} r={a.mlmc_rate:g} L_max={lmax}",
                "kind": "mlmc",
                "S": a.mlmc_particles,
                "k": 0,
                "m": 0,
                "estimator": est,
                "rate": a.mlmc_rate,
                "max_level": int(lmax),
            }
        )
    return cfgs


def make_grad(model, c: dict, max_iters: int):
    if c["kind"] == "iwae":
        return vj.make_iwae_grad(model, num_particles=c["S"])
    if c["kind"] == "sumo":  # the library's defaults otherwise (m = 1, encoder sumo_variance)
        return vj.make_sumo_grad(model, max_terms=c["max_terms"])
    if c["kind"] == "mlmc":  # encoder objective: the default iwae, B n_0 more evaluations
        return vj.make_mlmc_grad(
            model,
            num_particles=c["S"],
            rate=c["rate"],
            max_level=c["max_level"],
            estimator=c["estimator"],
        )
    return vj.make_unbiased_grad(
        model, num_particles=c["S"], k=c["k"], m=c["m"], max_iters=max(max_iters, c["m"])
    )


def decoder_flat(grads) -> jax.Array:
    return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(grads["decoder"])])


def variance_study(a, vae, states: dict, x: np.ndarray, log) -> list[dict]:
    """Part 2 (and the lanes of part 3): R replicates per (estimator config, model state)."""
    rows = []
    x = jnp.asarray(x)
    B = x.shape[0]
    for c in estimator_configs(a):
        est = make_grad(vae.model, c, a.max_iters)

        @jax.jit
        def call(params, key, est=est):
            g, info = est(params, x, key)
            return decoder_flat(g), info

        for state_name, params in states.items():
            t0 = time.perf_counter()
            gs, taus, iters, capped, evals, owns = [], [], [], [], [], []
            for r in range(a.replicates):
                g, info = call(params, jax.random.fold_in(jax.random.key(a.seed + 7), r))
                gs.append(np.asarray(g, np.float64))
                taus.append(np.asarray(info["meeting_time"]))
                iters.append(np.asarray(info["num_iters"]))
                capped.append(np.asarray(info["capped"]))
                evals.append(int(info["num_log_joint_evals"]) / B)
                if c["kind"] == "mlmc":
                    owns.append(np.asarray(info["own_log_joint_evals"]))
            g = np.stack(gs)
            tc, tc_se = trace_cov(g)
            iters = np.stack(iters)
            S = c["S"]
            if c["kind"] == "unbiased":
                own = 2 * S + (S + 1) * iters
            elif c["kind"] == "mlmc":  # 2 n_0 2^L (both passes) + n_0 (encoder objective)
                own = np.stack(owns)
            elif c["kind"] == "sumo":  # both passes over the m + J = 1 + J draws it uses
                own = 2 * (1 + iters)
            else:
                own = np.full(iters.shape, S)
            row = {
                **c,
                "state": state_name,
                "replicates": a.replicates,
                "batch": int(B),
                "trace_cov": tc,
                "trace_cov_se": tc_se,
                "mean_grad": g.mean(0),
                "evals_executed": float(np.mean(evals)),
                "evals_own": float(np.mean(own)),
                "capped_fraction": float(np.mean(np.stack(capped))),
                "spread": spread_stats(g),
                "seconds": time.perf_counter() - t0,
            }
            if c["kind"] == "unbiased":
                row["meeting_times"] = np.stack(taus).ravel()
                row["tau"] = tau_stats(row["meeting_times"])
            if c["kind"] in ("mlmc", "sumo"):
                row["levels"] = level_stats(iters)
            rows.append(row)
            sp = row["spread"]
            log(
                f"  {c['name']:<24} {state_name:<8} trCov {tc:.4g} +- {tc_se:.2g}, "
                f"evals/example own {row['evals_own']:.1f} executed {row['evals_executed']:.1f}, "
                f"capped {row['capped_fraction']:.3f}, |g-gbar| median {sp['norm_median']:.3g} "
                f"p99 {sp['norm_p99']:.3g} max share {sp['max_share']:.2f}, "
                f"trCov by R {' / '.join(f'{v:.3g}' for v in sp['trace_cov_by_r'].values())}, "
                f"{row['seconds']:.1f}s"
            )
    # Squared bias of each IWAE-S against the best-determined unbiased mean (same state).
    for state_name in states:
        unb = [r for r in rows if r["state"] == state_name and r["kind"] == "unbiased"]
        if not unb:
            continue
        ref = min(unb, key=lambda r: r["trace_cov"] / r["replicates"])
        for r in rows:
            if r["state"] == state_name and r["kind"] in ("iwae", "sumo", "mlmc"):
                d2 = float(np.sum((r["mean_grad"] - ref["mean_grad"]) ** 2))
                noise = r["trace_cov"] / r["replicates"] + ref["trace_cov"] / ref["replicates"]
                r["bias_sq"] = d2 - noise
                r["bias_sq_noise"] = noise
                r["bias_ref"] = ref["name"]
    return rows


# ----------------------------------------------------------------------------------- plots
def plot_all(a, rows, training, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    states = list(dict.fromkeys(r["state"] for r in rows))
    if states:
        written += _plot_variance(plt, rows, states, plots)
    written.append(_plot_training(plt, training, plots))
    return written


def _plot_variance(plt, rows, states, plots: Path) -> list[str]:
    written = []
    # variance against cost
    fig, axes = plt.subplots(1, len(states), figsize=(5.5 * len(states), 4.2), squeeze=False)
    for ax, st in zip(axes[0], states, strict=True):
        rs = [r for r in rows if r["state"] == st]
        for kind, marker in (("iwae", "o"), ("unbiased", "s")):
            line = [r for r in rs if r["kind"] == kind and r["k"] == 0 and r["m"] == 0]
            line.sort(key=lambda r: r["S"])
            if line:
                ax.errorbar(
                    [r["evals_own"] for r in line],
                    [r["trace_cov"] for r in line],
                    yerr=[r["trace_cov_se"] for r in line],
                    marker=marker,
                    capsize=2,
                    label=f"{kind} (k=m=0), S = " + ",".join(str(r["S"]) for r in line),
                )
                for r in line:
                    ax.annotate(
                        f"S={r['S']}",
                        (r["evals_own"], r["trace_cov"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            if kind == "unbiased":
                for r in line:
                    ax.plot(r["evals_executed"], r["trace_cov"], "x", color="gray", ms=5)
        for r in rs:
            if r["kind"] == "unbiased" and (r["k"], r["m"]) != (0, 0):
                ax.errorbar(
                    r["evals_own"],
                    r["trace_cov"],
                    yerr=r["trace_cov_se"],
                    marker="^",
                    capsize=2,
                    ls="none",
                    label=f"unbiased S={r['S']} k={r['k']} m={r['m']}",
                )
        for r in rs:
            if r["kind"] in ("sumo", "mlmc"):
                ax.errorbar(
                    r["evals_own"],
                    r["trace_cov"],
                    yerr=r["trace_cov_se"],
                    marker="D" if r["kind"] == "sumo" else "v",
                    capsize=2,
                    ls="none",
                    label=r["name"],
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("log_joint evaluations per example (lane's own; x: executed, plain loop)")
        ax.set_ylabel("tr Cov of the decoder gradient")
        ax.set_title(f"{st}: fixed minibatch of {rs[0]['batch']}, {rs[0]['replicates']} replicates")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = plots / "variance_vs_cost.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))

    # meeting times by S
    fig, axes = plt.subplots(1, len(states), figsize=(5.5 * len(states), 4.2), squeeze=False)
    for ax, st in zip(axes[0], states, strict=True):
        for r in rows:
            if r["state"] == st and r["kind"] == "unbiased" and (r["k"], r["m"]) == (0, 0):
                t, s = survival(r["meeting_times"], int(r["meeting_times"].max()))
                ax.step(
                    t[1:],
                    np.maximum(s[1:], 1e-6),
                    where="post",
                    label=f"S={r['S']} (capped {r['capped_fraction']:.1%})",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.5 / max(1, rows[0]["replicates"] * rows[0]["batch"]), 1.1)
        ax.set_xlabel("t")
        ax.set_ylabel("P(meeting time > t)")
        ax.set_title(f"meeting times by S ({st})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    p = plots / "meeting_times_by_s.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    return written


def _plot_training(plt, training, plots: Path) -> str:
    """Survival functions of the meeting times per epoch, one panel per encoder objective."""
    objs = list(training)
    fig, axes = plt.subplots(1, len(objs), figsize=(5 * len(objs), 4.0), squeeze=False, sharey=True)
    for ax, obj in zip(axes[0], objs, strict=True):
        for e, tau in enumerate(training[obj]["meeting_times"], start=1):
            t, s = survival(tau, int(tau.max()))
            ax.step(t[1:], np.maximum(s[1:], 1e-6), where="post", label=f"epoch {e}")
        rec = training[obj]["record"]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_title(
            f"encoder {obj}: test LL {rec['test_ll']:.1f} (K={rec['eval_samples']})", fontsize=9
        )
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("P(meeting time > t), all training lanes of the epoch")
    fig.tight_layout()
    p = plots / "meeting_times_training.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return str(p)


# ----------------------------------------------------------------------------------- report
def markdown(a, rows, training) -> str:
    lines = []
    if rows:
        lines += variance_table(rows) + [""]
        if any("spread" in r for r in rows):
            lines += spread_table(rows) + [""]
    lines += [
        "#### Meeting times over training, by encoder objective (unbiased, "
        f"S = {a.num_particles}, k = m = 0, seed {a.seed})",
        "",
    ]
    lines += [
        "| encoder objective | epoch | lanes | tau mean | median | p90 | p99 | max | tail alpha | "
        "capped | train objective | epoch s | test LL (K) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for obj, tr in training.items():
        rec = tr["record"]
        for e, p in enumerate(rec["per_epoch"], start=1):
            ll = (
                f"{rec['test_ll']:.2f} +- {rec['test_ll_stderr_examples']:.2f} "
                f"({rec['eval_samples']})"
                if e == len(rec["per_epoch"])
                else ""
            )
            lines.append(
                f"| {obj} | {e} | {p['lanes']} | {p['mean']:.2f} | {p['median']:.0f} | "
                f"{p['p90']:.0f} | {p['p99']:.0f} | {p['max']} | "
                f"{p.get('tail_index', tail_index(tr['meeting_times'][e - 1])):.2f} | "
                f"{p['capped_fraction']:.4f} | "
                f"{p['objective']:.2f} | {p['wall_time']:.0f} | {ll} |"
            )
    return "\n".join(lines)


def variance_table(rows) -> list[str]:
    lines = ["#### Gradient variance against cost (decoder gradient, fixed minibatch)", ""]
    lines += [
        "| estimator | model | tr Cov +- SE | evals/example (own) | evals/example (executed) | "
        "tr Cov x own evals | squared bias (noise) | capped lanes | tau mean / p99 / max / alpha |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        bias = ""
        if "bias_sq" in r:  # below its own noise the difference of means says nothing
            resolved = r["bias_sq"] > 2 * r["bias_sq_noise"]
            bias = f"{r['bias_sq']:.3g} ({r['bias_sq_noise']:.2g})" + ("" if resolved else " n.s.")
        tau = (
            f"{r['tau']['mean']:.2f} / {r['tau']['p99']:.0f} / {r['tau']['max']} / "
            f"{r['tau'].get('tail_index', float('nan')):.2f}"
            if "tau" in r
            else ""
        )
        lines.append(
            f"| {r['name']} | {r['state']} | {r['trace_cov']:.4g} +- {r['trace_cov_se']:.2g} | "
            f"{r['evals_own']:.1f} | {r['evals_executed']:.1f} | "
            f"{r['trace_cov'] * r['evals_own']:.4g} | {bias} | {r['capped_fraction']:.4f} | "
            f"{tau} |"
        )
    return lines


def spread_table(rows) -> list[str]:
    """The robust spread of each row and tr Cov against the replicate count (``spread_stats``)."""
    rows = [r for r in rows if "spread" in r]
    counts = list(rows[0]["spread"]["trace_cov_by_r"])
    lines = [
        "#### Spread of the decoder gradient and tr Cov against the replicate count",
        "",
        "| estimator | model | median / p90 / p99 / max of \\|g - g_bar\\| | max share | "
        + " | ".join(f"tr Cov, first {n}" for n in counts)
        + " | L (MLMC) or J (SUMO): mean / p99 / max |",
        "| --- " * (4 + len(counts)) + "| --- |",
    ]
    for r in rows:
        sp = r["spread"]
        lev = r.get("levels")
        lev = f"{lev['mean']:.2f} / {lev['p99']:.0f} / {lev['max']}" if lev else ""
        by_r = [sp["trace_cov_by_r"].get(n) for n in counts]
        lines.append(
            f"| {r['name']} | {r['state']} | {sp['norm_median']:.3g} / {sp['norm_p90']:.3g} / "
            f"{sp['norm_p99']:.3g} / {sp['norm_max']:.3g} | {sp['max_share']:.2f} | "
            + " | ".join("" if v is None else f"{v:.4g}" for v in by_r)
            + f" | {lev} |"
        )
    return lines


def variance_summary(results: list[dict]) -> str:
    """Part 2 across seeds: one finished run's JSON per seed (``--variance-summary``).

    Per estimator and model state: tr Cov, own evaluations per example and their product, mean
    +- SE over seeds (each seed its own initialization, training and replicate keys), the
    product of each seed, and the median of ||g - g_bar|| (mean over seeds).
    """
    seeds = [r["settings"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--variance-summary needs one run per seed, got seeds {seeds}.")
    keys = ("dataset", "train_examples", "epochs", "batch_size", "var_batch", "replicates")
    for r in results[1:]:
        diff = [k for k in keys if r["settings"].get(k) != results[0]["settings"].get(k)]
        if diff:
            raise ValueError(f"--variance-summary: runs differ in {diff}; not comparable.")
    by_key: dict[tuple, list] = {}
    for res in results:
        for r in res["variance"]:
            by_key.setdefault((r["name"], r["state"]), []).append(r)
    st = results[0]["settings"]

    def mean_se(v, fmt=".4g"):
        v = np.asarray(v, np.float64)
        se = v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
        return f"{v.mean():{fmt}} +- {se:.2g}"

    lines = [
        f"#### Gradient variance against cost across seeds {seeds} (decoder gradient, "
        f"{st['var_batch']} images, {st['replicates']} replicates; mean +- SE over seeds)",
        "",
        "| estimator | model | seeds | tr Cov | evals/example (own) | tr Cov x own evals | "
        "tr Cov x own evals by seed | median \\|g - g_bar\\| | max share (max over seeds) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, state), rs in by_key.items():
        tc = [r["trace_cov"] for r in rs]
        ev = [r["evals_own"] for r in rs]
        prod = [t * e for t, e in zip(tc, ev, strict=True)]
        med = [r["spread"]["norm_median"] for r in rs if "spread" in r]
        share = [r["spread"]["max_share"] for r in rs if "spread" in r]
        lines.append(
            f"| {name} | {state} | {len(rs)} | {mean_se(tc)} | {mean_se(ev, '.1f')} | "
            f"{mean_se(prod)} | {' / '.join(f'{v:.3g}' for v in prod)} | "
            + (f"{np.mean(med):.3g} | {max(share):.2f} |" if med else " | |")
        )
    return "\n".join(lines)


def encoder_summary(results: list[dict]) -> str:
    """Part 4 across seeds: one finished run's JSON per seed (``--encoder-summary``).

    Final-epoch meeting times and test log-likelihood per encoder objective, mean +- standard
    error over seeds, and the test LL of each seed; differences to ``iwae`` are paired by seed.
    """
    seeds = [r["settings"]["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--encoder-summary needs one run per seed, got seeds {seeds}.")
    keys = ("dataset", "train_examples", "epochs", "batch_size", "num_particles", "eval_samples")
    for r in results[1:]:
        diff = [k for k in keys if r["settings"].get(k) != results[0]["settings"].get(k)]
        if diff:
            raise ValueError(f"--encoder-summary: runs differ in {diff}; not comparable.")
    objs = [o for o in results[0]["training"] if all(o in r["training"] for r in results)]

    def mean_se(v):
        v = np.asarray(v, np.float64)
        se = v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
        return f"{v.mean():.2f} +- {se:.2f}"

    st = results[0]["settings"]
    lines = [
        f"#### Encoder objective across seeds {seeds} (unbiased, S = {st['num_particles']}, "
        f"{st['epochs']} epochs; final epoch's meeting times; mean +- SE over seeds)",
        "",
        "| encoder objective | tau mean | p99 | tail alpha | capped | test LL | diff vs iwae | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " |",
        "| --- " * (7 + len(seeds)) + "|",
    ]
    ll = {o: [r["training"][o]["test_ll"] for r in results] for o in objs}
    for o in objs:
        last = [tau_stats(np.asarray(r["training"][o]["meeting_times"][-1])) for r in results]
        capped = [r["training"][o]["per_epoch"][-1]["capped_fraction"] for r in results]
        diff = mean_se(np.subtract(ll[o], ll["iwae"]))  # every run has iwae (parse_args)
        tau = " | ".join(mean_se([t[k] for t in last]) for k in ("mean", "p99", "tail_index"))
        lines.append(
            f"| {o} | {tau} | {np.mean(capped):.4f} | {mean_se(ll[o])} | {diff} | "
            + " | ".join(f"{v:.2f}" for v in ll[o])
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few replicates")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--train-examples", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-particles", type=int, help="S of the training runs and the (k, m) rows")
    p.add_argument("--encoder-objectives", nargs="+", choices=["elbo", "iwae", "inclusive_kl"])
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--eval-examples", type=int)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--var-batch", type=int, help="size of the fixed minibatch")
    p.add_argument("--replicates", type=int)
    p.add_argument("--iwae-s", type=int, nargs="+")
    p.add_argument("--unbiased-s", type=int, nargs="+")
    p.add_argument("--km", nargs="*", help="'k,m' pairs for the unbiased estimator at S")
    p.add_argument(
        "--sumo",
        type=int,
        nargs="*",
        metavar="J_MAX",
        help="SUMO rows, one per max_terms (library defaults otherwise); none: no SUMO rows",
    )
    p.add_argument(
        "--mlmc",
        nargs="*",
        metavar="EST,L_MAX",
        help="MLMC rows, 'estimator,max_level' pairs (estimator roulette or single_term), at "
        "n_0 = --mlmc-particles and rate --mlmc-rate; none: no MLMC rows",
    )
    p.add_argument("--mlmc-particles", type=int, default=5, help="n_0 of the MLMC rows")
    p.add_argument("--mlmc-rate", type=float, default=1.5, help="rate r of the MLMC rows")
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("VAEML_DATA_DIR"))
    p.add_argument(
        "--work",
        help="run directories of the brief training (default runs/variance, or "
        "runs/variance_seedN for --seed N != 0)",
    )
    p.add_argument("--json", default=None, help="default: <work>/variance.json")
    p.add_argument(
        "--plots",
        help="default benchmarks/plots (what RESULTS.md shows) for the seed-0 full run, else "
        "<work>/plots",
    )
    p.add_argument("--compilation-cache", default=str(REPO / ".jax_cache"))
    p.add_argument(
        "--encoder-only",
        action="store_true",
        help="part 1 only (training per encoder objective), e.g. for more seeds of part 4",
    )
    p.add_argument(
        "--encoder-summary",
        nargs="+",
        metavar="FILE",
        help="part 4 across seeds from finished runs' JSON files, one per seed (no computation)",
    )
    p.add_argument(
        "--variance-summary",
        nargs="+",
        metavar="FILE",
        help="part 2 across seeds from finished runs' JSON files, one per seed (no computation)",
    )
    p.add_argument(
        "--from-json",
        metavar="FILE",
        help="re-render the tables and plots of a finished run's JSON (no computation)",
    )
    a = p.parse_args(argv)
    for name, value in PRESETS["quick" if a.quick else "cpu"].items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    if a.replicates < 2:
        p.error("--replicates must be >= 2 (a covariance needs two replicates).")
    if "iwae" not in a.encoder_objectives:
        p.error("--encoder-objectives must include iwae (its run is the trained model).")
    if min(a.unbiased_s + [a.num_particles]) < 2 or min(a.iwae_s) < 1:
        p.error("unbiased S must be >= 2 and IWAE S >= 1.")
    for km in a.km:
        try:
            k, m = (int(v) for v in km.split(","))
        except ValueError:
            p.error(f"--km takes 'k,m' pairs like 0,2; got {km!r}.")
        if not 0 <= k <= m:
            p.error(f"--km needs 0 <= k <= m, got {km!r}.")
    if any(j < 1 for j in a.sumo):
        p.error("--sumo takes max_terms values >= 1.")
    for spec in a.mlmc:
        est, _, lmax = spec.partition(",")
        if est not in ("roulette", "single_term") or not lmax.isdigit() or int(lmax) < 1:
            p.error(f"--mlmc takes 'estimator,max_level' pairs like roulette,10; got {spec!r}.")
    # Other seeds and part-1-only runs must not overwrite the recorded run or its figures.
    if a.work is None:
        a.work = str(REPO / "runs" / ("variance" if a.seed == 0 else f"variance_seed{a.seed}"))
    if a.plots is None:
        recorded = a.seed == 0 and not a.encoder_only and not a.quick
        a.plots = str(HERE / "plots") if recorded else str(Path(a.work) / "plots")
    if a.json is None:
        a.json = str(Path(a.work) / "variance.json")
    return a


def rerender(a) -> dict:
    """Tables and plots from a finished run's JSON (``--from-json``), with today's code."""
    result = json.loads(Path(a.from_json).read_text())
    for name, value in result["settings"].items():
        if name not in ("plots", "from_json"):
            setattr(a, name, value)
    rows = []
    for r in result["variance"]:
        r = dict(r)
        if "meeting_times" in r:
            r["meeting_times"] = np.asarray(r["meeting_times"])
            r["tau"] = tau_stats(r["meeting_times"])
        rows.append(r)
    training = {
        obj: {"meeting_times": [np.asarray(t) for t in tr["meeting_times"]], "record": tr}
        for obj, tr in result["training"].items()
    }
    for tr in training.values():
        for p, t in zip(tr["record"]["per_epoch"], tr["meeting_times"], strict=True):
            p.update(tau_stats(t))
    written = plot_all(a, rows, training, Path(a.plots))
    print(markdown(a, rows, training))
    print(f"re-rendered {a.from_json} into {', '.join(written)}")
    return result


def variance_parts(a, training, log) -> list[dict]:
    """Parts 2-3 at the initialization and at the ``iwae``-objective model of part 1."""
    vae = training["iwae"]["vae"]
    ds = load_dataset(a.dataset, a.data_dir)
    x = binarize_static(np.asarray(ds.train[: a.var_batch], np.float32), seed=0)
    root = jax.random.key(a.seed)  # the initialization train() uses: fold_in(root, 0)
    init = vae.init(
        jax.random.fold_in(root, 0),
        data_mean=jnp.asarray(np.asarray(ds.train[: a.train_examples], np.float32).mean(0)),
    )
    states = {"init": init, f"trained ({a.epochs} ep)": training["iwae"]["params"]}
    log("part 2: gradient variance against cost")
    return variance_study(a, vae, states, x, log)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.from_json:
        return rerender(a)
    if a.variance_summary:
        results = [json.loads(Path(f).read_text()) for f in a.variance_summary]
        try:
            print(variance_summary(results))
        except ValueError as e:
            raise SystemExit(f"variance.py: {e}") from None
        return {"variance_summary": a.variance_summary}
    if a.encoder_summary:
        results = [json.loads(Path(f).read_text()) for f in a.encoder_summary]
        try:
            print(encoder_summary(results))
        except ValueError as e:
            raise SystemExit(f"variance.py: {e}") from None
        return {"encoder_summary": a.encoder_summary}
    if a.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    settings = {k: v for k, v in vars(a).items() if k not in ("data_dir", "compilation_cache")}
    log(f"variance: {json.dumps(settings)}")
    log("part 1: brief training per encoder objective")
    training = brief_training(a, log)
    rows = [] if a.encoder_only else variance_parts(a, training, log)
    written = plot_all(a, rows, training, Path(a.plots))
    md = markdown(a, rows, training)
    result = {
        "settings": settings,
        "machine": machine_info(),
        "seconds": time.perf_counter() - t_start,
        "variance": [
            {
                k: (v.tolist() if isinstance(v, np.ndarray) and k != "mean_grad" else v)
                for k, v in r.items()
                if k != "mean_grad"
            }
            for r in rows
        ],
        "training": {
            obj: {
                **tr["record"],
                "meeting_times": [t.ravel().tolist() for t in tr["meeting_times"]],
            }
            for obj, tr in training.items()
        },
        "plots": written,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result) + "\n")
    print("\n" + md)
    log(f"wrote {a.json} and {', '.join(written)} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
