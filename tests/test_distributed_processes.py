"""Multi-process runs on one machine (JAX's multi-controller runtime, CPU collectives by gloo):
`vaeml launch -n 2 --cpu-devices 2` against one process with 4 forced CPU devices, same seed.

* training: the same parameters and the same metrics.jsonl, written once;
* a process SIGKILLed mid-run, both restarted with --resume: the parameters of an uninterrupted run;
* evaluation: the 2-process checkpoint evaluates in 1 process to the 1 x 4 run's number, and
  `vaeml evaluate` in 2 processes gives the number of 1 process;
* the errors: a batch that does not divide over the devices of all processes, processes started
  with different options, a coordinator that cannot be reached, a process that never joins.

Every run is a subprocess (XLA_FLAGS and the distributed runtime must precede JAX's start-up);
tiny model, few steps, XLA's unoptimised backend and a shared compilation cache keep it short.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import _fast_compile
import jax
import numpy as np
import pytest
from conftest import REPO

TINY = [
    "--hidden", "16", "--latent-dim", "3", "-S", "3", "--batch-size", "40",
    "--max-train-examples", "640", "--epochs", "2", "--warm-start-epochs", "0",
    "--num-slots", "none", "--no-progress",
]  # fmt: skip
EVALUATE = [
    "--num-samples", "20", "--chunk-size", "10", "--max-test-examples", "60",
    "--batch-size", "20", "--elbo-samples", "2", "--no-progress",
]  # fmt: skip
TIMING = {"wall_time", "examples_per_second", "compile_seconds", "eval_seconds"}


def _vaeml(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaeml_jax.cli", *args]


def _launch(*args: str) -> list[str]:
    return _vaeml("launch", "-n", "2", "--cpu-devices", "2", "--", *args)


def _env(mnist_dir, devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, VAEML_DATA_DIR=str(mnist_dir), JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = _fast_compile.XLA_FLAGS  # compile-bound; not the caller's flags
    if devices:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    return env


def _run(cmd: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _run_killed(out, env) -> str:
    """Launch a 2-process run, SIGKILL process 1 once the checkpoint of epoch 1 is written (in
    epoch 2); returns the launcher's stderr."""
    log = out / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _launch("train", *TINY, "--out", str(out / "killed")),
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 300
            while not (out / "killed" / "checkpoints" / "1").is_dir():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.02)
            time.sleep(0.2)  # into epoch 2
            pid = int(re.search(r"process 1 of 2: pid (\d+)", log.read_text()).group(1))
            os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return log.read_text()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("processes")
    seconds = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        res = fn()
        seconds[name] = time.perf_counter() - t0
        return res

    logs = {}
    logs["four"] = timed(
        "train 1x4", lambda: _run(_vaeml("train", *TINY, "--out", str(out / "four")),
                                  _env(mnist_dir, 4))
    )  # fmt: skip
    logs["two"] = timed(
        "train 2x2", lambda: _run(_launch("train", *TINY, "--out", str(out / "two")),
                                  _env(mnist_dir))
    )  # fmt: skip
    logs["killed"] = timed("train 2x2 killed", lambda: _run_killed(out, _env(mnist_dir)))
    logs["resumed"] = timed(
        "train 2x2 resumed",
        lambda: _run(_launch("train", "--out", str(out / "killed"), "--resume", "--no-progress"),
                     _env(mnist_dir)),
    )  # fmt: skip
    logs["eval2"] = timed(
        "evaluate 2x2",
        lambda: _run(_launch("evaluate", str(out / "two"), *EVALUATE, "--output",
                             str(out / "two_on_2x2.json")), _env(mnist_dir)),
    )  # fmt: skip
    # both runs in one process with one device (one Python start, one compilation)
    script = (
        "import sys; from vaeml_jax import cli\n"
        "for run in ('two', 'four'):\n"
        f"    assert cli.main(['evaluate', '{out}/' + run, *{EVALUATE!r}, "
        f"'--output', '{out}/' + run + '_on_1.json']) == 0\n"
    )
    logs["eval1"] = timed("evaluate 1x1", lambda: _run([sys.executable, "-c", script],
                                                         _env(mnist_dir)))  # fmt: skip
    print("multi-process test runs (s):", {k: round(v, 1) for k, v in seconds.items()})
    return out, logs


def _params(run_dir):
    from vaeml_jax.training import load_run

    _, _, params, epoch = load_run(run_dir)
    return epoch, [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_same_params(a, b):
    (ea, pa), (eb, pb) = _params(a), _params(b)
    assert ea == eb
    scale = max(1.0, max(float(np.max(np.abs(p))) for p in pb))
    for p, q in zip(pa, pb, strict=True):
        np.testing.assert_allclose(p, q, atol=1e-5 * scale, rtol=0)


def _assert_same_metrics(a, b):
    from vaeml_jax.training import read_metrics

    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb, strict=True):
        assert set(x) - TIMING == set(y) - TIMING
        for key in set(x) - TIMING:
            if isinstance(x[key], float):
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, err_msg=key)
            elif key != "num_devices":
                assert x[key] == y[key], key
        assert x["num_devices"] == y["num_devices"] == 4


