r"""Ground truth (issue 10): estimators judged by what they converge to, against exact answers.

The pPCA test trains with unbiased gradients and with IWAE-S and checks where each ends relative to
the closed-form maximum-likelihood fit; the quadrature tests check that the 2-D-latent VAE's grid
log-likelihood and its gradient agree with brute-force importance sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import vaeml_jax.estimators.unbiased as unbiased_module
from vaeml_jax import ground_truth as G
from vaeml_jax.estimators import LoopOptions, make_iwae_grad, make_unbiased_grad

# pPCA set-up: D = 5, d = 1, N = 100 draws of a pPCA with s = 0.5 and |w|^2 ~ 2.4, so the posterior
# std (~0.3) is a third of the proposal's fixed sigma0 = 1: no encoder can match it.
D, LATENT, N, NOISE, WEIGHT_SCALE, SIGMA0 = 5, 1, 100, 0.5, 0.8, 1.0
SEEDS = 8  # R independent training runs per method
STEPS = 400
LR = 0.1
S_UNBIASED, S_IWAE = 5, 2
ALPHA = 1e-3  # family-wise false-alarm probability of the pass check
REJECT_FACTOR = 2.0  # a biased method must exceed REJECT_FACTOR x the threshold


def _setup():
    gt = G.ppca(D, LATENT, "fixed_encoder", SIGMA0)
    true = G.ppca_init(jax.random.key(1), D, LATENT, NOISE, WEIGHT_SCALE, proposal="fixed_encoder")
    x = G.ppca_sample(jax.random.key(2), true, N)
    fit = G.ppca_ml_fit(x, LATENT)
    fit_params = {
        "decoder": {
            "W": jnp.asarray(fit["W"], jnp.float32),
            "b": jnp.asarray(fit["b"], jnp.float32),
            "log_s": jnp.asarray(fit["log_s"], jnp.float32),
        },
        "encoder": true["encoder"],
    }
    phi_star = np.asarray(G.ppca_identifiable(fit_params), np.float64)
    return gt, true, x, fit, phi_star


def _averaged_deviations(estimator, params, x, phi_star, seeds=SEEDS):
    """(R, P): identified quantities of each seed's Polyak-averaged iterate minus the ML values."""
    opt = optax.sgd(G.robbins_monro(LR))

    def one(key):
        return G.fit(estimator, params, x, opt, STEPS, key, record_every=STEPS).averaged

    keys = jax.random.split(jax.random.key(0), seeds)
    averaged = jax.jit(jax.vmap(one))(keys)
    phi = np.asarray(jax.vmap(G.ppca_identifiable)(averaged), np.float64)
    return phi - phi_star


def test_ppca_ml_fit_is_a_stationary_point_and_maximum():
    """The closed form: zero exact gradient there, and no random perturbation does better."""
    gt, true, x, fit, _ = _setup()
    p = {
        "decoder": {k: jnp.asarray(fit[k], jnp.float32) for k in ("W", "b", "log_s")},
        "encoder": true["encoder"],
    }
    ll = float(G.exact_log_likelihood(gt, p, x))
    assert abs(ll - fit["log_likelihood"]) < 1e-4
    grads, _ = G.make_exact_grad(gt)(p, x)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads["decoder"])) < 1e-4
    perturbed = jax.jit(
        jax.vmap(
            lambda k: G.exact_log_likelihood(
                gt, jax.tree.map(lambda a: a + 0.05 * jax.random.normal(k, a.shape), p), x
            )
        )
    )
    assert np.all(np.asarray(perturbed(jax.random.split(jax.random.key(10), 5))) < ll)


