"""Shared fixtures. Nothing here downloads.

Data: tests that need only MNIST take ``mnist_dir``, a folder holding ``mnist/``: the data folder
below if it has one, else the copy shipped inside the package, so they run anywhere. Tests that
need the other datasets (Fashion-MNIST, binarized MNIST, Omniglot) take ``data_dir``: the folder
named by ``$VAEML_DATA_DIR`` (else ``../shared/data`` next to the repository, where it exists);
without it they are skipped, with a reason that says how to get the data. CI sets
``VAEML_DATA_DIR``, so it runs every test.
"""

import os
from pathlib import Path

import jax
import pytest

import vaeml_jax

REPO = Path(__file__).resolve().parents[1]
PACKAGED_DATA = Path(vaeml_jax.__file__).resolve().parent / "_data"  # holds mnist/

# XLA compilation dominates this suite (an unbiased estimator takes ~10 s to compile on CPU), and
# several tests build identical programs: share compiled executables across tests and xdist workers.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# The `vaeml` commands tests start as subprocesses use the same cache, not the user's own.
os.environ.setdefault("VAEML_COMPILATION_CACHE", str(REPO / ".jax_cache"))

NO_DATA_REASON = (
    "needs the datasets folder (mnist/, fashion-mnist/, binarized-mnist/, omniglot/ as described "
    "in docs/data.md); set VAEML_DATA_DIR to it to run this test"
)


def shared_data_dir() -> Path | None:
    """``$VAEML_DATA_DIR``, else ``../shared/data`` if it exists, else None."""
    env = os.environ.get("VAEML_DATA_DIR")
    if env:
        return Path(env)
    d = REPO.parent / "shared" / "data"
    return d if d.is_dir() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of every dataset; the test is skipped (saying how to get it) without one."""
    d = shared_data_dir()
    if d is None or not d.is_dir():
        pytest.skip(NO_DATA_REASON + (f" ({d} does not exist)" if d is not None else ""))
    return d


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """A folder holding ``mnist/``: the data folder's, or the copy shipped in the package."""
    d = shared_data_dir()
    if d is not None and (d / "mnist").is_dir():
        return d
    return PACKAGED_DATA
