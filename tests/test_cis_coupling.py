"""The maximal coupling of the two chains' resampling steps, tested by its defining properties.

What the coupling part of :mod:`vaeml_jax.couplings.cis` claims, and how each claim is checked
here with fixed seeds:

* marginals: i ~ p and j ~ q exactly (chi-square goodness of fit, Bonferroni over all checks);
* meeting: P(i = j) = sum_a min(p_a, q_a), the overlap (z-test of the empirical frequency);
* in the coupled CIS step each chain's next kept particle has the law of the single-chain kernel
  :func:`vaeml_jax.couplings.cis.build_kernel` applied to that chain's own tuple;
* faithfulness: once the kept particles coincide they stay equal for every later step.

Every statistic is also run on a planted bug and must reject it by a wide margin: a "coupling"
that forgets the residual distributions (wrong marginals), a common-random-numbers coupling
(right marginals, meeting probability below the overlap) and independent resampling (met chains
separate again).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from vaeml_jax.couplings import cis
from vaeml_jax.couplings.cis import coupled_select, maximal_coupling, overlap

N = 100_000  # draws per statistic; SE of a frequency <= 0.0016
ALPHA = 1e-4  # family-wise false-alarm probability of each test function (Bonferroni inside)

PAIRS = {
    "generic": ([0.2, 0.3, 0.5], [0.5, 0.3, 0.2]),
    "nested_support": ([0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]),
    "disjoint": ([0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]),
    "identical": ([0.4, 0.1, 0.5], [0.4, 0.1, 0.5]),
}


# --------------------------------------------------------------------------- statistics
def _chi2_pvalue(draws: np.ndarray, probs: np.ndarray) -> float:
    """Goodness-of-fit p-value of integer draws against probs; zero-probability cells must be empty.

    A draw on a zero-probability cell is an outright violation and gives p = 0.
    """
    probs = np.asarray(probs, np.float64)
    counts = np.bincount(draws, minlength=len(probs)).astype(np.float64)
    if np.any(counts[probs == 0] > 0):
        return 0.0
    support = probs > 0
    if support.sum() == 1:
        return 1.0
    expected = probs[support] * len(draws)
    chi2 = np.sum((counts[support] - expected) ** 2 / expected)
    return float(stats.chi2.sf(chi2, df=support.sum() - 1))


def _meet_z(met: np.ndarray, omega: float) -> float:
    """z-score of the meeting frequency against omega (binomial SE; exact when omega is 0 or 1)."""
    freq = float(np.mean(met))
    if omega in (0.0, 1.0) or omega < 1e-12 or omega > 1 - 1e-12:
        return 0.0 if abs(freq - omega) < 1e-12 else np.inf
    return (freq - omega) / np.sqrt(omega * (1 - omega) / len(met))


def coupling_report(coupling_fn, p, q, seed=0):
    """Run coupling_fn(key, p, q) N times: p-values of the two marginals and the meeting z-score."""
    p, q = jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
    keys = jax.random.split(jax.random.key(seed), N)
    i, j = jax.jit(jax.vmap(coupling_fn, in_axes=(0, None, None)))(keys, p, q)
    i, j = np.asarray(i), np.asarray(j)
    return {
        "p_i": _chi2_pvalue(i, np.asarray(p)),
        "p_j": _chi2_pvalue(j, np.asarray(q)),
        "z_meet": _meet_z(i == j, float(overlap(p, q))),
    }


def coupling_passes(report, num_tests) -> bool:
    """Bonferroni: every marginal p-value above ALPHA / num_tests and |z| below the matching
    normal quantile."""
    z_max = stats.norm.isf(ALPHA / (2 * num_tests))
    return min(report["p_i"], report["p_j"]) > ALPHA / num_tests and abs(report["z_meet"]) < z_max


# --------------------------------------------------------------------------- planted couplings
def _naive_coupling(key, p, q):
    """Planted bug: with prob. omega draw i = j ~ min(p,q)/omega, else i ~ p and j ~ q (it should
    draw from the residuals): the marginals are then common + (1 - omega) p, not p."""
    ku, kc, ki, kj = jax.random.split(key, 4)
    common = jnp.minimum(p, q)
    omega = jnp.sum(common)
    same = jax.random.uniform(ku) < omega
    ic = jax.random.categorical(kc, jnp.log(common))
    i = jnp.where(same, ic, jax.random.categorical(ki, jnp.log(p)))
    j = jnp.where(same, ic, jax.random.categorical(kj, jnp.log(q)))
    return i.astype(jnp.int32), j.astype(jnp.int32)


def _crn_coupling(key, p, q):
    """Planted weak coupling: common random numbers (one uniform through both inverse CDFs). Valid
    marginals, but P(i = j) is below the overlap in general, so the chains would meet later."""
    u = jax.random.uniform(key)
    i = jnp.minimum(jnp.searchsorted(jnp.cumsum(p), u, side="right"), p.shape[0] - 1)
    j = jnp.minimum(jnp.searchsorted(jnp.cumsum(q), u, side="right"), q.shape[0] - 1)
    return i.astype(jnp.int32), j.astype(jnp.int32)


# --------------------------------------------------------------------------- maximal_coupling
@pytest.mark.parametrize("name", list(PAIRS))
def test_maximal_coupling_marginals_and_meeting_probability(name):
    p, q = PAIRS[name]
    report = coupling_report(maximal_coupling, p, q, seed=1)
    assert coupling_passes(report, num_tests=len(PAIRS)), report


def test_maximal_coupling_identical_distributions_always_meet():
    p = jnp.array([0.4, 0.1, 0.5])
    keys = jax.random.split(jax.random.key(2), 10_000)
    i, j = jax.jit(jax.vmap(maximal_coupling, in_axes=(0, None, None)))(keys, p, p)
    assert bool(jnp.all(i == j))


def test_maximal_coupling_never_meets_off_the_common_part():
    """In the residual branch the supports are disjoint: i == j only on atoms with min(p,q) > 0."""
    p, q = (jnp.asarray(v) for v in PAIRS["generic"])
    keys = jax.random.split(jax.random.key(3), 50_000)
    i, j = jax.jit(jax.vmap(maximal_coupling, in_axes=(0, None, None)))(keys, p, q)
    i, j = np.asarray(i), np.asarray(j)
    common = np.minimum(np.asarray(p), np.asarray(q))
    assert np.all(common[i[i == j]] > 0)


def test_same_statistics_reject_planted_couplings():
    """The statistic of the test above rejects both planted couplings by a wide margin."""
    p, q = PAIRS["generic"]
    naive = coupling_report(_naive_coupling, p, q, seed=1)
    assert not coupling_passes(naive, num_tests=len(PAIRS))
    assert min(naive["p_i"], naive["p_j"]) < 1e-100, naive  # marginals far off
    crn = coupling_report(_crn_coupling, p, q, seed=1)
    assert min(crn["p_i"], crn["p_j"]) > ALPHA, crn  # CRN has the right marginals ...
    assert crn["z_meet"] < -50, crn  # ... but meets far less often than the overlap (0.4 vs 0.7)


def test_overlap():
    p, q = (jnp.asarray(v) for v in PAIRS["generic"])
    np.testing.assert_allclose(overlap(p, q), 0.7, rtol=1e-6)
    assert float(overlap(p, p)) == pytest.approx(1.0)
    assert float(overlap(*(jnp.asarray(v) for v in PAIRS["disjoint"]))) == 0.0


# --------------------------------------------------------------------------- the coupled CIS step
S = 4  # particles per chain; atoms = [kept_x, kept_y, f_1, f_2, f_3]
LOG_W_ATOMS = jnp.array([0.3, -0.4, 1.1, -1.0, 0.2])


def _views(log_w_atoms):
    """X's tuple = atoms (0, 2, ..., S), Y's tuple = atoms (1, 2, ..., S)."""
    x_idx = np.array([0, *range(2, S + 1)])
    y_idx = np.array([1, *range(2, S + 1)])
    return x_idx, y_idx


def coupled_step_report(seed=0, log_w_atoms=LOG_W_ATOMS):
    """Law of X's and Y's next kept atom under the coupled step vs the single-chain CIS kernel.

    A 1-D latent whose S+1 atoms are distinct values with log weights ``log_w_atoms``. The
    single-chain kernel :func:`vaeml_jax.couplings.cis.build_kernel` is run on X's own tuple and
    on Y's own
    tuple (with a model whose log weights reproduce the atoms'); the coupled step keeps atoms
    (i, j) from :func:`coupled_select`. Returns chi-square p-values of the coupled marginals
    against the exact single-chain law, two-sample p-values coupled vs single-chain draws, and the
    z-score of the meeting frequency against the overlap of the two resampling distributions.
    """
    atoms = jnp.arange(S + 1, dtype=jnp.float32)[:, None] * 10.0  # distinct 1-D particles
    x_idx, y_idx = _views(log_w_atoms)
    keys = jax.random.split(jax.random.key(seed), N)

    i, j, met = jax.jit(jax.vmap(coupled_select, in_axes=(0, None, None)))(
        keys, log_w_atoms, jnp.asarray(False)
    )
    i, j, met = np.asarray(i), np.asarray(j), np.asarray(met)

    # Single-chain CIS step on each chain's own tuple: log_joint = log w, log_proposal = 0.
    step = cis.build_kernel(_atom_model(), S)

    def single(own_idx, seed_offset):
        state = cis.CISState(atoms[own_idx], log_w_atoms[own_idx], jnp.zeros(S))
        ks = jax.random.split(jax.random.key(seed + seed_offset), N)
        new, info = jax.jit(jax.vmap(lambda k: step(k, state, None, None)))(ks)
        kept_atom = np.asarray(new.particles[:, 0, 0] / 10.0).round().astype(int)
        np.testing.assert_array_equal(kept_atom, own_idx[np.asarray(info.index)])
        return kept_atom

    single_x, single_y = single(x_idx, 1), single(y_idx, 2)
    exact_x = np.zeros(S + 1)
    exact_x[x_idx] = np.asarray(jax.nn.softmax(log_w_atoms[x_idx]))
    exact_y = np.zeros(S + 1)
    exact_y[y_idx] = np.asarray(jax.nn.softmax(log_w_atoms[y_idx]))

    def two_sample(a, b):
        table = np.stack([np.bincount(a, minlength=S + 1), np.bincount(b, minlength=S + 1)])
        table = table[:, table.sum(0) > 0]
        return float(stats.chi2_contingency(table)[1])

    return {
        "p_x_exact": _chi2_pvalue(i, exact_x),
        "p_y_exact": _chi2_pvalue(j, exact_y),
        "p_single_x_exact": _chi2_pvalue(single_x, exact_x),
        "p_single_y_exact": _chi2_pvalue(single_y, exact_y),
        "p_x_vs_single": two_sample(i, single_x),
        "p_y_vs_single": two_sample(j, single_y),
        "z_meet": _meet_z(met, float(np.minimum(exact_x, exact_y).sum())),
        "meet_is_i_eq_j": bool(np.all(met == (i == j))),
    }


def _atom_model():
    """A model over the fixed 1-D atoms used as a CIS target: only its log weights matter."""
    from vaeml_jax.models.interface import LatentVariableModel

    def log_joint(params, x, z):
        idx = jnp.round(z[0] / 10.0).astype(jnp.int32)
        return LOG_W_ATOMS[idx]

    def sample_proposal(params, x, key, num):  # fresh draws are irrelevant for the kept particle
        return jnp.zeros((num, 1))

    def log_proposal(params, x, z):
        return jnp.zeros(())

    return LatentVariableModel(log_joint, sample_proposal, log_proposal)


def _step_passes(report) -> bool:
    p_values = [v for name, v in report.items() if name.startswith("p_")]
    z_max = stats.norm.isf(ALPHA / 2)
    return (
        min(p_values) > ALPHA / len(p_values)
        and abs(report["z_meet"]) < z_max
        and report["meet_is_i_eq_j"]
    )


def test_each_coupled_chain_has_the_single_chain_marginal():
    report = coupled_step_report(seed=10)
    assert _step_passes(report), report


def test_same_statistic_rejects_coupling_with_wrong_marginals(monkeypatch):
    monkeypatch.setattr(cis, "maximal_coupling", _naive_coupling)
    report = coupled_step_report(seed=10)
    assert not _step_passes(report)
    assert min(report["p_x_exact"], report["p_y_exact"]) < 1e-100, report


def test_met_chains_resample_identically():
    """When met, both chains' resampling distributions are X's, and every draw has i == j."""
    p_x, p_y = cis.resampling_distributions(LOG_W_ATOMS, jnp.asarray(True))
    np.testing.assert_array_equal(p_x, p_y)
    assert float(p_x[1]) == 0.0  # mass of the shared kept particle sits on atom 0
    keys = jax.random.split(jax.random.key(4), 20_000)
    i, j, met = jax.jit(jax.vmap(coupled_select, in_axes=(0, None, None)))(
        keys, LOG_W_ATOMS, jnp.asarray(True)
    )
    assert bool(jnp.all(i == j)) and bool(jnp.all(met))


def test_chain_views_exclude_the_other_chains_kept_particle():
    lw_x, lw_y = cis.chain_views(LOG_W_ATOMS, jnp.asarray(False))
    assert bool(jnp.isneginf(lw_x[1])) and bool(jnp.isneginf(lw_y[0]))
    np.testing.assert_array_equal(lw_x[2:], LOG_W_ATOMS[2:])
    np.testing.assert_array_equal(lw_y[2:], LOG_W_ATOMS[2:])


# --------------------------------------------------------------------------- faithfulness
def _run_coupled_chains(num_pairs, num_steps, seed):
    """Coupled CIS chains (X_t, Y_{t-1}) on a 1-D Gaussian target, built from the library's pieces.

    Target p(z) = N(1, 0.5^2), proposal q = N(0, 1); both chains share the S-1 fresh draws and
    resample with :func:`coupled_select`. Returns per step (num_steps, num_pairs): whether the kept
    particles are equal (bitwise) and the sticky ``met`` flag.
    """
    S_ = 3

    def log_w(z):
        return -0.5 * ((z - 1.0) / 0.5) ** 2 - jnp.log(0.5) + 0.5 * z**2

    def one_pair(key):
        k0, k1, kloop = jax.random.split(key, 3)
        atoms = jnp.concatenate([jax.random.normal(k0, (2,)), jax.random.normal(k1, (S_ - 1,))])

        def body(carry, t):
            atoms, met = carry
            ks, kf = jax.random.split(jax.random.fold_in(kloop, t))
            i, j, _ = coupled_select(ks, log_w(atoms), met)
            fresh = jax.random.normal(kf, (S_ - 1,))
            new = jnp.concatenate([atoms[i][None], atoms[j][None], fresh])
            met = met | (i == j)
            return (new, met), (new[0] == new[1], met)

        _, out = jax.lax.scan(body, (atoms, jnp.asarray(False)), jnp.arange(num_steps))
        return out

    keys = jax.random.split(jax.random.key(seed), num_pairs)
    equal, met = jax.jit(jax.vmap(one_pair))(keys)
    return np.asarray(equal).T, np.asarray(met).T


def _faithfulness_violations(equal, met):
    """Number of (step, pair) where the pair had met but the kept particles differ."""
    return int(np.sum(met & ~equal))


def test_met_chains_stay_identical():
    equal, met = _run_coupled_chains(num_pairs=2000, num_steps=60, seed=5)
    assert met[-1].mean() > 0.99  # nearly every pair meets within the horizon ...
    assert _faithfulness_violations(equal, met) == 0  # ... and never separates afterwards
    np.testing.assert_array_equal(equal, met)  # and equal kept particles happen only by meeting


def _independent_coupling(key, p, q):
    """Planted bug: the two resampling draws made independently (the coupling forgotten)."""
    ki, kj = jax.random.split(key)
    i = jax.random.categorical(ki, jnp.log(p))
    j = jax.random.categorical(kj, jnp.log(q))
    return i.astype(jnp.int32), j.astype(jnp.int32)


def test_faithfulness_check_rejects_uncoupled_resampling(monkeypatch):
    """Planted bug: independent resampling. Chains still meet now and then (i == j by chance) but
    separate again, which the faithfulness count sees; the meeting statistic rejects it too."""
    monkeypatch.setattr(cis, "maximal_coupling", _independent_coupling)
    equal, met = _run_coupled_chains(num_pairs=2000, num_steps=60, seed=5)
    assert _faithfulness_violations(equal, met) > 1000
    report = coupling_report(_independent_coupling, *PAIRS["generic"], seed=1)
    assert report["z_meet"] < -50, report
