r"""The debiasing driver: unbiased estimators H_{k:m} from L-lag coupled chains, for any kernel.

Jacob, O'Leary & Atchade (JRSS-B 2020), "Unbiased Markov chain Monte Carlo methods with
couplings", with the lag-L construction of their Sec. 2 and of Biswas, Jacob & Vanetti (NeurIPS
2019). Given a single kernel K, a coupled kernel :math:`\bar K` with K-marginals, and an initial
law (``rinit``):

1. draw :math:`X_0, Y_0` from ``rinit`` independently and advance X alone:
   :math:`X_t \sim K(X_{t-1}, \cdot)` for :math:`t = 1..L`;
2. for :math:`t \ge L` move the pair :math:`(X_{t+1}, Y_{t+1-L}) \sim \bar K((X_t, Y_{t-L}), \cdot)`
   until :math:`t \ge \max(m, \tau)`, with the meeting time
   :math:`\tau = \inf\{t \ge L : X_t = Y_{t-L}\}` (exact equality of the whole state);
3. return, for any pytree-valued test function h,

.. math::
   H_{k:m} = \frac{1}{m-k+1}\sum_{t=k}^{m} h(X_t)
     + \sum_{t=k+L}^{\tau-1} \frac{c_t}{m-k+1} \big(h(X_t) - h(Y_{t-L})\big),
   \qquad c_t = \#\{j \ge 1 : k \le t - jL \le m\},

the average over l = k..m of the lag-L estimators
:math:`H_l = h(X_l) + \sum_{j \ge 1} (h(X_{l+jL}) - h(Y_{l+(j-1)L}))` (Jacob et al. 2020, Sec. 2;
Biswas et al. 2019). For L = 1, :math:`c_t/(m-k+1) = \min(1, (t-k)/(m-k+1))`, the form of
:mod:`vaeml_jax.estimators.unbiased`; for L >= 2 see :func:`coefficients` (the weight
:math:`\min(1, \lceil (t-k)/L \rceil/(m-k+1))` is biased there).

Guarantee: if the coupled kernel has K as both marginals, is faithful (met chains stay equal) and
:math:`\tau` has a geometric (or sufficiently light) tail, then
:math:`E[H_{k:m}] = E_\pi[h]` exactly, for every k <= m and L >= 1 (Jacob et al. 2020, Thm. 1).

The ONE source of bias is ``max_iters``: a pair still unmet after ``max_iters`` coupled steps is
stopped, its correction truncated and its ``capped`` flag set; estimates from capped pairs are
biased and should be counted, not silently averaged. Pick ``max_iters`` far in the tail of tau
(:mod:`~vaeml_jax.diagnostics`).

Two forms of the same estimator:

* :func:`build_estimator` accumulates h online in the ``lax.while_loop`` carry (memory: one h),
* :func:`build_signed_measure` returns the signed measure
  :math:`\sum_t \alpha_t \delta_{X_t} - \sum_t \beta_t \delta_{Y_{t-L}}` whose integral against h
  is :math:`H_{k:m}`, so several functionals can be estimated from one run; it stores fixed
  buffers of ``max_iters + lag + 1`` states for each chain (memory: 2 (max_iters + L + 1) states;
  use it for small states). :func:`evaluate_signed_measure` integrates any h. For the same key
  both forms return the same value up to floating-point summation order.

Both are pure functions of a key: ``jit`` and ``vmap`` them (:func:`run_pairs` vmaps over
independent pairs). Under ``vmap`` the loop runs until the slowest pair is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.couplings import _checks
from vaeml_jax.couplings.base import CoupledState, states_equal

__all__ = [
    "Estimate",
    "SignedMeasure",
    "coefficients",
    "build_estimator",
    "build_signed_measure",
    "check_window",
    "evaluate_signed_measure",
    "run_pairs",
]

PyTree = Any


class Estimate(NamedTuple):
    """One pair's output.

    Attributes:
      estimate: H_{k:m}, a pytree like h's output.
      meeting_time: () int tau; for a capped pair a lower bound (the last t + 1).
      num_coupled_steps: () int, coupled transitions run (each moves both chains once).
      capped: () bool, the pair hit ``max_iters`` unmet: its estimate is BIASED.
    """

    estimate: PyTree
    meeting_time: jax.Array
    num_coupled_steps: jax.Array
    capped: jax.Array


class SignedMeasure(NamedTuple):
    r"""The signed measure :math:`\sum_i w^X_i \delta_{x_i} + \sum_j w^Y_j \delta_{y_j}`.

    Attributes:
      x_atoms: the states X_0..X_{N-1} stacked on a leading axis of size N = max_iters + lag + 1
        (entries after the last visited time are zeros).
      x_weights: (N,) alpha_t >= 0 (zero outside the used times).
      y_atoms: the states Y_0..Y_{N-1}, stacked likewise.
      y_weights: (N,) -beta_{s+L} <= 0 for Y_s.
      meeting_time, num_coupled_steps, capped: as in :class:`Estimate`.

    The weights sum to 1: the window's weights 1/(m-k+1) sum to one and every correction weight
    beta_t on X_t is matched by -beta_t on Y_{t-L}.
    """

    x_atoms: PyTree
    x_weights: jax.Array
    y_atoms: PyTree
    y_weights: jax.Array
    meeting_time: jax.Array
    num_coupled_steps: jax.Array
    capped: jax.Array


def coefficients(t: Any, met: Any, k: int, m: int, lag: int) -> tuple[jax.Array, jax.Array]:
    r"""Weights (alpha_t, beta_t) of h(X_t) and of h(Y_{t-L}) in H_{k:m} at time t.

    .. math::
       \alpha_t = \frac{1[k \le t \le m]}{m-k+1} + \beta_t,\qquad
       \beta_t = 1[t < \tau]\,\frac{c_t}{m-k+1},\qquad
       c_t = \#\{j \ge 1 : k \le t - jL \le m\}
           = \max\big(0, \lfloor (t-k)/L \rfloor - \max(1, \lceil (t-m)/L \rceil) + 1\big),

    where t < tau is ``~met`` (met: X_t = Y_{t-L}). Arrays broadcast. c_t counts the lag-L
    estimators H_l = h(X_l) + sum_{j>=1} (h(X_{l+jL}) - h(Y_{l+(j-1)L})), l = k..m, whose
    telescoping sum contains the difference at time t; their average is H_{k:m}. For L = 1,
    c_t / (m-k+1) = min(1, (t-k)/(m-k+1)) for t >= k+1. For L >= 2 the often-quoted weight
    min(1, ceil((t-k)/L)/(m-k+1)) is NOT this (e.g. k = m = 0, L = 2: odd t must get weight 0);
    it was measured biased: max abs(z) 7, 21 and 18 for RWM, MALA and HMC (20k pairs, k=2, m=6, L=2,
    the 2-D Gaussian of tests/test_couplings_debias.py), against 0.4-1 with these weights.
    """
    n = m - k + 1
    t = jnp.asarray(t)
    mcmc = jnp.where((t >= k) & (t <= m), 1.0 / n, 0.0)
    beta = jnp.where(~jnp.asarray(met), _correction_count(t, k, m, lag) / n, 0.0)
    return mcmc + beta, beta


def _correction_count(t: jax.Array, k: int, m: int, lag: int) -> jax.Array:
    """c_t = #{j >= 1 : k <= t - jL <= m} (see :func:`coefficients`)."""
    j_max = jnp.floor_divide(t - k, lag)
    j_min = jnp.maximum(1, -jnp.floor_divide(m - t, lag))  # ceil((t - m) / L), at least 1
    return jnp.maximum(0, j_max - j_min + 1)


