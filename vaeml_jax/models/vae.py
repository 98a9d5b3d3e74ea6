r"""The IWAE paper's VAE networks as Flax NNX modules, exposed as a :class:`LatentVariableModel`.

Architectures (Burda, Grosse & Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, §5):

* one stochastic layer: q(z|x) = N(z; mu(x), diag sigma(x)^2) with an MLP x -> 200 -> 200 -> (mu,
  log sigma) of size 50; p(z) = N(0, I); p(x|z) Bernoulli with logits from z -> 200 -> 200 -> 784;
* two stochastic layers (latents z1 of 100 and z2 of 50):
  q(z1|x) with hidden [200, 200], q(z2|z1) with hidden [100, 100];
  p(z2) = N(0, I), p(z1|z2) Gaussian with hidden [100, 100], p(x|z1) Bernoulli with hidden
  [200, 200].

All hidden units use tanh (configurable). Every Gaussian layer outputs a mean and a LOG STANDARD
DEVIATION (sigma = exp(log sigma)), as in the IWAE code. Sizes are configurable through
:class:`VAEConfig`.

Gaussian decoder (``likelihood="gaussian"``, for continuous data): p(x|z) = N(x; mu(z), diag
s^2) with mu(z) the unconstrained output of the decoder MLP and a per-pixel standard deviation
s = exp(log_scale) + ``min_scale`` that is a free parameter (``params["decoder"]["p_x"]
["log_scale"]``, shape (data_dim,), initialised to 0) independent of z: a homoscedastic,
learned-per-dimension variance, floored by ``min_scale`` so that the likelihood cannot
degenerate on pixels that are constant in the training set.

Decoder output bias: when ``init(key, data_mean=...)`` is given the training-set mean pixel,
the Bernoulli decoder's output bias is logit(clip(mean, 1e-3, 1 - 1e-3)) (so that the initial
decoder reproduces the mean image) and the Gaussian decoder's output bias is the mean itself.

Parameters: the networks are NNX modules (``nnx.Linear``), but what :meth:`VAE.init` returns,
and what every function here takes, is a PLAIN nested dict of jax arrays (``nnx.split`` then
``nnx.to_pure_dict``)::

    {"encoder": {"q_z1": {...}[, "q_z2": {...}]},           # read only by the proposal
     "decoder": {"p_x": {...}[, "p_z1": {...}]}}            # read only by the joint (and prior)

Inside the pure functions the modules are rebuilt from the dict with ``nnx.merge(graphdef,
pure_dict)``; under ``jit`` this happens at trace time only, so the compiled computation is the
same as a hand-written MLP: each function traces to the same primitives as plain jnp
(``tests/test_models.py``), and the optimised HLO of the jitted IWAE gradient (one layer, B=100,
S=10) has the same op counts, with equal step times on CPU and on an H100.

Latent layout for two stochastic layers: the interface passes ONE flat vector
z = concat(z1, z2) of size ``latent1_dim + latent_dim`` (150 by default): ``z[:latent1_dim]`` is
z1 (the layer next to x) and ``z[latent1_dim:]`` is z2 (the top layer).

Usage::

    vae = build_vae()                                  # the one-layer IWAE-paper model
    params = vae.init(jax.random.key(0), data_mean=train_x.mean(0))
    grad_fn = vaeml_jax.make_unbiased_grad(vae.model, num_particles=10)
    grads, info = grad_fn(params, x_batch, key)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vaeml_jax.models.encoders import FullCovGaussianMLP, IAFGaussianMLP
from vaeml_jax.models.interface import LatentVariableModel

__all__ = [
    "VAEConfig",
    "VAE",
    "build_vae",
    "MLP",
    "GaussianMLP",
    "BernoulliMLP",
    "GaussianDecoderMLP",
    "bernoulli_log_prob",
    "gaussian_log_prob",
]

Array = jax.Array
Params = dict

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
}
LIKELIHOODS = ("bernoulli", "gaussian")
ENCODERS = ("diag", "full_cov", "iaf")
DTYPES = ("float32", "float64")
MEAN_CLIP = 1e-3
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------
# log densities
# ------------------------------------------------------------------------------------------------
def bernoulli_log_prob(x: Array, logits: Array) -> Array:
    r"""\sum_d log Bernoulli(x_d; sigmoid(l_d)) = \sum_d x_d l_d - softplus(l_d) (last axis).

    Stable for any logits (no log of a sigmoid); x may be any value in [0, 1].
    """
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def gaussian_log_prob(x: Array, loc: Array, log_scale: Array) -> Array:
    r"""\sum_d log N(x_d; mu_d, sigma_d^2) with sigma = exp(log_scale), over the last axis."""
    return jnp.sum(
        -0.5 * jnp.square((x - loc) * jnp.exp(-log_scale)) - log_scale - _HALF_LOG_2PI, axis=-1
    )


def _std_normal_log_prob(z: Array) -> Array:
    return jnp.sum(-0.5 * jnp.square(z) - _HALF_LOG_2PI, axis=-1)


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
def _check_widths(name: str, v: Any, allow_empty: bool) -> tuple[int, ...]:
    try:
        t = tuple(v)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of layer widths, got {v!r}.") from None
    if not allow_empty and not t:
        raise ValueError(f"{name} must name one or more hidden layers, e.g. (200, 200); got ().")
    for w in t:
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
            raise ValueError(f"{name} must hold positive integer widths, got {v!r}.")
    return tuple(int(w) for w in t)


def _check_pos_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}.")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Sizes and options of a :class:`VAE` (defaults: the IWAE paper's MNIST models).

    Attributes:
      data_dim: width D of one (flattened) example.
      hidden: hidden widths of the networks next to the data: q(z1|x) and p(x|z1), mirrored.
      latent_dim: size of the top latent (z for one layer, z2 for two layers).
      two_layer: two stochastic layers (z1 of ``latent1_dim``, z2 of ``latent_dim``).
      latent1_dim: size of z1 (two-layer only).
      hidden2: hidden widths of q(z2|z1) and p(z1|z2) (two-layer only).
      likelihood: ``"bernoulli"`` (binary data, logits output) or ``"gaussian"`` (continuous
        data; mean output and a learned per-pixel log standard deviation).
      activation: hidden nonlinearity, one of ``tanh`` (paper), ``relu``, ``softplus``, ``elu``,
        ``gelu``.
      min_scale: floor added to the Gaussian decoder's standard deviation.
      dtype: parameter dtype, ``"float32"`` or ``"float64"`` (the latter needs
        ``jax.config.update("jax_enable_x64", True)``).
      encoder: the proposal family q(z|x) (one stochastic layer only; see
        :mod:`vaeml_jax.models.encoders`): ``"diag"`` (default, the paper's diagonal Gaussian),
        ``"full_cov"`` (Gaussian with a full lower-triangular Cholesky factor from the encoder
        MLP) or ``"iaf"`` (a diagonal Gaussian followed by ``iaf_layers`` inverse autoregressive
        flow steps; NOTE ``log_proposal`` then costs latent_dim MADE passes per step).
      iaf_layers: number T >= 1 of IAF steps (``encoder="iaf"`` only).
      iaf_hidden: hidden widths of each step's MADE (``encoder="iaf"`` only).
    """

    data_dim: int = 784
    hidden: tuple[int, ...] = (200, 200)
    latent_dim: int = 50
    two_layer: bool = False
    latent1_dim: int = 100
    hidden2: tuple[int, ...] = (100, 100)
    likelihood: str = "bernoulli"
    activation: str = "tanh"
    min_scale: float = 1e-3
    dtype: str = "float32"
    encoder: str = "diag"
    iaf_layers: int = 2
    iaf_hidden: tuple[int, ...] = (100, 100)

    def __post_init__(self):
        _check_pos_int("data_dim", self.data_dim)
        _check_pos_int("latent_dim", self.latent_dim)
        _check_pos_int("latent1_dim", self.latent1_dim)
        object.__setattr__(self, "hidden", _check_widths("hidden", self.hidden, False))
        object.__setattr__(self, "hidden2", _check_widths("hidden2", self.hidden2, False))
        if not isinstance(self.two_layer, bool):
            raise ValueError(f"two_layer must be True or False, got {self.two_layer!r}.")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {self.likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}."
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of: {', '.join(ACTIVATIONS)}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}.")
        if self.encoder not in ENCODERS:
            raise ValueError(
                f"unknown encoder {self.encoder!r}; choose one of: {', '.join(ENCODERS)}."
            )
        _check_pos_int("iaf_layers", self.iaf_layers)
        object.__setattr__(self, "iaf_hidden", _check_widths("iaf_hidden", self.iaf_hidden, False))
        if self.two_layer and self.encoder != "diag":
            raise ValueError(
                f"encoder={self.encoder!r} is for one stochastic layer; with two_layer=True use "
                'encoder="diag".'
            )
        ms = self.min_scale
        bad = isinstance(ms, bool) or not isinstance(ms, (int, float))
        if bad or not 0 <= ms < math.inf:
            raise ValueError(f"min_scale must be a finite number >= 0, got {ms!r}.")

    @property
    def flat_latent_dim(self) -> int:
        """The flat latent size the interface passes (latent1_dim + latent_dim with two layers)."""
        return self.latent1_dim + self.latent_dim if self.two_layer else self.latent_dim


