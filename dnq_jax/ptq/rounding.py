"""Learned rounding (AdaRound) and learned activation step sizes (LSQ): the pure math.

AdaRound (Nagel et al. 2020) replaces round-to-nearest of a kernel on its per-channel grid
``(s, z)`` by a learned choice between rounding down and up:

    w_soft = (clip(floor(w / s) + h(V) + z, 0, 2^b - 1) - z) * s
    h(V)   = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

``V`` starts where ``h(V)`` equals the fractional part of ``w / s`` (so the soft kernel starts
at the float kernel and its hard decisions, ``V >= 0``, are round-to-nearest), and is pushed
to 0/1 decisions by the regularizer ``sum(1 - |2 h(V) - 1|^beta)`` with ``beta`` annealed
from 20 to 2 after a warm-up. The hard kernel is always on the grid, inside the range.

Activations use the asymmetric per-tensor quantizer with a learnable step size ``s`` and the
calibrated zero point ``z`` held fixed; the gradient of ``s`` is LSQ's (Esser et al. 2020):
round is a straight-through estimator. The learned ``(s, z)`` map back to a range
``[-z s, (2^b - 1 - z) s]`` that `dnq_jax.quant.fake_quant_asymmetric` reproduces exactly,
so a reconstructed model is evaluated by the same code as a round-to-nearest one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dnq_jax import quant

ZETA = 1.1
GAMMA = -0.1


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """AdaRound's h(V): a sigmoid stretched to (gamma, zeta) and clipped to [0, 1]."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(kernel: jax.Array, scale: jax.Array) -> jax.Array:
    """V with h(V) = frac(kernel / scale): the soft kernel starts at the float kernel and
    the hard decisions at round-to-nearest."""
    x = kernel.astype(jnp.float32) / scale
    rest = x - jnp.floor(x)
    # rest in [0, 1) lies strictly inside (gamma, zeta), so the logit is finite.
    return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounded_kernel(
    kernel: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    bits: int,
    v: jax.Array,
    hard: bool,
) -> jax.Array:
    """The kernel on its grid with learned rounding: soft (h(V)) or hard (V >= 0)."""
    x = kernel.astype(jnp.float32) / scale
    up = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
    q = jnp.clip(jnp.floor(x) + up + zero_point, 0.0, 2.0**bits - 1)
    return ((q - zero_point) * scale).astype(kernel.dtype)


def rounding_penalty(v: jax.Array, beta: jax.Array) -> jax.Array:
    """AdaRound's regularizer sum(1 - |2 h(V) - 1|^beta): zero only at hard 0/1 decisions."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(
    t: jax.Array, iters: int, warmup: float, start: float = 20.0, end: float = 2.0
) -> jax.Array:
    """beta at iteration t: `start` until ``warmup * iters``, then linear down to `end`."""
    t0 = warmup * iters
    rel = jnp.clip((t - t0) / max(iters - t0, 1.0), 0.0, 1.0)
    return end + (start - end) * (1.0 - rel)


def grid_of_range(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """``(scale, zero_point)`` of the asymmetric grid over ``[lo, hi]`` (as RTN computes it)."""
    return quant.asymmetric_qparams(lo, hi, bits)


def range_of_grid(
    scale: jax.Array, zero_point: jax.Array, bits: int
) -> tuple[jax.Array, jax.Array]:
    """The range ``(lo, hi)`` whose grid is ``(scale, zero_point)``: the inverse of
    `grid_of_range` for an integer zero point."""
    return -zero_point * scale, (2.0**bits - 1 - zero_point) * scale


def lsq_fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: int) -> jax.Array:
    """Asymmetric fake quantization with a learnable step size (LSQ gradient)."""
    xf = x.astype(jnp.float32)
    q = jnp.clip(quant.ste(jnp.round)(xf / scale) + zero_point, 0.0, 2.0**bits - 1)
    return ((q - zero_point) * scale).astype(x.dtype)
