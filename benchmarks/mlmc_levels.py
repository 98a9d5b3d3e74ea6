r"""The MLMC level differences on the MNIST VAE: E||Delta_l||^2 and Var(Delta_l) against l.

For the IWAE paper's one-layer MNIST VAE (``vaeml_jax.training.build_vae`` with the default
config: 784-200-200-50, Bernoulli decoder, diagonal Gaussian encoder) trained with IWAE-5
(Adam, lr 1e-3, batch 100, dynamically binarized MNIST) for ``--warmup-steps`` steps, and at
each of the ``--checkpoints`` steps on the way (0 = the initialization), this measures for a
fixed set of ``--examples`` training images (binarized once) and level l = 0..``--max-level``:

* the decoder part of Delta_l = Y_l - (Y_{l-1}(first half) + Y_{l-1}(second half)) / 2, with
  Y_l the self-normalised IWAE theta-gradient of n_0 2^l draws (``vaeml_jax.estimators.mlmc``'s
  own coefficients), on ONE sequence of n_0 2^L draws per replicate (every level a prefix, as
  the estimator does), for ``--replicates`` independent replicates per example;
* M2_l = E||Delta_l||^2 and tr Cov(Delta_l) (averaged over the examples), and the decay exponent
  b of M2_l ~ 2^(-b l): the OLS slope of log2 M2_l over l >= ``--fit-from``, its standard error
  by a bootstrap over replicates. The single-term estimator's variance sum_l M2_l / P(L = l) is
  finite iff b > r (and its cost iff r > 1): with b ~ 2 any 1 < r < 2 works, with b <= 1 none does;
* the tail of ||Delta_l|| / P(L = l) (r = ``--rate``): its mean, 99th percentile and maximum
  over the replicates, the size of the single term at level l.

Outputs: ``--json`` (default ``runs/mlmc_levels/mlmc_levels.json``) and a markdown table on
stdout. ``--seeds 0 1 2`` repeats everything (training included) per seed. ``--train-examples``
restricts the warm-up to the first N training images (the measured images are the first
``--examples`` either way).

    python benchmarks/mlmc_levels.py --seeds 0 1 2                     # the recorded run
    python benchmarks/mlmc_levels.py --seeds 0 1 2 --train-examples 10000 --warmup-steps 800 \
        --checkpoints 800 --json runs/mlmc_levels/recipe_warm_start.json   # the recipe's warm start
    python benchmarks/mlmc_levels.py --quick --json /tmp/mlmc.json     # smoke run (a minute)

Reference: Shi & Cornish, "On Multilevel Monte Carlo Unbiased Gradient Estimation for Deep
Latent Variable Models", AISTATS 2021.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from reproduce import machine_info  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.data import binarize_static, load_dataset  # noqa: E402
from vaeml_jax.estimators import mlmc as M  # noqa: E402
from vaeml_jax.training import TrainConfig, build_vae  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--warmup-steps", type=int, default=3000)
    p.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="warm up on the first N training images only (default: all); the decoder bias "
        "starts at their mean. 10000 with --warmup-steps 800 is the warm start of the default "
        "recipe in recipe_check.sh (8 of 10 epochs of 100 steps)",
    )
    p.add_argument(
        "--encoder-objective",
        default="iwae",
        help="what trains q during the warm-up (make_iwae_grad's encoder_objective)",
    )
    p.add_argument("--checkpoints", type=int, nargs="+", default=None, help="default: 0 and W")
    p.add_argument("--num-particles", type=int, default=5, help="n_0")
    p.add_argument("--max-level", type=int, default=6)
    p.add_argument("--rate", type=float, default=1.5)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--replicates", type=int, default=64)
    p.add_argument("--replicate-batch", type=int, default=16)
    p.add_argument("--fit-from", type=int, default=2)
    p.add_argument("--json", default=str(REPO / "runs" / "mlmc_levels" / "mlmc_levels.json"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    a = p.parse_args(argv)
    if a.quick:
        a.warmup_steps, a.max_level, a.examples, a.replicates = 20, 3, 2, 16
        a.replicate_batch, a.fit_from = 8, 1
    if a.checkpoints is None:
        a.checkpoints = sorted({0, a.warmup_steps})
    return a


def train_iwae(vae, params, train, steps_to, seed, log, encoder_objective="iwae"):
    """IWAE-5 (encoder by ``encoder_objective``), Adam 1e-3, batch 100, dynamic binarization;
    yields (step, params) at each step in ``steps_to``."""
    est = vj.make_iwae_grad(vae.model, num_particles=5, encoder_objective=encoder_objective)
    opt = optax.adam(1e-3)
    state = opt.init(params)
    train = jnp.asarray(train)

    @jax.jit
    def step(params, state, key):
        k_idx, k_bin, k_est = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (100,), 0, train.shape[0])
        x = jax.random.bernoulli(k_bin, train[idx]).astype(jnp.float32)
        grads, info = est(params, x, k_est)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, jnp.mean(info["bound"])

    key = jax.random.key(1000 + seed)
    done, bounds = 0, []
    t0 = time.time()
    for target in steps_to:
        while done < target:
            params, state, b = step(params, state, jax.random.fold_in(key, done))
            bounds.append(float(b)) if done % 100 == 0 else None
            done += 1
        log(
            f"  seed {seed}: step {done}, IWAE-5 train bound (last logged) "
            f"{bounds[-1] if bounds else float('nan'):.2f}, {time.time() - t0:.0f} s"
        )
        yield done, params, (bounds[-1] if bounds else None)


def level_differences(vae, params, x, key, cfg, n_rep):
    """||Delta_l||^2 (n_rep, L+1) and the sum of Delta_l over the replicates (L+1, P) for one x;
    level 0's entry is Y_0 itself."""
    lmax, n0 = cfg.max_level, cfg.num_particles
    n = n0 * 2**lmax
    p_prob = M.mlmc_level_probabilities(cfg.rate, lmax)
    frozen_enc = jax.lax.stop_gradient(params)

    def one(k):
        z = jax.lax.stop_gradient(vae.model.sample_proposal(frozen_enc, x, k, n))
        lq = jax.vmap(vae.model.log_proposal, (None, None, 0))(frozen_enc, x, z)

        def lj_fn(dec):
            p = {**params, "decoder": dec}
            return jax.vmap(vae.model.log_joint, (None, None, 0))(p, x, z)

        lj, vjp = jax.vjp(lj_fn, params["decoder"])
        lw = (lj - lq)[None]
        levels = jnp.arange(lmax + 1, dtype=jnp.int32)
        c = jax.vmap(lambda lev: M._coefficients(lw, lev[None], cfg)[0])(levels)
        w = jnp.asarray(1.0 / p_prob, c.dtype)
        d = jnp.concatenate([c[:1], (c[1:] - c[:1]) / w[1:, None]])  # Y_0, Delta_1..L

        def flat(ct):
            (g,) = vjp(ct)
            return jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])

        return jax.lax.map(flat, d)  # (L+1, P), one backward pass per level

    return jax.vmap(one)(jax.random.split(key, n_rep))


