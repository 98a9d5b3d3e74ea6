r"""Variance-reduction options for the unbiased estimator, each measured per log_joint evaluation.

Same measurement as ``variance.py`` part 2 (its ``trace_cov`` and ``tau_stats``):
R independent calls of each estimator configuration on ONE fixed minibatch (the first
``--var-batch`` training images, binarized once with seed 0), the trace of the covariance of the
decoder gradient tr Cov with its standard error, and the ``log_joint`` evaluations per example:
``own`` (each lane's 2S + (S+1) num_iters, plus the encoder objective's own draws: what a perfect
scheduler pays) and ``executed`` (``info["num_log_joint_evals"] / B``: what the plain batch loop
ran, masked lanes included; on an accelerator this is the wall-clock). The figure of merit is
tr Cov x evaluations (variance at equal cost); "gain" is the baseline's figure over the row's at
the same model state, baseline = today's default (S = 10, k = m = 0, one chain).

Model states are trained through the product (``vaeml_jax.training.train``) with IWAE-5 and Adam
(lr 1e-3, batch 100) for ``--train-steps`` steps on the first ``--train-examples`` images, one
state per encoder variant (``--encoders``, e.g. ``diag:iwae``, ``diag:iwae_dreg``, ``iaf:iwae``,
syntax ``ENCODER:OBJECTIVE``) and per latent dimension of the regime map (``--latent-dims``).

Groups (``--groups``):

* ``windows``: H_{k:m} at S = 10 for each ``--km`` window and the automatic window
  (:func:`vaeml_jax.diagnostics.suggest_window` from a pilot of ``--pilot`` calls with keys
  independent of the measured ones, so the measured estimator stays unbiased).
* ``budget``: S and num_chains at (roughly) equal evaluations (``--sc`` pairs ``S,C``).
* ``encoders``: the baseline at each encoder variant's model (std log w, tau tail, variance).
* ``regime``: the baseline and IWAE-10 at each latent dimension: where the variance ratio to
  IWAE-S is smallest.
* ``stage``: the baseline and IWAE-10 after each of ``--stages`` IWAE-5 training steps.
* ``rejuvenation``: the baseline with its kept particles moved between CIS steps
  (``--rejuvenation`` entries ``STEPS,STEP_SIZE,MEET_SCALE``: MALA steps, their size and the
  reflection-maximal random-walk scale, in units of q's per-coordinate std); a value-and-gradient
  of log_joint counts as one evaluation, so the seconds column matters here too.

Heavy tails make tr Cov's standard error as large as tr Cov itself in the worst rows; "top share"
(the largest replicate's share of the summed squared deviations) shows when one replicate carries
the estimate.

    python benchmarks/variance_options.py                     # CPU preset (RESULTS.md has the time)
    python benchmarks/variance_options.py --quick --json /tmp/vo.json     # smoke run
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, HERE):
    if str(p) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(p))

from reproduce import machine_info  # noqa: E402
from variance import decoder_flat, tau_stats, trace_cov  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.data import binarize_static, load_dataset  # noqa: E402
from vaeml_jax.diagnostics import suggest_window  # noqa: E402
from vaeml_jax.estimators._rejuvenation import extra_evals  # noqa: E402
from vaeml_jax.training import TrainConfig, build_vae, train  # noqa: E402

PRESETS = {
    "cpu": dict(
        train_examples=10000,
        train_steps=300,
        var_batch=20,
        replicates=200,
        pilot=20,
        groups=["rejuvenation", "budget", "stage", "regime", "encoders", "windows"],
        km=["0,4", "5,10", "10,20", "20,40", "40,80"],
        stages=[1000, 3000],
        rejuvenation=["0,0.5,0.3", "3,0.5,0.3"],
        rejuvenation_replicates=24,
        sc=["5,2", "5,1", "20,1", "40,1", "10,4"],
        encoders=["diag:iwae"],
        latent_dims=[2, 5, 10, 20, 50],
        hidden=[200, 200],
        latent_dim=50,
        max_iters=1000,
    ),
    "quick": dict(
        train_examples=200,
        train_steps=4,
        var_batch=4,
        replicates=4,
        pilot=2,
        groups=["windows", "budget", "encoders", "regime", "stage", "rejuvenation"],
        km=["0,2"],
        stages=[6],
        rejuvenation=["1,0.5,0.3"],
        rejuvenation_replicates=3,
        sc=["2,2"],
        encoders=["diag:iwae"],
        latent_dims=[2],
        hidden=[16],
        latent_dim=4,
        max_iters=200,
    ),
}
BASELINE = dict(kind="unbiased", S=10, C=1, k=0, m=0)


def train_state(a, ds_name: str, *, latent_dim: int, encoder: str, objective: str, log, steps: int):
    """Train IWAE-5 for ``steps`` steps; returns (vae, params, seconds)."""
    overrides = {}
    if encoder != "diag":
        overrides["encoder"] = encoder
    batch = min(100, a.train_examples)
    steps_per_epoch = a.train_examples // batch
    epochs = max(1, round(steps / steps_per_epoch))
    cfg = TrainConfig.from_dict(
        dict(
            dataset=ds_name,
            data_dir=a.data_dir,
            estimator="iwae",
            num_particles=5,
            encoder_objective=objective,
            hidden=tuple(a.hidden),
            latent_dim=latent_dim,
            batch_size=batch,
            max_train_examples=a.train_examples,
            epochs=epochs,
            seed=a.seed,
            checkpoint_every=epochs,
            keep_checkpoints=1,
            **overrides,
        )
    )
    suffix = "" if steps == a.train_steps else f"_steps{steps}"
    run_dir = Path(a.work) / f"state_{encoder}_{objective}_z{latent_dim}{suffix}"
    t0 = time.perf_counter()
    res = train(cfg, run_dir, resume=run_dir.exists(), progress=False, log=lambda m: None)
    log(f"  state {run_dir.name}: {epochs * steps_per_epoch} IWAE-5 steps")
    return build_vae(cfg.resolved()), res["params"], time.perf_counter() - t0


def rejuvenation_of(c: dict):
    """The row's vj.Rejuvenation (from its (steps, step size, meet scale) triple) or None."""
    if not c.get("rejuvenation"):
        return None
    steps, eps, delta = c["rejuvenation"]
    return vj.Rejuvenation(num_steps=int(steps), step_size=eps, meet_scale=delta)


