"""Coupled kernels of vaeml_jax.couplings: exact marginals, maximal meeting, faithfulness, tails.

* Marginals: from fixed states (x, y), one coupled step and one single-kernel step from x (and from
  y) are drawn with N independent keys; the two-sample z of the means of (x', x'^2) must stay
  below the Bonferroni threshold for every coupled kernel, for BOTH chains. Plant: the
  reflection-maximal coupling without the reflection (maximal._reflect swapped for
  _couplings_plants.unreflected) breaks Y's marginal and is rejected by > 2 x threshold.
* Reflection-maximal coupling: P(x = y) equals 2 Phi(-|z|/2) (z-test) and both draws are exact
  Gaussians; the same plant is rejected.
* Faithfulness: pairs started equal stay bitwise equal (array_equal), and pairs that met stay met.
* Meeting-time tails of reflection-maximal RWM on N(0, I_d), d = 2 and 5: geometric (see the
  rule above test_meeting_time_tail_is_geometric).
"""

import _couplings_plants as plants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _couplings_targets import kernels, logdensity, two_sample_z
from _stats import REJECT_FACTOR, pass_threshold

from vaeml_jax import couplings as cp
from vaeml_jax.couplings import maximal

N = 40_000
X0 = jnp.array([0.6, -0.4])
Y0 = jnp.array([-0.3, 0.5])


def _features(pos):
    return jnp.concatenate([pos, pos**2], axis=-1)


def marginal_z(kind):
    """max |z| over (x', x'^2) of both chains, coupled vs single; and the threshold."""
    single, coupled = kernels(kind)
    sx, sy = cp.init(X0, logdensity), cp.init(Y0, logdensity)

    @jax.jit
    def draws(key):
        kc, kx, ky = jax.random.split(key, 3)
        cpl = jax.vmap(lambda kk: coupled(kk, cp.CoupledState(sx, sy))[0])(jax.random.split(kc, N))
        one_x = jax.vmap(lambda kk: single(kk, sx)[0].position)(jax.random.split(kx, N))
        one_y = jax.vmap(lambda kk: single(kk, sy)[0].position)(jax.random.split(ky, N))
        return cpl.x.position, cpl.y.position, one_x, one_y

    cx, cy, ox, oy = draws(jax.random.key(11))
    z = np.concatenate(
        [two_sample_z(_features(cx), _features(ox)), two_sample_z(_features(cy), _features(oy))]
    )
    return float(np.abs(z).max()), pass_threshold(z.size)


@pytest.mark.parametrize("kind", ["rwm", "mala", "hmc"])
def test_coupled_kernel_has_the_single_kernels_marginals(kind):
    z, threshold = marginal_z(kind)
    assert z < threshold, (kind, z, threshold)


def test_marginal_test_rejects_unreflected_coupling(monkeypatch):
    monkeypatch.setattr(maximal, "_reflect", plants.unreflected)
    z, threshold = marginal_z("rwm")
    print(f"plant no_reflection: max|z| = {z:.1f} (threshold {threshold:.2f})")
    assert z > REJECT_FACTOR * threshold, (z, threshold)


@pytest.mark.parametrize("bug", [None, "no_reflection"])
def test_reflection_maximal_coupling_is_maximal_and_exact(monkeypatch, bug):
    if bug == "no_reflection":
        monkeypatch.setattr(maximal, "_reflect", plants.unreflected)
    mu1, mu2, s = jnp.array([0.0, 0.5, 1.0]), jnp.array([0.4, 0.1, 1.2]), jnp.array([0.5, 1.0, 0.7])
    draw = jax.jit(jax.vmap(lambda kk: maximal.reflection_maximal(kk, mu1, mu2, s)))(
        jax.random.split(jax.random.key(5), N)
    )
    p = float(maximal.meeting_probability(mu1, mu2, s))
    eq = np.asarray(draw.equal, np.float64)
    z_meet = (eq.mean() - p) / np.sqrt(p * (1 - p) / N)
    zx = (np.asarray(draw.x) - np.asarray(mu1)) / np.asarray(s)  # N(0, 1) coordinates
    zy = (np.asarray(draw.y) - np.asarray(mu2)) / np.asarray(s)
    z = np.concatenate(
        [
            [z_meet],
            zx.mean(0) * np.sqrt(N),
            zy.mean(0) * np.sqrt(N),
            (zx**2 - 1).mean(0) / np.sqrt(2 / N),
            (zy**2 - 1).mean(0) / np.sqrt(2 / N),
        ]
    )
    threshold = pass_threshold(z.size)
    stat = float(np.abs(z).max())
    np.testing.assert_array_equal(np.asarray(draw.x)[eq == 1], np.asarray(draw.y)[eq == 1])
    if bug is None:
        assert stat < threshold, (stat, threshold)
    else:
        print(f"plant {bug}: max|z| = {stat:.1f} (threshold {threshold:.2f})")
        assert stat > REJECT_FACTOR * threshold, (stat, threshold)


