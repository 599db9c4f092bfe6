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

Lifted transforms. Layers inside `nn.remat`/`nn.checkpoint`, `nn.scan` and `nn.vmap` are
reached too. A scanned or vmapped module with its params stacked on axis 0
(``variable_axes={'params': 0}``) is unrolled into one layer per iteration (or member):
``'ScanMLP_0/Dense_0[2]'`` is the third iteration's Dense, `Layer.stack` is the stacked
kernel's leading shape and `Layer.stack_index` the slice, so `get_kernel` and `map_kernels`
see that iteration's own kernel, exactly as in the unrolled model. A body runs in an inner
JAX trace, so nothing made there may be kept in Python: per-site functions pick the
iteration's branch from an index that travels in the params (`prepare`), and captured values
leave through the params collection (`collect`). Other transforms (``nn.cond``,
``nn.while_loop``, ``nn.map_variables``, ...) and params shared by every iteration of a scan
are refused by `trace` with a `LiftedTransformError` naming the module and the transform;
so is `nn.jit`, which reuses one traced body for equal modules, so a tap would not run.

Example::

    graph = taps.trace(model, variables, images)
    noisy = taps.map_kernels(variables["params"], graph.layers, lambda l, w: w + 0.01)
    with taps.map_inputs(lambda name, x: jnp.round(x)):
        logits = model.apply(taps.prepare({**variables, "params": noisy}, graph), images)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import taps_flow
from dnq_jax.taps_flow import LiftedTransformError  # noqa: F401 - part of the taps API
from dnq_jax.taps_trace import (  # noqa: F401 - part of the taps API
    COLLECTION,
    Graph,
    Layer,
    _suffix,
    layer_kind,
    module_name,
    trace,
)

PyTree = Any

# Names of the leaves the taps add to a stacked layer's params (see `prepare`, `collect`).
INDEX = "taps_index"
CAPTURE = "taps_capture"


def _node(params: PyTree, path: Sequence[str]) -> Mapping:
    node = params
    for p in path:
        node = node[p]
    return node


def get_kernel(params: PyTree, layer: Layer) -> jax.Array:
    """The kernel of `layer` inside a params pytree (its own slice, for a stacked layer)."""
    kernel = _node(params, layer.path)["kernel"]
    return kernel[layer.stack_index] if layer.stack_index else kernel


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

    A kernel shared by several call sites is transformed once (at its first site). A
    stacked kernel is transformed slice by slice: `fn` sees one iteration's kernel and the
    layer of that iteration. Layers not listed keep their kernels. Pure: `params` is not
    modified.
    """
    seen: set = set()
    for layer in layers:
        if layer.kernel_key in seen:
            continue
        seen.add(layer.kernel_key)
        new = fn(layer, get_kernel(params, layer))
        if layer.stack_index:
            new = _node(params, layer.path)["kernel"].at[layer.stack_index].set(new)
        params = _set_in(params, layer.path, "kernel", new)
    return params


def prepare(variables: PyTree, graph: Graph) -> PyTree:
    """`variables` with an iteration index beside each stacked kernel, for per-site taps.

    Inside a scan or vmap body every iteration runs the same traced code; the index (a
    one-hot array per iteration, sliced by Flax like the kernel next to it) tells a tap
    which iteration's site it is at. Apply the model to the result wherever a per-site tap
    (`map_inputs`, `intercept_layers`, `capture_inputs`) reaches a stacked layer. A graph
    without stacks returns `variables` unchanged. Pure.
    """
    stacks = {layer.path: layer.stack for layer in graph.layers if layer.stack}
    if not stacks:
        return variables
    params = variables[COLLECTION]
    for path, stack in stacks.items():
        n = math.prod(stack)
        onehot = np.eye(n, dtype=np.int32).reshape(stack + stack)
        params = _set_in(params, path, INDEX, jnp.asarray(onehot))
    return {**variables, COLLECTION: params}


def _capture_leaf(site: str) -> str:
    base = site.split("[", 1)[0].rsplit("/", 1)[-1]
    return CAPTURE + (f"#{base.split('#', 1)[1]}" if "#" in base else "")


def collect(
    store: dict[str, Any],
    variables: PyTree,
    graph: Graph,
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Moves the values `capture_inputs` recorded at lifted sites into `store[name]`.

    A site inside a lifted transform cannot hand its value to Python (it lives in the
    transform's own trace); it writes it into the params collection, which Flax returns
    (stacked, for a scan or vmap). Call with the variables `model.apply(..., mutable=
    ['params'])` returned; each stacked site gets its own iteration's slice.
    """
    selected = None if only is None else frozenset(only)
    params = variables[COLLECTION]
    for layer in graph.layers:
        if not layer.lifted or (selected is not None and layer.name not in selected):
            continue
        node = _node(params, layer.path)
        leaf = _capture_leaf(layer.name)
        if leaf not in node:
            raise ValueError(f"variables: no value was captured for site {layer.name!r}")
        value = node[leaf]
        if layer.stack_index:
            value = jax.tree_util.tree_map(lambda v, i=layer.stack_index: v[i], value)
        store[layer.name] = value
    return store