def _check_common(single_step, coupled_step, rinit, k, m, lag, max_iters):
    for name, fn in (
        ("single_step", single_step),
        ("coupled_step", coupled_step),
        ("rinit", rinit),
    ):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
    return check_window(k, m, lag, max_iters)


def check_window(k: int, m: int, lag: int, max_iters: int) -> tuple[int, int, int, int]:
    """Validate (k, m, lag, max_iters): ints, 0 <= k <= m, lag >= 1, max_iters >= max(m, 1)."""
    k = _checks.check_int("k", k, 0)
    m = _checks.check_int("m", m, 0)
    if k > m:
        raise ValueError(f"k must be <= m for H_{{k:m}}, got k={k} > m={m}.")
    lag = _checks.check_int("lag", lag, 1, " (X runs lag steps ahead of Y)")
    max_iters = _checks.check_int(
        "max_iters", max_iters, max(m, 1), " (it must at least reach m, else the average is cut)"
    )
    return k, m, lag, max_iters


def _check_step_preserves(single_step, key, state):
    """The single kernel must map a state to a state of the same structure, shapes and dtypes."""
    out = jax.eval_shape(lambda s: single_step(key, s)[0], state)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), out)
    want = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), state)
    if jax.tree.structure(out) != jax.tree.structure(state) or got != want:
        raise ValueError(
            "single_step changes the state's structure or shapes: rinit gives "
            f"{want}, a step gives {got}. Check that rinit returns the kernel's state type."
        )


