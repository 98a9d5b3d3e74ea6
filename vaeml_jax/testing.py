r"""Models with closed-form answers, for tests and for checking estimators.

The linear-Gaussian model  z ~ N(0, I_d),  x | z ~ N(W z + b, s^2 I_D)  has
p(x) = N(b, W W^T + s^2 I) and a Gaussian posterior, so \nabla_\theta \log p(x) and the inclusive-KL
gradient of a Gaussian proposal q(z|x) = N(A x + c, diag(sigma^2)) are exact.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from vaeml_jax.models.interface import LatentVariableModel

__all__ = [
    "linear_gaussian_model",
    "linear_gaussian_params",
    "linear_gaussian_log_marginal",
    "linear_gaussian_posterior",
    "linear_gaussian_inclusive_kl_grad",
    "linear_gaussian_log_second_moment",
]


def _normal_logpdf(x, mean, log_std):
    return jnp.sum(
        -0.5 * ((x - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    )


def linear_gaussian_model() -> LatentVariableModel:
    """The model; params = {"decoder": {W (D, d), b (D,), log_s ()},
    "encoder": {A (d, D), c (d,), log_sigma (d,)}}."""

    def log_joint(params, x, z):
        dec = params["decoder"]
        prior = _normal_logpdf(z, 0.0, jnp.zeros_like(z))
        lik = _normal_logpdf(x, dec["W"] @ z + dec["b"], jnp.broadcast_to(dec["log_s"], x.shape))
        return prior + lik

    def _q(params, x):
        enc = params["encoder"]
        return enc["A"] @ x + enc["c"], enc["log_sigma"]

    def sample_proposal(params, x, key, num):
        mean, log_sigma = _q(params, x)
        eps = jax.random.normal(key, (num,) + mean.shape, mean.dtype)
        return mean + jnp.exp(log_sigma) * eps

    def log_proposal(params, x, z):
        mean, log_sigma = _q(params, x)
        return _normal_logpdf(z, mean, log_sigma)

    return LatentVariableModel(log_joint, sample_proposal, log_proposal)


def linear_gaussian_params(
    key: jax.Array,
    data_dim: int = 3,
    latent_dim: int = 2,
    dtype: Any = jnp.float32,
    proposal_quality: float = 0.5,
) -> dict[str, dict[str, jax.Array]]:
    """Random decoder; an encoder equal to the exact posterior's mean map, perturbed.

    ``proposal_quality`` in [0, 1]: 1 gives the exact posterior mean and std (perfect proposal),
    0 a proposal that ignores x (the prior). Values in between interpolate.
    """
    kw, kb, kn = jax.random.split(key, 3)
    W = jax.random.normal(kw, (data_dim, latent_dim), dtype)
    b = 0.5 * jax.random.normal(kb, (data_dim,), dtype)
    log_s = jnp.asarray(math.log(0.8), dtype)
    dec = {"W": W, "b": b, "log_s": log_s}
    A_post, c_post, cov = _posterior_maps(dec)
    q = proposal_quality
    A = q * A_post + 0.1 * (1 - q) * jax.random.normal(kn, A_post.shape, dtype)
    c = q * c_post
    log_sigma = q * 0.5 * jnp.log(jnp.diag(cov)) + (1 - q) * jnp.zeros(latent_dim, dtype)
    return {"decoder": dec, "encoder": {"A": A, "c": c, "log_sigma": log_sigma.astype(dtype)}}


def _posterior_maps(dec):
    W, b, s2 = dec["W"], dec["b"], jnp.exp(2 * dec["log_s"])
    d = W.shape[1]
    precision = jnp.eye(d, dtype=W.dtype) + W.T @ W / s2
    cov = jnp.linalg.inv(precision)
    A = cov @ W.T / s2
    return A, -A @ b, cov


def linear_gaussian_posterior(params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean (d,) and covariance (d, d) of p(z | x)."""
    A, c, cov = _posterior_maps(params["decoder"])
    return A @ x + c, cov


def linear_gaussian_log_marginal(params: Any, x: jax.Array) -> jax.Array:
    """log p(x) = log N(x; b, W W^T + s^2 I) for one example x (D,)."""
    dec = params["decoder"]
    W, b, s2 = dec["W"], dec["b"], jnp.exp(2 * dec["log_s"])
    D = x.shape[0]
    cov = W @ W.T + s2 * jnp.eye(D, dtype=W.dtype)
    r = x - b
    _, logdet = jnp.linalg.slogdet(cov)
    return -0.5 * (r @ jnp.linalg.solve(cov, r) + logdet + D * math.log(2 * math.pi))


def linear_gaussian_inclusive_kl_grad(params: Any, x: jax.Array) -> Any:
    """Exact gradient in params["encoder"] of KL(p(z|x) || q(z|x)) = -E_post[log q] + const."""
    mean_p, cov_p = linear_gaussian_posterior(jax.lax.stop_gradient(params), x)

    def neg_expected_log_q(enc):
        mean_q = enc["A"] @ x + enc["c"]
        var_q = jnp.exp(2 * enc["log_sigma"])
        quad = (jnp.diag(cov_p) + (mean_p - mean_q) ** 2) / var_q
        return jnp.sum(0.5 * quad + enc["log_sigma"] + 0.5 * math.log(2 * math.pi))

    return jax.grad(neg_expected_log_q)(params["encoder"])


def linear_gaussian_log_second_moment(params: Any, x: jax.Array) -> jax.Array:
    r"""log E_q[w^2] = log \int p(x, z)^2 / q(z|x) dz in closed form, for one example x (D,).

    With p(z|x) = N(m_p, P) and q = N(m_q, Q): 2 log p(x) - log|P| + (1/2) log|Q|
    - m_p^T P^{-1} m_p + (1/2) m_q^T Q^{-1} m_q - (1/2) log|Lambda| + (1/2) eta^T Lambda^{-1} eta,
    Lambda = 2 P^{-1} - Q^{-1}, eta = 2 P^{-1} m_p - Q^{-1} m_q. Finite iff Lambda is positive
    definite (q not too narrow); returns NaN otherwise. Differentiable in params (the chi^2
    upper bound's exact gradient: the CUBO of Dieng et al. 2017 with n = 2).
    """
    m_p, P = linear_gaussian_posterior(params, x)
    enc = params["encoder"]
    m_q = enc["A"] @ x + enc["c"]
    q_var = jnp.exp(2 * enc["log_sigma"])
    P_inv = jnp.linalg.inv(P)
    Lam = 2 * P_inv - jnp.diag(1 / q_var)
    eta = 2 * P_inv @ m_p - m_q / q_var
    _, logdet_p = jnp.linalg.slogdet(P)
    sign_l, logdet_l = jnp.linalg.slogdet(Lam)
    out = (
        2 * linear_gaussian_log_marginal(params, x)
        - logdet_p
        + 0.5 * jnp.sum(jnp.log(q_var))
        - m_p @ P_inv @ m_p
        + 0.5 * jnp.sum(m_q**2 / q_var)
        - 0.5 * logdet_l
        + 0.5 * eta @ jnp.linalg.solve(Lam, eta)
    )
    pd = (sign_l > 0) & jnp.all(jnp.linalg.eigvalsh(Lam) > 0)
    return jnp.where(pd, out, jnp.nan)
