"""Smoke test: ``benchmarks/couplings_cost.py --quick`` runs end to end (no timing asserted)."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_couplings_cost_quick_runs(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import couplings_cost

    ratio = couplings_cost.main(["--quick"])
    assert ratio.median > 0
    out = capsys.readouterr().out
    assert "ratio general / fused" in out and "tau mean" in out
    sys.modules.pop("couplings_cost", None)
