r"""Reproduction study: five gradient estimators, one architecture, one evaluation.

Every model is the IWAE paper's one-stochastic-layer VAE (784-200-200-50, tanh, Bernoulli decoder;
``vaeml_jax.training.build_vae``) trained by the product itself
(``vaeml_jax.training.train``: Adam, the
same batch size, epochs, learning-rate schedule and seeds for every estimator) on dynamically
binarized data, with

* ``elbo``: the ELBO gradient averaged over S samples (the VAE);
* ``iwae``: the IWAE-S bound's gradient;
* ``mcmc``: the biased average of h over one CIS chain of T transitions (``make_mcmc_grad``);
* ``unbiased``: the coupled-chain estimator H_{0:0} (``make_unbiased_grad``, Ruiz et al. 2021);
* ``sumo``: SUMO (Luo et al. 2020) with ``min_terms = S`` (its base bound is IWAE-S) and its
  variance-minimising encoder objective;
* ``mlmc``: the multilevel Monte Carlo estimator (Shi & Cornish 2021, ``make_mlmc_grad``) with
  n_0 = S draws at level 0, the Russian-roulette form, rate 1.5 and levels up to 10;

all with the encoder objective ``vaeml_jax.training`` picks for them (``auto``). Two comparisons:

1. **same S and epochs**: the six rows above;
2. **compute-matched**: ``iwae_matched``, IWAE with S' = the number of ``log_joint`` evaluations
   per training example that the ``--match-to`` estimator (default ``unbiased``) actually executed
   in the same seed (``info["num_log_joint_evals"]`` summed over training, divided by the examples
   seen), trained for the same epochs: the same evaluation budget spent on more particles instead.
   Training wall-clock seconds are reported for every row as well.

Every final model is scored with the same estimator: the importance-sampling test log-likelihood
log (1/K) sum_k p(x, z_k)/q(z_k|x), K = ``--eval-samples`` (5000), on the first
``--eval-examples`` examples of the test set binarized once with seed 0
(``vaeml_jax.data.binarized_test_set``), with the same evaluation key for every model. Rows report
the mean over seeds and its standard error (std over seeds / sqrt(n), ddof = 1), and the
difference to IWAE-S paired by seed. The evaluation itself is checked: on the first
``--ais-examples`` test examples of each final model of the first ``--ais-seeds`` seeds, annealed
importance sampling (``method="ais"``) is compared with the K = 5000 IS estimate of the same
examples (both are stochastic lower bounds of log p(x); AIS - IS > 0 means IS is loose).

Settings (what each preset runs; flags override single values):

* default (CPU): 10,000 training examples, 3 epochs (300 Adam steps), batch 100, constant lr
  1e-3, S = 5, seeds 0 1 2, K = 5000 IS on the first 500 test examples, AIS (500 temperatures, 16
  chains) on 50 examples of seed 0. Measured on MNIST (RESULTS.md): 90 min on 2 cores shared with
  two other benchmark jobs (training 51 min, of which the unbiased estimator, SUMO and the
  compute-matched IWAE take 95%; IS 15 min; AIS 16 min); the least contended seed took 18 min, so
  expect about an hour per dataset on 2 idle cores. NOT the paper's scale: the models are far from
  converged (test LL about -130 against the published -85).
* ``--full`` (a GPU): the IWAE paper's schedule, 3,280 epochs in 8 stages with lr 1e-3 decaying to
  1e-4 (``schedule="iwae"``), batch 20, the full training set, K = 5000 on the full test set, AIS
  (1000 temperatures) on 100 examples. Never run here (no GPU was lent for it). A rough cost from
  ``estimator_cost.py``'s H100 timings (RESULTS.md; an estimate, not a measurement): 3,280 epochs
  of 3,000 steps is 9.8 million steps per run, about 2 hours for IWAE-5 at ~0.7 ms a step but of
  the order of a day for the unbiased estimator (~10 ms a step, set by the slowest lane of the
  batch), SUMO and the compute-matched IWAE; check the plan with ``--full --plan`` first, and run
  datasets, estimators or seeds as separate invocations (``--datasets``, ``--estimators``,
  ``--seeds``): runs resume from their checkpoints and finished runs are reused.
* ``--quick``: a smoke run (tiny network, 200 examples, one seed, K = 20) that exercises every
  code path in well under a minute of compute after compilation.
* ``--preset warm_start`` (CPU-sized): does a warm start make the unbiased
  estimator pay off? Per seed, IWAE-5 for ``--warm-epochs`` 30 epochs (3,000 steps at batch 100,
  lr 1e-3) on the first 10,000 MNIST images, trained ONCE (``<out>/mnist/warm_start/seedN``);
  then ``--continue-epochs`` 6 epochs (600 steps, lr 3e-4) of each of iwae S = 5 and 50,
  unbiased S = 5 and 10 (k = m = 0) and the compute-matched IWAE of each unbiased run (S' = its
  executed log_joint evaluations per example in the continuation). Every continuation starts from
  a copy of the warm start's last checkpoint (parameters and Adam state: bitwise the same state)
  under a config whose warm-start fields describe that warm start, so ``config.json`` is the
  truth and training it from scratch gives the same bits (tested). Seeds 0 1 2; the test LL is
  K = 5000 IS on the first 500 test images (not all 10,000: CPU-sized), AIS on 50 images of seed
  0; after every continuation epoch an in-training IS estimate (K = 500, 500 images) gives the
  curves ``<out>/mnist/plots/test_ll_vs_evals.png`` and ``test_ll_vs_seconds.png``. Not run here
  (expect hours on 2 cores: check ``--plan``). ``--preset warm_start --quick`` is its smoke test
  (200 images, a 16-unit network, 1 + 1 epochs, iwae5/unbiased5/matched; under a minute with a
  warm compilation cache).
* ``--preset long`` (a GPU): the same on all 60,000 MNIST images, 100 warm-start epochs + 100,
  K = 5000 on the whole test set, AIS (1,000 temperatures) on 100 images. ``--plan`` prints it.
* ``--preset long_cpu`` (2 CPU cores, about two hours per seed): all 60,000 MNIST images, IWAE-5
  for 20 epochs (12,000 steps, lr 1e-3), then 5 epochs (3,000 steps) at lr 3e-5 (the unbiased
  continuation's best measured step, ``optimizer_study.py``) of IWAE-5 and of the three unbiased
  estimators (coupled chains, MLMC and SUMO, each with S = n_0 = min_terms = 5), and the
  compute-matched IWAE of MLMC and of the coupled chains; K = 5000 on the whole test set, AIS
  (1,000 temperatures, 16 chains) on 100 images of seed 0, in-training IS (K = 500, 1,000
  images) after every continuation epoch.
  ``--continuations`` and ``--matched`` run a subset (finished runs are reused either way).

Outputs in ``--out`` (default ``runs/reproduce``): one run directory per (dataset, label, seed) as
written by ``vaeml_jax.training`` plus its ``result.json`` (a finished run is reused when the script
is re-run with the same settings), ``results.json`` (settings, machine, every run, the summaries)
and ``results.md`` (the tables). Datasets whose files are missing are skipped with a note.

    python benchmarks/reproduce.py --datasets mnist        # the CPU preset, as in RESULTS.md
    python benchmarks/reproduce.py --full --plan   # every run's resolved settings, nothing trained
    python benchmarks/reproduce.py --full          # on a GPU
    python benchmarks/reproduce.py --quick --out /tmp/rq
    python benchmarks/reproduce.py --preset warm_start --plan   # or --preset long --plan
    python benchmarks/reproduce.py --preset warm_start --quick --out /tmp/wq

Reference: Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016 (Table 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from vaeml_jax.data import DataError, binarized_test_set, load_dataset  # noqa: E402
from vaeml_jax.evaluation import evaluate  # noqa: E402
from vaeml_jax.training import (  # noqa: E402
    CHECKPOINT_DIR,
    METRICS_FILE,
    TrainConfig,
    build_vae,
    load_run,
    read_config,
    read_metrics,
    train,
)
from vaeml_jax.training.rundir import write_atomic, write_config  # noqa: E402

ESTIMATORS = ("elbo", "iwae", "mcmc", "unbiased", "sumo", "mlmc")
DATASETS = ("mnist", "fashion_mnist", "omniglot")
# Published test log-likelihoods (nats), one stochastic layer (the papers cited per row).
PUBLISHED = {
    "mnist": [
        ("VAE k=1 (IWAE paper, Table 1)", -86.76),
        ("IWAE k=5 (IWAE paper, Table 1)", -85.54),
        ("IWAE k=50 (IWAE paper, Table 1)", -84.78),
    ]
}
DATASET_NOTES = {
    "omniglot": "vaeml's omniglot28 split (box-resampled 105->28): NOT comparable to published "
    "Omniglot numbers (the IWAE paper's chardata.mat was not available).",
}

# The continuations of the warm-start presets: (label, estimator, S).
WARM_CONTINUATIONS = [
    ["iwae5", "iwae", 5],
    ["iwae50", "iwae", 50],
    ["unbiased5", "unbiased", 5],
    ["unbiased10", "unbiased", 10],
]
# Every continuation a warm-start preset can run (``--continuations`` picks among them).
KNOWN_CONTINUATIONS = {
    c[0]: c for c in [*WARM_CONTINUATIONS, ["mlmc5", "mlmc", 5], ["sumo5", "sumo", 5]]
}

PRESETS = {
    "cpu": dict(
        max_train_examples=10_000,
        epochs=3,
        batch_size=100,
        lr=1e-3,
        schedule="constant",
        seeds=[0, 1, 2],
        eval_examples=500,
        eval_samples=5000,
        ais_examples=50,
        ais_steps=500,
        ais_chains=16,
        ais_seeds=1,
        hidden=[200, 200],
        latent_dim=50,
        checkpoint_every=1,
    ),
    "full": dict(
        max_train_examples=None,
        epochs=None,  # 3,280 with schedule iwae
        batch_size=20,
        lr=1e-3,
        schedule="iwae",
        seeds=[0, 1, 2],
        eval_examples=None,  # the whole test set
        eval_samples=5000,
        ais_examples=100,
        ais_steps=1000,
        ais_chains=16,
        ais_seeds=1,
        hidden=[200, 200],
        latent_dim=50,
        checkpoint_every=10,  # a 3,280-epoch run must survive being killed
    ),
    "quick": dict(
        max_train_examples=200,
        epochs=1,
        batch_size=50,
        lr=1e-3,
        schedule="constant",
        seeds=[0],
        eval_examples=40,
        eval_samples=20,
        ais_examples=4,
        ais_steps=5,
        ais_chains=2,
        ais_seeds=1,
        hidden=[16],
        latent_dim=4,
        checkpoint_every=1,
    ),
    # A shared IWAE-5 warm start, then each estimator from the same state.
    "warm_start": dict(
        datasets=["mnist"],
        max_train_examples=10_000,
        warm_epochs=30,  # 3,000 IWAE-5 steps at batch 100
        warm_particles=5,
        warm_lr=1e-3,
        continue_epochs=6,  # 600 steps
        lr=3e-4,  # the continuation's
        batch_size=100,
        schedule="constant",
        seeds=[0, 1, 2],
        continuations=WARM_CONTINUATIONS,
        matched=["unbiased5", "unbiased10"],
        curve_examples=500,  # the in-training IS estimate after every continuation epoch
        curve_samples=500,
        eval_examples=500,  # CPU-sized: 500 of the 10,000 test images for K = 5000
        eval_samples=5000,
        ais_examples=50,
        ais_steps=500,
        ais_chains=16,
        ais_seeds=1,
        hidden=[200, 200],
        latent_dim=50,
        checkpoint_every=1,
    ),
    "warm_start_quick": dict(  # smoke: every code path of the warm_start preset, tiny
        datasets=["mnist"],
        max_train_examples=200,
        warm_epochs=1,
        warm_particles=5,
        warm_lr=1e-3,
        continue_epochs=1,
        lr=3e-4,
        batch_size=50,
        schedule="constant",
        seeds=[0],
        continuations=[["iwae5", "iwae", 5], ["unbiased5", "unbiased", 5]],
        matched=["unbiased5"],
        curve_examples=20,
        curve_samples=10,
        eval_examples=40,
        eval_samples=20,
        ais_examples=4,
        ais_steps=5,
        ais_chains=2,
        ais_seeds=1,
        hidden=[16],
        latent_dim=4,
        checkpoint_every=1,
    ),
    "long": dict(  # a GPU: all of MNIST, 100 + 100 epochs
        datasets=["mnist"],
        max_train_examples=None,
        warm_epochs=100,
        warm_particles=5,
        warm_lr=1e-3,
        continue_epochs=100,
        lr=3e-4,
        batch_size=100,
        schedule="constant",
        seeds=[0, 1, 2],
        continuations=WARM_CONTINUATIONS,
        matched=["unbiased5", "unbiased10"],
        curve_examples=1000,
        curve_samples=1000,
        eval_examples=None,  # the whole test set
        eval_samples=5000,
        ais_examples=100,
        ais_steps=1000,
        ais_chains=16,
        ais_seeds=1,
        hidden=[200, 200],
        latent_dim=50,
        checkpoint_every=5,
    ),
    "long_cpu": dict(  # the longer runs at the largest scale 2 CPU cores hold in a few hours
        datasets=["mnist"],
        max_train_examples=None,
        warm_epochs=20,  # 12,000 IWAE-5 steps
        warm_particles=5,
        warm_lr=1e-3,
        continue_epochs=5,  # 3,000 steps
        lr=3e-5,  # the best measured step for the unbiased continuation (optimizer study)
        batch_size=100,
        schedule="constant",
        seeds=[0, 1, 2],
        # the three unbiased estimators from the same state, each with its compute-matched IWAE
        continuations=[
            ["iwae5", "iwae", 5],
            ["mlmc5", "mlmc", 5],
            ["unbiased5", "unbiased", 5],
            ["sumo5", "sumo", 5],
        ],
        # not SUMO's: at ~175 evaluations per example its IWAE would double the preset's time
        matched=["mlmc5", "unbiased5"],
        curve_examples=1000,
        curve_samples=500,
        eval_examples=None,  # the whole test set
        eval_samples=5000,
        ais_examples=100,
        ais_steps=1000,
        ais_chains=16,
        ais_seeds=1,
        hidden=[200, 200],
        latent_dim=50,
        checkpoint_every=1,
    ),
}
WARM_PRESETS = ("warm_start", "long", "long_cpu")


def machine_info() -> dict:
    """CPU/device, versions, date and the command line (for RESULTS.md)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jaxlib

    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
    }


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (std with ddof = 1 over sqrt(n); nan for n < 2)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(np.mean(v)), se


