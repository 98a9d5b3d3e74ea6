r"""Richer proposals q(z|x) for :class:`vaeml_jax.models.VAE`: full-covariance Gaussian and IAF.

The estimators evaluate ``log q(z|x)`` at arbitrary particles (kept particles of the CIS chains,
draws of the other chain), not only at the draws of ``sample_proposal``, so every encoder here
provides both directions:

* ``sample(x, eps) -> (z, log q(z|x))``: the reparameterised forward map z = g_phi(eps; x) and the
  density from the forward pass;
* ``log_prob(x, z) -> log q(z|x)``: the density at a given z (the inverse map).

Full-covariance Gaussian (``encoder="full_cov"``): q(z|x) = N(mu(x), L(x) L(x)^T) with L lower
triangular, diag(L) = exp(log sigma(x)) > 0 and the d(d-1)/2 strictly-lower entries a linear head
of the encoder MLP (zero-initialised, so the encoder starts as the diagonal one). Sampling is
z = mu + L eps; the density uses one triangular solve u = L^{-1}(z - mu):

.. math:: \log q(z|x) = \log N(u; 0, I) - \sum_i \log L_{ii}.

Inverse autoregressive flow (``encoder="iaf"``; Kingma, Salimans, Jozefowicz, Chen, Sutskever &
Welling, "Improving Variational Inference with Inverse Autoregressive Flow", NeurIPS 2016, §4 and
Algorithm 1): the encoder MLP gives a diagonal Gaussian (mu, sigma_0) and a context h(x) (its last
hidden layer); then T steps, each a MADE (Germain et al. 2015) autoregressive network
[m_t, s_t] = MADE_t(z_{t-1}, h), with the numerically stable update

.. math:: z_0 = \mu + \sigma_0 \odot \epsilon,\quad
          \sigma_t = \mathrm{sigmoid}(s_t),\quad
          z_t = \sigma_t \odot z_{t-1} + (1 - \sigma_t) \odot m_t,

and the variable order reversed between steps. m_{t,i}, s_{t,i} depend on z_{t-1,<i} only, so
the Jacobian is triangular and

.. math:: \log q(z_T|x) = \log N(\epsilon; 0, I) - \sum_i \log \sigma_{0,i}
          - \sum_{t=1}^T \sum_i \log \sigma_{t,i}.

The s-heads' biases start at ``IAF_S_BIAS`` (sigma ~ 0.88: each step starts close to the identity,
the "forget gate" initialisation of the paper). The context enters each MADE's first hidden layer
through an unmasked linear map.

Cost of the inverse. Sampling costs T MADE passes, but ``log_prob`` at a given z must invert each
step, which is sequential in the latent dimension: z_{t-1,i} = (z_{t,i} - (1 - sigma_{t,i})
m_{t,i}) / sigma_{t,i} needs z_{t-1,<i}. It is computed by a fixed-point sweep of d MADE passes
per step (after pass k the first k coordinates are exact; ``lax.fori_loop``), i.e. d*T MADE
passes per density evaluation, against T for sampling. The estimators call ``log_proposal`` on
every particle they evaluate, so an IAF encoder multiplies the encoder's share of the cost by
about d (a latent of 50 and T = 2: 100 MADE passes per particle). The inverse is exact (up to
rounding), differentiable in both z and the parameters.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "made_masks",
    "MADE",
    "FullCovGaussianMLP",
    "IAFGaussianMLP",
    "full_cov_log_prob",
    "IAF_S_BIAS",
]

Array = jax.Array
IAF_S_BIAS = 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _std_normal_log_prob(u: Array) -> Array:
    return jnp.sum(-0.5 * jnp.square(u) - _HALF_LOG_2PI, axis=-1)


def _linear(d_in, d_out, rngs, dtype, kernel_init=None, bias=0.0) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=kernel_init or nnx.initializers.glorot_uniform(),
        bias_init=nnx.initializers.constant(bias),
        param_dtype=dtype,
        dtype=dtype,
        rngs=rngs,
    )


# ------------------------------------------------------------------------------------------------
# full-covariance Gaussian
# ------------------------------------------------------------------------------------------------
def _tril_from_flat(diag_log: Array, offdiag: Array, d: int) -> Array:
    """L (..., d, d): exp(diag_log) on the diagonal, ``offdiag`` (..., d(d-1)/2) below it."""
    rows, cols = np.tril_indices(d, -1)
    L = jnp.zeros(diag_log.shape[:-1] + (d, d), diag_log.dtype)
    L = L.at[..., rows, cols].set(offdiag)
    return L + jnp.exp(diag_log)[..., None] * jnp.eye(d, dtype=diag_log.dtype)


def full_cov_log_prob(z: Array, loc: Array, scale_tril: Array) -> Array:
    r"""log N(z; loc, L L^T) = log N(L^{-1}(z - loc); 0, I) - \sum_i log L_ii.

    z (..., d) broadcast against loc (d,); scale_tril (d, d) lower triangular, positive diagonal.
    """
    r = jnp.broadcast_to(z - loc, jnp.broadcast_shapes(z.shape, loc.shape))
    flat = r.reshape(-1, r.shape[-1])
    u = jax.scipy.linalg.solve_triangular(scale_tril, flat.T, lower=True).T.reshape(r.shape)
    return _std_normal_log_prob(u) - jnp.sum(jnp.log(jnp.diagonal(scale_tril)))


class FullCovGaussianMLP(nnx.Module):
    """x -> MLP -> (mu, log diag L, strictly-lower L): q(z|x) = N(mu, L L^T)."""

    def __init__(self, trunk, d_hidden: int, d_out: int, *, rngs, dtype):
        self.d = d_out
        self.trunk = trunk
        self.loc = _linear(d_hidden, d_out, rngs, dtype)
        self.log_scale = _linear(d_hidden, d_out, rngs, dtype)
        n_off = d_out * (d_out - 1) // 2
        self.offdiag = _linear(d_hidden, n_off, rngs, dtype, nnx.initializers.zeros_init())

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """(mu (d,), L (d, d)) for one example x."""
        h = self.trunk(x)
        return self.loc(h), _tril_from_flat(self.log_scale(h), self.offdiag(h), self.d)

    def sample(self, x: Array, eps: Array) -> tuple[Array, Array]:
        """z = mu + L eps for eps (num, d); returns (z (num, d), log q(z|x) (num,))."""
        return self.sample_from(self(x), eps)

    @staticmethod
    def sample_from(features: tuple[Array, Array], eps: Array) -> tuple[Array, Array]:
        """:meth:`sample` given ``features = self(x)`` = (mu, L): no pass through the trunk."""
        loc, L = features
        z = loc + eps @ L.T
        lq = _std_normal_log_prob(eps) - jnp.sum(jnp.log(jnp.diagonal(L)))
        return z, lq

    def log_prob(self, x: Array, z: Array) -> Array:
        loc, L = self(x)
        return full_cov_log_prob(z, loc, L)


# ------------------------------------------------------------------------------------------------
# MADE and the IAF
# ------------------------------------------------------------------------------------------------
@functools.cache
def made_masks(d: int, hidden: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Autoregressive masks of a MADE (Germain, Gregor, Murray & Larochelle, ICML 2015).

    Input degrees 1..d, hidden degrees cycling through 1..d-1 (0 when d = 1: the hidden units then
    see the context only), output degrees 1..d. A connection k -> j exists iff deg_j >= deg_k
    between input/hidden layers and deg_j > deg_k into the output, so output i depends on inputs
    < i only. Returns the masks (fan_in, fan_out) of every layer, the output layer's last.
    """
    deg_in = np.arange(1, d + 1)
    degs = [deg_in]
    for w in hidden:
        if d > 1:
            degs.append(np.arange(w) % (d - 1) + 1)
        else:
            degs.append(np.zeros(w, int))
    masks = [
        (degs[i + 1][None, :] >= degs[i][:, None]).astype(np.float64) for i in range(len(hidden))
    ]
    masks.append((deg_in[None, :] > degs[-1][:, None]).astype(np.float64))
    return tuple(masks)


