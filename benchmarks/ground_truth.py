r"""Estimators against exact maximum likelihood: where does training with each end?

Four models whose log-likelihood is exact (``vaeml_jax.ground_truth``):

* **pPCA** (D = 6, d = 1, N = 200 synthetic points, s = 0.5) with a proposal that cannot match the
  posterior: the fixed-variance amortised encoder q(z|x) = N(A x + c, sigma0^2 I), sigma0 = 1
  (the posterior std is ~0.3), or ``--ppca-proposal prior``. The ML fit is closed-form (Tipping &
  Bishop 1999). Optimizer: SGD with the Robbins-Monro schedule gamma_t = lr / (1 + t/100)^0.6 and
  full-batch steps: with unbiased gradients this converges to the ML fit and the Polyak average of
  the last half of the iterates has the optimal 1/T covariance, so what remains at the end is the
  estimator's bias, if any (Adam's constant step would leave a noise floor set by the step).
* **VAE, 2-D latent** on the first 300 statically binarized MNIST training images OR-pooled to
  14x14, Bernoulli MLP decoder (2-32-196, tanh), Gaussian MLP encoder; log p(x) and its gradient by
  the midpoint rule on a 100 x 100 grid over [-5, 5]^2 (checked against a 200 x 200 grid). Adam
  (lr 3e-3, minibatch 50): the non-convex network is trained the usual way; the last-half Polyak
  average is reported too.

* **Logistic factor model, 1-D latent** (``--models lfa``): the VAE above with a linear decoder,
  logits = W z + b, on the first 100 statically binarized MNIST training images OR-pooled to 7x7
  (the pixels that vary over them), and the fixed-width proposal N(mu_phi(x), 1) (no encoder can
  match the posterior). log p(x) and its gradient on a 400-point grid over [-6, 6]. Unlike the
  MLP decoder (which keeps improving for >10^4 steps as it memorises), its maximum-likelihood
  problem is well posed: full-batch Adam with the Robbins-Monro step 0.05/(1+t/500)^0.6 for 5,000
  steps and the Polyak average converge, so the exact-gradient run gives the optimum and every
  other run is judged by its distance to it (log-likelihood gap, decoder distance, and the norm of
  the exact gradient, zero at a maximum).

* **Deep decoder, 1-D latent** (``--models deep``): a Bernoulli MLP decoder with two tanh hidden
  layers (1-16-16-P) on the lfa data, with weight decay lambda/2 ||theta||^2 on every decoder
  parameter (default lambda = 0.1 per image): the MAP objective (1/N) sum_i log p(x_i) -
  lambda/2 ||theta||^2 has a finite maximiser (without the penalty the decoder memorises the
  images and never converges), and at this lambda the exact-gradient runs from different
  initialisations end at the same one (smaller lambdas gave several local optima). It is not the
  only local maximum: the decoder that ignores z (posterior collapse, where the fixed-width
  proposal is exact and every bound tight) is another, and a run from a random start may end
  there; ``--deep-start optimum`` starts every method at the exact optimum instead. Every
  estimator gets the penalty's exact gradient added (an unbiased one stays unbiased). Proposal
  N(mu_phi(x), 1), fixed width as for lfa; same grid, optimizer and averaging as lfa; the table
  states whether the exact run met the convergence criterion (|grad| < 1e-3 and a drift of the
  averaged objective < 1e-5 nats/image over the last 10% of the steps).

Every method gets the same initialization, data, optimizer, steps and seeds: the exact gradient
(the limit), the ELBO, IWAE-S for several S, the unbiased estimator (H_{0:0} and H_{2:6}), the
MLMC-debiased IWAE gradient of Shi & Cornish (2021; ``--mlmc`` n0 values, roulette and single
term), and the compute-matched IWAE: IWAE-S with S the mean executed evaluations per example per
step of the MLMC and H_{0:0} rows (``--matched``).
Prints markdown tables (mean +- SE over seeds), writes ``--json`` and PNG curves
(``benchmarks/plots/ground_truth_*.png``; a ``--quick`` run writes under ``runs/`` instead).

    python benchmarks/ground_truth.py                 # the RESULTS.md runs (~11 CPU-minutes)
    python benchmarks/ground_truth.py --models lfa    # the logistic factor model only (~4 CPU-min)
    python benchmarks/ground_truth.py --models deep   # the deep decoder (~11-17 min wall, 2 cores)
    python benchmarks/ground_truth.py --quick         # smoke run (compile-bound)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vaeml_jax import ground_truth as G
from vaeml_jax.estimators import (
    LoopOptions,
    make_elbo_grad,
    make_iwae_grad,
    make_mlmc_grad,
    make_unbiased_grad,
)

REPO = Path(__file__).resolve().parents[1]


def _methods(model, iwae_s, unbiased, num_slots=None, mlmc=(), blocks_per_step=None):
    out = [("exact", "-", "-", None), ("elbo", 1, "-", make_elbo_grad(model))]
    out += [(f"iwae-{s}", s, "-", make_iwae_grad(model, num_particles=s)) for s in iwae_s]
    for s, k, m in unbiased:
        loop = LoopOptions(num_slots=num_slots)
        est = make_unbiased_grad(model, num_particles=s, k=k, m=m, loop=loop)
        out.append((f"unbiased-{s} H{k}:{m}", s, f"{k}:{m}", est))
    for n0, kind, rate, lmax in mlmc:
        est = make_mlmc_grad(
            model,
            num_particles=n0,
            rate=rate,
            max_level=lmax,
            estimator=kind,
            blocks_per_step=blocks_per_step,
        )
        out.append((f"mlmc-{n0} {kind}", n0, "-", est))
    return out


def _matched_iwae(model, rows, iwae_s, sources):
    """IWAE-S with S = the mean executed evaluations per example per step of each row whose name
    starts with one of ``sources`` (rounded), unless that S was run already: the bound at the
    same cost."""
    done, out = set(iwae_s), []
    for r in rows:
        if not r["method"].startswith(sources):
            continue
        s = max(1, int(round(float(np.mean(r["evals_per_example_step"])))))
        if s in done:
            continue
        done.add(s)
        out.append((f"iwae-{s} (= {r['method']})", s, "-", make_iwae_grad(model, num_particles=s)))
    return out


def _with_matched(methods, model, rows, args):
    """Yield ``methods``, then the compute-matched IWAE runs of the rows they appended to
    ``rows`` (read after the last one has run)."""
    yield from methods
    yield from _matched_iwae(model, rows, args.iwae_s, tuple(args.matched))


def _method_notes(args):
    notes = []
    if args.mlmc:
        notes.append(
            f"mlmc-n0 = the MLMC-debiased IWAE gradient (Shi & Cornish 2021): level l uses "
            f"n0 2^l draws, the level L has P(L = l) proportional to 2^(-{args.mlmc_rate:g} l), "
            f"capped at {args.mlmc_max_level}; roulette = Y_0 + sum_(l<=L) Delta_l / P(L >= l), "
            "single_term = Y_0 + Delta_L / P(L = l); IWAE encoder objective on the first n0 "
            "draws; N/4 blocks per loop step (evaluations executed, padding included)."
        )
    if args.matched:
        notes.append(
            "iwae-S (= X): the compute-matched bound, S = X's mean executed log_joint "
            "evaluations per example per step, rounded."
        )
    return (" " + " ".join(notes)) if notes else ""


def _mean_se(a):
    a = np.asarray(a, np.float64)
    if a.size < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


def _fmt(a, digits=4):
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)):  # a run whose parameters overflowed (a gradient spike)
        return f"diverged ({int(np.sum(~np.isfinite(a)))}/{a.size} seeds)"
    m, se = _mean_se(a)
    if math.isnan(se):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} +- {se:.2g}"


def _run_method(
    estimator,
    init_fn,
    x,
    optimizer,
    steps,
    seeds,
    record,
    record_every,
    batch_size,
    init_params=None,
):
    """Train one method on every seed (vmapped): from ``init_fn(key(seed))``, or from
    ``init_params`` (stacked over seeds) where given."""

    def one(seed_key, init):
        params = init_fn(init) if init_params is None else init
        return G.fit(
            estimator,
            params,
            x,
            optimizer,
            steps,
            seed_key,
            batch_size=batch_size,
            record=record,
            record_every=record_every,
        )

    run = jax.jit(jax.vmap(one))
    keys = jnp.stack([jax.random.key(1000 + s) for s in seeds])
    inits = jnp.stack([jax.random.key(s) for s in seeds]) if init_params is None else init_params
    t0 = time.perf_counter()
    res = jax.block_until_ready(run(keys, inits))
    return res, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# pPCA
# ------------------------------------------------------------------------------------------------


def run_ppca(args):
    D, d, N = args.ppca_dim, 1, args.ppca_n
    gt = G.ppca(D, d, args.ppca_proposal, args.sigma0)
    true = G.ppca_init(
        jax.random.key(12345), D, d, args.noise, args.weight_scale, proposal=args.ppca_proposal
    )
    x = G.ppca_sample(jax.random.key(54321), true, N)
    fit = G.ppca_ml_fit(x, d)

    def init_fn(key):  # a random decoder; the encoder at its posterior mean map
        return G.ppca_init(key, D, d, 1.0, 0.3, proposal=args.ppca_proposal)

    def record(p):
        dist = G.ppca_distance(p, fit, x)
        return {"gap": dist["loglik_gap"], "dist": dist["param"], "s2": dist["s2"]}

    optimizer = optax.sgd(G.robbins_monro(args.ppca_lr))
    rows, curves = [], {}
    methods = _methods(gt.model, args.iwae_s, args.unbiased, mlmc=args.mlmc, blocks_per_step=N // 4)
    for name, s, km, est in _with_matched(methods, gt.model, rows, args):
        est = G.make_exact_grad(gt) if est is None else est
        res, secs = _run_method(
            est, init_fn, x, optimizer, args.ppca_steps, args.seeds, record, args.record_every, None
        )
        tr = {k: np.asarray(v, np.float64) for k, v in res.trace.items()}  # (R, records)
        curves[name] = {k: v.tolist() for k, v in tr.items()}
        mt = np.asarray(res.mean_meeting_time)
        row = {
            "method": name,
            "S": s,
            "k:m": km,
            "ll": fit["log_likelihood"] - tr["gap"][:, -1],
            "gap": tr["gap"][:, -1],
            "gap_avg": tr["avg_gap"][:, -1],
            "dist": tr["dist"][:, -1],
            "dist_avg": tr["avg_dist"][:, -1],
            "s2_avg": tr["avg_s2"][:, -1],
            "meeting_mean": mt.mean(axis=1),
            "meeting_max": np.asarray(res.max_meeting_time).max(axis=1),
            "evals_per_example_step": np.asarray(res.log_joint_evals) / (N * args.ppca_steps),
            "seconds": secs,
        }
        rows.append(row)
        print(f"  ppca {name}: {secs:.1f} s", file=sys.stderr, flush=True)
    return {"fit": {k: np.asarray(v).tolist() for k, v in fit.items()}, "rows": rows}, curves


def ppca_table(res, args):
    fit = res["fit"]
    lines = [
        f"pPCA D={args.ppca_dim}, d=1, N={args.ppca_n}, proposal {args.ppca_proposal}"
        + (f" (sigma0 = {args.sigma0})" if args.ppca_proposal == "fixed_encoder" else "")
        + f"; SGD gamma_t = {args.ppca_lr}/(1+t/100)^0.6, full batch, {args.ppca_steps} steps, "
        f"Polyak average of the last half; seeds {args.seeds}; mean +- SE over seeds. ML fit: "
        f"log-lik {fit['log_likelihood']:.4f} nats/point, s^2* = {fit['s2']:.4f}, "
        f"lambda_1 = {fit['eigenvalues'][0]:.4f}. gap = log-lik(ML) - log-lik (nats/point); "
        "dist = ||(W W^T, b, s^2) - ML||; last = final iterate, avg = Polyak average."
        + _method_notes(args),
        "",
        "| method | S | k:m | log-lik (last) | gap (last) | gap (avg) | dist (last) | dist (avg) "
        "| s^2 - s^2* (avg) | mean meeting time | log_joint evals / example / step | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['S']} | {r['k:m']} | {_fmt(r['ll'], 6)} | {_fmt(r['gap'], 3)} "
            f"| {_fmt(r['gap_avg'], 3)} | {_fmt(r['dist'], 3)} | {_fmt(r['dist_avg'], 3)} "
            f"| {_fmt(r['s2_avg'], 3)} | {_fmt(r['meeting_mean'], 3)} "
            f"| {_fmt(r['evals_per_example_step'], 3)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# VAE with a 2-D latent
# ------------------------------------------------------------------------------------------------


def _grid_gap(res, x, grid, fine, num_seeds):
    """The largest coarse-vs-fine quadrature difference over every seed's last and averaged
    iterate (nats per image)."""
    return max(
        G.grid_resolution_gap(jax.tree.map(lambda a, i=i: a[i], p), x, grid, fine)
        for p in (res.params, res.averaged)
        for i in range(num_seeds)
    )


def run_vae(args):
    x = jnp.asarray(G.downsampled_binarized_mnist(args.vae_n, args.data_dir))
    grid = G.uniform_grid(2, args.grid, 5.0)
    gt = G.grid_vae(grid)

    def init_fn(key):
        return G.grid_vae_init(key, x.shape[1], 2, args.hidden)

    def record(p):
        return {"ll": G.exact_log_likelihood(gt, p, x)}

    def exact_grad_norm(p):
        g, _ = G.make_exact_grad(gt)(p, x)
        return jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g["decoder"])))

    grad_norms = jax.jit(jax.vmap(exact_grad_norm))
    fine = G.uniform_grid(2, 2 * args.grid, 5.0)
    optimizer = optax.adam(args.vae_lr)
    rows, curves, exact_ll = [], {}, None
    for name, s, km, est in _methods(gt.model, args.iwae_s, args.unbiased):
        est = G.make_exact_grad(gt) if est is None else est
        res, secs = _run_method(
            est,
            init_fn,
            x,
            optimizer,
            args.vae_steps,
            args.seeds,
            record,
            args.record_every,
            args.vae_batch,
        )
        tr = {k: np.asarray(v, np.float64) for k, v in res.trace.items()}
        if exact_ll is None:
            exact_ll = tr  # the exact-gradient run comes first
        curves[name] = {k: v.tolist() for k, v in tr.items()}
        grid_gap = _grid_gap(res, x, grid, fine, len(args.seeds))
        rows.append(
            {
                "method": name,
                "S": s,
                "k:m": km,
                "ll": tr["ll"][:, -1],
                "ll_avg": tr["avg_ll"][:, -1],
                "gap": exact_ll["ll"][:, -1] - tr["ll"][:, -1],
                "gap_avg": exact_ll["avg_ll"][:, -1] - tr["avg_ll"][:, -1],
                "grad_norm": np.asarray(grad_norms(res.params)),
                "grad_norm_avg": np.asarray(grad_norms(res.averaged)),
                "meeting_mean": np.asarray(res.mean_meeting_time).mean(axis=1),
                "meeting_max": np.asarray(res.max_meeting_time).max(axis=1),
                "evals_per_example_step": np.asarray(res.log_joint_evals)
                / (args.vae_batch * args.vae_steps),
                "grid_gap": grid_gap,
                "seconds": secs,
            }
        )
        print(f"  vae {name}: {secs:.1f} s", file=sys.stderr, flush=True)
    return {"rows": rows}, curves


def _decoder_distance(p, ref):
    """||(W, b) - (W*, b*)|| of a linear decoder, minimised over the sign of z (the prior is
    symmetric, so (W, b) and (-W, b) give the same model): (R,) for stacked seeds."""
    w, b = p["decoder"][0]["w"], p["decoder"][0]["b"]
    w_ref, b_ref = ref["decoder"][0]["w"], ref["decoder"][0]["b"]
    sq_b = jnp.sum((b - b_ref) ** 2, axis=-1)
    plus = jnp.sum((w - w_ref) ** 2, axis=(-2, -1))
    minus = jnp.sum((w + w_ref) ** 2, axis=(-2, -1))
    return jnp.sqrt(sq_b + jnp.minimum(plus, minus))


def run_lfa(args):
    """The 1-D-latent logistic factor model (linear decoder): full-batch Adam with a
    Robbins-Monro step and the Polyak average, to convergence."""
    x = G.downsampled_binarized_mnist(args.lfa_n, args.data_dir, size=args.lfa_size)
    # A pixel constant over the data has its ML bias at +-infinity: keep the varying ones.
    mean = x.mean(0)
    x = jnp.asarray(x[:, (mean > 0) & (mean < 1)])
    grid = G.uniform_grid(1, args.lfa_grid, 6.0)
    fine = G.uniform_grid(1, 4 * args.lfa_grid, 6.0)
    gt = G.grid_vae(grid, args.lfa_proposal_std)
    exact_grad = G.make_exact_grad(gt)

    def init_fn(key):
        return G.grid_vae_init(key, x.shape[1], 1, 0, args.lfa_encoder_hidden)

    def record(p):
        g, _ = exact_grad(p, x)
        norm = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g["decoder"])))
        return {"ll": G.exact_log_likelihood(gt, p, x), "grad_norm": norm}

    optimizer = optax.adam(G.robbins_monro(args.lfa_lr, args.lfa_decay))
    rows, curves, ref = [], {}, None
    # The work queue (same estimate as the plain loop) because the batch is the whole data set.
    methods = _methods(
        gt.model,
        args.iwae_s,
        args.unbiased,
        num_slots=x.shape[0] // 4,
        mlmc=args.mlmc,
        blocks_per_step=x.shape[0] // 4,
    )
    for name, s, km, est in _with_matched(methods, gt.model, rows, args):
        res, secs = _run_method(
            exact_grad if est is None else est,
            init_fn,
            x,
            optimizer,
            args.lfa_steps,
            args.seeds,
            record,
            args.record_every_lfa,
            None,
        )
        tr = {k: np.asarray(v, np.float64) for k, v in res.trace.items()}
        if ref is None:  # the exact-gradient run comes first: its averaged iterate is the optimum
            ref = (tr, res.averaged)
        curves[name] = {k: v.tolist() for k, v in tr.items()}
        grid_gap = _grid_gap(res, x, grid, fine, len(args.seeds))
        rows.append(
            {
                "method": name,
                "S": s,
                "k:m": km,
                "ll_avg": tr["avg_ll"][:, -1],
                "gap_avg": ref[0]["avg_ll"][:, -1] - tr["avg_ll"][:, -1],
                "dist_avg": np.asarray(_decoder_distance(res.averaged, ref[1])),
                "grad_norm_avg": tr["avg_grad_norm"][:, -1],
                "ll_drift": tr["avg_ll"][:, -1] - tr["avg_ll"][:, -2],
                "meeting_mean": np.asarray(res.mean_meeting_time).mean(axis=1),
                "evals_per_example_step": np.asarray(res.log_joint_evals)
                / (x.shape[0] * args.lfa_steps),
                "grid_gap": grid_gap,
                "seconds": secs,
            }
        )
        print(f"  lfa {name}: {secs:.1f} s", file=sys.stderr, flush=True)
    return {"rows": rows, "pixels": int(x.shape[1])}, curves


# ------------------------------------------------------------------------------------------------
# Deep decoder (1-D latent, two hidden layers) with weight decay: a finite MAP optimum
# ------------------------------------------------------------------------------------------------


def _deep_data(args):
    x = G.downsampled_binarized_mnist(args.deep_n, args.data_dir, size=args.deep_size)
    mean = x.mean(0)  # as for lfa: keep the pixels that vary over the images
    return jnp.asarray(x[:, (mean > 0) & (mean < 1)])


def _align_first_layer(p, ref):
    """||theta - theta*|| over every decoder parameter with the sign of z aligned (z -> -z flips
    the first layer's weights and nothing else): (R,) for stacked seeds."""
    dec, dec_ref = p["decoder"], ref["decoder"]
    rest = sum(
        jnp.sum((a - b) ** 2, axis=tuple(range(1, a.ndim)))
        for a, b in zip(jax.tree.leaves(dec[1:]), jax.tree.leaves(dec_ref[1:]), strict=True)
    )
    rest = rest + jnp.sum((dec[0]["b"] - dec_ref[0]["b"]) ** 2, axis=-1)
    plus = jnp.sum((dec[0]["w"] - dec_ref[0]["w"]) ** 2, axis=(-2, -1))
    minus = jnp.sum((dec[0]["w"] + dec_ref[0]["w"]) ** 2, axis=(-2, -1))
    return jnp.sqrt(rest + jnp.minimum(plus, minus))


def _logit_distance(dec, dec_ref, grid):
    """The prior-weighted RMS distance of two decoders' logits over the grid nodes,
    sqrt(sum_g w_g mean_j (f(z_g)_j - f*(z_g)_j)^2), minimised over the sign of z: a distance
    between the functions, blind to the hidden units' permutation and sign symmetries. The grid
    is symmetric, so f*(-z_g) is f*(z) read backwards."""
    w = jax.nn.softmax(grid.log_w)
    f, f_ref = G._mlp(dec, grid.z), G._mlp(dec_ref, grid.z)
    plus = jnp.sum(w * jnp.mean((f - f_ref) ** 2, -1))
    minus = jnp.sum(w * jnp.mean((f - f_ref[::-1]) ** 2, -1))
    return jnp.sqrt(jnp.minimum(plus, minus))


def run_deep(args):
    """The 1-D-latent VAE with a two-hidden-layer decoder and weight decay on it: the exact MAP
    optimum by quadrature, every estimator plus the penalty's exact gradient, full-batch Adam with
    a Robbins-Monro step and the Polyak average, to convergence."""
    x = _deep_data(args)
    lam = args.deep_wd
    grid = G.uniform_grid(1, args.deep_grid, 6.0)
    fine = G.uniform_grid(1, 4 * args.deep_grid, 6.0)
    gt = G.grid_vae(grid, args.deep_proposal_std)
    exact_grad = G.with_weight_decay(G.make_exact_grad(gt), lam)
    hidden = tuple(args.deep_hidden)

    def init_fn(key):
        return G.grid_vae_init(key, x.shape[1], 1, hidden, args.deep_encoder_hidden)

    def record(p):
        g, _ = exact_grad(p, x)
        norm = jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g["decoder"])))
        ll = G.exact_log_likelihood(gt, p, x)
        return {"obj": ll - 0.5 * lam * G.decoder_sq_norm(p), "ll": ll, "grad_norm": norm}

    optimizer = optax.adam(G.robbins_monro(args.deep_lr, args.deep_decay))
    start_optimizer = optax.adam(G.robbins_monro(args.deep_start_lr, args.deep_decay))
    rows, curves, ref = [], {}, None
    methods = _methods(
        gt.model,
        args.iwae_s,
        args.unbiased,
        num_slots=x.shape[0] // 4,
        mlmc=args.mlmc,
        blocks_per_step=x.shape[0] // 4,
    )
    n_rec = args.deep_steps // args.record_every_deep
    i90 = n_rec - 1 - max(1, n_rec // 10)  # the record 10% of the steps before the end
    logit_dist = jax.jit(jax.vmap(lambda a, b: _logit_distance(a, b, grid)))
    for name, s, km, est in _with_matched(methods, gt.model, rows, args):
        res, secs = _run_method(
            exact_grad if est is None else G.with_weight_decay(est, lam),
            init_fn,
            x,
            optimizer if ref is None or args.deep_start == "random" else start_optimizer,
            args.deep_steps,
            args.seeds,
            record,
            args.record_every_deep,
            None,
            None if ref is None or args.deep_start == "random" else ref[1],
        )
        tr = {k: np.asarray(v, np.float64) for k, v in res.trace.items()}
        if ref is None:  # the exact-gradient run comes first: its averaged iterate is the optimum
            ref = (tr, res.averaged)
        curves[name] = {k: v.tolist() for k, v in tr.items()}
        rows.append(
            {
                "method": name,
                "S": s,
                "k:m": km,
                "obj_avg": tr["avg_obj"][:, -1],
                "ll_avg": tr["avg_ll"][:, -1],
                "gap_avg": ref[0]["avg_obj"][:, -1] - tr["avg_obj"][:, -1],
                "dist_avg": np.asarray(_align_first_layer(res.averaged, ref[1])),
                "logit_dist_avg": np.asarray(
                    logit_dist(res.averaged["decoder"], ref[1]["decoder"])
                ),
                "grad_norm_avg": tr["avg_grad_norm"][:, -1],
                "drift": tr["avg_obj"][:, -1] - tr["avg_obj"][:, i90],
                "sq_norm": np.asarray(jax.vmap(G.decoder_sq_norm)(res.averaged)),
                "meeting_mean": np.asarray(res.mean_meeting_time).mean(axis=1),
                "evals_per_example_step": np.asarray(res.log_joint_evals)
                / (x.shape[0] * args.deep_steps),
                "grid_gap": _grid_gap(res, x, grid, fine, len(args.seeds)),
                "seconds": secs,
            }
        )
        print(f"  deep {name}: {secs:.1f} s", file=sys.stderr, flush=True)
    # Is the optimum unique? The exact-gradient runs from the seeds' different initialisations.
    opt = ref[1]
    n = len(args.seeds)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    between = [
        float(
            _logit_distance(
                jax.tree.map(lambda a, i=i: a[i], opt["decoder"]),
                jax.tree.map(lambda a, j=j: a[j], opt["decoder"]),
                grid,
            )
        )
        for i, j in pairs
    ]
    exact_obj = ref[0]["avg_obj"][:, -1]
    uniqueness = {
        "objective_range": float(exact_obj.max() - exact_obj.min()),
        "logit_distance_between_inits_max": max(between) if between else 0.0,
    }
    return {"rows": rows, "pixels": int(x.shape[1]), "uniqueness": uniqueness}, curves


def deep_table(res, args):
    grid_gap = max(r["grid_gap"] for r in res["rows"])
    ex = res["rows"][0]
    u = res["uniqueness"]
    met = bool(np.all(ex["grad_norm_avg"] < 1e-3) and np.all(np.abs(ex["drift"]) < 1e-5))
    h = "-".join(str(v) for v in args.deep_hidden)
    lines = [
        f"VAE, 1-D latent, Bernoulli MLP decoder 1-{h}-{res['pixels']} (tanh) with weight decay "
        f"lambda = {args.deep_wd:g} on every decoder parameter theta: the MAP objective "
        "(1/N) sum_i log p(x_i) - lambda/2 ||theta||^2; every estimator gets the penalty's exact "
        f"gradient added. Proposal N(mu(x), {args.deep_proposal_std:g}^2), mu an MLP "
        f"(D-{args.deep_encoder_hidden}-1). First {args.deep_n} statically binarized MNIST "
        f"training images OR-pooled to {args.deep_size}x{args.deep_size}, the {res['pixels']} "
        f"pixels that vary over them; exact log-lik by a {args.deep_grid}-point midpoint grid on "
        f"[-6, 6] (max |difference| to a {4 * args.deep_grid}-point grid over every final model: "
        f"{grid_gap:.2g} nats); full-batch Adam with the Robbins-Monro step "
        f"{args.deep_lr}/(1+t/{args.deep_decay:g})^0.6, {args.deep_steps} steps, Polyak average "
        f"of the last half (avg); seeds {args.seeds} (each its own initialisation); "
        + (
            "every method but the exact gradient starts at the same seed's exact-gradient "
            "averaged decoder (its encoder at initialisation) and runs with the step "
            f"{args.deep_start_lr}/(1+t/{args.deep_decay:g})^0.6; "
            if args.deep_start == "optimum"
            else ""
        )
        + "mean +- SE "
        "over seeds. gap = exact-gradient run's MAP objective - this run's (same seed; "
        "nats/image; > 0 is worse); dist = ||theta - theta*|| to the same seed's exact-gradient "
        "averaged decoder (sign of z aligned); logit dist = prior-weighted RMS difference of the "
        "decoders' logits over the grid (sign of z aligned; blind to hidden-unit symmetries); "
        "|grad| = norm of the exact full-data gradient of the MAP objective in theta; drift = "
        "change of the averaged MAP objective over the last 10% of the steps; seeds at the "
        "optimum = seeds whose |gap| < 1e-3 (the others ended at another local maximum of the "
        "MAP objective, such as the decoder that ignores z, or at a bound's biased fixed "
        "point). Convergence "
        f"criterion for the exact run, |grad| < 1e-3 and |drift| < 1e-5 on every seed: "
        f"{'met' if met else 'NOT met'}. The exact-gradient runs from the {len(args.seeds)} "
        f"initialisations end {u['objective_range']:.2g} nats/image apart in the MAP objective, "
        f"their decoders {u['logit_distance_between_inits_max']:.2g} apart in logit dist."
        + _method_notes(args),
        "",
        "| method | S | k:m | MAP objective (avg) | gap (avg) | log-lik (avg) | dist (avg) "
        "| logit dist (avg) | \\|grad\\| (avg) | drift | seeds at the optimum "
        "| log_joint evals / example / step | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['S']} | {r['k:m']} | {_fmt(r['obj_avg'], 6)} "
            f"| {_fmt(r['gap_avg'], 3)} | {_fmt(r['ll_avg'], 6)} | {_fmt(r['dist_avg'], 3)} "
            f"| {_fmt(r['logit_dist_avg'], 3)} | {_fmt(r['grad_norm_avg'], 3)} "
            f"| {_fmt(r['drift'], 2)} "
            f"| {int(np.sum(np.abs(r['gap_avg']) < 1e-3))}/{len(r['gap_avg'])} "
            f"| {_fmt(r['evals_per_example_step'], 3)} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def lfa_table(res, args):
    grid_gap = max(r["grid_gap"] for r in res["rows"])
    lines = [
        "Logistic factor model, 1-D latent: Bernoulli decoder logits = W z + b "
        f"(1-{res['pixels']}), proposal N(mu(x), {args.lfa_proposal_std:g}^2) with mu an MLP "
        f"(D-{args.lfa_encoder_hidden}-1), first {args.lfa_n} statically binarized MNIST "
        f"training images OR-pooled to {args.lfa_size}x{args.lfa_size}, the {res['pixels']} "
        "pixels that vary over them; exact log-lik by a "
        f"{args.lfa_grid}-point midpoint grid on [-6, 6] (max |difference| to a "
        f"{4 * args.lfa_grid}-point grid over every final model: {grid_gap:.2g} nats); full-batch "
        f"Adam with the Robbins-Monro step {args.lfa_lr}/(1+t/{args.lfa_decay:g})^0.6, "
        f"{args.lfa_steps} steps, Polyak average of the last half (avg); seeds {args.seeds}; mean "
        "+- SE over seeds. gap = exact-gradient run's log-lik - this run's (same seed and init; "
        "nats/image; > 0 is worse); dist = ||(W, b) - (W*, b*)|| to the exact-gradient run's "
        "averaged decoder (sign of z aligned); |grad| = norm of the exact full-data decoder "
        "gradient (0 at a maximum of log p); drift = change of the averaged log-lik over the last "
        f"{args.record_every_lfa} steps (convergence check)." + _method_notes(args),
        "",
        "| method | S | k:m | exact log-lik (avg) | gap (avg) | dist (avg) | |grad| (avg) "
        "| drift | mean meeting time | log_joint evals / example / step | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['S']} | {r['k:m']} | {_fmt(r['ll_avg'], 6)} "
            f"| {_fmt(r['gap_avg'], 3)} | {_fmt(r['dist_avg'], 3)} "
            f"| {_fmt(r['grad_norm_avg'], 3)} | {_fmt(r['ll_drift'], 2)} "
            f"| {_fmt(r['meeting_mean'], 3)} | {_fmt(r['evals_per_example_step'], 3)} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def vae_table(res, args):
    grid_gap = max(r["grid_gap"] for r in res["rows"])
    lines = [
        f"VAE 2-D latent, 2-{args.hidden}-196 Bernoulli decoder, first {args.vae_n} statically "
        f"binarized MNIST training images OR-pooled to 14x14; exact log-lik by a "
        f"{args.grid}x{args.grid} midpoint grid on [-5, 5]^2 (max |difference| to a "
        f"{2 * args.grid}x{2 * args.grid} grid over every final model: {grid_gap:.2g} nats); "
        f"Adam lr {args.vae_lr}, minibatch {args.vae_batch}, {args.vae_steps} steps, "
        f"Polyak average of the last half; seeds {args.seeds}; mean +- SE over seeds. "
        "gap = exact-gradient run's log-lik - this run's (same seed; nats/image; > 0 is worse); "
        "|grad| = norm of the exact full-data gradient in the decoder at the final parameters.",
        "",
        "| method | S | k:m | exact log-lik (last) | exact log-lik (avg) | gap (last) | gap (avg) "
        "| |grad| (last) | |grad| (avg) | mean meeting time | log_joint evals / example / step "
        "| s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['S']} | {r['k:m']} | {_fmt(r['ll'], 5)} "
            f"| {_fmt(r['ll_avg'], 5)} | {_fmt(r['gap'], 3)} | {_fmt(r['gap_avg'], 3)} "
            f"| {_fmt(r['grad_norm'], 3)} "
            f"| {_fmt(r['grad_norm_avg'], 3)} | {_fmt(r['meeting_mean'], 3)} "
            f"| {_fmt(r['evals_per_example_step'], 3)} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Plots and main
# ------------------------------------------------------------------------------------------------


def _plot(curves, panels, steps, record_every, title, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
    t = np.arange(1, steps // record_every + 1) * record_every
    for ax, (key, ylabel, log, transform) in zip(np.atleast_1d(axes), panels, strict=True):
        for i, (name, tr) in enumerate(curves.items()):
            y = transform(np.asarray(tr[key]), name)
            if y is None:
                continue
            m = y.mean(0)
            ax.plot(t, np.abs(m) if log else m, color=plt.cm.tab20(i % 20), label=name)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and few steps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["ppca", "vae", "lfa"],
        choices=["ppca", "vae", "lfa", "deep"],
        help="deep: the 1-D-latent VAE with a two-hidden-layer decoder and weight decay",
    )
    ap.add_argument("--iwae-s", type=int, nargs="*", default=[2, 5, 20])
    ap.add_argument(
        "--unbiased",
        nargs="*",
        default=["5:0:0", "5:2:6"],
        help="S:k:m of each unbiased estimator (H_{k:m} with S particles)",
    )
    ap.add_argument(
        "--mlmc",
        type=int,
        nargs="*",
        default=[5],
        help="n0 of each MLMC estimator (level-0 draws; none: no MLMC rows)",
    )
    ap.add_argument(
        "--mlmc-estimators",
        nargs="+",
        default=["roulette", "single_term"],
        choices=["roulette", "single_term"],
    )
    ap.add_argument("--mlmc-rate", type=float, default=1.5)
    ap.add_argument("--mlmc-max-level", type=int, default=10)
    ap.add_argument(
        "--matched",
        nargs="*",
        default=["mlmc", "unbiased-5 H0:0"],
        help="add IWAE-S with S = the mean evaluations per example per step of the rows whose "
        "name starts with each of these (the compute-matched bound)",
    )
    ap.add_argument("--ppca-proposal", default="fixed_encoder", choices=["fixed_encoder", "prior"])
    ap.add_argument("--sigma0", type=float, default=1.0)
    ap.add_argument("--ppca-dim", type=int, default=6)
    ap.add_argument("--ppca-n", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--weight-scale", type=float, default=0.8)
    ap.add_argument("--ppca-steps", type=int, default=1000)
    ap.add_argument("--ppca-lr", type=float, default=0.1)
    ap.add_argument("--vae-n", type=int, default=300)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=50)
    ap.add_argument("--vae-lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--grid", type=int, default=100, help="grid points per latent axis")
    ap.add_argument("--record-every", type=int, default=50)
    ap.add_argument("--lfa-n", type=int, default=100)
    ap.add_argument("--lfa-size", type=int, default=7, help="image side after OR-pooling")
    ap.add_argument(
        "--lfa-proposal-std",
        type=float,
        default=1.0,
        help="fixed std sigma0 of the encoder (a proposal that cannot match the posterior)",
    )
    ap.add_argument("--lfa-grid", type=int, default=400, help="grid points on [-6, 6]")
    ap.add_argument("--lfa-encoder-hidden", type=int, default=16)
    ap.add_argument("--lfa-steps", type=int, default=5000)
    ap.add_argument("--lfa-lr", type=float, default=0.05)
    ap.add_argument("--lfa-decay", type=float, default=500.0)
    ap.add_argument("--record-every-lfa", type=int, default=250)
    ap.add_argument("--deep-n", type=int, default=100)
    ap.add_argument("--deep-size", type=int, default=7, help="image side after OR-pooling")
    ap.add_argument("--deep-hidden", type=int, nargs="+", default=[16, 16])
    ap.add_argument(
        "--deep-wd",
        type=float,
        default=0.1,
        help="lambda of the penalty lambda/2 ||theta||^2 on the decoder (per image)",
    )
    ap.add_argument("--deep-proposal-std", type=float, default=1.0)
    ap.add_argument("--deep-grid", type=int, default=400, help="grid points on [-6, 6]")
    ap.add_argument("--deep-encoder-hidden", type=int, default=16)
    ap.add_argument(
        "--deep-start",
        default="random",
        choices=["random", "optimum"],
        help="optimum: every method but the exact gradient starts at the exact-gradient run's "
        "averaged decoder (does it stay there?)",
    )
    ap.add_argument(
        "--deep-start-lr",
        type=float,
        default=0.01,
        help="with --deep-start optimum: the step of the methods started at the optimum (the "
        "exact-gradient run that finds it keeps --deep-lr)",
    )
    ap.add_argument("--deep-steps", type=int, default=5000)
    ap.add_argument("--deep-lr", type=float, default=0.05)
    ap.add_argument("--deep-decay", type=float, default=500.0)
    ap.add_argument("--record-every-deep", type=int, default=250)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument(
        "--plots",
        help="where the PNG curves go (default benchmarks/plots, what RESULTS.md shows; "
        "runs/ground_truth_quick with --quick)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    on_mnist = [m for m in args.models if m != "ppca"]
    if on_mnist:  # fail before the pPCA runs, not after them
        from vaeml_jax.data import DataError, load_dataset

        try:
            load_dataset("binarized_mnist", args.data_dir)
        except DataError as e:
            models = " ".join(on_mnist)
            ap.exit(2, f"ground_truth.py: --models {models} read binarized MNIST: {e}\n")
    if args.plots is None:  # a smoke run never overwrites the recorded figures
        sub = ("runs", "ground_truth_quick") if args.quick else ("benchmarks", "plots")
        args.plots = str(REPO.joinpath(*sub))
    if args.quick:
        args.seeds = args.seeds[:2]
        args.iwae_s, args.unbiased = [2], ["5:0:0"]
        args.ppca_steps, args.vae_steps, args.record_every = 100, 40, 20
        args.ppca_n, args.vae_n, args.hidden, args.grid = 50, 60, 16, 40
        args.lfa_n, args.lfa_size, args.lfa_grid, args.lfa_steps = 40, 7, 100, 100
        args.record_every_lfa = 50
        args.deep_n, args.deep_grid, args.deep_steps, args.record_every_deep = 60, 100, 100, 10
    args.unbiased = [tuple(int(v) for v in u.split(":")) for u in args.unbiased]
    if args.quick:
        args.mlmc, args.mlmc_estimators, args.mlmc_max_level = args.mlmc[:1], ["roulette"], 4
    args.mlmc = [
        (n0, kind, args.mlmc_rate, args.mlmc_max_level)
        for n0 in args.mlmc
        for kind in args.mlmc_estimators
    ]

    header = (
        f"# ground_truth.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
        f"jax {jax.__version__}  python {platform.python_version()}  "
        f"{os.cpu_count()} CPUs  backend {jax.default_backend()}"
    )
    print(header)
    out = {"args": {k: v for k, v in vars(args).items()}, "header": header}
    os.makedirs(args.plots, exist_ok=True)
    t_start = time.perf_counter()
    if "ppca" in args.models:
        res, curves = run_ppca(args)
        print("\n## pPCA\n\n" + ppca_table(res, args) + "\n", flush=True)
        out["ppca"], out["ppca_curves"] = res, curves
        _plot(
            curves,
            [
                ("gap", "log-lik gap to ML (nats/point), last iterate", True, lambda y, n: y),
                ("avg_gap", "log-lik gap to ML, Polyak average", True, lambda y, n: y),
                ("avg_dist", "||(WW^T, b, s^2) - ML||, Polyak average", True, lambda y, n: y),
            ],
            args.ppca_steps,
            args.record_every,
            f"pPCA, proposal {args.ppca_proposal}: distance to the exact ML fit "
            f"(mean over seeds {args.seeds})",
            Path(args.plots) / "ground_truth_ppca.png",
        )
    if "vae" in args.models:
        res, curves = run_vae(args)
        print("\n## VAE (2-D latent)\n\n" + vae_table(res, args) + "\n", flush=True)
        out["vae"], out["vae_curves"] = res, curves
        ref = np.asarray(curves["exact"]["ll"])
        ref_avg = np.asarray(curves["exact"]["avg_ll"])
        _plot(
            curves,
            [
                ("ll", "exact log-lik per image (nats), last iterate", False, lambda y, n: y),
                (
                    "avg_ll",
                    "exact-gradient run's log-lik - this run's (Polyak avg, same seed)",
                    False,
                    lambda y, n: None if n == "exact" else ref_avg - y,
                ),
                (
                    "ll",
                    "exact-gradient run's log-lik - this run's (last iterate)",
                    False,
                    lambda y, n: None if n == "exact" else ref - y,
                ),
            ],
            args.vae_steps,
            args.record_every,
            f"VAE with a 2-D latent, exact log-lik by quadrature (mean over seeds {args.seeds})",
            Path(args.plots) / "ground_truth_vae.png",
        )
    if "lfa" in args.models:
        res, curves = run_lfa(args)
        print(
            "\n## Logistic factor model (1-D latent)\n\n" + lfa_table(res, args) + "\n", flush=True
        )
        out["lfa"], out["lfa_curves"] = res, curves
        ref_avg = np.asarray(curves["exact"]["avg_ll"])
        _plot(
            curves,
            [
                ("avg_ll", "exact log-lik per image (nats), Polyak average", False, lambda y, n: y),
                (
                    "avg_ll",
                    "exact-gradient run's log-lik - this run's (Polyak avg, same seed)",
                    True,
                    lambda y, n: None if n == "exact" else ref_avg - y,
                ),
                ("avg_grad_norm", "|exact decoder gradient|, Polyak average", True, lambda y, n: y),
            ],
            args.lfa_steps,
            args.record_every_lfa,
            f"Logistic factor model, 1-D latent, exact log-lik by quadrature (mean over seeds "
            f"{args.seeds})",
            Path(args.plots) / "ground_truth_lfa.png",
        )
    if "deep" in args.models:
        res, curves = run_deep(args)
        print(
            "\n## Deep decoder, 1-D latent, weight decay (MAP)\n\n" + deep_table(res, args) + "\n",
            flush=True,
        )
        out["deep"], out["deep_curves"] = res, curves
        ref_avg = np.asarray(curves["exact"]["avg_obj"])
        _plot(
            curves,
            [
                (
                    "avg_obj",
                    "exact MAP objective per image (nats), Polyak average",
                    False,
                    lambda y, n: y,
                ),
                (
                    "avg_obj",
                    "exact-gradient run's MAP objective - this run's (Polyak avg, same seed)",
                    True,
                    lambda y, n: None if n == "exact" else ref_avg - y,
                ),
                ("avg_grad_norm", "|exact MAP gradient|, Polyak average", True, lambda y, n: y),
            ],
            args.deep_steps,
            args.record_every_deep,
            f"1-D-latent VAE, decoder 1-{'-'.join(map(str, args.deep_hidden))}-P with weight decay "
            f"{args.deep_wd:g}, exact MAP objective by quadrature (mean over seeds {args.seeds})",
            Path(args.plots)
            / (
                "ground_truth_deep.png"
                if args.deep_start == "random"
                else "ground_truth_deep_opt.png"
            ),
        )
    print(f"total {time.perf_counter() - t_start:.0f} s wall", file=sys.stderr)
    if args.json:

        def conv(o):
            if isinstance(o, np.ndarray | np.generic):
                return np.asarray(o).tolist()
            return str(o)

        Path(args.json).write_text(json.dumps(out, default=conv, indent=1))


if __name__ == "__main__":
    main()
