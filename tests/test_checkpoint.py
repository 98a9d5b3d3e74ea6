"""Checkpointer: round trip of an Optax state, retention, atomicity leftovers, fallbacks, errors."""

import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vaeml_jax.checkpoint import TRASH, Checkpointer, CheckpointError


def _state(seed=0, width=5):
    params = {
        "encoder": {"w": jax.random.normal(jax.random.key(seed), (3, width))},
        "decoder": {"b": jnp.arange(width, dtype=jnp.float32) + seed},
    }
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)
    # take one step so the moments and count are non-trivial
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state}


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_structure_and_values(tmp_path):
    state = _state(1)
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        ck.save(3, state, {"epoch": 3, "config": {"lr": 1e-3}})
        assert ck.epochs() == [3]
    with Checkpointer(tmp_path / "ck", read_only=True) as ck:
        restored, meta, epoch = ck.restore(_state(0))
        assert epoch == 3 and meta["epoch"] == 3 and meta["config"] == {"lr": 1e-3}
        assert ck.read_meta()["epoch"] == 3
    _assert_tree_equal(restored, state)
    # the optimizer's NamedTuples come back as such (the template gives the structure)
    assert type(restored["opt_state"][0]).__name__ == "ScaleByAdamState"


def test_keeps_only_the_last_few_and_leaves_no_trash(tmp_path):
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        for e in range(1, 6):
            ck.save(e, _state(e), {"epoch": e})
        assert ck.epochs() == [4, 5]
        _, meta, epoch = ck.restore(_state(0))
        assert (epoch, meta["epoch"]) == (5, 5)
    assert not (tmp_path / "ck" / TRASH).exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["4", "5"]


def test_leftovers_of_a_killed_save_are_ignored_and_removed(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d) as ck:
        ck.save(1, _state(1), {"epoch": 1})
    # what a SIGKILL during a save or a deletion leaves behind
    (d / "2.orbax-checkpoint-tmp-123456" / "state").mkdir(parents=True)
    (d / TRASH / "0" / "state").mkdir(parents=True)
    # a reader must not touch them (a trainer may be writing right now) ...
    with Checkpointer(d, read_only=True) as ck:
        assert ck.epochs() == [1]
    assert (d / "2.orbax-checkpoint-tmp-123456").exists()
    # ... the next writer cleans them up
    with Checkpointer(d) as ck:
        assert ck.latest_epoch() == 1
        _, _, epoch = ck.restore(_state(0))
        assert epoch == 1
    assert sorted(p.name for p in d.iterdir()) == ["1"]


def test_unreadable_latest_falls_back_to_previous_with_a_warning(tmp_path):
    d = tmp_path / "ck"
    with Checkpointer(d, keep=3) as ck:
        ck.save(1, _state(1), {"epoch": 1})
        ck.save(2, _state(2), {"epoch": 2})
    shutil.rmtree(d / "2" / "state")  # damaged by hand (not something our writer can produce)
    with Checkpointer(d, read_only=True) as ck:
        with pytest.warns(UserWarning, match="checkpoint 2 could not be read"):
            restored, _, epoch = ck.restore(_state(0))
    assert epoch == 1
    _assert_tree_equal(restored, _state(1))


# Orbax's restore of a mismatched shape fails inside an asyncio callback that fires after its
# event loop closed; the error itself reaches us (and is asserted on), the echo is noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        Checkpointer(tmp_path / "missing", read_only=True)
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(CheckpointError, match="no checkpoint found"):
            ck.restore(_state(0))
        ck.save(1, _state(1, width=5), {"epoch": 1})
        with pytest.raises(CheckpointError, match="no checkpoint for epoch 7"):
            ck.restore(_state(0), epoch=7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CheckpointError, match="cannot be restored into this model"):
                ck.restore(_state(0, width=6))  # a different model size
    with Checkpointer(tmp_path / "empty", read_only=True) as ck:
        with pytest.raises(CheckpointError, match="read-only"):
            ck.save(2, _state(2), {"epoch": 2})
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "x", keep=0)
