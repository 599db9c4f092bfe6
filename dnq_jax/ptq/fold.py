"""Fold each BatchNorm into the conv (or dense) layer feeding it, for eval-mode models.

Layer -> BatchNorm pairs come from `taps.trace(...).bn_pairs`, i.e. from the traced data
flow, so any Linen model is handled without knowing its parameter names. For a pair, with
``s = gamma / sqrt(var + eps)`` per output channel:

    kernel' = kernel * s        bias' = beta + (conv_bias - mean) * s

A Flax conv may have no bias parameter, and the model code cannot be changed, so the folded
biases live beside the params in a ``'folded_bias'`` collection keyed by site name (the
conv's own bias, if any, is set to zero since it is part of bias'). The folded model is run
through taps: each folded layer adds its folded bias to its output and each folded BatchNorm
becomes the identity. Use :func:`apply_folded`, or the :func:`folded` context around your own
``model.apply``.

The folded model equals the original in eval mode only (running statistics); it must not be
trained. Folding is exact only where the BatchNorm is the one reader of the layer's raw
output, so a pair is only formed there (`taps.trace` checks every use in the jaxpr): in a
pre-activation block, ``x = conv(x); y = conv(relu(bn(x))); x + y``, the residual add also
reads the raw ``x`` and that BatchNorm stays a float op. Not folded either (left as they are,
still correct): a BatchNorm that normalises an axis other than the layer's output channels,
a BatchNorm called more than once, and a layer whose kernel is shared by several call sites
(one kernel cannot absorb two scales). Inside a scanned stack each iteration's layer is
folded with that iteration's slice of the BatchNorm's (equally stacked) statistics.
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
    epsilon: float
    use_scale: bool
    use_bias: bool
    folds_last_axis: bool


def _batchnorm_info(
    model: nn.Module, variables: PyTree, args: tuple, apply_kwargs: dict
) -> dict[tuple[str, ...], _BNInfo]:
    """Attributes of every BatchNorm, from one shape-only trace (call counts come from the
    graph, which counts a scan body traced twice once)."""
    info: dict[tuple[str, ...], _BNInfo] = {}

    def record(module, call, a, kw):
        x = a[0] if a else kw["x"]
        axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        path = tuple(module.path)
        info[path] = _BNInfo(
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
    calls = dict(graph.bn_calls)
    sites_per_kernel: dict[tuple, int] = {}
    for layer in graph.layers:
        sites_per_kernel[layer.kernel_key] = sites_per_kernel.get(layer.kernel_key, 0) + 1
    stats = variables.get("batch_stats", {})
    plan = []
    for site, bn_path in graph.bn_pairs:
        bn = info.get(bn_path)
        layer = graph[site]
        if bn is None or calls.get(bn_path, 0) != 1 or not bn.folds_last_axis:
            continue
        if sites_per_kernel[layer.kernel_key] != 1:
            continue
        mean = _get(stats, bn_path + ("mean",))
        if mean is not None and tuple(jnp.shape(mean)) != layer.stack + (layer.out_channels,):
            # A stacked layer folds only with statistics stacked the same way (one slice per
            # iteration); anything else would mix iterations.
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


def _f32(value: Any, idx: tuple[int, ...]) -> jax.Array:
    """`value` in float32, sliced to one iteration of a stack (idx non-empty)."""
    value = jnp.asarray(value, jnp.float32)
    return value[idx] if idx else value


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
    stats = variables.get("batch_stats", {})
    for _, bn_path, _ in plan:
        if _get(stats, bn_path) is None:
            raise ValueError(f"variables: no 'batch_stats' for the BatchNorm {'/'.join(bn_path)}")

    def fold_all(params, stats):
        flat = dict(traverse_util.flatten_dict(params))
        biases: dict[str, jax.Array] = {}
        for site, bn_path, bn in plan:
            layer = graph[site]
            path, idx = layer.path, layer.stack_index
            bn_stats = _get(stats, bn_path)
            # Fold in float32 whatever the storage dtype: rsqrt and the products lose too
            # much in half precision, and the folded values are cast back to the kernel's.
            mean, var = _f32(bn_stats["mean"], idx), _f32(bn_stats["var"], idx)
            gamma = _f32(_get(params, bn_path + ("scale",)), idx) if bn.use_scale else 1.0
            beta = _f32(_get(params, bn_path + ("bias",)), idx) if bn.use_bias else 0.0
            scale = gamma * jax.lax.rsqrt(var + bn.epsilon)
            conv_bias = jnp.float32(0.0)
            if path + ("bias",) in flat:
                stored = flat[path + ("bias",)]
                conv_bias = _f32(stored, idx)
                flat[path + ("bias",)] = stored.at[idx].set(0) if idx else jnp.zeros_like(stored)
            biases[site] = beta + (conv_bias - mean) * scale
            stored = flat[path + ("kernel",)]
            kernel = _f32(stored, idx)
            new = (kernel * scale).astype(stored.dtype)
            flat[path + ("kernel",)] = stored.at[idx].set(new) if idx else new
        return traverse_util.unflatten_dict(flat), biases

    # One compiled program for all the pairs: op by op, every distinct shape would compile
    # its own small programs (seconds for a MobileNetV2).
    params, biases = jax.jit(fold_all)(variables["params"], stats)
    folded = dict(variables)
    folded["params"] = params
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

    def add_bias(name: str, y: jax.Array) -> jax.Array:
        # Added in at least float32; the bypassed BatchNorm then casts to its own out dtype.
        bias = folded_bias[name]
        return y.astype(jnp.promote_types(y.dtype, bias.dtype)) + bias

    is_folded_bn = lambda m: isinstance(m, nn.BatchNorm) and tuple(m.path) in bn_paths
    with taps.map_outputs(add_bias, only=folded_bias.keys()):
        with taps.intercept_modules(_bypass, is_folded_bn):
            yield


def apply_folded(
    model: nn.Module,
    variables: PyTree,
    pairs: Iterable[Pair],
    *args: Any,
    graph: taps.Graph | None = None,
    **apply_kwargs: Any,
) -> Any:
    """``model.apply`` of the folded model: `variables` and `pairs` from :func:`fold_batchnorm`.

    Pass `graph` (the model's `taps.trace` graph) for a model with scanned/vmapped stacks,
    or apply it to `taps.prepare`d variables: their folded biases are picked per iteration.
    """
    model_vars, biases = split_folded(variables)
    if graph is not None:
        model_vars = taps.prepare(model_vars, graph)
    with folded(biases, pairs):
        return model.apply(model_vars, *args, **apply_kwargs)