def _masked(layer: nnx.Linear, mask: np.ndarray, h: Array) -> Array:
    kernel = layer.kernel[...]
    bias = layer.bias[...]  # type: ignore[index]  # nnx.Linear types its bias Optional
    return h @ (kernel * jnp.asarray(mask, kernel.dtype)) + bias


class MADE(nnx.Module):
    """[m, s] = MADE(z, h): masked MLP, outputs (d,) each with output i a function of z_{<i}, h.

    Layers ``masked_0 .. masked_{L-1}`` (masked), ``context`` (h -> first hidden layer, unmasked),
    heads ``m`` and ``s`` (masked; s's bias starts at ``s_bias``).
    """

    def __init__(self, d, hidden, d_context, act_fn, *, rngs, dtype, s_bias):
        self.d = d
        self.hidden = tuple(hidden)
        self.act_fn = act_fn
        widths = (d, *hidden)
        for i in range(len(hidden)):
            setattr(self, f"masked_{i}", _linear(widths[i], widths[i + 1], rngs, dtype))
        self.context = _linear(d_context, hidden[0], rngs, dtype)
        self.m = _linear(hidden[-1], d, rngs, dtype)
        self.s = _linear(hidden[-1], d, rngs, dtype, bias=s_bias)

    def __call__(self, z: Array, h: Array) -> tuple[Array, Array]:
        masks = made_masks(self.d, self.hidden)
        first = getattr(self, "masked_0")  # noqa: B009 (layers set by name in __init__)
        a = _masked(first, masks[0], z) + self.context(h)
        a = self.act_fn(a)
        for i in range(1, len(self.hidden)):
            a = self.act_fn(_masked(getattr(self, f"masked_{i}"), masks[i], a))
        return _masked(self.m, masks[-1], a), _masked(self.s, masks[-1], a)


