r"""Models whose log-likelihood and maximum-likelihood fit are known exactly.

Two ground truths against which every gradient estimator can be judged by what it converges to:

1. **Probabilistic PCA** (Tipping & Bishop, 1999): z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D), so

   .. math:: \log p_\theta(x) = \log \mathcal N(x;\, b,\, W W^\top + s^2 I_D)

   in closed form, and so is the maximum-likelihood fit on data x_1..N with sample mean \bar x and
   sample covariance C = (1/N) \sum_i (x_i - \bar x)(x_i - \bar x)^\top, eigenvalues
   \lambda_1 >= ... >= \lambda_D, eigenvectors U:

   .. math:: b^* = \bar x, \quad s^{2*} = \frac{1}{D-d}\sum_{j>d}\lambda_j, \quad
             W^* = U_d (\Lambda_d - s^{2*} I_d)^{1/2} R

   for any rotation R (W is identified only through W W^\top). The proposal is deliberately
   unable to match the posterior: the prior itself (q(z|x) = N(0, I_d)) or a fixed-variance
   amortised encoder q(z|x) = N(A x + c, \sigma_0^2 I_d) with \sigma_0 fixed. Bound-based training
   (ELBO, IWAE-S) then converges to a different fit; an unbiased estimator of
   :math:`\nabla_\theta \log p_\theta(x)` has the ML fit as its stochastic-approximation fixed
   point.

2. **A VAE with a 2-D (or 1-D) latent** and a Bernoulli MLP decoder, whose

   .. math:: \log p_\theta(x) \approx \operatorname{logsumexp}_g \big[\log p_\theta(x | z_g)
             + \log \mathcal N(z_g; 0, I) + d \log h\big]

   is computed by the midpoint rule on a uniform grid z_g of spacing h over [-L, L]^d (spectrally
   accurate for smooth integrands, so its error is below float32 rounding once h is smaller than
   the posterior's width; :func:`grid_resolution_gap` measures it), and the exact gradient is
   ``jax.grad`` of the same expression.

Every exact gradient here follows the estimators' convention: ``grads`` has the structure of
``params`` and holds the gradient of the LOSS :math:`-(1/B) \sum_i \log p_\theta(x_i)` (zeros on the
parameters only the proposal reads), so ``make_exact_grad(...)`` plugs in wherever an estimator
does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vaeml_jax.models.interface import LatentVariableModel

__all__ = [
    "GroundTruth",
    "make_exact_grad",
    "exact_log_likelihood",
    "ppca",
    "ppca_init",
    "ppca_sample",
    "ppca_posterior_mean_map",
    "ppca_log_likelihood",
    "ppca_ml_fit",
    "ppca_identifiable",
    "ppca_distance",
    "QuadratureGrid",
    "uniform_grid",
    "grid_vae",
    "grid_vae_init",
    "grid_vae_log_likelihood",
    "grid_resolution_gap",
    "decoder_sq_norm",
    "with_weight_decay",
    "map_objective",
    "downsampled_binarized_mnist",
    "FitResult",
    "fit",
    "robbins_monro",
]

Array = jax.Array
Params = Any
_LOG_2PI = math.log(2 * math.pi)


class GroundTruth(NamedTuple):
    r"""A latent-variable model together with its exact log-likelihood.

    Attributes:
      model: the :class:`~vaeml_jax.LatentVariableModel` the estimators see.
      log_likelihood: ``(params, x) -> (B,)``, the exact :math:`\log p_\theta(x_i)` of a batch
        x (B, D).
      name: a short label.
    """

    model: LatentVariableModel
    log_likelihood: Callable[[Params, Array], Array]
    name: str


def exact_log_likelihood(ground_truth: GroundTruth, params: Params, x: Array) -> Array:
    r"""Mean exact log-likelihood per datapoint, :math:`(1/B) \sum_i \log p_\theta(x_i)`: a
    scalar."""
    return jnp.mean(ground_truth.log_likelihood(params, x))


def make_exact_grad(ground_truth: GroundTruth) -> Callable[..., tuple[Any, dict]]:
    r"""The exact gradient behind the estimators' interface: ``grads, info = fn(params, x, key)``.

    :math:`\text{grads} = \nabla_\text{params} [-(1/B) \sum_i \log p_\theta(x_i)]` with the
    structure of ``params`` (zeros on the proposal's parameters, which :math:`\log p_\theta(x)`
    does not read); ``key`` is ignored. ``info`` holds ``bound`` (B,), the exact
    :math:`\log p_\theta(x_i)`, and, for a uniform interface, ``meeting_time``/``num_iters``/
    ``capped`` (B, 1) zeros and ``num_log_joint_evals`` 0.
    """

    def exact_grad(params, x, key=None):
        del key

        def loss(p):
            ll = ground_truth.log_likelihood(p, x)
            return -jnp.mean(ll), ll

        grads, ll = jax.grad(loss, has_aux=True)(params)
        batch = x.shape[0]
        info = {
            "bound": jax.lax.stop_gradient(ll),
            "meeting_time": jnp.zeros((batch, 1), jnp.int32),
            "num_iters": jnp.zeros((batch, 1), jnp.int32),
            "capped": jnp.zeros((batch, 1), bool),
            "num_log_joint_evals": jnp.zeros((), jnp.int32),
        }
        return grads, info

    return exact_grad


# ------------------------------------------------------------------------------------------------
# Probabilistic PCA
# ------------------------------------------------------------------------------------------------


def _normal_logpdf(x, mean, std):
    return jnp.sum(-0.5 * ((x - mean) / std) ** 2 - jnp.log(std) - 0.5 * _LOG_2PI)


def ppca(
    data_dim: int, latent_dim: int, proposal: str = "prior", sigma0: float = 1.0
) -> GroundTruth:
    r"""Probabilistic PCA with a proposal that cannot match the posterior.

    params = ``{"decoder": {"W": (D, d), "b": (D,), "log_s": ()}, "encoder": {...}}`` with
    ``encoder`` = ``{}`` for ``proposal="prior"`` (q(z|x) = N(0, I_d)) and ``{"A": (d, D),
    "c": (d,)}`` for ``proposal="fixed_encoder"`` (q(z|x) = N(A x + c, \sigma_0^2 I_d), \sigma_0
    fixed; the posterior's variance (I + W^\top W / s^2)^{-1} is not \sigma_0^2 I in general).

    Args:
      data_dim: D.
      latent_dim: d < D.
      proposal: ``"prior"`` or ``"fixed_encoder"``.
      sigma0: the encoder's fixed standard deviation (``"fixed_encoder"`` only).

    Returns:
      A :class:`GroundTruth` whose ``log_likelihood(params, x)`` is \log N(x_i; b, W W^\top + s^2 I)
      for each row of x (B, D).
    """
    if not 0 < latent_dim < data_dim:
        raise ValueError(f"need 0 < latent_dim < data_dim, got d={latent_dim}, D={data_dim}.")
    if proposal not in ("prior", "fixed_encoder"):
        raise ValueError(f"proposal must be 'prior' or 'fixed_encoder', got {proposal!r}.")
    d = latent_dim

    def log_joint(params, x, z):
        dec = params["decoder"]
        s = jnp.exp(dec["log_s"])
        return _normal_logpdf(z, 0.0, 1.0) + _normal_logpdf(x, dec["W"] @ z + dec["b"], s)

    def _mean(params, x):
        if proposal == "prior":
            return jnp.zeros((d,), x.dtype)
        enc = params["encoder"]
        return enc["A"] @ x + enc["c"]

    std = 1.0 if proposal == "prior" else float(sigma0)

    def sample_proposal(params, x, key, num):
        mean = _mean(params, x)
        return mean + std * jax.random.normal(key, (num, d), x.dtype)

    def log_proposal(params, x, z):
        return _normal_logpdf(z, _mean(params, x), std)

    model = LatentVariableModel(log_joint, sample_proposal, log_proposal)
    return GroundTruth(model, ppca_log_likelihood, f"ppca[{proposal}]")


def ppca_init(
    key: Array,
    data_dim: int,
    latent_dim: int,
    noise_std: float = 1.0,
    weight_scale: float = 1.0,
    proposal: str = "prior",
) -> Params:
    """Parameters of :func:`ppca`: W ~ weight_scale * N(0, 1), b ~ N(0, 1), s = noise_std; the
    encoder (``"fixed_encoder"``) at the exact posterior mean map of that decoder,
    A = (I + W^T W / s^2)^{-1} W^T / s^2, c = -A b (its variance sigma0^2 stays wrong)."""
    kw, kb = jax.random.split(key)
    dec = {
        "W": weight_scale * jax.random.normal(kw, (data_dim, latent_dim)),
        "b": jax.random.normal(kb, (data_dim,)),
        "log_s": jnp.asarray(math.log(noise_std), jnp.float32),
    }
    enc = {}
    if proposal == "fixed_encoder":
        A = ppca_posterior_mean_map(dec)
        enc = {"A": A, "c": -A @ dec["b"]}
    return {"decoder": dec, "encoder": enc}


def ppca_posterior_mean_map(decoder: Params) -> Array:
    r"""A (d, D) with E[z | x] = A (x - b): A = (I_d + W^\top W / s^2)^{-1} W^\top / s^2."""
    W, s2 = decoder["W"], jnp.exp(2 * decoder["log_s"])
    precision = jnp.eye(W.shape[1], dtype=W.dtype) + W.T @ W / s2
    return jnp.linalg.solve(precision, W.T / s2)


def ppca_sample(key: Array, params: Params, num: int) -> Array:
    """``num`` draws x = W z + b + s * eps from the model, (num, D)."""
    dec = params["decoder"]
    kz, ke = jax.random.split(key)
    D, d = dec["W"].shape
    z = jax.random.normal(kz, (num, d))
    return z @ dec["W"].T + dec["b"] + jnp.exp(dec["log_s"]) * jax.random.normal(ke, (num, D))


def ppca_log_likelihood(params: Params, x: Array) -> Array:
    r"""Exact :math:`\log p_\theta(x_i) = \log N(x_i; b, W W^\top + s^2 I_D)` for x (B, D): (B,)."""
    dec = params["decoder"]
    W, b = dec["W"], dec["b"]
    D = W.shape[0]
    cov = W @ W.T + jnp.exp(2 * dec["log_s"]) * jnp.eye(D, dtype=W.dtype)
    chol = jnp.linalg.cholesky(cov)
    r = jax.scipy.linalg.solve_triangular(chol, (x - b).T, lower=True)  # (D, B)
    logdet = 2 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (jnp.sum(r**2, axis=0) + logdet + D * _LOG_2PI)


def ppca_ml_fit(x: Array | np.ndarray, latent_dim: int) -> dict:
    r"""The closed-form maximum-likelihood fit (Tipping & Bishop 1999) of pPCA to data x (N, D).

    Returns a dict with ``W`` (D, d) = U_d (\Lambda_d - s^2 I)^{1/2} (the rotation R = I),
    ``b`` (D,) the sample mean, ``log_s`` () with s^2 the mean of the D - d discarded eigenvalues
    of the 1/N sample covariance, ``s2``, ``WWt`` (D, D), ``eigenvalues`` (D,) descending, and
    ``log_likelihood``, the maximal mean log-likelihood per datapoint. Computed in float64 numpy.
    """
    x = np.asarray(x, np.float64)
    N, D = x.shape
    d = int(latent_dim)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / N
    lam, U = np.linalg.eigh(cov)
    lam, U = lam[::-1], U[:, ::-1]
    s2 = float(lam[d:].mean())
    W = U[:, :d] * np.sqrt(np.maximum(lam[:d] - s2, 0.0))
    model_cov = W @ W.T + s2 * np.eye(D)
    _, logdet = np.linalg.slogdet(model_cov)
    ll = -0.5 * (D * _LOG_2PI + logdet + np.trace(np.linalg.solve(model_cov, cov)))
    return {
        "W": W,
        "b": mean,
        "log_s": 0.5 * math.log(s2),
        "s2": s2,
        "WWt": W @ W.T,
        "eigenvalues": lam,
        "log_likelihood": float(ll),
    }


def ppca_identifiable(params: Params) -> Array:
    r"""The identified quantities of a pPCA fit as one vector (1 + d + D,):

    (s^2, the d nonzero eigenvalues of W W^\top in descending order, b). W itself is identified
    only up to a rotation; these are rotation-invariant, and together with the principal subspace
    (measured by :func:`ppca_distance`) they determine the fitted Gaussian N(b, W W^\top + s^2 I).
    """
    dec = params["decoder"]
    W = dec["W"]
    ev = jnp.linalg.eigvalsh(W.T @ W)[::-1]  # the nonzero eigenvalues of W W^T
    return jnp.concatenate([jnp.exp(2 * dec["log_s"])[None], ev, dec["b"]])


def ppca_distance(params: Params, fit: dict, x: Array) -> dict:
    r"""Distances of a pPCA fit to the ML fit ``fit`` (from :func:`ppca_ml_fit` on the same x).

    Returns scalars:
      ``loglik_gap``: \ell(\theta^*) - \ell(\theta) >= 0, mean log-likelihood per datapoint;
      ``WWt``: ||W W^\top - W^* W^{*\top}||_F; ``b``: ||b - b^*||_2; ``s2``: s^2 - s^{2*} (signed);
      ``param``: the Euclidean norm of the three stacked (the distance on identified quantities).
    """
    dec = params["decoder"]
    W = dec["W"]
    dWW = jnp.linalg.norm(W @ W.T - jnp.asarray(fit["WWt"], W.dtype))
    db = jnp.linalg.norm(dec["b"] - jnp.asarray(fit["b"], W.dtype))
    ds2 = jnp.exp(2 * dec["log_s"]) - fit["s2"]
    ll = jnp.mean(ppca_log_likelihood(params, x))
    return {
        "loglik_gap": fit["log_likelihood"] - ll,
        "WWt": dWW,
        "b": db,
        "s2": ds2,
        "param": jnp.sqrt(dWW**2 + db**2 + ds2**2),
    }


# ------------------------------------------------------------------------------------------------
# Low-dimensional-latent VAE with quadrature
# ------------------------------------------------------------------------------------------------


class QuadratureGrid(NamedTuple):
    r"""Nodes ``z`` (G, d), log weights ``log_w`` (G,): \sum_g w_g f(z_g) ~= E_{N(0, I)}[f]."""

    z: Array
    log_w: Array


def uniform_grid(
    latent_dim: int = 2, num_per_axis: int = 100, half_width: float = 5.0
) -> QuadratureGrid:
    r"""Midpoint rule on [-L, L]^d with n points per axis, weighted by the prior density.

    Nodes z_g = -L + (i + 1/2) h per axis, h = 2L/n; \log w_g = \log N(z_g; 0, I_d) + d \log h.
    The prior mass outside the box (2d \Phi(-L); 5.7e-7 per axis for L = 5) is dropped.

    Returns:
      A :class:`QuadratureGrid` with G = n^d nodes.
    """
    h = 2.0 * half_width / num_per_axis
    axis = -half_width + (jnp.arange(num_per_axis) + 0.5) * h
    mesh = jnp.meshgrid(*([axis] * latent_dim), indexing="ij")
    z = jnp.stack([m.reshape(-1) for m in mesh], axis=-1)
    log_w = -0.5 * jnp.sum(z**2, -1) - 0.5 * latent_dim * _LOG_2PI + latent_dim * math.log(h)
    return QuadratureGrid(z, log_w)


def _mlp(layers, h):
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return h


def grid_vae(grid: QuadratureGrid, proposal_std: float | None = None) -> GroundTruth:
    r"""A VAE with a low-dimensional latent whose log-likelihood is exact by quadrature.

    :math:`p(z) = N(0, I_d)`; :math:`p_\theta(x | z) = \prod_j \text{Bernoulli}(x_j;
    \sigma(f_\theta(z)_j))` with f an MLP (tanh hidden layers); :math:`q_\phi(z | x) =
    N(\mu_\phi(x), \text{diag}\, \sigma_\phi(x)^2)`, an MLP emitting :math:`(\mu, \log\sigma)`.
    params = ``{"decoder": [layers], "encoder": [layers]}``, each layer
    ``{"w", "b"}`` (see :func:`grid_vae_init`).

    ``proposal_std`` = sigma0 fixes \sigma_\phi(x) = sigma0 (the encoder's log-sigma output is
    ignored): a proposal that cannot match posteriors narrower than sigma0, so that the bounds'
    bias is visible (as with pPCA's fixed-variance encoder).

    ``log_likelihood(params, x)`` for x (B, D) binary is
    logsumexp_g [x \cdot f(z_g) - \sum_j softplus(f(z_g)_j) + \log w_g]: the decoder runs once on
    the G grid nodes and the B x G likelihood table is one matmul.
    """

    def log_joint(params, x, z):
        logits = _mlp(params["decoder"], z)
        lik = jnp.sum(x * logits - jax.nn.softplus(logits))
        return lik - 0.5 * jnp.sum(z**2) - 0.5 * z.shape[-1] * _LOG_2PI

    if proposal_std is not None and not proposal_std > 0:
        raise ValueError(f"proposal_std must be > 0 (or None: learned), got {proposal_std}.")

    def _q(params, x):
        out = _mlp(params["encoder"], x)
        d = out.shape[-1] // 2
        if proposal_std is not None:
            return out[:d], jnp.full_like(out[d:], math.log(proposal_std))
        return out[:d], out[d:]

    def sample_proposal(params, x, key, num):
        mean, log_sigma = _q(params, x)
        eps = jax.random.normal(key, (num,) + mean.shape, mean.dtype)
        return mean + jnp.exp(log_sigma) * eps

    def log_proposal(params, x, z):
        mean, log_sigma = _q(params, x)
        return _normal_logpdf(z, mean, jnp.exp(log_sigma))

    def log_likelihood(params, x):
        return grid_vae_log_likelihood(params, x, grid)

    model = LatentVariableModel(log_joint, sample_proposal, log_proposal)
    q = "" if proposal_std is None else f", sigma0={proposal_std:g}"
    return GroundTruth(
        model, log_likelihood, f"grid_vae[d={grid.z.shape[-1]}, G={grid.z.shape[0]}{q}]"
    )


def grid_vae_init(
    key: Array,
    data_dim: int,
    latent_dim: int = 2,
    hidden: int | Sequence[int] = 64,
    encoder_hidden: int | None = None,
) -> Params:
    """Glorot-normal MLPs for :func:`grid_vae`: decoder d -> hidden -> D, encoder
    D -> encoder_hidden -> 2d (default the first hidden width, or 32 when ``hidden = 0``); biases
    zero except the encoder's log-sigma bias at -1 (q starts narrower than the prior).

    ``hidden = 0`` makes the decoder linear, logits = W z + b: a logistic factor model, whose
    maximum-likelihood problem on a few hundred images is well posed (an MLP decoder keeps raising
    log p(x) for >10^4 steps as it memorises the images, so "the optimum" is never reached).
    A sequence of widths, e.g. ``(16, 16)``, gives a decoder with that many tanh hidden layers
    (d -> 16 -> 16 -> D); its maximum-likelihood problem needs a penalty to have a finite optimum
    (:func:`with_weight_decay`).
    """
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if not widths or any(h < 0 for h in widths) or (len(widths) > 1 and 0 in widths):
        raise ValueError(
            f"hidden must be >= 0 (0: a linear decoder) or a sequence of widths >= 1, got {hidden}."
        )
    widths = tuple(h for h in widths if h)
    enc_hidden = encoder_hidden if encoder_hidden is not None else (widths[0] if widths else 32)

    def layer(k, n_in, n_out):
        return {
            "w": jax.random.normal(k, (n_in, n_out)) * math.sqrt(2.0 / (n_in + n_out)),
            "b": jnp.zeros((n_out,)),
        }

    k = jax.random.split(key, 4)
    if len(widths) == 1:
        dec = [layer(k[0], latent_dim, widths[0]), layer(k[1], widths[0], data_dim)]
    elif not widths:
        dec = [layer(k[1], latent_dim, data_dim)]
    else:  # more hidden layers: keys of their own (the one- and zero-layer keys stay as they were)
        sizes = (latent_dim, *widths, data_dim)
        kd = jax.random.split(k[0], len(sizes) - 1)
        dec = [layer(kd[i], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)]
    enc = [layer(k[2], data_dim, enc_hidden), layer(k[3], enc_hidden, 2 * latent_dim)]
    enc[1]["b"] = enc[1]["b"].at[latent_dim:].set(-1.0)
    return {"decoder": dec, "encoder": enc}


def grid_vae_log_likelihood(params: Params, x: Array, grid: QuadratureGrid) -> Array:
    r""":math:`\log p_\theta(x_i)` by quadrature on ``grid`` for x (B, D) binary: (B,)."""
    logits = _mlp(params["decoder"], grid.z)  # (G, D)
    table = x @ logits.T - jnp.sum(jax.nn.softplus(logits), axis=-1)  # (B, G) log p(x_i | z_g)
    return jax.nn.logsumexp(table + grid.log_w, axis=-1)


def grid_resolution_gap(
    params: Params, x: Array, coarse: QuadratureGrid, fine: QuadratureGrid
) -> float:
    """The largest difference over i of log p(x_i) on ``fine`` and on ``coarse``, in nats: the
    quadrature error estimate of the coarse grid (the fine grid's own error being much smaller)."""
    a = grid_vae_log_likelihood(params, x, coarse)
    b = grid_vae_log_likelihood(params, x, fine)
    return float(jnp.max(jnp.abs(a - b)))


def decoder_sq_norm(params: Params) -> Array:
    r""":math:`\|\theta\|^2`, the squared Euclidean norm of every decoder parameter (weights and
    biases): a scalar."""
    return jnp.sum(jnp.stack([jnp.sum(a**2) for a in jax.tree.leaves(params["decoder"])]))


def map_objective(
    ground_truth: GroundTruth, params: Params, x: Array, weight_decay: float
) -> Array:
    r"""The penalised (MAP) objective per datapoint,
    :math:`(1/B) \sum_i \log p_\theta(x_i) - (\lambda/2) \|\theta\|^2`, \lambda =
    ``weight_decay``, \theta the decoder's parameters: a scalar."""
    return exact_log_likelihood(ground_truth, params, x) - 0.5 * weight_decay * decoder_sq_norm(
        params
    )


def with_weight_decay(estimator: Callable, weight_decay: float) -> Callable:
    r"""An estimator of the penalised loss :math:`-(1/B) \sum_i \log p_\theta(x_i) +
    (\lambda/2) \|\theta\|^2` (\theta the decoder's parameters) from one of the unpenalised
    loss: the penalty's exact gradient \lambda \theta is added to ``grads["decoder"]``.

    The penalty is known exactly, so an unbiased estimator stays unbiased for the penalised
    gradient and a biased one keeps its bias. A Gaussian prior N(0, 1/(N \lambda)) on \theta
    makes the penalised objective the log posterior per datapoint; with \lambda > 0 it tends to
    -infinity as \|\theta\| grows, so it has a finite maximiser even where the likelihood
    alone keeps growing (a deep decoder memorising a few hundred images).
    """
    lam = float(weight_decay)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"weight_decay must be a finite lambda >= 0, got {weight_decay}.")

    def penalised(params, x, key=None):
        grads, info = estimator(params, x, key)
        dec = jax.tree.map(
            lambda g, p: g + (lam * p).astype(g.dtype), grads["decoder"], params["decoder"]
        )
        return {**grads, "decoder": dec}, info

    return penalised


def downsampled_binarized_mnist(
    num_examples: int, data_dir=None, size: int = 14, split: str = "train"
) -> np.ndarray:
    """The first ``num_examples`` statically binarized MNIST images (Larochelle & Murray), pooled
    to size x size by a logical OR over (28/size)^2 blocks: (N, size^2) float32 in {0, 1}.

    Reads ``binarized_mnist`` through :func:`vaeml_jax.data.load_dataset` (``data_dir`` or
    ``$VAEML_DATA_DIR``; nothing is downloaded).
    """
    from vaeml_jax.data import load_dataset

    if 28 % size:
        raise ValueError(f"size must divide 28, got {size}.")
    ds = load_dataset("binarized_mnist", data_dir)
    x = getattr(ds, split)[:num_examples].reshape(-1, 28, 28)
    f = 28 // size
    x = x.reshape(-1, size, f, size, f).max(axis=(2, 4))
    return x.reshape(-1, size * size).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Training with iterate averaging
# ------------------------------------------------------------------------------------------------


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the last iterate theta_T.
      averaged: the Polyak-Ruppert average (1/(T - T_0)) \\sum_{t > T_0} theta_t (``average_from``
        = T_0), or theta_T when T_0 >= T.
      trace: ``record(params)`` (and ``record(averaged so far)`` under keys prefixed ``avg_``)
        every ``record_every`` steps: a dict of (T // record_every,) arrays; step t of row r is
        (r + 1) * record_every.
      mean_meeting_time: (T,) the batch-mean meeting time of each step (0 for estimators without
        chains); ``max_meeting_time`` (T,) the batch max.
      log_joint_evals: () total ``log_joint`` evaluations executed.
    """

    params: Params
    averaged: Params
    trace: dict
    mean_meeting_time: Array
    max_meeting_time: Array
    log_joint_evals: Array


def robbins_monro(
    lr: float, decay_steps: float = 100.0, power: float = 0.6
) -> Callable[[Any], Any]:
    r"""The step-size schedule \gamma_t = lr / (1 + t / t_0)^\kappa, \kappa = ``power``.

    For 1/2 < \kappa <= 1, \sum_t \gamma_t = \infty and \sum_t \gamma_t^2 < \infty (Robbins-Monro):
    SGD with unbiased gradients converges to a stationary point of \log p, and with \kappa < 1 the
    Polyak-Ruppert average attains the optimal 1/T covariance (Polyak & Juditsky 1992).
    """
    return lambda t: lr / (1.0 + t / decay_steps) ** power


def fit(
    estimator: Callable,
    params: Params,
    x: Array,
    optimizer,
    num_steps: int,
    key: Array,
    *,
    batch_size: int | None = None,
    average_from: int | None = None,
    record: Callable[[Params], dict] | None = None,
    record_every: int = 1,
) -> FitResult:
    r"""Train ``params`` on data x (N, ...) with ``grads, info = estimator(params, x_batch, key)``.

    One ``lax.scan`` over steps (jit- and vmap-able: vmap over ``key`` for seeds). Each step draws
    a minibatch of ``batch_size`` examples without replacement (None: the whole data set, so the
    only randomness is the estimator's), takes one ``optimizer`` (optax) step on ``grads``, and
    updates the running Polyak average of the iterates after step ``average_from``
    (default num_steps // 2; tail averaging).

    Args:
      estimator: any estimator of this library, or :func:`make_exact_grad`.
      params: initial parameters.
      x: the data set, (N, ...).
      optimizer: an ``optax.GradientTransformation``.
      num_steps: T, a multiple of ``record_every``.
      key: the run's PRNG key.
      batch_size: B <= N, or None for N.
      average_from: T_0, the number of steps before averaging starts.
      record: ``params -> dict of scalars``, evaluated every ``record_every`` steps on the iterate
        and on the running average.
      record_every: the recording period.

    Returns:
      A :class:`FitResult`.
    """
    n = x.shape[0]
    if num_steps % record_every:
        raise ValueError(
            f"num_steps={num_steps} must be a multiple of record_every={record_every}."
        )
    t0 = num_steps // 2 if average_from is None else int(average_from)
    record = record if record is not None else (lambda p: {})

    def step(carry, k):
        p, state, avg, t = carry
        kb, ke = jax.random.split(k)
        xb = x if batch_size is None else x[jax.random.permutation(kb, n)[:batch_size]]
        grads, info = estimator(p, xb, ke)
        updates, state = optimizer.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u.astype(a.dtype), p, updates)
        t = t + 1
        w = jnp.where(t > t0, 1.0 / jnp.maximum(t - t0, 1), 1.0)  # avg = theta_t until T_0
        avg = jax.tree.map(lambda a, b: a + (w * (b - a)).astype(a.dtype), avg, p)
        mt = jnp.asarray(info["meeting_time"], jnp.float32)
        out = (jnp.mean(mt), jnp.max(mt), jnp.asarray(info["num_log_joint_evals"], jnp.float32))
        return (p, state, avg, t), out

    def block(carry, keys):
        carry, outs = jax.lax.scan(step, carry, keys)
        rec = dict(record(carry[0]))
        rec.update({f"avg_{name}": v for name, v in record(carry[2]).items()})
        return carry, (rec, outs)

    keys = jax.random.split(key, num_steps).reshape(num_steps // record_every, record_every)
    carry0 = (params, optimizer.init(params), params, jnp.zeros((), jnp.int32))
    (p, _, avg, _), (trace, (mean_mt, max_mt, evals)) = jax.lax.scan(block, carry0, keys)
    return FitResult(
        p, avg, trace, mean_mt.reshape(-1), max_mt.reshape(-1), jnp.sum(evals.reshape(-1))
    )
