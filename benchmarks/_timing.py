"""Wall-clock timing helpers shared by the benchmarks: interleaved rounds, medians and IQRs.

Every variant is a zero-argument-per-repeat callable ``fn(r)`` returning JAX arrays; a repeat is
timed from the call to ``jax.block_until_ready`` of its output, so asynchronous dispatch is
included and compilation is not (each variant runs ``warmup`` times first). Variants are timed in
*rounds*: round r runs every variant once, in an order rotated by r, so slow drifts of a shared
machine (other processes, frequency changes) hit all variants alike, and per-round *paired* ratios
and differences cancel most of that drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["Summary", "summarize", "time_interleaved", "block"]


class Summary(NamedTuple):
    """Median and inter-quartile range (25th, 75th percentiles) of a sample."""

    median: float
    q25: float
    q75: float

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """``median [q25, q75]`` after multiplying by ``scale``."""
        m, a, b = (scale * v for v in self)
        return f"{m:.{digits}f} [{a:.{digits}f}, {b:.{digits}f}]"


def summarize(samples) -> Summary:
    """Median and IQR of a 1-D sample (NaNs ignored)."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return Summary(float("nan"), float("nan"), float("nan"))
    q25, med, q75 = np.percentile(s, [25, 50, 75])
    return Summary(float(med), float(q25), float(q75))


def block(out: Any) -> Any:
    """Wait until every array in ``out`` is computed."""
    return jax.block_until_ready(out)


def time_interleaved(
    fns: Mapping[str, Callable[[int], Any]],
    repeats: int,
    warmup: int = 1,
    on_output: Callable[[str, int, Any], None] | None = None,
    rounds_of: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Time each ``fns[name](r)`` for r = 0..repeats-1, interleaved in rotated rounds.

    Args:
      fns: name -> callable taking the repeat index (to pick pre-built inputs) and returning
        arrays. Inputs must already live on the device: only the call and the wait are timed.
      repeats: number of rounds (timed calls per variant).
      warmup: untimed calls per variant before the first round (compilation, first-touch).
      on_output: optional ``(name, r, output)`` hook, called after the clock stops (to read
        ``info`` dicts without timing the transfer).
      rounds_of: optional name -> number of rounds (<= repeats) for expensive variants: such a
        variant takes part in the first ``rounds_of[name]`` rounds only.

    Returns:
      name -> (n,) array of seconds, n = ``rounds_of.get(name, repeats)``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    names = list(fns)
    rounds = {name: min(repeats, (rounds_of or {}).get(name, repeats)) for name in names}
    for name in names:
        for w in range(warmup):
            block(fns[name](w))
    times = {name: np.empty(rounds[name]) for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if r >= rounds[name]:
                continue
            t0 = time.perf_counter()
            out = block(fns[name](r))
            times[name][r] = time.perf_counter() - t0
            if on_output is not None:
                on_output(name, r, out)
    return times