def train_config(a, dataset: str, estimator: str, seed: int, num_particles: int) -> TrainConfig:
    """The TrainConfig of one run: identical for every estimator except the estimator fields."""
    extra = {}
    if estimator == "sumo":
        extra["min_terms"] = a.num_particles  # base bound IWAE-S: the "same S" for SUMO
    return TrainConfig(
        dataset=dataset,
        data_dir=a.data_dir,
        estimator=estimator,
        num_particles=num_particles,
        num_steps=a.mcmc_steps,
        max_iters=a.max_iters,
        hidden=tuple(a.hidden),
        latent_dim=a.latent_dim,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        schedule=a.schedule,
        seed=seed,
        max_train_examples=a.max_train_examples,
        checkpoint_every=a.checkpoint_every,
        keep_checkpoints=1,
        **extra,
    )


def _comparable(config: dict) -> dict:
    """The fields that define the experiment (not where data lives or how often it is saved)."""
    return {
        k: v
        for k, v in config.items()
        if k not in ("checkpoint_every", "keep_checkpoints", "data_dir", "eval_every")
    }


def train_and_score(a, cfg: TrainConfig, label: str, run_dir: Path, test_x, log) -> dict:
    """Train one model (or reuse a finished run directory) and score it with IS (and AIS)."""
    result_file = run_dir / "result.json"
    ais_wanted = cfg.seed in a.seeds[: a.ais_seeds] and a.ais_examples > 0
    wanted = _comparable(cfg.resolved().to_dict())
    if result_file.exists():
        res = json.loads(result_file.read_text())
        if _comparable(res.get("config", {})) == wanted:
            if "ais" in res or not ais_wanted:
                log(f"  {label} seed {cfg.seed}: reusing {result_file}")
                return res
            # A finished run asked for AIS later (--ais-seeds): add it, keep the rest as it is.
            _, vae, params, _ = load_run(run_dir)
            res["ais"] = _ais_check(a, vae, params, test_x, res["per_example_ll"])
            result_file.write_text(json.dumps(res, indent=1) + "\n")
            log(f"  {label} seed {cfg.seed}: AIS-IS gap {res['ais']['gap_mean']:+.3f} added")
            return res
    stored = read_config(run_dir)  # None when there is no run
    resume = stored is not None and _comparable(stored.to_dict()) == wanted
    if run_dir.exists() and not resume:  # another experiment's run in the way: start over
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()  # an interrupted run of this experiment continues from a checkpoint
    out = train(cfg, run_dir, resume=resume, progress=False, log=lambda m: log("    " + m))
    total_seconds = time.perf_counter() - t0
    records = read_metrics(run_dir)
    vae = build_vae(cfg.resolved())
    params = out["params"]
    examples = sum(r["examples"] for r in records)
    evals = sum(r["num_log_joint_evals"] for r in records)
    main = [r for r in records if r.get("phase", "main") == "main"]  # after any warm start
    main_examples = sum(r["examples"] for r in main)
    last = records[-1]
    key = jax.random.key(a.eval_seed)  # the same evaluation key for every model
    ev = evaluate(
        vae.model,
        params,
        test_x,
        key,
        method="is",
        num_samples=a.eval_samples,
        chunk_size=min(500, a.eval_samples),
        batch_size=100,
    )
    res = {
        "label": label,
        "dataset": cfg.dataset,
        "estimator": cfg.estimator,
        "seed": cfg.seed,
        "num_particles": cfg.num_particles,
        "config": cfg.resolved().to_dict(),
        "epochs": len(records),
        "train_examples_seen": int(examples),
        "train_log_joint_evals": int(evals),
        "evals_per_example": evals / examples,
        "main_evals_per_example": sum(r["num_log_joint_evals"] for r in main) / main_examples,
        "main_seconds": float(sum(r["wall_time"] for r in main)),
        "curve": test_ll_curve(records),
        "train_seconds": float(sum(r["wall_time"] for r in records)),
        "compile_seconds": float(records[0].get("compile_seconds", float("nan"))),
        "run_seconds": total_seconds,
        "final_objective": last["objective"],
        "meeting_time_mean_last_epoch": last["meeting_time_mean"],
        "meeting_time_max_last_epoch": last["meeting_time_max"],
        # null for epochs without coupled chains (IWAE, a warm start): no lane capped there
        "capped_fraction_per_epoch": [r["capped_fraction"] or 0.0 for r in records],
        "test_ll": ev["test_log_likelihood"],
        "test_ll_stderr_examples": ev["test_log_likelihood_stderr"],
        "test_elbo": ev["test_elbo"],
        "eval_num_samples": ev["num_samples"],
        "eval_examples": ev["num_examples"],
        "eval_seconds": ev["seconds"],
        "per_example_ll": [round(float(v), 4) for v in ev["per_example"]],
    }
    if ais_wanted:
        res["ais"] = _ais_check(a, vae, params, test_x, ev["per_example"])
    result_file.write_text(json.dumps(res, indent=1) + "\n")
    log(
        f"  {label} seed {cfg.seed}: test LL {res['test_ll']:.2f} (K={a.eval_samples}, "
        f"{res['eval_examples']} ex), {res['evals_per_example']:.1f} evals/example, "
        f"train {res['train_seconds']:.0f}s"
        + (f", AIS-IS gap {res['ais']['gap_mean']:+.3f}" if "ais" in res else "")
    )
    return res


