"""The couplings notebook (Bayesian logistic regression) runs end to end, so it cannot rot.

Unlike tests/test_notebook.py it keeps XLA's default optimisation level: this notebook is bound by
run time (coupled HMC loops), not by compilation, and level 0 made such programs several times
slower here (tests/_fast_compile.py says the same of the statistical tests).
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "couplings_logistic_regression.ipynb"


@pytest.mark.slow
def test_couplings_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "suggested k" in outputs and "long MCMC run" in outputs
    assert "predictive P(y=1 | x_new)" in outputs
    assert not any(
        o.get("output_type") == "error"
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
