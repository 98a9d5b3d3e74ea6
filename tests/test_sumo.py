"""SUMO (Luo et al., ICLR 2020) against closed forms on the linear-Gaussian model.

Unbiasedness is checked with replicate means and standard errors at fixed seeds: SUMO must stay
within Z_PASS standard errors of the exact log p(x) (and of the exact gradient), while IWAE with the
same expected number of draws, and a planted SUMO without the 1/P(J >= j) reweighting, must be
rejected by the same statistic. The two-pass vjp machinery is compared against plain autodiff of
the same draws.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vaeml_jax import testing as T
from vaeml_jax.estimators import _common
from vaeml_jax.estimators import sumo as S
from vaeml_jax.estimators.bounds import make_iwae_grad
from vaeml_jax.estimators.sumo import make_sumo_grad, sumo_expected_num_terms, sumo_log_likelihood

Z_PASS = 4.0  # |replicate mean - exact| / SE below this passes (fixed seeds)
Z_REJECT = 8.0  # a biased competitor must exceed this


REPS = 128  # copies of each of the 4 examples per call: B = 512 in every call (one compile each)


@pytest.fixture(scope="module")
def setup():
    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=0.7)
    x = 2.0 * jax.random.normal(jax.random.key(3), (4, 3))
    log_p = jax.vmap(lambda xi: T.linear_gaussian_log_marginal(params, xi))(x)
    return model, params, x, log_p


@pytest.fixture(scope="module")
def sumo_grad(setup):
    """Jitted default-configuration estimators, one per encoder objective, shared by the tests."""
    cache = {}

    def get(objective):
        if objective not in cache:
            cache[objective] = jax.jit(make_sumo_grad(setup[0], encoder_objective=objective))
        return cache[objective]

    return get


@pytest.fixture(scope="module")
def sumo_ll(setup):
    return jax.jit(partial(sumo_log_likelihood, setup[0]))


def _z_per_example(samples, exact):
    """samples (n_x, R) -> z-statistics (n_x,) of the replicate mean against the exact values."""
    d = np.asarray(samples, np.float64) - np.asarray(exact, np.float64)[:, None]
    return d.mean(1) / (d.std(1, ddof=1) / np.sqrt(d.shape[1]))


def _replicates(fn, x, calls, seed):
    """fn(x repeated REPS times, key) for `calls` keys -> (n_x, REPS * calls) per-example values."""
    xr = jnp.repeat(x, REPS, axis=0)
    out = [
        np.asarray(fn(xr, jax.random.key(seed + c))).reshape(x.shape[0], REPS) for c in range(calls)
    ]
    return np.concatenate(out, axis=1)


def test_num_terms_law():
    """J's empirical tail matches P(J >= j) (1/j, then geometric), and the cap is reported."""
    cfg = S._check_config(1, 128, 80, 0.1, 8)
    keys = jax.random.split(jax.random.key(11), 400_000)
    j, capped = jax.jit(jax.vmap(lambda k: S._draw_num_terms(k, cfg)))(keys)
    j, capped = np.asarray(j), np.asarray(capped)
    assert j.min() >= 1 and j.max() <= 128
    n = len(j)
    for jj in (2, 3, 10, 50, 79, 80, 90, 110):
        p = 1.0 / S._inverse_tail_py(jj, cfg)
        z = ((j >= jj).mean() - p) / np.sqrt(p * (1 - p) / n)
        assert abs(z) < Z_PASS, (jj, z)
    z_mean = (j.mean() - sumo_expected_num_terms()) / (j.std() / np.sqrt(n))
    assert abs(z_mean) < Z_PASS
    p_cap = 1.0 / S._inverse_tail_py(129, cfg)
    assert abs(capped.mean() - p_cap) < Z_PASS * np.sqrt(p_cap / n)
    assert np.all(j[capped] == 128)


