"""End-to-end tests of the ``vaeml`` command line on small slices of the real MNIST files.

Small models (one hidden layer of 32, 4 latents, S = 4) on the first 200 training images, batch 50:
every training run here has the same shapes, so XLA compiles the train step once per session
(the persistent compilation cache is shared with the subprocesses of the kill-and-resume test).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from vaeml_jax import cli
from vaeml_jax.checkpoint import Checkpointer
from vaeml_jax.training import load_run, read_metrics

SMALL = [
    "--hidden", "32",
    "--latent-dim", "4",
    "--num-particles", "4",
    "--batch-size", "50",
    "--max-train-examples", "200",
    "--no-progress",
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Persistent XLA cache for this session, in-process and for subprocesses."""
    d = tmp_path_factory.getbasetemp() / "jaxc"
    old = {
        k: getattr(jax.config, k)
        for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    }
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield d
    for k, v in old.items():
        jax.config.update(k, v)


def run_cli(capsys, *argv):
    """``cli.main(argv)`` in-process: (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_clean_error(rc, err, *needles, alone=True):
    """Non-zero exit, no traceback, one ``vaeml: error:`` message (the whole of stderr unless
    ``alone=False``, e.g. after the progress lines of epochs that went well)."""
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vaeml: error:")]
    assert len(lines) == 1, err
    if alone:
        assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_dir, cache_dir):
    """One small unbiased-estimator run of 2 epochs with in-training evaluation."""
    out = tmp_path_factory.mktemp("runs") / "run"
    rc = cli.main(
        ["train", *SMALL, "--data-dir", str(mnist_dir), "--epochs", "2", "--eval-every", "1",
         "--eval-num-samples", "8", "--eval-max-examples", "50", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    return out


# ---- the happy path ----------------------------------------------------------------------------
def test_train_writes_config_metrics_meeting_times_and_checkpoints(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["estimator"] == "unbiased" and cfg["hidden"] == [32] and cfg["epochs"] == 2
    recs = read_metrics(trained)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        for key in (
            "objective", "meeting_time_mean", "meeting_time_max", "num_iters_mean",
            "num_iters_max", "capped_fraction", "num_log_joint_evals", "wall_time",
            "examples_per_second", "lr", "num_devices", "test_log_likelihood", "phase",
            "estimator", "ess_mean", "log1p_chi2_mean", "log_weight_std_mean",
            "nonfinite_weight_fraction", "tail_index",
        ):  # fmt: skip
            assert key in r, key
        assert r["nonfinite_weight_fraction"] == 0.0
        assert r["tail_index"] is None or r["tail_index"] > 0
        assert r["num_devices"] == 1 and r["examples"] == 200
        assert np.isfinite(r["objective"]) and r["objective"] < 0
        # the LL estimate sits above the train bound's ballpark: both are finite nats
        assert np.isfinite(r["test_log_likelihood"]) and r["test_log_likelihood"] < 0
    # the defaults' measured recipe: IWAE-5 warm start for 4/5 of the epochs, then unbiased at 3e-5
    warm, main = recs
    assert (warm["phase"], warm["estimator"], warm["lr"]) == ("warm_start", "iwae", 1e-3)
    assert (main["phase"], main["estimator"], main["lr"]) == ("main", "unbiased", 3e-5)
    assert 1.0 <= warm["ess_mean"] <= 5 and 1.0 <= main["ess_mean"] <= 4
    # no coupled chains in the warm start: its chain statistics are undefined (null), not 0
    for key in ("meeting_time_mean", "meeting_time_max", "num_iters_mean", "capped_fraction"):
        assert warm[key] is None and main[key] is not None, key
    assert main["meeting_time_mean"] >= 1
    assert main["meeting_time_max"] >= main["meeting_time_mean"]
    assert (cfg["warm_start_epochs"], cfg["warm_start_lr"], cfg["lr"]) == (1, 1e-3, 3e-5)
    env = cfg["environment"]  # what it ran on: not an option, ignored when the config is read
    assert env["vaeml_jax"] and env["jax"] == jax.__version__ and env["device_kind"]
    assert all(env[k] for k in ("jaxlib", "flax", "optax"))
    tau = np.load(trained / "meeting_times.npy")
    assert tau.shape == (200, 1) and tau.min() >= 1  # tau >= 1 by definition
    assert tau.mean() == pytest.approx(recs[-1]["meeting_time_mean"])
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["1", "2"]
    config, _, params, epoch = load_run(trained)
    assert epoch == 2 and config.latent_dim == 4
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_evaluate_writes_eval_json_and_prints_a_table(trained, capsys):
    rc, out, err = run_cli(
        capsys, "evaluate", trained, "--num-samples", 40, "--chunk-size", 20,
        "--max-test-examples", 60,
    )  # fmt: skip
    assert rc == 0, err
    ev = json.loads((trained / "eval.json").read_text())
    assert ev["num_samples"] == 40 and ev["num_examples"] == 60 and ev["method"] == "is"
    assert (
        ev["checkpoint_epoch"] == 2 and ev["dataset"] == "mnist" and ev["estimator"] == "unbiased"
    )
    assert np.isfinite(ev["test_log_likelihood"]) and ev["test_log_likelihood_stderr"] > 0
    assert ev["seconds"] > 0
    # the IS estimate of log p(x) is a stochastic lower bound, the ELBO a looser one on average
    assert ev["test_log_likelihood"] >= ev["test_elbo"] - 3 * ev["test_elbo_stderr"]
    assert "test log-likelihood" in out and f"{ev['test_log_likelihood']:.3f}" in out
    assert ev["environment"]["jax"] == jax.__version__ and ev["environment"]["device_kind"]
    # a start line says what it computes before the (possibly long) work begins
    assert "importance sampling with K = 40 samples per image on 60 test images of mnist" in err


def test_evaluate_ais_takes_its_settings_from_the_flags(trained, tmp_path, capsys):
    out_file = tmp_path / "ais.json"
    rc, out, err = run_cli(
        capsys, "evaluate", trained, "--method", "ais", "--ais-steps", 6, "--ais-chains", 3,
        "--ais-leapfrog", 2, "--ais-step-size", 0.1, "--ais-schedule", "linear",
        "--ais-adapt-chains", 0, "--max-test-examples", 8, "--output", out_file,
    )  # fmt: skip
    assert rc == 0, err
    ev = json.loads(out_file.read_text())
    assert ev["method"] == "ais" and ev["num_samples"] == 3 and ev["num_examples"] == 8
    assert ev["ais"]["num_steps"] == 6 and ev["ais"]["leapfrog_steps"] == 2
    assert ev["ais"]["step_size"] == 0.1 and ev["ais"]["schedule"] == "linear"
    assert ev["ais"]["adapt_chains"] == 0
    assert np.isfinite(ev["test_log_likelihood"]) and "num_steps = 6" in out


def test_evaluate_refuses_ais_flags_without_method_ais(trained, capsys):
    rc, _, err = run_cli(capsys, "evaluate", trained, "--ais-steps", 10, "--ais-chains", 2)
    assert_one_clean_error(rc, err, "--ais-steps, --ais-chains only apply to --method ais")
    rc, _, err = run_cli(capsys, "evaluate", trained, "--method", "ais", "--ais-schedule", "cubic")
    assert rc == 2 and "invalid choice: 'cubic'" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "evaluate", trained, "--method", "ais", "--ais-step-size", -1)
    assert_one_clean_error(rc, err, "--ais-step-size must be > 0")


def test_plot_writes_four_pngs(trained, capsys):
    rc, out, err = run_cli(capsys, "plot", trained)
    assert rc == 0, err
    names = ["curves.png", "meeting_times.png", "samples.png", "reconstructions.png"]
    for n in names:
        data = (trained / "plots" / n).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, n
    assert len(out.strip().splitlines()) == 4


def test_config_file_is_overridden_by_flags(tmp_path, mnist_dir):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "lr": 5e-4, "latent-dim": 3, "estimator": "iwae"}))
    args = cli.build_parser().parse_args(
        ["train", "--config", str(f), "--lr", "2e-3", "--out", str(tmp_path / "o")]
    )
    cfg, out, recipe = cli._resolve_train_config(args)
    assert (cfg.epochs, cfg.lr, cfg.latent_dim, cfg.estimator) == (7, 2e-3, 3, "iwae")
    assert cfg.hidden == (200, 200)  # untouched default
    assert out == tmp_path / "o" and not recipe


def _resolve(*argv):
    return cli._resolve_train_config(cli.build_parser().parse_args(["train", *map(str, argv)]))


def test_plain_train_uses_the_measured_warm_start_recipe_unless_told_otherwise(tmp_path):
    cfg, _, recipe = _resolve()  # the main job
    assert recipe and cfg.estimator == "unbiased" and cfg.epochs == 100
    warm = (cfg.warm_start_epochs, cfg.warm_start_estimator, cfg.warm_start_num_particles)
    assert warm == (80, "iwae", 5)
    assert (cfg.warm_start_lr, cfg.lr) == (1e-3, 3e-5)
    assert _resolve("--epochs", 10)[0].warm_start_epochs == 8
    # any recipe field given by the user turns it off: the flags mean what they say
    for flags in (
        ["--warm-start-epochs", 0],
        ["--lr", 1e-4],
        ["--warm-start-lr", 1e-3],
        ["--schedule", "constant"],
    ):
        cfg, _, recipe = _resolve(*flags)
        assert (
            not recipe
            and cfg.warm_start_epochs == 0
            and cfg.lr == (1e-4 if flags[0] == "--lr" else 1e-3)
        ), flags
    cfg, _, recipe = _resolve("--warm-start-epochs", 3, "--epochs", 5)
    assert not recipe and (cfg.warm_start_epochs, cfg.lr, cfg.warm_start_lr) == (3, 1e-3, None)
    f = tmp_path / "c.json"  # in a config file too
    f.write_text(json.dumps({"warm-start-epochs": 0}))
    assert not _resolve("--config", f)[2]
    for other in ("iwae", "elbo", "mcmc", "sumo"):  # the recipe is the unbiased estimators'
        cfg, _, recipe = _resolve("--estimator", other)
        assert not recipe and cfg.warm_start_epochs == 0 and cfg.lr == 1e-3
    cfg, _, recipe = _resolve("--estimator", "mlmc")  # measured to need it as the chains do
    assert recipe and (cfg.warm_start_epochs, cfg.warm_start_lr, cfg.lr) == (80, 1e-3, 3e-5)
    assert not _resolve("--epochs", 1)[2]  # no room for a warm start


def test_resume_of_a_finished_run_does_nothing_and_more_epochs_continue(trained, capsys):
    before = load_run(trained)[2]
    rc, out, err = run_cli(capsys, "train", "--out", trained, "--resume", "--no-progress")
    assert rc == 0 and "nothing to do" in err
    assert leaves_equal(load_run(trained)[2], before)


# ---- bad input: one message, non-zero exit, nothing damaged ------------------------------------
@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--dataset", "cifar99"], ["invalid choice: 'cifar99'", "fashion_mnist"]),
        (["--estimator", "vimco"], ["invalid choice: 'vimco'", "unbiased"]),
        (["--k", "3", "--m", "1"], ["k must be <= m"]),
        (["--hidden", "32,x"], ["hidden must be layer widths"]),
        (["--binarization", "none"], ["Bernoulli decoder needs binary pixels"]),
        (["--binarization", "sometimes"], ["invalid choice: 'sometimes'"]),
        (["--epochs", "two"], ["--epochs: expected an integer"]),
        (["--epochs", "3", "--warm-start-epochs", "3"], ["warm_start_epochs (3) must be smaller"]),
        (["--warm-start-epochs", "-2"], ["warm_start_epochs must be an integer >= 0, got -2"]),
        (["--warm-start-estimator", "mcmc"], ["invalid choice: 'mcmc'", "iwae"]),
    ],
)
def test_bad_options_fail_cleanly_and_write_nothing(tmp_path, mnist_dir, capsys, flags, needles):
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "train", *SMALL, "--data-dir", mnist_dir, *flags, "--out", out)
    if "invalid choice" in needles[0] or "two" in flags:  # argparse: exit status 2, no traceback
        assert rc == 2 and "Traceback" not in err and all(n in err for n in needles)
    else:
        assert_one_clean_error(rc, err, *needles)
    assert not out.exists()


def test_capped_lanes_give_one_warning_line_and_the_run_goes_on(tmp_path, mnist_dir, capsys):
    """--max-iters 1: most lanes of a fresh model are still apart after one coupled iteration."""
    out = tmp_path / "capped"
    rc, _, err = run_cli(
        capsys, "train", *SMALL, "--data-dir", mnist_dir, "--epochs", "1", "--max-iters", "1",
        "--out", out,
    )  # fmt: skip
    assert rc == 0 and "Traceback" not in err
    warn = [ln for ln in err.splitlines() if ln.startswith("vaeml: warning: epoch 1: ")]
    assert len(warn) == 1 and "hit the iteration cap (--max-iters 1)" in warn[0], err
    assert read_metrics(out)[0]["capped_fraction"] > 0


def test_warm_start_flags_reach_config_and_records(tmp_path, mnist_dir, capsys):
    out = tmp_path / "warm"
    rc, _, err = run_cli(
        capsys, "train", *SMALL, "--data-dir", mnist_dir, "--epochs", "2",
        "--warm-start-epochs", "1", "--warm-start-estimator", "elbo",
        "--warm-start-num-particles", "3", "--warm-start-lr", "2e-3", "--out", out,
    )  # fmt: skip
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["warm_start_epochs"], cfg["warm_start_estimator"]) == (1, "elbo")
    assert (cfg["warm_start_num_particles"], cfg["warm_start_lr"]) == (3, 2e-3)
    recs = read_metrics(out)
    assert [(r["phase"], r["estimator"], r["lr"]) for r in recs] == [
        ("warm_start", "elbo", 2e-3),
        ("main", "unbiased", 1e-3),
    ]
    assert "after 1 warm-start epoch of elbo (S=3, lr 0.002)" in err


def test_missing_and_corrupt_data_files_fail_cleanly(tmp_path, mnist_dir, capsys):
    rc, _, err = run_cli(
        capsys, "train", *SMALL, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "a"
    )
    assert_one_clean_error(rc, err, "nowhere")
    bad = tmp_path / "bad"
    shutil.copytree(mnist_dir / "mnist", bad / "mnist")
    raw = (mnist_dir / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    (bad / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 3])  # truncated
    rc, _, err = run_cli(capsys, "train", *SMALL, "--data-dir", bad, "--out", tmp_path / "b")
    assert_one_clean_error(rc, err, "train-images-idx3-ubyte")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_config_file_fails_cleanly(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text("{not json")
    rc, _, err = run_cli(capsys, "train", "--config", f, "--out", tmp_path / "o")
    assert_one_clean_error(rc, err, "not valid JSON")
    f.write_text(json.dumps({"learning_rate": 1}))
    rc, _, err = run_cli(capsys, "train", "--config", f, "--out", tmp_path / "o")
    assert_one_clean_error(rc, err, "unknown config key", "learning_rate")


def test_output_dir_with_another_run_is_refused(trained, capsys, mnist_dir):
    before = sorted(p.name for p in (trained / "checkpoints").iterdir())
    rc, _, err = run_cli(
        capsys, "train", *SMALL, "--data-dir", mnist_dir, "--epochs", "2", "--seed", "5",
        "--out", trained,
    )  # fmt: skip
    assert_one_clean_error(rc, err, "different config", "seed: 0 -> 5", "--resume", "another --out")
    rc, _, err = run_cli(capsys, "train", "--out", trained, "--resume", "--latent-dim", 9)
    assert_one_clean_error(rc, err, "latent_dim: 4 -> 9")
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before
    assert load_run(trained)[3] == 2


def test_evaluate_and_plot_refuse_a_directory_without_a_run(tmp_path, capsys):
    for cmd in ("evaluate", "plot"):
        rc, _, err = run_cli(capsys, cmd, tmp_path)
        assert_one_clean_error(rc, err, "holds no vaeml run")
    rc, _, err = run_cli(capsys, "evaluate", tmp_path, "--method", "exact")
    assert rc == 2 and "invalid choice: 'exact'" in err and "Traceback" not in err


def test_divergence_stops_without_saving_and_the_last_checkpoint_stays_good(
    tmp_path, mnist_dir, capsys, cache_dir
):
    out = tmp_path / "nan"
    common = [*SMALL, "--data-dir", mnist_dir, "--estimator", "iwae", "--out", out]
    rc, _, err = run_cli(capsys, "train", *common, "--epochs", 1)
    assert rc == 0, err
    good = load_run(out)[2]
    # an absurd learning rate overflows the parameters: non-finite loss within a few steps
    rc, _, err = run_cli(capsys, "train", *common, "--epochs", 2, "--lr", "1e38", "--resume")
    assert_one_clean_error(
        rc, err, "non-finite", "epoch 2", "last good checkpoint (epoch 1)", alone=False
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    _, _, params, epoch = load_run(out)
    assert epoch == 1 and leaves_equal(params, good)
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    # ... and it resumes from there with a sane learning rate
    rc, _, err = run_cli(capsys, "train", *common, "--epochs", 2, "--lr", "1e-3", "--resume")
    assert rc == 0, err
    assert load_run(out)[3] == 2


# ---- SIGKILL at any moment, then --resume: same parameters as an uninterrupted run -------------
def _spawn(argv, cache):
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "vaeml_jax.cli", "train", *map(str, argv)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc, condition, timeout=120.0) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; False if it finished first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    proc.kill()
    proc.wait()
    raise AssertionError("the training subprocess made no progress")


def _finished(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _saving(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any("tmp" in p.name for p in ckpt_dir.iterdir())


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(
    tmp_path, mnist_dir, capsys, cache_dir
):
    epochs = 8
    argv = [*SMALL, "--data-dir", mnist_dir, "--epochs", epochs, "--checkpoint-every", 1]
    rc, _, err = run_cli(capsys, "train", *argv, "--out", tmp_path / "ref")
    assert rc == 0, err
    ref = load_run(tmp_path / "ref")[2]

    out = tmp_path / "killed"
    ck = out / "checkpoints"
    moments = [("before the first checkpoint", lambda: (out / "config.json").exists())] + [
        ("during a checkpoint save, two done", lambda: len(_finished(ck)) >= 2 and _saving(ck))
    ] * 3
    killed_during_save = False
    for name, cond in moments:
        if name.startswith("during") and killed_during_save:
            break
        proc = _spawn([*argv, "--out", out, "--resume"], cache_dir)
        killed = _kill_when(proc, cond)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert killed or proc.returncode == 0, f"{name}: {err}"
        # counted only if the save's temporary directory is still there: killed mid-save
        killed_during_save |= killed and name.startswith("during") and _saving(ck)
        # whatever the moment, every finished checkpoint reads back, the latest is restorable
        if _finished(ck):
            with Checkpointer(ck, read_only=True) as c:
                assert all(c.read_meta(e)["epoch"] == e for e in c.epochs())
            assert load_run(out)[3] == max(_finished(ck))
    # A save lasts tens of milliseconds and is polled every half millisecond (three tries).
    assert killed_during_save, "no SIGKILL landed during a checkpoint save"
    rc, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--no-progress")
    assert rc == 0, err
    assert leaves_equal(load_run(out)[2], ref)
    assert [r["epoch"] for r in read_metrics(out)] == list(range(1, epochs + 1))
    assert not _saving(ck)  # the torn save was cleaned up


def test_help_groups_the_flags_per_estimator_and_lists_the_choices(capsys):
    rc, out, _ = run_cli(capsys, "train", "--help")
    assert rc == 0
    for group in (
        "unbiased estimator (--estimator unbiased):",
        "mcmc estimator (--estimator mcmc):",
        "sumo estimator (--estimator sumo):",
        "warm start:",
    ):
        assert group in out, group
    assert "--estimator {elbo,iwae,mcmc,unbiased" in out and "--dataset {mnist," in out
    assert "issue" not in out.lower() and "if installed" not in out
    # the unbiased-only flags sit in their group, not among every estimator's
    general = out.split("estimator (every estimator):")[1].split("unbiased estimator")[0]
    assert "--k " not in general and "--num-slots" not in general
    args = cli.build_parser().parse_args(["train", "--dataset", "fashion-mnist"])
    assert args.dataset == "fashion_mnist"  # both spellings
    rc, out, _ = run_cli(capsys, "evaluate", "--help")
    assert rc == 0 and "--method {is,ais}" in out


def test_compilation_cache_goes_to_the_users_cache_folder(tmp_path, monkeypatch):
    """Unless JAX was given a cache folder already, vaeml keeps compiled programs in
    $VAEML_COMPILATION_CACHE, else $XDG_CACHE_HOME/vaeml-jax/xla; `off` turns it off."""
    old = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.delenv("VAEML_COMPILATION_CACHE", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        jax.config.update("jax_compilation_cache_dir", None)
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "vaeml-jax" / "xla")
        cli.use_compilation_cache()  # a folder already chosen is left alone
        monkeypatch.setenv("VAEML_COMPILATION_CACHE", str(tmp_path / "mine"))
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "vaeml-jax" / "xla")
        jax.config.update("jax_compilation_cache_dir", None)
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("VAEML_COMPILATION_CACHE", "off")
        cli.use_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", old)
