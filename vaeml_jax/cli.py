"""The ``vaeml`` command line: ``vaeml train``, ``vaeml evaluate DIR``, ``vaeml plot DIR``, and
``vaeml launch -n N -- COMMAND ...`` (N local processes of one multi-process run).

Every error a user can cause (an unknown dataset or estimator, a missing or corrupt data file, an
output directory holding another run, data the model cannot take, k > m, a diverging run, an
unreadable checkpoint) ends with one line ``vaeml: error: ...`` on stderr and exit status 1 (2 for
command-line syntax errors), never a traceback. Set ``VAEML_DEBUG=1`` to get the traceback.

Config precedence for ``vaeml train``: built-in defaults < the stored ``config.json`` (with
``--resume``) < ``--config FILE`` (JSON) < flags given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser", "use_compilation_cache"]

EVAL_FILE = "eval.json"


class CLIError(Exception):
    """A user-facing error (printed as one line, exit status 1)."""


# ------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _slots(s: str):
    if s.lower() in ("auto", "none"):
        return s.lower() if s.lower() == "auto" else None
    v = _positive_int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("expected a positive integer, auto or none")
    return v


def build_parser() -> argparse.ArgumentParser:
    from vaeml_jax import __version__
    from vaeml_jax.data import DATASETS
    from vaeml_jax.training.config import (
        BINARIZATIONS,
        ENCODER_OBJECTIVE_CHOICES,
        ENCODERS,
        LIKELIHOODS,
        MLMC_ESTIMATORS,
        SCHEDULES,
        WARM_START_ESTIMATORS,
        available_estimators,
    )

    p = argparse.ArgumentParser(
        prog="vaeml",
        description="Fit VAEs by maximum likelihood with unbiased gradients from coupled CIS "
        "chains (Ruiz et al., UAI 2021), or with the ELBO / IWAE / MCMC baselines.",
    )
    p.add_argument("--version", action="version", version=f"vaeml-jax {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,evaluate,plot,launch}")
    sub.required = True

    S = argparse.SUPPRESS  # train flags: absent unless given, so config files can fill them
    t = sub.add_parser(
        "train",
        help="train a VAE (defaults: the paper-sized model on MNIST, unbiased estimator)",
        description="Train a VAE; writes config.json, metrics.jsonl, meeting_times.npy and "
        "checkpoints/ into --out. Flags override --config, which overrides the stored config "
        "(with --resume), which overrides the defaults.",
        argument_default=S,
    )
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="run directory (runs/DATASET-ESTIMATOR-sSEED)")
    g.add_argument("--config", metavar="FILE", help="JSON file of options (keys as the flags)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out up to --epochs epochs in total (from its last checkpoint)",
    )
    g.add_argument("--seed", type=_positive_int, help="random seed (default 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = t.add_argument_group("data")
    g.add_argument(
        "--dataset",
        type=lambda s: s.replace("-", "_"),
        choices=DATASETS,
        help="default mnist (shipped with the package); the others are read from --data-dir",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="data folder (default $VAEML_DATA_DIR, then the packaged MNIST, then tfds)",
    )
    g.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        help="auto (default): dynamic for a Bernoulli decoder (redrawn every epoch), none "
        "(intensities) for a Gaussian one; static: binarized once",
    )
    g.add_argument(
        "--max-train-examples",
        type=_positive_int,
        metavar="N",
        help="use only the first N training examples (quick runs)",
    )
    g = t.add_argument_group("model")
    g.add_argument("--hidden", help="hidden layer widths, e.g. 200,200 (default)")
    g.add_argument("--latent-dim", type=_positive_int, help="latent dimension (default 50)")
    g.add_argument(
        "--two-layer",
        action=argparse.BooleanOptionalAction,
        help="two stochastic layers (default: one)",
    )
    g.add_argument("--likelihood", choices=LIKELIHOODS, help="decoder (default bernoulli)")
    g.add_argument(
        "--encoder",
        choices=ENCODERS,
        help="proposal q(z|x): diagonal Gaussian (default), full covariance, or inverse "
        "autoregressive flow",
    )
    g.add_argument("--iaf-layers", type=_positive_int, help="iaf: flow steps (default 2)")
    g.add_argument("--iaf-hidden", help="iaf: MADE hidden widths (default 100,100)")
    g = t.add_argument_group("estimator (every estimator)")
    g.add_argument(
        "--estimator",
        choices=available_estimators(),
        help="default unbiased (coupled CIS chains); mlmc (multilevel Monte Carlo, unbiased); "
        "elbo, iwae, mcmc (biased CIS average) and sumo are the baselines",
    )
    g.add_argument(
        "--num-particles", "-S", type=_positive_int, metavar="S", help="particles S (default 10)"
    )
    g.add_argument(
        "--encoder-objective",
        choices=ENCODER_OBJECTIVE_CHOICES,
        help="what trains q: auto (default: elbo for --estimator elbo, sumo_variance for sumo, "
        "else iwae); iwae_dreg is the doubly reparameterised IWAE gradient",
    )
    g.add_argument(
        "--encoder-particles",
        type=_positive_int,
        metavar="K",
        help="draws of the encoder objective's own (default: reuse the estimator's S draws)",
    )
    g = t.add_argument_group("unbiased estimator (--estimator unbiased)")
    g.add_argument("--k", type=_positive_int, help="H_{k:m} window start k (default 0)")
    g.add_argument("--m", type=_positive_int, help="H_{k:m} window end m >= k (default 0)")
    g.add_argument("--num-chains", type=_positive_int, help="coupled pairs per example (default 1)")
    g.add_argument(
        "--max-iters",
        type=_positive_int,
        help="coupled iterations before a pair is stopped unmet, its gradient then biased "
        "(default 1000)",
    )
    g.add_argument(
        "--num-slots",
        type=_slots,
        metavar="P|auto|none",
        help="work-queue slots; auto (default): B*C/4 on CPU, none (all lanes advance together "
        "until the slowest meets) on accelerators; same estimate either way",
    )
    g.add_argument(
        "--rejuvenation",
        metavar="STEPS,SIZE,MEET",
        help="move the kept particles between CIS steps by STEPS MALA steps of SIZE and a "
        "reflection-maximal random walk of scale MEET (units of q's std), e.g. 3,0.5,0.3; plain "
        "loop only; measured to slow meeting on MNIST",
    )
    g = t.add_argument_group("mcmc estimator (--estimator mcmc)")
    g.add_argument("--num-steps", type=_positive_int, help="CIS steps after X_0 (default 5)")
    g.add_argument("--burn-in", type=_positive_int, help="steps not averaged (default 0)")
    g = t.add_argument_group("sumo estimator (--estimator sumo)")
    g.add_argument("--min-terms", type=_positive_int, help="minimum terms m (default 1)")
    g.add_argument("--max-terms", type=_positive_int, help="cap on terms J (default 128)")
    g = t.add_argument_group("mlmc estimator (--estimator mlmc)")
    g.add_argument(
        "--max-level",
        type=_positive_int,
        help="cap on the level L: n_0 2^L draws at most, the bias of IWAE with n_0 "
        "2^max_level draws (default 10)",
    )
    g.add_argument(
        "--level-rate",
        type=float,
        metavar="R",
        help="P(L = l) proportional to 2^(-R l); 1 < R < 2 (default 1.5)",
    )
    g.add_argument(
        "--mlmc-estimator",
        choices=MLMC_ESTIMATORS,
        help="roulette (default: every level up to L) or single_term (level L only)",
    )
    g = t.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=_positive_int,
        help="total epochs, a warm start's included (default 100; 3280 with --schedule iwae)",
    )
    g.add_argument("--batch-size", type=_positive_int, help="minibatch size (default 100)")
    g.add_argument(
        "--lr",
        type=float,
        help="Adam learning rate (default 1e-3; 3e-5 after the unbiased estimator's warm start)",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="constant (default) or iwae (8 stages of 3^(i-1) epochs, lr*10^(-(i-1)/7))",
    )
    g = t.add_argument_group(
        "warm start",
        "By default the unbiased and mlmc estimators train their first 4/5 of the epochs with "
        "IWAE-5 at --lr (1e-3), then go on at lr 3e-5 from the same parameters and Adam state. "
        "Giving --warm-start-epochs, --lr, --warm-start-lr or --schedule turns this recipe off; "
        "the other estimators have no warm start unless asked.",
    )
    g.add_argument(
        "--warm-start-epochs",
        type=int,  # range checked by TrainConfig: one `vaeml: error:` line
        metavar="N",
        help="train the first N of --epochs with --warm-start-estimator (0: no warm start)",
    )
    g.add_argument("--warm-start-estimator", choices=WARM_START_ESTIMATORS, help="default iwae")
    g.add_argument(
        "--warm-start-num-particles", type=int, metavar="S", help="its particles (default 5)"
    )
    g.add_argument("--warm-start-lr", type=float, help="its Adam learning rate (default: --lr)")
    g = t.add_argument_group("monitoring and checkpoints")
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        metavar="N",
        help="estimate the test log-likelihood every N epochs (default 0: never)",
    )
    g.add_argument("--eval-num-samples", type=_positive_int, help="K for --eval-every (100)")
    g.add_argument(
        "--eval-max-examples", type=_positive_int, help="test examples for --eval-every (1000)"
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="checkpoint every N epochs (default 1; 0: only at the end)",
    )
    g.add_argument("--keep-checkpoints", type=_positive_int, help="checkpoints kept (default 3)")
    g = t.add_argument_group("devices")
    g.add_argument(
        "--devices",
        type=_positive_int,
        help="use the first N visible devices, batch sharded over them (default: all)",
    )
    g.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run (every process runs this same command; coordinator from "
        "$JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID or the cluster; see "
        "`vaeml launch` and docs/distributed.md)",
    )

    e = sub.add_parser(
        "evaluate",
        help="test log-likelihood of a trained run (IS with K=5000 by default)",
        description="Estimate the test log-likelihood of the run in DIR (its latest checkpoint) "
        "and write DIR/eval.json.",
    )
    e.add_argument("run_dir", metavar="DIR")
    e.add_argument(
        "--num-samples",
        "-K",
        type=_positive_int,
        default=5000,
        metavar="K",
        help="importance samples per test image (default 5000, the literature's protocol)",
    )
    e.add_argument(
        "--method",
        default="is",
        choices=("is", "ais"),
        help="is (importance sampling, default) or ais (annealed importance sampling)",
    )
    e.add_argument(
        "--max-test-examples",
        type=_positive_int,
        metavar="N",
        help="the first N test images only (default: all 10,000 of MNIST); e.g. "
        "--max-test-examples 1000 -K 1000 for a quick estimate",
    )
    e.add_argument("--chunk-size", type=_positive_int, default=500, help="samples per chunk (500)")
    e.add_argument("--batch-size", type=_positive_int, default=100, help="examples per batch (100)")
    e.add_argument("--elbo-samples", type=_positive_int, default=10, help="for the test ELBO (10)")
    e.add_argument("--epoch", type=_positive_int, help="checkpoint to evaluate (default: latest)")
    e.add_argument("--seed", type=_positive_int, default=0, help="sampling seed (0)")
    e.add_argument("--data-dir", metavar="DIR", help="data folder (default: the run's)")
    e.add_argument("--output", metavar="FILE", help="where to write (default DIR/eval.json)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process run, as for train (the examples are split over every "
        "device of every process)",
    )
    a = e.add_argument_group("annealed importance sampling (--method ais; Wu et al. 2017)")
    a.add_argument("--ais-steps", type=_positive_int, help="temperatures T after b_0 (500)")
    a.add_argument("--ais-chains", type=_positive_int, help="independent chains per example (16)")
    a.add_argument("--ais-leapfrog", type=_positive_int, help="HMC leapfrog steps (10)")
    a.add_argument("--ais-step-size", type=float, help="initial HMC step size (0.05)")
    a.add_argument(
        "--ais-schedule", choices=("sigmoid", "linear"), help="temperatures (default sigmoid)"
    )
    a.add_argument(
        "--ais-adapt-chains",
        type=_positive_int,
        help="pilot chains adapting per-temperature step sizes (4; 0 = fixed step size)",
    )

    pl = sub.add_parser(
        "plot",
        help="PNG plots of a run: training curves, samples, reconstructions, meeting times",
        description="Write DIR/plots/{curves,samples,reconstructions,meeting_times}.png.",
    )
    pl.add_argument("run_dir", metavar="DIR")
    pl.add_argument("--out", metavar="PLOTDIR", help="where to write (default DIR/plots)")
    pl.add_argument("--num-samples", type=_positive_int, default=64, help="samples shown (64)")
    pl.add_argument("--seed", type=_positive_int, default=0)
    pl.add_argument("--data-dir", metavar="DIR", help="data folder (default: the run's)")

    la = sub.add_parser(
        "launch",
        help="run a command as N processes of one multi-process run on this machine",
        description="Start N processes of `vaeml COMMAND ...` on this machine, joined into one "
        "multi-process run (coordinator on 127.0.0.1; --distributed is added for train and "
        "evaluate). Process 0 prints the log; if one process fails, the others are stopped. "
        "Example: vaeml launch -n 2 --cpu-devices 2 -- train --epochs 1 --out runs/two",
    )
    la.add_argument("-n", "--num-processes", type=_positive_int, default=2, help="processes (2)")
    la.add_argument(
        "--cpu-devices",
        type=_positive_int,
        metavar="K",
        help="run on the CPU, split into K devices per process (XLA_FLAGS); default: the "
        "devices JAX finds",
    )
    la.add_argument(
        "--port", type=_positive_int, help="coordinator port on 127.0.0.1 (default: a free one)"
    )
    la.add_argument(
        "--timeout",
        type=float,
        help="seconds for the processes to join (default $VAEML_DISTRIBUTED_TIMEOUT, else 300)",
    )
    la.add_argument("args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    return p


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _resolve_train_config(args: argparse.Namespace):
    """``(config, out, recipe)``: defaults < stored config (with --resume) < --config FILE <
    command-line flags; then, for a fresh run that set none of ``RECIPE_FIELDS``, the unbiased
    estimator's measured warm-start recipe (``recipe`` says whether it was applied)."""
    from vaeml_jax.training import RECIPE_FIELDS, TrainConfig, read_config, with_measured_recipe

    given = vars(args).copy()
    for key in ("command", "out", "config", "resume", "no_progress", "distributed"):
        given.pop(key, None)
    cfg = TrainConfig()
    file_cfg: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            file_cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise CLIError(f"config file {path} not found.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CLIError(f"config file {path} is not valid JSON ({e}).") from None
        if not isinstance(file_cfg, dict):
            raise CLIError(f"config file {path} must hold a JSON object of options.")
        file_cfg = dict(file_cfg)
        for key in ("out", "resume"):  # allowed in files for convenience
            if key in file_cfg and key not in vars(args):
                setattr(args, key, file_cfg[key])
            file_cfg.pop(key, None)
    out = getattr(args, "out", None)
    stored = None
    if getattr(args, "resume", False) and out is not None:
        stored = read_config(out)
        if stored is not None:
            cfg = stored
    cfg = TrainConfig.from_dict(file_cfg, base=cfg)
    cfg = TrainConfig.from_dict(given, base=cfg)
    chosen = {k.replace("-", "_") for k in (*given, *file_cfg)}
    recipe = stored is None and not chosen & set(RECIPE_FIELDS)  # a fresh run on the defaults
    if recipe:
        cfg = with_measured_recipe(cfg)
        recipe = cfg.warm_start_epochs > 0
    if out is None:
        out = f"runs/{cfg.dataset}-{cfg.estimator}-s{cfg.seed}"
    return cfg, Path(out), recipe


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from vaeml_jax.training import train

    if getattr(args, "distributed", False):
        from vaeml_jax import distributed

        distributed.initialize()  # the coordinator from the environment or the cluster

    cfg, out, recipe = _resolve_train_config(args)
    resume = bool(getattr(args, "resume", False))
    cfg = cfg.resolved()
    notes = []  # printed after train's opening line, i.e. once the run has been accepted
    if recipe:
        notes.append(
            f"vaeml train: the {cfg.estimator} estimator's measured recipe "
            f"(benchmarks/RESULTS.md): {cfg.warm_start_num_particles}-particle "
            f"{cfg.warm_start_estimator.upper()} for {cfg.warm_start_epochs} of {cfg.epochs} "
            f"epochs at lr {cfg.warm_start_lr:g}, then {cfg.estimator} gradients at lr "
            f"{cfg.lr:g}; --warm-start-epochs 0 trains with {cfg.estimator} gradients from the "
            "first step"
        )

    def log(line: str) -> None:
        tqdm.write(line, file=sys.stderr)
        while notes:
            tqdm.write(notes.pop(0), file=sys.stderr)

    res = train(cfg, out, resume=resume, progress=not getattr(args, "no_progress", False), log=log)
    from vaeml_jax import distributed

    if not distributed.is_primary():  # process 0 reports for the run
        return 0
    m = res["metrics"]
    line = f"trained {res['epoch']} epochs into {out}"
    if m is not None:
        line += f"; last epoch objective {m['objective']:.3f}"
    print(line)
    print(f"next: vaeml evaluate {out}   |   vaeml plot {out}")
    return 0


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _evaluate_start_line(args, config, epoch: int, run_dir: Path, num_images: int) -> str:
    """What ``vaeml evaluate`` is about to compute, before it starts."""
    if args.method == "is":
        what = f"importance sampling with K = {args.num_samples} samples per image"
    else:
        what = "annealed importance sampling"
    line = (
        f"vaeml evaluate: {what} on {num_images} test images of {config.dataset}, checkpoint of "
        f"epoch {epoch} in {run_dir}"
    )
    if args.method == "is" and num_images * args.num_samples > 2_000_000:
        line += (
            " (minutes on a CPU; --max-test-examples 1000 --num-samples 1000 gives a quick "
            "estimate)"
        )
    return line


def _evaluate_bar(total: int, disable: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc="evaluate", unit="image", disable=disable, leave=False, file=sys.stderr
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vaeml_jax import distributed

    if args.distributed:
        distributed.initialize()  # before anything else touches JAX
    import jax

    from vaeml_jax.evaluation import SCHEDULES, evaluate
    from vaeml_jax.training import load_data, load_run
    from vaeml_jax.training.rundir import environment, write_atomic

    if args.method not in ("is", "ais"):
        raise CLIError(f"unknown --method {args.method!r}; choose is or ais.")
    if args.num_samples < 1:
        raise CLIError("--num-samples must be >= 1.")
    ais_flags = {  # flag -> ais_log_likelihood option
        "--ais-steps": ("num_steps", args.ais_steps),
        "--ais-chains": ("num_chains", args.ais_chains),
        "--ais-leapfrog": ("leapfrog_steps", args.ais_leapfrog),
        "--ais-step-size": ("step_size", args.ais_step_size),
        "--ais-schedule": ("schedule", args.ais_schedule),
        "--ais-adapt-chains": ("adapt_chains", args.ais_adapt_chains),
    }
    given = [flag for flag, (_, v) in ais_flags.items() if v is not None]
    if given and args.method != "ais":
        flags = ", ".join(given)
        raise CLIError(f"{flags} only apply to --method ais, not --method {args.method}.")
    ais_kwargs = {ais_flags[f][0]: ais_flags[f][1] for f in given}
    if args.ais_step_size is not None and not args.ais_step_size > 0:
        raise CLIError(f"--ais-step-size must be > 0, got {args.ais_step_size}.")
    if args.ais_schedule is not None and args.ais_schedule not in SCHEDULES:
        choices = " or ".join(SCHEDULES)
        raise CLIError(f"unknown --ais-schedule {args.ais_schedule!r}; choose {choices}.")
    run_dir = Path(args.run_dir)
    mesh = distributed.make_mesh()  # every device of every process: the examples split over them
    config, vae, params, epoch = load_run(run_dir, args.epoch, mesh=mesh)
    _, _, x = load_data(config, args.data_dir)
    if args.max_test_examples:
        x = x[: args.max_test_examples]
    vae.check_data(x)
    primary = jax.process_index() == 0  # one process reports for a multi-process evaluation
    if primary:
        print(_evaluate_start_line(args, config, epoch, run_dir, x.shape[0]), file=sys.stderr)
    bar = _evaluate_bar(x.shape[0], disable=args.no_progress or not primary)
    t0 = time.perf_counter()
    res = evaluate(
        vae.model,
        params,
        x,
        jax.random.key(args.seed),
        method=args.method,
        num_samples=args.num_samples,
        chunk_size=min(args.chunk_size, args.num_samples),
        batch_size=min(args.batch_size, x.shape[0]),
        elbo_samples=args.elbo_samples,
        mesh=mesh,
        progress=bar.update,  # ticks on the host as each batch of images finishes
        **ais_kwargs,
    )
    bar.close()
    seconds = time.perf_counter() - t0
    num_examples: int = x.shape[0]  # an int for mypy: with an Any default, res.get is Optional
    out = {
        "dataset": config.dataset,
        "binarization": config.binarization,
        "test_set_binarization_seed": None if config.binarization == "none" else 0,
        "estimator": config.estimator,
        "method": res.get("method", args.method),
        "num_samples": int(res.get("num_samples", args.num_samples)),
        "num_examples": int(res.get("num_examples", num_examples)),
        "checkpoint_epoch": int(epoch),
        "test_log_likelihood": float(res["test_log_likelihood"]),
        "test_log_likelihood_stderr": float(res["test_log_likelihood_stderr"]),
        "test_elbo": float(res["test_elbo"]),
        "test_elbo_stderr": float(res["test_elbo_stderr"]),
        "seconds": float(res.get("seconds", seconds)),
        "seed": args.seed,
        "num_processes": jax.process_count(),
        "units": "nats per example (higher is better)",
        "environment": environment(),
    }
    if "ais" in res:
        out["ais"] = res["ais"]
    path = Path(args.output) if args.output else run_dir / EVAL_FILE
    if not distributed.is_primary():  # every process has the result; process 0 writes it
        return 0
    write_atomic(path, json.dumps(out, indent=2, default=_json_default) + "\n")
    rows = [
        ("run", str(run_dir)),
        ("dataset", f"{config.dataset} ({config.binarization}), {out['num_examples']} examples"),
        ("estimator / epoch", f"{config.estimator} / {epoch}"),
        (
            "method",
            f"{out['method']}, K = {out['num_samples']}"
            if out["method"] == "is"
            else "ais, " + ", ".join(f"{k} = {v}" for k, v in out.get("ais", {}).items()),
        ),
        (
            "test log-likelihood",
            f"{out['test_log_likelihood']:.3f} ± {out['test_log_likelihood_stderr']:.3f} nats",
        ),
        ("test ELBO", f"{out['test_elbo']:.3f} ± {out['test_elbo_stderr']:.3f} nats"),
        ("time", f"{out['seconds']:.1f} s"),
        ("written", str(path)),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from vaeml_jax.distributed import launch

    command = list(args.args)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise CLIError("vaeml launch needs a command after --, e.g. `vaeml launch -n 2 -- train`.")
    if command[0] not in COMMANDS or command[0] == "launch":
        raise CLIError(
            f"vaeml launch runs train, evaluate or plot, not {command[0]!r} "
            "(e.g. `vaeml launch -n 2 -- train --out runs/two`)."
        )
    return launch(
        command,
        num_processes=args.num_processes,
        cpu_devices=args.cpu_devices,
        port=args.port,
        timeout=args.timeout,
    )


def cmd_plot(args: argparse.Namespace) -> int:
    from vaeml_jax.plot import plot_run

    paths = plot_run(
        args.run_dir,
        args.out,
        num_samples=args.num_samples,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    for p in paths:
        print(p)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "plot": cmd_plot, "launch": cmd_launch}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (not a bug): reported in one line."""
    from vaeml_jax.checkpoint import CheckpointError
    from vaeml_jax.distributed import DistributedError
    from vaeml_jax.training import TrainingDiverged

    errors: list[type[BaseException]] = [
        CLIError,
        DistributedError,
        ValueError,  # ConfigError, RunDirError, DataError and model.check_data's errors
        TypeError,
        CheckpointError,
        TrainingDiverged,
        OSError,
    ]
    return tuple(errors)


def use_compilation_cache() -> None:
    """Keep XLA's compiled programs on disk, so a second run (or ``vaeml evaluate`` of a run of
    the same shapes) does not compile again: on CPU the unbiased training step takes about a
    minute to compile.

    The folder is ``$VAEML_COMPILATION_CACHE`` if set (``off`` or ``0`` turns the cache off),
    else ``$XDG_CACHE_HOME/vaeml-jax/xla`` (``~/.cache/vaeml-jax/xla``). A cache folder already
    chosen for JAX (``JAX_COMPILATION_CACHE_DIR``, or by the calling program) is left alone.
    """
    setting = os.environ.get("VAEML_COMPILATION_CACHE")
    if setting is not None and setting.strip().lower() in ("", "0", "off", "false", "none"):
        return
    import jax

    # jax's Config defines its option attributes at run time, unknown to its type stubs
    if jax.config.jax_compilation_cache_dir:  # type: ignore[attr-defined]
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(setting) if setting else Path(base) / "vaeml-jax" / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return
    jax.config.update("jax_compilation_cache_dir", str(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vaeml`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a syntax error (2, message already printed)
        return int(e.code or 0)
    debug = os.environ.get("VAEML_DEBUG", "") not in ("", "0")
    try:
        use_compilation_cache()
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "vaeml: interrupted; a training run continues from its last checkpoint with "
            "`vaeml train --out DIR --resume`.",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        if debug:
            raise
        msg = str(e).strip() or type(e).__name__
        try:
            user_errors = _user_errors()
        except Exception:  # pragma: no cover - the package itself failed to import
            user_errors = (CLIError, ValueError, OSError)
        if not isinstance(e, user_errors):  # a bug: still one line, with how to see more
            msg = f"internal error ({type(e).__name__}): {msg} (set VAEML_DEBUG=1 for a traceback)"
        print(f"vaeml: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