def make_grad(model, c: dict, max_iters: int):
    if c["kind"] == "iwae":
        return vj.make_iwae_grad(model, num_particles=c["S"])
    return vj.make_unbiased_grad(
        model,
        num_particles=c["S"],
        k=c["k"],
        m=c["m"],
        num_chains=c["C"],
        max_iters=max(max_iters, c["m"]),
        rejuvenation=rejuvenation_of(c),
    )


def run_config(a, model, params, x, c: dict, key) -> dict:
    """R replicates of one configuration at one model state."""
    est = make_grad(model, c, a.max_iters)

    @jax.jit
    def call(p, k):
        g, info = est(p, x, k)
        return decoder_flat(g), info

    B = x.shape[0]
    replicates = a.rejuvenation_replicates if c.get("rejuvenation") else a.replicates
    t0 = time.perf_counter()
    gs, taus, iters, capped, executed, lw_std, ess = [], [], [], [], [], [], []
    for r in range(replicates):
        if r == 1:  # the first call compiles: seconds per call from the second one on
            t0 = time.perf_counter()
        g, info = call(params, jax.random.fold_in(key, r))
        gs.append(np.asarray(g, np.float64))
        taus.append(np.asarray(info["meeting_time"]))
        iters.append(np.asarray(info["num_iters"]))
        capped.append(np.asarray(info["capped"]))
        executed.append(int(info["num_log_joint_evals"]) / B)
        lw_std.append(np.asarray(info["log_weight_std"]))
        ess.append(np.asarray(info["ess"]))
    g = np.stack(gs)
    tc, tc_se = trace_cov(g)
    dev = np.sum((g - g.mean(0)) ** 2, axis=1)
    S = c["S"]
    if c["kind"] == "unbiased":
        rej = rejuvenation_of(c)  # its evaluations: the first move, then each coupled one
        first, coupled = extra_evals(rej)
        per_lane = 2 * S + first + (S + 1 + coupled) * np.stack(iters)
        own = float(np.mean(np.sum(per_lane, axis=-1)))
    else:
        own = float(S)
    row = {
        **c,
        "replicates": replicates,
        "batch": int(B),
        "trace_cov": tc,
        "trace_cov_se": tc_se,
        "top_share": float(dev.max() / dev.sum()) if dev.sum() > 0 else float("nan"),
        "evals_own": own,
        "evals_executed": float(np.mean(executed)),
        "capped_fraction": float(np.mean(np.stack(capped))),
        "log_weight_std": float(np.nanmean(np.stack(lw_std))),
        "ess": float(np.nanmean(np.stack(ess))),
        "seconds": (time.perf_counter() - t0) * replicates / max(replicates - 1, 1),
    }
    if c["kind"] == "unbiased":
        row["tau"] = tau_stats(np.stack(taus))
    return row


