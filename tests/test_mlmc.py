"""The MLMC estimator (Shi & Cornish, AISTATS 2021) against the linear-Gaussian closed forms.

Unbiasedness: each call averages the estimator over a batch of ``B_REPS`` copies of one example;
``CALLS`` calls with independent keys give replicate means whose max |z| over the 20 coordinates
(decoder: -grad log p(x); encoder, ``"inclusive_kl"``: grad KL(p(z|x) || q)) must stay below the
Bonferroni threshold of ``_stats`` (family-wise 1e-4), while each planted bug must exceed twice
that threshold under the same statistic, batch, calls and seed:

* the single-term estimator without its 1/P(L = l) weights (``_level_weights`` replaced);
* the roulette estimator whose level is silently cut at 1 below its cap (``_draw_level``
  replaced; the weights still those of the cap of 10, nothing reported): it is unbiased for the
  IWAE-4 gradient, not for grad log p(x).

The proposal is wider than the posterior (bounded importance weights), where the antithetic
difference's variance must decay like 2^(-2l): the slope of log2 Var(Delta_l) against l is
measured with a bootstrap standard error, and a non-antithetic difference (Y_l minus the first
half's Y_{l-1}, whose variance decays like 2^(-l)) must be rejected by the same check.

Measured (max |z| over 32 x 1,000 replicates; pass below 4.56, reject above 9.13): roulette 2.41,
single term 1.86; 1/P dropped 88.2, level cut at 1 26.6. Slope over l = 5..9 (n_0 = 2, 2,000
replicates): -1.98 (SE 0.024); non-antithetic -1.01 (SE 0.009); over l = 1..4 the decay is still
faster (-2.4 to -2.7 per level), hence the fit starts at l = 5.
"""

import os
import textwrap

import _fast_compile
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _stats import REJECT_FACTOR, exact_grads, pass_threshold, toy, z_scores

import vaeml_jax as vj
from vaeml_jax import testing as T
from vaeml_jax.estimators import _common
from vaeml_jax.estimators import mlmc as M
from vaeml_jax.estimators.mlmc import (
    make_mlmc_grad,
    mlmc_expected_num_draws,
    mlmc_level_probabilities,
)

QUALITY = 0.3  # the proposal is too wide: bounded weights, and a large IWAE bias to correct
N0 = 2
B_REPS = 1000
CALLS = 32
_original_draw_level = M._draw_level


def _batch_means(estimator, params, x, calls=CALLS, seed=0, batch=B_REPS):
    """Per-call gradients, batch means over ``batch`` copies of x: a tree of (calls, ...) arrays."""
    fn = _fast_compile.fast_jit(estimator)
    xb = jnp.tile(x[None], (batch, 1))
    out = [fn(params, xb, jax.random.key(seed + c))[0] for c in range(calls)]
    return jax.tree.map(lambda *a: np.stack([np.asarray(v, np.float64) for v in a]), *out)


def statistic(estimator):
    """(max |z|, pass threshold) against the closed form (decoder and inclusive-KL encoder)."""
    _, params, x = toy(quality=QUALITY)
    exact = exact_grads(params, x, "inclusive_kl")
    z = z_scores(_batch_means(estimator, params, x), exact)
    return float(np.max(np.abs(z))), pass_threshold(z.size)


def _estimator(**kwargs):
    model, _, _ = toy(quality=QUALITY)
    kwargs = dict(dict(num_particles=N0, encoder_objective="inclusive_kl"), **kwargs)
    return make_mlmc_grad(model, **kwargs)


@pytest.mark.parametrize("estimator", ["roulette", "single_term"])
def test_unbiased_against_closed_form(estimator):
    z, threshold = statistic(_estimator(estimator=estimator))
    print(f"\n{estimator}: max |z| {z:.2f} (pass below {threshold:.2f})")
    assert z < threshold, (estimator, z, threshold)


def _weights_without_inverse_probability(levels, cfg, dtype):
    """Planted bug: the single-term weight 1[L = l] without its 1/P(L = l)."""
    lv = jnp.arange(cfg.max_level + 1)
    used = (lv[None, :] == levels[:, None]) & (lv[None, :] >= 1)
    return used.astype(dtype)