class IAFGaussianMLP(nnx.Module):
    """x -> MLP -> (mu, log sigma_0, h); then ``num_steps`` IAF steps ``iaf_0 ..`` (MADEs)."""

    def __init__(self, trunk, d_hidden, d_out, num_steps, made_hidden, act_fn, *, rngs, dtype):
        self.d = d_out
        self.num_steps = num_steps
        self.trunk = trunk
        self.loc = _linear(d_hidden, d_out, rngs, dtype)
        self.log_scale = _linear(d_hidden, d_out, rngs, dtype)
        for t in range(num_steps):
            made = MADE(
                d_out, made_hidden, d_hidden, act_fn, rngs=rngs, dtype=dtype, s_bias=IAF_S_BIAS
            )
            setattr(self, f"iaf_{t}", made)

    def base(self, x: Array) -> tuple[Array, Array, Array]:
        """(mu, log sigma_0, context h) of one example x."""
        h = self.trunk(x)
        return self.loc(h), self.log_scale(h), h

    def sample(self, x: Array, eps: Array) -> tuple[Array, Array]:
        """Forward flow for eps (num, d): returns (z_T (num, d), log q(z_T|x) (num,))."""
        return self.sample_from(self.base(x), eps)

    def sample_from(self, features: tuple[Array, Array, Array], eps: Array) -> tuple[Array, Array]:
        """:meth:`sample` given ``features = self.base(x)``: the flow, no pass through the trunk."""
        loc, log_scale, h = features
        z = loc + jnp.exp(log_scale) * eps
        lq = _std_normal_log_prob(eps) - jnp.sum(log_scale)
        for t in range(self.num_steps):
            if t > 0:
                z = z[..., ::-1]
            m, s = getattr(self, f"iaf_{t}")(z, h)
            sig = jax.nn.sigmoid(s)
            z = sig * z + (1.0 - sig) * m
            lq = lq - jnp.sum(jax.nn.log_sigmoid(s), axis=-1)
        return z, lq

    def inverse(self, x: Array, z: Array) -> tuple[Array, Array]:
        """eps and log q(z|x) for z (..., d), by inverting every step (d MADE passes per step)."""
        loc, log_scale, h = self.base(x)
        log_det = jnp.zeros(z.shape[:-1], z.dtype)
        for t in reversed(range(self.num_steps)):
            made = getattr(self, f"iaf_{t}")
            target = z

            def sweep(_, carry, made=made, target=target):
                y, _ = carry
                m, s = made(y, h)
                sig = jax.nn.sigmoid(s)
                return (target - (1.0 - sig) * m) / sig, s

            # After pass k the first k coordinates of y are exact (output i reads y_{<i}); the s
            # of the d-th pass was computed at a y whose first d-1 coordinates are exact, so it is
            # s(z_{t-1}) for every coordinate.
            init = (jnp.zeros_like(z), jnp.zeros_like(z))
            z, s = jax.lax.fori_loop(0, self.d, sweep, init)
            log_det = log_det + jnp.sum(jax.nn.log_sigmoid(s), axis=-1)
            if t > 0:
                z = z[..., ::-1]
        eps = (z - loc) * jnp.exp(-log_scale)
        return eps, _std_normal_log_prob(eps) - jnp.sum(log_scale) - log_det

    def log_prob(self, x: Array, z: Array) -> Array:
        return self.inverse(x, z)[1]
