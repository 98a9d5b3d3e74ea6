"""Training: config checks, the IWAE schedule, the pure train step, resume == uninterrupted run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vaeml_jax import make_iwae_grad
from vaeml_jax.testing import linear_gaussian_model, linear_gaussian_params
from vaeml_jax.training import (
    IWAE_SCHEDULE_EPOCHS,
    ConfigError,
    RunDirError,
    TrainConfig,
    TrainState,
    iwae_learning_rate,
    learning_rate,
    load_run,
    make_optimizer,
    make_train_step,
    read_metrics,
    set_learning_rate,
    train,
)

SMALL = dict(
    hidden=(32,),
    latent_dim=4,
    num_particles=4,
    batch_size=50,
    max_train_examples=200,
    eval_every=0,
)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Share compiled programs between the runs of this session (and its subprocesses)."""
    old = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jaxc"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


# ---- config ------------------------------------------------------------------------------------
def test_defaults_are_the_paper_sized_unbiased_run():
    c = TrainConfig().resolved()
    assert (c.dataset, c.estimator, c.binarization) == ("mnist", "unbiased", "dynamic")
    assert (c.hidden, c.latent_dim, c.two_layer, c.likelihood) == (
        (200, 200),
        50,
        False,
        "bernoulli",
    )
    assert (c.k, c.m, c.encoder_objective, c.epochs) == (0, 0, "iwae", 100)
    assert TrainConfig(estimator="elbo").resolved().encoder_objective == "elbo"
    assert TrainConfig(schedule="iwae").resolved().epochs == IWAE_SCHEDULE_EPOCHS == 3280
    assert TrainConfig(likelihood="gaussian").resolved().binarization == "none"
    if jax.default_backend() == "cpu":  # the work-queue loop: B*C/4 slots
        assert c.num_slots == 25 and TrainConfig(num_chains=2).resolved().num_slots == 50
    assert TrainConfig(estimator="iwae").resolved().num_slots is None
    assert TrainConfig(dataset="fashion-mnist").resolved().dataset == "fashion_mnist"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(estimator="vimco"), "unknown estimator 'vimco'; choose one of: elbo, iwae"),
        (dict(dataset="cifar"), "unknown dataset 'cifar'"),
        (dict(k=3, m=1), "k must be <= m"),
        (dict(num_particles=1), "num_particles must be an integer >= 2"),
        (dict(lr=-1.0), "lr must be a positive number"),
        (dict(lr=float("nan")), "lr must be a positive number"),
        (dict(hidden=()), "hidden must be one or more"),
        (dict(schedule="cosine"), "unknown schedule"),
        (dict(burn_in=6, num_steps=5), "burn_in must be <= num_steps"),
        (dict(max_train_examples=10, batch_size=20), "smaller than batch_size"),
        (dict(epochs=0), "epochs must be an integer >= 1"),
    ],
)
def test_invalid_configs_are_refused_with_a_message(change, match):
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(TrainConfig(), **change).resolved()


def test_from_dict_merges_and_refuses_unknown_keys():
    base = TrainConfig(lr=0.5)
    c = TrainConfig.from_dict({"batch-size": 7, "hidden": "64, 32"}, base=base)
    assert (c.batch_size, c.hidden, c.lr) == (7, (64, 32), 0.5)
    with pytest.raises(ConfigError, match="unknown config key.*'nonsense'"):
        TrainConfig.from_dict({"nonsense": 1})
    d = TrainConfig().resolved().to_dict()
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == TrainConfig().resolved()


# ---- schedule ----------------------------------------------------------------------------------
def test_iwae_schedule_stages_and_rates():
    # stage i lasts 3^(i-1) epochs at lr 1e-3 * 10^(-(i-1)/7), one decimal in the mantissa
    expected = [1e-3, 7.2e-4, 5.2e-4, 3.7e-4, 2.7e-4, 1.9e-4, 1.4e-4, 1e-4]
    starts = np.cumsum([0] + [3**i for i in range(8)])
    for i, lr in enumerate(expected):
        for e in (starts[i], starts[i + 1] - 1):
            assert iwae_learning_rate(int(e)) == pytest.approx(lr, rel=1e-12)
    assert starts[-1] == 3280
    assert iwae_learning_rate(5000) == pytest.approx(1e-4)
    cfg = TrainConfig(schedule="iwae", lr=2e-3).resolved()
    assert learning_rate(cfg, 1) == pytest.approx(1.44e-3)


