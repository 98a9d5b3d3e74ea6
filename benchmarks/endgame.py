"""The endgame on the paper's MLP: once IWAE-5 sits at its biased fixed point, does an unbiased
gradient with a decaying step and iterate averaging pass it, or does its heavy-tailed noise stop
the averaging?

Why: the unbiased estimator's meeting times have a power-law tail P(tau > t) ~ t^-alpha with alpha
1.1-1.6 measured on this model. If the gradient noise has that tail, a sum of n noise terms grows
like n^(1/alpha), so the Polyak average's spread falls like n^(1/alpha - 1) (-0.1 to -0.3), not
n^(-1/2): averaging would remove the bias of IWAE but keep most of the noise.

Protocol, per seed (every piece is checkpointed; ``--resume`` reuses finished ones and continues
a partial one from its last checkpoint, with the same keys, so the result is the same):

1. Data and objective. The first N (``--n-train``) statically binarized MNIST training images
   (Larochelle & Murray, ``binarized_mnist``); the model is the IWAE paper's MLP (784-200-200-50,
   tanh, Bernoulli: ``build_vae(TrainConfig())``) or a smaller one (``--hidden``, ``--latent``).
   The objective is the MAP objective  mean_i log p(x_i) - lambda/2 ||theta||^2  (theta = the
   decoder's parameters, the ones log p depends on; ``--weight-decay`` lambda, default 1/N: a
   standard-normal prior on every parameter), which has a finite optimum. Every estimator gets the
   prior's exact gradient lambda * param added, on every parameter (encoder included, where it
   regularises the encoder's own objective), so an unbiased estimator stays unbiased.
2. Phase 1, the shared start: IWAE-5 from the initialisation, Adam, minibatches, lr ``--p1-lr``
   for ``--p1-const-steps`` steps, then lr / (1 + (t - const)/``--p1-t0``)^0.5. Every
   ``--p1-check-every`` steps the IWAE-5 MAP objective (the IWAE-5 bound by IS with K = 5 over ALL
   N images, one fixed key, minus the prior term) is computed; phase 1 stops at the first check
   after the constant phase where it changed by less than ``--p1-tol`` nats/image over the last
   ``--p1-window`` steps (or at ``--p1-max-steps``, reported as not converged). Its params and
   Adam state are the start of every method of phase 2.
3. Phase 2, the endgame: each method from that same state with the same schedule, full batch (all
   N; ``--batch`` for a random subset per step), step gamma_t = gamma_0 / (1 + t/t_0)^0.6
   (gamma_0 = 1e-4 from a pilot: at 3e-4 the unbiased run's average lost 1.3 nats in 50 steps,
   at 1e-4 0.05, while IWAE-5 gained 0.14 and 0.09), the Polyak average of the iterates after
   ``--burn-in`` steps. Methods: ``iwae5`` (continued), ``unbiased`` (``make_unbiased_grad``,
   S = ``--unbiased-particles``, H_{0:0}), ``iwae_matched`` (IWAE with S' = the unbiased run's
   executed log_joint evaluations per example and step; so unbiased runs first), ``iwae50``,
   and ``iwae500`` on a fresh random ``--iwae500-batch`` images per step (100 by default: the
   evaluations per step of IWAE-50's full batch; full batch it took 36 s per step here, 11x
   IWAE-50; ``--iwae500-batch 0`` for the full batch). Optimizer
   (``--optimizer``): ``precond_sgd`` (default): SGD with a FIXED diagonal preconditioner,
   1/sqrt(v) of phase 1's final Adam second moment, floored at the ``--precond-floor`` quantile
   of its positive entries (the median by default: coordinates with a small phase-1 moment get
   SGD at gamma/median; with the 1% quantile the pilot diverged within 25 steps even at
   gamma_0 = 1e-4, as coordinates quiet in phase 1 got 4e4x steps). Why: Robbins-Monro and
   Polyak-Ruppert averaging are theory for SGD with a deterministic step, which a fixed linear
   preconditioner keeps (it is SGD in rescaled coordinates) and which Adam does not (its step is
   a function of the heavy-tailed noise itself); plain SGD (``sgd``) would crawl in the
   directions Adam scaled up. ``adam`` (continuing phase 1's state) is available for comparison.
   ``--replicates R`` runs every method in ``--replicate-methods`` R times from the same start
   with independent keys.
   Recorded per step: log_joint evaluations executed, seconds, the decoder-gradient norm (of the
   estimate, before the prior), meeting times (unbiased); at log-spaced n (averaged iterates) a
   count-sketch projection (``--sketch-dim``) of the averaged decoder and encoder parameters and
   the cheap objective (IS, K = ``--curve-k``, on the first ``--curve-images`` training images,
   fixed key, minus the prior term).
4. Averaging rate: the spread of the averaged iterate at n, sqrt of the trace of its covariance
   estimated from the sketches across replicates (R >= 2; with R = 1 the distance to the run's
   own final average instead), and the slope of log spread against log n (least squares over
   n >= ``--fit-from``), next to 1/alpha - 1 with alpha the Hill tail index (top 5%) of the
   run's meeting times and of its gradient norms, and next to -1/2.
   The same question at a fixed point, without the optimizer: at the shared start, ``--noise-draws``
   independent single-image gradient estimates of each of the first ``--noise-images`` images
   (IWAE-5, the coupled chains, MLMC, SUMO), each image's draws averaged in groups of
   n = 1, 2, 4, ... and paired group means of the same image differenced (the image's mean
   cancels): the spread of a group mean (root mean square, and the median norm, which follows the
   scale of a stable law where the sample variance does not) against n, with its slope;
   finite-variance noise gives -1/2 for both, alpha-stable noise 1/alpha - 1 for the median.
5. Scoring, for the start and each method's final averaged iterate (replicate 0): the training
   objective by AIS (``--ais-steps`` temperatures, ``--ais-chains`` chains, HMC) and by IS
   (``--is-k``; 1000 by default, as 5000 costs a seed ~25 more minutes on this CPU) on every
   training image, the AIS - IS gap, the paired per-image difference vs
   ``iwae5`` (mean +- SE over images), test log-likelihood by IS on the first ``--test-images``
   test images; across seeds mean +- SE over seeds.

Output (``--out``): ``settings.json``, ``seed<s>/phase1/``, ``seed<s>/phase2/<method>/rep<r>/``
(``state.pkl`` checkpoint, ``record.pkl`` when done), ``seed<s>/scores/<model>.json|.npz``,
``results.json`` (also ``--json``), ``results.md`` (tables), ``objective_vs_evals.png``,
``objective_vs_seconds.png``, ``spread_vs_n.png``, ``noise_vs_n.png``.

The defaults are sized from a pilot on a 2-core CPU (benchmarks/RESULTS.md, "Endgame"): one seed
~80-110 min there (phase 1 <= 20 min at 0.03 s/step; phase 2 ~13 s per step of all runs, IWAE-5
0.35 s, unbiased 1.4-3 s, IWAE-50 2.6 s per full-batch step, IWAE-500 about as much on its 100
images; scoring ~100-300 s per model).

    nice -n 5 python benchmarks/endgame.py --out runs/endgame --seeds 0 1 2 --resume
    python benchmarks/endgame.py --plan                 # every phase's resolved settings
    python benchmarks/endgame.py --quick --out /tmp/eg  # every code path, tiny (~20 s of CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.data import epoch_batches, load_dataset  # noqa: E402
from vaeml_jax.diagnostics import hill_tail_index  # noqa: E402
from vaeml_jax.evaluation import evaluate, importance_log_likelihood  # noqa: E402
from vaeml_jax.training import TrainConfig, build_vae  # noqa: E402
from vaeml_jax.training.optim import make_optimizer, set_learning_rate  # noqa: E402
from vaeml_jax.training.rundir import write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METHODS = ("iwae5", "unbiased", "iwae_matched", "iwae50", "iwae500")
DEFAULT_METHODS = METHODS
REFERENCE = "iwae5"  # the paired reference: IWAE-5 continued
RM_POWER = 0.6  # Robbins-Monro exponent: sum gamma = inf, sum gamma^2 < inf
_P2_STEPS: dict = {}  # compiled steps, shared by replicates and seeds
# Settings that define the trajectories: a resumed run must not change them.
TRAJECTORY_KEYS = (
    "dataset",
    "n_train",
    "hidden",
    "latent",
    "weight_decay",
    "p1_lr",
    "p1_batch",
    "p1_const_steps",
    "p1_t0",
    "p1_check_every",
    "p1_window",
    "p1_tol",
    "p1_max_steps",
    "optimizer",
    "gamma0",
    "t0",
    "steps",
    "burn_in",
    "batch",
    "iwae500_batch",
    "unbiased_particles",
    "max_iters",
    "precond_floor",
    "sketch_dim",
    "snapshots",
    "curve_images",
    "curve_k",
)
QUICK = dict(
    n_train=50,
    hidden=[16],
    latent=4,
    p1_batch=25,
    p1_const_steps=20,
    p1_t0=10,
    p1_check_every=10,
    p1_window=20,
    p1_tol=0.5,
    p1_max_steps=60,
    steps=12,
    burn_in=3,
    snapshots=5,
    sketch_dim=32,
    curve_images=50,
    curve_k=20,
    is_k=20,
    ais_steps=5,
    ais_chains=2,
    ais_adapt_chains=1,
    test_images=50,
    replicates=2,
    max_iters=100,
    noise_images=4,
    noise_draws=16,
    noise_methods=["iwae5", "unbiased"],
)


# --------------------------------------------------------------------------- settings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--out", default=str(REPO / "runs" / "endgame"))
    add("--json", default=None, help="also write the results JSON here")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    add("--resume", action="store_true", help="reuse finished pieces, continue partial ones")
    add("--plan", action="store_true", help="print the resolved settings and exit")
    add("--quick", action="store_true", help="tiny sizes: every code path in < 1 min")
    add("--data-dir", default=os.environ.get("VAEML_DATA_DIR"))
    add("--dataset", default="binarized_mnist", help="binarized_mnist: the static binarization")
    add("--compilation-cache", default=str(REPO / ".jax_cache"), help="'' to disable")
    # data and model
    add("--n-train", type=int, default=1000, help="N: the first N training images")
    add("--hidden", type=int, nargs="+", default=[200, 200])
    add("--latent", type=int, default=50)
    add("--weight-decay", type=float, default=None, help="lambda (default 1/N)")
    # phase 1
    add("--p1-lr", type=float, default=1e-3)
    add("--p1-batch", type=int, default=100)
    add("--p1-const-steps", type=int, default=3000)
    add("--p1-t0", type=float, default=1000.0)
    add("--p1-check-every", type=int, default=250)
    add("--p1-window", type=int, default=1000)
    add("--p1-tol", type=float, default=0.25, help="nats/image over the window")
    add("--p1-max-steps", type=int, default=40000)
    # phase 2
    add("--optimizer", choices=("precond_sgd", "sgd", "adam"), default="precond_sgd")
    add("--gamma0", type=float, default=1e-4)
    add("--t0", type=float, default=100.0)
    add("--steps", type=int, default=300)
    add("--burn-in", type=int, default=30)
    add("--batch", type=int, default=None, help="examples per step (default: all N)")
    add(
        "--iwae500-batch",
        type=int,
        default=100,
        help="IWAE-500's examples per step (a fresh random subset; 0: --batch)",
    )
    add("--unbiased-particles", type=int, default=5)
    add("--max-iters", type=int, default=1000)
    add("--precond-floor", type=float, default=0.5, help="quantile flooring sqrt(v)")
    add("--replicates", type=int, default=3)
    add("--replicate-methods", nargs="+", choices=METHODS, default=["iwae5", "unbiased"])
    add("--grad-rows", type=int, default=25000, help="examples x particles per gradient chunk")
    add("--checkpoint-every", type=int, default=25)
    add("--sketch-dim", type=int, default=256)
    add("--snapshots", type=int, default=20, help="log-spaced n at which the average is kept")
    add("--curve-images", type=int, default=200)
    add("--curve-k", type=int, default=100)
    add("--fit-from", type=int, default=10, help="smallest n of the slope fit")
    add("--noise-images", type=int, default=32, help="images of the fixed-point noise study")
    add("--noise-draws", type=int, default=128, help="gradient draws per image there")
    add("--noise-methods", nargs="+", choices=NOISE_METHODS, default=list(NOISE_METHODS))
    # scoring
    add("--is-k", type=int, default=1000)
    add("--ais-steps", type=int, default=100)
    add("--ais-chains", type=int, default=2)
    add("--ais-leapfrog", type=int, default=10)
    add("--ais-adapt-chains", type=int, default=1)
    add("--test-images", type=int, default=500)
    add("--eval-batch", type=int, default=100)
    # argparse fills only the attributes a namespace lacks: a QUICK key still holding the
    # sentinel after parsing was not given, so an explicit option wins over --quick even when
    # it equals the default
    unset = object()
    a = p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in QUICK}))
    for k, v in QUICK.items():
        if getattr(a, k) is unset:
            setattr(a, k, v if a.quick else p.get_default(k))
    if a.weight_decay is None:
        a.weight_decay = 1.0 / a.n_train
    if "iwae_matched" in a.methods and "unbiased" not in a.methods:
        p.error("iwae_matched needs unbiased (its S' is the unbiased run's evaluations)")
    if REFERENCE not in a.methods:
        p.error(f"{REFERENCE} is the paired reference: keep it in --methods")
    if not 0 <= a.burn_in < a.steps:
        p.error("--burn-in must be in [0, --steps)")
    a.methods = [m for m in METHODS if m in a.methods]  # unbiased before iwae_matched
    return a


def plan(a) -> dict:
    """Every phase's resolved settings (what ``--plan`` prints)."""
    n_avg = a.steps - a.burn_in
    return {
        "data": dict(dataset=a.dataset, n_train=a.n_train, test_images=a.test_images),
        "model": dict(hidden=a.hidden, latent=a.latent, weight_decay=a.weight_decay),
        "phase1": dict(
            estimator="iwae",
            S=5,
            optimizer="adam",
            lr=a.p1_lr,
            batch=a.p1_batch,
            const_steps=a.p1_const_steps,
            decay=f"lr/(1+(t-{a.p1_const_steps})/{a.p1_t0})^0.5",
            criterion=f"|IWAE-5 MAP objective(t) - objective(t-{a.p1_window})| < {a.p1_tol} nats,"
            f" all N images, fixed key, checked every {a.p1_check_every} steps",
            max_steps=a.p1_max_steps,
        ),
        "phase2": dict(
            methods=a.methods,
            optimizer=a.optimizer,
            step=f"{a.gamma0}/(1+t/{a.t0})^{RM_POWER}",
            steps=a.steps,
            burn_in=a.burn_in,
            batch={m: method_batch(a, m) for m in a.methods},
            unbiased_particles=a.unbiased_particles,
            max_iters=a.max_iters,
            replicates=a.replicates,
            replicate_methods=[m for m in a.replicate_methods if m in a.methods],
            snapshots_n=snapshot_ns(n_avg, a.snapshots).tolist(),
            sketch_dim=a.sketch_dim,
            curve=f"IS K={a.curve_k} on {a.curve_images} training images",
        ),
        "scoring": dict(
            ais=dict(
                num_steps=a.ais_steps,
                num_chains=a.ais_chains,
                leapfrog=a.ais_leapfrog,
                adapt_chains=a.ais_adapt_chains,
                images=a.n_train,
            ),
            is_k=a.is_k,
            test_images=a.test_images,
            models=["start", *a.methods],
        ),
        "seeds": a.seeds,
    }


