"""`trace`: the Conv/Dense call sites of any Flax model, and where BatchNorm folds exactly.

Part of the taps (see `dnq_jax.taps`, which re-exports everything here): the graph a model's
layers are reached by, learnt from one shape-only trace of the model.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dnq_jax import taps_flow
from dnq_jax.taps_flow import LiftedTransformError

PyTree = Any

# The collection holding kernels; Flax lifts it with them, slice by slice, in a stack.
COLLECTION = "params"

_KINDS = (("conv", nn.Conv), ("dense", nn.Dense))


def layer_kind(module: nn.Module) -> str | None:
    """'conv', 'dense', or None for a module that is not a tapped weight layer."""
    for kind, cls in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


def module_name(module: nn.Module) -> str:
    """The '/'-joined module path of a bound module, e.g. 'stage1_block0/conv1'."""
    return "/".join(str(p) for p in module.path)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One call site of a Conv or Dense layer, in call order.

    Attributes:
      name: site name: the module path joined by '/', with '#k' for the k-th repeated call
        and '[i]' for the i-th iteration of a scanned (or member of a vmapped) stack.
      path: the module path; the kernel is params[path...]['kernel'] (stacked for a stack).
      kind: 'conv' or 'dense'.
      index: position in call order (0 = first layer applied).
      kernel_shape: shape of this site's kernel (output channels last for Flax Conv and
        Dense); for a stack, the shape of one slice.
      input_shape: shape of the layer input seen when traced (one iteration's, in a stack).
      output_shape: shape of the layer output seen when traced.
      groups: feature_group_count of a conv (1 for dense), e.g. depthwise convs.
      stack: leading shape of the stored kernel for a layer of a scanned/vmapped stack
        (``(3,)`` for a 3-iteration scan), () otherwise.
      stack_index: which slice of the stored kernel this site uses (() outside a stack).
      lifted: the Flax lifted transforms around the site, outermost first (e.g.
        ``('remat',)``); captured values of such a site come back through `collect`.
      relu_input: whether the site's input is the output of a ReLU/ReLU6 (from the traced
        data flow; an input entering a lifted body from outside counts as not).
    """

    name: str
    path: tuple[str, ...]
    kind: str
    index: int
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    groups: int = 1
    stack: tuple[int, ...] = ()
    stack_index: tuple[int, ...] = ()
    lifted: tuple[str, ...] = ()
    relu_input: bool = False

    @property
    def out_channels(self) -> int:
        return self.kernel_shape[-1]

    @property
    def kernel_key(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Identifies the kernel (or kernel slice) this site uses: (path, stack_index)."""
        return (self.path, self.stack_index)


@dataclasses.dataclass(frozen=True)
class Graph:
    """What `trace` learns about a model: its layers and its layer -> BatchNorm pairs.

    Attributes:
      layers: every Conv/Dense call site in call order.
      bn_pairs: (layer site name, BatchNorm module path) for each BatchNorm whose input is
        exactly the output of a Conv/Dense site that nothing else reads (found from the
        traced data flow, not from names), i.e. the pairs where folding is exact.
      bn_calls: (BatchNorm module path, number of calls) for every BatchNorm.
    """

    layers: tuple[Layer, ...]
    bn_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    bn_calls: tuple[tuple[tuple[str, ...], int], ...] = ()

    def __getitem__(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers: {self.names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def first(self) -> str:
        """Name of the first layer applied (often kept at 8 bits)."""
        return self.layers[0].name

    @property
    def last(self) -> str:
        """Name of the last layer applied (often kept at 8 bits)."""
        return self.layers[-1].name

    @property
    def lifted(self) -> bool:
        """True if some site runs inside a lifted transform (captures need `collect`)."""
        return any(layer.lifted for layer in self.layers)

    def kernel_layers(self) -> tuple[Layer, ...]:
        """One layer per distinct kernel (the first call site of a shared module); each
        slice of a stacked kernel counts as its own kernel."""
        seen: set = set()
        out = []
        for layer in self.layers:
            if layer.kernel_key not in seen:
                seen.add(layer.kernel_key)
                out.append(layer)
        return tuple(out)


def _suffix(index: tuple[int, ...]) -> str:
    return "[" + ",".join(str(i) for i in index) + "]" if index else ""


def trace(model: nn.Module, variables: PyTree, *args: Any, **apply_kwargs: Any) -> Graph:
    """Find the Conv/Dense layers and exact layer -> BatchNorm pairs of `model` by tracing.

    Costs no FLOPs (a shape-only jaxpr). `args`/`apply_kwargs` are what `model.apply` takes
    after the variables (e.g. a batch of images and `train=False`). Only static facts
    (names, shapes) are kept from inside the trace, so lifted transforms are fine.

    Raises:
      LiftedTransformError: if a Conv/Dense/BatchNorm runs inside a Flax transform the taps
        cannot reach, or in a scan/vmap whose params are not stacked on axis 0.
      ValueError: if the model cannot be applied to `args` (naming the inputs' shapes), or
        if it has no Conv or Dense layer.
    """
    params = variables.get(COLLECTION, {}) if isinstance(variables, Mapping) else {}
    raw: list[dict] = []
    bns: list[tuple[tuple[str, ...], str | None, str]] = []
    outputs: dict[int, str] = {}
    saved: dict[tuple, tuple[int, int]] = {}
    sites = taps_flow.Sites()
    marks = itertools.count()

    def interceptor(next_fun, a, kw, context):
        if context.method_name != "__call__":
            return next_fun(*a, **kw)
        module = context.module
        kinds = taps_flow.lifted_kinds(module)
        key = taps_flow.body_root_key(module)
        if sites.enter(key, kinds):
            del raw[saved[key][0] :], bns[saved[key][1] :]
        if key is not None:
            saved[key] = (len(raw), len(bns))
        try:
            return record(module, kinds, next_fun, a, kw)
        finally:
            sites.exit(key)

    def record(module, kinds, next_fun, a, kw):
        kind = layer_kind(module)
        if isinstance(module, nn.BatchNorm):
            taps_flow.check_supported(module, kinds, "BatchNorm")
            x = a[0] if a else kw.get("x")
            scope = f"taps_bn_{next(marks)}"
            bns.append((tuple(module.path), outputs.get(id(x)), scope))
            with jax.named_scope(scope):
                return next_fun(*a, **kw)
        if kind is None:
            return next_fun(*a, **kw)
        taps_flow.check_supported(module, kinds, "layer")
        name = sites(module)
        inner = tuple(module.variables[COLLECTION]["kernel"].shape)
        stack = ()
        if kinds:
            stored = taps_flow.stored_kernel_shape(params, module.path)
            stack = taps_flow.stack_of(module, kinds, stored, inner)
        x = a[0] if a else kw["inputs"]
        in_mark = f"taps_in_{next(marks)}"
        # Traced only: the barrier's operand is the value that produced the input, which
        # `relu_fed` then checks.
        with jax.named_scope(in_mark):
            xb = jax.lax.optimization_barrier(x)
        a, kw = ((xb, *a[1:]), kw) if a else (a, {**kw, "inputs": xb})
        out = next_fun(*a, **kw)
        mark = f"taps_out_{next(marks)}"
        # Traced only, never run: the barrier gives the layer output its own jaxpr variable,
        # whose readers `exclusive_consumers` then checks.
        with jax.named_scope(mark):
            out = jax.lax.optimization_barrier(out)
        outputs[id(out)] = mark
        raw.append(
            dict(
                name=name,
                path=tuple(module.path),
                kind=kind,
                kernel_shape=inner,
                input_shape=tuple(x.shape),
                output_shape=tuple(out.shape),
                groups=getattr(module, "feature_group_count", 1),
                stack=stack,
                lifted=kinds,
                mark=mark,
                in_mark=in_mark,
                owner=taps_flow.stack_owner(module) if stack else (),
            )
        )
        return out

    def run(variables, *args):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **apply_kwargs)

    try:
        jaxpr = jax.make_jaxpr(run)(variables, *args)
    except LiftedTransformError:
        raise
    except Exception as e:  # noqa: BLE001 - any other failure means the inputs do not fit
        shapes = [getattr(a, "shape", type(a).__name__) for a in args]
        raise ValueError(
            f"images: the model cannot be applied to inputs of shape {shapes}: {e}"
        ) from e
    if not raw:
        raise ValueError(
            f"model: {type(model).__name__} has no Conv or Dense layer to quantize or perturb"
        )
    exclusive = taps_flow.exclusive_consumers(
        jaxpr.jaxpr, {src: scope for _, src, scope in bns if src is not None}
    )
    relu = taps_flow.relu_fed(jaxpr.jaxpr, {r["in_mark"] for r in raw})
    for r in raw:
        r["relu_input"] = r["in_mark"] in relu
    layers, names_of = _unroll(raw)
    pairs = [(name, path) for path, src, _ in bns if src in exclusive for name in names_of[src]]
    calls: dict[tuple[str, ...], int] = {}
    for path, _, _ in bns:
        calls[path] = calls.get(path, 0) + 1
    return Graph(layers=tuple(layers), bn_pairs=tuple(pairs), bn_calls=tuple(calls.items()))


def _unroll(raw: list[dict]) -> tuple[list[Layer], dict[str, list[str]]]:
    """Layers in call order, a stack's consecutive sites repeated once per iteration."""
    layers: list[Layer] = []
    names_of: dict[str, list[str]] = {}
    groups = itertools.groupby(raw, key=lambda r: (r["owner"], r["stack"]))
    for (_, stack), group in groups:
        group = list(group)
        for index in np.ndindex(*stack) if stack else [()]:
            for r in group:
                fields = {k: v for k, v in r.items() if k not in ("mark", "in_mark", "owner")}
                name = r["name"] + _suffix(tuple(index))
                names_of.setdefault(r["mark"], []).append(name)
                fields.update(name=name, stack_index=tuple(int(i) for i in index))
                layers.append(Layer(index=len(layers), **fields))
    return layers, names_of