def _ais_check(a, vae, params, test_x, is_per_example) -> dict:
    """AIS on the first ``--ais-examples`` test examples (the evaluation key of every model) and
    its gap to the same examples' IS estimates ``is_per_example``."""
    n = min(a.ais_examples, test_x.shape[0])
    ais = evaluate(
        vae.model,
        params,
        test_x[:n],
        jax.random.key(a.eval_seed),
        method="ais",
        batch_size=min(100, n),
        num_steps=a.ais_steps,
        num_chains=a.ais_chains,
    )
    is_n = np.asarray(is_per_example, np.float64)[:n]
    gap = np.asarray(ais["per_example"], np.float64) - is_n
    return {
        "examples": n,
        "num_steps": a.ais_steps,
        "num_chains": a.ais_chains,
        "ais_ll": ais["test_log_likelihood"],
        "is_ll_same_examples": float(np.mean(is_n)),
        "gap_mean": float(np.mean(gap)),
        "gap_stderr": float(np.std(gap, ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "gap_max": float(np.max(gap)),
        "seconds": ais["seconds"],
    }


def test_ll_curve(records: list[dict]) -> list[dict]:
    """The in-training test LL (``--eval-every``) of the main phase against its cumulative
    log_joint evaluations and seconds; the last warm-start evaluation is the origin (0, 0)."""
    points, evals, seconds = [], 0, 0.0
    for r in records:
        if r.get("phase", "main") == "main":
            evals += r["num_log_joint_evals"]
            seconds += r["wall_time"]
        elif "test_log_likelihood" in r:
            points = []  # only the evaluation at the end of the warm start is kept
        if "test_log_likelihood" in r:
            points.append(
                {"epoch": r["epoch"], "evals": evals, "seconds": seconds,
                 "test_ll": r["test_log_likelihood"]}
            )  # fmt: skip
    return points


def summarize(runs: list[dict], reference: str = "iwae") -> list[dict]:
    """One row per label: mean/SE over seeds, and the seed-paired difference to ``reference``."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    ref = {r["seed"]: r["test_ll"] for r in runs if r["label"] == reference}
    rows = []
    for label in labels:
        rs = sorted((r for r in runs if r["label"] == label), key=lambda r: r["seed"])
        ll_m, ll_se = mean_se([r["test_ll"] for r in rs])
        el_m, el_se = mean_se([r["test_elbo"] for r in rs])
        diffs = [r["test_ll"] - ref[r["seed"]] for r in rs if r["seed"] in ref]
        d_m, d_se = mean_se(diffs) if label != reference else (0.0, 0.0)
        ais = [r["ais"] for r in rs if "ais" in r]
        rows.append(
            {
                "label": label,
                "estimator": rs[0]["estimator"],
                "num_particles": [r["num_particles"] for r in rs],
                "seeds": [r["seed"] for r in rs],
                "test_ll": ll_m,
                "test_ll_se": ll_se,
                "test_ll_per_seed": [r["test_ll"] for r in rs],
                "diff_vs_ref": d_m,
                "diff_vs_ref_se": d_se,
                "test_elbo": el_m,
                "test_elbo_se": el_se,
                "evals_per_example": float(np.mean([r["evals_per_example"] for r in rs])),
                "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
                "final_objective": float(np.mean([r["final_objective"] for r in rs])),
                "capped_fraction": float(
                    np.mean([np.mean(r["capped_fraction_per_epoch"]) for r in rs])
                ),
                "ais_gap": [(x["gap_mean"], x["gap_stderr"]) for x in ais],
            }
        )
    return rows


def _f(v: float, d: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{d}f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = []
    for ds, block in results["datasets"].items():
        lines += [f"### {ds}", ""]
        if "skipped" in block:
            lines += [f"Skipped: {block['skipped']}", ""]
            continue
        if ds in DATASET_NOTES:
            lines += [DATASET_NOTES[ds], ""]
        lines += [
            f"{block['train_examples']} training examples (dynamic binarization), "
            f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']:g} ({s['schedule']}), "
            f"S = {s['num_particles']}, seeds {s['seeds']}; test LL = IS with "
            f"K = {s['eval_samples']} on {block['eval_examples']} test examples (binarized once, "
            "seed 0), nats, higher is better; mean +- SE over seeds; diff = paired by seed vs "
            "IWAE-S.",
            "",
            "| estimator | S | test LL | diff vs IWAE-S | test ELBO (10 samples) | "
            "log_joint evals / train example | train s (per seed) | final train objective | "
            "capped lanes | AIS - IS (seed 0) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in block["summary"]:
            ss = sorted(set(r["num_particles"]))
            s_txt = "/".join(str(v) for v in ss)
            gap = "; ".join(f"{g:+.3f} +- {e:.3f}" for g, e in r["ais_gap"]) if r["ais_gap"] else ""
            lines.append(
                f"| {r['label']} | {s_txt} | {_f(r['test_ll'])} +- {_f(r['test_ll_se'])} | "
                f"{_f(r['diff_vs_ref'])} +- {_f(r['diff_vs_ref_se'])} | "
                f"{_f(r['test_elbo'])} +- {_f(r['test_elbo_se'])} | "
                f"{r['evals_per_example']:.1f} | {r['train_seconds']:.0f} | "
                f"{_f(r['final_objective'])} | {r['capped_fraction']:.2e} | {gap} |"
            )
        lines.append("")
        lines += ["Per seed (test LL):", ""]
        lines += ["| estimator | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |"]
        lines += ["| --- |" + " --- |" * len(s["seeds"])]
        for r in block["summary"]:
            per = dict(zip(r["seeds"], r["test_ll_per_seed"], strict=True))
            lines.append(
                f"| {r['label']} | "
                + " | ".join(_f(per.get(x, float("nan"))) for x in s["seeds"])
                + " |"
            )
        lines.append("")
        if ds in PUBLISHED:
            lines += [
                "Published (full training set, 3,280 epochs, K = 5000 on all 10,000 test "
                "examples; for scale only, not the same experiment):",
                "",
                "| model | test LL |",
                "| --- | --- |",
            ]
            lines += [f"| {name} | {v:.2f} |" for name, v in PUBLISHED[ds]]
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The warm-start presets
# ------------------------------------------------------------------------------------------------
def warm_config(a, dataset: str, seed: int) -> TrainConfig:
    """The shared warm start of a seed: IWAE-S_w for ``warm_epochs`` epochs, evaluated at its end
    (the origin of every continuation's curve)."""
    return TrainConfig(
        dataset=dataset,
        data_dir=a.data_dir,
        estimator="iwae",
        num_particles=a.warm_particles,
        hidden=tuple(a.hidden),
        latent_dim=a.latent_dim,
        epochs=a.warm_epochs,
        batch_size=a.batch_size,
        lr=a.warm_lr,
        schedule=a.schedule,
        seed=seed,
        max_train_examples=a.max_train_examples,
        checkpoint_every=a.checkpoint_every,
        keep_checkpoints=1,
        eval_every=a.warm_epochs,
        eval_num_samples=a.curve_samples,
        eval_max_examples=a.curve_examples,
    )


def continuation_config(a, dataset: str, estimator: str, seed: int, num_particles: int):
    """A continuation: the warm start's config as its warm-start phase (so config.json says what
    the run is, and a from-scratch run of it would retrace the shared warm start bit for bit),
    then ``continue_epochs`` epochs of ``estimator`` at ``lr``, evaluated after every epoch."""
    w = warm_config(a, dataset, seed)
    extra = {"min_terms": num_particles} if estimator == "sumo" else {}  # base bound IWAE-S
    return dataclasses.replace(
        w,
        **extra,
        estimator=estimator,
        num_particles=num_particles,
        max_iters=a.max_iters,
        epochs=a.warm_epochs + a.continue_epochs,
        lr=a.lr,
        eval_every=1,
        warm_start_epochs=a.warm_epochs,
        warm_start_estimator="iwae",
        warm_start_num_particles=a.warm_particles,
        warm_start_lr=a.warm_lr,
    )


def fork_from_warm(warm_dir: Path, run_dir: Path, cfg: TrainConfig, warm_epochs: int) -> None:
    """Start ``run_dir`` from the warm start's last checkpoint (parameters AND Adam state): its
    checkpoint and records are copied (records relabelled as the warm-start phase) under the
    continuation's config, so ``train(resume=True)`` goes on from bitwise the same state for every
    continuation. A run directory already holding this continuation is left to resume."""
    stored = read_config(run_dir)
    if stored is not None and _comparable(stored.to_dict()) == _comparable(
        cfg.resolved().to_dict()
    ):
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True)
    shutil.copytree(
        warm_dir / CHECKPOINT_DIR / str(warm_epochs), run_dir / CHECKPOINT_DIR / str(warm_epochs)
    )
    records = [
        {**r, "phase": "warm_start"} for r in read_metrics(warm_dir) if r["epoch"] <= warm_epochs
    ]
    write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))
    write_config(run_dir, cfg.resolved())


