r"""Paired per-call timing of variants of the unbiased estimator's work queue.

``estimator_cost.py`` times each estimator against the hand-written IWAE floor; this script
answers the narrower question "is variant B faster than variant A on the same calls?", which is
what deciding a default needs. Every variant runs on the same batches with the same keys (so the
same meeting times and the same estimate), one call each per round in a rotated order, and the
per-call ratio t(variant) / t(first variant) is summarised by its median and IQR. The absolute
t / ((1 + batch-mean iters) floor) of each variant is printed too (floor timed in the same round).

A variant is a comma-separated spec, e.g. ``slots=25,defer=4,hook=1,features=1`` (the library
default on CPU):

* ``slots``: ``LoopOptions.num_slots`` (the cascade P, P/2, ..., 1); 0 = the plain loop
  (``num_slots=None``);
* ``unroll``: coupled iterations per ``while_loop`` step of the plain loop
  (``LoopOptions.unroll``; with ``slots=0`` only);
* ``defer``: stages of at most this many slots run forward passes only and batch their backward
  passes (``vaeml_jax.estimators._scheduled.DEFER_AT_MOST``; 0 = none, i.e.
  ``LoopOptions(deferred_backward=False)``);
* ``hook``: 1 = the library VAE's one-pass ``sample_with_log_proposal``, 0 = the model without it;
* ``features``: 1 = the VAE's ``proposal_features`` / ``sample_from_features`` pair (the queue
  draws from the encoder output computed once per example), 0 = the model without the pair (the
  queue runs the encoder on each slot's example every iteration).

The module constant is set before each variant is traced (each variant is its own jitted
function), so one process compares them side by side. ``--iwae-hook`` also compares the IWAE-S
gradient with and without the hook.

    python benchmarks/queue_variants.py --num-particles 5 --calls 40 \
        --variants slots=25,defer=0 slots=25,defer=4 slots=25,defer=25
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import estimator_cost as ec  # noqa: E402
from _timing import summarize  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.estimators import LoopOptions, _scheduled  # noqa: E402

DEFAULTS = dict(slots=25, defer=_scheduled.DEFER_AT_MOST, hook=1, features=1, unroll=1)


def parse_variant(spec: str) -> dict:
    """'slots=25,defer=4' -> the DEFAULTS with those fields replaced (all ints)."""
    out = dict(DEFAULTS)
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name not in DEFAULTS or not value.lstrip("-").isdigit():
            raise SystemExit(f"bad variant field {part!r} in {spec!r}; fields: {list(DEFAULTS)}")
        out[name] = int(value)
    if out["slots"] < 0 or out["defer"] < 0 or out["unroll"] < 1:
        raise SystemExit(f"slots and defer must be >= 0, unroll >= 1 in {spec!r}")
    if out["unroll"] > 1 and out["slots"]:
        raise SystemExit(f"unroll applies to the plain loop: add slots=0 in {spec!r}")
    return out


def build(model, S: int, v: dict, max_iters: int, example: tuple):
    """unbiased_grad for variant ``v``, compiled now (under the variant's constants) for
    arguments shaped like ``example`` = (params, x, key)."""
    m = model if v["hook"] else model._replace(sample_with_log_proposal=None)
    if not v["features"]:
        m = m._replace(proposal_features=None, sample_from_features=None)
    loop = LoopOptions(
        num_slots=v["slots"] or None, deferred_backward=v["defer"] > 0, unroll=v["unroll"]
    )
    est = vj.make_unbiased_grad(m, num_particles=S, max_iters=max_iters, loop=loop)
    saved = _scheduled.DEFER_AT_MOST
    _scheduled.DEFER_AT_MOST = v["defer"]
    try:
        fn = jax.jit(lambda p, x, k: est(p, x, k))
        return fn.lower(*example).compile()
    finally:
        _scheduled.DEFER_AT_MOST = saved


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-particles", type=int, default=5)
    p.add_argument("--calls", type=int, default=40, help="rounds: one call per variant each")
    p.add_argument("--variants", nargs="+", default=["slots=25,defer=0", "slots=25"])
    p.add_argument("--iwae-hook", action="store_true", help="also IWAE-S with/without the hook")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--data-dir", type=Path, default=None)
    args = p.parse_args(argv)
    S = args.num_particles
    variants = [parse_variant(s) for s in args.variants]

    images = ec.load_mnist_train(args.data_dir or ec.default_data_dir())
    data_mean = images.mean(0) / 255.0
    model, params, _ = ec.build_model("library", jax.random.key(0), data_mean)
    params, _ = ec.train(model, params, images, args.train_steps, 100, jax.random.key(1))
    floor_params = ec.init_mlp_vae(jax.random.key(3), data_mean)
    data = jax.numpy.asarray(images[:20000], jax.numpy.float32) / 255.0
    n = args.calls
    batches = [
        ec.binarize(jax.random.key(100 + i), data[(i % 200) * 100 : (i % 200 + 1) * 100])
        for i in range(n)
    ]
    keys = [jax.random.key(5000 + i) for i in range(n)]
    example = (params, batches[0], keys[0])
    fns = {
        spec: build(model, S, v, args.max_iters, example)
        for spec, v in zip(args.variants, variants, strict=True)
    }
    floor = jax.jit(jax.grad(ec.floor_iwae_loss), static_argnums=3)
    if args.iwae_hook:
        no_hook = model._replace(sample_with_log_proposal=None)
        for name, m in (("iwae+hook", model), ("iwae", no_hook)):
            est = vj.make_iwae_grad(m, num_particles=S)
            fns[name] = jax.jit(lambda p, x, k, est=est: est(p, x, k))
    for f in fns.values():
        jax.block_until_ready(f(params, batches[0], keys[0]))
    jax.block_until_ready(floor(floor_params, batches[0], keys[0], S))

    names = list(fns)
    times = {name: np.empty(n) for name in names}
    floor_t, mean_iters = np.empty(n), np.empty(n)
    for r in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(floor(floor_params, batches[r], keys[r], S))
        floor_t[r] = time.perf_counter() - t0
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fns[name](params, batches[r], keys[r]))
            times[name][r] = time.perf_counter() - t0
            if name == names[0]:
                mean_iters[r] = float(np.mean(np.asarray(out[1]["num_iters"])))

    info = ec.machine_info()
    print(
        f"{info['date']}; {info['cpu']} ({info['cpu_count']} cores); jax {info['jax']}; "
        f"S = {S}; {n} calls; "
        f"{args.train_steps} IWAE-5 steps; batch-mean iters median {np.median(mean_iters):.2f}"
    )
    print(f"command: python benchmarks/queue_variants.py {' '.join(argv or sys.argv[1:])}\n")
    print("| variant | t / first variant, median [IQR] | t / ((1 + mean iters) floor) | ms |")
    print("| --- | --- | --- | --- |")
    ref = times[names[0]]
    for name in names:
        t = times[name]
        bound = "" if name.startswith("iwae") else summarize(t / floor_t / (1 + mean_iters)).fmt()
        print(
            f"| {name} | {summarize(t / ref).fmt(digits=3)} | {bound} | "
            f"{summarize(t).fmt(1e3, 1)} |"
        )
    if args.iwae_hook:
        ratio = summarize(times["iwae+hook"] / times["iwae"]).fmt(digits=3)
        print(
            f"\nIWAE-{S}: with / without the hook {ratio}; with the hook / floor "
            f"{summarize(times['iwae+hook'] / floor_t).fmt()}, without "
            f"{summarize(times['iwae'] / floor_t).fmt()}"
        )


if __name__ == "__main__":
    main()
