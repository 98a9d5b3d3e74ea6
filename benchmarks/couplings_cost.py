r"""Cost of the VAE gradient through the general couplings driver vs the fused estimator.

Both estimate the same thing for a batch: the unbiased H_{k:m} gradient of log p(x) from coupled
CIS chains with lag 1 (theta part; ``encoder_objective=None`` for the fused one):

* ``fused``: ``vaeml_jax.make_unbiased_grad(model, num_particles=S, k=k, m=m,
  encoder_objective=None, loop=LoopOptions(num_slots=None))``, one batched ``while_loop`` (the
  plain loop) that accumulates a single vjp over the S+1 distinct atoms per iteration;
* ``general``: ``vaeml_jax.couplings.build_vae_gradient(model, S, k, m)`` for ONE example,
  vmapped over the batch (one key per example): the generic driver with the coupled CIS kernel
  and h = IWAE theta-gradient, which evaluates h (S log_joint + one backward pass) on BOTH chains
  at every iteration.

Model: ``vaeml_jax.models.VAE(VAEConfig(hidden=(64,), latent_dim=8))`` at its initialisation, on
a fixed batch of random binary 784-pixel vectors (no dataset needed). Calls are timed interleaved
(benchmarks/_timing.py), each round with a fresh key; the reported number is the median over
rounds of the per-round paired ratio general / fused, with its inter-quartile range. Both loops run
until the batch-max meeting time. Their meeting times do NOT have exactly the same law: the fused
loop takes X_1's fresh proposals from Y_0 (a valid coupling of the initial laws), so its first
coupled step can already meet, while the general driver's X_1 and Y_0 share no particle; both are
unbiased (tests/test_couplings_cis.py). Mean and median meeting times are printed alongside
(meeting times are heavy-tailed here, so the means are noisy).

Run: ``PYTHONPATH=. python benchmarks/couplings_cost.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _timing import summarize, time_interleaved  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax import couplings as cp  # noqa: E402
from vaeml_jax.models import VAE, VAEConfig  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-particles", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=0)
    parser.add_argument("--m", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 3

    vae = VAE(VAEConfig(hidden=(64,), latent_dim=8))
    model = vae.model
    key = jax.random.key(args.seed)
    k_params, k_data, k_run = jax.random.split(key, 3)
    params = vae.init(k_params)
    x = jax.random.bernoulli(k_data, 0.3, (args.batch, 784)).astype(jnp.float32)
    S = args.num_particles

    plain = vj.LoopOptions(num_slots=None)
    fused = vj.make_unbiased_grad(
        model, num_particles=S, k=args.k, m=args.m, encoder_objective=None, loop=plain
    )
    general_one = cp.build_vae_gradient(model, S, k=args.k, m=args.m)

    fused_fn = jax.jit(lambda key: fused(params, x, key))

    @jax.jit
    def general_fn(key):
        out = jax.vmap(general_one, in_axes=(None, 0, 0))(params, x, jax.random.split(key, len(x)))
        grads = jax.tree.map(lambda g: -jnp.mean(g, axis=0), out.estimate)  # the fused one's loss
        return grads, out.meeting_time

    keys = jax.random.split(k_run, args.repeats + 1)
    taus = {"fused": [], "general": []}

    def record(name, r, out):
        tau = out[1]["meeting_time"] if name == "fused" else out[1]
        taus[name].extend(np.asarray(tau).ravel().tolist())

    times = time_interleaved(
        {"fused": lambda r: fused_fn(keys[r]), "general": lambda r: general_fn(keys[r])},
        repeats=args.repeats,
        warmup=1,
        on_output=record,
    )
    ratio = summarize(times["general"] / times["fused"])
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"jax {jax.__version__} backend={jax.default_backend()}"
    )
    print(
        f"model: VAE(hidden=(64,), latent_dim=8), S={S}, batch={args.batch}, "
        f"k={args.k}, m={args.m}, rounds={args.repeats}"
    )
    print(
        f"fused   per call: {summarize(times['fused']).fmt(1e3)} ms, "
        f"tau mean {np.mean(taus['fused']):.2f} median {np.median(taus['fused']):.0f} "
        f"max {np.max(taus['fused']):.0f}"
    )
    print(
        f"general per call: {summarize(times['general']).fmt(1e3)} ms, "
        f"tau mean {np.mean(taus['general']):.2f} median {np.median(taus['general']):.0f} "
        f"max {np.max(taus['general']):.0f}"
    )
    print(f"ratio general / fused (median [IQR] of per-round paired ratios): {ratio.fmt()}")
    return ratio


if __name__ == "__main__":
    main()
