r"""Estimator costs on the IWAE paper's MNIST model, as multiples of a hand-written IWAE floor.

The model is the one-stochastic-layer MLP of Burda, Grosse & Salakhutdinov (2016): encoder
784-200-200-(2x50) and decoder 50-200-200-784, tanh, Gaussian q(z|x) = N(mu(x), diag sigma(x)^2),
N(0, I) prior and a Bernoulli decoder, on dynamically binarized MNIST, batch 100. For each number
of particles S the script times, side by side in one process, interleaved round by round:

* ``floor``: a plain hand-written batched IWAE-S loss (encoder once per example, S reparameterised
  samples, decoder once on (B*S, 50), logsumexp, ONE ``jax.grad``), the cheapest way to get an
  IWAE-S gradient and the unit every other cost is expressed in;
* ``elbo``: ``make_elbo_grad(model, num_particles=S)``, the standard VAE gradient with S samples;
* ``iwae``: ``make_iwae_grad(model, num_particles=S)`` (library; fused: one surrogate, one
  backward pass);
* ``cis step``: the per-transition cost of one single-chain CIS step with its h contribution (S
  log-joint evaluations and one vjp over them, for the whole batch), measured by differencing:
  [t(make_mcmc_grad, T2 steps) - t(T1 steps)] / (T2 - T1), paired within each round. The difference
  cancels X_0's sampling, the init vjp and the encoder loss, and leaves exactly the scan body;
* ``coupled iter``: the per-iteration cost of the unbiased estimator's ``while_loop``, by the same
  differencing on ``make_unbiased_grad(k=m=M)`` with M = M1, M2 and a FIXED key and batch: the
  chains (and hence meeting) do not depend on k, m, so the two calls run identical inits and the
  loop length is forced to max(M, tau_max) - 1, which we choose > tau_max so that the difference
  is exactly (M2 - M1) loop bodies. This is the fair analogue of ``cis step``: one body of each
  loop, everything else cancelled;
* ``unbiased``: ``make_unbiased_grad(model, num_particles=S, loop=LoopOptions(num_slots=None))``
  (k = m = 0, the plain loop) at fresh keys and batches, with its per-call batch mean and batch max
  ``num_iters``, on the trained model and at init; ``--num-slots P`` adds the work queue of P
  slots, and (unless ``--no-default-loop``) ``make_unbiased_grad(model, num_particles=S)`` with
  the library's DEFAULT loop options (``"auto"``: the queue of B/4 slots on CPU, the plain loop
  on accelerators) is timed too, as ``unbiased_slotsdefault``.

Targets, checked with per-round paired ratios (median over rounds):

1. iwae / floor <= 1.3;
2. coupled iter / cis step <= 1.2;
3. unbiased / ((1 + batch-max num_iters) * floor) <= 1.25;
4. (the work queue's target; was a 1.25 stretch goal)
   unbiased / ((1 + batch-mean num_iters) * floor) <= 2.0
   (close to the mean, not the max, number of iterations).

Run ``python benchmarks/estimator_cost.py --help``; ``--quick`` is a few-second smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:  # the package is normally installed (pip install -e .); else run from a checkout
    import vaeml_jax  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(REPO))

import optax  # noqa: E402
from _timing import summarize, time_interleaved  # noqa: E402

import vaeml_jax as vj  # noqa: E402
from vaeml_jax.estimators import LoopOptions, auto_num_slots  # noqa: E402
from vaeml_jax.models.interface import LatentVariableModel  # noqa: E402

PLAIN = LoopOptions(num_slots=None)  # the plain loop: all lanes until the slowest has met

LATENT = 50
HIDDEN = 200
PIXELS = 784
LOG_2PI = math.log(2.0 * math.pi)

TARGET_IWAE = 1.3
TARGET_COUPLED = 1.2
TARGET_UNBIASED = 1.25
TARGET_UNBIASED_MEAN = 2.0  # the work queue's: t <= 2.0 (1 + batch-mean num_iters) floors


# ----------------------------------------------------------------------------------------------
# Data: real MNIST, dynamically binarized.


def default_data_dir() -> Path:
    env = os.environ.get("VAEML_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def load_mnist_train(data_dir: Path) -> np.ndarray:
    """MNIST training images as uint8 (60000, 784), read from the IDX ``.gz`` file."""
    path = Path(data_dir) / "mnist" / "train-images-idx3-ubyte.gz"
    if not path.is_file():
        raise SystemExit(
            f"MNIST not found at {path}; pass --data-dir pointing at the folder that holds "
            "mnist/train-images-idx3-ubyte.gz (or set VAEML_DATA_DIR)."
        )
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], ">u4")
    if magic != 2051 or rows * cols != PIXELS:
        raise SystemExit(f"{path} is not an MNIST IDX image file (magic {magic}).")
    return np.frombuffer(raw[16:], np.uint8).reshape(int(n), PIXELS)


def binarize(key, intensities: jax.Array) -> jax.Array:
    """Dynamic binarization: pixel ~ Bernoulli(byte / 255), as float32."""
    return jax.random.bernoulli(key, intensities).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The hand-written network: the floor, and the fallback LatentVariableModel.


def _dense_init(key, fan_in: int, fan_out: int) -> dict:
    limit = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
    w = jax.random.uniform(key, (fan_in, fan_out), jnp.float32, -limit, limit)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def init_mlp_vae(key, data_mean: np.ndarray | None = None) -> dict:
    """Params {"encoder": [3 dense], "decoder": [3 dense]} of the 784-200-200-50 IWAE MLP."""
    ke, kd = jax.random.split(key)
    enc_sizes = [PIXELS, HIDDEN, HIDDEN, 2 * LATENT]
    dec_sizes = [LATENT, HIDDEN, HIDDEN, PIXELS]
    enc = [
        _dense_init(k, a, b)
        for k, a, b in zip(jax.random.split(ke, 3), enc_sizes[:-1], enc_sizes[1:], strict=True)
    ]
    dec = [
        _dense_init(k, a, b)
        for k, a, b in zip(jax.random.split(kd, 3), dec_sizes[:-1], dec_sizes[1:], strict=True)
    ]
    if data_mean is not None:  # output bias = logit of the pixel means (a standard VAE init)
        p = np.clip(np.asarray(data_mean, np.float64), 1e-3, 1 - 1e-3)
        dec[-1]["b"] = jnp.asarray(np.log(p) - np.log1p(-p), jnp.float32)
    return {"encoder": enc, "decoder": dec}


def _mlp(layers, h):
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return h


def _encode(params, x):
    out = _mlp(params["encoder"], x)
    return out[..., :LATENT], out[..., LATENT:]  # mean, log std


def _bernoulli_log_lik(x, logits):
    return jnp.sum(x * logits - jax.nn.softplus(logits), axis=-1)


def floor_iwae_loss(params, x, key, num_particles: int):
    """Hand-written batched IWAE-S loss -(1/B) sum_i log (1/S) sum_s p(x_i, z_is) / q(z_is | x_i).

    x: (B, 784) binary. The encoder runs once per example, the decoder once on (B*S, 50).
    """
    batch = x.shape[0]
    mean, log_std = _encode(params, x)  # (B, L)
    eps = jax.random.normal(key, (batch, num_particles, LATENT), x.dtype)
    z = mean[:, None] + jnp.exp(log_std)[:, None] * eps  # (B, S, L)
    logits = _mlp(params["decoder"], z.reshape(batch * num_particles, LATENT))
    log_lik = _bernoulli_log_lik(x[:, None], logits.reshape(batch, num_particles, PIXELS))
    log_prior = -0.5 * jnp.sum(z**2, -1) - 0.5 * LATENT * LOG_2PI
    log_q = jnp.sum(-0.5 * eps**2 - log_std[:, None], -1) - 0.5 * LATENT * LOG_2PI
    log_w = log_lik + log_prior - log_q
    return -jnp.mean(logsumexp(log_w, axis=1) - math.log(num_particles))


def local_model() -> LatentVariableModel:
    """The same network as a per-example LatentVariableModel (when vaeml_jax.models is absent)."""

    def log_joint(params, x, z):
        logits = _mlp(params["decoder"], z)
        return _bernoulli_log_lik(x, logits) - 0.5 * jnp.sum(z**2) - 0.5 * LATENT * LOG_2PI

    def sample_proposal(params, x, key, num):
        mean, log_std = _encode(params, x)
        eps = jax.random.normal(key, (num, LATENT), mean.dtype)
        return mean + jnp.exp(log_std) * eps

    def log_proposal(params, x, z):
        mean, log_std = _encode(params, x)
        u = (z - mean) * jnp.exp(-log_std)
        return jnp.sum(-0.5 * u**2 - log_std) - 0.5 * LATENT * LOG_2PI

    return LatentVariableModel(log_joint, sample_proposal, log_proposal)


def build_model(which: str, key, data_mean):
    """(model, params, description): the library's VAE if importable (or asked), else local."""
    if which in ("auto", "library"):
        try:
            from vaeml_jax.models import VAE, VAEConfig
        except ImportError as e:
            if which == "library":
                raise SystemExit(
                    f"--model library: vaeml_jax.models is not importable ({e})."
                ) from e
        else:
            vae = VAE(VAEConfig())
            params = vae.init(key, data_mean=data_mean)
            return vae.model, params, "vaeml_jax.models.VAE(VAEConfig())"
    return local_model(), init_mlp_vae(key, data_mean), "local pure-jnp MLP (benchmarks/)"


