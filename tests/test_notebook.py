"""The quickstart notebook runs end to end (tiny settings) so it cannot rot."""

from pathlib import Path

import _fast_compile
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.setenv("VAEML_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("VAEML_DATA_DIR", str(mnist_dir))  # a folder with mnist/ in any clone
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_FLAGS", _fast_compile.XLA_FLAGS)  # compile-bound
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "test log-likelihood" in outputs
    assert "unbiased" in outputs and "iwae" in outputs
    assert not any(
        o.get("output_type") == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
