"""The optimizer: does the unbiased gradient lose to IWAE because of Adam?

From one warm-start checkpoint (parameters and Adam state of a ``reproduce.py --preset warm_start``
warm-start run), each configuration continues training for the same number of training examples
and is scored by the same importance-sampled test log-likelihood (same test images, same key, so
differences between rows are paired):

* ``adam``: Adam, lr 3e-4, continuing the warm start's Adam state (what the preset does);
* ``sgd_rm``: plain SGD with the Robbins-Monro step lr0 (1 + t / t0)^-0.6 (sum lr = inf, sum lr^2 <
  inf: the setting an unbiased stochastic gradient is made for), scored at the last iterate and at
  the Polyak-Ruppert average of the iterates (``sgd_rm_avg``), lr0 chosen by a pilot on IWAE-5;
* ``adam_b500``: Adam at batch 500 for a fifth of the steps (equal training examples, so about
  equal log_joint evaluations; fewer, less noisy updates);
* ``adam@LR``: Adam at another learning rate (the warm start's moments carried over);
  ``sgd_rm@LR``: the Robbins-Monro SGD with lr0 = LR instead of the pilot's;
* ``adam_clip@C``: Adam after clipping the gradient's global norm at C. BIASED (clipping changes
  the gradient's mean): a measured opt-in, never a default.

Every configuration runs for IWAE-5 (the control) and the unbiased estimator (S = 5, k = m = 0).
Per step it records the decoder-gradient norm (its tail: max / median) and the update's norm, the
mechanism suspected (rare huge gradients inflate Adam's second moment, so the signal barely
moves the parameters; under SGD the same spikes become huge jumps). Rows are cached in
``<work>/rows.jsonl`` (re-running skips done rows).

    python benchmarks/optimizer_study.py --warm-run runs/warm_start/mnist/warm_start/seed0
    python benchmarks/optimizer_study.py --quick       # smoke test, tiny, trains its own warm start
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reproduce import machine_info  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.checkpoint import Checkpointer  # noqa: E402
from vaeml_jax.data import binarized_test_set, epoch_batches, load_dataset  # noqa: E402
from vaeml_jax.evaluation import importance_log_likelihood  # noqa: E402
from vaeml_jax.training import TrainConfig, load_run, train  # noqa: E402
from vaeml_jax.training.optim import make_optimizer  # noqa: E402

ESTIMATORS = {"iwae5": ("iwae", 5), "unbiased5": ("unbiased", 5)}


def restore_warm(run_dir: Path, epoch: int | None):
    """(config, vae, params, adam_state, epoch) of a warm-start run's checkpoint."""
    config, vae, params, epoch = load_run(run_dir, epoch)
    template = {"params": params, "opt_state": make_optimizer(config).init(params)}
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        state, _, epoch = ckpt.restore(template, epoch)
    finally:
        ckpt.close()
    return config, vae, state["params"], state["opt_state"], epoch


def quick_warm(work: Path, data_dir):
    """The smoke test's own tiny warm start (IWAE-5, 200 images, a 16-unit network)."""
    cfg = TrainConfig.from_dict(
        dict(
            dataset="mnist",
            data_dir=data_dir,
            estimator="iwae",
            num_particles=5,
            hidden=(16,),
            latent_dim=4,
            batch_size=50,
            max_train_examples=200,
            epochs=2,
            lr=1e-3,
        )
    )
    run_dir = work / "quick_warm"
    train(cfg, run_dir, resume=run_dir.exists(), progress=False, log=lambda m: None)
    return run_dir


def sgd_rm(lr0: float, t0: float) -> optax.GradientTransformation:
    """SGD with the Robbins-Monro step lr0 (1 + t / t0)^-0.6."""
    return optax.sgd(lambda t: lr0 * (1.0 + t / t0) ** -0.6)


def decoder_norm(grads) -> jax.Array:
    return optax.global_norm(grads["decoder"])


