r"""Meeting-time diagnostics: sampled meeting times, L-lag total-variation bounds, choosing k and m.

Biswas, Jacob & Vanetti (NeurIPS 2019), "Estimating convergence of Markov chains with L-lag
couplings": with :math:`\tau^{(L)}` the meeting time of an L-lag coupling started from
:math:`\pi_0`,

.. math:: d_{TV}(\pi_t, \pi) \le E\Big[\max\Big(0, \Big\lceil \frac{\tau^{(L)} - L - t}{L}
          \Big\rceil\Big)\Big],

estimated here by the average over sampled meeting times. Larger L gives tighter bounds. The bound
is for the marginal law pi_t of X_t started from ``rinit``; it is what one uses to pick k (the
burn-in after which the chains are close to pi) and m.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vaeml_jax.couplings import _checks, debias

__all__ = ["MeetingTimes", "sample_meeting_times", "tv_upper_bound", "suggest_k_m"]


class MeetingTimes(NamedTuple):
    """Sampled meeting times (num_pairs,) int and capped flags (num_pairs,) bool.

    For capped pairs ``meeting_time`` is only a lower bound (max_iters + lag + 1); bounds computed
    from them are then too optimistic, so check ``capped.any()`` first.
    """

    meeting_time: jax.Array
    capped: jax.Array


def sample_meeting_times(
    key,
    single_step: Callable,
    coupled_step: Callable,
    rinit: Callable,
    num_pairs: int,
    lag: int = 1,
    max_iters: int = 1000,
) -> MeetingTimes:
    """tau^{(L)} of ``num_pairs`` independent L-lag pairs (vmapped, jitted; each stops at tau)."""
    est = debias.build_estimator(
        single_step,
        coupled_step,
        rinit,
        lambda s: jnp.zeros(()),
        k=0,
        m=0,
        lag=lag,
        max_iters=max_iters,
    )
    out = jax.jit(lambda kk: debias.run_pairs(est, kk, num_pairs))(key)
    return MeetingTimes(out.meeting_time, out.capped)


def tv_upper_bound(meeting_times, lag: int, t) -> np.ndarray:
    r"""Estimated :math:`E[\max(0, \lceil(\tau - L - t)/L\rceil)]` for each t (any shape).

    Args:
      meeting_times: (P,) sampled L-lag meeting times.
      lag: the L they were sampled with.
      t: iteration(s) at which to bound d_TV(pi_t, pi).
    Returns:
      np.ndarray of t's shape: the Monte Carlo estimate of the upper bound (values above 1 are
      vacuous since d_TV <= 1).
    """
    lag = _checks.check_int("lag", lag, 1)
    tau = np.asarray(meeting_times, np.float64).reshape(-1, 1)
    t_arr = np.asarray(t, np.float64)
    counts = np.maximum(0.0, np.ceil((tau - lag - t_arr.reshape(1, -1)) / lag))
    return counts.mean(axis=0).reshape(t_arr.shape)


def suggest_k_m(meeting_times, quantile: float = 0.99, m_factor: int = 5) -> tuple[int, int]:
    r"""The rule of Jacob, O'Leary & Atchade (2020, Sec. 3.1): k = a large quantile of tau, m = c k.

    k is the ``quantile`` of the sampled meeting times (rounded up; at least 1), so that for most
    pairs the correction term is zero and H_{k:m} is close to an ordinary MCMC average; m is
    ``m_factor * k`` (they recommend 5-10), which keeps the inefficiency relative to an ideal
    MCMC average small. Returns ``(k, m)`` as Python ints.
    """
    q = _checks.check_probability("quantile", quantile)
    m_factor = _checks.check_int("m_factor", m_factor, 1)
    tau = np.asarray(meeting_times)
    if tau.size == 0:
        raise ValueError("meeting_times is empty.")
    k = max(1, int(np.ceil(np.quantile(tau, q))))
    return k, m_factor * k
