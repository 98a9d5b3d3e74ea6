"""The train step: :class:`TrainState`, the pure ``train_step`` and the jitted epoch runner.

``make_train_step(grad_fn, optimizer)`` gives ``train_step(state, batch, key) -> (state, metrics)``
(a non-finite step leaves the state unchanged and reports ``finite=False``);
:func:`make_epoch_runner` wraps it into one jitted call per step that writes the step's metrics
into row ``i`` of donated on-device buffers, brought to the host once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TrainState",
    "make_train_step",
    "metric_shapes",
    "make_epoch_runner",
    "IMPORTANCE_KEYS",
]


class TrainState(NamedTuple):
    """Everything that changes during training (and is checkpointed)."""

    params: Any
    opt_state: Any


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_train_step(grad_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """A pure ``train_step(state, batch, key) -> (state, metrics)`` (jit it, or shard its batch).

    ``metrics`` holds ``bound`` (mean over the batch of ``info["bound"]``), ``finite`` (the loss
    monitor and every gradient are finite), ``num_log_joint_evals`` and the per-example
    ``meeting_time``, ``num_iters``, ``capped`` (B, C). A non-finite step leaves the state unchanged
    (and is reported through ``finite``); the training loop then stops without saving.
    """

    def train_step(state: TrainState, batch, key):
        grads, info = grad_fn(state.params, batch, key)
        bound = jnp.mean(info["bound"])
        finite = _all_finite(grads) & jnp.isfinite(bound)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(params, opt_state)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {
            "bound": bound.astype(jnp.float32),
            "finite": finite,
            "num_log_joint_evals": jnp.asarray(info["num_log_joint_evals"], jnp.int32),
            "meeting_time": jnp.asarray(info["meeting_time"], jnp.int32),
            "num_iters": jnp.asarray(info["num_iters"], jnp.int32),
            "capped": jnp.asarray(info["capped"], bool),
            **_importance_metrics(info, batch.shape[0]),
        }
        return new, metrics

    return train_step


IMPORTANCE_KEYS = ("ess", "log1p_chi2", "log_weight_std")


def _importance_metrics(info: dict, batch_size: int) -> dict:
    """The per-example importance diagnostics of ``info`` as (B,) float32 (NaN where absent), so
    every estimator fills the same small buffers."""
    nan = jnp.full((batch_size,), jnp.nan, jnp.float32)
    return {
        k: jnp.asarray(info.get(k, nan), jnp.float32).reshape(batch_size) for k in IMPORTANCE_KEYS
    }


def metric_shapes(grad_fn, train_step, state, batch, key) -> dict:
    """Shapes of train_step's metrics; known in advance for the built-in estimators (saves a
    trace of the whole step), else found with jax.eval_shape."""
    num_chains = getattr(grad_fn, "num_chains", None)
    if not isinstance(num_chains, int):
        return jax.eval_shape(train_step, state, batch, key)[1]
    lanes = jax.ShapeDtypeStruct((batch.shape[0], num_chains), jnp.int32)
    return {
        "bound": jax.ShapeDtypeStruct((), jnp.float32),
        "finite": jax.ShapeDtypeStruct((), bool),
        "num_log_joint_evals": jax.ShapeDtypeStruct((), jnp.int32),
        "meeting_time": lanes,
        "num_iters": lanes,
        "capped": jax.ShapeDtypeStruct(lanes.shape, bool),
        **{k: jax.ShapeDtypeStruct((batch.shape[0],), jnp.float32) for k in IMPORTANCE_KEYS},
    }


def make_epoch_runner(
    train_step: Callable, mesh: jax.sharding.Mesh | None = None
) -> jax.stages.Wrapped:
    """Jitted ``(state, buffers, batches, i, steps_key) -> (state, buffers)``: step i of an epoch.

    The step's key is ``fold_in(steps_key, i)``; its metrics are written at row i of the on-device
    ``buffers`` (donated, so no copy per step). With a ``mesh``, the state and the buffers come
    out replicated on every device of it: each process reads the whole epoch's metrics from its
    own devices, without a collective (place the first buffers with
    :func:`vaeml_jax.distributed.replicate`).
    """

    def run(state, buffers, batches, i, steps_key):
        batch = jax.lax.dynamic_index_in_dim(batches, i, keepdims=False)
        state, metrics = train_step(state, batch, jax.random.fold_in(steps_key, i))
        buffers = jax.tree.map(lambda buf, v: buf.at[i].set(v), buffers, metrics)
        return state, buffers

    if mesh is None:
        return jax.jit(run, donate_argnums=(1,))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(run, donate_argnums=(1,), out_shardings=(replicated, replicated))
