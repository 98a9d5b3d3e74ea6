"""Tests of vaeml_jax.models: shapes, densities against hand computations, reparameterisation,
initialisation, the estimators on both architectures, data checks, float64.

Tiny configs throughout (data_dim 6, hidden (5,), latents 3 / (4, 2)); runtime ~15 s on 2 CPUs.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fast_compile import fast_jit

import vaeml_jax as vj
from vaeml_jax.models import VAE, VAEConfig, build_vae

D = 6
TINY = dict(data_dim=D, hidden=(5,), latent_dim=3)
TINY2 = dict(data_dim=D, hidden=(5,), latent_dim=2, two_layer=True, latent1_dim=4, hidden2=(3,))


def _x(batch=4, seed=1):
    return (jax.random.uniform(jax.random.key(seed), (batch, D)) < 0.4).astype(jnp.float32)


def _np(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _mlp(p, h):
    i = 0
    while f"dense_{i}" in p["trunk"]:
        layer = p["trunk"][f"dense_{i}"]
        h = np.tanh(h @ layer["kernel"] + layer["bias"])
        i += 1
    return h


def _lin(layer, h):
    return h @ layer["kernel"] + layer["bias"]


def _norm_logpdf(x, m, s):
    return float(np.sum(-0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)))


def _gauss_head(p, h):
    hh = _mlp(p, h)
    return _lin(p["loc"], hh), np.exp(_lin(p["log_scale"], hh))


def _bern(x, logits):
    prob = 1.0 / (1.0 + np.exp(-logits))
    return float(np.sum(x * np.log(prob) + (1 - x) * np.log(1 - prob)))


@pytest.mark.parametrize("kw", [TINY, TINY2], ids=["one", "two"])
def test_shapes_and_param_structure(kw):
    vae = build_vae(**kw)
    params = vae.init(jax.random.key(0))
    assert set(params) == {"encoder", "decoder"}
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert all(
        isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for pa in paths for k in pa
    )
    assert all(type(d) is dict for d in [params, params["encoder"], params["decoder"]])
    flat = 6 if kw.get("two_layer") else 3
    assert vae.latent_dim == flat
    x = _x()
    # shapes at trace time (jax.eval_shape: nothing is compiled)
    k = jax.random.key(1)
    z = jax.eval_shape(lambda p, xi: vae.sample_proposal(p, xi, k, 7), params, x[0])
    assert z.shape == (7, flat)
    z0 = jnp.zeros(flat)
    assert jax.eval_shape(vae.model.log_joint, params, x[0], z0).shape == ()
    assert jax.eval_shape(vae.model.log_proposal, params, x[0], z0).shape == ()
    assert jax.eval_shape(vae.decode, params, jnp.zeros((7, flat))).shape == (7, D)
    assert jax.eval_shape(vae.decode, params, jnp.zeros((7, 1, flat))).shape == (7, 1, D)
    assert jax.eval_shape(lambda p: vae.reconstruct(p, x, k), params).shape == (4, D)
    assert vj.models.check_batch(vae.model, params, x) == ((flat,), jnp.float32)
    # values: decoded prior samples are probabilities
    s = jax.jit(lambda p: vae.sample(p, jax.random.key(2), 5))(params)
    assert s.shape == (5, D) and bool(jnp.all((s > 0) & (s < 1)))
    # sizes of the paper's defaults
    big = build_vae(two_layer=True)
    shapes = jax.eval_shape(lambda k: big.init(k), jax.random.key(0))
    assert big.latent_dim == 150
    assert shapes["encoder"]["q_z1"]["trunk"]["dense_0"]["kernel"].shape == (784, 200)
    assert shapes["encoder"]["q_z2"]["loc"]["kernel"].shape == (100, 50)
    assert shapes["decoder"]["p_z1"]["trunk"]["dense_1"]["kernel"].shape == (100, 100)
    assert shapes["decoder"]["p_x"]["logits"]["kernel"].shape == (200, 784)


def test_one_layer_densities_match_hand_computation():
    vae = build_vae(**TINY)
    params = vae.init(jax.random.key(0))
    p = _np(params)
    x = np.asarray(_x()[0], np.float64)
    z = np.array([0.3, -1.2, 0.7])
    want_joint = _norm_logpdf(z, 0.0, 1.0) + _bern(
        x, _lin(p["decoder"]["p_x"]["logits"], _mlp(p["decoder"]["p_x"], z))
    )
    want_prop = _norm_logpdf(z, *_gauss_head(p["encoder"]["q_z1"], x))
    got_joint = float(vae.model.log_joint(params, jnp.asarray(x, jnp.float32), jnp.asarray(z)))
    got_prop = float(vae.model.log_proposal(params, jnp.asarray(x, jnp.float32), jnp.asarray(z)))
    np.testing.assert_allclose(got_joint, want_joint, rtol=1e-5)
    np.testing.assert_allclose(got_prop, want_prop, rtol=1e-5)


def test_two_layer_densities_match_hand_computation():
    vae = build_vae(**TINY2)
    params = vae.init(jax.random.key(0))
    p = _np(params)
    x = np.asarray(_x()[0], np.float64)
    z = np.array([0.3, -1.2, 0.7, 0.1, -0.5, 1.5])  # layout concat(z1 (4), z2 (2))
    z1, z2 = z[:4], z[4:]
    dec, enc = p["decoder"], p["encoder"]
    want_joint = (
        _norm_logpdf(z2, 0.0, 1.0)
        + _norm_logpdf(z1, *_gauss_head(dec["p_z1"], z2))
        + _bern(x, _lin(dec["p_x"]["logits"], _mlp(dec["p_x"], z1)))
    )
    want_prop = _norm_logpdf(z1, *_gauss_head(enc["q_z1"], x)) + _norm_logpdf(
        z2, *_gauss_head(enc["q_z2"], z1)
    )
    xj, zj = jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32)
    np.testing.assert_allclose(float(vae.model.log_joint(params, xj, zj)), want_joint, rtol=1e-5)
    np.testing.assert_allclose(float(vae.model.log_proposal(params, xj, zj)), want_prop, rtol=1e-5)


def test_bernoulli_log_likelihood_is_stable_for_large_logits():
    from vaeml_jax.models import bernoulli_log_prob

    logits = jnp.array([200.0, -200.0, 50.0])
    x = jnp.array([1.0, 0.0, 0.0])
    out = bernoulli_log_prob(x, logits)
    np.testing.assert_allclose(float(out), -50.0, rtol=1e-6)
    g = jax.grad(lambda ll: bernoulli_log_prob(x, ll))(logits)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_gaussian_decoder_density_and_init():
    vae = build_vae(**TINY, likelihood="gaussian", min_scale=0.01)
    mean = np.linspace(-1.0, 2.0, D)
    params = vae.init(jax.random.key(0), data_mean=mean)
    np.testing.assert_allclose(params["decoder"]["p_x"]["loc"]["bias"], mean, rtol=1e-6)
    params["decoder"]["p_x"]["log_scale"] = jnp.full((D,), -0.5)
    p = _np(params)
    x = np.linspace(0.0, 1.0, D)
    z = np.array([0.3, -1.2, 0.7])
    mu = _lin(p["decoder"]["p_x"]["loc"], _mlp(p["decoder"]["p_x"], z))
    want = _norm_logpdf(z, 0.0, 1.0) + _norm_logpdf(x, mu, math.exp(-0.5) + 0.01)
    got = vae.model.log_joint(params, jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(vae.decode(params, jnp.asarray(z)), mu, rtol=1e-5, atol=1e-6)
    vae.check_data(np.full((2, D), 0.37))  # continuous data is fine for a Gaussian decoder


@pytest.mark.parametrize("kw", [TINY, TINY2], ids=["one", "two"])
def test_sample_proposal_moments_and_density(kw):
    vae = build_vae(**kw)
    params = vae.init(jax.random.key(0))
    x = _x()[1]
    n = 20000
    z = vae.sample_proposal(params, x, jax.random.key(5), n)
    loc, log_scale = vae.encode(params, x)
    lat1 = loc.shape[0]
    sd = jnp.exp(log_scale)
    # z1 ~ N(loc, sd^2): mean within 5 standard errors, variance within 5 s.e. (sd^2 sqrt(2/n))
    m = jnp.mean(z[:, :lat1], 0)
    v = jnp.var(z[:, :lat1], 0)
    assert bool(jnp.all(jnp.abs(m - loc) < 5 * sd / math.sqrt(n))), (m, loc)
    assert bool(jnp.all(jnp.abs(v - sd**2) < 5 * sd**2 * math.sqrt(2 / n))), (v, sd**2)
    if kw.get("two_layer"):
        # z2 | z1 ~ N(mu(z1), s(z1)^2): standardised residuals are N(0, 1)
        loc2, ls2 = vae._encoder(params).q_z2(z[:, :lat1])
        r = (z[:, lat1:] - loc2) / jnp.exp(ls2)
        assert bool(jnp.all(jnp.abs(jnp.mean(r, 0)) < 5 / math.sqrt(n)))
        assert bool(jnp.all(jnp.abs(jnp.var(r, 0) - 1) < 5 * math.sqrt(2 / n)))
    # log_proposal of samples is the Gaussian density (with the conditional for z2)
    lq = jax.vmap(vae.model.log_proposal, (None, None, 0))(params, x, z[:50])
    want = jnp.sum(
        -0.5 * ((z[:50, :lat1] - loc) / sd) ** 2 - log_scale - 0.5 * math.log(2 * math.pi), -1
    )
    if kw.get("two_layer"):
        loc2, ls2 = vae._encoder(params).q_z2(z[:50, :lat1])
        want = want + jnp.sum(
            -0.5 * ((z[:50, lat1:] - loc2) / jnp.exp(ls2)) ** 2 - ls2 - 0.5 * math.log(2 * math.pi),
            -1,
        )
    np.testing.assert_allclose(lq, want, rtol=1e-5)


@pytest.mark.parametrize("kw", [TINY, TINY2], ids=["one", "two"])
def test_sample_proposal_is_reparameterised(kw):
    vae = build_vae(**kw)
    params = vae.init(jax.random.key(0))
    x = _x()[0]

    def f(p):
        return jnp.sum(vae.sample_proposal(p, x, jax.random.key(3), 4) ** 2)

    g = jax.grad(f)(params)
    assert float(jnp.sum(jnp.abs(g["encoder"]["q_z1"]["loc"]["bias"]))) > 0
    assert float(jnp.sum(jnp.abs(g["encoder"]["q_z1"]["log_scale"]["bias"]))) > 0
    if kw.get("two_layer"):
        assert float(jnp.sum(jnp.abs(g["encoder"]["q_z2"]["loc"]["bias"]))) > 0
    # d z / d loc_bias = 1 exactly (one layer): the gradient of sum z is num per coordinate
    if not kw.get("two_layer"):
        gs = jax.grad(lambda p: jnp.sum(vae.sample_proposal(p, x, jax.random.key(3), 4)))(params)
        np.testing.assert_allclose(gs["encoder"]["q_z1"]["loc"]["bias"], 4.0, rtol=1e-6)


def _perturbed(vae, seed=7):
    """Initial params plus noise, so that no layer is at a symmetric (zero) point."""
    params = vae.init(jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    pairs = zip(leaves, keys, strict=True)
    noisy = [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in pairs]
    return jax.tree.unflatten(tree, noisy)


HOOK_CASES = [TINY, TINY2, dict(TINY, encoder="full_cov"), dict(TINY, encoder="iaf")]


@pytest.mark.parametrize("hook", ["sample_with_log_proposal", "sample_from_features"])
@pytest.mark.parametrize("kw", HOOK_CASES, ids=["one", "two", "full_cov", "iaf"])
def test_one_pass_hooks_have_the_two_functions_values_and_derivatives(kw, hook):
    """The one-pass hooks the estimators use (``sample_with_log_proposal``, and
    ``sample_from_features`` at ``proposal_features``) must be sample_proposal then
    log_proposal: same draws, same log q, and the same parameter derivative of any function of
    the two."""
    vae = build_vae(**kw)
    model = vae.model
    if hook == "sample_with_log_proposal":
        one_pass_fn = model.sample_with_log_proposal
    else:

        def one_pass_fn(p, x, key, num):
            return model.sample_from_features(p, model.proposal_features(p, x), key, num)

    params = _perturbed(vae)
    x = _x()[0]
    key = jax.random.key(3)
    a = jax.random.normal(jax.random.key(4), (5, vae.latent_dim))
    b = jax.random.normal(jax.random.key(5), (5,))

    def two_passes(p):
        z = model.sample_proposal(p, x, key, 5)
        lq = jax.vmap(lambda zz: model.log_proposal(p, x, zz))(z)
        return jnp.sum(a * z) + jnp.sum(b * lq), (z, lq)

    def one_pass(p):
        z, lq = one_pass_fn(p, x, key, 5)
        return jnp.sum(a * z) + jnp.sum(b * lq), (z, lq)

    (v2, (z2, lq2)), g2 = jax.value_and_grad(two_passes, has_aux=True)(params)
    (v1, (z1, lq1)), g1 = jax.value_and_grad(one_pass, has_aux=True)(params)
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_allclose(lq1, lq2, rtol=1e-5, atol=1e-5)
    for u, w in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(g1["encoder"])) > 1e-3


def test_estimators_give_the_same_gradients_with_and_without_the_one_pass_hook():
    vae = build_vae(**TINY2)
    params = _perturbed(vae)
    x = _x(batch=6)
    plain = vae.model._replace(sample_with_log_proposal=None)
    # the fused bound (theta and phi in one pass) and the unbiased estimator's encoder objective
    for make in (
        lambda m: vj.make_iwae_grad(m, num_particles=4),
        lambda m: vj.make_unbiased_grad(m, num_particles=3),
    ):
        g1, i1 = fast_jit(make(vae.model))(params, x, jax.random.key(2))
        g2, i2 = fast_jit(make(plain))(params, x, jax.random.key(2))
        assert bool(jnp.all(i1["num_iters"] == i2["num_iters"]))
        for u, w in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
            np.testing.assert_allclose(u, w, rtol=1e-4, atol=1e-5)


def test_decoder_bias_initialised_to_logit_of_mean():
    vae = build_vae(**TINY)
    mean = np.array([0.0, 1e-5, 0.2, 0.5, 0.9, 1.0])
    params = vae.init(jax.random.key(0), data_mean=mean)
    clipped = np.clip(mean, 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(
        params["decoder"]["p_x"]["logits"]["bias"], np.log(clipped / (1 - clipped)), rtol=1e-5
    )
    assert (
        float(jnp.sum(jnp.abs(vae.init(jax.random.key(0))["decoder"]["p_x"]["logits"]["bias"])))
        == 0
    )
    # a zero latent code decodes to ~ the mean image only if weights vanish; check the bias wiring
    params["decoder"]["p_x"]["logits"]["kernel"] = jnp.zeros_like(
        params["decoder"]["p_x"]["logits"]["kernel"]
    )
    np.testing.assert_allclose(vae.decode(params, jnp.zeros(3)), clipped, rtol=1e-4)
    with pytest.raises(ValueError, match=r"data_mean must have shape \(6,\)"):
        vae.init(jax.random.key(0), data_mean=np.zeros(5))
    # init under jit/eval_shape with a traced mean
    out = jax.jit(lambda k, m: vae.init(k, data_mean=m))(jax.random.key(0), jnp.asarray(mean))
    np.testing.assert_allclose(
        out["decoder"]["p_x"]["logits"]["bias"],
        params["decoder"]["p_x"]["logits"]["bias"],
        rtol=1e-6,
    )


ESTIMATORS = {
    "elbo": lambda m: vj.make_elbo_grad(m, num_particles=3),
    "iwae": lambda m: vj.make_iwae_grad(m, num_particles=3),
    "mcmc": lambda m: vj.make_mcmc_grad(m, num_particles=3),
    "unbiased": lambda m: vj.make_unbiased_grad(m, num_particles=3, k=1, m=2, max_iters=50),
}


# All estimators of one case are compiled in ONE jit: XLA compile dominates this file's runtime
# on CPU and one module is ~40% cheaper than four. The two-layer elbo/mcmc case exercises the
# same model code paths as the unmarked cases, hence slow.
ESTIMATOR_CASES = [
    pytest.param(TINY, tuple(ESTIMATORS), id="one-all"),
    pytest.param(TINY2, ("iwae", "unbiased"), id="two-iwae-unbiased"),
    pytest.param(TINY2, ("elbo", "mcmc"), id="two-elbo-mcmc", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kw, names", ESTIMATOR_CASES)
def test_estimators_run_under_jit(kw, names):
    vae = build_vae(**kw)
    params = vae.init(jax.random.key(0), data_mean=np.full(D, 0.3))
    fns = {n: ESTIMATORS[n](vae.model) for n in names}

    @fast_jit
    def run_all(p, x, key):
        keys = jax.random.split(key, len(fns))
        return {n: f(p, x, k)[0] for (n, f), k in zip(fns.items(), keys, strict=True)}

    for name, grads in run_all(params, _x(), jax.random.key(7)).items():
        assert jax.tree.structure(grads) == jax.tree.structure(params), name
        for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
            assert g.shape == p.shape and g.dtype == p.dtype, name
            assert bool(jnp.all(jnp.isfinite(g))), name
        # theta always receives a gradient; so does phi (every estimator here trains q)
        assert float(jnp.sum(jnp.abs(grads["decoder"]["p_x"]["logits"]["bias"]))) > 0, name
        assert float(jnp.sum(jnp.abs(grads["encoder"]["q_z1"]["loc"]["bias"]))) > 0, name


def _primitive_counts(fn, *args):
    """Counter of primitive names in the jaxpr of fn(*args), sub-jaxprs included."""
    from jax.extend.core import jaxprs_in_params

    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] += 1
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def test_nnx_merge_traces_to_the_same_ops_as_a_hand_written_mlp():
    """Rebuilding the NNX modules inside the pure functions costs nothing at run time: each of
    the three functions traces to exactly the primitives of the same network in plain jnp."""
    vae = build_vae(**TINY)
    params = vae.init(jax.random.key(0))
    half = 0.5 * math.log(2 * math.pi)

    def mlp(p, h):
        return jnp.tanh(h @ p["trunk"]["dense_0"]["kernel"] + p["trunk"]["dense_0"]["bias"])

    def lin(p, h):
        return h @ p["kernel"] + p["bias"]

    def log_joint(params, x, z):
        d = params["decoder"]["p_x"]
        logits = lin(d["logits"], mlp(d, z))
        return jnp.sum(-0.5 * jnp.square(z) - half) + jnp.sum(x * logits - jax.nn.softplus(logits))

    def q(params, x):
        e = params["encoder"]["q_z1"]
        h = mlp(e, x)
        return lin(e["loc"], h), lin(e["log_scale"], h)

    def log_proposal(params, x, z):
        m, ls = q(params, x)
        return jnp.sum(-0.5 * jnp.square((z - m) * jnp.exp(-ls)) - ls - half)

    def sample_proposal(params, x, key, num):
        m, ls = q(params, x)
        k1, _ = jax.random.split(key)
        return m + jnp.exp(ls) * jax.random.normal(k1, (num, *m.shape), m.dtype)

    x, z, key = _x()[0], jnp.zeros(3), jax.random.key(0)
    for got, want, args in [
        (vae.model.log_joint, log_joint, (params, x, z)),
        (vae.model.log_proposal, log_proposal, (params, x, z)),
        (
            lambda p, x, k: vae.model.sample_proposal(p, x, k, 4),
            lambda p, x, k: sample_proposal(p, x, k, 4),
            (params, x, key),
        ),
    ]:
        assert _primitive_counts(got, *args) == _primitive_counts(want, *args)
        np.testing.assert_allclose(got(*args), want(*args), rtol=1e-6)


def test_vmap_and_vjp_through_the_pure_functions():
    vae = build_vae(**TINY2)
    params = vae.init(jax.random.key(0))
    x = _x()
    z = jax.vmap(lambda xi, k: vae.sample_proposal(params, xi, k, 2))(
        x, jax.random.split(jax.random.key(1), 4)
    )
    lj = jax.jit(jax.vmap(jax.vmap(vae.model.log_joint, (None, None, 0)), (None, 0, 0)))
    out, vjp = jax.vjp(lambda p: lj(p, x, z), params)
    assert out.shape == (4, 2)
    (g,) = vjp(jnp.ones_like(out))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert float(jnp.sum(jnp.abs(g["encoder"]["q_z1"]["loc"]["kernel"]))) == 0  # joint reads no phi


def test_check_data_errors():
    vae = build_vae(**TINY)
    vae.check_data(np.zeros((3, D)))
    vae.check_data(np.ones((3, D), np.uint8))
    with pytest.raises(ValueError, match=r"expected a batch of flattened examples \(B, 6\)"):
        vae.check_data(np.zeros((3, 7)))
    with pytest.raises(ValueError, match="non-finite"):
        vae.check_data(np.full((2, D), np.nan))
    with pytest.raises(ValueError, match=r"binarize.*dynamically.*statically.*gaussian"):
        vae.check_data(np.full((2, D), 0.5))
    with pytest.raises(ValueError, match=r"ONE example x of shape \(6,\)"):
        vae.model.log_joint(vae.init(jax.random.key(0)), jnp.zeros((2, D)), jnp.zeros(3))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hidden=()), "one or more hidden layers"),
        (dict(hidden=(3, 0)), "positive integer widths"),
        (dict(latent_dim=0), "latent_dim must be a positive integer"),
        (dict(likelihood="poisson"), "unknown likelihood"),
        (dict(activation="swishy"), "unknown activation"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(min_scale=-1.0), "min_scale"),
        (dict(two_layer=1), "two_layer must be True or False"),
        (dict(hiden=(3,)), "VAEConfig fields"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        build_vae(**kw)


def test_config_normalises_hidden_to_tuple():
    c = VAEConfig(hidden=[7, 8])
    assert c.hidden == (7, 8) and isinstance(VAE(c).config.hidden, tuple)


def test_float64():
    prev = jax.config.read("jax_enable_x64")
    try:
        jax.config.update("jax_enable_x64", False)
        with pytest.raises(ValueError, match="jax_enable_x64"):
            build_vae(**TINY, dtype="float64")
        jax.config.update("jax_enable_x64", True)
        one = build_vae(**TINY, dtype="float64")
        p1 = one.init(jax.random.key(0))
        assert one.model.log_joint(p1, _x()[0].astype(jnp.float64), jnp.zeros(3)).dtype == "float64"
        vae = build_vae(**TINY2, dtype="float64")
        params = vae.init(jax.random.key(0), data_mean=np.full(D, 0.3))
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
        x = _x().astype(jnp.float64)
        assert vae.sample_proposal(params, x[0], jax.random.key(2), 3).dtype == jnp.float64
        grads, _ = jax.jit(vj.make_iwae_grad(vae.model, num_particles=3))(
            params, x, jax.random.key(1)
        )
        assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    finally:
        jax.config.update("jax_enable_x64", prev)