def test_log_likelihood_unbiased_iwae_and_plant_rejected(setup, sumo_ll, monkeypatch):
    model, params, x, log_p = setup
    calls = 80  # 10240 replicates per example
    est = _replicates(lambda xr, k: sumo_ll(params, xr, k)[0], x, calls, 0)
    z_sumo = _z_per_example(est, log_p)

    S_iwae = round(1 + sumo_expected_num_terms())  # the same expected number of draws (6)
    iwae = jax.jit(make_iwae_grad(model, num_particles=S_iwae, encoder_objective=None))
    bnd = _replicates(lambda xr, k: iwae(params, xr, k)[1]["bound"], x, calls, 10_000)
    z_iwae = _z_per_example(bnd, log_p)

    # Plant: the same draws and J without the 1/P(J >= j) reweighting (that is IWAE_{m+J}).
    monkeypatch.setattr(S, "_inverse_tail", lambda j, cfg, dtype: jnp.ones(j.shape, dtype))
    plant = jax.jit(partial(sumo_log_likelihood, model))
    pl = _replicates(lambda xr, k: plant(params, xr, k)[0], x, calls, 0)
    z_plant = _z_per_example(pl, log_p)

    print(
        f"\nlog p {np.asarray(log_p)}\nSUMO err {est.mean(1) - log_p}, sd {est.std(1)}, "
        f"z {z_sumo}\nIWAE-{S_iwae} err {bnd.mean(1) - log_p}, sd {bnd.std(1)}, z {z_iwae}\n"
        f"plant err {pl.mean(1) - log_p}, sd {pl.std(1)}, z {z_plant}"
    )
    assert np.max(np.abs(z_sumo)) < Z_PASS
    assert np.max(np.abs(z_iwae)) > Z_REJECT
    assert np.max(np.abs(z_plant)) > Z_REJECT


def _grad_z(grads_reps, exact):
    """Replicate pytrees -> |mean - exact| / SE per component."""
    flat = np.stack(
        [np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)]) for g in grads_reps]
    ).astype(np.float64)
    ex = np.concatenate([np.ravel(a) for a in jax.tree.leaves(exact)])
    se = flat.std(0, ddof=1) / np.sqrt(flat.shape[0])
    return np.abs(flat.mean(0) - ex) / se


def test_theta_gradient_unbiased_iwae_rejected(setup, sumo_grad):
    model, params, x, _ = setup
    # Exact gradient on the decoder of the LOSS -(1/B) sum_i log p(x_i).
    exact = jax.grad(
        lambda p: -jnp.mean(jax.vmap(lambda xi: T.linear_gaussian_log_marginal(p, xi))(x))
    )(params)["decoder"]
    xr = jnp.repeat(x, REPS, axis=0)
    calls = 200
    sumo = sumo_grad(None)
    g_sumo = [sumo(params, xr, jax.random.key(1000 + c))[0]["decoder"] for c in range(calls)]
    iwae = jax.jit(
        make_iwae_grad(
            model, num_particles=round(1 + sumo_expected_num_terms()), encoder_objective=None
        )
    )
    g_iwae = [iwae(params, xr, jax.random.key(5000 + c))[0]["decoder"] for c in range(calls)]
    z_sumo, z_iwae = _grad_z(g_sumo, exact), _grad_z(g_iwae, exact)
    print(f"\ngradient |z| per component: SUMO {z_sumo.round(2)}\n  IWAE {z_iwae.round(1)}")
    assert z_sumo.max() < Z_PASS
    assert z_iwae.max() > Z_REJECT


def _reference_grads(model, params, x, key, cfg):
    """Slow and obvious: all P_max draws at once, plain autodiff of -mean SUMO (theta, draws
    fixed) plus mean SUMO^2 (phi, theta frozen), the same keys, J and draws as the estimator."""
    keys = _common.lane_keys(key, x.shape[0], 1)
    key_j, key_z = S._split_keys(keys)
    num_terms, _ = jax.vmap(lambda k: S._draw_num_terms(k, cfg))(key_j)

    def draws(p):
        def per(xi, k):
            chunks = jnp.arange(cfg.max_blocks)
            zs = jax.vmap(
                lambda c: model.sample_proposal(p, xi, jax.random.fold_in(k, c), cfg.block_size)
            )(chunks)
            return zs.reshape((-1,) + zs.shape[2:])

        return jax.vmap(per)(x, key_z)

    def log_w(pj, pq, z):
        def ev(fn, p):
            return jax.vmap(jax.vmap(fn, (None, None, 0)), (None, 0, 0))(p, x, z)

        return ev(model.log_joint, pj) - ev(model.log_proposal, pq)

    def loss(p):
        frozen = jax.lax.stop_gradient(p)
        z = draws(p)
        theta = S._sumo_from_log_weights(log_w(p, frozen, jax.lax.stop_gradient(z)), num_terms, cfg)
        phi = S._sumo_from_log_weights(log_w(frozen, p, z), num_terms, cfg)
        return -jnp.mean(theta) + jnp.mean(phi**2)

    return jax.grad(loss)(params), num_terms


