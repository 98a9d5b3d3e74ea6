r"""Proposal quality by encoder family and encoder objective .

A small MNIST VAE (``--hidden``, ``--latent``) is trained for ``--steps`` Adam steps (lr
``--lr``, batch ``--batch``, dynamic binarization, the first ``--train-examples`` training images)
with the IWAE-S gradient (``make_iwae_grad``, S = ``--num-particles``) under each configuration
of ``--configs`` (``encoder:objective[:K]``, e.g. ``diag:iwae``, ``diag:iwae_dreg``, ``diag:chi2``,
``diag:chi2:100`` (the encoder objective on K = 100 draws of its own, ``encoder_particles``),
``full_cov:iwae``, ``iaf:iwae``, or ``diag:iwae+chi2``: the first objective for the first half
of the steps, the second after, a warm start). Same seed, initial decoder and data order for all.

Then, on ``--eval-examples`` held-out test images (binarized once, seed 0), K = ``--eval-samples``
draws z_k ~ q(z|x) per image (log q from the forward pass, ``VAE.sample_with_log_proposal``) give

* ``std log w``: the standard deviation of log w = log p(x, z) - log q(z|x) under q, per image,
  averaged over images (the quantity that drives CIS meeting times: smaller is better);
* ``ESS/K``: the importance-sampling effective sample size (sum w)^2 / (K sum w^2), averaged;
* ``log p(x)``: the IS estimate log (1/K) sum_k w_k, averaged over the images (+- its SE over
  images);
* ``s/step``: median wall seconds of a training step after compilation;
* meeting times of the unbiased estimator's coupled CIS chains on the same images
  (``make_unbiased_grad``, S = ``--tau-particles``, ``--tau-chains`` chains per image,
  ``max_iters`` = ``--max-iters``): mean, 99th percentile, max and the capped fraction. Each
  configuration trains its own decoder too, so this compares (decoder, proposal) pairs.

``--dreg-variance S1,S2,..`` adds the encoder-gradient variance of ``"iwae"`` against
``"iwae_dreg"`` at initialisation (diag encoder, the first ``--batch`` training images binarized
once, R = ``--replicates`` keys): tr Cov of the encoder gradient for each S.

Markdown on stdout; ``--json`` to save. ``--quick`` is a smoke run (a few steps, tiny sizes).

    PYTHONPATH=. VAEML_DATA_DIR=../shared/data python benchmarks/proposals.py
    PYTHONPATH=. VAEML_DATA_DIR=../shared/data python benchmarks/proposals.py --quick

Reference: Kingma et al. (NeurIPS 2016) IAF; Tucker et al. (ICLR 2019) DReG; Dieng et al.
(NeurIPS 2017) CUBO.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import logsumexp

import vaeml_jax as vj
from vaeml_jax import data as vdata
from vaeml_jax.models import build_vae

DEFAULT_CONFIGS = "diag:iwae,diag:iwae_dreg,diag:chi2,diag:chi2:100,full_cov:iwae,iaf:iwae"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-particles", type=int, default=5)
    p.add_argument("--train-examples", type=int, default=5000)
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--hidden", default="200,200")
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--iaf-layers", type=int, default=2)
    p.add_argument("--iaf-hidden", default="100")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau-particles", type=int, default=10)
    p.add_argument("--tau-chains", type=int, default=4)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--json", default=None)
    p.add_argument("--dreg-variance", default="", help="S values, e.g. 5,50 (empty: skip)")
    p.add_argument("--replicates", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few steps")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.batch, a.train_examples = 3, 20, 200
        a.eval_examples, a.eval_samples = 5, 50
        a.hidden, a.latent, a.iaf_hidden = "32", 4, "16"
        a.replicates = 4
        a.tau_chains, a.max_iters = 1, 50
    return a


def widths(s: str) -> tuple[int, ...]:
    return tuple(int(w) for w in s.split(",") if w)


def evaluate_proposal(vae, params, x_eval, key, num_samples: int) -> dict:
    """std of log w under q, ESS/K and the IS log-likelihood on x_eval (N, D), K draws each."""

    @jax.jit
    def one(xi, k):
        z, lq = vae.sample_with_log_proposal(params, xi, k, num_samples)
        lj = jax.vmap(lambda zz: vae.log_joint(params, xi, zz))(z)
        lw = lj - lq
        ll = logsumexp(lw) - math.log(num_samples)
        ess = jnp.exp(2 * logsumexp(lw) - logsumexp(2 * lw)) / num_samples
        return jnp.std(lw), ess, ll

    keys = jax.random.split(key, x_eval.shape[0])
    out = [one(xi, k) for xi, k in zip(x_eval, keys, strict=True)]
    std, ess, ll = (np.array([float(o[i]) for o in out]) for i in range(3))
    return {
        "std_log_w": float(std.mean()),
        "ess_frac": float(ess.mean()),
        "log_px": float(ll.mean()),
        "log_px_se": float(ll.std(ddof=1) / math.sqrt(len(ll))) if len(ll) > 1 else 0.0,
    }


def meeting_times(vae, params, x_eval, key, args) -> dict:
    """Meeting times of the unbiased estimator (H_{0:0}) on x_eval: mean, p99, max, capped."""
    est = vj.make_unbiased_grad(
        vae.model,
        num_particles=args.tau_particles,
        num_chains=args.tau_chains,
        max_iters=args.max_iters,
        encoder_objective=None,
        loop=vj.LoopOptions(num_slots=max(1, x_eval.shape[0] * args.tau_chains // 4)),
    )
    _, info = jax.jit(est)(params, x_eval, key)
    tau = np.asarray(info["meeting_time"]).ravel()
    return {
        "tau_mean": float(tau.mean()),
        "tau_p99": float(np.percentile(tau, 99)),
        "tau_max": int(tau.max()),
        "capped_frac": float(np.asarray(info["capped"]).mean()),
    }


def run_config(encoder, objective, encoder_particles, args, train, x_eval, data_mean) -> dict:
    vae = build_vae(
        hidden=widths(args.hidden),
        latent_dim=args.latent,
        encoder=encoder,
        iaf_layers=args.iaf_layers,
        iaf_hidden=widths(args.iaf_hidden),
    )
    key = jax.random.key(args.seed)
    k_init, k_data, k_train, k_eval = jax.random.split(key, 4)
    params = vae.init(k_init, data_mean=data_mean)
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    def make_step(obj):
        est = vj.make_iwae_grad(
            vae.model,
            num_particles=args.num_particles,
            encoder_objective=obj,
            encoder_particles=encoder_particles,
        )

        @jax.jit
        def step(params, opt_state, x, k):
            grads, info = est(params, x, k)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, jnp.mean(info["bound"])

        return step

    phases = objective.split("+")  # "a+b": a for the first half of the steps, then b
    steps = [make_step(o) for o in phases]

    batches_per_epoch = train.shape[0] // args.batch
    times, bounds = [], []
    batches = None
    for i in range(args.steps):
        j = i % batches_per_epoch
        if j == 0:
            batches = vdata.epoch_batches(jax.random.fold_in(k_data, i), train, args.batch)
        t0 = time.perf_counter()
        step = steps[min(i * len(steps) // args.steps, len(steps) - 1)]
        k = jax.random.fold_in(k_train, i)
        params, opt_state, bound = step(params, opt_state, batches[j], k)
        bound = float(bound)  # blocks
        times.append(time.perf_counter() - t0)
        bounds.append(bound)
    res = evaluate_proposal(vae, params, x_eval, k_eval, args.eval_samples)
    if math.isfinite(res["std_log_w"]):
        res.update(meeting_times(vae, params, x_eval, jax.random.fold_in(k_eval, 1), args))
    first = {-(-i * args.steps // len(steps)) for i in range(len(steps))}  # compile steps
    steady = [t for i, t in enumerate(times) if i not in first] or times
    res.update(
        encoder=encoder,
        objective=objective + (f" (K={encoder_particles})" if encoder_particles else ""),
        sec_per_step=float(np.median(steady)),
        compile_s=float(times[0]),
        train_bound_last50=float(np.mean(bounds[-50:])),
        finite=bool(np.all(np.isfinite(bounds))),
    )
    return res


def dreg_variance(args, train, data_mean) -> list[dict]:
    """tr Cov of the encoder gradient, IWAE vs DReG, at initialisation, per S."""
    vae = build_vae(hidden=widths(args.hidden), latent_dim=args.latent)
    params = vae.init(jax.random.key(args.seed), data_mean=data_mean)
    x = jnp.asarray(vdata.binarize_static(np.asarray(train[: args.batch]), seed=0))
    keys = jax.random.split(jax.random.key(args.seed + 1), args.replicates)
    out = []
    for S in widths(args.dreg_variance):
        row = {"S": S}
        for obj in ("iwae", "iwae_dreg"):
            est = vj.make_iwae_grad(vae.model, num_particles=S, encoder_objective=obj)
            fn = jax.jit(lambda k, est=est: est(params, x, k)[0]["encoder"])
            g = [jax.tree.leaves(fn(k)) for k in keys]
            flat = np.stack([np.concatenate([np.ravel(a) for a in gi]) for gi in g])
            row[obj] = float(flat.var(axis=0, ddof=1).sum())
        row["ratio"] = row["iwae"] / row["iwae_dreg"]
        out.append(row)
        print(f"# S={S}: tr Cov iwae {row['iwae']:.4g}, dreg {row['iwae_dreg']:.4g}")
    return out


def main(argv=None):
    args = parse_args(argv)
    ds = vdata.load_dataset("mnist")
    train = jnp.asarray(ds.train[: args.train_examples])
    x_eval = jnp.asarray(vdata.binarized_test_set(ds, seed=0)[: args.eval_examples])
    data_mean = np.asarray(ds.train[: args.train_examples]).mean(0)
    rows = []
    t_all = time.perf_counter()
    for cfg in filter(None, args.configs.split(",")):
        encoder, objective, *k = cfg.split(":")
        k = int(k[0]) if k else None
        rows.append(run_config(encoder, objective, k, args, train, x_eval, data_mean))
        r = rows[-1]
        print(f"# done {cfg}: {r['sec_per_step']:.4f} s/step, std log w {r['std_log_w']:.2f}")
    total = time.perf_counter() - t_all

    print(
        f"\nMNIST VAE hidden {args.hidden}, latent {args.latent}, IWAE-{args.num_particles}, "
        f"{args.steps} Adam steps (lr {args.lr}, batch {args.batch}) on {args.train_examples} "
        f"images; eval: {args.eval_examples} test images x K={args.eval_samples} draws; "
        f"IAF {args.iaf_layers} steps, MADE hidden {args.iaf_hidden}. Total {total:.0f} s.\n"
    )
    print(
        "| encoder | objective | std log w | ESS/K | IS log p(x) (K) | s/step | train bound "
        "| tau mean / p99 / max | capped |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not (r["finite"] and math.isfinite(r["std_log_w"])):
            print(f"| {r['encoder']} | {r['objective']} | diverged (non-finite log w) | | | "
                  f"{r['sec_per_step']:.4f} | |")  # fmt: skip
            continue
        print(
            f"| {r['encoder']} | {r['objective']} | {r['std_log_w']:.2f} | {r['ess_frac']:.3f} "
            f"| {r['log_px']:.2f} +- {r['log_px_se']:.2f} | {r['sec_per_step']:.4f} "
            f"| {r['train_bound_last50']:.2f} | {r['tau_mean']:.2f} / {r['tau_p99']:.0f} / "
            f"{r['tau_max']} | {r['capped_frac']:.4f} |"
        )
    var_rows = dreg_variance(args, train, data_mean) if args.dreg_variance else []
    if var_rows:
        print(
            f"\nEncoder-gradient variance at init (diag encoder, batch {args.batch}, "
            f"R={args.replicates}): tr Cov\n"
        )
        print("| S | iwae | iwae_dreg | ratio |\n|---|---|---|---|")
        for r in var_rows:
            print(f"| {r['S']} | {r['iwae']:.4g} | {r['iwae_dreg']:.4g} | {r['ratio']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            out = {"args": vars(args), "rows": rows, "variance": var_rows, "total_s": total}
            json.dump(out, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
