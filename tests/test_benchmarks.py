"""Smoke test: ``benchmarks/estimator_cost.py --quick`` runs end to end (it never asserts timings).

Runtime: ~60-90 s on a 2-core CPU, almost all of it XLA compiling the ~10 estimator variants.
"""

import json
import subprocess
import sys
from pathlib import Path

import _fast_compile
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_quick(script: str, args: list[str], mnist_dir) -> subprocess.CompletedProcess:
    """``benchmarks/<script> *args``, compile-bound: its exit status is the caller's to check."""
    return _fast_compile.run_python([REPO / "benchmarks" / script, *args], mnist_dir, check=False)


@pytest.mark.slow
def test_estimator_cost_quick_runs(mnist_dir, tmp_path):
    out = tmp_path / "cost.json"
    proc = _run_quick(
        "estimator_cost.py", ["--quick", "--width-scan", "2", "--json", str(out)], mnist_dir
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "#### Targets" in proc.stdout
    result = json.loads(out.read_text())
    (res,) = result["per_s"]
    expected_rows = {
        "floor",
        "elbo",
        "iwae",
        "cis_step",
        "coupled_iter",
        "unbiased",
        "unbiased_init",
        "unbiased_slots2",
        "unbiased_slotsdefault",  # the library's default loop options
        "coupled_iter_w2",
    }
    assert expected_rows <= set(res["rows"])
    assert {t["target"] for t in res["targets"]} >= {"iwae / floor", "coupled iter / cis step"}
    # Every recorded unbiased call read its num_iters (structure only; values are random).
    for name in ("unbiased", "unbiased_init", "unbiased_slots2"):
        (call,) = res["num_iters"][name]["per_call"]
        mean_iters, max_iters, _, loop_iters = call
        assert 0 <= mean_iters <= max_iters <= loop_iters or name == "unbiased_slots2"
        assert loop_iters >= 1


def test_estimator_cost_rejects_bad_arguments():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "estimator_cost.py"), "--num-particles", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--num-particles must all be >= 2" in proc.stderr


@pytest.mark.slow
def test_optimizer_study_quick_runs(mnist_dir, tmp_path):
    """``benchmarks/optimizer_study.py --quick`` runs end to end: its own tiny warm start, the SGD
    pilot, an Adam family (clipped Adam is Adam after a clip) for both estimators, and the paired
    table."""
    work = tmp_path / "opt"
    args = ["--quick", "--work", str(work), "--optimizers", "sgd_rm", "adam_clip@5"]
    proc = _run_quick("optimizer_study.py", args, mnist_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (work.with_name("opt_quick") / "rows.jsonl").open()]
    trained = {(r["estimator"], r["optimizer"]) for r in rows if "test_ll" in r}
    assert trained == {(e, o) for e in ("iwae5", "unbiased5") for o in ("sgd_rm", "adam_clip@5")}
    sgd = next(r for r in rows if r["optimizer"] == "sgd_rm" and "test_ll" in r)
    assert "test_ll_avg" in sgd and sgd["lr0"] in (0.01, 0.1)
    assert "| unbiased5 | adam_clip@5 |" in proc.stdout


def test_optimizer_study_rejects_bad_arguments():
    script = str(REPO / "benchmarks" / "optimizer_study.py")
    for args, message in (
        (["--optimizers", "adam_clip"], "'adam_clip' is not one of"),
        (["--optimizers", "sgd@1e-3"], "'sgd@1e-3' is not one of"),
        (["--estimators", "iwae7"], "unknown ['iwae7']"),
    ):
        proc = subprocess.run(
            [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr


@pytest.mark.slow
def test_queue_variants_runs(mnist_dir):
    args = ["--train-steps", "2", "--calls", "2", "--max-iters", "50", "--iwae-hook"]
    args += ["--variants", "slots=4,defer=0,hook=0,features=0", "slots=4", "slots=0,unroll=2"]
    proc = _run_quick("queue_variants.py", args, mnist_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| slots=4 | " in proc.stdout and "| slots=0,unroll=2 | " in proc.stdout
    assert "with / without the hook" in proc.stdout


def test_queue_variants_rejects_bad_variants(mnist_dir):
    proc = _run_quick("queue_variants.py", ["--variants", "slots=4,deffer=2"], mnist_dir)
    assert proc.returncode != 0 and "bad variant field 'deffer=2'" in proc.stderr


@pytest.mark.slow
def test_variance_study_mlmc_and_sumo_rows():
    """``variance.py``'s SUMO and MLMC rows on a tiny VAE: the own-evaluation bookkeeping, the
    robust spread, both tables and the across-seed summary (in-process, a few calls each)."""
    import types

    import jax
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import variance
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from vaeml_jax.training import TrainConfig, build_vae

    a = types.SimpleNamespace(
        iwae_s=[2],
        unbiased_s=[2],
        km=[],
        sumo=[8],
        mlmc=["roulette,2", "single_term,3"],
        mlmc_particles=2,
        mlmc_rate=1.5,
        num_particles=2,
        max_iters=50,
        replicates=4,
        seed=0,
    )
    vae = build_vae(TrainConfig(hidden=(8,), latent_dim=2).resolved())
    x = (np.random.default_rng(0).random((3, 784)) < 0.3).astype(np.float32)
    params = vae.init(jax.random.key(0))
    rows = variance.variance_study(a, vae, {"init": params}, x, log=lambda m: None)
    assert [r["kind"] for r in rows] == ["iwae", "unbiased", "sumo", "mlmc", "mlmc"]
    sumo, mlmc = rows[2], rows[4]
    assert sumo["evals_own"] == 2 * (1 + sumo["levels"]["mean"])
    # MLMC: 2 n_0 2^L per example plus n_0 for the encoder objective, at most L_max = 3
    assert 3 * 2 <= mlmc["evals_own"] <= 2 * 2 * 2**3 + 2 and mlmc["levels"]["max"] <= 3
    for r in rows:
        sp = r["spread"]
        assert sp["norm_median"] <= sp["norm_p99"] <= sp["norm_max"] and 0 < sp["max_share"] <= 1
        assert list(sp["trace_cov_by_r"]) == ["2", "4"]
        assert sp["trace_cov_by_r"]["4"] == r["trace_cov"]
    assert all("bias_sq" in r for r in rows if r["kind"] != "unbiased")
    md = "\n".join(variance.variance_table(rows) + variance.spread_table(rows))
    assert "| mlmc single_term n0=2 r=1.5 L_max=3 | init |" in md and "| sumo J_max=8 |" in md
    settings = {"seed": 0, "var_batch": 3, "replicates": 4}
    plain = [{k: v for k, v in r.items() if k not in ("mean_grad", "meeting_times")} for r in rows]
    two = [
        {"settings": settings, "variance": plain},
        {"settings": {**settings, "seed": 1}, "variance": plain},
    ]
    summary = variance.variance_summary(two)
    assert "seeds [0, 1]" in summary
    assert "| mlmc roulette n0=2 r=1.5 L_max=2 | init | 2 |" in summary
    with pytest.raises(ValueError, match="one run per seed"):
        variance.variance_summary([two[0], two[0]])
