r"""Cost of the SUMO gradient: each example's own draws (work list) against the batch-max schedule.

SUMO draws an independent number J of terms per example; an example uses m + J draws. Two
schedules evaluate them, with the SAME draws (same keys, same J), hence the same estimate:

* ``worklist`` (the library's ``make_sumo_grad``): every example's blocks of ``block_size`` draws
  laid end to end, B blocks per loop step: example i executes 2 b ceil((m + J_i) / b)
  evaluations (both passes), the batch that plus the last step's padding;
* ``batch_max`` (the library before the work list, loaded from git revision ``--baseline-rev``):
  every example runs to the batch's largest m + J, rounded up to a block.

Model: the paper's MNIST MLP, ``vaeml_jax.models.VAE(VAEConfig())`` (784-200-200-50) at its
initialisation (the law of J does not depend on the parameters; the time per evaluation does not
either, to first order), on the first B images of the packaged MNIST, binarized once. For each
batch size, calls with fresh keys are timed interleaved (benchmarks/_timing.py); the report gives
executed ``log_joint`` evaluations per example (mean over calls; exact, from ``info``) and the
median per-round paired time ratio batch_max / worklist with its inter-quartile range, and checks
that the two gradients agree.

Run: ``PYTHONPATH=. python benchmarks/sumo_cost.py`` (``--quick`` for a smoke run).
Without git or the baseline revision the batch-max schedule's cost is computed from the same J
draws in closed form (2 B b ceil((m + max J) / b)) and no time ratio is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _timing import summarize, time_interleaved  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.data import binarize_static, load_dataset  # noqa: E402
from vaeml_jax.models import VAE, VAEConfig  # noqa: E402

# The last revision whose make_sumo_grad ran every example to the batch-max m + J.
BASELINE_REV = "8b991f5"
SUMO_PATH = "vaeml_jax/estimators/sumo.py"


def load_baseline(rev: str):
    """The sumo module of git revision ``rev`` (None, with the reason, where unavailable)."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:{SUMO_PATH}"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"git show {rev}:{SUMO_PATH} failed ({e})"
    path = Path(tempfile.mkdtemp()) / "sumo_batch_max.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("sumo_batch_max", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 100, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-rev", default=BASELINE_REV)
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = [8], 2

    vae = VAE(VAEConfig(hidden=(16,), latent_dim=4) if args.quick else VAEConfig())
    model = vae.model
    params = vae.init(jax.random.key(args.seed))
    images = binarize_static(load_dataset("mnist", data_dir=None).train[: max(args.batches)])
    baseline, why = load_baseline(args.baseline_rev)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"jax {jax.__version__} backend={jax.default_backend()}"
    )
    print(f"model: VAE({'quick' if args.quick else 'VAEConfig()'}), SUMO defaults (m = 1, block 8)")
    if baseline is None:
        print(f"batch_max: not timed: {why}; its evaluations from the closed form")
    rows = []
    for B in args.batches:
        x = jnp.asarray(images[:B])
        keys = jax.random.split(jax.random.key(1000 + B), args.repeats + 1)
        fns = {"worklist": jax.jit(lambda k, x=x: vj.make_sumo_grad(model)(params, x, k))}
        if baseline is not None:
            old = baseline.make_sumo_grad(model)
            fns["batch_max"] = jax.jit(lambda k, x=x, old=old: old(params, x, k))
        evals = {name: [] for name in fns}
        closed, agree = [], []

        def record(name, r, out, evals=evals, closed=closed, B=B):
            evals[name].append(int(out[1]["num_log_joint_evals"]) / B)
            if name == "worklist":
                j = np.asarray(out[1]["num_iters"])[:, 0]
                closed.append(2 * 8 * -(-(1 + int(j.max())) // 8))

        times = time_interleaved(
            {name: (lambda r, f=f, keys=keys: f(keys[r])) for name, f in fns.items()},
            repeats=args.repeats,
            warmup=1,
            on_output=record,
        )
        if baseline is not None:  # same keys, same draws: the same gradient
            a, b = fns["worklist"](keys[0])[0], fns["batch_max"](keys[0])[0]
            for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                scale = max(1.0, float(jnp.max(jnp.abs(v))))
                agree.append(bool(np.allclose(u, v, rtol=1e-3, atol=1e-4 * scale)))
        new = float(np.mean(evals["worklist"]))
        old_evals = float(np.mean(evals["batch_max"] if baseline is not None else closed))
        line = (
            f"B = {B:4d}: evaluations/example worklist {new:7.1f}, batch_max {old_evals:7.1f} "
            f"({old_evals / new:.1f}x)"
        )
        if baseline is not None:
            ratio = summarize(times["batch_max"] / times["worklist"])
            line += (
                f"; ms/call worklist {summarize(times['worklist']).fmt(1e3, 1)}, batch_max "
                f"{summarize(times['batch_max']).fmt(1e3, 1)}; time ratio batch_max / worklist "
                f"{ratio.fmt()}; same gradient: {all(agree)}"
            )
        print(line, flush=True)
        rows.append(dict(batch=B, worklist=new, batch_max=old_evals, agree=all(agree)))
    return rows


if __name__ == "__main__":
    main()