# ------------------------------------------------------------------------------------------------
# NNX modules
# ------------------------------------------------------------------------------------------------
def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    # Glorot-uniform kernels (Glorot & Bengio 2010, as in the IWAE code), zero biases.
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=nnx.initializers.glorot_uniform(),
        bias_init=nnx.initializers.zeros_init(),
        param_dtype=dtype,
        dtype=dtype,
        rngs=rngs,
    )


class MLP(nnx.Module):
    """Hidden layers ``dense_0 .. dense_{L-1}``, each ``act(W h + b)``; returns the last hidden h.

    Layers are named attributes (not a list) so the pure params dict has string keys only.
    """

    def __init__(self, d_in: int, hidden: tuple[int, ...], activation: str, *, rngs, dtype):
        self.num_layers = len(hidden)
        self.activation = activation
        widths = (d_in, *hidden)
        for i in range(len(hidden)):
            setattr(self, f"dense_{i}", _linear(widths[i], widths[i + 1], rngs, dtype))

    def __call__(self, h: Array) -> Array:
        act = ACTIVATIONS[self.activation]
        for i in range(self.num_layers):
            h = act(getattr(self, f"dense_{i}")(h))
        return h


class GaussianMLP(nnx.Module):
    """x -> MLP -> (mu, log sigma): a diagonal Gaussian N(mu(x), diag exp(2 log sigma(x)))."""

    def __init__(self, d_in, hidden, d_out, activation, *, rngs, dtype):
        self.trunk = MLP(d_in, hidden, activation, rngs=rngs, dtype=dtype)
        self.loc = _linear(hidden[-1], d_out, rngs, dtype)
        self.log_scale = _linear(hidden[-1], d_out, rngs, dtype)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = self.trunk(x)
        return self.loc(h), self.log_scale(h)