def run_row(
    a, model, params0, adam0, train_x, test_x, estimator: str, opt: str, lr0: float
) -> dict:
    kind, s = ESTIMATORS[estimator]
    grad_fn = (
        vj.make_iwae_grad(model, num_particles=s)
        if kind == "iwae"
        else vj.make_unbiased_grad(
            model,
            num_particles=s,
            max_iters=a.max_iters,
            loop=vj.LoopOptions(num_slots=a.num_slots or None),
        )
    )
    batch = 5 * a.batch_size if opt == "adam_b500" else a.batch_size
    steps = a.steps * a.batch_size // batch
    name, _, value = opt.partition("@")
    if name == "sgd_rm":
        lr0 = float(value) if value else lr0
        optimizer = sgd_rm(lr0, a.t0)
        state = optimizer.init(params0)
    else:  # the warm start's Adam state carries over: only its learning rate changes
        lr = float(value) if name == "adam" and value else a.lr
        optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        state = adam0._replace(hyperparams={**adam0.hyperparams, "learning_rate": jnp.float32(lr)})
        if name == "adam_clip":  # BIASED: clipping the global norm at C changes the mean
            optimizer = optax.chain(optax.clip_by_global_norm(float(value)), optimizer)
            state = (optax.clip_by_global_norm(float(value)).init(params0), state)

    @jax.jit
    def step(params, opt_state, avg, t, x, key):
        grads, info = grad_fn(params, x, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        avg = jax.tree.map(lambda m, p: m + (p - m) / (t + 1.0), avg, new)
        stats = dict(
            grad_norm=decoder_norm(grads),
            update_norm=optax.global_norm(updates),
            bound=jnp.mean(info["bound"]),
            evals=jnp.asarray(info["num_log_joint_evals"], jnp.float32),
            tau_max=jnp.max(info["meeting_time"]),
            capped=jnp.mean(info["capped"]),
        )
        return new, opt_state, avg, stats

    params, avg = params0, params0
    key = jax.random.key(a.seed)
    rows, t, t_start = [], 0, time.perf_counter()
    while t < steps:
        key, ek = jax.random.split(key)
        batches = epoch_batches(ek, train_x, batch)
        for x in batches:
            if t >= steps:
                break
            key, sk = jax.random.split(key)
            params, state, avg, st = step(params, state, avg, jnp.float32(t), x, sk)
            rows.append({k: float(v) for k, v in st.items()})
            t += 1
    seconds = time.perf_counter() - t_start
    if not all(np.isfinite(r["bound"]) for r in rows):
        print(f"    {estimator} {opt}: non-finite bound during training", flush=True)
    g = np.array([r["grad_norm"] for r in rows])
    u = np.array([r["update_norm"] for r in rows])
    eval_key = jax.random.key(a.eval_seed)
    ll = np.asarray(
        importance_log_likelihood(model, params, test_x, eval_key, num_samples=a.eval_samples)
    )
    out = dict(
        estimator=estimator,
        optimizer=opt,
        lr0=lr0,
        batch=batch,
        steps=steps,
        evals_per_example=float(sum(r["evals"] for r in rows) / (steps * batch)),
        seconds=seconds,
        grad_norm_median=float(np.median(g)),
        grad_norm_p99=float(np.quantile(g, 0.99)),
        grad_norm_max=float(g.max()),
        update_norm_median=float(np.median(u)),
        update_norm_max=float(u.max()),
        tau_max=float(max(r["tau_max"] for r in rows)),
        capped=float(np.mean([r["capped"] for r in rows])),
        bound_last100=float(np.mean([r["bound"] for r in rows[-100:]])),
        # how far the parameters travelled: stalled (short) or diffusing (long, yet worse)?
        decoder_distance=float(
            optax.global_norm(jax.tree.map(jnp.subtract, params, params0)["decoder"])
        ),
        path_length=float(u.sum()),
        test_ll=float(np.mean(ll)),
        per_example_ll=[round(float(v), 4) for v in ll],
    )
    if opt.startswith("sgd_rm"):
        ll_avg = np.asarray(
            importance_log_likelihood(model, avg, test_x, eval_key, num_samples=a.eval_samples)
        )
        out["test_ll_avg"] = float(np.mean(ll_avg))
        out["per_example_ll_avg"] = [round(float(v), 4) for v in ll_avg]
    return out


def pilot_sgd(a, model, params0, train_x) -> tuple[float, dict]:
    """lr0 for SGD: the best IWAE-5 training bound after ``pilot_steps`` steps over a grid."""
    grad_fn = vj.make_iwae_grad(model, num_particles=5)
    scores = {}
    for lr0 in a.sgd_grid:
        opt = sgd_rm(lr0, a.t0)

        @jax.jit
        def step(params, s, x, key, opt=opt):
            grads, info = grad_fn(params, x, key)
            updates, s = opt.update(grads, s, params)
            return optax.apply_updates(params, updates), s, jnp.mean(info["bound"])

        params, s, key, bounds = params0, opt.init(params0), jax.random.key(a.seed + 1), []
        batches = epoch_batches(jax.random.key(a.seed + 2), train_x, a.batch_size)
        for i in range(a.pilot_steps):
            key, sk = jax.random.split(key)
            params, s, b = step(params, s, batches[i % batches.shape[0]], sk)
            bounds.append(float(b))
        tail = np.mean(bounds[-max(1, a.pilot_steps // 4) :])
        scores[lr0] = float(tail) if np.isfinite(tail) else -np.inf
    return max(scores, key=scores.get), scores


def paired(rows: list[dict], ref: dict, key="per_example_ll") -> dict:
    """Mean and standard error of the per-example difference row - ref."""
    out = {}
    for r in rows:
        for k, label in ((key, ""), (key + "_avg", " (Polyak avg)")):
            if k not in r:
                continue
            d = np.array(r[k]) - np.array(ref["per_example_ll"])
            out[f"{r['estimator']} {r['optimizer']}{label}"] = (
                float(d.mean()),
                float(d.std(ddof=1) / np.sqrt(d.size)),
                float(np.mean(r[k])),
            )
    return out


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warm-run", type=Path, default=Path("runs/warm_start/mnist/warm_start/seed0"))
    p.add_argument("--epoch", type=int, default=None, help="warm-start checkpoint (default latest)")
    p.add_argument("--work", type=Path, default=Path("runs/optimizer_study"))
    p.add_argument("--data-dir", default=os.environ.get("VAEML_DATA_DIR"))
    p.add_argument("--train-examples", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=300, help="steps at batch --batch-size")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4, help="Adam's")
    p.add_argument("--t0", type=float, default=100.0, help="SGD's Robbins-Monro time scale")
    p.add_argument("--sgd-grid", type=float, nargs="+", default=[0.0003, 0.001, 0.003, 0.01])
    p.add_argument("--pilot-steps", type=int, default=100)
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=["adam", "sgd_rm", "adam_b500", "adam@1e-4", "adam_clip@25"],
    )
    p.add_argument("--estimators", nargs="+", default=["iwae5", "unbiased5"])
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument(
        "--num-slots",
        type=int,
        default=25,
        help="the unbiased estimator's work queue (same estimate as the plain loop, 5-20x faster "
        "on CPU; `vaeml train --num-slots auto` picks it there); 0: the plain loop",
    )
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1234)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    for opt in a.optimizers:
        name, at, value = opt.partition("@")
        ok = name in ("adam", "adam_b500", "sgd_rm", "adam_clip") and (
            (not at and name != "adam_clip") or (at and name != "adam_b500" and _positive(value))
        )
        if not ok:
            p.error(
                f"--optimizers: {opt!r} is not one of adam, adam@LR, sgd_rm, sgd_rm@LR, "
                "adam_b500, adam_clip@C (LR, C > 0)"
            )
    if unknown := set(a.estimators) - set(ESTIMATORS):
        p.error(f"--estimators: unknown {sorted(unknown)}; choose from {sorted(ESTIMATORS)}")
    if a.quick:
        a.steps, a.pilot_steps, a.train_examples, a.eval_examples, a.eval_samples = (
            10,
            5,
            200,
            20,
            20,
        )
        a.batch_size, a.sgd_grid, a.max_iters = 10, [0.01, 0.1], 100
        a.work = a.work.with_name(a.work.name + "_quick")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    warm_dir = quick_warm(a.work, a.data_dir) if a.quick else a.warm_run
    cfg, vae, params0, adam0, epoch = restore_warm(warm_dir, a.epoch)
    model = vae.model
    ds = load_dataset(cfg.dataset, a.data_dir)
    train_x = jnp.asarray(ds.train[: a.train_examples])
    test_x = binarized_test_set(ds)[: a.eval_examples]
    print(f"optimizer study from {warm_dir} (epoch {epoch}); {machine_info()}", flush=True)
    rows_file = a.work / "rows.jsonl"
    done = [json.loads(line) for line in rows_file.open()] if rows_file.exists() else []
    start = next((r for r in done if r["estimator"] == "start"), None)
    if start is None:
        ll = importance_log_likelihood(
            model, params0, test_x, jax.random.key(a.eval_seed), num_samples=a.eval_samples
        )
        start = dict(estimator="start", optimizer="-", per_example_ll=[float(v) for v in ll])
        with rows_file.open("a") as f:
            f.write(json.dumps(start) + "\n")
        done.append(start)
    lr0 = next((r["lr0"] for r in done if r["estimator"] == "pilot"), None)
    if lr0 is None and "sgd_rm" in a.optimizers:  # sgd_rm@LR needs no pilot
        lr0, scores = pilot_sgd(a, model, params0, train_x)
        print(
            f"  SGD pilot (IWAE-5, {a.pilot_steps} steps, final-quarter bound): {scores} "
            f"-> lr0 {lr0}",
            flush=True,
        )
        pilot = dict(
            estimator="pilot",
            optimizer="sgd_rm",
            lr0=lr0,
            scores={str(k): v for k, v in scores.items()},
        )
        with rows_file.open("a") as f:
            f.write(json.dumps(pilot) + "\n")
        done.append(pilot)
    for est in a.estimators:
        for opt in a.optimizers:
            if any(r["estimator"] == est and r["optimizer"] == opt for r in done):
                continue
            row = run_row(a, model, params0, adam0, train_x, test_x, est, opt, lr0 or 0.0)
            with rows_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.append(row)
            print(
                f"  {est} {opt}: test LL {row['test_ll']:.2f}"
                + (f" (avg {row['test_ll_avg']:.2f})" if "test_ll_avg" in row else "")
                + f", grad norm median {row['grad_norm_median']:.3g} max "
                f"{row['grad_norm_max']:.3g}, update median {row['update_norm_median']:.3g} max "
                f"{row['update_norm_max']:.3g}, {row['evals_per_example']:.1f} evals/ex, "
                f"{row['seconds']:.0f}s",
                flush=True,
            )
    trained = [r for r in done if r["estimator"] in ESTIMATORS]
    diffs = paired(trained, start)
    print(
        f"\nTest LL (K={a.eval_samples}, {test_x.shape[0]} test images) minus the warm start's "
        f"({np.mean(start['per_example_ll']):.2f}), paired SE:"
    )
    for name, (d, se, ll) in diffs.items():
        print(f"  {name:32s} {d:+7.2f} +- {se:.2f}   ({ll:.2f})")
    print(
        "\n| estimator | optimizer | batch x steps | test LL | vs start | grad norm "
        "median / p99 / max | update norm median / max | path length | decoder distance | "
        "evals/ex |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in trained:
        d, se, _ = diffs[f"{r['estimator']} {r['optimizer']}"]
        print(
            f"| {r['estimator']} | {r['optimizer']}"
            + (f" (lr0 {r['lr0']:g})" if r["optimizer"].startswith("sgd_rm") else "")
            + f" | {r['batch']} x {r['steps']} | {r['test_ll']:.2f}"
            + (f" (avg {r['test_ll_avg']:.2f})" if "test_ll_avg" in r else "")
            + f" | {d:+.2f} +- {se:.2f} | {r['grad_norm_median']:.3g} / "
            f"{r['grad_norm_p99']:.3g} / {r['grad_norm_max']:.3g} | "
            f"{r['update_norm_median']:.3g} / {r['update_norm_max']:.3g} | "
            f"{r.get('path_length', float('nan')):.3g} | "
            f"{r.get('decoder_distance', float('nan')):.3g} | {r['evals_per_example']:.1f} |"
        )
    return {"rows": trained, "diffs": diffs}


if __name__ == "__main__":
    main()
