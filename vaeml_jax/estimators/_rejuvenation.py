r"""Rejuvenation of the kept particles between CIS steps: MALA with common random numbers, then a
reflection-maximal random-walk step so that two kept particles can meet exactly.

Why this is valid. Under the CIS kernel's target \bar\pi, the particle kept by the resampling step
is an exact posterior draw given its index, independent of the others (which are q-draws). Moving
it with any p(z | x)-invariant kernel before the refresh therefore leaves \bar\pi invariant: the
rejuvenated kernel is a CIS kernel composed with a posterior MCMC move of slot 0. Both moves here
(MALA and random-walk Metropolis) target p(z | x) \propto p(x, z) and are Metropolis-corrected.

Why it can shorten the meeting-time tail. Plain CIS chains meet only when both resample the same
fresh proposal; when each holds a kept particle of high weight neither moves for long (the
power-law tail). Here the two kept particles are moved with the same noise (MALA contracts them
where the posterior is log-concave) and a random-walk step with the reflection-maximal coupling
(Jacob, O'Leary & Atchade 2020; Bou-Rabee, Eberle & Zimmer 2020) makes them EXACTLY equal with
probability P(N(0, I) and N(Delta, I) coincide) = 2 Phi(-|Delta| / 2), Delta their scaled distance;
the tuples then coincide (they share the fresh proposals).

Coupled kernels are faithful (equal inputs give equal outputs) and each chain alone has the single
kernel's law: MALA's noise and uniform are shared; the random walk's proposal pair is a coupling of
two N(z, (delta sigma)^2) laws and the uniform is shared.

Preconditioning: coordinates are scaled by ``scale`` (per lane, per coordinate), the standard
deviation of independent proposal draws made for this purpose only (so the kernel does not depend
on the chains' own draws). Step sizes are in those units.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vaeml_jax.couplings.maximal import reflection_maximal
from vaeml_jax.couplings.proposals import langevin_log_density, langevin_mean, langevin_scale

__all__ = ["Rejuvenation", "single_move", "coupled_move"]


class Rejuvenation(NamedTuple):
    """Configuration of the kept-particle move (see the module docstring).

    Attributes:
      num_steps: MALA steps per CIS iteration (>= 0).
      step_size: MALA step epsilon, in units of the proposal's per-coordinate std.
      meet_scale: random-walk step delta of the reflection-maximal coupled step (> 0), same units;
        0 disables that step (MALA with common random numbers alone never meets exactly).
      scale_draws: independent proposal draws per lane that estimate the per-coordinate std.
    """

    num_steps: int = 3
    step_size: float = 0.5
    meet_scale: float = 0.3
    scale_draws: int = 16


def check_rejuvenation(r) -> Rejuvenation | None:
    if r is None:
        return None
    if not isinstance(r, Rejuvenation):
        raise TypeError(
            "rejuvenation must be None or vaeml_jax.estimators.Rejuvenation(num_steps, "
            f"step_size, meet_scale, scale_draws), got {type(r).__name__}."
        )
    if not isinstance(r.num_steps, int) or r.num_steps < 0:
        raise ValueError(f"Rejuvenation.num_steps must be an int >= 0, got {r.num_steps!r}.")
    if not r.step_size > 0:
        raise ValueError(f"Rejuvenation.step_size must be > 0, got {r.step_size!r}.")
    if not r.meet_scale >= 0:
        raise ValueError(f"Rejuvenation.meet_scale must be >= 0, got {r.meet_scale!r}.")
    if not isinstance(r.scale_draws, int) or r.scale_draws < 2:
        raise ValueError(f"Rejuvenation.scale_draws must be an int >= 2, got {r.scale_draws!r}.")
    if r.num_steps == 0 and r.meet_scale == 0:
        raise ValueError("Rejuvenation with num_steps=0 and meet_scale=0 does nothing.")
    return r


def _value_and_grad(logdensity, z):
    v, g = jax.value_and_grad(logdensity)(z)
    ok = jnp.isfinite(v) & jnp.all(jnp.isfinite(g))
    return jnp.where(ok, v, -jnp.inf), jnp.where(ok, g, 0.0)


def _mala_proposal_logpdf(z_to, z_from, grad_from, eps, scale):
    return langevin_log_density(z_to, z_from, grad_from, eps, scale**2)


def _mala_step(logdensity, z, v, g, noise, log_u, eps, scale):
    prop = langevin_mean(z, g, eps, scale**2) + langevin_scale(eps, scale**2) * noise
    vp, gp = _value_and_grad(logdensity, prop)
    log_ratio = (
        vp
        - v
        + _mala_proposal_logpdf(z, prop, gp, eps, scale)
        - _mala_proposal_logpdf(prop, z, g, eps, scale)
    )
    accept = jnp.isfinite(vp) & (log_u < log_ratio)
    return (jnp.where(accept, prop, z), jnp.where(accept, vp, v), jnp.where(accept, gp, g))


def single_move(key, z, logdensity, scale, cfg: Rejuvenation):
    """One rejuvenation of ONE chain's kept particle z (a flat (d,) vector); returns z'."""
    keys = jax.random.split(key, cfg.num_steps + 1)
    v, g = _value_and_grad(logdensity, z)
    for s in range(cfg.num_steps):
        k_noise, k_u = jax.random.split(keys[s])
        noise = jax.random.normal(k_noise, z.shape, z.dtype)
        log_u = jnp.log(jax.random.uniform(k_u, dtype=z.dtype))
        z, v, g = _mala_step(logdensity, z, v, g, noise, log_u, cfg.step_size, scale)
    if cfg.meet_scale > 0:
        k_noise, k_u = jax.random.split(keys[-1])
        prop = z + cfg.meet_scale * scale * jax.random.normal(k_noise, z.shape, z.dtype)
        vp = logdensity(prop)
        log_u = jnp.log(jax.random.uniform(k_u, dtype=z.dtype))
        z = jnp.where(jnp.isfinite(vp) & (log_u < vp - v), prop, z)
    return z


def coupled_move(key, zx, zy, logdensity, scale, cfg: Rejuvenation):
    """Coupled rejuvenation of the two kept particles (flat (d,) vectors); returns (zx', zy').

    Faithful: zx == zy gives zx' == zy'. Each output alone has :func:`single_move`'s law.
    """
    keys = jax.random.split(key, cfg.num_steps + 1)
    vx, gx = _value_and_grad(logdensity, zx)
    vy, gy = _value_and_grad(logdensity, zy)
    for s in range(cfg.num_steps):  # common random numbers
        k_noise, k_u = jax.random.split(keys[s])
        noise = jax.random.normal(k_noise, zx.shape, zx.dtype)
        log_u = jnp.log(jax.random.uniform(k_u, dtype=zx.dtype))
        zx, vx, gx = _mala_step(logdensity, zx, vx, gx, noise, log_u, cfg.step_size, scale)
        zy, vy, gy = _mala_step(logdensity, zy, vy, gy, noise, log_u, cfg.step_size, scale)
    if cfg.meet_scale > 0:
        k_noise, k_u = jax.random.split(keys[-1])
        px, py, _ = reflection_maximal(k_noise, zx, zy, cfg.meet_scale * scale)
        vpx, vpy = logdensity(px), logdensity(py)
        log_u = jnp.log(jax.random.uniform(k_u, dtype=zx.dtype))
        zx = jnp.where(jnp.isfinite(vpx) & (log_u < vpx - vx), px, zx)
        zy = jnp.where(jnp.isfinite(vpy) & (log_u < vpy - vy), py, zy)
    return zx, zy


def evals_per_iteration(cfg: Rejuvenation | None, coupled: bool) -> int:
    """log_joint evaluations of one move per lane (a value-and-gradient counts as one): the
    current point, each MALA proposal and the random-walk proposal, for one or two chains."""
    if cfg is None:
        return 0
    per_chain = 1 + cfg.num_steps + (1 if cfg.meet_scale > 0 else 0)
    return per_chain * (2 if coupled else 1)


def extra_evals(cfg: Rejuvenation | None) -> tuple[int, int]:
    """(at t = 1, per coupled iteration): the log_joint evaluations rejuvenation adds per lane.

    At t = 1 X_0's kept particle is moved (one single move) and the moved particle evaluated once
    more for the gradient (without rejuvenation X_1's kept values are X_0's, free).
    """
    if cfg is None:
        return 0, 0
    return evals_per_iteration(cfg, coupled=False) + 1, evals_per_iteration(cfg, coupled=True)
