"""The estimators' contract: argument checks, the info dict, and the JAX transformations.

* Bad arguments raise a ValueError / TypeError at construction or trace time whose message names
  the problem (asserted on the text), never an error from deep inside XLA.
* ``info``: shapes (B, C), the ``num_log_joint_evals`` formula, ``num_iters = max(m, tau) - 1`` and
  ``meeting_time >= 1`` on lanes that met, capped lanes reported when ``max_iters`` is tiny.
* jit and no-jit agree; float64 works (inside ``jax.enable_x64``, the rest stays float32); vmap over
  keys equals separate calls; the estimator traces inside a jitted optax train step; any latent
  shape works (a (2, 3) latent gives exactly the flat model's result).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fast_compile import fast_jit
from jax.scipy.special import logsumexp

import vaeml_jax as vj
from vaeml_jax import testing as T
from vaeml_jax.estimators import _common

B = 6
S = 3


@functools.cache
def _setup(quality=0.4, dtype=jnp.float32):
    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=quality, dtype=dtype)
    x = (1.5 * jax.random.normal(jax.random.key(1), (B, 3))).astype(dtype)
    return model, params, x


FACTORIES = {
    "unbiased": vj.make_unbiased_grad,
    "iwae": vj.make_iwae_grad,
    "elbo": vj.make_elbo_grad,
    "mcmc": vj.make_mcmc_grad,
}
# The plain loop, whose evaluation count has the closed form checked below.
PLAIN = vj.LoopOptions(num_slots=None)
INFO_KWARGS = dict(
    num_particles=S, k=1, m=3, num_chains=2, encoder_objective="inclusive_kl", loop=PLAIN
)


@functools.cache
def _info_estimator():
    model, _, _ = _setup()
    est = vj.make_unbiased_grad(model, **INFO_KWARGS)
    return est, fast_jit(est)


# --------------------------------------------------------------------------- construction
BAD_CONSTRUCTION = [
    ("unbiased", dict(num_particles=1), ValueError, r"num_particles must be >= 2 for the CIS"),
    ("mcmc", dict(num_particles=1), ValueError, r"num_particles must be >= 2 for the CIS"),
    ("iwae", dict(num_particles=0), ValueError, r"num_particles must be >= 1"),
    ("elbo", dict(num_particles=0), ValueError, r"num_particles must be >= 1"),
    ("unbiased", dict(k=3, m=2), ValueError, r"k must be <= m .* got k=3 > m=2"),
    ("unbiased", dict(k=-1), ValueError, r"k must be >= 0, got -1"),
    ("unbiased", dict(m=-2), ValueError, r"m must be >= 0, got -2"),
    ("unbiased", dict(num_chains=0), ValueError, r"num_chains must be >= 1"),
    ("unbiased", dict(k=1.0, m=2), TypeError, r"k must be an int, got 1.0 \(float\)"),
    ("unbiased", dict(m="2"), TypeError, r"m must be an int, got '2' \(str\)"),
    ("unbiased", dict(num_particles=True), TypeError, r"num_particles must be an int"),
    ("unbiased", dict(num_particles=4.0), TypeError, r"num_particles must be an int"),
    ("unbiased", dict(m=5, max_iters=3), ValueError, r"max_iters must be >= 5 \(it must at least"),
    ("unbiased", dict(max_iters=0), ValueError, r"max_iters must be >= 1"),
    ("unbiased", dict(max_iters=10.5), TypeError, r"max_iters must be an int"),
    ("unbiased", dict(loop=vj.LoopOptions(num_slots=0)), ValueError, r"num_slots must be >= 1"),
    ("unbiased", dict(loop=vj.LoopOptions(unroll=0)), ValueError, r"unroll must be >= 1"),
    (
        "unbiased",
        dict(loop=vj.LoopOptions(unroll=2, num_slots=4)),
        ValueError,
        r"unroll=2 applies to the plain loop",
    ),
    ("unbiased", dict(encoder_objective="kl"), ValueError, r"encoder_objective must be one of"),
    ("iwae", dict(encoder_objective="ELBO"), ValueError, r"encoder_objective must be one of"),
    ("elbo", dict(encoder_objective="sumo"), ValueError, r"encoder_objective must be one of"),
    ("mcmc", dict(encoder_objective=""), ValueError, r"encoder_objective must be one of"),
    ("mcmc", dict(num_steps=-1), ValueError, r"num_steps must be >= 0"),
    ("mcmc", dict(num_steps=2, burn_in=3), ValueError, r"burn_in must be <= num_steps"),
    ("mcmc", dict(burn_in=1.5), TypeError, r"burn_in must be an int"),
]


@pytest.mark.parametrize("name, kwargs, exc, match", BAD_CONSTRUCTION)
def test_bad_arguments_raise_at_construction(name, kwargs, exc, match):
    model, _, _ = _setup()
    with pytest.raises(exc, match=match):
        FACTORIES[name](model, **kwargs)


ALL_FACTORIES = dict(FACTORIES, sumo=vj.make_sumo_grad)
SHARED_NAMES = ("num_particles", "encoder_objective", "encoder_particles")


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_the_model_is_the_only_positional_argument(name):
    """One signature shape for every constructor: the model positional, the rest keyword-only,
    one name per concept (a positional S is refused rather than taken for something else)."""
    import inspect

    params = inspect.signature(ALL_FACTORIES[name]).parameters
    kinds = [p.kind for p in params.values()]
    assert list(params)[0] == "model" and kinds[0] is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(k is inspect.Parameter.KEYWORD_ONLY for k in kinds[1:])
    if name != "sumo":  # SUMO draws a random number of particles: no S, no K of its own
        assert set(SHARED_NAMES) <= set(params)
    assert "encoder_objective" in params
    model, _, _ = _setup()
    with pytest.raises(TypeError, match="positional argument"):
        ALL_FACTORIES[name](model, 5)


@pytest.mark.parametrize("name", list(ALL_FACTORIES))
def test_estimators_return_a_loss_gradient_with_the_documented_info(name):
    model, params, x = _setup()
    kw = {} if name == "sumo" else dict(num_particles=S)
    out = ALL_FACTORIES[name](model, **kw)(params, x, jax.random.key(0))
    assert isinstance(out, vj.LossGradient)
    # SUMO adds one documented field (each example's own evaluations) to the common ones
    documented = vj.estimators.SumoInfo if name == "sumo" else vj.GradientInfo
    assert set(out.info) == set(documented.__annotations__)
    grads, info = out  # unpacks like the (grads, info) pair it is
    assert info is out.info and grads is out.grads


def test_numpy_ints_and_boundary_values_are_accepted():
    model, _, _ = _setup()
    vj.make_unbiased_grad(model, num_particles=np.int64(2), k=np.int32(2), m=2, max_iters=2)
    vj.make_mcmc_grad(model, num_particles=2, num_steps=0, burn_in=0)
    vj.make_iwae_grad(model, num_particles=1, encoder_objective=None)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_model_must_be_a_latent_variable_model(name):
    model, _, _ = _setup()
    with pytest.raises(TypeError, match=r"model must be a vaeml_jax.LatentVariableModel"):
        FACTORIES[name](tuple(model))
    with pytest.raises(TypeError, match=r"LatentVariableModel.log_proposal must be callable"):
        FACTORIES[name](model._replace(log_proposal=None))
    with pytest.raises(TypeError, match=r"sample_with_log_proposal must be callable"):
        FACTORIES[name](model._replace(sample_with_log_proposal="yes"))
    with pytest.raises(TypeError, match=r"proposal_features was given without its partner"):
        FACTORIES[name](model._replace(proposal_features=lambda p, x: x))


# --------------------------------------------------------------------------- call / trace time
def _vector_log_joint(model):
    return model._replace(log_joint=lambda p, x, z: model.log_joint(p, x, z) * jnp.ones(3))


def _vector_log_proposal(model):
    return model._replace(log_proposal=lambda p, x, z: jnp.stack([model.log_proposal(p, x, z)]))


def _ignores_num(model):
    return model._replace(
        sample_proposal=lambda p, x, key, num: model.sample_proposal(p, x, key, 1)
    )


def _hook_without_log_q(model):
    """A one-pass hook that forgets to return log q."""
    return model._replace(
        sample_with_log_proposal=lambda p, x, key, num: model.sample_proposal(p, x, key, num)
    )


def _features_hook_with_wrong_count(model):
    """A features pair whose sampler ignores ``num`` (and forgets log q)."""
    return model._replace(
        proposal_features=lambda p, x: x,
        sample_from_features=lambda p, f, key, num: model.sample_proposal(p, f, key, 1),
    )


BAD_MODELS = [
    (
        _features_hook_with_wrong_count,
        r"sample_from_features\(params, proposal_features\(params, x\), key, num\) must return "
        r"\(z, log_q\)",
    ),
    (
        _hook_without_log_q,
        r"sample_with_log_proposal\(params, x, key, num\) must return \(z, log_q\)",
    ),
    (_vector_log_joint, r"model.log_joint\(params, x, z\) must return a scalar .* shape \(3,\)"),
    (_vector_log_proposal, r"model.log_proposal\(params, x, z\) must return a scalar"),
    (
        _ignores_num,
        r"must return an array of shape \(num, \*latent_shape\); with num=2 it returned "
        r"\(1, 2\)",
    ),
]


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("bad_model, match", BAD_MODELS)
@pytest.mark.parametrize("jit", [False, True])
def test_mismatched_model_shapes_raise_at_trace_time(name, bad_model, match, jit):
    model, params, x = _setup()
    est = FACTORIES[name](bad_model(model))
    fn = jax.jit(est) if jit else est
    with pytest.raises(ValueError, match=match):
        fn(params, x, jax.random.key(0))


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_raises(name, bad):
    model, params, x = _setup()
    x = x.at[2, 1].set(bad)
    with pytest.raises(ValueError, match=r"x contains 1 non-finite values \(NaN or inf\)"):
        FACTORIES[name](model)(params, x, jax.random.key(0))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bad_data_shapes_raise(name):
    model, params, x = _setup()
    est = FACTORIES[name](model)
    with pytest.raises(ValueError, match=r"add the batch axis: x\[None\]"):  # one example, no batch
        est(params, x[0], jax.random.key(0))
    with pytest.raises(ValueError, match=r"leading batch axis of size >= 1, got shape \(\)"):
        est(params, x[0, 0], jax.random.key(0))
    with pytest.raises(ValueError, match=r"leading batch axis of size >= 1, got shape \(0, 3\)"):
        est(params, x[:0], jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"model.sample_proposal.* failed on x\[0\] of shape \(4,\)"
    ):
        est(params, jnp.ones((B, 4)), jax.random.key(0))  # wrong data dimension
    with pytest.raises(TypeError, match=r"x must be an array with a leading batch axis, got list"):
        est(params, [[0.0, 1.0, 2.0]], jax.random.key(0))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bad_keys_raise(name):
    model, params, x = _setup()
    est = FACTORIES[name](model)
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key \(jax.random.key\(seed\)\)"):
        est(params, x, 0)
    with pytest.raises(TypeError, match=r"key must be a JAX PRNG key"):
        est(params, x, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"key must be ONE PRNG key, got a key array of shape"):
        est(params, x, jax.random.split(jax.random.key(0), B))


def test_legacy_uint32_key_is_the_same_key():
    model, params, x = _setup()
    est = fast_jit(vj.make_iwae_grad(model, num_particles=S))
    a, _ = est(params, x, jax.random.PRNGKey(3))
    b, _ = est(params, x, jax.random.wrap_key_data(jax.random.PRNGKey(3)))
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------- info
def test_unbiased_info_fields():
    _, est = _info_estimator()
    model, params, x = _setup()
    grads, info = est(params, x, jax.random.key(4))
    C, m = INFO_KWARGS["num_chains"], INFO_KWARGS["m"]
    for name in ("meeting_time", "num_iters", "capped"):
        assert info[name].shape == (B, C), name
    assert jnp.issubdtype(info["meeting_time"].dtype, jnp.integer)
    assert jnp.issubdtype(info["num_iters"].dtype, jnp.integer)
    assert info["capped"].dtype == jnp.bool_ and not bool(info["capped"].any())
    assert info["bound"].shape == (B,) and bool(jnp.all(jnp.isfinite(info["bound"])))
    tau, iters = np.asarray(info["meeting_time"]), np.asarray(info["num_iters"])
    assert tau.min() >= 1
    # Each lane runs until it has met AND reached t = m: num_iters = max(m, tau) - 1 >= m - 1.
    np.testing.assert_array_equal(iters, np.maximum(m, tau) - 1)
    assert iters.min() >= m - 1
    # Every loop iteration evaluates S+1 atoms on every lane (finished ones masked, not skipped).
    assert int(info["num_log_joint_evals"]) == B * C * (2 * S + (S + 1) * int(iters.max()))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))


def test_batch_gradient_is_the_mean_of_per_example_gradients():
    """The loss is -(1/B) sum_i log p(x_i) (and (1/B) sum_i KL_i on the encoder): the batch
    estimate with per-lane keys equals the mean of one-example estimates with the same keys, so
    an example's estimate does not depend on its batch-mates (finished lanes are frozen)."""
    est, jitted = _info_estimator()
    _, params, x = _setup()
    key = jax.random.key(14)
    grads, _ = jitted(params, x, key)
    lanes = _common.lane_keys(key, B, INFO_KWARGS["num_chains"])
    one = fast_jit(est.with_lane_keys)
    per_example = [one(params, x[i : i + 1], lanes[i : i + 1])[0] for i in range(B)]
    mean = jax.tree.map(lambda *g: sum(g) / B, *per_example)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), grads, mean)


