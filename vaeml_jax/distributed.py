"""Data parallelism over devices and processes with ``jax.sharding``: one code path for 1 or N.

The batch axis is sharded over a one-axis :class:`jax.sharding.Mesh` named ``"batch"``; parameters
are replicated. :func:`data_parallel` runs an estimator under :func:`jax.shard_map`, so every
device runs its OWN ``lax.while_loop`` over the coupled chains of the examples it holds: a shard
stops as soon as its own chains have met instead of waiting for the slowest example of the global
batch. Gradients are averaged across devices with one ``pmean`` (the compiler's all-reduce);
``info`` keeps per-example values, sharded like the batch.

Randomness is per example: the global key is split into one key per (example, chain) before
sharding, so the same seed gives the same estimate on 1 and on N devices (up to the order of the
floating-point reduction).

Several processes (hosts, or several processes on one machine): every process calls
:func:`initialize` before anything else touches JAX; ``jax.devices()`` then lists every device of
every process and the same mesh and code run unchanged. The mesh lists each process's devices as
one contiguous block, so a process holds a contiguous block of every batch's rows
(:func:`process_rows`). Every process holds the same data, derives the same epoch (permutation and
binarization) from ``(seed, epoch)`` and keeps only the rows of its own devices
(:func:`shard_batches`): no data moves between processes. Host-side steps use the helpers here:
:func:`is_primary` (files and logs are written by process 0), :func:`to_host` (gather an array to
every process), :func:`check_same` (the processes agree on the config and the data),
:func:`agree` (one process's error stops them all, with its message) and :func:`sync`.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vaeml_jax.estimators._common import GradientEstimator, as_key, lane_keys

__all__ = [
    "BATCH_AXIS",
    "DistributedError",
    "initialize",
    "make_mesh",
    "data_parallel",
    "shard_batch",
    "shard_batches",
    "replicate",
    "num_devices",
    "check_divisible",
    "process_rows",
    "is_primary",
    "to_host",
    "check_same",
    "agree",
    "sync",
    "launch",
]

BATCH_AXIS = "batch"

# The environment variables :func:`initialize` reads (JAX's own names) and its time-out.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
TIMEOUT_ENV = "VAEML_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds for every process to reach the coordinator (JAX's default)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """The processes of a multi-process run cannot start or do not agree."""


# ------------------------------------------------------------------ joining a multi-process run


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float | None = None,
) -> None:
    """Join a multi-process run: :func:`jax.distributed.initialize` with what it needs set.

    Call it on every process before any other JAX call. Arguments default to the environment
    variables ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; without an address JAX detects the cluster itself (SLURM, Cloud TPU, Open
    MPI). ``timeout`` (default ``$VAEML_DISTRIBUTED_TIMEOUT``, else 300 s) bounds the wait for
    the coordinator and for every process to join.

    On CPU, cross-process collectives need an implementation: gloo is selected here (unless
    ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` names another). A process other than 0 first checks
    that the coordinator answers, and raises :class:`DistributedError` naming the address after
    ``timeout`` rather than waiting forever; should the processes not all join within ``timeout``,
    a line on stderr says so before JAX stops the process.

    Calling it again in a process that already joined does nothing.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    address = coordinator_address or env.get(COORDINATOR_ENV) or None
    try:
        if num_processes is None and env.get(NUM_PROCESSES_ENV):
            num_processes = int(env[NUM_PROCESSES_ENV])
        if process_id is None and env.get(PROCESS_ID_ENV):
            process_id = int(env[PROCESS_ID_ENV])
        if timeout is None:
            timeout = float(env.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
    except ValueError as e:
        raise DistributedError(
            f"{NUM_PROCESSES_ENV}, {PROCESS_ID_ENV} and {TIMEOUT_ENV} must be numbers ({e})."
        ) from None
    if address is not None and (num_processes is None or process_id is None):
        raise DistributedError(
            f"{COORDINATOR_ENV}={address} is set but not {NUM_PROCESSES_ENV} and "
            f"{PROCESS_ID_ENV}: every process needs the number of processes and its own id "
            "(0 on the coordinator's host)."
        )
    if num_processes is not None and process_id is not None:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedError(
                f"process id {process_id} is not in 0..{num_processes - 1} "
                f"({NUM_PROCESSES_ENV}={num_processes})."
            )
    if not timeout > 0:
        raise DistributedError(f"the time-out must be > 0 seconds, got {timeout}.")
    _select_cpu_collectives()
    who = "" if process_id is None else f" (process {process_id} of {num_processes})"
    if address is not None and process_id != 0:
        _wait_for_coordinator(address, timeout, who)
    watchdog = threading.Timer(timeout, _report_join_timeout, (address, timeout, who))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            # JAX ends the process itself at its time-out: ours (a message first) comes earlier.
            initialization_timeout=int(timeout) + 10,
        )
    except Exception as e:
        raise DistributedError(
            f"could not join the multi-process run{who} at "
            f"{address or 'the auto-detected coordinator'}: {e}"
        ) from e
    finally:
        watchdog.cancel()


def _select_cpu_collectives() -> None:
    """gloo for cross-process collectives on CPU (before the CPU backend starts)."""
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        return  # the user's choice
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise DistributedError(
                "JAX was already used in this process; join the multi-process run "
                "(vaeml_jax.distributed.initialize) before any other JAX call."
            )
    except ImportError:  # pragma: no cover - a JAX without the private module
        pass
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _wait_for_coordinator(address: str, timeout: float, who: str) -> None:
    """Poll ``host:port`` until it accepts a TCP connection; DistributedError after ``timeout``."""
    host, _, port = address.rpartition(":")
    try:
        port_number = int(port)
    except ValueError:
        raise DistributedError(
            f"the coordinator address {address!r} must be host:port (e.g. 10.0.0.1:1234)."
        ) from None
    host = host.strip("[]") or "127.0.0.1"
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port_number), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            last = e
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    raise DistributedError(
        f"cannot reach the coordinator at {address}{who} within {timeout:g} s ({last}). Start "
        f"process 0 on that host and port (it runs the coordinator), check {COORDINATOR_ENV} on "
        f"every process and that the port is open between the hosts; ${TIMEOUT_ENV} sets the "
        "wait."
    )


def _report_join_timeout(address: str | None, timeout: float, who: str) -> None:
    print(
        f"vaeml: error: not every process joined the multi-process run{who} at "
        f"{address or 'the auto-detected coordinator'} within {timeout:g} s; check that all "
        f"{os.environ.get(NUM_PROCESSES_ENV, 'N')} processes were started with the same "
        f"{COORDINATOR_ENV} and distinct {PROCESS_ID_ENV} (${TIMEOUT_ENV} sets the wait). "
        "Stopping.",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


# ------------------------------------------------------------------ the mesh


def make_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("batch",)`` over all visible devices, the first ``devices``, or a list.

    The devices are ordered by process, so each process holds one contiguous block of the batch.
    With several processes, ``devices=N`` takes the first N / P devices of each of the P
    processes (N must be a multiple of P).

    Raises:
      ValueError: if more devices are asked for than are visible, or fewer than one.
    """
    available = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    processes = jax.process_count()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"--devices {devices} asked for, but {len(available)} device(s) are visible "
                f"({available[0].platform}"
                + (f", over {processes} processes" if processes > 1 else "")
                + f"); choose 1..{len(available)}."
            )
        if processes > 1:
            if devices % processes:
                raise ValueError(
                    f"--devices {devices} does not split evenly over {processes} processes; "
                    f"use a multiple of {processes} (every process takes the same number)."
                )
            per = devices // processes
            chosen = [d for p in range(processes) for d in _process_devices(available, p)[:per]]
        else:
            chosen = available[:devices]
    else:
        chosen = sorted(devices, key=lambda d: (d.process_index, d.id))
        if not chosen:
            raise ValueError("the device list is empty.")
    return Mesh(chosen, (BATCH_AXIS,))


def _process_devices(devices: Sequence[jax.Device], process: int) -> list[jax.Device]:
    return [d for d in devices if d.process_index == process]


def num_devices(mesh: Mesh) -> int:
    return mesh.devices.size


def _num_processes(mesh: Mesh) -> int:
    return len({d.process_index for d in mesh.devices.flat})


def check_divisible(batch_size: int, mesh: Mesh) -> None:
    n = num_devices(mesh)
    if batch_size % n:
        p = _num_processes(mesh)
        where = f"{n} devices" + (f" ({p} processes x {n // p} devices)" if p > 1 else "")
        raise ValueError(
            f"batch size {batch_size} does not divide evenly over {where}; "
            f"use a multiple of {n} (e.g. {((batch_size + n - 1) // n) * n}) or fewer devices."
        )


def process_rows(rows: int, mesh: Mesh) -> slice:
    """The rows of a batch of ``rows`` (sharded over ``mesh``) that this process's devices hold.

    A contiguous block, the same for every batch: a pure function of the process index.
    """
    check_divisible(rows, mesh)
    flat = list(mesh.devices.flat)
    mine = [i for i, d in enumerate(flat) if d.process_index == jax.process_index()]
    if not mine:
        return slice(0, 0)
    per = rows // len(flat)
    return slice(mine[0] * per, (mine[-1] + 1) * per)


# ------------------------------------------------------------------ placing data


def shard_batch(x: Any, mesh: Mesh) -> jax.Array:
    """Place an array with the leading (batch) axis sharded over the mesh.

    With several processes, every process passes the same ``x`` (the whole batch) and keeps the
    rows of its own devices.
    """
    check_divisible(x.shape[0], mesh)
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    rows = process_rows(x.shape[0], mesh)
    return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)


def shard_batches(batches: Any, mesh: Mesh) -> jax.Array:
    """Place an epoch of batches (steps, B, ...) with the batch axis (axis 1) sharded.

    With several processes, every process passes the same epoch (derived from the seed) and keeps
    the rows of its own devices, :func:`process_rows`: each builds only its addressable shards.
    """
    check_divisible(batches.shape[1], mesh)
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(batches, sharding)
    rows = process_rows(batches.shape[1], mesh)
    return jax.make_array_from_process_local_data(sharding, batches[:, rows], batches.shape)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree replicated on every device of the mesh.

    With several processes every process passes the same values (built from the same seed, or
    read from the same checkpoint); each places its own copies, nothing is sent between them.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def leaf(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                leaf(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        host = np.asarray(to_host(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(leaf, tree)


def to_host(tree: Any) -> Any:
    """Every leaf of ``tree`` as a numpy array, whole, on every process.

    Arrays split over several processes are gathered (a collective: every process must call
    this at the same point); replicated and single-process arrays are just copied to the host.
    """

    def leaf(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(leaf, tree)


# ------------------------------------------------------------------ agreement between processes


def is_primary() -> bool:
    """True in the process that writes files and logs (process 0; the only one when alone)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process has reached the point called ``name`` (nothing when alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _allgather_host(values: np.ndarray) -> np.ndarray:
    """(P, ...) stack of every process's ``values`` (int32), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))


def check_same(items: Mapping[str, Any]) -> None:
    """Raise :class:`DistributedError` if the processes hold different ``items`` (hashes compared).

    ``items`` maps what is compared ("the training config", "the training data") to a string or
    a buffer (bytes, a contiguous numpy array); only 8-byte digests travel between processes.
    Every process must call this at the same point.
    """
    if jax.process_count() == 1:
        return
    names = list(items)

    def digest(v) -> np.ndarray:
        data = v.encode() if isinstance(v, str) else np.ascontiguousarray(v)
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (it is a buffer at run time)
        h = hashlib.blake2b(data, digest_size=8)  # type: ignore[arg-type]
        return np.frombuffer(h.digest(), np.int32)

    everyone = _allgather_host(np.stack([digest(v) for v in items.values()]))  # (P, items, 2)
    same = (everyone == everyone[:1]).all(axis=2)  # (P, items)
    bad = [n for i, n in enumerate(names) if not same[:, i].all()]
    if bad:
        differ = [p for p in range(len(everyone)) if not same[p].all()]
        raise DistributedError(
            f"the processes disagree on {' and '.join(bad)}: process(es) "
            f"{', '.join(map(str, differ))} differ from process 0 (seen by process "
            f"{jax.process_index()} of {jax.process_count()}). Start every process with the same "
            "command and options, and give every host the same data (the same files, or a "
            "shared file system)."
        )


def agree(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every process; if it raises on any, raise on all (a collective).

    The process that failed raises its own error; the others raise :class:`DistributedError`
    naming it, instead of waiting for it in the next collective. Alone, this is ``fn()``.
    """
    error: BaseException | None = None
    out: T | None = None
    try:
        out = fn()
    except Exception as e:
        error = e
    if jax.process_count() > 1:
        failed = np.flatnonzero(_allgather_host(np.array([error is not None]))[:, 0])
        if error is None and failed.size:
            raise DistributedError(
                f"process {int(failed[0])} failed {what} (its error is in its log); process "
                f"{jax.process_index()} stops too."
            )
    if error is not None:
        raise error
    return cast(T, out)  # fn() returned it (not narrowed to T: T itself may include None)


def _is_global(x: Any) -> bool:
    """A concrete array with devices in other processes."""
    return (
        isinstance(x, jax.Array)
        and not isinstance(x, jax.core.Tracer)
        and not x.is_fully_addressable
    )


def data_parallel(
    estimator: GradientEstimator, mesh: Mesh
) -> Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]:
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

        # (on this process's rows when the batch spans several processes)
        check_batch(estimator.model, params, x.addressable_data(0) if _is_global(x) else x)
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


# ------------------------------------------------------------------ local multi-process runs


def launch(
    command: Sequence[str],
    *,
    num_processes: int = 2,
    cpu_devices: int | None = None,
    port: int | None = None,
    timeout: float | None = None,
) -> int:
    """Run ``vaeml COMMAND ...`` as ``num_processes`` processes of one run on this machine.

    Each process gets ``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (a free port unless ``port``),
    ``JAX_NUM_PROCESSES`` and its ``JAX_PROCESS_ID``; ``--distributed`` is added to ``train`` and
    ``evaluate``. ``cpu_devices=K`` runs every process on the CPU split into K devices. Process
    0's output is the run's log (the others print only errors). Should a process fail or be
    killed, the others are stopped at once (they would otherwise wait for it in the next
    collective). Returns the exit status: 0, or the first failure's (128 + signal if killed).
    """
    import signal
    import subprocess

    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}.")
    args = list(command)
    if args and args[0] in ("train", "evaluate") and "--distributed" not in args:
        args.append("--distributed")
    port = port or _free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ)
        env.update(
            {
                COORDINATOR_ENV: f"127.0.0.1:{port}",
                NUM_PROCESSES_ENV: str(num_processes),
                PROCESS_ID_ENV: str(i),
            }
        )
        if timeout is not None:
            env[TIMEOUT_ENV] = str(timeout)
        if cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
            flag = f"--xla_force_host_platform_device_count={cpu_devices}"
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
        procs.append(subprocess.Popen([sys.executable, "-m", "vaeml_jax.cli", *args], env=env))
        print(
            f"vaeml launch: process {i} of {num_processes}: pid {procs[-1].pid}",
            file=sys.stderr,
            flush=True,
        )

    def stop(others) -> None:
        for p in others:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in others:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                how = (
                    f"was killed by {signal.Signals(-code).name}"
                    if code < 0
                    else f"exited with status {code}"
                )
                print(
                    f"vaeml launch: process {i} {how}; stopping the others.",
                    file=sys.stderr,
                    flush=True,
                )
                stop(procs)
                return 128 - code if code < 0 else code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop(procs)
        return 130


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