def test_two_processes_train_like_one_with_four_devices(runs):
    out, logs = runs
    _assert_same_params(out / "two", out / "four")
    _assert_same_metrics(out / "two", out / "four")
    # process 0 alone reports and writes the run directory's files
    assert logs["two"].stdout.count("trained 2 epochs") == 1
    assert logs["two"].stderr.count("epoch 2/2") == 1
    assert json.loads((out / "two" / "config.json").read_text())["seed"] == 0
    assert np.load(out / "two" / "meeting_times.npy").shape == (640, 1)


def test_killed_process_resumes_to_the_uninterrupted_parameters(runs):
    out, logs = runs
    assert "process 1 was killed by SIGKILL; stopping the others" in logs["killed"]
    assert "resuming" in logs["resumed"].stderr and "epoch 1" in logs["resumed"].stderr
    _assert_same_params(out / "killed", out / "two")
    _assert_same_metrics(out / "killed", out / "four")


def test_two_process_checkpoint_evaluates_in_one_process(runs):
    out, _ = runs
    a = json.loads((out / "two_on_1.json").read_text())
    b = json.loads((out / "four_on_1.json").read_text())
    for key in ("test_log_likelihood", "test_elbo"):
        assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, a[key], b[key])


def test_evaluate_in_two_processes_matches_one(runs):
    out, logs = runs
    two = json.loads((out / "two_on_2x2.json").read_text())
    one = json.loads((out / "two_on_1.json").read_text())
    assert (two["num_processes"], one["num_processes"]) == (2, 1)
    assert two["num_examples"] == one["num_examples"] == 60
    for key in ("test_log_likelihood", "test_elbo", "test_log_likelihood_stderr"):
        assert abs(two[key] - one[key]) <= 1e-5 * abs(one[key]), (key, two[key], one[key])
    assert logs["eval2"].stdout.count("test log-likelihood") == 1  # printed by process 0


# ---- errors that name the problem --------------------------------------------------------------


def test_batch_not_divisible_over_all_processes_devices(tmp_path, mnist_dir):
    args = [*TINY, "--batch-size", "30", "--out", str(tmp_path / "bad")]
    proc = subprocess.run(
        _launch("train", *args), capture_output=True, text=True, env=_env(mnist_dir), timeout=120
    )
    assert proc.returncode == 1
    assert "batch size 30 does not divide evenly over 4 devices (2 processes x 2 devices)" in (
        proc.stderr
    )
    assert not (tmp_path / "bad").exists()


def test_processes_with_different_options_are_refused(tmp_path, mnist_dir):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _vaeml(
                "train", *TINY, "--seed", str(i), "--out", str(tmp_path / "run"), "--distributed"
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(
                mnist_dir,
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
        )  # fmt: skip
        for i in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 1, err[-2000:]
        assert "the processes disagree on the training config" in err, err[-2000:]
    assert not (tmp_path / "run").exists()


def test_unreachable_coordinator_and_missing_process_time_out(tmp_path, mnist_dir):
    port = _free_port()
    common = dict(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES="2",
        VAEML_DISTRIBUTED_TIMEOUT="3",
    )
    args = _vaeml("train", *TINY, "--out", str(tmp_path / "run"), "--distributed")
    t0 = time.monotonic()
    # process 1 with no coordinator; then process 0 (the coordinator) whose peer never comes
    lone = subprocess.run(
        args, capture_output=True, text=True, timeout=120,
        env=_env(mnist_dir, **common, JAX_PROCESS_ID="1"),
    )  # fmt: skip
    alone = subprocess.run(
        args, capture_output=True, text=True, timeout=120,
        env=_env(mnist_dir, **common, JAX_PROCESS_ID="0"),
    )  # fmt: skip
    assert time.monotonic() - t0 < 90  # timed out, did not hang
    assert lone.returncode == 1
    assert f"cannot reach the coordinator at 127.0.0.1:{port} (process 1 of 2) within 3 s" in (
        lone.stderr
    )
    assert alone.returncode == 1
    assert "not every process joined the multi-process run (process 0 of 2)" in alone.stderr


def _free_port() -> int:
    from vaeml_jax.distributed import _free_port

    return _free_port()


def test_launch_needs_a_vaeml_command(capsys):
    from vaeml_jax import cli

    assert cli.main(["launch", "-n", "2"]) == 1
    assert "needs a command after --" in capsys.readouterr().err
    assert cli.main(["launch", "-n", "2", "--", "python", "x.py"]) == 1
    assert "runs train, evaluate or plot, not 'python'" in capsys.readouterr().err
