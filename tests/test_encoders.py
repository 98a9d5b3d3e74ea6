"""The richer proposals of vaeml_jax.models.encoders through the VAE: encoder="full_cov" and "iaf".

Densities against independent computations (scipy's multivariate normal; the IAF's forward-pass
density; a grid integral in d = 2), the IAF's inverse, MADE's autoregressive structure,
reparameterisation, float64, config errors, and the estimators on every encoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fast_compile import fast_jit
from scipy import stats

import vaeml_jax as vj
from vaeml_jax.models import VAEConfig, build_vae
from vaeml_jax.models.encoders import made_masks

D = 6
ENCODERS = ["diag", "full_cov", "iaf"]


def tiny(encoder, latent_dim=3, **kw):
    return build_vae(
        data_dim=D, hidden=(5,), latent_dim=latent_dim, encoder=encoder, iaf_hidden=(8,), **kw
    )


def _x(batch=4, seed=1):
    return (jax.random.uniform(jax.random.key(seed), (batch, D)) < 0.4).astype(jnp.float32)


def _perturbed(vae, seed=0, scale=0.3):
    """Init params with every encoder leaf perturbed (non-trivial off-diagonals and flows)."""
    p = vae.init(jax.random.key(seed))
    leaves, tree = jax.tree.flatten(p["encoder"])
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [
        a + scale * jax.random.normal(k, a.shape, a.dtype)
        for a, k in zip(leaves, keys, strict=True)
    ]
    p["encoder"] = jax.tree.unflatten(tree, leaves)
    return p


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(encoder="flow"), "unknown encoder"),
        (dict(encoder="iaf", iaf_layers=0), "iaf_layers"),
        (dict(encoder="iaf", iaf_hidden=()), "iaf_hidden"),
        (dict(encoder="iaf", iaf_hidden=(0,)), "iaf_hidden"),
        (dict(encoder="full_cov", two_layer=True), "one stochastic layer"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        VAEConfig(**kw)


def test_made_masks_are_autoregressive():
    for d, hidden in [(1, (4,)), (2, (3,)), (5, (7, 6)), (4, (2,))]:
        masks = made_masks(d, hidden)
        conn = masks[0]
        for mk in masks[1:]:
            conn = (conn @ mk) > 0
        # output i reads input j only if j < i: strictly lower-triangular (input, output) paths
        assert not np.any(np.triu(conn.T.astype(bool), 0)), (d, hidden)


@pytest.mark.parametrize("encoder", ["full_cov", "iaf"])
def test_density_is_change_of_variables(encoder):
    """log q(z|x) from the forward pass = log N(eps) - log|det dz/deps| with the Jacobian by
    autodiff (independent of the flow's own log-det bookkeeping)."""
    vae = tiny(encoder, latent_dim=4, iaf_layers=3)
    p = _perturbed(vae)
    x = _x()[0]
    q = vae._encoder(p).q_z1
    eps = jax.random.normal(jax.random.key(2), (4,))
    J = jax.jacfwd(lambda e: q.sample(x, e[None])[0][0])(eps)
    lq = q.sample(x, eps[None])[1][0]
    _, logdet = np.linalg.slogdet(np.asarray(J, np.float64))
    expected = float(jnp.sum(-0.5 * eps**2 - 0.5 * np.log(2 * np.pi))) - logdet
    np.testing.assert_allclose(lq, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_shapes_and_consistency(encoder):
    vae = tiny(encoder)
    p = _perturbed(vae)
    x = _x()[0]
    z, lq = vae.sample_with_log_proposal(p, x, jax.random.key(1), 7)
    assert z.shape == (7, 3) and lq.shape == (7,)
    assert z.dtype == lq.dtype == jnp.float32
    np.testing.assert_array_equal(z, vae.sample_proposal(p, x, jax.random.key(1), 7))
    lq2 = jax.vmap(lambda zz: vae.log_proposal(p, x, zz))(z)
    np.testing.assert_allclose(lq2, lq, rtol=1e-5, atol=1e-5)
    mu, log_sigma = vae.encode(p, _x())
    assert mu.shape == log_sigma.shape == (4, 3)


def test_full_cov_density_matches_scipy():
    vae = tiny("full_cov", latent_dim=4)
    p = _perturbed(vae)
    x = _x()[0]
    loc, L = vae._encoder(p).q_z1(x)
    L = np.asarray(L, np.float64)
    assert np.allclose(L, np.tril(L)) and np.all(np.diag(L) > 0)
    assert np.any(np.tril(L, -1) != 0)
    z = np.asarray(jax.random.normal(jax.random.key(3), (5, 4)), np.float64) * 2
    want = stats.multivariate_normal(np.asarray(loc, np.float64), L @ L.T).logpdf(z)
    got = jax.vmap(lambda zz: vae.log_proposal(p, x, zz))(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the draws have covariance L L^T
    draws = np.asarray(vae.sample_proposal(p, x, jax.random.key(4), 200_000), np.float64)
    np.testing.assert_allclose(np.cov(draws.T), L @ L.T, atol=0.03 * np.abs(L @ L.T).max())


def test_iaf_inverse_of_forward_is_identity():
    vae = tiny("iaf", latent_dim=5, iaf_layers=3)
    p = _perturbed(vae, scale=0.5)
    x = _x()[0]
    q = vae._encoder(p).q_z1
    eps = jax.random.normal(jax.random.key(5), (9, 5))
    z, lq = q.sample(x, eps)
    eps_back, lq_back = q.inverse(x, z)
    np.testing.assert_allclose(eps_back, eps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lq_back, lq, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("encoder", ["full_cov", "iaf"])
def test_density_normalises_in_two_dimensions(encoder):
    """A grid integral of q(z|x) over [-L, L]^2 is 1 (d = 2, float64)."""
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        vae = tiny(encoder, latent_dim=2, dtype="float64")
        p = _perturbed(vae, scale=0.4)
        x = _x()[0].astype(jnp.float64)
        draws = vae.sample_proposal(p, x, jax.random.key(0), 4000)
        lo, hi = draws.min(0) - 3.0, draws.max(0) + 3.0
        n = 400
        g0, g1 = jnp.linspace(lo[0], hi[0], n), jnp.linspace(lo[1], hi[1], n)
        grid = jnp.stack(jnp.meshgrid(g0, g1, indexing="ij"), -1).reshape(-1, 2)
        dens = jnp.exp(jax.jit(jax.vmap(lambda zz: vae.log_proposal(p, x, zz)))(grid))
        area = (g0[1] - g0[0]) * (g1[1] - g1[0])
        np.testing.assert_allclose(float(jnp.sum(dens) * area), 1.0, atol=2e-3)
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("encoder", ["full_cov", "iaf"])
def test_float64(encoder):
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        vae = tiny(encoder, dtype="float64")
        p = _perturbed(vae)
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(p))
        x = _x()[0].astype(jnp.float64)
        z, lq = vae.sample_with_log_proposal(p, x, jax.random.key(1), 3)
        assert z.dtype == lq.dtype == jnp.float64
        lq2 = jax.vmap(lambda zz: vae.log_proposal(p, x, zz))(z)
        np.testing.assert_allclose(lq2, lq, rtol=1e-10, atol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("encoder", ["full_cov", "iaf"])
def test_sample_proposal_is_reparameterised(encoder):
    """Gradients of the draws flow to every encoder leaf and match central finite differences."""
    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        vae = tiny(encoder, dtype="float64")
        p = _perturbed(vae)
        x = _x()[0].astype(jnp.float64)
        w = jax.random.normal(jax.random.key(9), (5, 3), jnp.float64)

        def f(enc):
            return jnp.sum(w * vae.sample_proposal({**p, "encoder": enc}, x, jax.random.key(2), 5))

        g = jax.grad(f)(p["encoder"])
        for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
            assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), path
        leaves, tree = jax.tree.flatten(p["encoder"])
        direction = [
            jax.random.normal(jax.random.key(i), a.shape, a.dtype) for i, a in enumerate(leaves)
        ]
        h = 1e-5

        def shifted(sign):
            return jax.tree.unflatten(
                tree, [a + sign * h * d for a, d in zip(leaves, direction, strict=True)]
            )

        fd = (f(shifted(1)) - f(shifted(-1))) / (2 * h)
        ad = sum(jnp.sum(gl * d) for gl, d in zip(jax.tree.leaves(g), direction, strict=True))
        np.testing.assert_allclose(ad, fd, rtol=1e-6)
    finally:
        jax.config.update("jax_enable_x64", prev)


@pytest.mark.parametrize("encoder", ["full_cov", "iaf"])
@pytest.mark.parametrize("objective", ["iwae", "iwae_dreg"])
def test_estimators_run_with_each_encoder(encoder, objective):
    vae = tiny(encoder)
    p = vae.init(jax.random.key(0))
    x = _x()
    key = jax.random.key(3)
    for est in (
        vj.make_iwae_grad(vae.model, num_particles=4, encoder_objective=objective),
        vj.make_unbiased_grad(
            vae.model, num_particles=4, encoder_objective=objective, max_iters=50
        ),
    ):
        grads, info = fast_jit(est)(p, x, key)  # compile-bound: tiny model, one call
        assert jax.tree.structure(grads) == jax.tree.structure(p)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads)[0]:
            assert np.all(np.isfinite(leaf)), path
        assert np.any(np.asarray(grads["encoder"]["q_z1"]["loc"]["kernel"]) != 0)
        assert np.all(np.isfinite(info["bound"]))
