"""Smoke tests: ``benchmarks/couplings_cost.py --quick`` and ``benchmarks/sumo_cost.py --quick``
run end to end (no timing asserted)."""

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


@pytest.mark.slow
def test_sumo_cost_quick_runs(monkeypatch, capsys):
    """Both schedules give the same gradient, and the work list never executes more."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sumo_cost

    (row,) = sumo_cost.main(["--quick"])
    assert row["worklist"] <= row["batch_max"]
    assert row["agree"]  # with git: the baseline's gradient; without: trivially
    assert "evaluations/example worklist" in capsys.readouterr().out
    sys.modules.pop("sumo_cost", None)