def test_tiny_max_iters_caps_and_reports():
    model, params, x = _setup(quality=0.0)  # the prior as proposal: chains meet slowly
    xr = jnp.tile(x, (8, 1))  # 48 lanes
    est = fast_jit(vj.make_unbiased_grad(model, num_particles=2, max_iters=1, loop=PLAIN))
    grads, info = est(params, xr, jax.random.key(5))
    capped = np.asarray(info["capped"])
    iters, tau = np.asarray(info["num_iters"]), np.asarray(info["meeting_time"])
    assert 0 < capped.sum() < capped.size, capped.mean()  # some lanes capped, some met
    assert np.all(iters <= 1)
    np.testing.assert_array_equal(iters[capped], 1)
    np.testing.assert_array_equal(tau[capped], iters[capped] + 2)  # a lower bound: last t + 1
    np.testing.assert_array_equal(tau[~capped], iters[~capped] + 1)  # k = m = 0: iters = tau - 1
    assert int(info["num_log_joint_evals"]) == xr.shape[0] * (2 * 2 + 3 * 1)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))


def test_mcmc_and_bound_info_fields():
    model, params, x = _setup()
    _, info = fast_jit(vj.make_mcmc_grad(model, num_particles=S, num_steps=4, burn_in=2))(
        params, x, jax.random.key(6)
    )
    np.testing.assert_array_equal(info["num_iters"], np.full((B, 1), 4))
    assert info["meeting_time"].shape == (B, 1) and not bool(info["capped"].any())
    # b' = max(b, 1) - 1 = 1 burn-in-only step (S-1 evaluations), then S per averaged step.
    assert int(info["num_log_joint_evals"]) == B * (S + (S - 1) * 1 + S * (4 - 1))
    assert info["bound"].shape == (B,)