class BernoulliMLP(nnx.Module):
    """z -> MLP -> logits of a factorised Bernoulli p(x|z)."""

    def __init__(self, d_in, hidden, d_out, activation, *, rngs, dtype):
        self.trunk = MLP(d_in, hidden, activation, rngs=rngs, dtype=dtype)
        self.logits = _linear(hidden[-1], d_out, rngs, dtype)

    def __call__(self, z: Array) -> Array:
        return self.logits(self.trunk(z))


class GaussianDecoderMLP(nnx.Module):
    """z -> MLP -> mean of p(x|z); a per-dimension learned log_scale (independent of z)."""

    def __init__(self, d_in, hidden, d_out, activation, *, rngs, dtype):
        self.trunk = MLP(d_in, hidden, activation, rngs=rngs, dtype=dtype)
        self.loc = _linear(hidden[-1], d_out, rngs, dtype)
        self.log_scale = nnx.Param(jnp.zeros((d_out,), dtype))

    def __call__(self, z: Array) -> tuple[Array, Array]:
        return self.loc(self.trunk(z)), self.log_scale[...]


class _Encoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, rngs, dtype):
        lat1 = c.latent1_dim if c.two_layer else c.latent_dim
        self.q_z1: GaussianMLP | FullCovGaussianMLP | IAFGaussianMLP  # chosen by c.encoder
        if c.encoder == "diag":
            self.q_z1 = GaussianMLP(
                c.data_dim, c.hidden, lat1, c.activation, rngs=rngs, dtype=dtype
            )
        else:
            trunk = MLP(c.data_dim, c.hidden, c.activation, rngs=rngs, dtype=dtype)
            if c.encoder == "full_cov":
                self.q_z1 = FullCovGaussianMLP(trunk, c.hidden[-1], lat1, rngs=rngs, dtype=dtype)
            else:
                self.q_z1 = IAFGaussianMLP(
                    trunk,
                    c.hidden[-1],
                    lat1,
                    c.iaf_layers,
                    c.iaf_hidden,
                    ACTIVATIONS[c.activation],
                    rngs=rngs,
                    dtype=dtype,
                )
        if c.two_layer:
            self.q_z2 = GaussianMLP(
                c.latent1_dim, c.hidden2, c.latent_dim, c.activation, rngs=rngs, dtype=dtype
            )


