"""The baselines (IWAE, ELBO, MCMC) against slow, obviously correct hand-written references.

For a fixed key the estimators must give exactly the gradient a textbook implementation gives on
the same draws: the reference samples z = g_phi(eps) with ``model.sample_proposal`` under the same
per-example keys and differentiates the bound with ``jax.grad``. The fused path (one surrogate for
theta and phi) and the separated paths (theta by the self-normalised weights, phi by another
objective) must agree on theta. ``make_mcmc_grad`` with no transition is the IWAE estimator, and
``encoder_objective=None`` gives exact zeros on the proposal's parameters (for the unbiased
estimator this is checked in test_validation.py). Every comparison runs jitted and not jitted
(``chex.variants``).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from _fast_compile import fast_jit
from absl.testing import parameterized
from jax.scipy.special import logsumexp

import vaeml_jax as vj
from vaeml_jax import testing as T
from vaeml_jax.estimators import _common

S = 5
B = 4
RTOL, ATOL = 2e-5, 2e-6


def _setup():
    model = T.linear_gaussian_model()
    params = T.linear_gaussian_params(jax.random.key(0), proposal_quality=0.4)
    x = 1.5 * jax.random.normal(jax.random.key(1), (B, 3))
    keys = jax.random.split(jax.random.key(2), B).reshape(B, 1)  # one lane per example
    return model, params, x, keys


# --------------------------------------------------------------------------- references
def _draws_and_log_weights(model, params, x, keys, num, theta_params=None):
    """Reparameterised z (B, num, d) and log w (B, num); log_joint reads ``theta_params``."""
    theta_params = params if theta_params is None else theta_params

    def one(xi, key):
        z = model.sample_proposal(params, xi, key, num)
        lj = jax.vmap(lambda zz: model.log_joint(theta_params, xi, zz))(z)
        lq = jax.vmap(lambda zz: model.log_proposal(params, xi, zz))(z)
        return z, lj - lq

    return jax.vmap(one)(x, keys[:, 0])


def ref_iwae_loss(model, params, x, keys, num, freeze_theta=False):
    """-(1/B) sum_i log (1/S) sum_s p(x_i, z_s) / q(z_s | x_i), z_s = g_phi(eps_s)."""
    theta = jax.lax.stop_gradient(params) if freeze_theta else params
    _, lw = _draws_and_log_weights(model, params, x, keys, num, theta)
    return -jnp.mean(logsumexp(lw, axis=1) - math.log(num))


def ref_elbo_loss(model, params, x, keys, num, freeze_theta=False):
    """-(1/B) sum_i (1/S) sum_s log p(x_i, z_s) / q(z_s | x_i), z_s = g_phi(eps_s)."""
    theta = jax.lax.stop_gradient(params) if freeze_theta else params
    _, lw = _draws_and_log_weights(model, params, x, keys, num, theta)
    return -jnp.mean(lw)


def ref_rws_encoder_grad(model, params, x, keys, num):
    """Reweighted wake-sleep: -(1/B) sum_i sum_s wbar_is grad_phi log q(z_is | x_i), z fixed."""
    z, lw = _draws_and_log_weights(model, params, x, keys, num)
    z, wbar = jax.lax.stop_gradient(z), jax.nn.softmax(jax.lax.stop_gradient(lw), axis=1)

    def surrogate(p):
        lq = jax.vmap(lambda xi, zi: jax.vmap(lambda zz: model.log_proposal(p, xi, zz))(zi))(x, z)
        return -jnp.sum(wbar * lq) / x.shape[0]

    return jax.grad(surrogate)(params)


def _assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def _zeros_like(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _assert_exact_zeros(tree):
    for leaf in jax.tree.leaves(tree):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


# --------------------------------------------------------------------------- tests
@functools.lru_cache(maxsize=1)
def _references():
    """The reference gradients on the shared setup, computed once (jitted)."""
    model, params, x, keys = _setup()

    @fast_jit
    def refs(p):
        g = jax.grad
        return {
            "iwae": g(lambda q: ref_iwae_loss(model, q, x, keys, S))(p),
            "elbo": g(lambda q: ref_elbo_loss(model, q, x, keys, S))(p),
            "iwae_phi": g(lambda q: ref_iwae_loss(model, q, x, keys, S, freeze_theta=True))(p),
            "elbo_phi": g(lambda q: ref_elbo_loss(model, q, x, keys, S, freeze_theta=True))(p),
            "rws_phi": ref_rws_encoder_grad(model, p, x, keys, S),
        }

    return refs(params)


class BaselinesTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.model, self.params, self.x, self.keys = _setup()
        r = _references()
        self.ref_iwae, self.ref_elbo = r["iwae"], r["elbo"]
        self.ref_iwae_phi, self.ref_elbo_phi, self.ref_rws_phi = (
            r["iwae_phi"],
            r["elbo_phi"],
            r["rws_phi"],
        )

    def _run(self, estimator):
        fn = self.variant(estimator.with_lane_keys)
        return fn(self.params, self.x, self.keys)

    @chex.variants(with_jit=True, without_jit=True)
    def test_iwae_fused_equals_reference(self):
        grads, info = self._run(
            vj.make_iwae_grad(self.model, num_particles=S, encoder_objective="iwae")
        )
        _assert_tree_close(grads, self.ref_iwae)
        ref_bound = -jax.vmap(
            lambda xi, ki: ref_iwae_loss(self.model, self.params, xi[None], ki[None], S)
        )(self.x, self.keys)
        np.testing.assert_allclose(info["bound"], ref_bound, rtol=1e-5)
        self.assertEqual(int(info["num_log_joint_evals"]), B * S)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("elbo", "inclusive_kl", None)
    def test_iwae_separated_paths_agree_on_theta(self, objective):
        grads, _ = self._run(
            vj.make_iwae_grad(self.model, num_particles=S, encoder_objective=objective)
        )
        _assert_tree_close(grads["decoder"], self.ref_iwae["decoder"])
        if objective is None:  # exact zeros on the proposal's parameters
            _assert_exact_zeros(grads["encoder"])
        else:
            expected = {"elbo": self.ref_elbo_phi, "inclusive_kl": self.ref_rws_phi}[objective]
            _assert_tree_close(grads["encoder"], expected["encoder"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_elbo_fused_equals_reference(self):
        grads, info = self._run(
            vj.make_elbo_grad(self.model, encoder_objective="elbo", num_particles=S)
        )
        _assert_tree_close(grads, self.ref_elbo)
        self.assertEqual(int(info["num_log_joint_evals"]), B * S)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("iwae", None)
    def test_elbo_separated_paths_agree_on_theta(self, objective):
        grads, _ = self._run(
            vj.make_elbo_grad(self.model, encoder_objective=objective, num_particles=S)
        )
        _assert_tree_close(grads["decoder"], self.ref_elbo["decoder"])
        if objective is None:
            _assert_exact_zeros(grads["encoder"])
        else:
            _assert_tree_close(grads["encoder"], self.ref_iwae_phi["encoder"])

    def test_fused_phi_equals_frozen_theta_phi(self):
        """With theta read only by log_joint, the fused phi-gradient is the frozen-theta one."""
        _assert_tree_close(self.ref_iwae["encoder"], self.ref_iwae_phi["encoder"])
        _assert_tree_close(self.ref_elbo["encoder"], self.ref_elbo_phi["encoder"])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("iwae", None)
    def test_mcmc_without_steps_is_iwae(self, objective):
        """num_steps=0: the chain average is h(X_0) on X_0 ~ q^S, the IWAE draw of the first half
        of the lane key; the encoder objective is applied to the same X_0."""
        mcmc = vj.make_mcmc_grad(
            self.model, num_particles=S, num_steps=0, encoder_objective=objective
        )
        grads, info = self._run(mcmc)
        key_x0 = jax.vmap(jax.vmap(lambda kk: jax.random.split(kk, 2)[0]))(self.keys)
        iwae = vj.make_iwae_grad(self.model, num_particles=S, encoder_objective=objective)
        expected, iwae_info = jax.jit(iwae.with_lane_keys)(self.params, self.x, key_x0)
        _assert_tree_close(grads, expected)
        if objective is None:
            _assert_exact_zeros(grads["encoder"])
        np.testing.assert_allclose(info["bound"], iwae_info["bound"], rtol=1e-5)
        self.assertEqual(int(info["num_log_joint_evals"]), B * S)
        np.testing.assert_array_equal(info["num_iters"], np.zeros((B, 1)))

    @chex.variants(with_jit=True)
    def test_call_uses_one_key_per_example(self):
        """grad_fn(params, x, key) is with_lane_keys on independent per-example keys."""
        est = vj.make_iwae_grad(self.model, num_particles=S)
        key = jax.random.key(7)
        lanes = _common.lane_keys(key, B, 1)
        a, _ = self.variant(est)(self.params, self.x, key)
        b, _ = jax.jit(est.with_lane_keys)(self.params, self.x, lanes)
        _assert_tree_close(a, b, rtol=1e-6, atol=1e-7)
        # and different examples got different draws: a batch of copies is not one draw repeated
        xr = jnp.tile(self.x[:1], (B, 1))
        _, info = jax.jit(est)(self.params, xr, key)
        self.assertEqual(len(np.unique(np.asarray(info["bound"]))), B)
