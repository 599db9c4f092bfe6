"""DNQ noise: differential weight noise and stochastic activation drop-in (DESIGN section 3).

Everything is a pure function of explicit PRNG keys. Keys are derived, never chained: the
step key is fold_in(noise_key, step) and a layer's key is fold_in(step_key, layer index), so
the sample a step drew can be regenerated later from (step, layer) alone. That is what lets
the differential form subtract the previous step's sample without storing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import taps
from dnq_jax.dnq.profiler import NoiseStats

PyTree = Any

WEIGHT_MODES = ("differential", "naive", "accumulate")
MASKS = ("uniform", "salience")


def step_keys(noise_key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(k_t, k_{t-1}) = (fold_in(noise_key, step), fold_in(noise_key, step - 1)).

    `step` may be traced. Step 0's "previous" key folds in -1 taken modulo 2^32, a value no
    real step reaches, so it is still distinct from every k_t.
    """
    step = jnp.asarray(step, jnp.int32)
    prev = (step - 1).astype(jnp.uint32)
    return jax.random.fold_in(noise_key, step.astype(jnp.uint32)), jax.random.fold_in(
        noise_key, prev
    )


def _flat_draw(draw: Callable, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    # XLA:CPU compiles threefry for an N-d shape several times slower than for the flat one
    # (seconds per draw for 4-d conv tensors); with partitionable threefry, the default, the
    # flat draw reshaped holds the very same values, and the reshape is free.
    return draw(key, (math.prod(shape),), dtype).reshape(shape)


def sample_delta(
    key: jax.Array, shape: tuple[int, ...], mu: jax.Array, sigma: jax.Array, dtype=jnp.float32
) -> jax.Array:
    """delta ~ N(mu_c, sigma_c^2) elementwise, mu and sigma of shape (C,) on the last axis.

    Drawn in float32 and cast to `dtype`.

    Raises:
      ValueError: if mu or sigma is not of shape (shape[-1],).
    """
    shape = tuple(shape)
    for name, v in (("mu", mu), ("sigma", sigma)):
        if not shape or jnp.shape(v) != shape[-1:]:
            raise ValueError(f"{name} must have shape {shape[-1:]} for a sample of {shape}")
    z = _flat_draw(jax.random.normal, key, shape, jnp.float32)
    return (jnp.asarray(mu, jnp.float32) + jnp.asarray(sigma, jnp.float32) * z).astype(dtype)


def _kernel_stats(graph: taps.Graph, stats: NoiseStats) -> dict[tuple[str, ...], int]:
    """Kernel path -> index into stats.w_mu, after checking the stats fit the graph."""
    kernels = graph.kernel_layers()
    if len(stats.w_mu) != len(kernels) or len(stats.w_sigma) != len(kernels):
        raise ValueError(
            f"stats has {len(stats.w_mu)} weight entries but the graph has {len(kernels)} kernels"
        )
    for i, layer in enumerate(kernels):
        if stats.w_mu[i].shape != (layer.out_channels,):
            raise ValueError(
                f"stats.w_mu[{i}] has shape {stats.w_mu[i].shape}, but kernel {layer.name!r} "
                f"has {layer.out_channels} output channels"
            )
    return {layer.path: i for i, layer in enumerate(kernels)}


def _layer_delta(key, i: int, w: jax.Array, stats: NoiseStats) -> jax.Array:
    return sample_delta(jax.random.fold_in(key, i), w.shape, stats.w_mu[i], stats.w_sigma[i])


def weight_noise(
    params: PyTree,
    graph: taps.Graph,
    stats: NoiseStats,
    key_t: jax.Array,
    key_prev: jax.Array,
    lam,
    *,
    mode: str = "differential",
) -> PyTree:
    """The params the forward pass sees at this step: kernels perturbed, the rest untouched.

    Per kernel i (graph.kernel_layers() order), with D(k) = sample_delta(fold_in(k, i), ...):
      differential: W + lam * (D(k_t) - D(k_prev));  naive: W + lam * D(k_t);
      accumulate: params unchanged (the trainer adds `weight_sample` after the update).
    The noise does not depend on params, so the Jacobian w.r.t. params is the identity and
    the gradient taken at the noisy point lands on the latent weights unchanged.

    Raises:
      ValueError: on an unknown `mode` or stats that do not fit the graph.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    index = _kernel_stats(graph, stats)
    if mode == "accumulate":
        return params
    lam = jnp.asarray(lam, jnp.float32)

    def perturb(layer: taps.Layer, w: jax.Array) -> jax.Array:
        i = index[layer.path]
        noise = _layer_delta(key_t, i, w, stats)
        if mode == "differential":
            # The same layer index on both steps: D(k_prev) here is bit for bit the sample
            # the previous step drew as its D(k_t), so the two steps' perturbations telescope.
            noise = noise - _layer_delta(key_prev, i, w, stats)
        return w + (lam * noise).astype(w.dtype)

    return taps.map_kernels(params, graph.kernel_layers(), perturb)


def weight_sample(
    params: PyTree, graph: taps.Graph, stats: NoiseStats, key_t: jax.Array, lam
) -> PyTree:
    """A params-shaped pytree holding lam * D(k_t) on each kernel and zeros elsewhere.

    The `accumulate` ablation adds it to the params after the optimizer update, so the noise
    and its mean mu_w pile up in the stored weights. Uses the same per-kernel keys as
    `weight_noise`, so it equals what `naive` mode would add.

    Raises:
      ValueError: on stats that do not fit the graph.
    """
    index = _kernel_stats(graph, stats)
    lam = jnp.asarray(lam, jnp.float32)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def sample(layer: taps.Layer, w: jax.Array) -> jax.Array:
        return (lam * _layer_delta(key_t, index[layer.path], w, stats)).astype(w.dtype)

    return taps.map_kernels(zeros, graph.kernel_layers(), sample)


def _check_dropin_args(rho, mask: str, tau) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    # rho and tau are static settings; a traced value cannot be checked and is let through.
    if isinstance(rho, (int, float, np.number)) and not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if isinstance(tau, (int, float, np.number)) and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")


def _mask_probability(x: jax.Array, rho, mask: str, tau) -> jax.Array:
    """Drop-in probability: the scalar rho, or per channel (last axis) for `salience`."""
    rho = jnp.asarray(rho, jnp.float32)
    if mask == "uniform":
        return rho
    c = x.shape[-1]
    score = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
    p = rho * c * jax.nn.softmax(score / tau)
    # rho * C * softmax averages to exactly rho over channels, but a channel whose softmax
    # share exceeds 1 / (rho C) would need a probability above 1. Clipping caps it at 1 and
    # does not hand the excess to other channels, so with a very peaked softmax (small tau,
    # one dominant channel) the mean rate falls below rho.
    return jax.lax.stop_gradient(jnp.clip(p, 0.0, 1.0))


def activation_dropin(
    key: jax.Array,
    x: jax.Array,
    lam,
    mu,
    sigma,
    *,
    rho=0.5,
    mask: str = "uniform",
    tau=1.0,
) -> jax.Array:
    """x + M * eps with M ~ Bernoulli(p) and eps ~ N(lam mu, (lam sigma)^2), elementwise.

    p is `rho` (`uniform`) or, for `salience`, p_c = clip(rho * C * softmax(mean|x|_c / tau),
    0, 1) per channel c of the last axis (no gradient flows through p). The result has x's
    dtype; lam == 0 returns x exactly.

    Raises:
      ValueError: on an unknown `mask`, rho outside [0, 1] or a non-positive tau.
    """
    _check_dropin_args(rho, mask, tau)
    p = _mask_probability(x, rho, mask, tau)
    # This runs on every layer input at every step, so one uniform per element serves both
    # the mask and the Gaussian: half the random bits of a Bernoulli plus a normal draw.
    # u = (k + 1/2) 2^-23 with k uniform on the 23-bit integers is the midpoint grid of
    # [0, 1): never 0 or 1, and symmetric about 1/2. M = (u < p); given M, u is uniform on
    # [0, p) (to the grid's resolution), hence v = u / p is uniform on [0, 1) whichever
    # elements were masked, and Phi^-1(v) is N(0, 1): eps = lam (mu + sigma Phi^-1(v)) has
    # the asked law on the masked elements. Phi^-1(v) = sqrt(2) erfinv(2v - 1), through
    # XLA's native erf_inv (the op jax.random.normal uses), which compiles to less work
    # than the polynomial ndtri. Clipping v only guards rounding at 1 and a zero p (nothing
    # masked, v discarded), so no NaN reaches any gradient.
    bits = _flat_draw(jax.random.bits, key, x.shape, jnp.uint32)
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0**-23)
    keep = u < p
    v = jnp.clip(u / jnp.maximum(p, 2.0**-23), 2.0**-24, 1.0 - 2.0**-24)
    z = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * v - 1.0)
    lam = jnp.asarray(lam, jnp.float32)
    eps = lam * (jnp.asarray(mu, jnp.float32) + jnp.asarray(sigma, jnp.float32) * z)
    # Drawing in float32 keeps bf16 inputs from a coarse uniform grid; only the finished
    # noise is cast, so the add and everything after it stay in x's dtype.
    return x + jnp.where(keep, eps, 0.0).astype(x.dtype)


def activation_noise_fn(
    graph: taps.Graph,
    stats: NoiseStats,
    key: jax.Array,
    lam,
    *,
    rho=0.5,
    mask: str = "uniform",
    tau=1.0,
) -> Callable[[str, jax.Array], jax.Array]:
    """fn(site name, x) -> drop-in of x, for `taps.map_inputs`.

    Site i (its index in graph.layers) uses key fold_in(key, i) and stats.a_mu[i],
    stats.a_sigma[i].

    Raises:
      ValueError: on bad rho/mask/tau, or stats whose a_mu does not have one entry per site;
        the returned fn raises it for a site name the graph does not know.
    """
    _check_dropin_args(rho, mask, tau)
    n = len(graph.layers)
    if jnp.shape(stats.a_mu) != (n,) or jnp.shape(stats.a_sigma) != (n,):
        raise ValueError(
            f"stats.a_mu / a_sigma must have shape ({n},) for {n} sites, got "
            f"{jnp.shape(stats.a_mu)} / {jnp.shape(stats.a_sigma)}"
        )
    index = {layer.name: i for i, layer in enumerate(graph.layers)}

    def fn(name: str, x: jax.Array) -> jax.Array:
        if name not in index:
            raise ValueError(f"name: site {name!r} is not in the graph {graph.names}")
        i = index[name]
        return activation_dropin(
            jax.random.fold_in(key, i),
            x,
            lam,
            stats.a_mu[i],
            stats.a_sigma[i],
            rho=rho,
            mask=mask,
            tau=tau,
        )

    return fn