def _plant_no_correction(monkeypatch):
    """The planted bias: jacob_coefficients without its correction, so H_{0:0} = h(X_0), the
    IWAE-S gradient of the chains' start."""
    original = unbiased_module.jacob_coefficients

    def no_correction(t, met, k, m):
        alpha, beta = original(t, met, k, m)
        return alpha - beta, jnp.zeros_like(beta)

    monkeypatch.setattr(unbiased_module, "jacob_coefficients", no_correction)


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "no_correction"])
def test_unbiased_training_reaches_ml_fit_and_iwae_does_not(bug, monkeypatch):
    r"""Unbiased SGD ends at the ML fit within run-to-run noise; IWAE-S ends measurably away.

    Set-up: pPCA (D=5, d=1) with the fixed-variance amortised proposal q = N(A x + c, 1) (A, c
    trained by the IWAE-S encoder objective), full-batch steps on N=100 points, SGD with the
    Robbins-Monro schedule gamma_t = LR / (1 + t/100)^0.6 and the Polyak average of the last
    T/2 iterates, from the data-generating parameters (not the ML fit), R = 8 seeds.

    Derivation of the threshold. Write phi(theta) for the identified quantities (s^2, the nonzero
    eigenvalue of W W^T, b) and delta_r = phi(theta_bar_r) - phi(theta*) for seed r's averaged
    iterate. With unbiased gradients theta* (the ML fit) is the fixed point of the recursion, and
    delta_r = e_opt + eps_r, where e_opt is the deterministic finite-T optimisation error (the
    exact-gradient run measures it: asserted below a fifth of the noise SE) and eps_r are i.i.d.
    across seeds with mean zero to first order (Polyak & Juditsky 1992: sqrt(T) eps -> Gaussian).
    So t_j = mean_r delta_rj / (sd_r delta_rj / sqrt(R)) is Student-t with R - 1 degrees of
    freedom, and max_j |t_j| < c = t_{R-1}^{-1}(1 - ALPHA / (2P)) (Bonferroni over the P
    coordinates) has false-alarm probability <= ALPHA: the fixed seeds are not what makes it pass.
    The meeting times' heavy tail makes eps_r heavy-tailed; that inflates sd_r (a conservative
    test for the pass) and only shrinks the detection margins below, which stay large.
    A method with bias beta is detected when |beta_j| > c * SE_j; IWAE-S's bias (its fixed point
    maximises the IWAE bound, not log p) must exceed REJECT_FACTOR * c * SE_j of the unbiased run.

    The plant ``no_correction`` makes jacob_coefficients return a zero bias correction: H_{0:0}
    then is h(X_0), the IWAE-S gradient of the chains' start, and the pass check must fail.
    """
    gt, true, x, _, phi_star = _setup()
    P = phi_star.size
    c = float(stats.t.isf(ALPHA / (2 * P), SEEDS - 1))

    exact = _averaged_deviations(G.make_exact_grad(gt), true, x, phi_star, seeds=1)[0]

    if bug == "no_correction":
        _plant_no_correction(monkeypatch)
    unbiased = make_unbiased_grad(gt.model, num_particles=S_UNBIASED, k=0, m=0)
    dev = _averaged_deviations(unbiased, true, x, phi_star)
    se = dev.std(0, ddof=1) / np.sqrt(SEEDS)
    t = dev.mean(0) / se
    assert np.all(np.abs(exact) < 0.2 * se), (exact, se)  # e_opt is negligible at this T

    if bug is not None:
        assert np.max(np.abs(t)) > REJECT_FACTOR * c, f"plant not caught: max|t|={t} vs c={c}"
        return
    assert np.max(np.abs(t)) < c, f"unbiased training not at the ML fit: t={t}, c={c:.2f}"
    iwae = _averaged_deviations(make_iwae_grad(gt.model, num_particles=S_IWAE), true, x, phi_star)
    bias_in_se = np.abs(iwae.mean(0)) / se
    assert np.max(bias_in_se) > REJECT_FACTOR * c, f"IWAE-{S_IWAE} bias not visible: {bias_in_se}"


# ------------------------------------------------------------------------------------------------
# Quadrature VAE
# ------------------------------------------------------------------------------------------------


def _vae(data_dir, num=4, hidden=8):
    x = jnp.asarray(G.downsampled_binarized_mnist(num, data_dir))
    grid = G.uniform_grid(2, 100, 5.0)
    gt = G.grid_vae(grid)
    params = G.grid_vae_init(jax.random.key(0), x.shape[1], 2, hidden)
    return gt, params, x, grid


