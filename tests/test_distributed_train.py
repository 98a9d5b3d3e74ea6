"""`vaeml train` data parallel over 4 forced CPU devices: same parameters as 1 device, checkpoints
written on 4 devices resume on 1, indivisible batches refused (subprocess: XLA_FLAGS first)."""

import json
import os
import subprocess
import sys
import textwrap

import _fast_compile
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"  # set by the fixture
    import jax, numpy as np
    from vaeml_jax.train import TrainConfig, ConfigError, train, read_metrics

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
def result(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("dp_train")
    env = dict(os.environ, VAEML_DATA_DIR=str(data_dir))
    env["XLA_FLAGS"] = _fast_compile.XLA_FLAGS  # compile-bound; not the caller's flags
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def test_same_parameters_on_1_and_4_devices(result):
    assert result["devices"] == 4
    # 3 epochs x 4 Adam steps; only the order of the cross-device reduction differs.
    assert result["diff_1_vs_4"] <= 1e-4 * max(1.0, result["scale"]), result


def test_checkpoint_from_4_devices_resumes_on_1(result):
    assert result["diff_moved"] <= 1e-4 * max(1.0, result["scale"]), result
    assert result["num_devices_moved"] == [4, 4, 1]


def test_metrics_record_num_devices(result):
    assert result["num_devices_logged"] == [4, 4, 4]


def test_indivisible_batch_is_refused_clearly(result):
    assert "does not divide evenly over 4 devices" in result["indivisible"]
    assert not result["bad_dir_written"]
