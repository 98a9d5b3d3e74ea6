"""Planted bugs for the tests/test_couplings_*.py files: broken copies of small library functions.

A test swaps one in with ``monkeypatch.setattr(module, name, broken)``; the kernels look these
names up as module globals when they are traced, and the tests build (and jit) their kernels
afresh inside each test, so the patched function is the one compiled. Each plant must be rejected
by the statistic that passes the unplanted library.

* :func:`unreflected` for ``maximal._reflect``: Y's residual is the un-reflected xi, which breaks
  Y's marginal in the reflection-maximal coupling.
* :func:`independent_draw` for ``maximal.reflection_maximal``: RWM proposals with independent
  noise: the chains (a.s.) never meet.
* :func:`no_proposal_correction` for ``mala._log_acceptance_ratio``: MALA's acceptance ratio
  without q(x|x')/q(x'|x): the chain targets a wrong law.
* :func:`off_by_one_count` for ``debias._correction_count``: the correction's weights one step
  early, c_{t+1} in place of c_t (for L = 1: the ramp counted from k - 1).
"""

import jax
import jax.numpy as jnp

from vaeml_jax.couplings import debias, maximal

# The genuine functions, kept before any test patches the modules.
_reflection_maximal = maximal.reflection_maximal
_correction_count = debias._correction_count


def unreflected(xi, e):
    return xi


def independent_draw(key, mu1, mu2, scale):
    """X from the genuine coupling, Y ~ N(mu2, diag(scale^2)) with its own noise, never equal."""
    key_x, key_y = jax.random.split(key)
    x = _reflection_maximal(key_x, mu1, mu2, scale).x
    y = mu2 + scale * jax.random.normal(key_y, mu2.shape, mu2.dtype)
    return maximal.ReflectionDraw(x, y, jnp.zeros((), bool))


def no_proposal_correction(state, new, *_):
    return new.logdensity - state.logdensity


def off_by_one_count(t, k, m, lag):
    return _correction_count(t + 1, k, m, lag)