def num_params(params) -> int:
    return int(sum(np.prod(np.shape(a)) for a in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# Training (a trained-ish model has realistic meeting times).


def train(model, params, images, steps: int, batch: int, key, num_particles: int = 5, lr=1e-3):
    """``steps`` Adam steps on the library's IWAE-S gradient (fused, theta and phi together)."""
    if steps == 0:
        return params, float("nan")
    grad_fn = vj.make_iwae_grad(model, num_particles=num_particles)
    opt = optax.adam(lr)
    data = jnp.asarray(images, jnp.float32) / 255.0

    @jax.jit
    def step(p, s, k):
        k_idx, k_bin, k_grad = jax.random.split(k, 3)
        idx = jax.random.randint(k_idx, (batch,), 0, data.shape[0])
        x = binarize(k_bin, data[idx])
        g, info = grad_fn(p, x, k_grad)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, jnp.mean(info["bound"])

    state = opt.init(params)
    bounds = []
    for k in jax.random.split(key, steps):
        params, state, bound = step(params, state, k)
        bounds.append(bound)
    tail = np.asarray(jnp.stack(bounds[-min(50, steps) :]))
    return params, float(np.mean(tail))


# ----------------------------------------------------------------------------------------------
# The benchmark for one S.


def _jit_est(est):
    return jax.jit(lambda p, x, k: est(p, x, k))


def _loop_iters(info, batch: int, S: int) -> int:
    """Iterations the plain coupled loop ran, from evals = B C (2S + (S+1) iters) with C = 1."""
    return int(round((int(info["num_log_joint_evals"]) / batch - 2 * S) / (S + 1)))


def _forced_coupled_pair(model, params, batches, S: int, diff: int):
    """Two plain unbiased estimators whose loops run a forced number of iterations on one input.

    Preferred: k = m = 0 with ``max_iters`` = M1 and M2 < the uncapped loop length n0 of the fixed
    (key, batch): the loop then stops at exactly M1 and M2 iterations (capping changes only when
    lanes stop, never the body). If no pilot key has n0 > M2 (fast meeting), fall back to
    k = m = M1, M2 with M1 = n0 + 2 (the window forces every lane to run until t = m).
    Returns (est1, est2, x, key, n1, n2, how).
    """
    base = _jit_est(vj.make_unbiased_grad(model, num_particles=S, loop=PLAIN))
    M1, M2 = 2, 2 + diff
    batch = batches[0].shape[0]
    n0 = 0
    for seed in range(8):
        key = jax.random.key(10_000 + seed)
        x = batches[seed % len(batches)]
        n0 = _loop_iters(base(params, x, key)[1], batch, S)
        if n0 > M2:
            how = f"max_iters = {M1} vs {M2} (uncapped loop: {n0} iterations)"
            e1 = _jit_est(vj.make_unbiased_grad(model, num_particles=S, max_iters=M1, loop=PLAIN))
            e2 = _jit_est(vj.make_unbiased_grad(model, num_particles=S, max_iters=M2, loop=PLAIN))
            break
    else:
        M1, M2 = n0 + 2, n0 + 2 + diff
        how = f"k = m = {M1} vs {M2} (uncapped loop: {n0} iterations)"
        e1 = _jit_est(
            vj.make_unbiased_grad(model, num_particles=S, k=M1, m=M1, max_iters=M2 + 1, loop=PLAIN)
        )
        e2 = _jit_est(
            vj.make_unbiased_grad(model, num_particles=S, k=M2, m=M2, max_iters=M2 + 1, loop=PLAIN)
        )
    n1 = _loop_iters(e1(params, x, key)[1], batch, S)
    n2 = _loop_iters(e2(params, x, key)[1], batch, S)
    if n2 <= n1:
        raise RuntimeError(f"coupled loop lengths not forced apart: {n1} vs {n2} iterations.")
    return e1, e2, x, key, n1, n2, how


def bench_one_s(args, model, params, params_init, floor_params, batches, S: int) -> dict:
    """Time every variant for S particles; return raw samples and derived summaries."""
    R = args.repeats
    U = min(args.unbiased_repeats, R)
    keys = list(jax.random.split(jax.random.key(1000 + S), R + args.warmup))
    nb = len(batches)
    floor = jax.jit(jax.grad(floor_iwae_loss), static_argnums=3)
    elbo = _jit_est(vj.make_elbo_grad(model, num_particles=S))
    iwae = _jit_est(vj.make_iwae_grad(model, num_particles=S))

    def unbiased_with(loop):
        return _jit_est(
            vj.make_unbiased_grad(model, num_particles=S, max_iters=args.max_iters, loop=loop)
        )

    unbiased = unbiased_with(PLAIN)
    slots = {str(P): unbiased_with(LoopOptions(num_slots=P)) for P in args.num_slots}
    for P in args.flat_slots:  # the work queue without the cascade, for comparison
        slots[f"{P}flat"] = unbiased_with(LoopOptions(num_slots=P, slot_cascade=False))
    for P in args.eager_slots:  # the cascade without deferred backward passes, for comparison
        slots[f"{P}eager"] = unbiased_with(LoopOptions(num_slots=P, deferred_backward=False))
    if args.default_loop:  # the library's default: no loop options given
        slots["default"] = _jit_est(
            vj.make_unbiased_grad(model, num_particles=S, max_iters=args.max_iters)
        )

    T1, T2 = 1, 1 + args.diff_steps
    mcmc1 = _jit_est(vj.make_mcmc_grad(model, num_particles=S, num_steps=T1))
    mcmc2 = _jit_est(vj.make_mcmc_grad(model, num_particles=S, num_steps=T2))
    c1, c2, x_fix, key_fix, n1, n2, how = _forced_coupled_pair(
        model, params, batches, S, args.diff_steps
    )

    widths = [w for w in args.width_scan if w < batches[0].shape[0]]
    width_pairs = {
        w: _forced_coupled_pair(model, params, [b[:w] for b in batches], S, args.diff_steps)
        for w in widths
    }

    def data(r):
        return batches[r % nb]

    fns = {
        "floor": lambda r: floor(floor_params, data(r), keys[r], S),
        "elbo": lambda r: elbo(params, data(r), keys[r]),
        "iwae": lambda r: iwae(params, data(r), keys[r]),
        "mcmc_T1": lambda r: mcmc1(params, x_fix, key_fix),
        "mcmc_T2": lambda r: mcmc2(params, x_fix, key_fix),
        "coupled_1": lambda r: c1(params, x_fix, key_fix),
        "coupled_2": lambda r: c2(params, x_fix, key_fix),
        "unbiased": lambda r: unbiased(params, data(r), keys[r]),
    }
    for w, (e1, e2, xw, kw, _, _, _) in width_pairs.items():
        fns[f"width{w}_1"] = lambda r, e1=e1, xw=xw, kw=kw: e1(params, xw, kw)
        fns[f"width{w}_2"] = lambda r, e2=e2, xw=xw, kw=kw: e2(params, xw, kw)
    call_names = ["unbiased"]
    for P, est in slots.items():
        fns[f"unbiased_slots{P}"] = lambda r, est=est: est(params, data(r), keys[r])
        call_names.append(f"unbiased_slots{P}")
    if params_init is not None:
        fns["unbiased_init"] = lambda r: unbiased(params_init, data(r), keys[r])
        call_names.append("unbiased_init")
        for P, est in slots.items():
            fns[f"unbiased_slots{P}_init"] = lambda r, est=est: est(params_init, data(r), keys[r])
            call_names.append(f"unbiased_slots{P}_init")

    iters: dict[str, list] = {name: [] for name in call_names}

    def on_output(name, r, out):  # called after the clock stops: reads num_iters per call
        if name in iters:
            info = out[1]
            n = np.asarray(info["num_iters"])
            P = _slots_of(name)
            if P == "default":  # what "auto" resolved to for this batch on this backend
                P = str(auto_num_slots(n.size) or "")
            evals = int(info["num_log_joint_evals"])
            # work queue: evals = B S + (S+1) (slot-steps + deferred rows re-evaluated);
            # "loop iters" = those rows / P
            if P:
                loop = (evals - n.size * S) // (_slot_count(P) * (S + 1))
            else:
                loop = _loop_iters(info, n.size, S)
            iters[name].append(
                (float(n.mean()), int(n.max()), int(np.asarray(info["capped"]).sum()), loop)
            )

    times = time_interleaved(
        fns, R, warmup=args.warmup, on_output=on_output, rounds_of={n: U for n in call_names}
    )

    floor_t = times["floor"]
    cis_step = (times["mcmc_T2"] - times["mcmc_T1"]) / (T2 - T1)
    coupled_iter = (times["coupled_2"] - times["coupled_1"]) / (n2 - n1)
    rows = {
        "floor": floor_t,
        "elbo": times["elbo"],
        "iwae": times["iwae"],
        "cis_step": cis_step,
        "coupled_iter": coupled_iter,
        "mcmc_fixed": times["mcmc_T1"] - T1 * cis_step,
        "unbiased_fixed": times["coupled_1"] - n1 * coupled_iter,
    }
    for w, (_, _, _, _, m1, m2, _) in width_pairs.items():
        rows[f"coupled_iter_w{w}"] = (times[f"width{w}_2"] - times[f"width{w}_1"]) / (m2 - m1)
    rows.update({name: times[name] for name in call_names})

    out = {
        "S": S,
        "cis_step_method": f"make_mcmc_grad num_steps = {T1} vs {T2}",
        "coupled_method": how,
        "coupled_loop_iters": [n1, n2],
        "raw_seconds": {k: v.tolist() for k, v in times.items()},
        "rows": {},
        "num_iters": {},
        "targets": [],
    }
    for name, t in rows.items():
        out["rows"][name] = {
            "ms": summarize(t * 1e3)._asdict(),
            "ratio_to_floor": summarize(t / floor_t[: len(t)])._asdict(),
        }
    for name in call_names:
        mean_it = np.array([c[0] for c in iters[name]])
        max_it = np.array([c[1] for c in iters[name]])
        loop_it = np.array([c[3] for c in iters[name]])
        t = times[name]
        fl = floor_t[: len(t)]
        out["num_iters"][name] = {
            "batch_mean": summarize(mean_it)._asdict(),
            "batch_max": summarize(max_it)._asdict(),
            "batch_max_overall": int(max_it.max()),
            "capped_lanes": int(sum(c[2] for c in iters[name])),
            "loop_iters": summarize(loop_it)._asdict(),
            "ms_per_loop_iter": summarize(t * 1e3 / np.maximum(loop_it, 1))._asdict(),
            "masked_fraction": summarize(1 - mean_it / np.maximum(max_it, 1))._asdict(),
            "per_call": [list(p) for p in iters[name]],
            "ratio_to_max_bound": summarize(t / ((1 + max_it) * fl))._asdict(),
            "ratio_to_mean_bound": summarize(t / ((1 + mean_it) * fl))._asdict(),
        }

    def target(label, value, threshold, stretch=False):
        out["targets"].append(
            {
                "target": label,
                "value": value,
                "threshold": threshold,
                "pass": bool(value <= threshold),
                "stretch": stretch,
            }
        )

    target("iwae / floor", summarize(times["iwae"] / floor_t).median, TARGET_IWAE)
    target("coupled iter / cis step", summarize(coupled_iter / cis_step).median, TARGET_COUPLED)
    for name in call_names:
        nu = out["num_iters"][name]
        label = CALL_LABELS[_call_kind(name)].format(
            P=_slots_label(_slots_of(name), batches[0].shape[0])
        )
        target(
            f"{label}: t / ((1+max iters) floor)",
            nu["ratio_to_max_bound"]["median"],
            TARGET_UNBIASED,
        )
        target(
            f"{label}: t / ((1+mean iters) floor)",
            nu["ratio_to_mean_bound"]["median"],
            TARGET_UNBIASED_MEAN,
        )
    return out


CALL_LABELS = {
    "plain": "unbiased_grad (trained)",
    "plain_init": "unbiased_grad (at init)",
    "slots": "unbiased_grad num_slots={P} (trained)",
    "slots_init": "unbiased_grad num_slots={P} (at init)",
}


def _call_kind(name: str) -> str:
    kind = "slots" if "slots" in name else "plain"
    return kind + ("_init" if name.endswith("_init") else "")


def _slots_of(name: str) -> str:
    """'unbiased_slots10_init' -> '10'; 'unbiased_slots10flat' -> '10flat' (no cascade);
    '10eager' (no deferred backward)."""
    if "slots" not in name:
        return ""
    return name.split("slots")[1].split("_")[0]


def _slot_count(tag: str) -> int:
    return int(tag.removesuffix("flat").removesuffix("eager"))


def _slots_label(tag: str, batch: int | None = None) -> str:
    """The P of a label: '10' -> '10' (cascade), '10flat' -> '10 (no cascade)', '10eager' ->
    '10 (no deferred backward)', 'default' -> 'default (auto: 25)' for a batch of 100 on CPU."""
    if tag == "default":
        if batch is None:
            return "default (auto)"
        resolved = auto_num_slots(batch)
        return f"default (auto: {'plain loop' if resolved is None else resolved})"
    if tag.endswith("flat"):
        return f"{_slot_count(tag)} (no cascade)"
    if tag.endswith("eager"):
        return f"{_slot_count(tag)} (no deferred backward)"
    return tag


# ----------------------------------------------------------------------------------------------
# Reporting.

ROW_LABELS = {
    "floor": "floor: hand-written IWAE-S grad",
    "elbo": "ELBO grad, S samples (library)",
    "iwae": "IWAE-S grad (library)",
    "cis_step": "one CIS step (+h), differenced",
    "coupled_iter": "one coupled iteration, differenced",
    "mcmc_fixed": "make_mcmc_grad fixed cost (0 steps)",
    "unbiased_fixed": "unbiased_grad fixed cost (0 iters)",
}


def _row_label(name: str) -> str:
    if name in ROW_LABELS:
        return ROW_LABELS[name]
    if name.startswith("coupled_iter_w"):
        return f"one coupled iteration at batch width {name[len('coupled_iter_w') :]}"
    return CALL_LABELS[_call_kind(name)].format(P=_slots_label(_slots_of(name)))


def _fmt(d: dict, digits: int = 2) -> str:
    return f"{d['median']:.{digits}f} [{d['q25']:.{digits}f}, {d['q75']:.{digits}f}]"


def markdown_tables(result: dict) -> str:
    """The per-S tables and the targets table, as GitHub markdown."""
    lines = []
    for res in result["per_s"]:
        lines.append(
            f"\n#### S = {res['S']}\n\ncis step: {res['cis_step_method']}; coupled iteration: "
            f"plain loop, {res['coupled_method']}, timed {res['coupled_loop_iters'][0]} vs "
            f"{res['coupled_loop_iters'][1]} iterations.\n"
        )
        lines.append("| variant | ms, median [IQR] | x floor, median [IQR] |")
        lines.append("| --- | --- | --- |")
        for name, row in res["rows"].items():
            lines.append(
                f"| {_row_label(name)} | {_fmt(row['ms'])} | {_fmt(row['ratio_to_floor'])} |"
            )
        lines.append("")
        lines.append(
            "| call | batch-mean num_iters | batch-max num_iters (largest) | capped lanes | "
            "masked lane-iters (plain loop) | loop iters (queue: evaluated rows / P) | "
            "ms / loop iter | "
            "t / ((1+max) floor) | t / ((1+mean) floor) |"
        )
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, nu in res["num_iters"].items():
            lines.append(
                f"| {_row_label(name)} | {_fmt(nu['batch_mean'])} | "
                f"{_fmt(nu['batch_max'], 0)} ({nu['batch_max_overall']}) | "
                f"{nu['capped_lanes']} | {_fmt(nu['masked_fraction'])} | "
                f"{_fmt(nu['loop_iters'], 0)} | {_fmt(nu['ms_per_loop_iter'])} | "
                f"{_fmt(nu['ratio_to_max_bound'])} | {_fmt(nu['ratio_to_mean_bound'])} |"
            )
    lines.append("\n#### Targets (median of per-round paired ratios)\n")
    lines.append("| S | target | measured | threshold | result |")
    lines.append("| --- | --- | --- | --- | --- |")
    for res in result["per_s"]:
        for t in res["targets"]:
            verdict = "PASS" if t["pass"] else "FAIL"
            if t["stretch"]:
                verdict += " (stretch)"
            lines.append(
                f"| {res['S']} | {t['target']} | {t['value']:.2f} | <= {t['threshold']} | "
                f"{verdict} |"
            )
    return "\n".join(lines)


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jaxlib

    dev = jax.devices()[0]
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


# ----------------------------------------------------------------------------------------------
# CLI.


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in result["settings"].items()}
    path.write_text(json.dumps(result | {"settings": settings}, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--num-particles", type=int, nargs="+", default=[5, 10, 50], metavar="S")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per S (default 15)")
    p.add_argument(
        "--unbiased-repeats",
        type=int,
        default=6,
        help="timed rounds of the unbiased_grad calls (each is many floors long; default 6)",
    )
    p.add_argument(
        "--max-iters",
        type=int,
        default=1000,
        help="unbiased_grad max_iters (default 1000, the library's default)",
    )
    p.add_argument(
        "--num-slots",
        type=int,
        nargs="*",
        default=[25],
        metavar="P",
        help="also time the work-queue loop, P slots cascading to 1 (default 25; none to skip)",
    )
    p.add_argument(
        "--flat-slots",
        type=int,
        nargs="*",
        default=[],
        metavar="P",
        help="also time the work-queue loop with P slots to the end (slot_cascade=False)",
    )
    p.add_argument(
        "--eager-slots",
        type=int,
        nargs="*",
        default=[],
        metavar="P",
        help="also time the P-slot cascade with a backward pass every iteration "
        "(deferred_backward=False)",
    )
    p.add_argument(
        "--default-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time make_unbiased_grad with the library's default loop options (default on)",
    )
    p.add_argument(
        "--width-scan",
        type=int,
        nargs="*",
        default=[],
        metavar="W",
        help="also time one coupled iteration at these batch widths (cost of few active lanes)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant")
    p.add_argument(
        "--train-steps", type=int, default=300, help="IWAE-5 Adam steps before timing (default 300)"
    )
    p.add_argument(
        "--diff-steps",
        type=int,
        default=8,
        help="T2 - T1 and M2 - M1 for the differenced per-step costs (default 8)",
    )
    p.add_argument("--num-batches", type=int, default=5, help="distinct data batches cycled")
    p.add_argument("--model", choices=["auto", "library", "local"], default="auto")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write raw numbers")
    args = p.parse_args(argv)
    if args.quick:
        args.num_particles = [5]
        args.batch_size = min(args.batch_size, 8)
        args.repeats = 2
        args.unbiased_repeats = 1
        args.num_slots = [2] if args.num_slots else []
        args.flat_slots = [2] if args.flat_slots else []
        args.eager_slots = [2] if args.eager_slots else []
        args.width_scan = [2] if args.width_scan else []
        args.max_iters = min(args.max_iters, 50)
        args.train_steps = min(args.train_steps, 2)
        args.diff_steps = 2
        args.num_batches = 2
    for name in ("batch_size", "repeats", "unbiased_repeats", "diff_steps", "num_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.train_steps < 0:
        p.error(f"--train-steps must be >= 0, got {args.train_steps}.")
    slot_counts = args.num_slots + args.flat_slots + args.eager_slots
    if any(p < 1 for p in slot_counts):
        p.error(f"--num-slots/--flat-slots/--eager-slots must all be >= 1, got {slot_counts}.")
    if any(s < 2 for s in args.num_particles):
        p.error(f"--num-particles must all be >= 2 (CIS needs two), got {args.num_particles}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    info = machine_info()
    images = load_mnist_train(args.data_dir or default_data_dir())
    data_mean = images.mean(0) / 255.0
    key = jax.random.key(args.seed)
    k_model, k_floor, k_train, k_data = jax.random.split(key, 4)
    model, params_init, model_desc = build_model(args.model, k_model, data_mean)
    floor_params = init_mlp_vae(k_floor, data_mean)
    print(
        f"model: {model_desc} ({num_params(params_init):,} params; floor network "
        f"{num_params(floor_params):,}); batch {args.batch_size}; device {info['device']}",
        flush=True,
    )
    params, train_bound = train(
        model, params_init, images, args.train_steps, args.batch_size, k_train
    )
    print(
        f"trained {args.train_steps} IWAE-5 Adam steps: mean train bound of the last steps "
        f"{train_bound:.1f} nats",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    batches = []
    for kb in jax.random.split(k_data, args.num_batches):
        idx = rng.choice(images.shape[0], args.batch_size, replace=False)
        batches.append(binarize(kb, jnp.asarray(images[idx], jnp.float32) / 255.0))

    result = {"machine": info, "settings": vars(args) | {"model": model_desc}, "per_s": []}
    result["settings"]["train_bound"] = train_bound
    for S in args.num_particles:
        res = bench_one_s(args, model, params, params_init, floor_params, batches, S)
        result["per_s"].append(res)
        print(markdown_tables({"per_s": [res]}), flush=True)
        if args.json is not None:  # after every S, so an interrupted run keeps what it measured
            write_json(args.json, result)

    print("\n## Summary\n")
    print(
        f"{info['date']}; {info['cpu']} ({info['cpu_count']} cores); {info['device']}; "
        f"jax {info['jax']}, jaxlib {info['jaxlib']}; python {info['python']}"
    )
    print(f"command: {info['command']}")
    print(markdown_tables(result))
    if args.json is not None:
        print(f"\nraw numbers written to {args.json}")
    return result


if __name__ == "__main__":
    main()
