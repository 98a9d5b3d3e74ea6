"""Shared fixtures. Nothing here downloads: real data comes from VAEML_DATA_DIR or
../shared/data."""

import os
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]

# XLA compilation dominates this suite (an unbiased estimator takes ~10 s to compile on CPU), and
# several tests build identical programs: share compiled executables across tests and xdist workers.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def shared_data_dir() -> Path:
    env = os.environ.get("VAEML_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "mnist").is_dir():
        pytest.fail(
            f"real test data not found at {d}; set VAEML_DATA_DIR to the shared data folder"
        )
    return d