def _level_cut_at_one(key, cfg):
    """Planted bug: the level silently truncated at 1 (below the cap; not reported)."""
    level, _ = _original_draw_level(key, cfg)
    return jnp.minimum(level, 1), jnp.zeros((), bool)


@pytest.mark.parametrize(
    "estimator, name, plant",
    [
        ("single_term", "_level_weights", _weights_without_inverse_probability),
        ("roulette", "_draw_level", _level_cut_at_one),
    ],
    ids=["single-term-without-1/P", "roulette-level-cut"],
)
def test_same_statistic_rejects_planted_bugs(monkeypatch, estimator, name, plant):
    monkeypatch.setattr(M, name, plant)
    z, threshold = statistic(_estimator(estimator=estimator))
    print(f"\nplant {name} ({estimator}): max |z| {z:.2f} (reject above {2 * threshold:.2f})")
    assert z > REJECT_FACTOR * threshold, (name, z, threshold)


# --- the antithetic difference's variance ------------------------------------------------------

LEVELS = np.arange(5, 10)  # n_l = 64 .. 1024: the asymptotic regime (below, -2.4 to -2.7)
R_DELTA = 2000


def _level_differences(num_replicates=R_DELTA, seed=0):
    """Delta_l of the decoder gradient for l in LEVELS on ONE sequence of draws per replicate,
    from the library's coefficients: (c at level l - c at level 0) / w_l -> (R, len(LEVELS), P)."""
    model, params, x = toy(quality=QUALITY)
    lmax = int(LEVELS[-1])
    cfg = M._check_config(N0, 1.5, lmax, "single_term")
    n = N0 * 2**lmax
    inv_p = 1.0 / mlmc_level_probabilities(1.5, lmax)

    def one(key):
        z = model.sample_proposal(params, x, key, n)
        lj = jax.vmap(model.log_joint, (None, None, 0))(params, x, z)
        lq = jax.vmap(model.log_proposal, (None, None, 0))(params, x, z)
        lw = (lj - lq)[None]
        grads = jax.vmap(jax.grad(lambda p, zz: model.log_joint(p, x, zz)), (None, 0))(params, z)
        g = jnp.concatenate([a.reshape(n, -1) for a in jax.tree.leaves(grads["decoder"])], -1)
        levels = jnp.asarray([0, *LEVELS], jnp.int32)
        c = jax.vmap(lambda lev: M._coefficients(lw, lev[None], cfg)[0])(levels)
        return ((c[1:] - c[0]) / jnp.asarray(inv_p[LEVELS], c.dtype)[:, None]) @ g

    keys = jax.random.split(jax.random.key(seed), num_replicates)
    return np.asarray(_fast_compile.fast_jit(jax.vmap(one))(keys), np.float64)


def _decay_slope(deltas, num_boot=200, seed=0):
    """OLS slope of log2 tr Cov(Delta_l) against l, and its bootstrap standard error."""

    def slope(d):
        v = np.log2(d.var(axis=0, ddof=1).sum(axis=-1))
        return np.polyfit(LEVELS, v, 1)[0]

    rng = np.random.default_rng(seed)
    boot = [slope(deltas[rng.integers(0, len(deltas), len(deltas))]) for _ in range(num_boot)]
    return slope(deltas), float(np.std(boot, ddof=1))


def _first_half_only(m, log_z_first, log_z_second, second_half):
    """Planted bug: Delta_l = Y_l - Y_{l-1}(first half), not antithetic (same mean)."""
    return jnp.zeros_like(m) if second_half else jnp.exp(m - log_z_first)


def test_antithetic_difference_variance_decays_like_4_to_the_minus_l(monkeypatch):
    """Bounded weights: Var(Delta_l) ~ 2^(-2l) (slope -2 within 4 SE); the non-antithetic
    difference decays like 2^(-l) and must fail the same check."""
    slope, se = _decay_slope(_level_differences())
    monkeypatch.setattr(M, "_coarse_term", _first_half_only)
    plant_slope, plant_se = _decay_slope(_level_differences())
    print(
        f"\nslope {slope:.3f} (SE {se:.3f}); non-antithetic {plant_slope:.3f} (SE {plant_se:.3f})"
    )
    assert abs(slope + 2.0) < 4.0 * se, (slope, se)
    assert abs(plant_slope + 2.0) > 8.0 * plant_se and plant_slope > -1.5, (plant_slope, plant_se)