def snapshot_ns(n_avg: int, count: int) -> np.ndarray:
    """Log-spaced numbers of averaged iterates 1..n_avg (always including n_avg)."""
    if n_avg < 1:
        return np.zeros(0, int)
    return np.unique(np.round(np.geomspace(1, n_avg, max(count, 2))).astype(int))


def method_batch(a, method: str) -> int:
    """Examples per phase-2 step: all N unless ``--batch`` (IWAE-500: ``--iwae500-batch``)."""
    if method == "iwae500" and a.iwae500_batch:
        return min(a.iwae500_batch, a.n_train)
    return a.batch or a.n_train


def method_particles(method: str, a, matched_s: int | None = None) -> int:
    if method == "unbiased":
        return a.unbiased_particles
    if method == "iwae_matched":
        assert matched_s is not None
        return matched_s
    return int(method.removeprefix("iwae"))


# --------------------------------------------------------------------------- small utilities


def save_pickle(path: Path, obj) -> None:
    """Atomic pickle of a pytree (device arrays moved to numpy first)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(jax.device_get(obj), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def stable_id(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def penalty(params, lam: float) -> float:
    """lambda/2 ||theta||^2 over the decoder (the parameters log p(x) depends on)."""
    sq = sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(params["decoder"]))
    return 0.5 * lam * sq


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(np.std(v, ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(np.mean(v)), se


def fmt(m: float, se: float, digits: int = 2) -> str:
    if not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f" +- {se:.{digits}f}" if np.isfinite(se) else "")


# --------------------------------------------------------------------------- data and model


def load_data(a) -> tuple[jax.Array, jax.Array]:
    ds = load_dataset(a.dataset, a.data_dir, binarization="static", seed=0)
    if a.n_train > ds.train.shape[0]:
        raise SystemExit(f"--n-train {a.n_train} > the {ds.train.shape[0]} training images")
    return jnp.asarray(ds.train[: a.n_train]), jnp.asarray(ds.test[: a.test_images])


def build_model(a):
    return build_vae(TrainConfig(hidden=tuple(a.hidden), latent_dim=a.latent))


def make_estimator(a, model, method: str, s: int):
    if method == "unbiased":
        return vj.make_unbiased_grad(model, num_particles=s, max_iters=a.max_iters)
    return vj.make_iwae_grad(model, num_particles=s)


def add_prior(grads, params, lam: float):
    """The prior's exact gradient (of the LOSS): + lambda * param, on every parameter."""
    return jax.tree.map(lambda g, p: g + lam * p, grads, params)


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def objective_estimate(vae, params, x, key, k: int, lam: float, batch: int) -> float:
    """mean_i IS_K(x_i) - lambda/2 ||theta||^2 (K = 5: the IWAE-5 MAP objective)."""
    ll = importance_log_likelihood(
        vae.model, params, x, key, num_samples=k, chunk_size=min(k, 500), batch_size=batch
    )
    return float(jnp.mean(ll)) - penalty(params, lam)


