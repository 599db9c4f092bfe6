"""Fold each BatchNorm into the conv that feeds it, for inference-time (eval-mode) models.

Conv -> BatchNorm pairs come from `taps.trace(...).bn_pairs`, i.e. from the traced data flow,
so any Linen model is handled without knowing its parameter names. For a pair, with
``s = gamma / sqrt(var + eps)`` per output channel:

    kernel' = kernel * s        bias' = beta + (conv_bias - mean) * s

A Flax conv may have no bias parameter, and the model code cannot be changed, so the folded
biases live beside the params in a ``'folded_bias'`` collection keyed by conv site name (the
conv's own bias, if any, is set to zero since it is part of bias'). The folded model is run
through taps: each folded conv adds its folded bias to its output and each folded BatchNorm
becomes the identity. Use :func:`apply_folded`, or the :func:`folded` context around your own
``model.apply``.

The folded model equals the original in eval mode only (running statistics); it must not be
trained. Not folded (left as they are, still correct): a BatchNorm that normalises an axis
other than the conv's output channels, a BatchNorm called more than once, and a conv whose
kernel is shared by several call sites (one kernel cannot absorb two scales). A conv whose raw
output is used elsewhere besides its BatchNorm would be changed for that other use as well;
the zoo and ordinary conv -> BN -> activation nets never do that.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import dtypes as flax_dtypes

from dnq_jax import taps

PyTree = Any
Pair = tuple[str, tuple[str, ...]]

FOLDED_BIAS = "folded_bias"


@dataclasses.dataclass(frozen=True)
class _BNInfo:
    calls: int
    epsilon: float
    use_scale: bool
    use_bias: bool
    folds_last_axis: bool


def _batchnorm_info(
    model: nn.Module, variables: PyTree, args: tuple, apply_kwargs: dict
) -> dict[tuple[str, ...], _BNInfo]:
    """Attributes and call count of every BatchNorm, from one shape-only trace."""
    info: dict[tuple[str, ...], _BNInfo] = {}

    def record(module, call, a, kw):
        x = a[0] if a else kw["x"]
        axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        path = tuple(module.path)
        prev = info.get(path)
        info[path] = _BNInfo(
            calls=1 if prev is None else prev.calls + 1,
            epsilon=float(module.epsilon),
            use_scale=bool(module.use_scale),
            use_bias=bool(module.use_bias),
            folds_last_axis=tuple(ax % x.ndim for ax in axes) == (x.ndim - 1,),
        )
        return call(*a, **kw)

    def run(variables, *args):
        with taps.intercept_modules(record, lambda m: isinstance(m, nn.BatchNorm)):
            return model.apply(variables, *args, **apply_kwargs)

    jax.eval_shape(run, variables, *args)
    return info


def _get(tree: Mapping, path: Iterable[str], default: Any = None) -> Any:
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return default
        node = node[p]
    return node


def _plan(
    model: nn.Module,
    variables: PyTree,
    args: tuple,
    apply_kwargs: dict,
    graph: taps.Graph | None,
) -> tuple[taps.Graph, list[tuple[str, tuple[str, ...], _BNInfo]]]:
    if graph is None:
        graph = taps.trace(model, variables, *args, **apply_kwargs)
    info = _batchnorm_info(model, variables, args, apply_kwargs)
    sites_per_kernel: dict[tuple[str, ...], int] = {}
    for layer in graph.layers:
        sites_per_kernel[layer.path] = sites_per_kernel.get(layer.path, 0) + 1
    plan = []
    for site, bn_path in graph.bn_pairs:
        bn = info.get(bn_path)
        if bn is None or bn.calls != 1 or not bn.folds_last_axis:
            continue
        if sites_per_kernel[graph[site].path] != 1:
            continue
        plan.append((site, bn_path, bn))
    return graph, plan


def foldable_pairs(
    model: nn.Module,
    variables: PyTree,
    *args: Any,
    graph: taps.Graph | None = None,
    **apply_kwargs: Any,
) -> tuple[Pair, ...]:
    """The (conv site, BatchNorm path) pairs of `model` that :func:`fold_batchnorm` folds.

    `args`/`apply_kwargs` are an eval-mode call of the model (e.g. a few images), used for
    shapes only. Pass `graph` if the model is already traced.
    """
    _, plan = _plan(model, variables, args, apply_kwargs, graph)
    return tuple((site, bn_path) for site, bn_path, _ in plan)


def fold_batchnorm(
    model: nn.Module,
    variables: PyTree,
    *args: Any,
    graph: taps.Graph | None = None,
    **apply_kwargs: Any,
) -> tuple[PyTree, tuple[Pair, ...]]:
    """BN-folded variables of `model`, and the (conv site, BatchNorm path) pairs folded.

    Args:
      model: any Flax Linen model.
      variables: its variables, running statistics in ``'batch_stats'``.
      *args: an eval-mode call's positional inputs (e.g. a few images); shapes only.
      graph: the model's `taps.trace` graph, if already computed.
      **apply_kwargs: the rest of an eval-mode call, e.g. ``train=False``.

    Returns:
      ``(folded_variables, pairs)``: ``folded_variables`` has the folded kernels in
      ``'params'`` and the folded biases in ``'folded_bias'`` (``{conv site: bias}``); run it
      with :func:`apply_folded` or inside :func:`folded` with ``pairs``. The input is not
      modified.

    Raises:
      ValueError: if the model cannot be applied to `args`, or has no Conv/Dense layer.
    """
    graph, plan = _plan(model, variables, args, apply_kwargs, graph)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    flat = dict(traverse_util.flatten_dict(params))
    scales: dict[tuple[str, ...], jax.Array] = {}
    biases: dict[str, jax.Array] = {}
    for site, bn_path, bn in plan:
        path = graph[site].path
        bn_stats = _get(stats, bn_path)
        if bn_stats is None:
            raise ValueError(f"variables: no 'batch_stats' for the BatchNorm {'/'.join(bn_path)}")
        # Fold in float32 whatever the storage dtype: rsqrt and the products lose too much
        # in half precision, and the folded values are cast back to the kernel's dtype.
        mean = jnp.asarray(bn_stats["mean"], jnp.float32)
        var = jnp.asarray(bn_stats["var"], jnp.float32)
        gamma = jnp.float32(1.0)
        beta = jnp.float32(0.0)
        if bn.use_scale:
            gamma = jnp.asarray(_get(params, bn_path + ("scale",)), jnp.float32)
        if bn.use_bias:
            beta = jnp.asarray(_get(params, bn_path + ("bias",)), jnp.float32)
        scale = gamma * jax.lax.rsqrt(var + bn.epsilon)
        conv_bias = jnp.float32(0.0)
        if path + ("bias",) in flat:
            conv_bias = jnp.asarray(flat[path + ("bias",)], jnp.float32)
            flat[path + ("bias",)] = jnp.zeros_like(flat[path + ("bias",)])
        scales[path] = scale
        biases[site] = beta + (conv_bias - mean) * scale
    for path, scale in scales.items():
        kernel = flat[path + ("kernel",)]
        flat[path + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) * scale).astype(kernel.dtype)
    folded = dict(variables)
    folded["params"] = traverse_util.unflatten_dict(flat)
    folded[FOLDED_BIAS] = biases
    return folded, tuple((site, bn_path) for site, bn_path, _ in plan)


def split_folded(variables: PyTree) -> tuple[PyTree, dict[str, jax.Array]]:
    """``(model_variables, folded_biases)``: the model's own collections, and the biases."""
    rest = {k: v for k, v in variables.items() if k != FOLDED_BIAS}
    return rest, dict(variables.get(FOLDED_BIAS, {}))