def test_learning_rate_lives_in_the_optimizer_state():
    cfg = TrainConfig(schedule="iwae", epochs=13).resolved()
    opt = make_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    grads = {"w": jnp.ones(())}
    update = jax.jit(opt.update)  # one program for every learning rate
    state = opt.init(params)
    seen = []
    for epoch in range(4):  # 2 steps per epoch: lr 1e-3, then 7.2e-4 for epochs 1-3
        state = set_learning_rate(state, learning_rate(cfg, epoch))
        for _ in range(2):
            upd, state = update(grads, state, params)
            seen.append(-float(upd["w"]))  # Adam's steps with constant grads: |update| = lr
    np.testing.assert_allclose(seen, [1e-3] * 2 + [7.2e-4] * 6, rtol=1e-4)
    assert update._cache_size() == 1


# ---- the pure train step -----------------------------------------------------------------------
def _lg_setup():
    model = linear_gaussian_model()
    params = linear_gaussian_params(jax.random.key(0), data_dim=3, latent_dim=2)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    return model, params, x


def test_train_step_applies_adam_to_the_estimator_gradient():
    model, params, x = _lg_setup()
    grad_fn = make_iwae_grad(model, num_particles=5)
    opt = optax.adam(1e-2)
    step = jax.jit(make_train_step(grad_fn, opt))
    state = TrainState(params, opt.init(params))
    key = jax.random.key(3)
    new, metrics = step(state, x, key)

    @jax.jit
    def reference(params, opt_state):
        grads, info = grad_fn(params, x, key)
        upd, _ = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), info

    expected, info = reference(params, state.opt_state)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert bool(metrics["finite"])
    np.testing.assert_allclose(metrics["bound"], jnp.mean(info["bound"]), rtol=1e-6)
    assert metrics["meeting_time"].shape == (8, 1)


def test_train_step_refuses_a_non_finite_update():
    model, params, x = _lg_setup()
    grad_fn = make_iwae_grad(model, num_particles=5)

    def poisoned(p, xx, k):
        g, info = grad_fn(p, xx, k)
        return jax.tree.map(lambda a: a * jnp.nan, g), info

    opt = optax.adam(1e-2)
    state = TrainState(params, opt.init(params))
    new, metrics = jax.jit(make_train_step(poisoned, opt))(state, x, jax.random.key(0))
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing applied, optimizer count included


# ---- end to end on real data (small) ------------------------------------------------------------
def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tmp_path, mnist_dir):
    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=3, checkpoint_every=1, **SMALL)
    full = train(cfg, tmp_path / "full", progress=False, log=lambda s: None)
    part = train(
        dataclasses.replace(cfg, epochs=1), tmp_path / "part", progress=False, log=lambda s: None
    )
    assert part["epoch"] == 1 and not _leaves_equal(part["params"], full["params"])
    with pytest.raises(RunDirError, match="Pass --resume"):
        train(cfg, tmp_path / "part", progress=False)
    rest = train(cfg, tmp_path / "part", resume=True, progress=False, log=lambda s: None)
    assert rest["start_epoch"] == 1 and rest["epoch"] == 3
    assert _leaves_equal(rest["params"], full["params"])
    _, _, params, epoch = load_run(tmp_path / "part")
    assert epoch == 3 and _leaves_equal(params, full["params"])
    # the per-epoch records agree too (up to timings)
    timing = ("wall_time", "examples_per_second", "compile_seconds")
    strip = [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "part")
    ]
    ref = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "full")]
    assert strip == ref and [r["epoch"] for r in strip] == [1, 2, 3]
    # a resume with a different model is refused, naming the difference
    with pytest.raises(RunDirError, match="latent_dim: 4 -> 5"):
        train(
            dataclasses.replace(cfg, latent_dim=5), tmp_path / "part", resume=True, progress=False
        )