# --------------------------------------------------------------------------- phase 1


def p1_lr(a, step: int) -> float:
    """lr for ``--p1-const-steps`` steps, then lr / (1 + (t - const)/t0)^0.5."""
    if step < a.p1_const_steps:
        return a.p1_lr
    return a.p1_lr / (1.0 + (step - a.p1_const_steps) / a.p1_t0) ** 0.5


def make_p1_epoch(a, vae):
    """Jitted: one epoch of Adam steps on IWAE-5 (+ prior), lr given per step."""
    est = vj.make_iwae_grad(vae.model, num_particles=5)
    opt = make_optimizer()

    def body(carry, inp):
        params, opt_state = carry
        x, lr, key = inp
        grads, info = est(params, x, key)
        grads = add_prior(grads, params, a.weight_decay)
        opt_state = set_learning_rate(opt_state, lr)
        updates, new_opt = opt.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt)
        ok = all_finite(grads)  # a non-finite step leaves the state as it was
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, (params, opt_state))
        return new, jnp.mean(info["bound"])

    @jax.jit
    def epoch(params, opt_state, batches, lrs, keys):
        return jax.lax.scan(body, (params, opt_state), (batches, lrs, keys))

    return epoch, opt


def phase1(a, vae, train_x, seed: int, d: Path, log) -> dict:
    """IWAE-5 with Adam to its fixed point (the stated criterion); checkpointed at every check."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "done.json").exists():
        return load_pickle(d / "state.pkl")
    root = jax.random.key(seed)
    if "p1" not in _P2_STEPS:  # one compiled epoch for every seed
        _P2_STEPS["p1"] = make_p1_epoch(a, vae)
    epoch_fn, opt = _P2_STEPS["p1"]
    eval_key = jax.random.fold_in(root, 2)
    if (d / "state.pkl").exists():
        st = load_pickle(d / "state.pkl")
        log(f"  phase 1: resuming at step {st['step']}")
    else:
        params = vae.init(jax.random.fold_in(root, 0), data_mean=jnp.mean(train_x, 0))
        st = dict(params=params, opt_state=opt.init(params), step=0, epoch=0, checks=[])
        obj = objective_estimate(vae, params, train_x, eval_key, 5, a.weight_decay, a.eval_batch)
        st["checks"].append(dict(step=0, objective=obj, seconds=0.0))
    per_epoch = a.n_train // a.p1_batch
    t_start = time.perf_counter() - (st["checks"][-1]["seconds"] if st["checks"] else 0.0)
    converged = p1_converged(a, st["checks"])  # a resumed run may have stopped right there
    while st["step"] < a.p1_max_steps and not converged:
        ek = jax.random.fold_in(jax.random.fold_in(root, 1), st["epoch"])
        data_key, step_key = jax.random.split(ek)
        batches = epoch_batches(data_key, train_x, a.p1_batch, binarize=False)
        lrs = jnp.asarray([p1_lr(a, st["step"] + i) for i in range(per_epoch)], jnp.float32)
        keys = jax.random.split(step_key, per_epoch)
        (params, opt_state), _ = epoch_fn(st["params"], st["opt_state"], batches, lrs, keys)
        st.update(params=params, opt_state=opt_state, epoch=st["epoch"] + 1)
        st["step"] += per_epoch
        if st["step"] - st["checks"][-1]["step"] < a.p1_check_every:
            continue
        obj = objective_estimate(vae, params, train_x, eval_key, 5, a.weight_decay, a.eval_batch)
        st["checks"].append(
            dict(step=st["step"], objective=obj, seconds=time.perf_counter() - t_start)
        )
        converged = p1_converged(a, st["checks"])
        log(f"  phase 1 step {st['step']}: IWAE-5 MAP objective {obj:.3f}")
        save_pickle(d / "state.pkl", st)
    save_pickle(d / "state.pkl", st)
    summary = dict(
        steps=st["step"],
        converged=converged,
        objective=st["checks"][-1]["objective"],
        seconds=st["checks"][-1]["seconds"],
        checks=st["checks"],
    )
    write_json(d / "done.json", summary)
    return st


def p1_converged(a, checks: list[dict]) -> bool:
    """The stop rule: past the constant-lr phase, and the objective moved less than tol over the
    last window (compared with the latest check at least a window back)."""
    now = checks[-1]
    if now["step"] < a.p1_const_steps + a.p1_window:
        return False
    back = [c for c in checks if c["step"] <= now["step"] - a.p1_window]
    return bool(back) and abs(now["objective"] - back[-1]["objective"]) < a.p1_tol


# --------------------------------------------------------------------------- phase 2


def grad_chunk(n: int, s: int, rows: int) -> int:
    """The largest divisor of n with chunk * s <= rows (memory of IWAE-500 on all N at once)."""
    target = max(1, min(n, rows // max(s, 1)))
    return max(c for c in range(1, target + 1) if n % c == 0)


def make_full_grad(est, n: int, chunk: int):
    """The estimator over n examples in chunks: mean of the chunks' gradients (each a mean)."""
    nc = n // chunk

    def full_grad(params, x, key):
        if nc == 1:
            return est(params, x, key)
        xs = x.reshape(nc, chunk, *x.shape[1:])

        def body(acc, inp):
            g, info = est(params, inp[0], inp[1])
            keep = {k: info[k] for k in ("meeting_time", "capped", "num_log_joint_evals", "bound")}
            return jax.tree.map(jnp.add, acc, g), keep

        zero = jax.tree.map(jnp.zeros_like, params)
        g, infos = jax.lax.scan(body, zero, (xs, jax.random.split(key, nc)))
        info = dict(
            meeting_time=infos["meeting_time"].reshape(n, -1),
            capped=infos["capped"].reshape(n, -1),
            num_log_joint_evals=jnp.sum(infos["num_log_joint_evals"]),
            bound=infos["bound"].reshape(n),
        )
        return jax.tree.map(lambda v: v / nc, g), info

    return full_grad


