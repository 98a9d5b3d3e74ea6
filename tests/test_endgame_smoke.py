"""Smoke test: ``benchmarks/endgame.py --quick`` runs phase 1, phase 2 (IWAE-5 with replicates,
the unbiased estimator and its compute-matched IWAE), the scoring and the summary end to end, and
``--resume`` reuses every finished piece (no assertions on the numbers of a 50-image, 16-unit run).
``--plan`` resolves the real settings without running anything.

Runtime on the shared 2-core CPU with the repository's compilation cache warm: ~27 s of CPU (almost
all XLA compilation), 35 s wall at load average ~4, ~2 min at load average ~8; ~4 min cold.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import _fast_compile
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "benchmarks" / "endgame.py")


def _run(args, data_dir):
    return _fast_compile.run_python([SCRIPT, *args], data_dir)


@pytest.mark.slow
def test_endgame_quick_runs_every_phase_and_resumes(data_dir, tmp_path):
    out, js = tmp_path / "eg", tmp_path / "eg.json"
    args = ["--quick", "--seeds", "0", "--methods", "iwae5", "unbiased", "iwae_matched"]
    proc = _run([*args, "--out", str(out), "--json", str(js)], data_dir)
    assert "### The endgame on the paper's MLP" in proc.stdout
    res = json.loads(js.read_text())
    assert [r["model"] for r in res["scores"]] == ["start", "iwae5", "unbiased", "iwae_matched"]
    runs = res["runs"]["0"]
    assert len(runs["iwae5"]) == 2 and len(runs["unbiased"]) == 2  # --quick: 2 replicates
    matched = runs["iwae_matched"][0]["S"]
    assert matched == max(2, round(runs["unbiased"][0]["evals_per_example_step"]))
    rates = {r["method"]: r for r in res["rates"]}
    assert rates["iwae5"]["spread"] == "replicates"
    assert rates["iwae_matched"]["spread"] == "to final"
    for name in ("objective_vs_evals.png", "objective_vs_seconds.png", "spread_vs_n.png"):
        assert (out / name).stat().st_size > 1000
    assert "| unbiased | 5 |" in (out / "results.md").read_text()
    # the fixed-point noise study: 4 images x 16 draws, groups of n = 1, 2 (>= 16 pairs)
    assert [r["method"] for r in res["noise"]] == ["iwae5", "unbiased"]
    assert res["noise_per_seed"]["0"]["unbiased"]["n"] == [1, 2]
    assert "#### Averaging the gradient noise at the shared start" in proc.stdout
    # resuming reuses every finished piece: nothing is trained or scored again
    again = _run([*args, "--out", str(out), "--resume"], data_dir)
    head = again.stdout.split("### The endgame")[0]
    assert "phase 2: unbiased" in head
    assert "s/step" not in head and "MAP objective" not in head and "scored" not in head
    assert "noise at the start" not in head
    # without --resume an existing run is refused
    env = dict(os.environ, VAEML_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
    bad = subprocess.run(
        [sys.executable, SCRIPT, *args, "--out", str(out)], env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--resume" in bad.stderr


def test_endgame_plan_resolves_the_real_settings(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import endgame
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    p = endgame.main(["--plan"])["plan"]
    assert p["data"]["n_train"] == 1000 and p["model"]["hidden"] == [200, 200]
    assert p["model"]["weight_decay"] == pytest.approx(1e-3)  # default 1/N
    assert p["phase2"]["methods"] == list(endgame.DEFAULT_METHODS)
    assert p["phase2"]["snapshots_n"][-1] == p["phase2"]["steps"] - p["phase2"]["burn_in"]
    # IWAE-500 on 100 random images per step (IWAE-50's evaluations per step), the rest all N
    assert p["phase2"]["batch"] == {m: 100 if m == "iwae500" else 1000 for m in endgame.METHODS}
    full = endgame.main(["--plan", "--iwae500-batch", "0"])["plan"]
    assert set(full["phase2"]["batch"].values()) == {1000}
    assert p["scoring"]["models"][0] == "start" and p["seeds"] == [0, 1, 2]
    assert '"phase1"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        endgame.main(["--plan", "--methods", "iwae5", "iwae_matched"])  # needs unbiased
    # --quick shrinks what is not given; an explicit option wins even when it equals the default
    q = endgame.parse_args(["--quick", "--steps", "300", "--n-train=1000"])
    assert (q.steps, q.n_train, q.burn_in) == (300, 1000, endgame.QUICK["burn_in"])


def test_noise_spread_finds_the_averaging_exponent():
    """The fixed-point noise study's analysis on draws of known law (32 images x 128 draws, 16
    coordinates, per-image means far apart): Gaussian noise averages like n^-1/2 in both spreads;
    symmetric Pareto noise with tail index alpha has a median spread falling like
    n^(1/alpha - 1), while its sample root mean square still says -1/2. Seeded; the bands are
    several times the seed-to-seed spread of the slopes (0.02-0.04). Planted bugs it catches:
    groups pooled across images without differencing (the one-draw spread is then the images'
    spread, ~5x), and the root mean square in place of the median (slope -0.50 at alpha 1.2)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import endgame
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    import numpy as np

    rng = np.random.default_rng(0)
    means = 5.0 * rng.normal(size=(32, 1, 16))  # must cancel: pairs within an image
    gauss = endgame.noise_spread(means + rng.normal(size=(32, 128, 16)))
    assert gauss["n"] == [1, 2, 4, 8, 16, 32, 64]
    assert abs(gauss["slope_median"] + 0.5) < 0.05 and abs(gauss["slope_sd"] + 0.5) < 0.05
    # the spread of ONE draw is the noise's, not the images' (median norm of N(0, I_16): 3.92)
    assert abs(gauss["spread_median"][0] - 3.92) < 0.2
    assert gauss["alpha_norm"] > 5
    for alpha in (1.2, 1.5):
        u = rng.random((32, 128, 16))
        heavy = endgame.noise_spread(means + rng.choice([-1.0, 1.0], u.shape) * u ** (-1 / alpha))
        assert abs(heavy["slope_median"] - (1 / alpha - 1)) < 0.1, (alpha, heavy["slope_median"])
        assert abs(heavy["slope_sd"] + 0.5) < 0.05
        assert abs(heavy["alpha_norm"] - alpha) < 0.4
