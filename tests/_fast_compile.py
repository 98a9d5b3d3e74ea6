"""XLA's unoptimised backend, for tests whose time is compilation, not execution.

Level 0 roughly halves XLA's CPU compile time (cold: reproduce smoke 161 -> 73 s, multi-device
script 74 -> 49 s on 2 cores) and changes no result these tests check. The statistical tests keep
the default: they are run-time bound and take about twice as long at level 0.
"""

import functools

import jax

# For subprocesses (XLA_FLAGS must be set before jax is imported there).
XLA_FLAGS = "--xla_backend_optimization_level=0"

# For in-process programs: one jit at a time.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def run_result_script(script: str, *args: str, env: dict | None = None, timeout: float = 900):
    """Run ``python -c script *args`` under the fast-compile flags (a subprocess: XLA_FLAGS and
    forced device counts must precede JAX's start-up) and return the JSON the script printed
    after ``RESULT`` on its last such line."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = XLA_FLAGS  # compile-bound; not the caller's flags
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT") :])


def run_python(args, data_dir, *, check: bool = True, timeout: float = 600):
    """``python *args`` in the repository root, on the CPU, under the fast-compile flags, with
    ``VAEML_DATA_DIR=data_dir`` (the benchmark scripts' smoke runs are compile-bound); returns the
    CompletedProcess, asserting exit status 0 unless ``check=False``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, VAEML_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
