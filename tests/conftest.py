"""Shared fixtures. Nothing here downloads: real data comes from VAEML_DATA_DIR or ../shared/data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    env = os.environ.get("VAEML_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = shared_data_dir()
    if not (d / "mnist").is_dir():
        pytest.fail(f"real test data not found at {d}; set VAEML_DATA_DIR to the shared data folder")
    return d
