"""Data-parallel scaling: examples/s of one jitted train step against the number of devices.

Each device count runs in its own subprocess (XLA_FLAGS must be set before jax starts). On a CPU
machine, ``--force-cpu-devices N`` splits the host into N XLA devices: that checks correctness and
the per-shard early stop (the while_loop of each shard ends when its own chains have met), not real
speed-up, since the devices share the same cores. On a multi-GPU machine run without it.

    python benchmarks/scaling.py --devices 1 2 4 --force-cpu-devices 4 --estimator unbiased

``--processes P`` compares, side by side in one run, 1 process with P x K forced CPU devices
against P processes of K devices each (K = ``--force-cpu-devices``, default 2) joined by
``jax.distributed`` on this machine (gloo collectives): the cost of the multi-process runtime
for the same global batch and the same program, as a ratio of examples/s.

    python benchmarks/scaling.py --processes 2 --force-cpu-devices 2 --pairs 3

``--pairs N`` alternates the two N times and reports each pair's ratio and their median, so a
machine whose load drifts still gives a paired ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np, optax
    from vaeml_jax import distributed, data
    from vaeml_jax.models import VAE, VAEConfig
    from vaeml_jax.training import TrainState, make_train_step
    import vaeml_jax as vj

    a = json.loads(sys.argv[1])
    if a.get("processes", 1) > 1:
        distributed.initialize()  # JAX_COORDINATOR_ADDRESS etc. set by the parent
    mesh = distributed.make_mesh(a["devices"])
    vae = VAE(VAEConfig(hidden=tuple(a["hidden"]), latent_dim=a["latent_dim"]))
    train_x = jnp.asarray(data.load_dataset("mnist").train[: a["batch_size"] * a["steps"]])
    est = {"unbiased": lambda: vj.make_unbiased_grad(vae.model, num_particles=a["S"]),
           "iwae": lambda: vj.make_iwae_grad(vae.model, num_particles=a["S"])}[a["estimator"]]()
    opt = optax.adam(1e-3)
    params = vae.init(jax.random.key(0), data_mean=np.asarray(train_x.mean(0)))
    state = distributed.replicate(TrainState(params, opt.init(params)), mesh)
    step = jax.jit(make_train_step(distributed.data_parallel(est, mesh), opt))
    batches = distributed.shard_batches(
        data.epoch_batches(jax.random.key(1), train_x, a["batch_size"]), mesh)
    state, m = step(state, batches[0], jax.random.key(2))  # compile
    jax.block_until_ready(m)
    times, evals = [], 0
    for r in range(a["repeats"]):
        t0 = time.perf_counter()
        for i in range(batches.shape[0]):
            state, m = step(state, batches[i], jax.random.fold_in(jax.random.key(3), r * 1000 + i))
            evals += int(m["num_log_joint_evals"])
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    if jax.process_index():
        sys.exit(0)  # process 0 reports
    print("RESULT" + json.dumps({"devices": distributed.num_devices(mesh),
          "processes": jax.process_count(), "seconds": t,
          "examples_per_second": batches.shape[0] * a["batch_size"] / t,
          "log_joint_evals_per_step": evals / (a["repeats"] * batches.shape[0]),
          "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
          "jax": jax.__version__}))
    """
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--force-cpu-devices",
        type=int,
        default=0,
        help="split the CPU into this many XLA devices (0: use the real devices)",
    )
    p.add_argument("--estimator", choices=["unbiased", "iwae"], default="unbiased")
    p.add_argument("--num-particles", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=10, help="train steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="compare 1 process x (P * K) devices with P processes x K devices (K: "
        "--force-cpu-devices, default 2) instead of the --devices sweep",
    )
    p.add_argument(
        "--pairs", type=int, default=1, help="with --processes: alternate the two N times"
    )
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.repeats, a.hidden, a.latent_dim, a.batch_size = 2, 1, [16], 3, 8
    if a.processes:
        return compare_processes(a)
    env = dict(os.environ)
    if a.force_cpu_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.force_cpu_devices}"
        env["JAX_PLATFORMS"] = "cpu"
    rows = []
    for n in a.devices:
        args = dict(
            devices=n,
            hidden=a.hidden,
            latent_dim=a.latent_dim,
            S=a.num_particles,
            batch_size=a.batch_size,
            steps=a.steps,
            repeats=a.repeats,
            estimator=a.estimator,
        )
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(args)], env=env, capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"devices={n} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.split("RESULT")[-1]))
    base = rows[0]["examples_per_second"]
    print(
        f"{a.estimator}, S={a.num_particles}, batch {a.batch_size}, {rows[0]['platform']} "
        f"({rows[0]['device_kind']}), jax {rows[0]['jax']}"
    )
    print("| devices | examples/s | x vs first | log_joint evals / step |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['devices']} | {r['examples_per_second']:.0f} | "
            f"{r['examples_per_second'] / base:.2f} | {r['log_joint_evals_per_step']:.0f} |"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


def compare_processes(a) -> None:
    """1 process x (P * K) devices vs P processes x K devices, same global batch, one table."""
    from vaeml_jax.distributed import _free_port

    per = a.force_cpu_devices or 2
    total = a.processes * per
    common = dict(
        hidden=a.hidden,
        latent_dim=a.latent_dim,
        S=a.num_particles,
        batch_size=a.batch_size,
        steps=a.steps,
        repeats=a.repeats,
        estimator=a.estimator,
        devices=None,
    )
    import tempfile

    rows = []
    for processes, devices in ((1, total), (a.processes, per)) * a.pairs:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes)
        )
        args = json.dumps({**common, "processes": processes})
        # output to files, not pipes: a process blocked on a full pipe would stall the others
        logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, args],
                env=dict(env, JAX_PROCESS_ID=str(i)),
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i, log in enumerate(logs)
        ]
        for p in procs:
            p.wait()
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
        if any(p.returncode for p in procs):
            sys.exit(f"{processes} processes failed:\n{outs[0][-3000:]}\n{outs[-1][-3000:]}")
        rows.append(json.loads(outs[0].split("RESULT")[-1].splitlines()[0]))
    ratios = [
        b["examples_per_second"] / r["examples_per_second"]
        for r, b in zip(rows[::2], rows[1::2], strict=True)
    ]
    print(
        f"{a.estimator}, S={a.num_particles}, batch {a.batch_size}, hidden {a.hidden}, latent "
        f"{a.latent_dim}, {rows[0]['platform']} ({rows[0]['device_kind']}), jax {rows[0]['jax']}, "
        f"{os.cpu_count()} cores"
    )
    print(
        "| pair | processes x devices | examples/s | ratio to 1 process | log_joint evals / step |"
    )
    print("| --- | --- | --- | --- | --- |")
    for i, r in enumerate(rows):
        base = rows[i - i % 2]["examples_per_second"]
        print(
            f"| {i // 2 + 1} | {r['processes']} x {r['devices'] // r['processes']} | "
            f"{r['examples_per_second']:.0f} | {r['examples_per_second'] / base:.2f} | "
            f"{r['log_joint_evals_per_step']:.0f} |"
        )
    print(
        f"{a.processes} x {per} / 1 x {total} examples/s: median {statistics.median(ratios):.2f} "
        f"over {len(ratios)} pairs (" + ", ".join(f"{x:.2f}" for x in ratios) + ")"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