def _posterior_proposal(params, x, grid):
    """Mean and covariance of p(z | x) by quadrature, for a wide Gaussian IS proposal."""
    logits = G._mlp(params["decoder"], grid.z)
    table = x @ logits.T - jnp.sum(jax.nn.softplus(logits), -1) + grid.log_w
    w = jax.nn.softmax(table)
    mean = w @ grid.z
    cov = jnp.einsum("g,gi,gj->ij", w, grid.z - mean, grid.z - mean)
    return mean, cov


@pytest.mark.slow
def test_quadrature_matches_importance_sampling(data_dir):
    r"""Grid log p(x) and its gradient against K-sample importance sampling, within SE.

    Proposal r(z) = N(mu, (1.5)^2 Sigma) with the posterior moments from the grid (only the
    proposal uses the grid; the IS estimate is unbiased for p(x) whatever r). log p_hat =
    log mean_k w_k with SE sd(w) / (mean(w) sqrt(K)) (delta method); the gradient is the
    self-normalised sum_k wbar_k grad_theta log p(x | z_k), SE from its linearisation
    sqrt(sum_k wbar_k^2 (g_k - g_hat)^2) (decoder parameters, first 10^4 draws). Both must
    agree with the grid within the Bonferroni bound (family-wise 1e-3) in z-score; the grid at
    n = 100 vs 200 points per axis differs by less than 1e-3 nats.
    """
    gt, params, x, grid = _vae(data_dir)  # binarized MNIST: not shipped, skipped without it
    K, KG = 100_000, 10_000
    ll_grid = np.asarray(gt.log_likelihood(params, x))
    fine = G.uniform_grid(2, 200, 5.0)
    assert G.grid_resolution_gap(params, x, grid, fine) < 1e-3

    def grid_grad(xi):
        return jax.grad(lambda d: G.grid_vae_log_likelihood({"decoder": d}, xi[None], grid)[0])(
            params["decoder"]
        )

    @jax.jit
    def draws(xi, key):
        """(K,) log weights and the (KG, P) decoder gradients of log p(x, z_k) on the first KG."""
        mean, cov = _posterior_proposal(params, xi, grid)
        cov = 1.5**2 * cov
        z = jax.random.multivariate_normal(key, mean, cov, (K,))
        log_r = jax.scipy.stats.multivariate_normal.logpdf(z, mean, cov)
        lw = jax.vmap(gt.model.log_joint, (None, None, 0))(params, xi, z) - log_r
        dec_grad = jax.grad(lambda d, zz: gt.model.log_joint({"decoder": d}, xi, zz))
        g = jax.vmap(dec_grad, (None, 0))(params["decoder"], z[:KG])
        g = jnp.concatenate([a.reshape(KG, -1) for a in jax.tree.leaves(g)], 1)
        exact = jax.grad(lambda d: G.grid_vae_log_likelihood({"decoder": d}, xi[None], grid)[0])(
            params["decoder"]
        )
        return lw, g, jnp.concatenate([a.ravel() for a in jax.tree.leaves(exact)])

    zs_ll, zs_grad = [], []
    for i, xi in enumerate(x):
        lw, g, exact = (np.asarray(a, np.float64) for a in draws(xi, jax.random.key(100 + i)))
        w = np.exp(lw - lw.max())
        ll_is = lw.max() + np.log(w.mean())
        se_ll = w.std() / (w.mean() * np.sqrt(K))
        zs_ll.append((ll_is - ll_grid[i]) / se_ll)
        wbar = w[:KG] / w[:KG].sum()
        g_is = wbar @ g
        se_g = np.sqrt((wbar**2) @ (g - g_is) ** 2)
        zs_grad.append((g_is - exact) / se_g)
    zs_grad = np.concatenate(zs_grad)
    c_ll = stats.norm.isf(1e-3 / (2 * len(zs_ll)))
    c_grad = stats.norm.isf(1e-3 / (2 * zs_grad.size))
    assert np.max(np.abs(zs_ll)) < c_ll, zs_ll
    assert np.max(np.abs(zs_grad)) < c_grad, np.max(np.abs(zs_grad))


# ------------------------------------------------------------------------------------------------
# Logistic factor model (1-D latent, linear decoder): exact ML fit by quadrature
# ------------------------------------------------------------------------------------------------

# 100 images: with 40 a pixel is separable by z and the ML fit runs off to ||W|| = infinity.
LFA_N, LFA_SEEDS, LFA_STEPS, LFA_LR = 100, 8, 600, 0.02