def adam_second_moment(opt_state):
    """Adam's bias-corrected second moment v-hat from a ``make_optimizer`` state."""
    adam = opt_state.inner_state[0]
    count = jnp.asarray(adam.count, jnp.float32)
    return jax.tree.map(lambda v: v / (1.0 - 0.999**count), adam.nu)


def make_preconditioner(opt_state, floor_q: float):
    """1 / max(sqrt(v-hat), floor): fixed for phase 2. floor = the floor_q quantile of the
    POSITIVE sqrt(v-hat) (coordinates that never had a data gradient, e.g. encoder weights of
    pixels that are 0 in every image, have v = 0 and would otherwise get an infinite step; a
    low quantile still lets phase-1-quiet coordinates take steps that diverge)."""
    root = jax.tree.map(jnp.sqrt, adam_second_moment(opt_state))
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(root)])
    flat = flat[np.isfinite(flat) & (flat > 0)]
    floor = float(np.quantile(flat, floor_q)) if flat.size else 1.0
    return jax.tree.map(lambda r: 1.0 / jnp.maximum(r, floor), root), floor


def make_p2_step(a, est, n_batch: int, s: int):
    """Jitted phase-2 step: estimator on the batch, + prior, the optimizer's update, average
    (the preconditioner is an argument, not a constant baked into the compiled program)."""
    full_grad = make_full_grad(est, n_batch, grad_chunk(n_batch, s, a.grad_rows))
    opt = make_optimizer()

    def step(params, opt_state, avg, t, x, key, precond):
        grads, info = full_grad(params, x, key)
        gnorm = optax.global_norm(grads["decoder"])
        grads = add_prior(grads, params, a.weight_decay)
        lr = a.gamma0 * (1.0 + t / a.t0) ** -RM_POWER
        if a.optimizer == "adam":
            updates, new_opt = opt.update(grads, set_learning_rate(opt_state, lr), params)
        elif a.optimizer == "precond_sgd":
            updates, new_opt = jax.tree.map(lambda g, d: -lr * d * g, grads, precond), opt_state
        else:
            updates, new_opt = jax.tree.map(lambda g: -lr * g, grads), opt_state
        ok = all_finite(grads)  # a non-finite estimate is skipped (and counted)
        new_params = jax.tree.map(lambda p, u: jnp.where(ok, p + u, p), params, updates)
        new_opt = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_opt, opt_state)
        n = t + 1 - a.burn_in  # averaged iterates so far, this one included
        w = 1.0 / jnp.maximum(n, 1).astype(jnp.float32)
        avg = jax.tree.map(lambda m, p: jnp.where(n >= 1, m + w * (p - m), p), avg, new_params)
        metrics = dict(
            evals=info["num_log_joint_evals"],
            gnorm=gnorm,
            finite=ok,
            bound=jnp.mean(info["bound"]),
            meeting=info["meeting_time"][:, 0],
            capped=jnp.any(info["capped"], axis=1),
        )
        return new_params, new_opt, avg, metrics

    return jax.jit(step)


def cached_p2_step(a, vae, method: str, s: int, n_batch: int):
    """One compiled step per (method, S, batch), shared by replicates and seeds (the unbiased
    estimator's full-batch work queue takes minutes to compile on 2 cores)."""
    key = (method, s, n_batch)
    if key not in _P2_STEPS:
        _P2_STEPS[key] = make_p2_step(a, make_estimator(a, vae.model, method, s), n_batch, s)
    return _P2_STEPS[key]


class Sketch:
    """A fixed count-sketch projection y_b = sum_{j: h(j)=b} s_j v_j of a parameter group:
    linear, E||y||^2 = ||v||^2, and stored as two small index arrays instead of a matrix."""

    def __init__(self, tree, dim: int, seed: int = 12345):
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.parts = []
        for leaf in jax.tree.leaves(tree):
            size = int(np.prod(leaf.shape))
            self.parts.append((rng.integers(0, dim, size), rng.choice([-1.0, 1.0], size)))

    def jax(self):
        """The same projection as a traceable function of a tree of arrays."""
        parts = [(jnp.asarray(h), jnp.asarray(s, jnp.float32)) for h, s in self.parts]

        def project(tree):
            y = jnp.zeros(self.dim)
            for leaf, (h, s) in zip(jax.tree.leaves(tree), parts, strict=True):
                y = y + jax.ops.segment_sum(s * leaf.ravel(), h, self.dim)
            return y

        return project

    def __call__(self, tree) -> np.ndarray:
        y = np.zeros(self.dim)
        for leaf, (h, s) in zip(jax.tree.leaves(tree), self.parts, strict=True):
            np.add.at(y, h, s * np.asarray(leaf, np.float64).ravel())
        return y


