r"""Mixtures of kernels (Heng & Jacob 2019): a CRN kernel that contracts, a maximal one that meets.

Single kernel: with probability ``p_maximal`` take a step of ``kernel_maximal`` (typically RWM
with a small scale), otherwise of ``kernel_crn`` (MALA or HMC). A mixture of
:math:`\pi`-invariant kernels is :math:`\pi`-invariant.

Coupled kernel: ONE Bernoulli(``p_maximal``) draw shared by both chains chooses the component,
then the chosen coupled kernel moves the pair. Each chain alone is therefore the single mixture
kernel (exact marginals); CRN steps bring the chains close and reflection-maximal RWM steps then
make them meet EXACTLY with probability :math:`2\Phi(-\|(x-y)/s\|/2)`. Faithful if both
components are. Under ``vmap`` both components are computed each step (``lax.cond`` becomes a
select), so a step costs the sum of the two components.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from vaeml_jax.couplings import _checks

__all__ = ["build_kernel", "build_coupled_kernel"]


def _mix(first: Callable, second: Callable, p_second: float) -> Callable:
    def step(key, state):
        key_choice, key_step = jax.random.split(key)
        use_second = jax.random.bernoulli(key_choice, p_second)
        return jax.lax.cond(
            use_second, lambda: second(key_step, state), lambda: first(key_step, state)
        )

    return step


def build_kernel(kernel_crn: Callable, kernel_maximal: Callable, p_maximal: float) -> Callable:
    """``step(key, state) -> (state, Info)``: the maximal kernel w.p. p_maximal, else the CRN one.

    The two kernels must take and return the same state type and info type (the kernels of this
    package all use :class:`~vaeml_jax.couplings.base.State` and ``Info``).
    """
    return _mix(kernel_crn, kernel_maximal, _checks.check_probability("p_maximal", p_maximal))


def build_coupled_kernel(
    coupled_crn: Callable, coupled_maximal: Callable, p_maximal: float
) -> Callable:
    """``step(key, CoupledState) -> (CoupledState, CoupledInfo)``: the coupled mixture.

    One shared component choice per step, so the marginal of each chain is :func:`build_kernel`'s
    with the matching single kernels and the same ``p_maximal``.
    """
    return _mix(coupled_crn, coupled_maximal, _checks.check_probability("p_maximal", p_maximal))
