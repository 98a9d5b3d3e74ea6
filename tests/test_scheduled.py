"""The work-queue loop (LoopOptions(num_slots=P)) must reproduce the plain batched loop exactly.

Both consume the same random draws, so for a fixed key they must agree on every per-lane quantity
(meeting times, iterations, capping) bit for bit and on the gradient up to float summation order.
The plain loop is checked for unbiasedness against closed forms in test_unbiased.py; this makes it
the reference for the scheduled one.

Every program here is compiled by XLA's unoptimised backend (``fast_jit``): these tests compare two
loops on tiny models, so their time is compilation; both sides of each comparison are compiled
alike. The plain reference of each case is computed once per test process.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from _fast_compile import fast_jit

import vaeml_jax as vj
from vaeml_jax import testing as T
from vaeml_jax.estimators import LoopOptions

PLAIN = LoopOptions(num_slots=None)


def queue(num_slots, **options):
    """The loop options of a P-slot work queue (the cascade and deferred stages by default)."""
    return LoopOptions(num_slots=num_slots, **options)


CASES = [
    dict(k=0, m=0),
    dict(k=1, m=3, num_chains=2),
    dict(k=0, m=0, encoder_objective="inclusive_kl"),
    dict(k=2, m=2, encoder_objective="elbo"),
    dict(k=0, m=0, max_iters=2),  # many capped lanes
]


@functools.cache
def _setup():
    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=0.3)
    x = 2.0 * jax.random.normal(jax.random.key(3), (24, 3))
    return model, params, x


@pytest.fixture(scope="module")
def setup():
    return _setup()


# num_slots alone runs the cascade P, P/2, ..., 1 (the default); slot_cascade=False keeps P slots.
PAIRS = (
    [(CASES[0], queue(1)), (CASES[0], queue(1000)), (CASES[0], queue(7)), (CASES[0], queue(24))]
    + [(case, queue(5)) for case in CASES]
    + [(case, queue(5, slot_cascade=False)) for case in CASES[:3]]
    + [(case, queue(5, deferred_backward=False)) for case in CASES[:3]]
    + [(case, LoopOptions()) for case in CASES[:2]]  # the default ("auto": the queue on CPU)
)


@functools.cache
def _plain_reference(case: int):
    """The plain loop's (grads, info) for CASES[case] on the module's set-up, key 5."""
    model, params, x = _setup()
    plain = fast_jit(vj.make_unbiased_grad(model, num_particles=3, loop=PLAIN, **CASES[case]))
    return plain(params, x, jax.random.key(5))


@pytest.mark.parametrize("kwargs,loop", PAIRS)
def test_scheduled_equals_plain_loop(setup, kwargs, loop):
    model, params, x = setup
    sched = fast_jit(vj.make_unbiased_grad(model, num_particles=3, loop=loop, **kwargs))
    g_ref, i_ref = _plain_reference(CASES.index(kwargs))
    g, info = sched(params, x, jax.random.key(5))
    for name in ("meeting_time", "num_iters", "capped"):
        assert info[name].shape == i_ref[name].shape
        assert bool(jnp.all(info[name] == i_ref[name])), name
    np_tol = 1e-5 * max(1.0, max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_ref)))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= np_tol
    assert jnp.allclose(info["bound"], i_ref["bound"])


@pytest.mark.parametrize("kwargs", [CASES[0], CASES[1], CASES[4]])
def test_unrolled_plain_loop_equals_plain_loop(setup, kwargs):
    """unroll=U runs U masked iterations per while_loop step: same per-lane results and the same
    estimate; its overshoot (< U iterations) is counted in num_log_joint_evals."""
    model, params, x = setup
    g_ref, i_ref = _plain_reference(CASES.index(kwargs))
    U = 4
    unrolled = fast_jit(
        vj.make_unbiased_grad(model, num_particles=3, loop=LoopOptions(unroll=U), **kwargs)
    )
    g, info = unrolled(params, x, jax.random.key(5))
    for name in ("meeting_time", "num_iters", "capped"):
        assert bool(jnp.all(info[name] == i_ref[name])), name
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * max(1.0, float(jnp.max(jnp.abs(b))))
    B, C, S = x.shape[0], kwargs.get("num_chains", 1), 3

    def loops(i):  # while_loop iterations run, from the evaluation count
        return (int(i["num_log_joint_evals"]) - B * C * 2 * S) // (B * C * (S + 1))

    assert loops(i_ref) == int(jnp.max(i_ref["num_iters"]))
    assert loops(info) == -(-loops(i_ref) // U) * U


NO_FEATURES = dict(proposal_features=None, sample_from_features=None)
# name: (VAE config, model fields replaced, estimator options)
VAE_VARIANTS = {
    "hooks": ({}, {}, {}),
    "no_proposal_features": ({}, NO_FEATURES, {}),
    "no_hooks": ({}, dict(NO_FEATURES, sample_with_log_proposal=None), {}),
    "two_layers_inclusive_kl": (
        dict(latent1_dim=4, hidden2=(8,)),
        {},
        dict(encoder_objective="inclusive_kl"),
    ),
}


@pytest.mark.parametrize("variant", list(VAE_VARIANTS))
def test_scheduled_equals_plain_loop_for_a_vae(variant):
    """The library VAE: same selections and the same estimate in the queue, its cascade and its
    deferred stages, as in the plain loop; with the model's hooks (the queue draws from the
    cached encoder output and carries log q), without them, and with inclusive_kl (log q
    re-evaluated for its gradient)."""
    from vaeml_jax.models import build_vae

    config, change, kw = VAE_VARIANTS[variant]
    vae = build_vae(data_dim=20, hidden=(16,), latent_dim=4, **config)
    model = vae.model._replace(**change)
    params = vae.init(jax.random.key(0))
    x = (jax.random.uniform(jax.random.key(1), (32, 20)) < 0.4).astype(jnp.float32)
    g_ref, i_ref = fast_jit(vj.make_unbiased_grad(model, num_particles=5, loop=PLAIN, **kw))(
        params, x, jax.random.key(2)
    )
    g, info = fast_jit(vj.make_unbiased_grad(model, num_particles=5, loop=queue(3), **kw))(
        params, x, jax.random.key(2)
    )
    assert int(jnp.max(i_ref["num_iters"])) > 3  # the cascade and the deferred stages ran
    assert bool(jnp.all(info["num_iters"] == i_ref["num_iters"]))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5


def test_few_slots_do_less_work(setup):
    """The point of the queue: evaluations follow the mean, not the max, number of iterations."""
    model, params, x = setup
    plain = fast_jit(vj.make_unbiased_grad(model, num_particles=3, loop=PLAIN))
    # forward and backward per atom (no deferred backward, whose second evaluation is counted)
    sched = fast_jit(
        vj.make_unbiased_grad(model, num_particles=3, loop=queue(4, deferred_backward=False))
    )
    _, i_ref = plain(params, x, jax.random.key(9))
    _, info = sched(params, x, jax.random.key(9))
    mean_iters = float(jnp.mean(i_ref["num_iters"]))
    max_iters = int(jnp.max(i_ref["num_iters"]))
    assert max_iters > 2 * mean_iters  # a heavy tail, else the test shows nothing
    assert int(info["num_log_joint_evals"]) < 0.6 * int(i_ref["num_log_joint_evals"])


def test_cascade_does_less_work(setup):
    """Shrinking the slots as the queue drains evaluates fewer atoms than P slots to the end."""
    model, params, x = setup
    flat = fast_jit(
        vj.make_unbiased_grad(
            model, num_particles=3, loop=queue(8, slot_cascade=False, deferred_backward=False)
        )
    )
    cascade = fast_jit(
        vj.make_unbiased_grad(model, num_particles=3, loop=queue(8, deferred_backward=False))
    )
    _, i_flat = flat(params, x, jax.random.key(9))
    _, info = cascade(params, x, jax.random.key(9))
    assert bool(jnp.all(info["num_iters"] == i_flat["num_iters"]))
    assert int(info["num_log_joint_evals"]) < int(i_flat["num_log_joint_evals"])


def test_deferred_backward_counts_its_second_evaluation(setup):
    """One slot: every row is deferred, so each lane-iteration's S+1 atoms are evaluated twice,
    plus at most one partly filled buffer's padding rows."""
    from vaeml_jax.estimators._scheduled import buffer_rows

    model, params, x = setup
    S = 3
    now = fast_jit(
        vj.make_unbiased_grad(model, num_particles=S, loop=queue(1, deferred_backward=False))
    )
    deferred = fast_jit(vj.make_unbiased_grad(model, num_particles=S, loop=queue(1)))
    _, i_now = now(params, x, jax.random.key(9))
    _, info = deferred(params, x, jax.random.key(9))
    rows = int(jnp.sum(i_now["num_iters"] + 1))  # lane-iterations
    extra = int(info["num_log_joint_evals"]) - int(i_now["num_log_joint_evals"])
    assert extra % (S + 1) == 0
    assert rows <= extra // (S + 1) < rows + buffer_rows(S)
    assert rows > buffer_rows(S)  # the buffer filled and was flushed inside the loop


