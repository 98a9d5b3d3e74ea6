"""`vaeml train` data parallel over 4 forced CPU devices: same parameters as 1 device, checkpoints
written on 4 devices resume on 1 and are evaluated and plotted on 1 (and the other way round),
indivisible batches refused (subprocesses: XLA_FLAGS first)."""

import json
import os
import subprocess
import sys
import textwrap

import _fast_compile
import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"  # set by the fixture
    import jax, numpy as np
    from vaeml_jax.training import TrainConfig, ConfigError, train, read_metrics

    out = sys.argv[1]
    small = dict(hidden=(16,), latent_dim=3, num_particles=3, batch_size=40,
                 max_train_examples=160, eval_every=0, estimator="unbiased", num_slots=None)

    def run(name, devices, epochs, resume=False):
        cfg = TrainConfig(**small, devices=devices, epochs=epochs)
        res = train(cfg, os.path.join(out, name), resume=resume, progress=False, log=lambda m: None)
        return res["params"]

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    p1 = run("one", 1, 3)
    p4 = run("four", 4, 3)
    run("moved", 4, 2)
    pm = run("moved", 1, 3, resume=True)  # written on 4 devices, resumed on 1
    result = {
        "devices": len(jax.devices()),
        "diff_1_vs_4": diff(p1, p4),
        "diff_moved": diff(p1, pm),
        "scale": max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(p1)),
        "num_devices_logged": [r["num_devices"] for r in read_metrics(os.path.join(out, "four"))],
        "num_devices_moved": [r["num_devices"] for r in read_metrics(os.path.join(out, "moved"))],
        "diagnostics": {
            name: [[r[k] for k in ("ess_mean", "log1p_chi2_mean", "log_weight_std_mean",
                                   "nonfinite_weight_fraction", "tail_index")]
                   for r in read_metrics(os.path.join(out, name))]
            for name in ("one", "four")
        },
    }
    try:
        train(TrainConfig(**{**small, "batch_size": 30}, devices=4, epochs=1),
              os.path.join(out, "bad"), progress=False, log=lambda m: None)
        result["indivisible"] = None
    except ConfigError as e:
        result["indivisible"] = str(e)
    result["bad_dir_written"] = os.path.exists(os.path.join(out, "bad"))
    print("RESULT" + json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def result(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("dp_train")
    env = dict(os.environ, VAEML_DATA_DIR=str(mnist_dir))
    return _fast_compile.run_result_script(SCRIPT, str(out), env=env)


def test_same_parameters_on_1_and_4_devices(result):
    assert result["devices"] == 4
    # 3 epochs x 4 Adam steps; only the order of the cross-device reduction differs.
    assert result["diff_1_vs_4"] <= 1e-4 * max(1.0, result["scale"]), result


def test_checkpoint_from_4_devices_resumes_on_1(result):
    assert result["diff_moved"] <= 1e-4 * max(1.0, result["scale"]), result
    assert result["num_devices_moved"] == [4, 4, 1]


def test_metrics_record_num_devices(result):
    assert result["num_devices_logged"] == [4, 4, 4]


def test_per_example_diagnostics_are_gathered_over_devices(result):
    """ESS, log(1 + chi^2), std of log w and the tail index of the 4-device run are those of the
    1-device run: the per-example info is sharded like the batch and gathered whole."""
    one, four = result["diagnostics"]["one"], result["diagnostics"]["four"]
    assert len(one) == len(four) == 3
    for a, b in zip(one, four, strict=True):
        assert (a[-1] is None) == (b[-1] is None)
        np.testing.assert_allclose(
            [v for v in a if v is not None], [v for v in b if v is not None], rtol=1e-4
        )


def test_indivisible_batch_is_refused_clearly(result):
    assert "does not divide evenly over 4 devices" in result["indivisible"]
    assert not result["bad_dir_written"]


# ---- checkpoints written on N devices are read (evaluate, plot, load_run) on any number -------
MOVE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    out, devices = sys.argv[1], int(sys.argv[2])
    if devices > 1:
        os.environ["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    import jax, numpy as np
    from vaeml_jax import cli
    from vaeml_jax.training import load_run

    def path(*p):
        return os.path.join(out, *p)

    tiny = ["--hidden", "16", "--latent-dim", "4", "--num-particles", "3",
            "--max-train-examples", "200", "--epochs", "1", "--no-progress"]
    evaluate = ["--num-samples", "20", "--chunk-size", "20", "--max-test-examples", "100",
                "--batch-size", "50", "--elbo-samples", "2"]

    def check(rc):
        assert rc == 0, rc

    def evaluate_and_plot(run, tag):
        check(cli.main(["evaluate", path(run), *evaluate, "--output", path(f"{run}_on{tag}.json")]))
        check(cli.main(["plot", path(run), "--out", path(f"plots_{run}_on{tag}")]))
        _, _, params, epoch = load_run(path(run))
        np.savez(path(f"{run}_on{tag}.npz"), *[np.asarray(x) for x in jax.tree.leaves(params)])

    result = {"devices": len(jax.devices())}
    if devices > 1:  # train on 4 and on 1 device; the run trained on 1 is read here, on 4
        check(cli.main(["train", *tiny, "--devices", str(devices), "--out", path("many")]))
        check(cli.main(["train", *tiny, "--devices", "1", "--out", path("one")]))
        evaluate_and_plot("one", devices)
    else:  # a 1-device process reads both
        evaluate_and_plot("many", 1)
        evaluate_and_plot("one", 1)
    print("RESULT" + json.dumps(result))
    """
)


def _run_move_script(out, devices, mnist_dir):
    env = dict(os.environ, VAEML_DATA_DIR=str(mnist_dir), MPLBACKEND="Agg")
    env["XLA_FLAGS"] = _fast_compile.XLA_FLAGS
    proc = subprocess.run(
        [sys.executable, "-c", MOVE_SCRIPT, str(out), str(devices)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :]), proc.stderr


@pytest.fixture(scope="module")
def moved(tmp_path_factory, mnist_dir):
    """Train on 4 forced CPU devices and on 1 (a 4-device process), then read both runs in a
    1-device process, and the 1-device run in the 4-device one."""
    out = tmp_path_factory.mktemp("moved")
    four, _ = _run_move_script(out, 4, mnist_dir)
    one, stderr = _run_move_script(out, 1, mnist_dir)
    return out, four, one, stderr


def _eval(out, name):
    return json.loads((out / f"{name}.json").read_text())


def _params(out, name):
    with np.load(out / f"{name}.npz") as z:
        return [z[k] for k in sorted(z.files, key=lambda k: int(k.split("_")[1]))]


def test_checkpoint_from_4_devices_evaluates_and_plots_on_1(moved):
    out, four, one, stderr = moved
    assert (four["devices"], one["devices"]) == (4, 1)
    a, b = _eval(out, "many_on1"), _eval(out, "one_on1")
    # the same seed on 4 and on 1 device: parameters within the cross-device reduction order
    scale = max(1.0, max(float(np.max(np.abs(p))) for p in _params(out, "one_on1")))
    for p, q in zip(_params(out, "many_on1"), _params(out, "one_on1"), strict=True):
        np.testing.assert_allclose(p, q, atol=1e-4 * scale)
    for key in ("test_log_likelihood", "test_elbo"):
        assert abs(a[key] - b[key]) <= 1e-3 * abs(b[key]), (key, a[key], b[key])
    assert sorted(p.name for p in (out / "plots_many_on1").iterdir()) == [
        "curves.png", "meeting_times.png", "reconstructions.png", "samples.png"
    ]  # fmt: skip
    # a restore with target shardings leaves no un-awaited Orbax read behind
    assert "never awaited" not in stderr, stderr[-2000:]


def test_checkpoint_from_1_device_evaluates_and_plots_on_4(moved):
    out, *_ = moved
    a, b = _eval(out, "one_on4"), _eval(out, "one_on1")
    for p, q in zip(_params(out, "one_on4"), _params(out, "one_on1"), strict=True):
        np.testing.assert_array_equal(p, q)
    for key in ("test_log_likelihood", "test_elbo"):
        assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, a[key], b[key])
    assert (out / "plots_one_on4" / "samples.png").exists()