def test_bounded_weights_in_the_variance_check():
    """The toy proposal is wider than the posterior in every direction: weights are bounded."""
    _, params, x = toy(quality=QUALITY)
    _, post_cov = T.linear_gaussian_posterior(params, x)
    q_prec = jnp.diag(jnp.exp(-2.0 * params["encoder"]["log_sigma"]))
    assert float(jnp.min(jnp.linalg.eigvalsh(jnp.linalg.inv(post_cov) - q_prec))) > 0.0


# --- the efficient computation against a slow, obvious one ---------------------------------------


def _reference(model, params, x, keys, cfg, encoder_objective):
    """Every example runs all 2^L_max blocks; per-level softmaxes on the padded buffer; plain
    autodiff of -(1/B) sum_ij sg(c_ij) log p(x_i, z_ij) (and of log q for inclusive_kl)."""
    B, n0 = x.shape[0], cfg.num_particles
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys[:, 0])
    levels, _ = jax.vmap(lambda k: M._draw_level(k, cfg))(split[:, 0])

    def sample(xi, k):
        zs = [
            model.sample_proposal(params, xi, jax.random.fold_in(k, b), n0)
            for b in range(cfg.max_blocks)
        ]
        return jnp.concatenate(zs)

    z = jax.vmap(sample)(x, split[:, 1])

    def ev(fn, p):
        return jax.vmap(jax.vmap(fn, (None, None, 0)), (None, 0, 0))(p, x, z)

    lw = ev(model.log_joint, params) - ev(model.log_proposal, params)

    def softmax(a):
        return jax.nn.softmax(a, axis=-1)

    weights = M._level_weights(levels, cfg, lw.dtype)
    c = jnp.zeros_like(lw).at[:, :n0].set(softmax(lw[:, :n0]))
    for lev in range(1, cfg.max_level + 1):
        n, h = n0 * 2**lev, n0 * 2 ** (lev - 1)
        halves = jnp.concatenate([softmax(lw[:, :h]), softmax(lw[:, h:n])], axis=-1)
        c = c.at[:, :n].add(weights[:, lev][:, None] * (softmax(lw[:, :n]) - 0.5 * halves))

    def loss(p):
        out = -jnp.sum(c * ev(model.log_joint, p)) / B
        if encoder_objective == "inclusive_kl":
            out = out - jnp.sum(c * ev(model.log_proposal, p)) / B
        return out

    return jax.grad(loss)(params), levels


@pytest.mark.parametrize(
    "estimator, blocks_per_step",
    [("single_term", 3), ("roulette", None)],
    ids=["single", "roulette"],
)
def test_matches_slow_reference(estimator, blocks_per_step):
    model, params, _ = toy(quality=QUALITY)
    x = jax.random.normal(jax.random.key(3), (12, 3))
    est = make_mlmc_grad(
        model,
        num_particles=3,
        max_level=4,
        rate=1.2,
        estimator=estimator,
        encoder_objective="inclusive_kl",
        blocks_per_step=blocks_per_step,
    )
    keys = _common.lane_keys(jax.random.key(4), x.shape[0], 1)
    grads, info = _fast_compile.fast_jit(est.with_lane_keys)(params, x, keys)
    cfg = M._check_config(3, 1.2, 4, estimator)
    ref, levels = _fast_compile.fast_jit(
        lambda p, xx, kk: _reference(model, p, xx, kk, cfg, "inclusive_kl")
    )(params, x, keys)
    assert len(set(np.asarray(levels).tolist())) >= 3  # several levels in one batch
    np.testing.assert_array_equal(info["num_iters"][:, 0], levels)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


# --- cost, info, the cap -----------------------------------------------------------------------


