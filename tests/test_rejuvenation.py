"""The rejuvenation moves of the kept particles (vaeml_jax.estimators._rejuvenation).

Unbiasedness of the rejuvenated estimator against closed forms is in test_unbiased.py and the
reflection-maximal coupling's own tests in test_couplings_kernels.py; here: faithfulness, the
coupled move's marginals, the single move's invariance, the errors, and that meeting times
shorten on a target where plain CIS chains are slow.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fast_compile import fast_jit

import vaeml_jax as vj
from vaeml_jax.estimators import _rejuvenation as RJ
from vaeml_jax.estimators.unbiased import Rejuvenation
from vaeml_jax.testing import linear_gaussian_model, linear_gaussian_params

N = 200_000


def _gaussian_target(mean, std):
    return lambda z: -0.5 * jnp.sum(((z - mean) / std) ** 2)


def test_coupled_move_is_faithful_and_has_the_single_moves_marginal():
    cfg = Rejuvenation(num_steps=2, step_size=0.8, meet_scale=0.5)
    mean, std = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0])
    logdensity, scale = _gaussian_target(mean, std), std
    z0 = jnp.array([0.0, 0.0])
    keys = jax.random.split(jax.random.key(1), N)
    same_x, same_y = jax.vmap(lambda k: RJ.coupled_move(k, z0, z0, logdensity, scale, cfg))(keys)
    assert bool(jnp.all(same_x == same_y))  # faithful, bit for bit
    zy0 = jnp.array([2.0, 1.0])
    cx, cy = jax.vmap(lambda k: RJ.coupled_move(k, z0, zy0, logdensity, scale, cfg))(keys)
    sx = jax.vmap(lambda k: RJ.single_move(k, z0, logdensity, scale, cfg))(
        jax.random.split(jax.random.key(2), N)
    )
    sy = jax.vmap(lambda k: RJ.single_move(k, zy0, logdensity, scale, cfg))(
        jax.random.split(jax.random.key(3), N)
    )
    for coupled, single in ((cx, sx), (cy, sy)):  # first two moments agree within 5 SE
        c, s = np.asarray(coupled, np.float64), np.asarray(single, np.float64)
        se = np.sqrt((c.var(0) + s.var(0)) / N)
        assert np.all(np.abs(c.mean(0) - s.mean(0)) < 5 * se)
        se2 = np.sqrt(((c**2).var(0) + (s**2).var(0)) / N)
        assert np.all(np.abs((c**2).mean(0) - (s**2).mean(0)) < 5 * se2)
    # The coupled step does meet (measured 4.1% from these starting points in one move).
    assert float(jnp.mean(jnp.all(cx == cy, axis=-1))) > 0.02


def test_single_move_leaves_the_target_invariant():
    # Start exactly at the target N(mean, diag std^2); one move must keep its moments (5 SE).
    cfg = Rejuvenation(num_steps=3, step_size=1.2, meet_scale=0.7)
    mean, std = jnp.array([1.0, -2.0]), jnp.array([0.5, 2.0])
    logdensity = _gaussian_target(mean, std)
    z = mean + std * jax.random.normal(jax.random.key(4), (N, 2))
    out = jax.vmap(lambda k, zi: RJ.single_move(k, zi, logdensity, 1.3 * std, cfg))(
        jax.random.split(jax.random.key(5), N), z
    )
    out = np.asarray(out, np.float64)
    assert np.all(np.abs(out.mean(0) - np.asarray(mean)) < 5 * np.asarray(std) / np.sqrt(N))
    var_se = np.asarray(std) ** 2 * np.sqrt(2 / N)
    assert np.all(np.abs(out.var(0) - np.asarray(std) ** 2) < 5 * var_se * 3)


def test_rejuvenation_shortens_meeting_times_on_a_poor_proposal():
    model = linear_gaussian_model()
    params = linear_gaussian_params(jax.random.key(0), proposal_quality=0.3)
    x = jnp.tile(jnp.array([[1.0, -0.5, 2.0]]), (4000, 1))
    taus = {}
    for name, rej in (("plain", None), ("rejuvenated", Rejuvenation())):
        est = vj.make_unbiased_grad(model, num_particles=2, rejuvenation=rej)
        _, info = jax.jit(est)(params, x, jax.random.key(6))
        taus[name] = np.asarray(info["meeting_time"], np.float64)
    # Measured: mean 4.6 -> 3.1, p99 18 -> 7 (k = 0, m = 1); the 99th percentile must halve.
    assert np.percentile(taus["rejuvenated"], 99) < 0.5 * np.percentile(taus["plain"], 99)


def test_rejuvenation_errors_name_the_problem():
    model = linear_gaussian_model()
    with pytest.raises(ValueError, match="plain loop only"):
        vj.make_unbiased_grad(model, rejuvenation=Rejuvenation(), loop=vj.LoopOptions(num_slots=4))
    with pytest.raises(ValueError, match="step_size must be > 0"):
        vj.make_unbiased_grad(model, rejuvenation=Rejuvenation(step_size=0.0))
    with pytest.raises(ValueError, match="does nothing"):
        vj.make_unbiased_grad(model, rejuvenation=Rejuvenation(num_steps=0, meet_scale=0.0))
    with pytest.raises(TypeError, match="Rejuvenation"):
        vj.make_unbiased_grad(model, rejuvenation={"num_steps": 3})


def test_rejuvenation_counts_its_evaluations():
    model = linear_gaussian_model()
    params = linear_gaussian_params(jax.random.key(0))
    x = jnp.ones((3, 3))
    cfg = Rejuvenation(num_steps=2)
    est = vj.make_unbiased_grad(model, num_particles=3, max_iters=5, rejuvenation=cfg)
    _, info = fast_jit(est)(params, x, jax.random.key(0))  # one compile, counts are exact
    iters = int(np.max(info["num_iters"]))
    per_chain = 1 + 2 + 1
    expected = 3 * (2 * 3 + per_chain + 1 + (3 + 1 + 2 * per_chain) * iters)
    assert int(info["num_log_joint_evals"]) == expected