class _Decoder(nnx.Module):
    def __init__(self, c: VAEConfig, *, rngs, dtype):
        lat1 = c.latent1_dim if c.two_layer else c.latent_dim
        cls: type[BernoulliMLP | GaussianDecoderMLP]  # chosen by c.likelihood
        cls = BernoulliMLP if c.likelihood == "bernoulli" else GaussianDecoderMLP
        self.p_x = cls(lat1, c.hidden, c.data_dim, c.activation, rngs=rngs, dtype=dtype)
        if c.two_layer:
            self.p_z1 = GaussianMLP(
                c.latent_dim, c.hidden2, c.latent1_dim, c.activation, rngs=rngs, dtype=dtype
            )


# ------------------------------------------------------------------------------------------------
# the VAE
# ------------------------------------------------------------------------------------------------
class VAE:
    r"""A VAE of :class:`VAEConfig` as three pure functions over a plain params dict.

    Attributes:
      config: the :class:`VAEConfig`.
      model: the :class:`LatentVariableModel` (per ONE example x of shape (data_dim,) and ONE
        latent z of shape (latent_dim,)), to hand to any ``vaeml_jax.make_*_grad``:

        * ``log_joint`` = log p(z) + log p(x|z) (one layer);
          log p(z2) + log p(z1|z2) + log p(x|z1) (two layers);
        * ``log_proposal`` = log q(z|x); log q(z1|x) + log q(z2|z1);
        * ``sample_proposal`` reparameterised (ancestral for two layers):
          z1 = mu(x) + sigma(x) eps1, z2 = mu(z1) + sigma(z1) eps2, eps ~ N(0, I).
        * the optional one-pass functions: ``sample_with_log_proposal`` (log q from the noise)
          and the ``proposal_features`` / ``sample_from_features`` pair (the encoder's output
          once per x, then draws from it).
      latent_dim: the flat latent size (``latent_dim``, or ``latent1_dim + latent_dim`` with
        layout concat(z1, z2) for two layers).
    """

    def __init__(self, config: VAEConfig):
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}.")
        self.config = config
        self.latent_dim = config.flat_latent_dim
        self._dtype = jnp.dtype(config.dtype)
        self._check_x64()
        enc = nnx.eval_shape(lambda: _Encoder(config, rngs=nnx.Rngs(0), dtype=self._dtype))
        dec = nnx.eval_shape(lambda: _Decoder(config, rngs=nnx.Rngs(0), dtype=self._dtype))
        self._enc_graphdef = nnx.graphdef(enc)
        self._dec_graphdef = nnx.graphdef(dec)
        self.model = LatentVariableModel(
            log_joint=self.log_joint,
            sample_proposal=self.sample_proposal,
            log_proposal=self.log_proposal,
            sample_with_log_proposal=self.sample_with_log_proposal,
            proposal_features=self.proposal_features,
            sample_from_features=self.sample_from_features,
        )

    def __repr__(self) -> str:
        return f"VAE({self.config!r})"

    # -- parameters ------------------------------------------------------------------------------
    def init(self, key: Array, data_mean: Any = None) -> Params:
        """Fresh parameters ``{"encoder": ..., "decoder": ...}`` as a plain nested dict of arrays.

        Args:
          key: a ``jax.random.key``.
          data_mean: optional training-set mean pixel (data_dim,); if given the decoder's output
            bias starts at logit(clip(mean, 1e-3, 1 - 1e-3)) (Bernoulli) or at the mean
            (Gaussian). May be a traced array (``init`` works under ``jax.eval_shape``/``jit``).
        """
        self._check_x64()
        k_enc, k_dec = jax.random.split(key)
        enc = _Encoder(self.config, rngs=nnx.Rngs(k_enc), dtype=self._dtype)
        dec = _Decoder(self.config, rngs=nnx.Rngs(k_dec), dtype=self._dtype)
        params = {
            "encoder": nnx.to_pure_dict(nnx.state(enc, nnx.Param)),
            "decoder": nnx.to_pure_dict(nnx.state(dec, nnx.Param)),
        }
        if data_mean is not None:
            mean = jnp.asarray(data_mean, self._dtype)
            if mean.shape != (self.config.data_dim,):
                raise ValueError(
                    f"data_mean must have shape ({self.config.data_dim},) (the mean training "
                    f"example), got {mean.shape}."
                )
            head = "logits" if self.config.likelihood == "bernoulli" else "loc"
            if self.config.likelihood == "bernoulli":
                p = jnp.clip(mean, MEAN_CLIP, 1.0 - MEAN_CLIP)
                bias = jnp.log(p) - jnp.log1p(-p)
            else:
                bias = mean
            params["decoder"]["p_x"][head]["bias"] = bias
        return params

    def _check_x64(self) -> None:
        if self._dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
            raise ValueError(
                'VAEConfig(dtype="float64") needs 64-bit JAX: call '
                'jax.config.update("jax_enable_x64", True) first (or use dtype="float32").'
            )

    def _encoder(self, params: Params) -> _Encoder:
        return nnx.merge(self._enc_graphdef, params["encoder"])

    def _decoder(self, params: Params) -> _Decoder:
        return nnx.merge(self._dec_graphdef, params["decoder"])

    def _split(self, z: Array) -> tuple[Array, Array | None]:
        if not self.config.two_layer:
            return z, None
        return z[..., : self.config.latent1_dim], z[..., self.config.latent1_dim :]

    def _check_one(self, name: str, x: Array, z: Array | None = None) -> None:
        if x.shape != (self.config.data_dim,):
            raise ValueError(
                f"VAE.{name} takes ONE example x of shape ({self.config.data_dim},), got "
                f"{x.shape} (the estimators vmap over the batch for you)."
            )
        if z is not None and z.shape != (self.latent_dim,):
            raise ValueError(
                f"VAE.{name} takes ONE latent z of shape ({self.latent_dim},), got {z.shape}."
            )

    # -- the three pure functions ------------------------------------------------------------------
    def log_joint(self, params: Params, x: Array, z: Array) -> Array:
        """log p(x, z) for one example x (data_dim,) and one flat latent z (latent_dim,)."""
        self._check_one("log_joint", x, z)
        dec = self._decoder(params)
        z1, z2 = self._split(z)
        if z2 is None:
            lp = _std_normal_log_prob(z1)
        else:
            lp = _std_normal_log_prob(z2) + gaussian_log_prob(z1, *dec.p_z1(z2))
        return lp + self._log_likelihood(dec, x, z1)

    def _log_likelihood(self, dec: _Decoder, x: Array, z1: Array) -> Array:
        if isinstance(dec.p_x, BernoulliMLP):  # likelihood == "bernoulli"
            return bernoulli_log_prob(x, dec.p_x(z1))
        loc, log_scale = dec.p_x(z1)
        scale = jnp.exp(log_scale) + self.config.min_scale
        return gaussian_log_prob(x, loc, jnp.log(scale))

    def log_proposal(self, params: Params, x: Array, z: Array) -> Array:
        """log q(z|x) for one example x and one flat latent z."""
        self._check_one("log_proposal", x, z)
        enc = self._encoder(params)
        if not isinstance(enc.q_z1, GaussianMLP):  # encoder != "diag"
            return enc.q_z1.log_prob(x, z)
        z1, z2 = self._split(z)
        lq = gaussian_log_prob(z1, *enc.q_z1(x))
        if z2 is not None:
            lq = lq + gaussian_log_prob(z2, *enc.q_z2(z1))
        return lq

    def sample_proposal(self, params: Params, x: Array, key: Array, num: int) -> Array:
        """``num`` reparameterised draws z ~ q(z|x) for one example x: shape (num, latent_dim)."""
        self._check_one("sample_proposal", x)
        features = self.proposal_features(params, x)
        if self.config.encoder != "diag":
            return self.sample_from_features(params, features, key, num)[0]
        return self._sample_diag(params, features, key, num, with_log_q=False)

    def sample_with_log_proposal(
        self, params: Params, x: Array, key: Array, num: int
    ) -> tuple[Array, Array]:
        """``num`` reparameterised draws and their log q(z|x) from the FORWARD pass.

        Returns (z (num, latent_dim), log q (num,)); the draws equal
        ``sample_proposal(params, x, key, num)``. log q comes from the noise (Gaussian layers:
        log N(eps; 0, I) - sum log sigma), so the encoder runs once, not again in
        :meth:`log_proposal`; for the IAF this also avoids the d-pass inverse.
        """
        self._check_one("sample_with_log_proposal", x)
        return self.sample_from_features(params, self.proposal_features(params, x), key, num)

    def proposal_features(self, params: Params, x: Array) -> tuple[Array, ...]:
        """The part of q(z|x) that depends on x alone, for one example x: the first stochastic
        layer's (mu, log sigma) (``"diag"``), (mu, L) (``"full_cov"``), (mu, log sigma_0, h)
        (``"iaf"``). Drawing from it (:meth:`sample_from_features`) skips the encoder's trunk."""
        self._check_one("proposal_features", x)
        q = self._encoder(params).q_z1
        return q.base(x) if isinstance(q, IAFGaussianMLP) else q(x)

    def sample_from_features(
        self, params: Params, features: tuple[Array, ...], key: Array, num: int
    ) -> tuple[Array, Array]:
        """:meth:`sample_with_log_proposal` given ``features = proposal_features(params, x)``."""
        if self.config.encoder == "diag":
            return self._sample_diag(params, features, key, num, with_log_q=True)
        k1, _ = jax.random.split(key)  # the key split of the diagonal case, for the same eps
        eps = jax.random.normal(k1, (num, self.latent_dim), self._dtype)
        q = self._encoder(params).q_z1
        # casts: proposal_features gave this encoder's features, whose length mypy cannot know
        if isinstance(q, IAFGaussianMLP):  # encoder == "iaf": (mu, log sigma_0, h)
            return q.sample_from(cast("tuple[Array, Array, Array]", features), eps)
        assert isinstance(q, FullCovGaussianMLP)  # encoder == "full_cov": (mu, L)
        return q.sample_from(cast("tuple[Array, Array]", features), eps)

    def _sample_diag(self, params, features, key, num, with_log_q: bool):
        """Draws (and log q, from the noise) of the diagonal encoder, one or two layers."""
        k1, k2 = jax.random.split(key)  # k2: the second stochastic layer's noise
        loc, log_scale = features
        eps = jax.random.normal(k1, (num, *loc.shape), loc.dtype)
        z = loc + jnp.exp(log_scale) * eps
        lq = _std_normal_log_prob(eps) - jnp.sum(log_scale) if with_log_q else None
        if self.config.two_layer:
            loc2, log_scale2 = self._encoder(params).q_z2(z)
            eps2 = jax.random.normal(k2, loc2.shape, loc2.dtype)
            z = jnp.concatenate([z, loc2 + jnp.exp(log_scale2) * eps2], axis=-1)
            if lq is not None:  # with_log_q
                lq = lq + _std_normal_log_prob(eps2) - jnp.sum(log_scale2, axis=-1)
        return (z, lq) if with_log_q else z

    # -- conveniences ------------------------------------------------------------------------------
    def encode(self, params: Params, x: Array) -> tuple[Array, Array]:
        """(mu, log sigma) of q(z1|x), each (..., latent1): the first stochastic layer's encoder.

        For ``encoder="full_cov"`` log sigma is the log of the Cholesky factor's diagonal; for
        ``"iaf"`` (mu, log sigma) are the base Gaussian's, before the flow.
        """
        q = self._encoder(params).q_z1
        if isinstance(q, FullCovGaussianMLP):  # encoder == "full_cov"
            loc, L = q(x)
            return loc, jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1))
        if isinstance(q, IAFGaussianMLP):  # encoder == "iaf"
            return q.base(x)[:2]
        return q(x)

    def decode(self, params: Params, z: Array) -> Array:
        """Mean of p(x|z) for latents (..., latent_dim): probabilities (Bernoulli) or mu(z).

        For two layers only z1 = z[..., :latent1_dim] enters p(x|z1).
        """
        z = jnp.asarray(z)
        if z.shape[-1:] != (self.latent_dim,):
            raise ValueError(
                f"decode takes latents of shape (..., {self.latent_dim}), got {z.shape}."
            )
        z1, _ = self._split(z)
        p_x = self._decoder(params).p_x
        if isinstance(p_x, BernoulliMLP):  # likelihood == "bernoulli"
            return jax.nn.sigmoid(p_x(z1))
        return p_x(z1)[0]

    def sample_prior(self, params: Params, key: Array, num: int) -> Array:
        """``num`` flat latents from the prior (ancestral for two layers): (num, latent_dim)."""
        k1, k2 = jax.random.split(key)
        top = jax.random.normal(k1, (num, self.config.latent_dim), self._dtype)
        if not self.config.two_layer:
            return top
        loc, log_scale = self._decoder(params).p_z1(top)
        z1 = loc + jnp.exp(log_scale) * jax.random.normal(k2, loc.shape, loc.dtype)
        return jnp.concatenate([z1, top], axis=-1)

    def sample(self, params: Params, key: Array, num: int) -> Array:
        """(num, data_dim) decoded means of p(x|z) at z ~ p(z)."""
        return self.decode(params, self.sample_prior(params, key, num))

    def reconstruct(self, params: Params, x: Array, key: Array) -> Array:
        """(B, data_dim) decoded means of p(x|z) at one z ~ q(z|x_i) per example of x (B, D)."""
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.config.data_dim:
            raise ValueError(
                f"reconstruct takes a batch x of shape (B, {self.config.data_dim}), got {x.shape}."
            )
        keys = jax.random.split(key, x.shape[0])
        z = jax.vmap(lambda xi, ki: self.sample_proposal(params, xi, ki, 1)[0])(x, keys)
        return self.decode(params, z)

    def check_data(self, x: Any) -> None:
        """Raise ValueError if the batch ``x`` (B, data_dim) does not suit this model.

        Checks the width, finiteness and, for a Bernoulli decoder, that every pixel is 0 or 1.
        """
        x = np.asarray(x)
        d = self.config.data_dim
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(
                f"data of shape {x.shape} does not fit this VAE: expected a batch of flattened "
                f"examples (B, {d}); reshape the data or build the VAE with the data's width "
                "(data_dim)."
            )
        if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
            raise ValueError(f"data must be numeric, got dtype {x.dtype}.")
        if not np.all(np.isfinite(x)):
            bad = int(np.sum(~np.isfinite(x)))
            raise ValueError(f"data contains {bad} non-finite values (NaN or inf); clean it first.")
        if self.config.likelihood == "bernoulli":
            nonbin = (x != 0) & (x != 1)
            if np.any(nonbin):
                example = x[nonbin].ravel()[0]
                raise ValueError(
                    f"a Bernoulli decoder needs binary pixels (0 or 1), but {int(nonbin.sum())} "
                    f"values are not (e.g. {example!r}); binarize the data dynamically (resample "
                    "each pixel as Bernoulli(intensity) every epoch) or statically (once), or use "
                    'likelihood="gaussian" for continuous data.'
                )


def build_vae(**config_kwargs: Any) -> VAE:
    """``VAE(VAEConfig(**config_kwargs))``; e.g. ``build_vae(two_layer=True)``."""
    try:
        config = VAEConfig(**config_kwargs)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(VAEConfig))
        raise ValueError(f"{e}; VAEConfig fields: {fields}.") from None
    return VAE(config)