def _lfa_deviations(estimator, start, x, ref, seeds):
    """(R, 2): (||W||^2, mean b) of each seed's Polyak-averaged decoder minus the ML fit's."""
    opt = optax.sgd(G.robbins_monro(LFA_LR))

    def one(key):
        return G.fit(estimator, start, x, opt, LFA_STEPS, key, record_every=LFA_STEPS).averaged

    averaged = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), seeds))

    def identified(dec):  # invariant under z -> -z (W -> -W), the model's only symmetry
        return jnp.stack([jnp.sum(dec[0]["w"] ** 2, axis=(-2, -1)), jnp.mean(dec[0]["b"], -1)], -1)

    return np.asarray(identified(averaged["decoder"]), np.float64) - np.asarray(
        identified(ref["decoder"]), np.float64
    )


@pytest.mark.slow
@pytest.mark.parametrize("bug", [None, "no_correction"])
def test_lfa_unbiased_training_stays_at_ml_fit_and_iwae_leaves_it(bug, data_dir, monkeypatch):
    r"""The 1-D-latent logistic factor model on real images: the same check as the pPCA test.

    Set-up: the first 100 statically binarized MNIST images OR-pooled to 7x7 (pixels that vary),
    decoder logits W z + b, proposal N(mu_phi(x), 1) (fixed width: it cannot match posteriors of
    std ~0.2-0.5), exact log p(x) on a 100-point grid over [-6, 6]. The ML fit theta* is the
    exact-gradient run (full-batch Adam, Robbins-Monro step, 6,000 steps: its exact gradient is
    checked to vanish). From theta* each method runs 600 full-batch SGD steps with the step
    LFA_LR / (1 + t/100)^0.6, R = 8 seeds, and the Polyak average of the last half: SGD, the
    Robbins-Monro setting of the derivation (Adam's averaged iterates were 8-16x noisier here).

    Threshold, as for pPCA: the identified quantities (||W||^2, mean b) of each seed's averaged
    iterate minus theta*'s are i.i.d. across seeds with mean e_opt (the exact-gradient run from
    theta*, asserted below a fifth of the noise SE) if the gradients are unbiased, so
    max_j |t_j| < t_{R-1}^{-1}(1 - ALPHA / 4) holds with probability >= 1 - ALPHA. IWAE-2, whose
    fixed point maximises its bound, must exceed REJECT_FACTOR times that bound; so must the
    planted bias (H_{0:0} without its correction sum).
    """
    x = G.downsampled_binarized_mnist(LFA_N, data_dir, size=7)
    mean = x.mean(0)
    x = jnp.asarray(x[:, (mean > 0) & (mean < 1)])
    gt = G.grid_vae(G.uniform_grid(1, 100, 6.0), proposal_std=1.0)
    exact = G.make_exact_grad(gt)
    init = G.grid_vae_init(jax.random.key(0), x.shape[1], 1, 0, 16)
    opt = optax.adam(G.robbins_monro(0.05, 500.0))
    ml = G.fit(exact, init, x, opt, 6000, jax.random.key(1), record_every=6000).params
    g, _ = exact(ml, x)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g["decoder"])) < 1e-3

    c = float(stats.t.isf(ALPHA / 4, LFA_SEEDS - 1))
    e_opt = _lfa_deviations(exact, ml, x, ml, seeds=1)[0]
    if bug == "no_correction":
        _plant_no_correction(monkeypatch)
    unbiased = make_unbiased_grad(
        gt.model, num_particles=S_UNBIASED, loop=LoopOptions(num_slots=10)
    )
    dev = _lfa_deviations(unbiased, ml, x, ml, LFA_SEEDS)
    se = dev.std(0, ddof=1) / np.sqrt(LFA_SEEDS)
    t = dev.mean(0) / se
    assert np.all(np.abs(e_opt) < 0.2 * se), (e_opt, se)
    if bug is not None:
        assert np.max(np.abs(t)) > REJECT_FACTOR * c, f"plant not caught: t={t} vs c={c:.2f}"
        return
    assert np.max(np.abs(t)) < c, f"unbiased training left the ML fit: t={t}, c={c:.2f}"
    iwae = _lfa_deviations(make_iwae_grad(gt.model, num_particles=S_IWAE), ml, x, ml, LFA_SEEDS)
    bias_in_se = np.abs(iwae.mean(0)) / se
    assert np.max(bias_in_se) > REJECT_FACTOR * c, f"IWAE-{S_IWAE} bias not visible: {bias_in_se}"