def measure(vae, params, xs, cfg, a, seed, log):
    fn = jax.jit(lambda x, k: level_differences(vae, params, x, k, cfg, a.replicate_batch))
    sq, sums, t0 = [], [], time.time()
    for i, x in enumerate(xs):
        s_ex, sum_ex = [], None
        for r in range(0, a.replicates, a.replicate_batch):
            key = jax.random.fold_in(jax.random.key(7 + seed), i * 100_000 + r)
            g = np.asarray(fn(x, key), np.float64)  # (R_b, L+1, P)
            s_ex.append(np.sum(g**2, axis=-1))
            sum_ex = g.sum(0) if sum_ex is None else sum_ex + g.sum(0)
        sq.append(np.concatenate(s_ex))
        sums.append(sum_ex)
    log(f"    measured {len(xs)} examples x {a.replicates} replicates in {time.time() - t0:.0f} s")
    sq = np.stack(sq)  # (E, R, L+1)
    R = sq.shape[1]
    m2 = sq.mean(axis=(0, 1))
    mean_sq = np.stack([np.sum((s / R) ** 2, axis=-1) for s in sums])  # (E, L+1)
    tr_cov = (R / (R - 1) * (sq.mean(1) - mean_sq)).mean(0)
    levels = np.arange(cfg.max_level + 1)
    fit = levels >= max(a.fit_from, 1)

    def slope(s):
        return -np.polyfit(levels[fit], np.log2(s.mean(axis=(0, 1))[fit]), 1)[0]

    rng = np.random.default_rng(seed)
    boot = [slope(sq[:, rng.integers(0, R, R)]) for _ in range(200)]
    p_prob = M.mlmc_level_probabilities(cfg.rate, cfg.max_level)
    ratio = np.sqrt(sq) / p_prob[None, None, :]  # ||Delta_l|| / P(L = l)
    flat = ratio.reshape(-1, cfg.max_level + 1)
    return {
        "m2": m2.tolist(),
        "tr_cov": tr_cov.tolist(),
        "decay_exponent": float(slope(sq)),
        "decay_exponent_se": float(np.std(boot, ddof=1)),
        "single_term_second_moment_partial": np.cumsum((m2 / p_prob)[1:]).tolist(),
        "ratio_mean": flat.mean(0).tolist(),
        "ratio_p99": np.quantile(flat, 0.99, axis=0).tolist(),
        "ratio_max": flat.max(0).tolist(),
    }