# --------------------------------------------------------------------------- transformations
def test_jit_and_no_jit_agree():
    est, jitted = _info_estimator()
    _, params, x = _setup()
    a, info_a = jitted(params, x, jax.random.key(7))
    b, info_b = est(params, x, jax.random.key(7))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b)
    for name in ("meeting_time", "num_iters", "capped", "num_log_joint_evals"):
        np.testing.assert_array_equal(info_a[name], info_b[name])


def test_vmap_over_keys_equals_separate_calls():
    _, jitted = _info_estimator()
    _, params, x = _setup()
    keys = jax.random.split(jax.random.key(8), 3)
    est, _ = _info_estimator()
    stacked, infos = fast_jit(jax.vmap(lambda k: est(params, x, k)))(keys)
    for r in range(3):
        single, info = jitted(params, x, keys[r])
        jax.tree.map(
            lambda u, v, r=r: np.testing.assert_allclose(u[r], v, rtol=2e-5, atol=1e-6),
            stacked,
            single,
        )
        np.testing.assert_array_equal(infos["meeting_time"][r], info["meeting_time"])
        assert int(infos["num_log_joint_evals"][r]) == int(info["num_log_joint_evals"])


def _ref_iwae_loss(model, params, x, keys, num):
    def one(xi, key):
        z = model.sample_proposal(params, xi, key, num)
        lw = jax.vmap(
            lambda zz: model.log_joint(params, xi, zz) - model.log_proposal(params, xi, zz)
        )(z)
        return logsumexp(lw) - math.log(num)

    return -jnp.mean(jax.vmap(one)(x, keys))