def _bypass(module: nn.BatchNorm, call, args: tuple, kwargs: dict) -> jax.Array:
    del call
    x = args[0] if args else kwargs["x"]
    # The identity must still return what the BatchNorm returned: Flax infers its output
    # dtype from the input and its parameters unless `dtype` is set.
    params = []
    if module.use_scale or module.use_bias:
        params.append(jnp.zeros((), module.param_dtype))
    return jnp.asarray(x, flax_dtypes.canonicalize_dtype(x, *params, dtype=module.dtype))


@contextlib.contextmanager
def folded(folded_bias: Mapping[str, jax.Array], pairs: Iterable[Pair]) -> Iterator[None]:
    """Within the context, `model.apply` runs the folded model.

    Each conv site in `folded_bias` adds its bias to its output, and each folded BatchNorm
    (the paths in `pairs`) is the identity. Apply the model to the variables without the
    ``'folded_bias'`` collection (see :func:`split_folded`), in eval mode.
    """
    bn_paths = frozenset(bn_path for _, bn_path in pairs)

    def add_bias(name: str, x: jax.Array, call) -> jax.Array:
        y = call(x)
        # Added in at least float32; the bypassed BatchNorm then casts to its own out dtype.
        bias = folded_bias[name]
        return y.astype(jnp.promote_types(y.dtype, bias.dtype)) + bias

    is_folded_bn = lambda m: isinstance(m, nn.BatchNorm) and tuple(m.path) in bn_paths
    with taps.intercept_layers(add_bias, only=folded_bias.keys()):
        with taps.intercept_modules(_bypass, is_folded_bn):
            yield


def apply_folded(
    model: nn.Module,
    variables: PyTree,
    pairs: Iterable[Pair],
    *args: Any,
    **apply_kwargs: Any,
) -> Any:
    """``model.apply`` of the folded model: `variables` and `pairs` from :func:`fold_batchnorm`."""
    model_vars, biases = split_folded(variables)
    with folded(biases, pairs):
        return model.apply(model_vars, *args, **apply_kwargs)