@pytest.mark.parametrize("kind", ["rwm", "mala", "hmc"])
def test_equal_chains_stay_equal(kind):
    """Faithfulness, exactly: a pair started equal is bitwise equal after every one of 40 steps."""
    _, coupled = kernels(kind)
    s0 = cp.init(X0, logdensity)

    def run(key):
        def body(pair, kk):
            pair, _ = coupled(kk, pair)
            return pair, (pair.x, pair.y)

        return jax.lax.scan(body, cp.CoupledState(s0, s0), jax.random.split(key, 40))[1]

    xs, ys = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(2), 64))
    for a, b in zip(jax.tree.leaves(xs), jax.tree.leaves(ys), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.unique(np.asarray(xs.position)[:, -1, 0]).size > 32  # they did move


def test_met_chains_stay_met():
    """From different starts: once X == Y (all leaves) they remain equal for the rest of the run."""
    _, coupled = kernels("hmc")
    sx, sy = cp.init(X0 + 2.0, logdensity), cp.init(Y0 - 2.0, logdensity)

    def run(key):
        def body(pair, kk):
            pair, _ = coupled(kk, pair)
            return pair, cp.base.states_equal(pair.x, pair.y)

        return jax.lax.scan(body, cp.CoupledState(sx, sy), jax.random.split(key, 150))[1]

    met = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(4), 256)))
    assert met[:, -1].mean() > 0.9  # most pairs met within 150 steps
    first = np.where(met.any(1), met.argmax(1), met.shape[1])
    after = np.arange(met.shape[1])[None] >= first[:, None]
    np.testing.assert_array_equal(met, after)


# ---- meeting-time tails on a strongly log-concave target ----------------------------------------
#
# Rule (principled): a geometric tail means the probability of NOT meeting within the next c steps,
# given no meeting so far, is bounded by some q < 1 whatever the elapsed time: then
# P(tau > t0 + j c) <= P(tau > t0) q^j. With c = half the measured median of tau we estimate the
# conditional survival S(t + c) / S(t) at t = c, 2c, 3c, ... (while >= 100 pairs are at risk) and
# require every estimate <= Q_MAX = 0.8 (plus 4 binomial standard errors), and the implied quantile
# bound: the 99.9% quantile <= c (1 + j) with 0.8^j <= 0.002 (S(c) <= 1). Kernel: reflection-
# maximal RWM, scale 1/sqrt(d), on N(0, I_d) from N(2, I). A power-law tail would show the
# conditional survival rising towards 1. Plant: RWM uncoupled (maximal.reflection_maximal swapped
# for _couplings_plants.independent_draw): pairs never meet.
# (Not the HMC/RWM mixture: its CRN HMC steps contract the pair to float32 equality, so even with
# the RWM component uncoupled it meets, with a geometric tail.)

Q_MAX = 0.8
PAIRS = 8000


def conditional_survival(d, max_iters=2000):
    def target(x):
        return -0.5 * jnp.sum(x**2)

    scale = 1.0 / np.sqrt(d)
    single = cp.rwm.build_kernel(target, scale)
    coupled = cp.rwm.build_coupled_kernel(target, scale)

    def rinit(key):
        return cp.init(jax.random.normal(key, (d,)) + 2.0, target)

    times = cp.sample_meeting_times(
        jax.random.key(d), single, coupled, rinit, PAIRS, lag=1, max_iters=max_iters
    )
    tau = np.asarray(times.meeting_time)
    c = max(1, int(np.median(tau)) // 2)
    out = []
    t = c
    while (tau > t).sum() >= 100:
        at_risk = (tau > t).sum()
        q = (tau > t + c).sum() / at_risk
        out.append((t, q, np.sqrt(max(q * (1 - q), 1e-4) / at_risk)))
        t += c
    return c, out, tau, np.asarray(times.capped)


@pytest.mark.parametrize("d,bug", [(2, None), (5, None), (2, "uncoupled")])
def test_meeting_time_tail_is_geometric(monkeypatch, d, bug):
    if bug == "uncoupled":
        monkeypatch.setattr(maximal, "reflection_maximal", plants.independent_draw)
    c, surv, tau, capped = conditional_survival(d, 2000 if bug is None else 200)
    print(
        f"d={d} bug={bug}: window c {c}, 99.9% {np.quantile(tau, 0.999):.0f}, "
        f"conditional survival {[round(float(q), 3) for _, q, _ in surv]}, "
        f"capped {capped.mean():.3f}"
    )
    ok = capped.sum() == 0 and len(surv) > 0 and all(q <= Q_MAX + 4 * se for _, q, se in surv)
    if bug is None:
        assert ok, surv
        # the implied quantile bound: P(tau > c + j c) <= Q_MAX^j
        j = int(np.ceil(np.log(0.002) / np.log(Q_MAX)))
        assert np.quantile(tau, 0.999) <= c * (1 + j), (np.quantile(tau, 0.999), c, j)
    else:
        assert not ok
