"""Flax NNX models on the taps: an `nnx.Module` seen as a Linen module, layer for layer.

dnq_jax reaches layers by intercepting Linen module calls (`dnq_jax.taps`). An NNX model is
brought onto that one mechanism rather than given a second one: `as_linen(model)` returns a
Linen module that mirrors the NNX module tree, and the variables it holds, so that every
`nnx.Conv`, `nnx.Linear` and `nnx.BatchNorm` call becomes a call of a Linen `nn.Conv`,
`nn.Dense` or `nn.BatchNorm` with the same configuration and the same arrays, under the
module path the NNX model gives it. Every other NNX module (the user's own blocks, an
`nnx.Sequential`) becomes a Linen scope of its own that runs the module's own `__call__`,
so its Python code (residual adds, pooling, any control flow) is the model's, unchanged.
Everything the library offers on Linen models (trace, profiler, weight noise and drop-in,
RTN, AdaRound/BRECQ/QDrop, BN folding, error statistics, Hessian measures, export) then
works on the NNX model; docs/design.md says why this mechanism and not interception at the
level of the JAX ops.

Names. A module's Linen path is its NNX path, with the items of a list or dict
(`nnx.List`, `nnx.Dict`, Python lists) named as Linen names them: `blocks[1].conv` is
`'blocks_1/conv'`. Parameters go to the `params` collection, `nnx.BatchStat` to
`batch_stats`, any other NNX variable type to a collection named after its type in lower
case (read-only unless made mutable in `apply`).

Modes. `apply(..., train=True)` runs the model in training mode (BatchNorm on batch
statistics, `deterministic=False`), the default is evaluation mode, whatever mode the NNX
model was in when it was converted; an explicit `use_running_average=` in the model's own
BatchNorm call wins. If the NNX model's `__call__` takes `train` itself, it receives it.

Limits (each refused with an `NNXBridgeError` naming the module): layers whose parameters are
stacked (`nnx.vmap`-created stacks run with `nnx.scan`), calls inside NNX lifted transforms
(`nnx.scan`, `nnx.vmap`, `nnx.remat`, `nnx.jit` inside the model), a module that calls a
module it does not own, a masked convolution or a custom `conv_general_dilated`/`dot_general`.

Example::

    model = MyNNXNet(rngs=nnx.Rngs(0))
    linen_model, variables = taps_nnx.as_linen(model)
    qm = dnq_jax.ptq.quantize(linen_model, variables, calib, QuantSpec(w_bits=4, a_bits=4))
    taps_nnx.update(model, new_variables)   # write trained variables back into the NNX model
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

PyTree = Any
NNXPath = tuple[Any, ...]

_CONTAINERS = (nnx.List, nnx.Dict)
_LAYERS = {nnx.Conv: "conv", nnx.Linear: "dense", nnx.BatchNorm: "bn"}
# The NNX layer attribute each Linen twin field is read from (name changes only).
_RENAMED = {"conv": {"features": "out_features"}, "dense": {"features": "out_features"}}
_TWIN = {"conv": nn.Conv, "dense": nn.Dense, "bn": nn.BatchNorm}
_LEAVES = {"conv": {"kernel", "bias"}, "dense": {"kernel", "bias"}}
_LEAVES["bn"] = {"scale", "bias", "mean", "var"}
# Training mode of the current `apply` (None: the default, evaluation mode).
_TRAIN: contextvars.ContextVar[bool | None] = contextvars.ContextVar("dnq_nnx_train", default=None)


class NNXBridgeError(ValueError):
    """An NNX model (or a part of it) the bridge cannot mirror; the message names it."""


@dataclasses.dataclass(frozen=True)
class _Leaf:
    rel: NNXPath  # path from the owning module to the variable
    collection: str
    name: str  # the variable's Linen name in its module's scope
    shape: tuple[int, ...]
    dtype: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Node:
    path: NNXPath  # NNX path from the root
    linen: tuple[str, ...]  # Linen module path from the root
    kind: str  # 'conv' | 'dense' | 'bn' | 'module'
    graphdef: Any
    abstract: Any  # the module's state with ShapeDtypeStruct leaves
    config: tuple[tuple[str, Any], ...]  # a layer's Linen twin fields
    leaves: tuple[_Leaf, ...]  # variables the module owns directly
    children: tuple[tuple[NNXPath, NNXPath], ...]  # (path from this module, root path)
    takes_train: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    nodes: Mapping[NNXPath, _Node]

    def __hash__(self) -> int:
        return id(self)


def _name(p: Any) -> str:
    return "/".join(str(q) for q in p) if isinstance(p, tuple) else str(p)


def _linen_names(path: NNXPath, levels: set[NNXPath]) -> tuple[str, ...]:
    """Linen path of the module at NNX `path`: one name per module level, the list/dict hops
    in between joined to the next name with '_'."""
    names, start = [], 0
    for i in range(1, len(path) + 1):
        if path[:i] in levels:
            names.append("_".join(str(q) for q in path[start:i]))
            start = i
    return tuple(names)


def _kind(module: nnx.Module) -> str:
    """The layer kind of an NNX layer (or a subclass that keeps its `__call__`)."""
    for cls, kind in _LAYERS.items():
        if isinstance(module, cls) and type(module).__call__ is cls.__call__:
            return kind
    return "module"


def _layer_config(path: NNXPath, module: nnx.Module, kind: str) -> tuple:
    where = f"NNX bridge: {_name(path) or 'the model'} ({type(module).__name__})"
    if kind == "conv":
        if module.mask is not None:
            raise NNXBridgeError(f"{where}: a masked convolution is not supported")
        if module.conv_general_dilated is not jax.lax.conv_general_dilated:
            raise NNXBridgeError(f"{where}: a custom conv_general_dilated is not supported")
    if kind == "dense" and module.dot_general is not jax.lax.dot_general:
        raise NNXBridgeError(f"{where}: a custom dot_general is not supported")
    if getattr(module, "preferred_element_type", None) is not None:
        raise NNXBridgeError(f"{where}: preferred_element_type is not supported")
    fields = [f.name for f in dataclasses.fields(_TWIN[kind])]
    skip = {"parent", "name", "kernel_init", "bias_init", "scale_init", "promote_dtype"}
    skip |= {"conv_general_dilated", "conv_general_dilated_cls", "dot_general"}
    skip |= {"dot_general_cls", "force_float32_reductions", "mask", "use_running_average"}
    config = []
    for field in fields:
        if field in skip:
            continue
        attr = _RENAMED.get(kind, {}).get(field, field)
        if hasattr(module, attr):
            value = getattr(module, attr)
            config.append((field, tuple(value) if isinstance(value, list) else value))
    return tuple(config)


def _collection(var: nnx.Variable) -> str:
    if isinstance(var, nnx.Param):
        return "params"
    if isinstance(var, nnx.BatchStat):
        return "batch_stats"
    return type(var).__name__.lower()


def _plan(model: nnx.Module) -> _Plan:
    if not isinstance(model, nnx.Module):
        raise NNXBridgeError(f"as_linen: expected an nnx.Module, got {type(model).__name__}")
    modules = {tuple(p): m for p, m in nnx.iter_modules(model) if not isinstance(m, _CONTAINERS)}
    levels = set(modules)
    owned: dict[NNXPath, list[_Leaf]] = {p: [] for p in modules}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        path = tuple(path)
        owner = max((p for p in modules if path[: len(p)] == p), key=len)
        rel = path[len(owner) :]
        name = "_".join(str(q) for q in rel)
        value = var.value
        leaf = _Leaf(rel, _collection(var), name, tuple(value.shape), value.dtype)
        owned[owner].append(leaf)
    nodes = {}
    for path, module in modules.items():
        kind = _kind(module)
        leaves = tuple(owned[path])
        if kind != "module":
            _check_layer(path, module, kind, leaves)
        inner = [q for q in modules if len(q) > len(path) and q[: len(path)] == path]
        children = tuple(
            (q[len(path) :], q)
            for q in inner
            if not any(len(path) < len(r) < len(q) and q[: len(r)] == r for r in inner)
        )
        graphdef, state = nnx.split(module)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        takes_train = callable(module) and "train" in inspect.signature(module).parameters
        nodes[path] = _Node(
            path,
            _linen_names(path, levels),
            kind,
            graphdef,
            abstract,
            _layer_config(path, module, kind) if kind != "module" else (),
            leaves,
            children,
            takes_train,
        )
    return _Plan(nodes)


def _check_layer(path: NNXPath, module: nnx.Module, kind: str, leaves) -> None:
    names = {leaf.name for leaf in leaves}
    unknown = names - _LEAVES[kind]
    if unknown:
        raise NNXBridgeError(
            f"NNX bridge: {_name(path)} ({type(module).__name__}) holds variables "
            f"{sorted(unknown)} its Linen twin does not have"
        )
    if kind in ("conv", "dense"):
        kernel = module.kernel.value
        expected = len(module.kernel_size) + 2 if kind == "conv" else 2
        if kernel.ndim != expected:
            raise NNXBridgeError(
                f"NNX bridge: {_name(path)} ({type(module).__name__}) has a kernel of shape "
                f"{tuple(kernel.shape)}, stacked over leading axes (an nnx.vmap-created stack "
                "run with nnx.scan?): stacks are not supported; build the layers in an "
                "nnx.List and loop over them, or use a Linen model with nn.scan"
            )


def _lookup(root: Any, rel: NNXPath) -> Any:
    node = root
    for p in rel:
        node = node[p] if isinstance(p, int) or not hasattr(node, str(p)) else getattr(node, p)
    return node


_TAPPED: dict[type, type] = {}


def _tapped(cls: type) -> type:
    """A subclass of an NNX module class whose calls go to the module's Linen mirror."""
    if cls not in _TAPPED:

        def __call__(self, *args, **kwargs):
            # An NNX lifted transform runs a copy of the module (its graph split and
            # merged), which carries the entry over: only the tapped object itself may call.
            owner, call = self.__dict__.get("_dnq_linen_call", (None, None))
            if owner != id(self):
                raise NNXBridgeError(
                    f"NNX bridge: {cls.__name__} was called inside an NNX lifted transform "
                    "(nnx.scan, nnx.vmap, nnx.remat, nnx.jit inside the model), which the "
                    "bridge does not support; call the module directly"
                )
            return call(*args, **kwargs)

        _TAPPED[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _TAPPED[cls]


def _set_train(module: nnx.Module, train: bool) -> None:
    module.set_attributes(
        deterministic=not train, use_running_average=not train, raise_if_not_found=False
    )


class _Mirror(nn.Module):
    """The Linen mirror of one NNX module (the root, or a user module inside it)."""

    plan: _Plan
    at: NNXPath = ()

    @nn.compact
    def __call__(self, *args, **kwargs):
        node = self.plan.nodes[self.at]
        token = None
        if not self.at and "train" in kwargs and not node.takes_train:
            token = _TRAIN.set(bool(kwargs.pop("train")))
        try:
            return self._run(node, args, kwargs)
        finally:
            if token is not None:
                _TRAIN.reset(token)

    def _run(self, node: _Node, args: tuple, kwargs: dict):
        # Fresh Variables, made in the current JAX trace, so that the copy may be written.
        copy = nnx.merge(node.graphdef, jax.tree_util.tree_map(lambda x: x, node.abstract))
        train = _TRAIN.get()
        _set_train(copy, bool(train))
        owned = []
        for leaf in node.leaves:
            if leaf.collection == "params":
                value = self.param(leaf.name, _zeros(leaf))
                holder = None
            else:
                holder = self.variable(leaf.collection, leaf.name, _zeros(leaf))
                value = holder.value
            var = _lookup(copy, leaf.rel)
            var.value = value
            owned.append((var, holder))
        for rel, path in node.children:
            child = _lookup(copy, rel)
            child.__class__ = _tapped(type(child))
            entry = (id(child), self._child_call(self.plan.nodes[path]))
            child.__dict__["_dnq_linen_call"] = entry
        out = copy(*args, **kwargs)
        for var, holder in owned:
            if holder is None:
                continue
            if self.is_mutable_collection(holder.collection):
                holder.value = var.value
            elif train and holder.collection == "rngcount":
                # The count would not advance: every training call would repeat one draw.
                raise NNXBridgeError(
                    f"NNX bridge: {_name(node.path)} draws random numbers in training mode "
                    "(nnx.Dropout, nnx.Rngs): apply the view with train=True and "
                    "mutable=[..., 'rngcount'], and write the returned counts back "
                    "(taps_nnx.update), or every call repeats the same draw"
                )
        return out

    def _child_call(self, child: _Node):
        made = []
        name = child.linen[-1]

        def call(*args, **kwargs):
            if not made:
                if child.kind == "module":
                    made.append(_Mirror(self.plan, child.path, parent=self, name=name))
                else:
                    made.append(_TWIN[child.kind](**dict(child.config), parent=self, name=name))
            twin = made[0]
            if child.kind != "bn":
                return twin(*args, **kwargs)
            if kwargs.get("mask") is not None:
                raise NNXBridgeError(
                    f"NNX bridge: {_name(child.path)}: a BatchNorm call with a mask is not "
                    "supported"
                )
            kwargs.pop("mask", None)
            explicit = kwargs.pop("use_running_average", args[1] if len(args) > 1 else None)
            ura = explicit if explicit is not None else not bool(_TRAIN.get())
            return twin(args[0], use_running_average=ura, **kwargs)

        return call


def _zeros(leaf: _Leaf):
    # Linen checks a stored param's shape against its initializer's; the view is applied
    # to the variables `as_linen` returns, and `init` of the view fills these with zeros.
    return lambda *_: jnp.zeros(leaf.shape, leaf.dtype)


def variables(model: nnx.Module) -> dict:
    """The NNX `model`'s variables in the layout of its Linen view (see `as_linen`): the
    model's own arrays, so inside `nnx.grad`/`nnx.jit` they are the traced values and a
    gradient taken through the view reaches the model's parameters."""
    return _variables(model, _plan(model))


def _variables(model: nnx.Module, plan: _Plan) -> dict:
    out: dict[str, dict] = {}
    for node in plan.nodes.values():
        for leaf in node.leaves:
            value = _lookup(model, node.path + leaf.rel).value
            tree = out.setdefault(leaf.collection, {})
            for name in node.linen:
                tree = tree.setdefault(name, {})
            tree[leaf.name] = value
    return out


def as_linen(model: nnx.Module) -> tuple[nn.Module, dict]:
    """A Linen module that computes what `model` computes, and its variables.

    The module is applied like any Linen model, `module.apply(variables, *args, train=...)`,
    and every dnq_jax function that takes a Linen model and its variables takes it. The
    variables are the NNX model's arrays (not copies); `update` writes a changed tree back.

    Raises:
      NNXBridgeError: for a part of the model the bridge cannot mirror (see the module doc).
    """
    plan = _plan(model)
    return _Mirror(plan), _variables(model, plan)


def update(model: nnx.Module, variables: Mapping[str, PyTree]) -> None:
    """Writes the Linen-view `variables` (every collection given) into the NNX `model`."""
    plan = _plan(model)
    for node in plan.nodes.values():
        for leaf in node.leaves:
            if leaf.collection not in variables:
                continue
            tree = variables[leaf.collection]
            try:
                for name in node.linen:
                    tree = tree[name]
                value = tree[leaf.name]
            except KeyError as e:
                where = "/".join(node.linen + (leaf.name,))
                raise NNXBridgeError(f"update: {leaf.collection}/{where} is missing") from e
            _lookup(model, node.path + leaf.rel).value = value


@contextlib.contextmanager
def training(train: bool = True) -> Iterator[None]:
    """Within the context, Linen views run in training (or evaluation) mode when `apply` is
    given no `train=` (e.g. inside functions of the library that call the model plainly)."""
    token = _TRAIN.set(train)
    try:
        yield
    finally:
        _TRAIN.reset(token)