LayerFn = Callable[[str, jax.Array, Callable[[jax.Array], jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Site:
    """A layer call as an interceptor meets it: its site names and how to pick among them."""

    module: nn.Module
    names: tuple[str, ...]  # one per iteration of a stack, else one
    index: jax.Array | None  # which of `names` runs now (traced), None if only one
    lifted: bool

    def select(self, branches: Sequence[Callable], *operands: Any) -> Any:
        """branches[index](*operands): only the running iteration's branch is computed."""
        if self.index is None:
            return branches[0](*operands)
        return jax.lax.switch(self.index, list(branches), *operands)


def _site(module: nn.Module, base: str) -> _Site:
    kinds = taps_flow.lifted_kinds(module)
    if not any(k in taps_flow.STACKING for k in kinds):
        return _Site(module, (base,), None, bool(kinds))
    onehot = module.scope.get_variable(COLLECTION, INDEX)
    if onehot is None:
        raise ValueError(
            f"site {base!r} runs inside nn.{'/nn.'.join(kinds)}, where every iteration shares "
            "one traced body; apply the model to taps.prepare(variables, graph) so the taps "
            "can tell the iterations apart"
        )
    stack = tuple(onehot.shape)
    names = tuple(base + _suffix(tuple(int(i) for i in ix)) for ix in np.ndindex(*stack))
    index = jnp.sum(onehot * jnp.arange(len(names), dtype=jnp.int32).reshape(stack))
    return _Site(module, names, index, True)


def _intercept(on_layer: Callable[[_Site, tuple, dict, Callable], Any]):
    """An interceptor calling `on_layer(site, args, kwargs, call)` at each Conv/Dense call."""
    sites = taps_flow.Sites()

    def interceptor(next_fun, a, kw, context):
        if context.method_name != "__call__":
            return next_fun(*a, **kw)
        module = context.module
        key = taps_flow.body_root_key(module)
        sites.enter(key, taps_flow.lifted_kinds(module))
        try:
            if layer_kind(module) is None:
                return next_fun(*a, **kw)
            return on_layer(_site(module, sites(module)), a, kw, next_fun)
        finally:
            sites.exit(key)

    return nn.intercept_methods(interceptor)


def _split_call(a: tuple, kw: dict, next_fun) -> tuple[jax.Array, Callable]:
    if a:
        return a[0], lambda x: next_fun(x, *a[1:], **kw)
    rest = {k: v for k, v in kw.items() if k != "inputs"}
    return kw["inputs"], lambda x: next_fun(inputs=x, **rest)


def _like(fn: Callable, x: jax.Array) -> Callable:
    # An unselected iteration's branch must return what the selected ones return.
    out = jax.eval_shape(fn, x)
    return lambda v: jnp.asarray(v, out.dtype)


@contextlib.contextmanager
def intercept_layers(fn: LayerFn, only: Iterable[str] | None = None) -> Iterator[None]:
    """Within the context, every Conv/Dense call becomes `fn(name, x, call)`.

    `call(x)` runs the original layer on `x` (with the call's other arguments unchanged), so
    `fn` may transform the input, the output, or both. `only` restricts to those site names.
    In a scanned/vmapped stack `fn` runs once per iteration and the running iteration's
    result is kept, so the layer is computed once per iteration there; `map_inputs` and
    `map_outputs` compute it once.
    """
    selected = None if only is None else frozenset(only)

    def on_layer(site: _Site, a, kw, next_fun):
        x, call = _split_call(a, kw, next_fun)
        chosen = [n for n in site.names if selected is None or n in selected]
        if not chosen:
            return call(x)
        if site.index is None:
            return fn(site.names[0], x, call)
        outs = [fn(n, x, call) if n in chosen else call(x) for n in site.names]
        return jax.tree_util.tree_map(lambda *o: jnp.stack(o)[site.index], *outs)

    with _intercept(on_layer):
        yield


def _map_site(pre: Callable | None, post: Callable | None, only: Iterable[str] | None):
    selected = None if only is None else frozenset(only)

    def branches(fn, site, v):
        chosen = {n for n in site.names if selected is None or n in selected}
        if len(chosen) == len(site.names):
            return [lambda u, n=n: fn(n, u) for n in site.names]
        same = _like(lambda u: fn(next(iter(chosen)), u), v)
        return [lambda u, n=n: fn(n, u) if n in chosen else same(u) for n in site.names]

    def on_layer(site: _Site, a, kw, next_fun):
        x, call = _split_call(a, kw, next_fun)
        if not any(selected is None or n in selected for n in site.names):
            return call(x)
        if pre is not None:
            x = site.select(branches(pre, site, x), x)
        y = call(x)
        return y if post is None else site.select(branches(post, site, y), y)

    return _intercept(on_layer)


def map_inputs(
    fn: Callable[[str, jax.Array], jax.Array], only: Iterable[str] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the context, every Conv/Dense input x becomes `fn(name, x)`."""
    return _map_site(fn, None, only)


def map_outputs(
    fn: Callable[[str, jax.Array], jax.Array], only: Iterable[str] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the context, every Conv/Dense output y becomes `fn(name, y)`."""
    return _map_site(None, fn, only)


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

    A site inside a lifted transform (`Layer.lifted`) writes its value into the params
    collection instead, the one way out of the transform's trace: apply the model with
    ``mutable=['params']`` (to `prepare`d variables, for a stack), then `collect` the values
    from the variables it returns into `store`.
    """
    selected = None if only is None else frozenset(only)
    value = (lambda name, x: x) if reduce is None else reduce

    def on_layer(site: _Site, a, kw, next_fun):
        x, call = _split_call(a, kw, next_fun)
        chosen = [n for n in site.names if selected is None or n in selected]
        if not chosen:
            return call(x)
        if not site.lifted:
            store[site.names[0]] = value(site.names[0], x)
            return call(x)
        scope = site.module.scope
        if not scope.is_mutable_collection(COLLECTION):
            raise ValueError(
                f"site {site.names[0]!r} runs inside a lifted transform; its captured value "
                f"can leave it only through the {COLLECTION!r} collection: apply the model "
                f"with mutable=[{COLLECTION!r}] and read the values with taps.collect"
            )
        fns = [lambda u, n=n: value(n, u) for n in chosen]
        shapes = jax.eval_shape(fns[0], x)
        zeros = lambda u: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        branches = [fns[chosen.index(n)] if n in chosen else zeros for n in site.names]
        scope.put_variable(COLLECTION, _capture_leaf(site.names[0]), site.select(branches, x))
        return call(x)

    with _intercept(on_layer):
        yield store


@contextlib.contextmanager
def intercept_modules(
    fn: Callable[[nn.Module, Callable[..., Any], tuple, dict], Any],
    predicate: Callable[[nn.Module], bool],
) -> Iterator[None]:
    """Within the context, each `__call__` of a module with `predicate(module)` true becomes
    `fn(module, call, args, kwargs)`, where `call(*args, **kwargs)` runs the original.

    The general form behind the layer taps, for transforms of other modules (e.g. replacing
    a folded BatchNorm by the identity). Inside a lifted transform `fn` must be pure: a
    value it keeps in Python would belong to the transform's own trace.
    """

    def interceptor(next_fun, a, kw, context):
        if context.method_name == "__call__" and predicate(context.module):
            return fn(context.module, next_fun, a, kw)
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        yield