def _run(key, single_step, coupled_step, rinit, k, m, lag, max_iters, acc0_fn, add_x, add_pair):
    """The shared loop; ``add_x(acc, t, x, alpha)`` and ``add_pair(acc, t, x, y, alpha, beta)``."""
    key_x, key_y, key_lag, key_loop = jax.random.split(key, 4)
    x = rinit(key_x)
    y = rinit(key_y)
    _check_step_preserves(single_step, key_lag, x)
    acc = acc0_fn(x)

    def lag_body(t, carry):
        x, acc = carry
        alpha, _ = coefficients(t, False, k, m, lag)  # t < L <= k + L: no correction yet
        acc = add_x(acc, t, x, alpha)
        x, _ = single_step(jax.random.fold_in(key_lag, t), x)
        return x, acc

    x, acc = jax.lax.fori_loop(0, lag, lag_body, (x, acc))
    met = states_equal(x, y)
    alpha, beta = coefficients(lag, met, k, m, lag)
    acc = add_pair(acc, lag, x, y, alpha, beta)
    t0 = jnp.asarray(lag, jnp.int32)
    tau0 = jnp.where(met, t0, 0)

    def cond(c):
        _, t, met, _, _ = c
        return ((t < m) | ~met) & (t - lag < max_iters)

    def body(c):
        pair, t, met, tau, acc = c
        pair, _ = coupled_step(jax.random.fold_in(key_loop, t), pair)
        t = t + 1
        now = met | states_equal(pair.x, pair.y)
        tau = jnp.where(now & ~met, t, tau)
        alpha, beta = coefficients(t, now, k, m, lag)
        acc = add_pair(acc, t, pair.x, pair.y, alpha, beta)
        return pair, t, now, tau, acc

    _, t, met, tau, acc = jax.lax.while_loop(cond, body, (CoupledState(x, y), t0, met, tau0, acc))
    capped = ~met
    return acc, jnp.where(capped, t + 1, tau), t - lag, capped


def build_estimator(
    single_step: Callable,
    coupled_step: Callable,
    rinit: Callable,
    h: Callable,
    k: int = 0,
    m: int = 0,
    lag: int = 1,
    max_iters: int = 1000,
) -> Callable:
    r"""Build ``estimate(key) -> Estimate``: one unbiased H_{k:m} from one coupled pair.

    Args:
      single_step: ``(key, state) -> (state, info)``, the kernel K.
      coupled_step: ``(key, CoupledState) -> (CoupledState, info)`` with K as both marginals and
        faithful (e.g. :func:`vaeml_jax.couplings.rwm.build_coupled_kernel`).
      rinit: ``key -> state``, a draw X_0 (or Y_0) from the initial law.
      h: ``state -> pytree`` of float arrays, the test function (e.g.
        ``lambda s: s.position``); evaluated on both chains every step.
      k, m: 0 <= k <= m, the averaging window. lag: L >= 1.
      max_iters: cap on coupled steps (>= m); capped pairs are reported and BIASED.

    Raises:
      TypeError, ValueError: non-callables, k > m, lag < 1, max_iters < m, non-int arguments;
        at trace time, a single kernel that changes the state's structure or shapes.
    """
    if not callable(h):
        raise TypeError(f"h must be callable, got {type(h).__name__}.")
    k, m, lag, max_iters = _check_common(single_step, coupled_step, rinit, k, m, lag, max_iters)

    def acc0_fn(x):
        return jax.tree.map(jnp.zeros_like, h(x))

    def add_x(acc, t, x, alpha):
        return jax.tree.map(lambda a, v: a + alpha * v, acc, h(x))

    def add_pair(acc, t, x, y, alpha, beta):
        return jax.tree.map(lambda a, u, v: a + alpha * u - beta * v, acc, h(x), h(y))

    def estimate(key) -> Estimate:
        acc, tau, steps, capped = _run(
            key, single_step, coupled_step, rinit, k, m, lag, max_iters, acc0_fn, add_x, add_pair
        )
        return Estimate(acc, tau, steps, capped)

    return estimate


