"""Sharpness of a minimum: the Hessian's top eigenvalue (power iteration) and its trace
(Hutchinson's estimator), both from Hessian-vector products, never the Hessian itself.

The Hessian-vector product is forward-over-reverse, ``jax.jvp(jax.grad(loss), (p,), (v,))``:
one forward and one backward pass with a tangent, about the cost of two gradients. The
loops over iterations and samples are Python loops over one jitted product by default,
because XLA:CPU runs convolutions inside a rolled loop far slower than the same steps
dispatched one by one; ``loop='fori'`` puts the whole power iteration in one program (on
an accelerator, where that removes the per-iteration dispatch).

``loss_fn`` is a callable params -> scalar, or a `ChunkedLoss` (from `make_loss_fn`): then
every product is the sum of one product per chunk.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax.diagnostics.loss import ChunkedLoss, as_chunked

PyTree = Any
LossFn = Callable[[PyTree], jax.Array] | ChunkedLoss


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product of two pytrees of the same structure, as if each were one flat vector."""

    def dot(x: jax.Array, y: jax.Array) -> jax.Array:
        # Accumulated in at least float32: half-precision sums of many products drift.
        dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
        return jnp.vdot(x.astype(dtype), y.astype(dtype))

    leaves = jax.tree.leaves(jax.tree.map(dot, a, b))
    return functools.reduce(jnp.add, leaves, jnp.float32(0.0))


def _hvp_term(fn: Callable[..., jax.Array], params: PyTree, v: PyTree, data: tuple) -> PyTree:
    grad = lambda p: jax.grad(fn)(p, *data)
    return jax.jvp(grad, (params,), (v,))[1]


@functools.partial(jax.jit, static_argnums=0)
def _hvp_jit(fn: Callable[..., jax.Array], params: PyTree, v: PyTree, *data: Any) -> PyTree:
    return _hvp_term(fn, params, v, data)


def hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """The Hessian of `loss_fn` at `params` times the pytree `v` (same structure as params)."""
    loss = as_chunked(loss_fn)
    out = None
    for chunk in loss.chunks:
        part = _hvp_jit(loss.fn, params, v, *chunk)
        out = part if out is None else _tree_add(out, part)
    return out


@jax.jit
def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def random_tree(params: PyTree, key: jax.Array, kind: str = "normal") -> PyTree:
    """A random pytree like `params` (float32 values cast to each leaf's dtype).

    ``kind='normal'`` draws N(0, 1) entries, ``'rademacher'`` draws +-1. All entries come
    from one draw of the total size, split among the leaves: on XLA:CPU a random-number
    program per leaf (dozens per model) costs seconds of compilation each, one costs one.
    """
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"kind must be 'normal' or 'rademacher', got {kind!r}")
    return _random_tree(params, key, kind)


@functools.partial(jax.jit, static_argnums=2)
def _random_tree(params: PyTree, key: jax.Array, kind: str) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    total = sum(x.size for x in leaves)
    if kind == "normal":
        flat = jax.random.normal(key, (total,), jnp.float32)
    else:
        flat = jax.random.rademacher(key, (total,), jnp.float32)
    out, start = [], 0
    for x in leaves:
        out.append(flat[start : start + x.size].reshape(x.shape).astype(x.dtype))
        start += x.size
    return jax.tree.unflatten(treedef, out)


_jit_vdot = jax.jit(tree_vdot)


@jax.jit
def _unit(v: PyTree) -> PyTree:
    norm = jnp.sqrt(tree_vdot(v, v))
    return jax.tree.map(lambda x: (x / norm).astype(x.dtype), v)


@jax.jit
def _power_update(v: PyTree, hv: PyTree) -> tuple[jax.Array, PyTree]:
    # v has unit norm, so <v, Hv> is the Rayleigh quotient: the eigenvalue estimate.
    return tree_vdot(v, hv), _unit(hv)