def test_level_law_and_expected_draws():
    cfg = M._check_config(N0, 1.5, 6, "roulette")
    keys = jax.random.split(jax.random.key(11), 200_000)
    level, capped = jax.jit(jax.vmap(lambda k: M._draw_level(k, cfg)))(keys)
    level, capped = np.asarray(level), np.asarray(capped)
    n = len(level)
    for lev in range(1, 7):
        p = 2.0 ** (-1.5 * lev)  # P(L >= l)
        z = ((level >= lev).mean() - p) / np.sqrt(p * (1 - p) / n)
        assert abs(z) < 4.0, (lev, z)
    p_cap = 2.0 ** (-1.5 * 7)
    assert abs(capped.mean() - p_cap) < 4.0 * np.sqrt(p_cap / n)
    assert level.max() == 6 and np.all(level[capped] == 6)
    probs = mlmc_level_probabilities(1.5, 6)
    assert probs.sum() == pytest.approx(1.0)
    draws = N0 * 2.0**level
    z_mean = (draws.mean() - mlmc_expected_num_draws(N0, 1.5, 6)) / (draws.std() / np.sqrt(n))
    assert abs(z_mean) < 4.0


def test_cost_follows_each_examples_level_info_and_cap():
    model, params, _ = toy(quality=QUALITY)
    B, chunk, lmax = 128, 8, 4
    x = jax.random.normal(jax.random.key(3), (B, 3))
    est = make_mlmc_grad(model, num_particles=N0, max_level=lmax, blocks_per_step=chunk)
    grads, info = _fast_compile.fast_jit(est)(params, x, jax.random.key(5))
    levels = np.asarray(info["num_iters"][:, 0])
    capped = np.asarray(info["capped"][:, 0])
    assert capped.any() and np.all(levels[capped] == lmax) and levels.max() == lmax
    own = np.asarray(info["own_log_joint_evals"])
    np.testing.assert_array_equal(own, 2 * N0 * 2**levels + N0)  # both passes + the encoder's
    executed = int(info["num_log_joint_evals"])
    blocks = int(np.sum(2**levels))
    assert executed == 2 * N0 * chunk * -(-blocks // chunk) + B * N0
    assert own.sum() <= executed < own.sum() + 2 * N0 * chunk  # padding below one chunk
    assert executed < 0.25 * B * 2 * N0 * 2**lmax  # not the batch-max level for everyone
    assert set(info) == set(_common.base_info(B, 1, info["bound"], 0)) | {"own_log_joint_evals"}
    assert info["bound"].shape == (B,) and info["capped"].shape == (B, 1)
    assert bool(jnp.all(info["meeting_time"] == 0))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(grads))


# --- the same estimate under jit, vmap and sharding ---------------------------------------------


def test_same_estimate_per_example_under_vmap_and_batching():
    """An example's estimate depends only on its lane key: the batch estimate (one work list) is the
    mean of the single-example ones (vmapped over examples and keys)."""
    model, params, _ = toy(quality=QUALITY)
    x = jax.random.normal(jax.random.key(3), (6, 3))
    est = make_mlmc_grad(model, num_particles=N0, max_level=6, encoder_objective="inclusive_kl")
    keys = _common.lane_keys(jax.random.key(8), x.shape[0], 1)
    batch, _ = _fast_compile.fast_jit(est.with_lane_keys)(params, x, keys)
    single = _fast_compile.fast_jit(
        jax.vmap(lambda xi, k: est.with_lane_keys(params, xi[None], k[None])[0])
    )(x, keys)
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b.mean(0), rtol=1e-4, atol=1e-5)