def pilot_window(a, model, params, x, key) -> tuple[int, int, dict]:
    """The automatic window from ``a.pilot`` baseline calls on keys the measurement never uses."""
    baseline = make_grad(model, BASELINE, a.max_iters)
    est = jax.jit(lambda p, k: baseline(p, x, k)[1])
    taus, batch_max = [], []
    for r in range(a.pilot):
        info = est(params, jax.random.fold_in(key, r))
        taus.append(np.asarray(info["meeting_time"]))
        batch_max.append(int(np.max(info["num_iters"])))
    k, m = suggest_window(np.stack(taus), batch_max)
    return k, m, {"pilot_calls": a.pilot, "pilot_batch_max_median": float(np.median(batch_max))}


def add_gains(rows: list[dict]) -> None:
    """Gain per evaluation against the baseline row of the same state (>1: better)."""
    for r in rows:
        base = next(
            (
                b
                for b in rows
                if b["state"] == r["state"]
                and all(b.get(k) == v for k, v in BASELINE.items())
                and not b.get("rejuvenation")
                and not b.get("auto")
            ),
            None,
        )
        if base is None:
            continue
        for kind in ("own", "executed"):
            r[f"gain_{kind}"] = (base["trace_cov"] * base[f"evals_{kind}"]) / (
                r["trace_cov"] * r[f"evals_{kind}"]
            )
        r["variance_ratio"] = r["trace_cov"] / base["trace_cov"]