def build_signed_measure(
    single_step: Callable,
    coupled_step: Callable,
    rinit: Callable,
    k: int = 0,
    m: int = 0,
    lag: int = 1,
    max_iters: int = 1000,
) -> Callable:
    """Build ``sample(key) -> SignedMeasure``: the atoms and weights of H_{k:m} for one pair.

    Same arguments and checks as :func:`build_estimator` (no h). For the same key, the pair, the
    meeting time and the weights are those of :func:`build_estimator`, so
    ``evaluate_signed_measure(sample(key), h)`` equals
    ``build_estimator(..., h, ...)(key).estimate`` up to summation order.
    Memory: two buffers of ``max_iters + lag + 1`` states.
    """
    k, m, lag, max_iters = _check_common(single_step, coupled_step, rinit, k, m, lag, max_iters)
    size = max_iters + lag + 1

    def acc0_fn(x):
        atoms = jax.tree.map(lambda a: jnp.zeros((size,) + jnp.shape(a), jnp.result_type(a)), x)
        weights = jnp.zeros((size,), jnp.result_type(float))
        return atoms, weights, atoms, weights

    def put(buffer, index, state):
        return jax.tree.map(lambda b, v: b.at[index].set(v), buffer, state)

    def add_x(acc, t, x, alpha):
        xa, xw, ya, yw = acc
        return put(xa, t, x), xw.at[t].set(alpha), ya, yw

    def add_pair(acc, t, x, y, alpha, beta):
        xa, xw, ya, yw = acc
        return put(xa, t, x), xw.at[t].set(alpha), put(ya, t - lag, y), yw.at[t - lag].set(-beta)

    def sample(key) -> SignedMeasure:
        (xa, xw, ya, yw), tau, steps, capped = _run(
            key, single_step, coupled_step, rinit, k, m, lag, max_iters, acc0_fn, add_x, add_pair
        )
        return SignedMeasure(xa, xw, ya, yw, tau, steps, capped)

    return sample


def evaluate_signed_measure(measure: SignedMeasure, h: Callable) -> PyTree:
    r""":math:`\sum_i w^X_i h(x_i) + \sum_j w^Y_j h(y_j)` for one pair (vmap it over pairs).

    Atoms with zero weight (unused buffer slots) are masked out, so h need not be finite there.
    """
    if not callable(h):
        raise TypeError(f"h must be callable, got {type(h).__name__}.")

    def integrate(atoms, weights):
        values = jax.vmap(h)(atoms)

        def one(v):
            w = weights.reshape(weights.shape + (1,) * (v.ndim - 1)).astype(v.dtype)
            return jnp.sum(jnp.where(w != 0, w * v, 0.0), axis=0)

        return jax.tree.map(one, values)

    hx = integrate(measure.x_atoms, measure.x_weights)
    hy = integrate(measure.y_atoms, measure.y_weights)
    return jax.tree.map(jnp.add, hx, hy)


def run_pairs(fn: Callable[[jax.Array], Any], key: jax.Array, num_pairs: int) -> Any:
    """``vmap(fn)`` over ``num_pairs`` independent keys split from ``key`` (jit the result)."""
    num_pairs = _checks.check_int("num_pairs", num_pairs, 1)
    return jax.vmap(fn)(jax.random.split(key, num_pairs))
