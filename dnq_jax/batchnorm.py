"""Re-estimate BatchNorm statistics for given params (after SWA averaging).

Averaged weights need their own BN statistics: the running averages collected while
training belong to the individual iterates, not to their mean. As in the usual SWA recipe,
the model is run in train mode (each BN normalises with its batch's statistics) over clean
training data, and each BN's running mean/var is replaced by the equal-weight average of the
batch statistics it saw. The model is not modified: BN inputs are read through
`taps.intercept_modules`, so any Linen model with `nn.BatchNorm` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnq_jax import taps

PyTree = Any


def _moments(module: nn.BatchNorm, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feat = {a % x.ndim for a in axis}
    red = tuple(i for i in range(x.ndim) if i not in feat)
    x = x.astype(jnp.float32)
    mean = x.mean(red)
    # Biased variance, as nn.BatchNorm uses for its running average.
    var = jnp.maximum((x * x).mean(red) - mean * mean, 0.0)
    return mean, var


def make_batch_moments(
    model: nn.Module, apply_kwargs: dict | None = None
) -> Callable[[PyTree, jax.Array], dict[tuple[str, ...], tuple[jax.Array, jax.Array]]]:
    """A jitted fn(variables, images) -> {bn module path: (batch mean, batch var)}."""
    kwargs = {"train": True} if apply_kwargs is None else dict(apply_kwargs)

    @jax.jit
    def moments(variables, images):
        found: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}

        def record(module, call, a, kw):
            x = a[0] if a else kw["x"]
            found[tuple(module.path)] = _moments(module, x)
            return call(*a, **kw)

        with taps.intercept_modules(record, lambda m: isinstance(m, nn.BatchNorm)):
            model.apply(variables, images, mutable=["batch_stats"], **kwargs)
        return found

    return moments


def recompute_batch_stats(
    model: nn.Module,
    variables: PyTree,
    batches: Iterable[jax.Array],
    apply_kwargs: dict | None = None,
    moments_fn: Callable | None = None,
) -> PyTree:
    """New variables whose `batch_stats` are the average batch statistics over `batches`.

    `batches` yields model-ready (normalised, unaugmented) image arrays of equal size.
    A model without BatchNorm gets its variables back unchanged.
    """
    if "batch_stats" not in variables:
        return variables
    moments = moments_fn or make_batch_moments(model, apply_kwargs)
    total = None
    n = 0
    for images in batches:
        m = moments(variables, images)
        total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
        n += 1
    if n == 0:
        raise ValueError("batches: no batch to estimate BatchNorm statistics from")
    stats = variables["batch_stats"]
    for path, (mean, var) in total.items():
        stats = _replace(stats, path, {"mean": mean / n, "var": var / n})
    return {**variables, "batch_stats": stats}


def _replace(tree: PyTree, path: tuple[str, ...], leaves: dict) -> dict:
    tree = dict(tree)
    if len(path) == 1:
        node = dict(tree[path[0]])
        for k, v in leaves.items():
            node[k] = v.astype(node[k].dtype)
        tree[path[0]] = node
        return tree
    tree[path[0]] = _replace(tree[path[0]], path[1:], leaves)
    return tree
