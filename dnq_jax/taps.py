"""Reach every Conv and Dense layer of any Flax Linen model, without changing the model.

Every transform in dnq_jax (weight noise, activation drop-in, fake quantization, activation
capture, BN folding) reaches layers through this module, so it works on models the library
has never seen. Two mechanisms, both pure:

- Kernels are transformed as a pure function of the params pytree (`map_kernels`): the layer
  list from `trace` says where each kernel lives, and the model is applied to new params.
- Layer inputs (and any module call) are transformed with `flax.linen.intercept_methods`
  around the layer's `__call__` (`intercept_layers`, `map_inputs`, `capture_inputs`).

Layers are named by their module path (`'stage1_block0/conv1'`). A module called more than
once in one forward pass (weight sharing) is one kernel but several call sites: the second
call of `'a/b'` is the site `'a/b#1'`, and so on.

Example::

    graph = taps.trace(model, variables, images)
    noisy = taps.map_kernels(variables["params"], graph.layers, lambda l, w: w + 0.01)
    with taps.map_inputs(lambda name, x: jnp.round(x)):
        logits = model.apply({**variables, "params": noisy}, images)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

PyTree = Any

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
      name: site name: the module path joined by '/', with '#k' for the k-th repeated call.
      path: the module path; the kernel is params[path...]['kernel'].
      kind: 'conv' or 'dense'.
      index: position in call order (0 = first layer applied).
      kernel_shape: shape of the kernel (output channels last for Flax Conv and Dense).
      input_shape: shape of the layer input seen when traced.
      output_shape: shape of the layer output seen when traced.
      groups: feature_group_count of a conv (1 for dense), e.g. depthwise convs.
    """

    name: str
    path: tuple[str, ...]
    kind: str
    index: int
    kernel_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class Graph:
    """What `trace` learns about a model: its layers and its Conv -> BatchNorm pairs.

    Attributes:
      layers: every Conv/Dense call site in call order.
      bn_pairs: (conv site name, BatchNorm module path) for each BatchNorm whose input is
        exactly the output of a conv (found from the traced data flow, not from names).
    """

    layers: tuple[Layer, ...]
    bn_pairs: tuple[tuple[str, tuple[str, ...]], ...]

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

    def kernel_layers(self) -> tuple[Layer, ...]:
        """One layer per distinct kernel (the first call site of a shared module)."""
        seen: set[tuple[str, ...]] = set()
        out = []
        for layer in self.layers:
            if layer.path not in seen:
                seen.add(layer.path)
                out.append(layer)
        return tuple(out)