def test_a_run_announces_its_estimated_length_once(tmp_path, mnist_dir):
    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=2, **SMALL)
    lines: list[str] = []
    train(cfg, tmp_path / "run", progress=False, log=lines.append)
    est = [i for i, ln in enumerate(lines) if ln.startswith("vaeml: estimated total ~")]
    assert len(est) == 1, lines
    # 200 examples / batch 50: the 4 steps of the first epoch are timed; before its summary line
    assert "(first 4 steps: " in lines[est[0]] and "4 steps/epoch, 2 epochs)" in lines[est[0]]
    assert est[0] < next(i for i, ln in enumerate(lines) if ln.startswith("epoch 1/2"))
    lines.clear()
    train(dataclasses.replace(cfg, epochs=3), tmp_path / "run", resume=True, progress=False,
          log=lines.append)  # fmt: skip
    est = [ln for ln in lines if ln.startswith("vaeml: estimated")]
    assert len(est) == 1 and est[0].startswith("vaeml: estimated remaining ~"), lines
    assert "4 steps/epoch, 1 epoch)" in est[0]


# ---- per-epoch diagnostics and their warning (issue 10) ----------------------------------------
def _strict_json_records(run_dir):
    """metrics.jsonl parsed as strict JSON (a NaN or Infinity in it fails here)."""

    def refuse(name):
        raise AssertionError(f"metrics.jsonl holds {name}")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln, parse_constant=refuse) for ln in lines]


def test_health_monitor_throttles_one_line_per_category_change():
    from vaeml_jax.training.records import HealthMonitor

    lines = []
    mon = HealthMonitor(lines.append, repeat_every=10)
    capped = {"capped_fraction": 0.5, "tail_index": float("nan")}
    both = {"capped_fraction": 0.5, "tail_index": 1.2}
    seen = [mon.check(s, e, 7) for e, s in enumerate([capped] * 3 + [both] + [both] * 11, 1)]
    logged = [e for e, line in enumerate(seen, 1) if line is not None]
    assert logged == [1, 4, 14]  # first, category change, 10 epochs later
    assert all(ln.startswith("vaeml: warning: epoch ") and "\n" not in ln for ln in lines)
    assert "(--max-iters 7)" in lines[0] and "tail index 1.20 < 2" in lines[1]
    assert mon.check({"capped_fraction": 0.0}, 15) is None  # healthy epoch resets it
    assert mon.check(both, 16) is not None


def test_warm_start_config_is_checked():
    base = TrainConfig(epochs=5, estimator="unbiased")
    w = dataclasses.replace(base, warm_start_epochs=2, warm_start_lr=3e-3).resolved()
    ws = w.warm_start_config()
    assert (ws.estimator, ws.num_particles, ws.encoder_objective, ws.lr) == (
        "iwae",
        5,
        "iwae",
        3e-3,
    )
    assert (ws.epochs, ws.seed, ws.batch_size, ws.num_slots) == (5, 0, 100, None)
    assert [w.phase(e) for e in range(5)] == ["warm_start"] * 2 + ["main"] * 3
    elbo = dataclasses.replace(w, warm_start_estimator="elbo").warm_start_config()
    assert elbo.encoder_objective == "elbo"
    for change, match in [
        (dict(warm_start_epochs=5), r"warm_start_epochs \(5\) must be smaller than epochs \(5\)"),
        (dict(warm_start_epochs=-1), "warm_start_epochs must be an integer >= 0"),
        (dict(warm_start_estimator="mcmc"), "unknown warm_start_estimator 'mcmc'"),
        (dict(warm_start_num_particles=0), "warm_start_num_particles must be an integer >= 1"),
        (dict(warm_start_lr=0.0), "warm_start_lr must be a positive number"),
    ]:
        with pytest.raises(ConfigError, match=match):
            dataclasses.replace(base, **change).resolved()


