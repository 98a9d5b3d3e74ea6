"""The VAE estimator through the general driver: the CIS kernels of vaeml_jax.couplings.cis.

Linear-Gaussian toy (tests/_stats.toy, proposal quality 0.3: a poor proposal, long chains): the
estimate of build_vae_gradient for one example must be unbiased for grad_params log p(x) (closed
form on the decoder, exact zeros on the encoder, which log_joint does not read), with lag 1 and
lag 2; max |z| below the Bonferroni threshold. The same statistic rejects the planted off-by-one
in the correction's weights by > 2 x threshold.

The general path and the fused ``make_unbiased_grad`` use different key streams (the fused loop
reuses Y_0's particles as X_1's fresh proposals), so they are compared in distribution: the
two-sample z of their means (decoder coordinates, same example, independent keys) must pass.

Also: the coupled CIS kernel has the single CIS kernel's one-step marginals (both chains) and
equal tuples stay bitwise equal.
"""

import functools

import _couplings_plants as plants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _couplings_targets import two_sample_z
from _stats import REJECT_FACTOR, exact_decoder_grad, pass_threshold, toy, z_scores

import vaeml_jax as vj
from vaeml_jax import couplings as cp
from vaeml_jax.couplings import debias

QUALITY = 0.3
S = 2
R = 32_000


def _exact(params, x):
    grads = jax.tree.map(jnp.zeros_like, params)
    grads["decoder"] = jax.tree.map(jnp.negative, exact_decoder_grad(params, x))  # +grad log p
    return grads


def _replicates(lag, k, m, seed=0):
    model, params, x = toy(quality=QUALITY)
    grad_fn = cp.build_vae_gradient(model, num_particles=S, k=k, m=m, lag=lag, max_iters=2000)
    out = jax.jit(jax.vmap(lambda kk: grad_fn(params, x, kk)))(
        jax.random.split(jax.random.key(seed), R)
    )
    return out, _exact(params, x)


@functools.cache
def _reference(lag, k, m):
    out, exact = _replicates(lag, k, m)
    z = z_scores(jax.tree.map(np.asarray, out.estimate), exact)
    return float(np.abs(z).max()), pass_threshold(z.size), int(np.asarray(out.capped).sum()), out


@pytest.mark.parametrize(
    "lag,k,m", [(1, 0, 1), pytest.param(2, 1, 3, marks=pytest.mark.slow)], ids=["lag1", "lag2"]
)
def test_vae_gradient_is_unbiased(lag, k, m):
    z, threshold, capped, _ = _reference(lag, k, m)
    print(f"CIS lag {lag} k {k} m {m}: max|z| = {z:.2f} (threshold {threshold:.2f})")
    assert capped == 0
    assert z < threshold, (z, threshold)


def test_statistic_rejects_off_by_one(monkeypatch):
    monkeypatch.setattr(debias, "_correction_count", plants.off_by_one_count)
    out, exact = _replicates(1, 0, 1)
    z = z_scores(jax.tree.map(np.asarray, out.estimate), exact)
    stat, threshold = float(np.abs(z).max()), pass_threshold(z.size)
    print(f"plant off_by_one (CIS): max|z| = {stat:.1f} (threshold {threshold:.2f})")
    assert stat > REJECT_FACTOR * threshold, (stat, threshold)


def test_agrees_in_distribution_with_the_fused_estimator():
    """Different key streams: equal means (two-sample z), not equal draws."""
    _, _, _, out = _reference(1, 0, 1)
    model, params, x = toy(quality=QUALITY)
    fused = vj.make_unbiased_grad(model, num_particles=S, k=0, m=1, encoder_objective=None)
    g = jax.jit(jax.vmap(lambda kk: fused(params, x[None], kk)[0]))(
        jax.random.split(jax.random.key(99), R)
    )
    a = np.concatenate([np.asarray(v).reshape(R, -1) for v in jax.tree.leaves(out.estimate)], 1)
    b = -np.concatenate([np.asarray(v).reshape(R, -1) for v in jax.tree.leaves(g)], 1)  # loss
    keep = np.asarray(a.std(0) > 0)  # the encoder coordinates are exact zeros in both
    z = two_sample_z(a[:, keep], b[:, keep])
    print(f"general vs fused: max|z| = {np.abs(z).max():.2f} over {z.size} coordinates")
    assert np.abs(z).max() < pass_threshold(z.size), z


def test_coupled_cis_has_the_single_kernels_marginals():
    model, params, x = toy(quality=QUALITY)
    n = 40_000
    rinit = cp.vae_reference.build_rinit(model, params, x, 4)
    single = cp.vae_reference.build_kernel(model, params, x, 4)
    coupled = cp.vae_reference.build_coupled_kernel(model, params, x, 4)
    sx, sy = rinit(jax.random.key(1)), rinit(jax.random.key(2))

    def feats(state):  # the kept particle and the self-normalised mean of the tuple
        w = vj.couplings.cis.normalized_weights(state.log_weights)
        return jnp.concatenate([state.particles[0], w @ state.particles])

    @jax.jit
    def draws(key):
        kc, kx, ky = jax.random.split(key, 3)
        c = jax.vmap(lambda kk: coupled(kk, cp.CoupledState(sx, sy))[0])(jax.random.split(kc, n))
        ox = jax.vmap(lambda kk: feats(single(kk, sx)[0]))(jax.random.split(kx, n))
        oy = jax.vmap(lambda kk: feats(single(kk, sy)[0]))(jax.random.split(ky, n))
        return jax.vmap(feats)(c.x), jax.vmap(feats)(c.y), ox, oy

    cx, cy, ox, oy = draws(jax.random.key(0))
    z = np.concatenate([two_sample_z(cx, ox), two_sample_z(cy, oy)])
    assert np.abs(z).max() < pass_threshold(z.size), z


def test_equal_cis_tuples_stay_equal_and_distinct_ones_meet():
    model, params, x = toy(quality=QUALITY)
    rinit = cp.vae_reference.build_rinit(model, params, x, 3)
    coupled = cp.vae_reference.build_coupled_kernel(model, params, x, 3)
    s0 = rinit(jax.random.key(0))

    def run(pair, key):
        def body(p, kk):
            p, info = coupled(kk, p)
            return p, (p.x, p.y, info.proposals_equal)

        return jax.lax.scan(body, pair, jax.random.split(key, 30))[1]

    keys = jax.random.split(jax.random.key(1), 32)
    xs, ys, _ = jax.jit(jax.vmap(lambda kk: run(cp.CoupledState(s0, s0), kk)))(keys)
    for a, b in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s1 = rinit(jax.random.key(7))
    _, _, met = jax.jit(jax.vmap(lambda kk: run(cp.CoupledState(s0, s1), kk)))(keys)
    met = np.asarray(met)
    assert met[:, -1].all()
    np.testing.assert_array_equal(met, np.maximum.accumulate(met, axis=1))


def test_bad_cis_arguments():
    model, params, x = toy()
    with pytest.raises(ValueError, match="num_particles must be >= 2"):
        cp.build_vae_gradient(model, num_particles=1)
    with pytest.raises(ValueError, match="k must be <= m"):
        cp.build_vae_gradient(model, k=2, m=1)
    with pytest.raises(TypeError):
        cp.vae_reference.build_kernel("not a model", params, x, 3)