def test_grid_vae_options_are_validated_and_shaped():
    """A linear decoder (hidden = 0) and a fixed-width proposal: shapes, and bad values named."""
    p = G.grid_vae_init(jax.random.key(0), 6, 1, 0, 4)
    assert [layer["w"].shape for layer in p["decoder"]] == [(1, 6)]
    assert [layer["w"].shape for layer in p["encoder"]] == [(6, 4), (4, 2)]
    gt = G.grid_vae(G.uniform_grid(1, 50, 6.0), proposal_std=0.5)
    x = jnp.ones((6,))
    z = gt.model.sample_proposal(p, x, jax.random.key(1), 2000)
    assert abs(float(jnp.std(z)) - 0.5) < 0.05
    with pytest.raises(ValueError, match="proposal_std"):
        G.grid_vae(G.uniform_grid(1, 50, 6.0), proposal_std=0.0)
    with pytest.raises(ValueError, match="hidden"):
        G.grid_vae_init(jax.random.key(0), 6, 1, -1)


def test_deep_decoder_grid_and_weight_decay():
    """A 1-D latent with a two-hidden-layer decoder (1-16-16-P): the 400-point grid log p(x)
    agrees with a 4x finer grid and, within 5 SE, with prior-proposal importance sampling; the
    penalised exact gradient is the gradient of the MAP objective log p - lambda/2 ||theta||^2
    (so an unbiased estimator plus the penalty's exact gradient stays unbiased for it)."""
    P, B, K, lam = 12, 6, 4_000, 0.01
    grid, fine = G.uniform_grid(1, 400, 6.0), G.uniform_grid(1, 1600, 6.0)
    gt = G.grid_vae(grid, proposal_std=1.0)

    @jax.jit
    def compute(key):
        k1, k2, k3 = jax.random.split(key, 3)
        p = G.grid_vae_init(k1, P, 1, (16, 16), 8)
        x = (jax.random.uniform(k2, (B, P)) < 0.4).astype(jnp.float32)
        z = jax.random.normal(k3, (K, 1))
        # log p(x | z) at prior draws: the prior is the proposal
        lw = jax.vmap(lambda xi: jax.vmap(lambda zk: gt.model.log_joint(p, xi, zk))(z))(x)
        lw = lw + 0.5 * z[:, 0] ** 2 + 0.5 * jnp.log(2 * jnp.pi)
        fine_ll = G.grid_vae_log_likelihood(p, x, fine)
        grads, _ = G.with_weight_decay(G.make_exact_grad(gt), lam)(p, x, None)
        want = jax.grad(lambda q: -G.map_objective(gt, q, x, lam))(p)
        return p, gt.log_likelihood(p, x), fine_ll, lw, grads, want

    p, ll, fine_ll, lw, grads, want = compute(jax.random.key(3))
    assert [layer["w"].shape for layer in p["decoder"]] == [(1, 16), (16, 16), (16, P)]
    assert float(jnp.max(jnp.abs(ll - fine_ll))) < 1e-4
    lw = np.asarray(lw, np.float64)
    w = np.exp(lw - lw.max(1, keepdims=True))
    ll_is = lw.max(1) + np.log(w.mean(1))
    se = w.std(1) / (w.mean(1) * np.sqrt(K))
    assert np.all(np.abs(ll_is - np.asarray(ll)) < 5 * se + 1e-5), (ll_is - ll, se)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(float(jnp.max(jnp.abs(a))) == 0 for a in jax.tree.leaves(grads["encoder"]))
    with pytest.raises(ValueError, match="weight_decay"):
        G.with_weight_decay(G.make_exact_grad(gt), -1.0)
    with pytest.raises(ValueError, match="hidden"):
        G.grid_vae_init(jax.random.key(0), 6, 1, (16, 0))