def test_float64():
    with jax.enable_x64(True):
        model, params, x = _setup(dtype=jnp.float64)
        keys = jax.random.split(jax.random.key(9), B)
        # IWAE (fused) in float64 matches a hand-written reference to float64 precision.
        iwae = vj.make_iwae_grad(model, num_particles=S)
        grads, info = fast_jit(iwae.with_lane_keys)(params, x, keys[:, None])
        ref = fast_jit(jax.grad(lambda p: _ref_iwae_loss(model, p, x, keys, S)))(params)
        jax.tree.map(
            lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-13), grads, ref
        )
        assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(grads))
        # The unbiased estimator runs in float64 end to end, in the default loop and the plain one.
        for loop in (None, PLAIN):
            est = vj.make_unbiased_grad(model, num_particles=S, k=1, m=2, loop=loop)
            grads, info = fast_jit(est)(params, x, jax.random.key(10))
            assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(grads))
            assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))
            assert info["bound"].dtype == jnp.float64
    assert jnp.zeros(1).dtype == jnp.float32  # the context did not leak into the session


def test_traces_inside_a_jitted_optax_train_step():
    model, params, x = _setup()
    est = vj.make_unbiased_grad(model, num_particles=S, k=0, m=1, encoder_objective="inclusive_kl")
    opt = optax.adam(1e-2)

    @fast_jit
    def train_step(params, opt_state, x, key):
        grads, info = est(params, x, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, info

    opt_state = opt.init(params)
    new, opt_state, info = train_step(params, opt_state, x, jax.random.key(11))
    new, opt_state, info = train_step(new, opt_state, x, jax.random.key(12))
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        assert after.shape == before.shape and after.dtype == before.dtype
        assert bool(jnp.all(jnp.isfinite(after))) and not np.allclose(after, before)
    assert int(opt_state[0].count) == 2


def _reshaped(model, shape):
    """The same model with its latent stored as an array of ``shape`` instead of a vector."""
    size = math.prod(shape)
    return vj.LatentVariableModel(
        log_joint=lambda p, x, z: model.log_joint(p, x, z.reshape(size)),
        sample_proposal=lambda p, x, key, num: model.sample_proposal(p, x, key, num).reshape(
            (num, *shape)
        ),
        log_proposal=lambda p, x, z: model.log_proposal(p, x, z.reshape(size)),
    )


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("unbiased", dict(num_particles=2, k=0, m=1, encoder_objective=None)),
        ("mcmc", dict(num_particles=S, num_steps=2, encoder_objective="inclusive_kl")),
    ],
)
def test_matrix_latent_equals_flat_latent(name, kwargs):
    flat = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(2), data_dim=4, latent_dim=6)
    x = jax.random.normal(jax.random.key(3), (4, 4))
    key = jax.random.key(13)
    g_flat, info_flat = fast_jit(FACTORIES[name](flat, **kwargs))(params, x, key)
    g_mat, info_mat = fast_jit(FACTORIES[name](_reshaped(flat, (2, 3)), **kwargs))(params, x, key)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), g_mat, g_flat)
    np.testing.assert_array_equal(info_mat["num_iters"], info_flat["num_iters"])
    np.testing.assert_array_equal(info_mat["meeting_time"], info_flat["meeting_time"])
    if kwargs["encoder_objective"] is None:  # exact zeros on the proposal's parameters
        for leaf in jax.tree.leaves(g_mat["encoder"]):
            np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