class _SiteNamer:
    """Names call sites within one forward pass: 'a/b', then 'a/b#1' for a repeated call."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, module: nn.Module) -> str:
        base = module_name(module)
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"


def trace(model: nn.Module, variables: PyTree, *args: Any, **apply_kwargs: Any) -> Graph:
    """Find the Conv/Dense layers and Conv -> BatchNorm pairs of `model` by tracing one call.

    Costs no FLOPs (`jax.eval_shape`). `args`/`apply_kwargs` are what `model.apply` takes
    after the variables (e.g. a batch of images and `train=False`).

    Raises:
      ValueError: if the model cannot be applied to `args` (naming the inputs' shapes), or
        if it has no Conv or Dense layer.
    """
    layers: list[Layer] = []
    bn_pairs: list[tuple[str, tuple[str, ...]]] = []
    conv_outputs: dict[int, str] = {}
    namer = _SiteNamer()

    def interceptor(next_fun, a, kw, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*a, **kw)
        kind = layer_kind(module)
        if isinstance(module, nn.BatchNorm) and a and id(a[0]) in conv_outputs:
            bn_pairs.append((conv_outputs[id(a[0])], tuple(module.path)))
        out = next_fun(*a, **kw)
        if kind is not None:
            name = namer(module)
            x = a[0] if a else kw["inputs"]
            layers.append(
                Layer(
                    name=name,
                    path=tuple(module.path),
                    kind=kind,
                    index=len(layers),
                    kernel_shape=tuple(module.variables["params"]["kernel"].shape),
                    input_shape=tuple(x.shape),
                    output_shape=tuple(out.shape),
                    groups=getattr(module, "feature_group_count", 1),
                )
            )
            if kind == "conv":
                conv_outputs[id(out)] = name
        return out

    def run(variables, *args):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **apply_kwargs)

    try:
        jax.eval_shape(run, variables, *args)
    except Exception as e:  # noqa: BLE001 - any failure here means the inputs do not fit
        shapes = [getattr(a, "shape", type(a).__name__) for a in args]
        raise ValueError(
            f"images: the model cannot be applied to inputs of shape {shapes}: {e}"
        ) from e
    if not layers:
        raise ValueError(
            f"model: {type(model).__name__} has no Conv or Dense layer to quantize or perturb"
        )
    return Graph(layers=tuple(layers), bn_pairs=tuple(bn_pairs))


def get_kernel(params: PyTree, layer: Layer) -> jax.Array:
    """The kernel of `layer` inside a params pytree."""
    node = params
    for p in layer.path:
        node = node[p]
    return node["kernel"]


def _set_in(tree: Mapping, path: Sequence[str], leaf_name: str, value: Any) -> dict:
    # Rebuild only the dicts along `path` so the input pytree is never mutated.
    tree = dict(tree)
    if not path:
        tree[leaf_name] = value
        return tree
    tree[path[0]] = _set_in(tree[path[0]], path[1:], leaf_name, value)
    return tree


def map_kernels(
    params: PyTree,
    layers: Iterable[Layer],
    fn: Callable[[Layer, jax.Array], jax.Array],
) -> PyTree:
    """New params with each layer's kernel replaced by `fn(layer, kernel)`.

    A kernel shared by several call sites is transformed once (at its first site). Layers not
    listed keep their kernels. Pure: `params` is not modified.
    """
    seen: set[tuple[str, ...]] = set()
    for layer in layers:
        if layer.path in seen:
            continue
        seen.add(layer.path)
        params = _set_in(params, layer.path, "kernel", fn(layer, get_kernel(params, layer)))
    return params


LayerFn = Callable[[str, jax.Array, Callable[[jax.Array], jax.Array]], jax.Array]


@contextlib.contextmanager
def intercept_layers(fn: LayerFn, only: Iterable[str] | None = None) -> Iterator[None]:
    """Within the context, every Conv/Dense call becomes `fn(name, x, call)`.

    `call(x)` runs the original layer on `x` (with the call's other arguments unchanged), so
    `fn` may transform the input, the output, or both. `only` restricts to those site names.
    """
    selected = None if only is None else frozenset(only)
    namer = _SiteNamer()

    def interceptor(next_fun, a, kw, context):
        if context.method_name != "__call__" or layer_kind(context.module) is None:
            return next_fun(*a, **kw)
        name = namer(context.module)
        if selected is not None and name not in selected:
            return next_fun(*a, **kw)
        if a:
            return fn(name, a[0], lambda x: next_fun(x, *a[1:], **kw))
        rest = {k: v for k, v in kw.items() if k != "inputs"}
        return fn(name, kw["inputs"], lambda x: next_fun(inputs=x, **rest))

    with nn.intercept_methods(interceptor):
        yield


def map_inputs(
    fn: Callable[[str, jax.Array], jax.Array], only: Iterable[str] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the context, every Conv/Dense input x becomes `fn(name, x)`."""
    return intercept_layers(lambda name, x, call: call(fn(name, x)), only)


@contextlib.contextmanager
def capture_inputs(
    store: dict[str, jax.Array],
    only: Iterable[str] | None = None,
    reduce: Callable[[str, jax.Array], Any] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Within the context, record each Conv/Dense input into `store[name]`.

    `reduce(name, x)`, if given, is stored instead of x (e.g. a statistic), so large inputs
    need not be kept. Works under `jit`: the stored values are the traced arrays, to be
    returned from the jitted function.
    """

    def record(name: str, x: jax.Array, call):
        store[name] = x if reduce is None else reduce(name, x)
        return call(x)

    with intercept_layers(record, only):
        yield store


@contextlib.contextmanager
def intercept_modules(
    fn: Callable[[nn.Module, Callable[..., Any], tuple, dict], Any],
    predicate: Callable[[nn.Module], bool],
) -> Iterator[None]:
    """Within the context, each `__call__` of a module with `predicate(module)` true becomes
    `fn(module, call, args, kwargs)`, where `call(*args, **kwargs)` runs the original.

    The general form behind the layer taps, for transforms of other modules (e.g. replacing
    a folded BatchNorm by the identity).
    """

    def interceptor(next_fun, a, kw, context):
        if context.method_name == "__call__" and predicate(context.module):
            return fn(context.module, next_fun, a, kw)
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        yield