def warm_start_seed(a, ds: str, seed: int, test_x, out: Path, log) -> list[dict]:
    """One seed: the shared warm start, each continuation forked from it, then the
    compute-matched IWAE of each ``matched`` continuation (S' = its executed log_joint
    evaluations per training example in the continuation)."""
    warm_dir = out / ds / "warm_start" / f"seed{seed}"
    runs = [train_and_score(a, warm_config(a, ds, seed), "warm_start", warm_dir, test_x, log)]

    def cont(label, estimator, num):
        cfg = continuation_config(a, ds, estimator, seed, num)
        run_dir = out / ds / label / f"seed{seed}"
        fork_from_warm(warm_dir, run_dir, cfg, a.warm_epochs)
        runs.append(train_and_score(a, cfg, label, run_dir, test_x, log))
        return runs[-1]

    by_label = {label: cont(label, est, num) for label, est, num in a.continuations}
    for src in a.matched:
        cont(f"iwae_matched_{src}", "iwae", max(2, round(by_label[src]["main_evals_per_example"])))
    return runs


def warm_start_block(a, ds: str, n_train: int, test_x, out: Path, log) -> dict:
    runs = [r for seed in a.seeds for r in warm_start_seed(a, ds, seed, test_x, out, log)]
    summary = summarize(runs, reference=a.continuations[0][0])
    main = {
        lab: [r for r in runs if r["label"] == lab]
        for lab in dict.fromkeys(x["label"] for x in runs)
    }
    for row in summary:
        rs = main[row["label"]]
        row["main_evals_per_example"] = float(np.mean([r["main_evals_per_example"] for r in rs]))
        row["main_seconds"] = float(np.mean([r["main_seconds"] for r in rs]))
    plots = plot_warm_start(runs, out / ds / "plots")
    return {
        "train_examples": int(n_train),
        "eval_examples": int(test_x.shape[0]),
        "runs": [{k: v for k, v in r.items() if k != "per_example_ll"} for r in runs],
        "summary": summary,
        "plots": [str(p) for p in plots],
    }