def test_stage_widths():
    from vaeml_jax.estimators._scheduled import stage_widths

    assert stage_widths(1) == (1,)
    assert stage_widths(10) == (10, 5, 3, 2, 1)
    assert stage_widths(16) == (16, 8, 4, 2, 1)


def test_num_slots_validated(setup):
    model, _, _ = setup
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        vj.make_unbiased_grad(model, loop=queue(0))
    with pytest.raises(ValueError, match="num_slots must be 'auto', None or an int"):
        vj.make_unbiased_grad(model, loop=queue("fast"))
    with pytest.raises(TypeError, match="slot_cascade must be a bool"):
        vj.make_unbiased_grad(model, loop=queue(4, slot_cascade=1))
    with pytest.raises(TypeError, match="deferred_backward must be a bool"):
        vj.make_unbiased_grad(model, loop=queue(4, deferred_backward="yes"))
    with pytest.raises(TypeError, match="loop must be None or"):
        vj.make_unbiased_grad(model, loop={"num_slots": 4})


def test_auto_num_slots_is_the_backend_rule():
    """The default loop: B*C/4 slots on CPU (at least 1), the plain loop on accelerators."""
    assert vj.estimators.auto_num_slots(100, "cpu") == 25
    assert vj.estimators.auto_num_slots(200, "cpu") == 50
    assert vj.estimators.auto_num_slots(3, "cpu") == 1
    assert vj.estimators.auto_num_slots(100, "gpu") is None
    assert vj.estimators.auto_num_slots(100, "tpu") is None