def run_method(a, ctx: dict, method: str, rep: int, s: int, d: Path, log) -> dict:
    """One phase-2 run from the shared start; checkpointed every ``--checkpoint-every`` steps."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "record.pkl").exists():
        return load_pickle(d / "record.pkl")
    vae, start, train_x = ctx["vae"], ctx["start"], ctx["train_x"]
    n_batch = method_batch(a, method)
    step_fn = cached_p2_step(a, vae, method, s, n_batch)
    root = jax.random.fold_in(jax.random.fold_in(ctx["root"], stable_id(method)), rep)
    snaps = set(snapshot_ns(a.steps - a.burn_in, a.snapshots).tolist())
    curve_x = train_x[: a.curve_images]

    def curve_point(params) -> float:
        return objective_estimate(
            vae, params, curve_x, ctx["curve_key"], a.curve_k, a.weight_decay, a.eval_batch
        )

    if (d / "state.pkl").exists():
        st = load_pickle(d / "state.pkl")
        log(f"  {method} rep {rep}: resuming at step {st['t']}")
    else:
        st = dict(
            params=start["params"],
            opt_state=start["opt_state"],
            avg=start["params"],
            t=0,
            evals=[],
            seconds=[],
            gnorm=[],
            finite=[],
            bound=[],
            meeting=[],
            capped=[],
            snap_n=[],
            snap_dec=[],
            snap_enc=[],
            snap_last_dec=[],
            curve=[dict(step=0, evals=0, seconds=0.0, objective=curve_point(start["params"]))],
        )
    for t in range(st["t"], a.steps):
        key = jax.random.fold_in(root, t)
        if n_batch < a.n_train:  # a fresh random subset per step
            idx = jax.random.choice(jax.random.fold_in(key, 1), a.n_train, (n_batch,), False)
            x = train_x[idx]
        else:
            x = train_x
        t0 = time.perf_counter()
        params, opt_state, avg, m = step_fn(
            st["params"],
            st["opt_state"],
            st["avg"],
            jnp.asarray(t, jnp.float32),
            x,
            key,
            ctx["precond"],
        )
        m = jax.device_get(jax.block_until_ready(m))
        st["seconds"].append(time.perf_counter() - t0)
        st.update(params=params, opt_state=opt_state, avg=avg, t=t + 1)
        for k in ("evals", "gnorm", "finite", "bound"):
            st[k].append(m[k].item())
        if method == "unbiased":
            st["meeting"].append(np.minimum(m["meeting"], 65535).astype(np.uint16))
            st["capped"].append(int(np.sum(m["capped"])))
        if not np.isfinite(st["bound"][-1]):  # the iterate left the model's range: stop there
            st["diverged"] = t + 1
            log(f"  {method} rep {rep}: DIVERGED at step {t + 1} (non-finite bound)")
            break
        n = t + 1 - a.burn_in
        if n in snaps:
            st["snap_n"].append(n)
            st["snap_dec"].append(ctx["sketch_dec"](avg["decoder"]))
            st["snap_enc"].append(ctx["sketch_enc"](avg["encoder"]))
            st["snap_last_dec"].append(ctx["sketch_dec"](params["decoder"]))
            st["curve"].append(
                dict(
                    step=t + 1,
                    evals=int(np.sum(st["evals"])),
                    seconds=float(np.sum(st["seconds"])),
                    objective=curve_point(avg),
                )
            )
        if (t + 1) % a.checkpoint_every == 0 or t + 1 == a.steps:
            save_pickle(d / "state.pkl", st)
            log(
                f"  {method} rep {rep} step {t + 1}/{a.steps}: "
                f"{np.mean(st['seconds'][-a.checkpoint_every :]):.2f} s/step, "
                f"curve objective {st['curve'][-1]['objective']:.3f}"
            )
    save_pickle(d / "state.pkl", st)
    rec = finish_record(a, st, method, rep, s, n_batch)
    save_pickle(d / "record.pkl", rec)
    return rec


def finish_record(a, st: dict, method: str, rep: int, s: int, n_batch: int) -> dict:
    """The run's record: final parameters, per-step arrays, sketches, tail indices."""
    meeting = np.concatenate(st["meeting"]) if st["meeting"] else np.zeros(0)
    gnorm = np.asarray(st["gnorm"], np.float64)
    return dict(
        method=method,
        rep=rep,
        S=s,
        diverged=st.get("diverged"),
        steps=a.steps,
        batch=n_batch,
        avg=st["avg"],
        last=st["params"],
        evals=np.asarray(st["evals"], np.int64),
        seconds=np.asarray(st["seconds"]),
        gnorm=gnorm,
        finite=np.asarray(st["finite"]),
        bound=np.asarray(st["bound"]),
        evals_per_example_step=float(np.mean(st["evals"]) / n_batch),
        nonfinite_steps=int(np.sum(~np.asarray(st["finite"], bool))),
        capped_lanes=int(np.sum(st["capped"])) if st["capped"] else 0,
        meeting_tail_index=hill_tail_index(meeting) if meeting.size else float("nan"),
        meeting_mean=float(np.mean(meeting)) if meeting.size else float("nan"),
        meeting_max=int(np.max(meeting)) if meeting.size else 0,
        gnorm_tail_index=hill_tail_index(gnorm) if gnorm.size else float("nan"),
        snap_n=np.asarray(st["snap_n"]),
        snap_dec=np.asarray(st["snap_dec"]),
        snap_enc=np.asarray(st["snap_enc"]),
        snap_last_dec=np.asarray(st["snap_last_dec"]),
        curve=st["curve"],
    )


def phase2(a, ctx: dict, sd: Path, log) -> dict[str, list[dict]]:
    """Every method (and its replicates) from the shared start; unbiased before iwae_matched."""
    runs: dict[str, list[dict]] = {}
    matched_s = None
    for method in a.methods:
        s = method_particles(method, a, matched_s)
        reps = a.replicates if method in a.replicate_methods else 1
        runs[method] = []
        for r in range(reps):
            log(f"  phase 2: {method} (S={s}) replicate {r}")
            runs[method].append(run_method(a, ctx, method, r, s, sd / method / f"rep{r}", log))
        if method == "unbiased":  # S' = the unbiased run's executed evaluations per example
            matched_s = max(2, round(runs[method][0]["evals_per_example_step"]))
    return runs


# --------------------------------------------------------------------------- scoring


def score_model(a, ctx: dict, name: str, params, d: Path, log) -> dict:
    """AIS and IS on every training image, IS on the test images; cached per model."""
    settings = dict(
        ais_steps=a.ais_steps,
        ais_chains=a.ais_chains,
        ais_leapfrog=a.ais_leapfrog,
        ais_adapt_chains=a.ais_adapt_chains,
        is_k=a.is_k,
        test_images=a.test_images,
    )
    d.mkdir(parents=True, exist_ok=True)
    if (d / f"{name}.json").exists():
        old = json.loads((d / f"{name}.json").read_text())
        if old["settings"] == settings:
            return old | dict(np.load(d / f"{name}.npz"))
    vae, key = ctx["vae"], jax.random.fold_in(ctx["root"], 7)  # one key: paired across models
    pen = penalty(params, a.weight_decay)
    common = dict(batch_size=a.eval_batch, elbo_samples=1)
    ais = evaluate(
        vae.model,
        params,
        ctx["train_x"],
        jax.random.fold_in(key, 0),
        method="ais",
        num_steps=a.ais_steps,
        num_chains=a.ais_chains,
        leapfrog_steps=a.ais_leapfrog,
        adapt_chains=a.ais_adapt_chains,
        **common,
    )

    def importance_sampling(x, i):
        k = jax.random.fold_in(key, i)
        return evaluate(
            vae.model, params, x, k, method="is", num_samples=a.is_k,
            chunk_size=min(a.is_k, 500), **common,
        )  # fmt: skip

    is_ = importance_sampling(ctx["train_x"], 1)
    test = importance_sampling(ctx["test_x"], 2)
    res = dict(
        name=name,
        settings=settings,
        penalty=pen,
        objective_ais=ais["test_log_likelihood"] - pen,
        objective_is=is_["test_log_likelihood"] - pen,
        ais_minus_is=ais["test_log_likelihood"] - is_["test_log_likelihood"],
        test_ll_is=test["test_log_likelihood"],
        test_ll_is_se=test["test_log_likelihood_stderr"],
        seconds=dict(ais=ais["seconds"], is_train=is_["seconds"], is_test=test["seconds"]),
    )
    log(
        f"  scored {name}: AIS objective {res['objective_ais']:.3f}, AIS-IS "
        f"{res['ais_minus_is']:.3f}"
    )
    per = dict(
        ais_train=ais["per_example"], is_train=is_["per_example"], is_test=test["per_example"]
    )
    np.savez(d / f"{name}.tmp.npz", **per)
    os.replace(d / f"{name}.tmp.npz", d / f"{name}.npz")
    write_json(d / f"{name}.json", res)
    return res | per


