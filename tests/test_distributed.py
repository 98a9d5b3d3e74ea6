"""Data parallelism on forced CPU devices (in a subprocess: XLA_FLAGS must precede jax import)."""

import textwrap

import _fast_compile
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"  # set by the fixture
    import jax, jax.numpy as jnp
    import vaeml_jax as vj
    from vaeml_jax import testing as T, distributed as D

    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (64, 3))
    out = {"num_devices": len(jax.devices())}
    for name, est in [
        # the plain loop: its evaluations show the per-shard early stop (the work queue's
        # default on CPU runs its own schedule per shard)
        ("unbiased", vj.make_unbiased_grad(model, num_particles=4, k=1, m=2, num_chains=2,
                                           loop=vj.LoopOptions(num_slots=None))),
        ("iwae", vj.make_iwae_grad(model, num_particles=4)),
        ("mcmc", vj.make_mcmc_grad(model, num_particles=4, num_steps=2)),
    ]:
        g1, i1 = jax.jit(est)(params, x, jax.random.key(5))
        rows = {}
        for n in (1, 2, 4):
            mesh = D.make_mesh(n)
            g, info = jax.jit(D.data_parallel(est, mesh))(
                D.replicate(params, mesh), D.shard_batch(x, mesh), jax.random.key(5))
            rows[n] = {
                "max_abs_diff": max(float(jnp.max(jnp.abs(a - b)))
                                    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1))),
                "same_meeting": bool(jnp.all(info["meeting_time"] == i1["meeting_time"])),
                "same_bound": float(jnp.max(jnp.abs(info["bound"] - i1["bound"]))),
                "evals": int(info["num_log_joint_evals"]),
                "shape": list(info["meeting_time"].shape),
            }
        out[name] = {"single": int(i1["num_log_joint_evals"]), "rows": rows}
    try:
        f = D.data_parallel(vj.make_iwae_grad(model, num_particles=2), D.make_mesh(4))
        f(params, x[:10], jax.random.key(0))
        out["indivisible"] = None
    except ValueError as e:
        out["indivisible"] = str(e)
    try:
        D.make_mesh(8)
        out["too_many"] = None
    except ValueError as e:
        out["too_many"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    return _fast_compile.run_result_script(SCRIPT)


def test_four_devices_visible(result):
    assert result["num_devices"] == 4


@pytest.mark.parametrize("name", ["unbiased", "iwae", "mcmc"])
def test_same_estimate_on_1_2_4_devices(result, name):
    for n, row in result[name]["rows"].items():
        assert row["max_abs_diff"] < 1e-5, (n, row)
        assert row["same_meeting"], (n, row)
        assert row["same_bound"] < 1e-5
        assert row["shape"][0] == 64


def test_each_shard_stops_on_its_own(result):
    """Per-device while loops: never more evaluations than one global loop, usually fewer."""
    rows = result["unbiased"]["rows"]
    single = result["unbiased"]["single"]
    assert rows["1"]["evals"] == single
    assert rows["4"]["evals"] <= rows["2"]["evals"] <= single
    assert rows["4"]["evals"] < single


def test_clear_errors(result):
    assert "does not divide evenly over 4 devices" in result["indivisible"]
    assert "4 device(s) are visible" in result["too_many"]
