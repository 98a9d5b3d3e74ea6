"""Data parallelism over devices and hosts with ``jax.sharding``: one code path for 1 or N devices.

The batch axis is sharded over a one-axis :class:`jax.sharding.Mesh` named ``"batch"``; parameters
are replicated. :func:`data_parallel` runs an estimator under :func:`jax.shard_map`, so every
device runs its OWN ``lax.while_loop`` over the coupled chains of the examples it holds: a shard
stops as soon as its own chains have met instead of waiting for the slowest example of the global
batch. Gradients are averaged across devices with one ``pmean`` (the compiler's all-reduce);
``info`` keeps per-example values, sharded like the batch.

Randomness is per example: the global key is split into one key per (example, chain) before
sharding, so the same seed gives the same estimate on 1 and on N devices (up to the order of the
floating-point reduction).

Multiple hosts: call ``jax.distributed.initialize()`` at start-up on every host (see the README's
launch example); ``jax.devices()`` then lists every device of every host and the same mesh and code
run unchanged, each host feeding the global batch (every host holds the same data and derives the
same epoch permutation from the seed, so no data needs to move between hosts).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaeml_jax.estimators._common import GradientEstimator, as_key, lane_keys

__all__ = [
    "BATCH_AXIS",
    "make_mesh",
    "data_parallel",
    "shard_batch",
    "shard_batches",
    "replicate",
    "num_devices",
    "check_divisible",
]

BATCH_AXIS = "batch"


def make_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("batch",)`` over all visible devices, the first ``devices``, or a list.

    Raises:
      ValueError: if more devices are asked for than are visible, or fewer than one.
    """
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"--devices {devices} asked for, but {len(available)} device(s) are visible "
                f"({available[0].platform}); choose 1..{len(available)}."
            )
        chosen = available[:devices]
    else:
        chosen = list(devices)
        if not chosen:
            raise ValueError("the device list is empty.")
    return Mesh(chosen, (BATCH_AXIS,))


def num_devices(mesh: Mesh) -> int:
    return mesh.devices.size


def check_divisible(batch_size: int, mesh: Mesh) -> None:
    n = num_devices(mesh)
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} does not divide evenly over {n} devices; "
            f"use a multiple of {n} (e.g. {((batch_size + n - 1) // n) * n}) or fewer devices."
        )


def shard_batch(x, mesh: Mesh):
    """Place an array with the leading (batch) axis sharded over the mesh."""
    check_divisible(x.shape[0], mesh)
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXIS)))


def shard_batches(batches, mesh: Mesh):
    """Place an epoch of batches (steps, B, ...) with the batch axis (axis 1) sharded."""
    check_divisible(batches.shape[1], mesh)
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(batches, sharding)
    # Several hosts: every host built the same epoch from the same seed; each supplies its shards.
    host = np.asarray(batches)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: Mesh):
    """Place a pytree replicated on every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def data_parallel(estimator: GradientEstimator, mesh: Mesh):
    """Wrap an estimator so its batch is split over ``mesh``: ``grads, info = f(params, x, key)``.

    Same contract as the estimator itself (grads of the batch-mean loss, per-example info), with
    ``info["num_log_joint_evals"]`` summed over devices. The batch size must be a multiple of the
    number of devices (a clear ValueError otherwise). With a one-device mesh this is the plain
    estimator up to floating-point rounding.
    """
    if not isinstance(estimator, GradientEstimator):
        raise TypeError("data_parallel takes an estimator made by vaeml_jax.make_*_grad.")
    spec_b = PartitionSpec(BATCH_AXIS)

    def local(params, x, keys):
        grads, info = estimator.with_lane_keys(params, x, keys)
        grads = jax.lax.pmean(grads, BATCH_AXIS)
        info = dict(info)
        info["num_log_joint_evals"] = jax.lax.psum(info["num_log_joint_evals"], BATCH_AXIS)
        return grads, info

    info_specs = {
        "meeting_time": spec_b,
        "num_iters": spec_b,
        "capped": spec_b,
        "num_log_joint_evals": PartitionSpec(),
        "bound": spec_b,
    }

    def run(params, x, key):
        from vaeml_jax.models.interface import check_batch

        check_batch(estimator.model, params, x)
        check_divisible(x.shape[0], mesh)
        keys = lane_keys(as_key(key), x.shape[0], estimator.num_chains)
        # Compile-time info structure: any extra keys an estimator adds stay per-example (sharded).
        out_info = jax.eval_shape(estimator.with_lane_keys, params, x, keys)[1]
        specs = {
            name: info_specs.get(name, spec_b if jnp.ndim(v) else PartitionSpec())
            for name, v in out_info.items()
        }
        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), spec_b, spec_b),
            out_specs=(PartitionSpec(), specs),
            check_vma=False,
        )
        return sharded(params, x, keys)

    return run