def plot_warm_start(runs: list[dict], plot_dir: Path) -> list[Path]:
    """Test LL (in-training IS, mean over seeds) against the continuation's log_joint evaluations
    and against its seconds, one line per continuation, from the shared warm-start point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = [lab for lab in dict.fromkeys(r["label"] for r in runs) if lab != "warm_start"]
    written = []
    for xkey, xlabel, name in (
        ("evals", "log_joint evaluations in the continuation", "test_ll_vs_evals.png"),
        ("seconds", "training seconds in the continuation", "test_ll_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab in labels:
            curves = [r["curve"] for r in runs if r["label"] == lab and r["curve"]]
            n = min(len(c) for c in curves) if curves else 0
            if n == 0:
                continue
            x = np.mean([[p[xkey] for p in c[:n]] for c in curves], axis=0)
            y = np.mean([[p["test_ll"] for p in c[:n]] for c in curves], axis=0)
            ax.plot(x, y, marker="o", label=lab)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test log-likelihood (IS, nats)")
        ax.set_title("after a shared IWAE warm start (mean over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=100)
        plt.close(fig)
        written.append(plot_dir / name)
    return written


def warm_markdown(results: dict) -> str:
    """The warm-start presets' table: final K-sample IS test LL per continuation."""
    s = results["settings"]
    lines = []
    for ds, block in results["datasets"].items():
        lines += [f"### {ds}: warm start", ""]
        if "skipped" in block:
            lines += [f"Skipped: {block['skipped']}", ""]
            continue
        lines += [
            f"{block['train_examples']} training examples; IWAE-{s['warm_particles']} for "
            f"{s['warm_epochs']} epochs (lr {s['warm_lr']:g}), shared, then {s['continue_epochs']} "
            f"epochs (lr {s['lr']:g}) from the same parameters and Adam state; seeds {s['seeds']}; "
            f"test LL = IS with K = {s['eval_samples']} on {block['eval_examples']} test "
            f"examples; diff = paired by seed vs {s['continuations'][0][0]}.",
            "",
            "| run | S | test LL | diff | log_joint evals / example (continuation) | "
            "continuation s | capped lanes | AIS - IS (seed 0) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in block["summary"]:
            s_txt = "/".join(str(v) for v in sorted(set(r["num_particles"])))
            gap = "; ".join(f"{g:+.3f} +- {e:.3f}" for g, e in r["ais_gap"]) if r["ais_gap"] else ""
            lines.append(
                f"| {r['label']} | {s_txt} | {_f(r['test_ll'])} +- {_f(r['test_ll_se'])} | "
                f"{_f(r['diff_vs_ref'])} +- {_f(r['diff_vs_ref_se'])} | "
                f"{r['main_evals_per_example']:.1f} | {r['main_seconds']:.0f} | "
                f"{r['capped_fraction']:.2e} | {gap} |"
            )
        lines += ["", "Plots: " + ", ".join(block["plots"]), ""]
    return "\n".join(lines)


def warm_plan(a) -> list[dict]:
    """The warm-start presets' runs, resolved as ``train`` will run them."""
    rows = []
    for ds in a.datasets:
        for seed in a.seeds:
            w = warm_config(a, ds, seed).resolved()
            items = [("warm_start", w, w.num_particles)]
            for label, est, num in a.continuations:
                items.append((label, continuation_config(a, ds, est, seed, num).resolved(), num))
            for src in a.matched:
                c = continuation_config(a, ds, "iwae", seed, 2).resolved()
                items.append((f"iwae_matched_{src}", c, f"= {src}'s evals/example"))
            for label, cfg, num in items:
                rows.append(
                    {
                        "dataset": ds,
                        "label": label,
                        "seed": seed,
                        "S": num,
                        "warm_start_epochs": cfg.warm_start_epochs,
                        "epochs": cfg.epochs,
                        "lr": cfg.lr,
                        "batch_size": cfg.batch_size,
                        "max_train_examples": cfg.max_train_examples,
                        "checkpoint_every": cfg.checkpoint_every,
                        "eval_examples": a.eval_examples,
                        "eval_samples": a.eval_samples,
                    }
                )
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="the IWAE paper's schedule (a GPU)")
    g.add_argument("--quick", action="store_true", help="smoke run: tiny model, one seed")
    p.add_argument(
        "--preset",
        choices=["cpu", "full", *WARM_PRESETS],
        help="cpu (default), full (= --full), warm_start (a shared IWAE warm start, then each "
        "estimator from it; with --quick its smoke version), long (warm_start on all of MNIST "
        "for a GPU) or long_cpu (all of MNIST at CPU scale)",
    )
    p.add_argument("--warm-epochs", type=int, help="warm-start presets: IWAE epochs (shared)")
    p.add_argument("--continue-epochs", type=int, help="warm-start presets: epochs after it")
    p.add_argument(
        "--continuations",
        nargs="+",
        choices=list(KNOWN_CONTINUATIONS),
        help="warm-start presets: the continuations to run (default per preset)",
    )
    p.add_argument(
        "--matched",
        nargs="*",
        help="warm-start presets: continuations that get a compute-matched IWAE (default per "
        "preset; none with an empty list)",
    )
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--num-particles", type=int, default=5, help="S (default 5)")
    p.add_argument("--mcmc-steps", type=int, default=5, help="T for the mcmc estimator")
    p.add_argument("--max-iters", type=int, default=1000, help="cap of the unbiased estimator")
    p.add_argument(
        "--match-to",
        default="unbiased",
        help="estimator whose evaluation count the iwae_matched row gets ('none': "
        "no compute-matched row)",
    )
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-train-examples", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=["constant", "iwae"])
    p.add_argument("--eval-examples", type=int, help="first N test examples (default per preset)")
    p.add_argument("--eval-samples", type=int, help="K of the IS test log-likelihood")
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--ais-examples", type=int)
    p.add_argument("--ais-steps", type=int)
    p.add_argument("--ais-chains", type=int)
    p.add_argument("--ais-seeds", type=int, help="AIS check on the first N seeds' models")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="epochs between checkpoints (an interrupted run resumes from the last one)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print every run's resolved training settings and exit (nothing is trained)",
    )
    p.add_argument("--data-dir", default=os.environ.get("VAEML_DATA_DIR"))
    p.add_argument("--out", default=str(REPO / "runs" / "reproduce"))
    p.add_argument(
        "--compilation-cache",
        default=str(REPO / ".jax_cache"),
        help="persistent XLA cache ('' to disable)",
    )
    a = p.parse_args(argv)
    a.preset = _preset_name(p, a)
    if a.continuations is not None:
        a.continuations = [KNOWN_CONTINUATIONS[c] for c in a.continuations]
    for name, value in PRESETS[a.preset].items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    if a.datasets is None:
        a.datasets = list(DATASETS)
    a.warm = a.preset in (*WARM_PRESETS, "warm_start_quick")
    if a.warm:
        if a.warm_epochs < 1 or a.continue_epochs < 1:
            p.error("--warm-epochs and --continue-epochs must be >= 1.")
        a.epochs = a.warm_epochs + a.continue_epochs
        labels = [c[0] for c in a.continuations]
        if labels[0] != "iwae5" and "iwae5" in labels:
            a.continuations.sort(key=lambda c: c[0] != "iwae5")  # the paired reference first
        missing = [m for m in a.matched if m not in labels]
        if missing:
            p.error(f"--matched {missing} are not among the continuations {labels}.")
    if a.num_particles < 2:
        p.error("--num-particles must be >= 2 (the CIS-based estimators need two particles).")
    if a.match_to != "none" and a.match_to not in a.estimators:
        p.error(f"--match-to {a.match_to} is not among --estimators {a.estimators}.")
    if "iwae" not in a.estimators:
        p.error("--estimators must include iwae (the reference of the paired differences).")
    return a