def diverged_score(a, name: str, like: dict) -> dict:
    nan = float("nan")
    res = {k: nan for k in ("penalty", "objective_ais", "objective_is", "ais_minus_is")}
    per = {k: np.full_like(like[k], np.nan) for k in ("ais_train", "is_train", "is_test")}
    return res | per | dict(name=name, test_ll_is=nan, test_ll_is_se=nan, diverged=True)


# --------------------------------------------------------------------------- one seed


def run_seed(a, seed: int, vae, train_x, test_x, log) -> dict:
    sd = Path(a.out) / f"seed{seed}"
    log(f"seed {seed}: phase 1")
    start = phase1(a, vae, train_x, seed, sd / "phase1", log)
    precond, floor = make_preconditioner(start["opt_state"], a.precond_floor)
    root = jax.random.key(seed)
    ctx = dict(
        vae=vae,
        start=start,
        train_x=train_x,
        test_x=test_x,
        precond=precond,
        root=jax.random.fold_in(root, 3),
        curve_key=jax.random.fold_in(root, 4),
        sketch_dec=Sketch(start["params"]["decoder"], a.sketch_dim, seed=1),
        sketch_enc=Sketch(start["params"]["encoder"], a.sketch_dim, seed=2),
    )
    runs = phase2(a, ctx, sd / "phase2", log)
    noise = noise_averaging(a, ctx, sd / "noise.json", log)
    log(f"seed {seed}: scoring")
    scores = {"start": score_model(a, ctx, "start", start["params"], sd / "scores", log)}
    for method, reps in runs.items():
        if reps[0]["diverged"]:  # nothing to score: NaN rows, shown as n/a
            scores[method] = diverged_score(a, method, scores["start"])
        else:
            scores[method] = score_model(a, ctx, method, reps[0]["avg"], sd / "scores", log)
    p1 = json.loads((sd / "phase1" / "done.json").read_text())
    return dict(seed=seed, phase1=p1, precond_floor=floor, runs=runs, scores=scores, noise=noise)


NOISE_METHODS = ("iwae5", "unbiased", "mlmc", "sumo")  # S = n_0 = min_terms = 5 for every one
NOISE_CHUNK = 64  # single-image estimates per compiled call


def noise_averaging(a, ctx: dict, path: Path, log) -> dict:
    """Per method: ``noise_spread`` of single-image decoder-gradient estimates at the shared
    start (cached in ``path``, per method; the raw sketches beside it)."""
    res = json.loads(path.read_text()) if path.exists() else {}
    todo = [m for m in a.noise_methods if m not in res]
    if not todo:
        return res
    vae, params = ctx["vae"], ctx["start"]["params"]
    n_img, m = min(a.noise_images, a.n_train), a.noise_draws
    x = ctx["train_x"][:n_img]
    idx = np.repeat(np.arange(n_img), m)
    sketch = ctx["sketch_dec"].jax()
    for method in todo:
        if method == "unbiased":  # one lane per call: the plain loop (no queue to fill)
            est = vj.make_unbiased_grad(
                vae.model,
                num_particles=a.unbiased_particles,
                max_iters=a.max_iters,
                loop=vj.LoopOptions(num_slots=None),
            )
        elif method == "mlmc":
            est = vj.make_mlmc_grad(vae.model, num_particles=5)
        elif method == "sumo":  # base bound IWAE-5, as reproduce.py's sumo5
            est = vj.make_sumo_grad(vae.model, min_terms=5)
        else:
            est = vj.make_iwae_grad(vae.model, num_particles=5)

        def one(xi, key, est=est, chains=method == "unbiased"):
            g, info = est(params, xi[None], key)
            tau = info["meeting_time"][0, 0] if chains else jnp.zeros((), int)
            return sketch(g["decoder"]), tau, info["num_log_joint_evals"]

        chunk = jax.jit(jax.vmap(one))
        keys = jax.random.split(jax.random.fold_in(ctx["root"], 1000 + stable_id(method)), idx.size)
        t0 = time.perf_counter()
        ys, taus, evals = [], [], []
        for c in range(0, idx.size, NOISE_CHUNK):
            y, tau, ev = chunk(x[idx[c : c + NOISE_CHUNK]], keys[c : c + NOISE_CHUNK])
            ys.append(np.asarray(y, np.float64))
            taus.append(np.asarray(tau))
            evals.append(np.asarray(ev, np.float64))
        y = np.concatenate(ys).reshape(n_img, m, -1)
        np.save(path.with_name(f"noise_{method}.npy"), y.astype(np.float32))  # re-analysable
        tau = np.concatenate(taus)
        res[method] = noise_spread(y) | dict(
            evals_per_draw=float(np.mean(np.concatenate(evals))),
            seconds=time.perf_counter() - t0,
            alpha_tau=hill_tail_index(tau) if tau.max() > 0 else float("nan"),
            tau_mean=float(tau.mean()),
            tau_max=int(tau.max()),
        )
        log(
            f"  noise at the start, {method}: spread slope rms {res[method]['slope_sd']:.3f}, "
            f"median {res[method]['slope_median']:.3f} ({res[method]['seconds']:.0f} s)"
        )
        write_json(path, res)  # after each method: an interrupted study keeps the finished ones
    return res


