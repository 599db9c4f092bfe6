"""Loss landscapes along filter-normalised random directions (Li et al., 2018).

A random direction d (Gaussian, like params) is rescaled filter by filter so that each
filter of d has the norm of the same filter of the weights: ``d_c <- d_c ||w_c|| / ||d_c||``.
A filter is one output channel, the last axis of a Flax Conv (HWIO, depthwise HW1O) or Dense
(IO) kernel, so every leaf of rank >= 2 is normalised per index of its last axis. Leaves of
rank <= 1 (biases, BatchNorm scale and offset) are set to zero by default, as in the paper;
with ``ignore_1d=False`` they get d = w (their own value), as the paper's code does. The
BatchNorm running statistics are not params: the loss function holds them fixed.

Filter normalisation removes the scale invariance of ReLU/BN networks (scaling a filter
before a BatchNorm changes nothing), so landscapes of different networks, or of the same
network trained differently, are comparable: the width of the basin is in units of the
weights' own size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax.diagnostics.hessian import LossFn, random_tree
from dnq_jax.diagnostics.loss import as_chunked

PyTree = Any


def filter_normalized_direction(
    params: PyTree, key: jax.Array, *, ignore_1d: bool = True
) -> PyTree:
    """A random Gaussian direction like `params`, each filter scaled to the weight's norm.

    Args:
      params: the params pytree (kernels with output channels last).
      key: PRNG key of the Gaussian draw.
      ignore_1d: zero direction for leaves of rank <= 1 (default); else d = w there.

    Returns:
      A pytree like `params`.
    """
    return _filter_normalized(params, key, bool(ignore_1d))


@functools.partial(jax.jit, static_argnums=2)
def _filter_normalized(params: PyTree, key: jax.Array, ignore_1d: bool) -> PyTree:
    draw = random_tree(jax.tree.map(lambda w: w.astype(jnp.float32), params), key)
    return jax.tree.map(lambda w, d: _normalized_leaf(w, d, ignore_1d), params, draw)


def _normalized_leaf(w: jax.Array, d: jax.Array, ignore_1d: bool) -> jax.Array:
    if w.ndim <= 1:
        return jnp.zeros_like(w) if ignore_1d else w
    wf = w.astype(jnp.float32)
    axes = tuple(range(w.ndim - 1))
    w_norm = jnp.sqrt(jnp.sum(wf * wf, axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
    # The floor only matters for an all-zero draw; a zero weight filter gives a zero one.
    return (d * (w_norm / jnp.maximum(d_norm, 1e-10))).astype(w.dtype)


@jax.jit
def _move(params: PyTree, directions: tuple, coeffs: jax.Array) -> PyTree:
    for i, d in enumerate(directions):
        params = jax.tree.map(lambda p, u, c=coeffs[i]: p + (c * u).astype(p.dtype), params, d)
    return params


@dataclasses.dataclass(frozen=True)
class Landscape:
    """Loss values on a line or a plane through params.

    Attributes:
      alphas: coefficients along the first direction.
      betas: coefficients along the second direction (None for a 1-D landscape).
      losses: loss at params + alpha d1 (shape ``(len(alphas),)``) or params + alpha d1 +
        beta d2 (shape ``(len(alphas), len(betas))``).
      directions: the direction pytrees used.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    directions: tuple[PyTree, ...]


def _losses(
    loss_fn: LossFn,
    params: PyTree,
    directions: tuple,
    coeffs: Sequence[np.ndarray],
    callback: Callable[[int, float], None] | None,
) -> np.ndarray:
    out = []
    for i, c in enumerate(coeffs):
        # Moving params is its own small program, so the loss itself is the one compiled for
        # `loss_fn(params)` (shared with any other use of the same loss).
        moved = _move(params, directions, jnp.asarray(c, jnp.float32))
        out.append(float(as_chunked(loss_fn)(moved)))
        if callback is not None:
            callback(i, out[-1])
    return np.array(out)


def _coefficients(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be a non-empty 1-D sequence of finite numbers")
    return arr


def loss_landscape_1d(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    alphas: Sequence[float],
    *,
    direction: PyTree | None = None,
    ignore_1d: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> Landscape:
    """Loss at ``params + alpha * d`` for each alpha, d filter-normalised (or `direction`).

    Each point costs one forward pass over `loss_fn`'s data; alpha = 0 is the loss itself.
    Pass the same `key` to compare models along directions drawn alike. `callback(i, loss)`
    is called after each point.
    """
    alphas = _coefficients(alphas, "alphas")
    if direction is None:
        direction = filter_normalized_direction(params, key, ignore_1d=ignore_1d)
    dirs = (direction,)
    losses = _losses(loss_fn, params, dirs, [np.array([a]) for a in alphas], callback)
    return Landscape(alphas=alphas, betas=None, losses=losses, directions=dirs)


def loss_landscape_2d(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    directions: tuple[PyTree, PyTree] | None = None,
    ignore_1d: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> Landscape:
    """Loss at ``params + alpha * d1 + beta * d2`` on the grid alphas x betas.

    d1 and d2 are independent filter-normalised directions (keys split from `key`), or the
    given `directions`. In high dimension two random directions are nearly orthogonal, so
    no orthogonalisation is done. Costs one forward pass per grid point; `callback(i, loss)`
    is called after each (row-major order).
    """
    alphas = _coefficients(alphas, "alphas")
    betas = _coefficients(betas, "betas")
    if directions is None:
        k1, k2 = jax.random.split(key)
        directions = (
            filter_normalized_direction(params, k1, ignore_1d=ignore_1d),
            filter_normalized_direction(params, k2, ignore_1d=ignore_1d),
        )
    dirs = tuple(directions)
    if len(dirs) != 2:
        raise ValueError(f"directions must be two pytrees, got {len(dirs)}")
    grid = [np.array([a, b]) for a in alphas for b in betas]
    losses = _losses(loss_fn, params, dirs, grid, callback).reshape(len(alphas), len(betas))
    return Landscape(alphas=alphas, betas=betas, losses=losses, directions=dirs)