def test_matches_autodiff_reference(setup, sumo_grad):
    """The two-pass vjp gives what plain autodiff of the same draws gives (default config)."""
    model, params, x, _ = setup
    xr = jnp.repeat(x, REPS, axis=0)
    key = jax.random.key(21)
    grads, info = sumo_grad("sumo_variance")(params, xr, key)
    cfg = S._check_config(1, 128, 80, 0.1, 8)
    ref, num_terms = jax.jit(lambda p: _reference_grads(model, p, xr, key, cfg))(params)
    assert int(jnp.max(num_terms)) >= 80  # the geometric part of the tail is exercised
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        scale = max(1.0, float(jnp.max(jnp.abs(b))))
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)


def test_info_objectives_and_consistency(setup, sumo_grad, sumo_ll):
    model, params, x, _ = setup
    xr = jnp.repeat(x, REPS, axis=0)
    B = xr.shape[0]
    key = jax.random.key(7)
    ll, num_terms = sumo_ll(params, xr, key)
    ref, _ = sumo_grad(None)(params, xr, key)
    for objective in (None, "sumo_variance", "iwae", "elbo"):
        grads, info = sumo_grad(objective)(params, xr, key)
        assert set(info) == set(_common.base_info(B, 1, info["bound"], 0)) | {"own_log_joint_evals"}
        assert info["bound"].shape == (B,)
        # float32 round-off, amplified by weights 1/P(J >= j) up to ~1e4 in the tail
        np.testing.assert_allclose(info["bound"], ll, rtol=1e-3, atol=1e-4)
        for name in ("meeting_time", "num_iters", "capped"):
            assert info[name].shape == (B, 1), name
        assert bool(jnp.all(info["meeting_time"] == 0))
        assert bool(jnp.all(info["num_iters"][:, 0] == num_terms))
        # each example pays its own blocks of 8 draws (both passes); the batch adds only the
        # last loop step's padding, far below running every example to the batch-max m + J
        blocks = -(-(1 + np.asarray(num_terms)) // 8)
        np.testing.assert_array_equal(info["own_log_joint_evals"], 2 * (1 + np.asarray(num_terms)))
        steps = -(-int(blocks.sum()) // B)
        assert int(info["num_log_joint_evals"]) == 2 * B * 8 * steps
        assert steps < int(blocks.max())  # the batch-max would take blocks.max() steps
        # theta's part does not depend on the encoder objective (same key, same draws).
        for a, b in zip(
            jax.tree.leaves(grads["decoder"]), jax.tree.leaves(ref["decoder"]), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        enc = jax.tree.leaves(grads["encoder"])
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in enc)
        assert (objective is None) == all(float(jnp.max(jnp.abs(a))) == 0.0 for a in enc)
    assert bool(jnp.all((num_terms >= 1) & (num_terms <= 128)))


def test_small_cap_is_reported(setup):
    model, params, x, _ = setup
    _, info = jax.jit(make_sumo_grad(model, max_terms=2, encoder_objective=None))(
        params, jnp.tile(x, (50, 1)), jax.random.key(3)
    )
    capped, j = np.asarray(info["capped"][:, 0]), np.asarray(info["num_iters"][:, 0])
    assert capped.any() and np.all(j[capped] == 2) and np.all(j <= 2)


def test_variance_objective_lowers_the_variance(setup, sumo_grad, sumo_ll):
    """SGD on phi along the sumo_variance gradient (theta fixed) shrinks Var[SUMO]."""
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=0.3)
    x = setup[2]
    xr = jnp.repeat(x, REPS, axis=0)
    est = sumo_grad("sumo_variance")

    def variance(p):
        return _replicates(lambda xx, k: sumo_ll(p, xx, k)[0], x, 40, 77).var(1)

    before = variance(params)
    p = params
    for step in range(60):
        g = est(p, xr, jax.random.key(300 + step))[0]["encoder"]
        norm = float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree.leaves(g))))
        step_size = 3e-3 * min(1.0, 10.0 / norm)  # clipped: the gradient is heavy-tailed
        enc = jax.tree.map(lambda a, b, s=step_size: a - s * b, p["encoder"], g)
        p = {"decoder": p["decoder"], "encoder": enc}
    after = variance(p)
    print(f"\nVar[SUMO] per x: before {before.round(2)}, after 60 steps {after.round(2)}")
    assert after.mean() < 0.25 * before.mean()


# --- the same estimate under batching and sharding (the work list mixes examples per step) ---