@dataclasses.dataclass(frozen=True)
class EigenResult:
    """Outcome of `top_hessian_eigenvalue`.

    Attributes:
      eigenvalue: the final Rayleigh quotient <v, H v> (unit v).
      eigenvector: unit-norm pytree like params: the last normalised H v.
      history: the estimate after each iteration, to show convergence.
    """

    eigenvalue: float
    eigenvector: PyTree
    history: np.ndarray


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    iters: int = 20,
    *,
    tol: float | None = None,
    loop: str = "python",
    callback: Callable[[int, float], None] | None = None,
) -> EigenResult:
    """The Hessian eigenvalue of largest magnitude at `params`, by power iteration.

    Each iteration costs one Hessian-vector product over all of `loss_fn`'s data. Power
    iteration converges to the eigenvalue of largest |lambda|: at a minimum that is the top
    (sharpest) curvature; far from one a large negative eigenvalue may win instead, which
    the sign of the result shows. Convergence is geometric in |lambda_2 / lambda_1|.

    Args:
      loss_fn: params -> scalar, or a `ChunkedLoss`.
      params: where the Hessian is taken.
      key: PRNG key of the random starting vector.
      iters: maximum number of iterations.
      tol: with ``loop='python'``, stop once an estimate changes by at most
        ``tol * |estimate|`` from the previous one (None: run all iterations).
      loop: ``'python'`` (a Python loop over a jitted product; the right choice on CPU) or
        ``'fori'`` (all iterations inside one jitted ``lax.fori_loop``).
      callback: with ``loop='python'``, called as ``callback(i, estimate)`` after each
        iteration (e.g. to show progress).

    Returns:
      An `EigenResult` (eigenvalue, eigenvector, per-iteration history).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if loop not in ("python", "fori"):
        raise ValueError(f"loop must be 'python' or 'fori', got {loop!r}")
    loss = as_chunked(loss_fn)
    v = _unit(random_tree(params, key))
    if loop == "fori":
        lam, v, history = _power_fori(loss.fn, iters, params, v, loss.chunks)
        history = np.asarray(history, np.float64)
        return EigenResult(float(lam), v, history)
    history = []
    for _ in range(iters):
        lam, v = _power_update(v, hvp(loss, params, v))
        history.append(float(lam))
        if callback is not None:
            callback(len(history) - 1, history[-1])
        if tol is not None and len(history) > 1:
            if abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
                break
    return EigenResult(history[-1], v, np.asarray(history, np.float64))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _power_fori(fn, iters: int, params: PyTree, v: PyTree, chunks: tuple):
    def body(i, carry):
        v, _, history = carry
        hv = functools.reduce(_tree_add, [_hvp_term(fn, params, v, c) for c in chunks])
        lam, v = _power_update(v, hv)
        return v, lam, history.at[i].set(lam)

    init = (v, jnp.float32(0.0), jnp.zeros((iters,), jnp.float32))
    v, lam, history = jax.lax.fori_loop(0, iters, body, init)
    return lam, v, history


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """Outcome of `hessian_trace`.

    Attributes:
      trace: the mean of the samples v^T H v, an unbiased estimate of tr(H).
      stderr: its standard error, std(samples, ddof=1) / sqrt(n).
      samples: every v^T H v.
    """

    trace: float
    stderr: float
    samples: np.ndarray


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    key: jax.Array,
    samples: int = 50,
    *,
    callback: Callable[[int, float], None] | None = None,
) -> TraceResult:
    """tr(H) at `params` by Hutchinson's estimator, E[v^T H v] with Rademacher v.

    Sample i uses the key ``fold_in(key, i)``, so adding samples extends a run rather than
    changing it. Each sample costs one Hessian-vector product over all of the data.

    Args:
      loss_fn: params -> scalar, or a `ChunkedLoss`.
      params: where the Hessian is taken.
      key: PRNG key of the probe vectors.
      samples: number of probe vectors (at least 2, for the standard error).
      callback: called as ``callback(i, v_i^T H v_i)`` after each sample.

    Returns:
      A `TraceResult` (mean, standard error, samples).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    loss = as_chunked(loss_fn)
    values = []
    for i in range(samples):
        k = jax.random.fold_in(key, i)
        # The same product program as the power iteration: one compile serves both.
        v = random_tree(params, k, "rademacher")
        values.append(float(_jit_vdot(v, hvp(loss, params, v))))
        if callback is not None:
            callback(i, values[-1])
    values = np.asarray(values, np.float64)
    stderr = float(values.std(ddof=1) / np.sqrt(samples))
    return TraceResult(float(values.mean()), stderr, values)