SHARD_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp
    import vaeml_jax as vj
    from vaeml_jax import testing as T, distributed as D

    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (8, 3))
    est = vj.make_mlmc_grad(model, num_particles=2, max_level=6, encoder_objective="inclusive_kl")
    g1, i1 = jax.jit(est)(params, x, jax.random.key(5))
    rows = {}
    for n in (4,):
        mesh = D.make_mesh(n)
        g, info = jax.jit(D.data_parallel(est, mesh))(
            D.replicate(params, mesh), D.shard_batch(x, mesh), jax.random.key(5))
        rows[n] = {
            "max_abs_diff": max(float(jnp.max(jnp.abs(a - b)))
                                for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g1))),
            "same_levels": bool(jnp.all(info["num_iters"] == i1["num_iters"])),
            "same_own": bool(jnp.all(info["own_log_joint_evals"] == i1["own_log_joint_evals"])),
        }
    print("RESULT" + json.dumps(rows))
    """
)


def test_same_estimate_sharded_over_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    rows = _fast_compile.run_result_script(SHARD_SCRIPT, env=env, timeout=600)
    for n, row in rows.items():
        assert row["max_abs_diff"] < 1e-5 and row["same_levels"] and row["same_own"], (n, row)


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(num_particles=0), ValueError),
        (dict(num_particles=2.0), TypeError),
        (dict(rate=0.0), ValueError),
        (dict(rate=float("nan")), ValueError),
        (dict(rate="1.5"), TypeError),
        (dict(max_level=0), ValueError),
        (dict(max_level=True), TypeError),
        (dict(max_level=30), ValueError),  # the buffer n_0 2^30 would not fit
        (dict(estimator="single"), ValueError),
        (dict(encoder_objective="sumo_variance"), ValueError),
        (dict(blocks_per_step=0), ValueError),
        (dict(encoder_particles=0), ValueError),
        (dict(encoder_particles=4, encoder_objective="inclusive_kl"), ValueError),
    ],
)
def test_bad_arguments(kwargs, err):
    model, _, _ = toy()
    with pytest.raises(err):
        make_mlmc_grad(model, **kwargs)


@pytest.mark.parametrize("rate", [1.0, 2.0, 2.5])
def test_rate_outside_one_two_warns(rate):
    model, _, _ = toy()
    with pytest.warns(UserWarning, match="1 < r < 2"):
        make_mlmc_grad(model, rate=rate)


def test_encoder_particles_draw_their_own():
    """K own draws: theta's part unchanged, phi's from other draws, B K evaluations counted."""
    model, params, _ = toy(quality=QUALITY)
    x = jax.random.normal(jax.random.key(3), (4, 3))
    base = make_mlmc_grad(model, num_particles=N0, max_level=3)
    own = make_mlmc_grad(model, num_particles=N0, max_level=3, encoder_particles=7)
    out0, (g1, i1) = (
        _fast_compile.fast_jit(fn)(params, x, jax.random.key(1)) for fn in (base, own)
    )
    g0, i0 = out0
    for a, b in zip(jax.tree.leaves(g0["decoder"]), jax.tree.leaves(g1["decoder"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(g0["encoder"]["A"], g1["encoder"]["A"])
    assert int(i1["num_log_joint_evals"]) - int(i0["num_log_joint_evals"]) == 4 * (7 - N0)
    assert isinstance(out0, vj.LossGradient)
    assert set(vj.GradientInfo.__annotations__) < set(i1)


def test_keyword_only_and_bad_inputs():
    model, params, x = toy()
    with pytest.raises(TypeError):
        make_mlmc_grad(model, 5)  # the arguments after model are keyword-only
    with pytest.raises(TypeError, match="LatentVariableModel"):
        make_mlmc_grad((model.log_joint,))
    with pytest.raises(ValueError, match="non-finite"):
        make_mlmc_grad(model)(params, jnp.stack([x, x]).at[0, 0].set(jnp.nan), jax.random.key(0))


# --- the command line and the training config --------------------------------------------------


def test_cli_flags_reach_the_estimator(monkeypatch):
    from vaeml_jax import cli
    from vaeml_jax.training.build import build_vae, make_estimator

    argv = ["train", "--estimator", "mlmc", "-S", "3", "--max-level", "6", "--level-rate", "1.3"]
    argv += ["--mlmc-estimator", "single_term", "--encoder-objective", "inclusive_kl"]
    cfg, _, recipe = cli._resolve_train_config(cli.build_parser().parse_args(argv))
    assert recipe and cfg.warm_start_epochs == 80  # the recipe, as for the coupled chains
    seen = {}

    def record(model, **kwargs):
        seen.update(kwargs)
        return make_mlmc_grad(model, **kwargs)

    monkeypatch.setattr(vj, "make_mlmc_grad", record)
    est = make_estimator(cfg, build_vae(cfg).model)
    assert est.name == "mlmc"
    assert seen == dict(
        num_particles=3,
        rate=1.3,
        max_level=6,
        estimator="single_term",
        encoder_objective="inclusive_kl",
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(mlmc_estimator="single"), "unknown mlmc_estimator"),
        (dict(level_rate=0.0), "level_rate must be a positive number"),
        (dict(max_level=0), "max_level must be an integer >= 1"),
        (dict(encoder_particles=4, encoder_objective="inclusive_kl"), "reparameterised"),
    ],
)
def test_bad_config_options_name_the_problem(kw, message):
    from vaeml_jax.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(dict(estimator="mlmc", **kw)).resolved()