def noise_spread(y: np.ndarray, min_pairs: int = 16) -> dict:
    """y: (images, draws, dim) sketched estimates. Each image's draws averaged in consecutive
    groups of n = 1, 2, 4, ..., and the differences of paired group means of the same image
    (its mean cancels; no centring by a sample mean, which heavy tails would contaminate),
    pooled over images while there are >= ``min_pairs``: the spread of a group mean is the
    difference's / sqrt(2), as its root mean square (keys ``*_sd``) and its median norm."""
    n_img, m, dim = y.shape
    ns, sd, med = [], [], []
    n, diffs1 = 1, None
    while n_img * ((m // n) // 2) >= min_pairs:
        k = (m // n) // 2 * 2
        g = y[:, : k * n].reshape(n_img, k, n, dim).mean(2)
        d = (g[:, 0::2] - g[:, 1::2]).reshape(-1, dim)
        norms = np.linalg.norm(d, axis=1) / math.sqrt(2)
        diffs1 = norms if diffs1 is None else diffs1
        ns.append(n)
        sd.append(float(np.sqrt(np.mean(norms**2))))
        med.append(float(np.median(norms)))
        n *= 2

    def slope(v) -> float:
        return float(np.polyfit(np.log(ns), np.log(v), 1)[0]) if len(ns) >= 2 else float("nan")

    return dict(
        n=ns,
        spread_sd=sd,
        spread_median=med,
        slope_sd=slope(sd),
        slope_median=slope(med),
        alpha_norm=hill_tail_index(diffs1) if diffs1 is not None else float("nan"),
    )


# --------------------------------------------------------------------------- analysis


def spreads(reps: list[dict]) -> tuple[np.ndarray, np.ndarray, str]:
    """(n, spread of the averaged decoder at n, kind): across replicates when there are >= 2,
    else the distance to the run's own final average."""
    k = min(len(r["snap_n"]) for r in reps)  # a diverged replicate stopped early
    n = reps[0]["snap_n"][:k]
    y = np.stack([r["snap_dec"][:k] for r in reps])  # (R, snaps, dim)
    if k == 0:
        return n, np.zeros(0), "none"
    if len(reps) >= 2:
        var = np.sum(np.var(y, axis=0, ddof=1), axis=-1)
        return n, np.sqrt(var), "replicates"
    dist = np.linalg.norm(y[0] - y[0][-1], axis=-1)
    return n[:-1], dist[:-1], "to final"


def fit_slope(n, spread, n_min: int) -> tuple[float, float]:
    """Least-squares slope of log spread on log n over n >= n_min, and its standard error."""
    keep = (n >= n_min) & (spread > 0)
    if keep.sum() < 3:
        return float("nan"), float("nan")
    x, y = np.log(n[keep]), np.log(spread[keep])
    coef = np.polyfit(x, y, 1)
    resid = y - np.polyval(coef, x)
    se = math.sqrt(np.sum(resid**2) / (x.size - 2) / np.sum((x - x.mean()) ** 2))
    return float(coef[0]), se


def rate_rows(a, seeds: list[dict]) -> list[dict]:
    """Per method: the slope of spread vs n (mean +- SE over seeds), the tail indices, 1/alpha-1."""
    rows = []
    for method in a.methods:
        slopes, kinds, a_tau, a_g = [], set(), [], []
        for s in seeds:
            reps = s["runs"][method]
            n, sp, kind = spreads(reps)
            slopes.append(fit_slope(n, sp, a.fit_from)[0])
            kinds.add(kind)
            a_tau += [r["meeting_tail_index"] for r in reps]
            a_g += [r["gnorm_tail_index"] for r in reps]
        at, ag = mean_se(a_tau), mean_se(a_g)
        rows.append(
            dict(
                method=method,
                spread=" / ".join(sorted(kinds)),
                slope=mean_se(slopes),
                alpha_tau=at,
                alpha_gnorm=ag,
                predicted_tau=1.0 / at[0] - 1.0 if at[0] > 1 else float("nan"),
                predicted_gnorm=1.0 / ag[0] - 1.0 if ag[0] > 1 else float("nan"),
            )
        )
    return rows


def noise_rows(seeds: list[dict]) -> list[dict]:
    """Per method: single-draw spreads, slopes of spread on n, tail indices (mean +- SE)."""
    rows = []
    for method in NOISE_METHODS:
        per = [s["noise"][method] for s in seeds if method in s["noise"]]
        if not per:
            continue
        at = mean_se([r["alpha_tau"] for r in per])
        an = mean_se([r["alpha_norm"] for r in per])
        rows.append(
            dict(
                method=method,
                seeds=len(per),
                evals=mean_se([r["evals_per_draw"] for r in per if r.get("evals_per_draw")]),
                n_max=min(r["n"][-1] for r in per),
                sd_1=mean_se([r["spread_sd"][0] for r in per]),
                median_1=mean_se([r["spread_median"][0] for r in per]),
                slope_sd=mean_se([r["slope_sd"] for r in per]),
                slope_median=mean_se([r["slope_median"] for r in per]),
                alpha_tau=at,
                alpha_norm=an,
                predicted_norm=1.0 / an[0] - 1.0 if an[0] > 1 else float("nan"),
            )
        )
    return rows


def score_rows(a, seeds: list[dict]) -> list[dict]:
    """Per model: the objectives, the AIS - IS gap, paired differences vs iwae5, test LL."""
    rows = []
    for name in ["start", *a.methods]:
        per_seed = [s["scores"][name] for s in seeds]
        ref = [s["scores"][REFERENCE] for s in seeds]
        diffs = [  # paired per image, AIS, objective (the prior term is a constant per model)
            (p["ais_train"] - p["penalty"]) - (r["ais_train"] - r["penalty"])
            for p, r in zip(per_seed, ref, strict=True)
        ]
        runs = [s["runs"].get(name, [None])[0] for s in seeds]
        rows.append(
            dict(
                model=name,
                diverged=[r["diverged"] for r in runs if r and r["diverged"]],
                S=None if runs[0] is None else runs[0]["S"],
                batch=None if runs[0] is None else runs[0]["batch"],
                evals_per_example_step=mean_se([r["evals_per_example_step"] for r in runs if r]),
                seconds=mean_se([float(np.sum(r["seconds"])) for r in runs if r]),
                objective_ais=mean_se([p["objective_ais"] for p in per_seed]),
                objective_is=mean_se([p["objective_is"] for p in per_seed]),
                ais_minus_is=mean_se([p["ais_minus_is"] for p in per_seed]),
                penalty=mean_se([p["penalty"] for p in per_seed]),
                diff_vs_ref_per_seed=[mean_se_images(dv) for dv in diffs],
                diff_vs_ref=mean_se([float(np.mean(dv)) for dv in diffs]),
                test_ll_is=mean_se([p["test_ll_is"] for p in per_seed]),
            )
        )
    return rows


def mean_se_images(d) -> tuple[float, float]:
    d = np.asarray(d, np.float64)
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0


def diverged_note(steps: list) -> str:
    return f" (diverged at step {', '.join(map(str, steps))})" if steps else ""


def markdown(a, seeds: list[dict], scores: list[dict], rates: list[dict], noise: list[dict]) -> str:
    ids = [s["seed"] for s in seeds]
    p1 = "; ".join(
        f"seed {s['seed']}: {s['phase1']['steps']} steps, "
        f"{'converged' if s['phase1']['converged'] else 'NOT converged'}, "
        f"IWAE-5 MAP objective {s['phase1']['objective']:.3f}"
        for s in seeds
    )
    lines = [
        "### The endgame on the paper's MLP",
        "",
        f"{a.dataset}, first {a.n_train} training images, MLP 784-{'-'.join(map(str, a.hidden))}"
        f"-{a.latent}, weight decay lambda = {a.weight_decay:g}; phase 1 IWAE-5 + Adam ({p1}); "
        f"phase 2 {a.optimizer}, gamma_t = {a.gamma0:g}/(1+t/{a.t0:g})^{RM_POWER}, "
        f"{a.steps} steps, "
        f"batch (per method below), Polyak average after {a.burn_in}; seeds {ids}, "
        f"mean +- SE over seeds. Objective = mean log p(x) - lambda/2 ||theta||^2 (nats/image): "
        f"AIS ({a.ais_steps} temperatures, {a.ais_chains} chains, {a.ais_leapfrog} leapfrog) and "
        f"IS (K = {a.is_k}) on all {a.n_train} training images; test LL: IS K = {a.is_k} on "
        f"{a.test_images} test images. prior term: lambda/2 ||theta||^2 (add it back for mean "
        f"log p(x)). diff vs {REFERENCE}: paired per image (AIS).",
        "",
        "| model | S | batch | evals/example/step | phase-2 s | objective AIS | objective IS "
        f"| AIS - IS | prior term | diff vs {REFERENCE} | per seed (mean +- SE over images) "
        "| test LL IS |",
        "|" + " --- |" * 12,
    ]
    for r in scores:
        per = ", ".join(fmt(*d, 3) for d in r["diff_vs_ref_per_seed"])
        lines.append(
            f"| {r['model']}{diverged_note(r['diverged'])} | {r['S'] or '-'} "
            f"| {r['batch'] or '-'} "
            f"| {fmt(*r['evals_per_example_step'], 1)} "
            f"| {fmt(*r['seconds'], 0)} | {fmt(*r['objective_ais'])} | {fmt(*r['objective_is'])} "
            f"| {fmt(*r['ais_minus_is'], 3)} | {fmt(*r['penalty'])} | {fmt(*r['diff_vs_ref'], 3)} "
            f"| {per} "
            f"| {fmt(*r['test_ll_is'])} |"
        )
    lines += [
        "",
        "#### Averaging rate: spread of the averaged decoder against n",
        "",
        f"Spread = sqrt(trace Cov) of a {a.sketch_dim}-dim count sketch of the averaged decoder "
        f"(across replicates from the same start, or the distance to the run's final average "
        f"with one replicate); slope of log spread on log n for n >= {a.fit_from}. alpha: Hill "
        "tail index (top 5%) of the meeting times (tau) and of the decoder-gradient norms "
        "(|g|); finite-variance noise gives -0.5, alpha-stable noise 1/alpha - 1.",
        "",
        "| method | spread | slope | alpha tau | 1/alpha - 1 | alpha abs g | 1/alpha - 1 |",
        "|" + " --- |" * 7,
    ]
    for r in rates:
        lines.append(
            f"| {r['method']} | {r['spread']} | {fmt(*r['slope'])} | {fmt(*r['alpha_tau'])} "
            f"| {fmt(r['predicted_tau'], float('nan'))} | {fmt(*r['alpha_gnorm'])} "
            f"| {fmt(r['predicted_gnorm'], float('nan'))} |"
        )
    lines += [
        "",
        "#### Averaging the gradient noise at the shared start",
        "",
        f"{a.noise_draws} single-image decoder-gradient estimates of each of the first "
        f"{a.noise_images} training images, averaged per image in groups of n = 1, 2, 4, ..., "
        f"{noise[0]['n_max'] if noise else '-'}; spread of a group mean from the differences of "
        "paired group means of the same image (sketch): root mean square and median norm; "
        "slopes of log spread on log n (-0.5 for finite-variance noise, 1/alpha - 1 for the "
        "median under alpha-stable noise). alpha: Hill tail index (top 5%) of the meeting "
        "times and of the single-draw noise norms (differences of two draws).",
        "",
        "| estimator | seeds | evals / draw | rms, n = 1 | median, n = 1 | slope rms "
        "| slope median | alpha tau | alpha noise | 1/alpha - 1 |",
        "|" + " --- |" * 10,
    ]
    for r in noise:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {fmt(*r['evals'], 1)} "
            f"| {fmt(*r['sd_1'], 1)} | {fmt(*r['median_1'], 1)} "
            f"| {fmt(*r['slope_sd'])} | {fmt(*r['slope_median'])} | {fmt(*r['alpha_tau'])} "
            f"| {fmt(*r['alpha_norm'])} | {fmt(r['predicted_norm'], float('nan'))} |"
        )
    return "\n".join(lines) + "\n"


def plots(a, seeds: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, fname in (
        ("evals", "cumulative log_joint evaluations / N", "objective_vs_evals.png"),
        ("seconds", "cumulative seconds (phase 2 steps)", "objective_vs_seconds.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, method in enumerate(a.methods):
            for j, s in enumerate(seeds):
                c = s["runs"][method][0]["curve"]
                x = np.asarray([p[xkey] for p in c], float)
                x = x / a.n_train if xkey == "evals" else x  # compute: minibatch runs count less
                # seeds sit nats apart: each curve is drawn as its gain over its own start
                y = np.asarray([p["objective"] for p in c]) - c[0]["objective"]
                ax.plot(x[1:], y[1:], color=f"C{i}", alpha=0.8, label=method if j == 0 else None)
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(
            f"objective - start's, IS K={a.curve_k}, {a.curve_images} images\n"
            f"(nats/image; one line per seed, replicate 0)"
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        paths.append(str(out / fname))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, method in enumerate(a.methods):
        for j, s in enumerate(seeds):
            n, sp, kind = spreads(s["runs"][method])
            # a single run's distance to its own final average falls to 0 by construction:
            # only the spread across replicates is a rate
            if n.size and kind == "replicates":
                ax.plot(n, sp, "o-", ms=3, color=f"C{i}", label=method if j == 0 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n (averaged iterates)")
    ax.set_ylabel("spread of the averaged decoder across replicates\n(sketch; one line per seed)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spread_vs_n.png", dpi=110)
    plt.close(fig)
    paths.append(str(out / "spread_vs_n.png"))
    if any(s.get("noise") for s in seeds):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, method in enumerate(NOISE_METHODS):
            for j, s in enumerate(seeds):
                r = s.get("noise", {}).get(method)
                if r:
                    n, med = np.asarray(r["n"], float), np.asarray(r["spread_median"], float)
                    label = method if j == 0 else None
                    ax.plot(n, med / med[0], "o-", ms=3, color=f"C{i}", label=label)
        n_ref = np.asarray([1.0, 64.0])
        ax.plot(n_ref, n_ref**-0.5, "k--", lw=0.8, label="n^-1/2 (finite variance)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n (draws averaged per image)")
        ax.set_ylabel("median spread of the mean of n draws / at n = 1\n(one line per seed)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "noise_vs_n.png", dpi=110)
        plt.close(fig)
        paths.append(str(out / "noise_vs_n.png"))
    return paths


def summarize(a, seeds: list[dict]) -> dict:
    out = Path(a.out)
    scores, rates, noise = score_rows(a, seeds), rate_rows(a, seeds), noise_rows(seeds)
    md = markdown(a, seeds, scores, rates, noise)
    write_atomic(out / "results.md", md)
    res = dict(
        settings=plan(a),
        scores=scores,
        rates=rates,
        noise=noise,
        noise_per_seed={s["seed"]: s["noise"] for s in seeds},
        plots=plots(a, seeds, out),
        phase1={s["seed"]: s["phase1"] for s in seeds},
        runs={
            s["seed"]: {m: [run_summary(r) for r in reps] for m, reps in s["runs"].items()}
            for s in seeds
        },
    )
    write_json(out / "results.json", res)
    if a.json:
        write_json(Path(a.json), res)
    print(md, flush=True)
    return res


def run_summary(r: dict) -> dict:
    keep = (
        "method",
        "rep",
        "S",
        "diverged",
        "steps",
        "batch",
        "evals_per_example_step",
        "nonfinite_steps",
        "capped_lanes",
        "meeting_tail_index",
        "meeting_mean",
        "meeting_max",
        "gnorm_tail_index",
        "curve",
    )
    return {k: r[k] for k in keep} | dict(seconds=float(np.sum(r["seconds"])))


# --------------------------------------------------------------------------- main


def check_out(a, out: Path) -> None:
    """A fresh --out, or --resume with the same trajectory settings."""
    saved = out / "settings.json"
    mine = {k: getattr(a, k) for k in TRAJECTORY_KEYS}
    if saved.exists():
        if not a.resume:
            raise SystemExit(f"{out} holds a run: pass --resume to continue it, or another --out")
        old = json.loads(saved.read_text())
        # a key newer than the saved settings (absent there) is taken as given
        diff = [k for k in TRAJECTORY_KEYS if k in old and old[k] != mine[k]]
        if diff:
            raise SystemExit(f"--resume with other settings than {saved}: {diff}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(saved, mine)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.plan:
        p = plan(a)
        print(json.dumps(p, indent=1))
        return {"plan": p}
    if a.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", a.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    out = Path(a.out)
    check_out(a, out)

    def log(msg: str) -> None:
        print(msg, flush=True)

    train_x, test_x = load_data(a)
    vae = build_model(a)
    seeds = [run_seed(a, s, vae, train_x, test_x, log) for s in a.seeds]
    return summarize(a, seeds)


if __name__ == "__main__":
    main()