def _preset_name(p, a) -> str:
    """The PRESETS entry the flags ask for (``--quick`` with a warm-start preset is its smoke)."""
    if a.preset in WARM_PRESETS:
        if a.full:
            p.error(f"--full and --preset {a.preset} are different experiments; choose one.")
        return "warm_start_quick" if a.quick else a.preset
    if a.preset is not None and (a.full or a.quick):
        p.error(f"--preset {a.preset} with --full/--quick: choose one.")
    return a.preset or ("full" if a.full else "quick" if a.quick else "cpu")


def plan(a) -> list[dict]:
    """Every run the settings ask for, resolved as ``train`` will run it (no data is loaded)."""
    rows = []
    for ds in a.datasets:
        for seed in a.seeds:
            labels = list(a.estimators) + ([] if a.match_to == "none" else ["iwae_matched"])
            for label in labels:
                est = "iwae" if label == "iwae_matched" else label
                cfg = train_config(a, ds, est, seed, a.num_particles).resolved()
                rows.append(
                    {
                        "dataset": ds,
                        "label": label,
                        "seed": seed,
                        "S": f"= {a.match_to}'s evals/example"
                        if label == "iwae_matched"
                        else cfg.num_particles,
                        "epochs": cfg.epochs,
                        "schedule": cfg.schedule,
                        "lr": cfg.lr,
                        "batch_size": cfg.batch_size,
                        "max_train_examples": cfg.max_train_examples,
                        "checkpoint_every": cfg.checkpoint_every,
                        "eval_examples": a.eval_examples,
                        "eval_samples": a.eval_samples,
                    }
                )
    return rows


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.plan:
        rows = warm_plan(a) if a.warm else plan(a)
        cols = list(rows[0])
        print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
        for r in rows:
            print("| " + " | ".join("all" if r[c] is None else str(r[c]) for c in cols) + " |")
        return {"plan": rows}
    if a.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    settings = {
        k: v for k, v in vars(a).items() if k not in ("out", "data_dir", "compilation_cache")
    }
    results = {"settings": settings, "machine": machine_info(), "datasets": {}}
    log(f"reproduce: {json.dumps(settings)}")
    for ds in a.datasets:
        try:
            dataset = load_dataset(ds, a.data_dir)
        except DataError as e:
            log(f"{ds}: skipped ({e})")
            results["datasets"][ds] = {"skipped": str(e).splitlines()[0]}
            continue
        test_x = np.asarray(binarized_test_set(dataset, seed=0), np.float32)
        if a.eval_examples is not None:
            test_x = test_x[: a.eval_examples]
        n_train = dataset.train.shape[0]
        if a.max_train_examples is not None:
            n_train = min(n_train, a.max_train_examples)
        log(f"{ds}: {n_train} training examples, {test_x.shape[0]} test examples")
        if a.warm:
            results["datasets"][ds] = warm_start_block(a, ds, n_train, test_x, out, log)
            continue
        runs = []
        for seed in a.seeds:
            for est in a.estimators:
                cfg = train_config(a, ds, est, seed, a.num_particles)
                runs.append(
                    train_and_score(a, cfg, est, out / ds / est / f"seed{seed}", test_x, log)
                )
            if a.match_to != "none":
                src = next(r for r in runs if r["label"] == a.match_to and r["seed"] == seed)
                s_matched = max(2, int(round(src["evals_per_example"])))
                cfg = train_config(a, ds, "iwae", seed, s_matched)
                runs.append(
                    train_and_score(
                        a,
                        cfg,
                        "iwae_matched",
                        out / ds / "iwae_matched" / f"seed{seed}",
                        test_x,
                        log,
                    )
                )
        results["datasets"][ds] = {
            "train_examples": int(n_train),
            "eval_examples": int(test_x.shape[0]),
            "runs": [{k: v for k, v in r.items() if k != "per_example_ll"} for r in runs],
            "summary": summarize(runs),
            "published": PUBLISHED.get(ds, []),
        }
    md = warm_markdown(results) if a.warm else markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(md + "\n")
    print("\n" + md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


if __name__ == "__main__":
    main()