@pytest.mark.parametrize("backend,expect_queue", [("cpu", True), ("gpu", False)])
def test_default_loop_follows_the_backend(setup, monkeypatch, backend, expect_queue):
    """make_unbiased_grad's default resolves auto_num_slots(B*C) at trace time: the work queue of
    B*C/4 slots where the backend is a CPU, the plain loop elsewhere (told apart by their
    evaluation counts, which differ for the same draws)."""
    model, params, x = setup
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    B, C = x.shape[0], 2
    default = fast_jit(vj.make_unbiased_grad(model, num_particles=3, num_chains=C))
    expected = queue(B * C // 4) if expect_queue else PLAIN
    ref = fast_jit(vj.make_unbiased_grad(model, num_particles=3, num_chains=C, loop=expected))
    other = fast_jit(
        vj.make_unbiased_grad(
            model, num_particles=3, num_chains=C, loop=PLAIN if expect_queue else queue(B * C // 4)
        )
    )
    _, info = default(params, x, jax.random.key(4))
    _, i_ref = ref(params, x, jax.random.key(4))
    _, i_other = other(params, x, jax.random.key(4))
    assert int(info["num_log_joint_evals"]) == int(i_ref["num_log_joint_evals"])
    assert int(info["num_log_joint_evals"]) != int(i_other["num_log_joint_evals"])
