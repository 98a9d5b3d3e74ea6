"""The model interface every estimator takes: three pure functions over a params pytree.

A :class:`LatentVariableModel` describes one example ``x`` and one latent ``z`` at a time; the
estimators vmap it over particles, chains and the batch. Nothing here depends on Flax: any model
written as plain functions of a params pytree plugs in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LatentVariableModel",
    "log_weights",
    "sample_and_log_proposal",
    "proposal_sampler",
    "check_model",
    "check_batch",
]

Array = jax.Array
Params = Any


class LatentVariableModel(NamedTuple):
    """A latent-variable model p_theta(x, z) with a reparameterised proposal q_phi(z | x).

    Attributes:
      log_joint: ``(params, x, z) -> scalar``, log p_theta(x, z) for ONE example ``x`` and ONE
        latent ``z`` of shape ``latent_shape``.
      sample_proposal: ``(params, x, key, num) -> (num, *latent_shape)``: ``num`` draws
        z ~ q_phi(z | x), reparameterised (differentiable in ``params``). ``num`` is a Python int.
      log_proposal: ``(params, x, z) -> scalar``, log q_phi(z | x).
      sample_with_log_proposal: optional ``(params, x, key, num) -> (z, log_q)`` with z
        ``(num, *latent_shape)`` and log_q ``(num,)``: the draws ``sample_proposal`` makes with the
        same key and their log q_phi(z | x), from the same forward pass (e.g. log q of a Gaussian
        from its noise: -sum(eps^2) / 2 - sum log sigma - d log(2 pi) / 2). Both outputs must have
        the values AND the parameter derivatives of ``sample_proposal`` followed by
        ``log_proposal``. When given, the reparameterised encoder objectives (and the fused ELBO
        and IWAE gradients) use it: one encoder pass instead of two (measured 0.85x the IWAE-5
        gradient's time, benchmarks/RESULTS.md), and no flow inversion for an IAF. None
        (default): the two functions are used.
      proposal_features: optional ``(params, x) -> features``, any pytree of arrays: the part of
        q_phi(z | x) that depends on x alone (for a Gaussian encoder its mean and log scale), so
        that a caller drawing many times for the same x runs the encoder once. Given together with
        ``sample_from_features``, or not at all.
      sample_from_features: optional ``(params, features, key, num) -> (z, log_q)``, shapes as
        ``sample_with_log_proposal``; with ``features = proposal_features(params, x)`` it must
        return the values (and parameter derivatives) ``sample_with_log_proposal(params, x, key,
        num)`` would. The work-queue loop of the unbiased estimator (``num_slots``) uses the pair
        to draw its fresh proposals without re-running the encoder on each slot's example every
        iteration (the plain loop gets that for free: its x is loop-invariant and XLA hoists it).

    Both theta (the parameters ``log_joint`` reads) and phi (those the proposal reads) live in the
    one ``params`` pytree; the estimators tell them apart only by which function uses them.
    """

    log_joint: Callable[[Params, Array, Array], Array]
    sample_proposal: Callable[[Params, Array, Array, int], Array]
    log_proposal: Callable[[Params, Array, Array], Array]
    sample_with_log_proposal: Callable[[Params, Array, Array, int], tuple[Array, Array]] | None = (
        None
    )
    proposal_features: Callable[[Params, Array], Any] | None = None
    sample_from_features: Callable[[Params, Any, Array, int], tuple[Array, Array]] | None = None


def log_weights(
    model: LatentVariableModel, params: Params, x: Array, particles: Array
) -> tuple[Array, Array, Array]:
    """Log joint, log proposal and log importance weights of ``particles`` ``(S, *latent)``, one x.

    Returns:
      ``(log_joint, log_proposal, log_weight)``, each of shape (S,). A particle whose joint density
      is zero gets log weight -inf and is never resampled; NaN log weights are mapped to -inf so one
      bad particle cannot poison the normaliser.
    """
    lj = jax.vmap(model.log_joint, in_axes=(None, None, 0))(params, x, particles)
    lq = jax.vmap(model.log_proposal, in_axes=(None, None, 0))(params, x, particles)
    lw = lj - lq
    lw = jnp.where(jnp.isnan(lw), -jnp.inf, lw)
    return lj, lq, lw


def sample_and_log_proposal(
    model: LatentVariableModel, params: Params, x: Array, key: Array, num: int
) -> tuple[Array, Array]:
    """``num`` draws z ~ q(.|x) for one example and their log q: ``((num, *latent), (num,))``.

    One pass with ``model.sample_with_log_proposal`` when the model has it; else
    ``sample_proposal`` then ``log_proposal`` at the draws (same values and derivatives).
    """
    if model.sample_with_log_proposal is not None:
        return model.sample_with_log_proposal(params, x, key, num)
    z = model.sample_proposal(params, x, key, num)
    return z, jax.vmap(model.log_proposal, in_axes=(None, None, 0))(params, x, z)


def proposal_sampler(
    model: LatentVariableModel,
) -> tuple[
    Callable[[Params, Array], Any], Callable[[Params, Any, Array, int], tuple[Array, Array]]
]:
    """``(features_fn, sample_fn)`` with ``sample_fn(params, features_fn(params, x), key, num)``
    the draws and log q of :func:`sample_and_log_proposal`.

    The model's ``proposal_features`` / ``sample_from_features`` pair when it has one; else the
    features are x itself and ``sample_fn`` is :func:`sample_and_log_proposal`.
    """
    if model.proposal_features is not None and model.sample_from_features is not None:
        return model.proposal_features, model.sample_from_features

    def sample_fn(params, x, key, num):
        return sample_and_log_proposal(model, params, x, key, num)

    return (lambda params, x: x), sample_fn


OPTIONAL_FIELDS = ("sample_with_log_proposal", "proposal_features", "sample_from_features")


def check_model(model: Any) -> LatentVariableModel:
    """Validate that ``model`` is a LatentVariableModel of callables (at construction time)."""
    if not isinstance(model, LatentVariableModel):
        raise TypeError(
            "model must be a vaeml_jax.LatentVariableModel(log_joint=..., sample_proposal=..., "
            f"log_proposal=...), got {type(model).__name__}."
        )
    for name in LatentVariableModel._fields:
        if name in OPTIONAL_FIELDS and getattr(model, name) is None:
            continue
        if not callable(getattr(model, name)):
            raise TypeError(
                f"LatentVariableModel.{name} must be callable, got {getattr(model, name)!r}."
            )
    if (model.proposal_features is None) != (model.sample_from_features is None):
        given = "sample_from_features" if model.proposal_features is None else "proposal_features"
        raise TypeError(
            f"LatentVariableModel.{given} was given without its partner: proposal_features and "
            "sample_from_features go together (or leave both None)."
        )
    return model


def check_batch(model: LatentVariableModel, params: Params, x: Any) -> tuple:
    """Trace-time checks of one call: batch axis, finiteness (when x is concrete), function shapes.

    Returns ``(latent_shape, latent_dtype)``. Raises ValueError / TypeError that name the problem.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array with a leading batch axis, got {type(x).__name__}.")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a leading batch axis of size >= 1, got shape {x.shape}.")
    if not isinstance(x, jax.core.Tracer):
        xn = np.asarray(x)
        if np.issubdtype(xn.dtype, np.floating) and not np.all(np.isfinite(xn)):
            bad = int(np.sum(~np.isfinite(xn)))
            raise ValueError(
                f"x contains {bad} non-finite values (NaN or inf); clean the data first."
            )
    x0 = jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    k0 = jax.eval_shape(lambda: jax.random.key(0))
    try:
        z = jax.eval_shape(lambda p, xx, kk: model.sample_proposal(p, xx, kk, 2), params, x0, k0)
    except Exception as e:  # re-raised with the function named, the cause chained
        hint = (
            f" (x must be a batch of shape (B, *example_shape); if x of shape {x.shape} is ONE "
            "example, add the batch axis: x[None])"
            if x.ndim == 1
            else ""
        )
        raise ValueError(
            f"model.sample_proposal(params, x[0], key, 2) failed on x[0] of shape "
            f"{x.shape[1:]}{hint}: {e}"
        ) from e
    if not hasattr(z, "shape") or z.ndim < 1 or z.shape[0] != 2:
        raise ValueError(
            "model.sample_proposal(params, x, key, num) must return an array of shape "
            f"(num, *latent_shape); with num=2 it returned {getattr(z, 'shape', z)}."
        )
    if model.sample_with_log_proposal is not None:
        _check_draws_with_log_q(
            "sample_with_log_proposal(params, x, key, num)",
            lambda p, xx, kk: model.sample_with_log_proposal(p, xx, kk, 2),
            (params, x0, k0),
            z.shape,
            x.shape[1:],
        )
    features_fn, from_features = model.proposal_features, model.sample_from_features
    if features_fn is not None and from_features is not None:
        _check_draws_with_log_q(
            "sample_from_features(params, proposal_features(params, x), key, num)",
            lambda p, xx, kk: from_features(p, features_fn(p, xx), kk, 2),
            (params, x0, k0),
            z.shape,
            x.shape[1:],
        )
    z1 = jax.ShapeDtypeStruct(z.shape[1:], z.dtype)
    for name in ("log_joint", "log_proposal"):
        fn = getattr(model, name)
        try:
            out = jax.eval_shape(fn, params, x0, z1)
        except Exception as e:
            raise ValueError(
                f"model.{name}(params, x, z) failed for one example x of shape "
                f"{x.shape[1:]} and one latent z of shape {z.shape[1:]}: {e}"
            ) from e
        if not hasattr(out, "shape") or out.shape != ():
            raise ValueError(
                f"model.{name}(params, x, z) must return a scalar for ONE example and ONE "
                f"latent; it returned shape {getattr(out, 'shape', out)} (did you pass a "
                "batch? the estimators vmap for you)."
            )
    return z.shape[1:], z.dtype


def _check_draws_with_log_q(what: str, fn, args, z_shape, x_shape) -> None:
    """``fn(*args)`` (num = 2) must trace and return (z, log_q) of shapes (z_shape, (2,))."""
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as e:  # re-raised with the function named, the cause chained
        raise ValueError(f"model.{what} failed with num=2 on x[0] of shape {x_shape}: {e}") from e
    shapes = jax.tree.map(lambda a: getattr(a, "shape", None), out)
    if not (isinstance(out, tuple) and len(out) == 2 and shapes == (z_shape, (2,))):
        raise ValueError(
            f"model.{what} must return (z, log_q) of shapes ((num, *latent_shape), (num,)); "
            f"with num=2 expected ({z_shape}, (2,)), got {shapes}."
        )