def row_name(c: dict) -> str:
    if c["kind"] == "iwae":
        return f"iwae S={c['S']}"
    extra = f" C={c['C']}" if c["C"] != 1 else ""
    auto = " (auto)" if c.get("auto") else ""
    rej = ""
    if c.get("rejuvenation"):
        steps, eps, delta = c["rejuvenation"]
        rej = f" + MALA {int(steps)}x{eps:g}, RW {delta:g}"
    return f"unbiased S={c['S']}{extra} k={c['k']} m={c['m']}{auto}{rej}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| group | state | estimator | tr Cov +- SE | top share | evals own | evals executed "
        "| gain/eval own | gain/eval executed | tau mean / p99 / max / alpha | capped "
        "| std log w | ESS | s/call |"
    )
    lines = [head, "| --- " * 14 + "|"]
    for r in rows:
        tau = r.get("tau")
        tau_s = (
            f"{tau['mean']:.2f} / {tau['p99']:.0f} / {tau['max']} / {tau['tail_index']:.2f}"
            if tau
            else ""
        )
        gain = [f"{r[k]:.2f}x" if k in r else "" for k in ("gain_own", "gain_executed")]
        lines.append(
            f"| {r['group']} | {r['state']} | {row_name(r)} | {r['trace_cov']:.4g} +- "
            f"{r['trace_cov_se']:.2g} | {r['top_share']:.2f} | {r['evals_own']:.1f} | "
            f"{r['evals_executed']:.1f} | {gain[0]} | {gain[1]} | {tau_s} | "
            f"{r['capped_fraction']:.4f} | {r['log_weight_std']:.2f} | {r['ess']:.2f} | "
            f"{r['seconds'] / r['replicates']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few replicates")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=os.environ.get("VAEML_DATA_DIR"))
    p.add_argument("--train-examples", type=int)
    p.add_argument("--train-steps", type=int, help="IWAE-5 Adam steps before measuring")
    p.add_argument("--var-batch", type=int)
    p.add_argument("--replicates", type=int)
    p.add_argument(
        "--rejuvenation-replicates",
        type=int,
        help="replicates of the rejuvenation rows (their calls can run to --max-iters)",
    )
    p.add_argument("--pilot", type=int, help="baseline calls that choose the automatic window")
    p.add_argument(
        "--groups",
        nargs="+",
        choices=["windows", "budget", "encoders", "regime", "stage", "rejuvenation"],
    )
    p.add_argument("--stages", type=int, nargs="*", help="IWAE-5 steps of the stage group")
    p.add_argument(
        "--rejuvenation", nargs="*", help="'STEPS,STEP_SIZE,MEET_SCALE' kept-particle moves"
    )
    p.add_argument("--km", nargs="*", help="'k,m' windows at S=10")
    p.add_argument("--sc", nargs="*", help="'S,C' pairs (particles, chains)")
    p.add_argument("--encoders", nargs="*", help="ENCODER:OBJECTIVE model states")
    p.add_argument("--latent-dims", type=int, nargs="*")
    p.add_argument("--hidden", type=int, nargs="+")
    p.add_argument("--latent-dim", type=int)
    p.add_argument("--max-iters", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(REPO / "runs" / "variance_options"))
    p.add_argument("--json", default=None, help="default: <work>/variance_options.json")
    p.add_argument("--compilation-cache", default=str(REPO / ".jax_cache"))
    a = p.parse_args(argv)
    for name, value in PRESETS["quick" if a.quick else "cpu"].items():
        if getattr(a, name, None) is None:
            setattr(a, name, value)
    if a.replicates < 2 or a.rejuvenation_replicates < 2:
        p.error("--replicates must be >= 2 (a covariance needs two replicates).")
    try:
        a.km = [tuple(int(v) for v in km.split(",")) for km in a.km]
        a.sc = [tuple(int(v) for v in sc.split(",")) for sc in a.sc]
    except ValueError:
        p.error("--km and --sc take pairs of integers like 0,4")
    try:
        a.rejuvenation = [tuple(float(v) for v in r.split(",")) for r in a.rejuvenation]
    except ValueError:
        p.error("--rejuvenation takes STEPS,STEP_SIZE,MEET_SCALE like 3,0.5,0.3")
    if any(len(r) != 3 or r[0] < 0 or r[1] <= 0 or r[2] < 0 for r in a.rejuvenation):
        p.error("--rejuvenation needs STEPS >= 0, STEP_SIZE > 0 and MEET_SCALE >= 0.")
    if any(not 0 <= k <= m for k, m in a.km) or any(s < 2 or c < 1 for s, c in a.sc):
        p.error("--km needs 0 <= k <= m; --sc needs S >= 2 and C >= 1.")
    for e in a.encoders:
        if e.count(":") != 1:
            p.error(f"--encoders takes ENCODER:OBJECTIVE, got {e!r}.")
    if a.json is None:
        a.json = str(Path(a.work) / "variance_options.json")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    settings = {k: v for k, v in vars(a).items() if k not in ("data_dir", "compilation_cache")}
    log(f"variance_options: {json.dumps(settings)}")
    ds = load_dataset(a.dataset, a.data_dir)
    x = jnp.asarray(binarize_static(np.asarray(ds.train[: a.var_batch], np.float32), seed=0))
    measure_key = jax.random.key(a.seed + 7)  # the same replicate keys for every row
    pilot_key = jax.random.key(a.seed + 1_000_003)  # never used by a measured call
    base_iwae = dict(kind="iwae", S=10, C=1, k=0, m=0)
    states: dict[str, tuple] = {}

    def state(latent_dim: int, encoder: str = "diag", objective: str = "iwae", steps=None):
        steps = a.train_steps if steps is None else steps
        name = f"{encoder}:{objective} z={latent_dim}"
        if steps != a.train_steps:
            name += f" {steps} steps"
        if name not in states:
            states[name] = train_state(
                a,
                a.dataset,
                latent_dim=latent_dim,
                encoder=encoder,
                objective=objective,
                log=log,
                steps=steps,
            )
        return name, states[name]

    plan: list[tuple[str, str, dict]] = []  # (group, state, config), in --groups order
    main_state, (vae, params, _) = state(a.latent_dim)
    for group in a.groups:
        if group == "windows":
            plan += [("windows", main_state, c) for c in (base_iwae, BASELINE)]
            plan += [("windows", main_state, {**BASELINE, "k": k, "m": m}) for k, m in a.km]
            k, m, pilot = pilot_window(a, vae.model, params, x, pilot_key)
            log(f"  automatic window from {a.pilot} pilot calls: k={k}, m={m} ({pilot})")
            auto = {**BASELINE, "k": k, "m": m, "auto": True, **pilot}
            plan.append(("windows", main_state, auto))
        elif group == "budget":
            plan += [("budget", main_state, {**BASELINE, "S": s, "C": c}) for s, c in a.sc]
        elif group == "encoders":
            for e in a.encoders:
                enc, obj = e.split(":")
                name, _ = state(a.latent_dim, enc, obj)
                plan += [("encoders", name, c) for c in (base_iwae, BASELINE)]
        elif group == "regime":
            for d in a.latent_dims:
                name, _ = state(d)
                plan += [("regime", name, c) for c in (base_iwae, BASELINE)]
        elif group == "stage":
            for steps in a.stages:
                name, _ = state(a.latent_dim, steps=steps)
                plan += [("stage", name, c) for c in (base_iwae, BASELINE)]
        elif group == "rejuvenation":
            plan += [("rejuvenation", main_state, c) for c in (base_iwae, BASELINE)]
            plan += [
                ("rejuvenation", main_state, {**BASELINE, "rejuvenation": r})
                for r in a.rejuvenation
            ]

    # Finished rows are cached in <work>/rows.jsonl (keyed by state, config and the measurement
    # settings), so an interrupted run resumes and a config shared by two groups runs once.
    cache_file = Path(a.work) / "rows.jsonl"
    keys = ("var_batch", "replicates", "rejuvenation_replicates", "seed", "max_iters")
    measure = {k: settings[k] for k in keys}
    measure.update(train_examples=a.train_examples, dataset=a.dataset, hidden=a.hidden)
    done = {}
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry["row"]
    rows = []
    for group, state_name, c in plan:
        key = json.dumps([state_name, c, measure], sort_keys=True)
        if key not in done:
            vae_s, params_s, _ = states[state_name]
            done[key] = run_config(a, vae_s.model, params_s, x, c, measure_key)
            with cache_file.open("a") as f:
                f.write(json.dumps({"key": key, "row": done[key]}, default=float) + "\n")
            r = done[key]
            log(
                f"  {state_name:<22} {row_name(c):<34} trCov {r['trace_cov']:.4g} +- "
                f"{r['trace_cov_se']:.2g}, evals own {r['evals_own']:.1f} executed "
                f"{r['evals_executed']:.1f}, {r['seconds']:.1f}s"
            )
        rows.append({**done[key], "group": group, "state": state_name})
    add_gains(rows)
    md = markdown(rows)
    result = {
        "settings": settings,
        "machine": machine_info(),
        "seconds": time.perf_counter() - t_start,
        "train_seconds": {k: v[2] for k, v in states.items()},
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, default=float) + "\n")
    print("\n" + md)
    log(f"wrote {a.json} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