def _opt_count(run_dir, epoch):
    """Adam's step count in the checkpoint of ``epoch`` (the optimizer state carried over)."""
    from vaeml_jax.checkpoint import Checkpointer
    from vaeml_jax.training import build_vae, read_config

    cfg = read_config(run_dir).resolved()
    params = jax.eval_shape(lambda k: build_vae(cfg).init(k), jax.random.key(0))
    opt_state = jax.eval_shape(make_optimizer(cfg).init, params)
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ckpt:
        state, _, _ = ckpt.restore({"params": params, "opt_state": opt_state}, epoch)
    return int(state["opt_state"].inner_state[0].count)


def test_warm_start_then_main_resumes_bitwise_from_either_phase(tmp_path, mnist_dir):
    """IWAE-5 for 2 epochs, then the unbiased estimator for 1, from the same params and Adam state;
    a run that died after epoch 1 (warm phase) or 2 (phase boundary) resumes to the same bits.
    The records say which phase and estimator every epoch had, with sane diagnostics."""
    import shutil

    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=3, warm_start_epochs=2, **SMALL)
    lines: list[str] = []
    full = train(cfg, tmp_path / "full", progress=False, log=lines.append)
    assert "after 2 warm-start epochs of iwae (S=5" in lines[0]
    assert any(ln.startswith("vaeml: estimated warm-start phase ~") for ln in lines), lines
    assert any(ln.startswith("vaeml: estimated main phase ~") for ln in lines), lines
    # both phases compiled up front, each announced with its time, before the first epoch
    first_epoch = next(i for i, ln in enumerate(lines) if ln.startswith("epoch 1/3"))
    for step in ("iwae warm-start step (S=5)", "unbiased training step (S=4)"):
        done = [i for i, ln in enumerate(lines) if ln.startswith(f"vaeml: compiling the {step}: ")]
        assert len(done) == 1 and done[0] < first_epoch and " s" in lines[done[0]], lines
    # the main phase is timed after the first warm-start epoch (its 4 steps dropped): the whole
    # run's length is known from then on
    probe = [ln for ln in lines if ln.startswith("vaeml: estimated run left ~")]
    assert len(probe) == 1 and "timed on 4 unbiased steps after epoch 1" in probe[0], lines
    stored = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (stored["warm_start_epochs"], stored["warm_start_estimator"]) == (2, "iwae")
    assert stored["warm_start_num_particles"] == 5 and stored["estimator"] == "unbiased"
    recs = _strict_json_records(tmp_path / "full")
    assert [(r["phase"], r["estimator"]) for r in recs] == [
        ("warm_start", "iwae"),
        ("warm_start", "iwae"),
        ("main", "unbiased"),
    ]
    for r, s in zip(recs, (5, 5, 4), strict=True):
        assert 1.0 <= r["ess_mean"] <= s and 0.0 <= r["log1p_chi2_mean"] <= np.log(s) + 1e-6
        assert r["log_weight_std_mean"] > 0 and r["nonfinite_weight_fraction"] == 0.0
        assert r["tail_index"] is None or r["tail_index"] > 0
    assert recs[0]["tail_index"] is None  # IWAE has no meeting times
    for r in recs[:2]:  # nor any chain statistic: null, never a stand-in 0
        assert r["meeting_time_mean"] is None and r["capped_fraction"] is None
    assert recs[2]["meeting_time_mean"] >= 1 and recs[2]["capped_fraction"] is not None
    assert _opt_count(tmp_path / "full", 3) == 12  # 3 epochs x 4 steps: Adam never restarted
    for died_after in (1, 2):
        part = tmp_path / f"died{died_after}"
        shutil.copytree(tmp_path / "full", part)
        for e in range(died_after + 1, 4):
            shutil.rmtree(part / "checkpoints" / str(e))
        rest = train(cfg, part, resume=True, progress=False, log=lambda s: None)
        assert rest["start_epoch"] == died_after and _leaves_equal(rest["params"], full["params"])
        timing = ("wall_time", "examples_per_second", "compile_seconds")
        strip = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(part)]
        ref = [{k: v for k, v in r.items() if k not in timing} for r in recs]
        assert strip == ref