def main(argv=None):
    a = parse(argv)

    def log(msg):
        print(msg, flush=True)

    cfg = M._check_config(a.num_particles, a.rate, a.max_level, "single_term")
    ds = load_dataset("mnist", a.data_dir)
    train = np.asarray(ds.train, np.float32)
    xs = jnp.asarray(binarize_static(train[: a.examples], seed=0))
    if a.train_examples is not None:
        train = train[: a.train_examples]
    vae = build_vae(TrainConfig().resolved())
    out = {
        "machine": machine_info(),
        "command": "python benchmarks/mlmc_levels.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(a),
        "runs": [],
    }
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        params = vae.init(jax.random.key(seed), data_mean=jnp.asarray(train.mean(0)))
        warmup = train_iwae(vae, params, train, a.checkpoints, seed, log, a.encoder_objective)
        for step, p, bound in warmup:
            row = {"seed": seed, "step": step, "train_bound": bound}
            row.update(measure(vae, p, xs, cfg, a, seed, log))
            out["runs"].append(row)
            path.write_text(json.dumps(out, indent=1))
            log(
                f"  seed {seed} step {step}: decay exponent b = {row['decay_exponent']:.2f} "
                f"(SE {row['decay_exponent_se']:.2f}); log2 M2_l "
                + " ".join(f"{np.log2(v):.2f}" for v in row["m2"])
            )
    lmax = a.max_level
    shown = sorted({1, min(3, lmax), lmax})
    log(
        f"\n| seed | step | b (SE), l = {max(a.fit_from, 1)}..{lmax} "
        f"| log2 E||Delta_l||^2, l = 0..{lmax} "
        f"| log10 sum_(l<={lmax}) E||Delta_l||^2 / P(L=l), r = {a.rate:g} "
        f"| max (p99) ||Delta_l||/P(L=l), l = {' / '.join(map(str, shown))} |"
    )
    log("| --- | --- | --- | --- | --- | --- |")
    for r in out["runs"]:
        tail = " / ".join(f"{r['ratio_max'][lv]:.3g} ({r['ratio_p99'][lv]:.3g})" for lv in shown)
        log(
            f"| {r['seed']} | {r['step']} | {r['decay_exponent']:.2f} "
            f"({r['decay_exponent_se']:.2f})"
            f" | {' '.join(f'{np.log2(v):.1f}' for v in r['m2'])}"
            f" | {np.log10(r['single_term_second_moment_partial'][-1]):.2f} | {tail} |"
        )
    log(f"\nwritten {path}")


if __name__ == "__main__":
    main()