def test_same_estimate_per_example_under_vmap_and_batching(setup):
    """An example's estimate depends only on its lane key: the batch estimate (one work list) is the
    mean of the single-example ones, whatever the other examples' J."""
    model, params, x, _ = setup
    xb = jnp.tile(x, (3, 1))  # 12 examples, their J's differing
    est = make_sumo_grad(model, encoder_objective="sumo_variance")
    keys = _common.lane_keys(jax.random.key(8), xb.shape[0], 1)
    batch, info = jax.jit(est.with_lane_keys)(params, xb, keys)
    single = jax.jit(jax.vmap(lambda xi, k: est.with_lane_keys(params, xi[None], k[None])[0]))(
        xb, keys
    )
    assert len(set(np.asarray(info["num_iters"])[:, 0].tolist())) > 1
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b.mean(0), rtol=1e-4, atol=1e-5)
    # Fewer blocks per loop step: the same work list in more steps, the same estimate, and the
    # executed evaluations 2 x blocks_per_step x block_size per step (less padding).
    small = make_sumo_grad(model, encoder_objective="sumo_variance", blocks_per_step=3)
    batch3, info3 = jax.jit(small.with_lane_keys)(params, xb, keys)
    for a, b in zip(jax.tree.leaves(batch3), jax.tree.leaves(batch), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    own_blocks = int(np.sum(-(-(1 + np.asarray(info["num_iters"])[:, 0]) // 8)))
    assert int(info3["num_log_joint_evals"]) == 2 * 3 * 8 * -(-own_blocks // 3)
    assert int(info["num_log_joint_evals"]) == 2 * 12 * 8 * -(-own_blocks // 12)


SHARD_SCRIPT = """
import json, os
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
import vaeml_jax as vj
from vaeml_jax import testing as T, distributed as D

model = T.linear_gaussian_model()
params = T.linear_gaussian_params(jax.random.key(0))
x = jax.random.normal(jax.random.key(3), (8, 3))
est = vj.make_sumo_grad(model)
g1, i1 = jax.jit(est)(params, x, jax.random.key(5))
mesh = D.make_mesh(4)
g, info = jax.jit(D.data_parallel(est, mesh))(
    D.replicate(params, mesh), D.shard_batch(x, mesh), jax.random.key(5))
row = {
    "max_abs_diff": max(float(jnp.max(jnp.abs(a - b)))
                        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1))),
    "scale": max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g1)),
    "same_terms": bool(jnp.all(info["num_iters"] == i1["num_iters"])),
    "same_own": bool(jnp.all(info["own_log_joint_evals"] == i1["own_log_joint_evals"])),
}
print("RESULT" + json.dumps(row))
"""


def test_same_estimate_sharded_over_devices():
    import os

    import _fast_compile

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    row = _fast_compile.run_result_script(SHARD_SCRIPT, env=env, timeout=600)
    # float32 sums in another order (weights 1/P(J >= j) amplify the round-off)
    assert row["max_abs_diff"] < 1e-5 * max(1.0, row["scale"]), row
    assert row["same_terms"] and row["same_own"], row


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(min_terms=0), ValueError),
        (dict(min_terms=1.0), TypeError),
        (dict(max_terms=0), ValueError),
        (dict(max_terms=True), TypeError),
        (dict(tail_start=0), ValueError),
        (dict(tail_decay=1.0), ValueError),
        (dict(tail_decay=-0.1), ValueError),
        (dict(tail_decay="0.1"), TypeError),
        (dict(block_size=0), ValueError),
        (dict(blocks_per_step=0), ValueError),
        (dict(blocks_per_step=2.0), TypeError),
        (dict(max_terms=2000), ValueError),  # 1/P(J >= 2000) overflows
        (dict(encoder_objective="inclusive_kl"), ValueError),
    ],
)
def test_bad_arguments(setup, kwargs, err):
    model = setup[0]
    with pytest.raises(err):
        make_sumo_grad(model, **kwargs)
    if "encoder_objective" not in kwargs:
        with pytest.raises(err):
            sumo_log_likelihood(model, setup[1], setup[2], jax.random.key(0), **kwargs)


def test_bad_inputs(setup):
    model, params, x, _ = setup
    with pytest.raises(TypeError, match="LatentVariableModel"):
        make_sumo_grad((model.log_joint,))
    with pytest.raises(ValueError, match="ONE PRNG key"):
        sumo_log_likelihood(model, params, x, jax.random.split(jax.random.key(0), 2))
    with pytest.raises(ValueError, match="non-finite"):
        make_sumo_grad(model)(params, x.at[0, 0].set(jnp.nan), jax.random.key(0))