def test_nan_importance_weights_give_the_warning_then_a_clean_stop(
    tmp_path, mnist_dir, monkeypatch
):
    """A model whose log p(x, z) is NaN for some examples: the epoch's warning line names the
    non-finite weights before TrainingDiverged stops the run (nothing saved, no crash)."""
    from vaeml_jax.training import TrainingDiverged, loop

    real = loop.make_estimator

    def poisoned(config, model):
        def log_joint(params, x, z):
            lj = model.log_joint(params, x, z)
            return jnp.where(x[300] > 0.5, jnp.nan, lj)  # examples with that pixel on

        return real(config, model._replace(log_joint=log_joint))

    monkeypatch.setattr(loop, "make_estimator", poisoned)
    cfg = TrainConfig(data_dir=str(mnist_dir), epochs=1, **{**SMALL, "estimator": "iwae"})
    lines: list[str] = []
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradients at epoch 1"):
        train(cfg, tmp_path / "nan", progress=True, log=lines.append)
    warn = [ln for ln in lines if ln.startswith("vaeml: warning: epoch 1: ")]
    assert len(warn) == 1 and "had no finite importance weight" in warn[0], lines
    assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))  # no epoch saved


def test_the_bar_shows_the_time_left_in_the_whole_run():
    """During the warm start the bar adds the main phase once it is timed; before that it says a
    phase is still to come rather than showing the warm start's time alone."""
    from types import SimpleNamespace

    from vaeml_jax.training.loop import EpochRunner

    job = SimpleNamespace(
        config=SimpleNamespace(batch_size=50, epochs=3, estimator="iwae", num_particles=5),
        steps_per_epoch=4,
        train_step=lambda *a: None,
        mesh=None,
        phase="warm_start",
    )
    later: list[float | None] = [None]
    runner = EpochRunner(
        job, start_epoch=0, end_epoch=2, progress=True, progress_interval=1.0,
        log=lambda s: None, later_seconds=lambda: later[0],
    )  # fmt: skip
    host = {
        "bound": np.full(4, -100.0, np.float32),
        "meeting_time": np.zeros((4, 50, 1), np.int32),
        "ess": np.full((4, 50), 2.0, np.float32),
    }
    post = runner._postfix(host, 2, 2.0, 0)  # 1 s/step, 6 warm-start steps left
    assert post["run left"] == "~6 s + next phase" and "tau" not in post  # no chains here
    later[0] = 600.0
    assert runner._postfix(host, 2, 2.0, 0)["run left"] == "~10 min"


def test_epoch_record_reports_the_cap_of_mlmc_and_sumo_but_not_iwae():
    from vaeml_jax.training.records import epoch_record, format_record

    steps, b = 2, 4
    host = {
        "bound": np.full((steps,), -100.0),
        "finite": np.ones((steps,), bool),
        "num_log_joint_evals": np.full((steps,), 40),
        "meeting_time": np.zeros((steps, b, 1), np.int32),  # no coupled chains
        "num_iters": np.array([[[0], [1], [3], [10]]] * steps),  # MLMC's levels
        "capped": np.array([[[False], [False], [False], [True]]] * steps),
    }
    kw = dict(epoch=1, seconds=1.0, batch_size=b, lr=1e-3, num_devices=1)
    mlmc = epoch_record(host, **kw, estimator="mlmc")
    assert mlmc["capped_fraction"] == 0.25 and mlmc["meeting_time_mean"] is None
    assert "capped 25.00%" in format_record(mlmc, 1)
    assert epoch_record(host, **kw, estimator="sumo")["capped_fraction"] == 0.25
    iwae = dict(host, num_iters=np.zeros_like(host["num_iters"]), capped=~host["capped"] & False)
    assert epoch_record(iwae, **kw, estimator="iwae")["capped_fraction"] is None
