"""Reconstruction blocks of any Flax model, found from its structure, and run on their own.

A block is a submodule whose Conv/Dense layers are reconstructed together (BRECQ, QDrop),
or one layer (AdaRound). By default each direct child module of the model that holds
Conv/Dense layers is a block (a zoo ResNet's residual block, a MobileNetV2 inverted residual,
a VGG conv), and a Conv/Dense called directly by the model is a block of its own; `paths`
overrides this with module paths, and sites no listed block covers become one-layer blocks.

A block is run alone, on inputs captured from the whole model, by re-creating the module
under the same path (`Block.apply`): its layers keep their site names and its variables
their place in the tree, so BN folding, fake quantization and the rest of the taps work on
the block exactly as on the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dnq_jax import taps

PyTree = Any
Path = tuple[str, ...]


class _Host(nn.Module):
    """Calls a copy of `proto` at the module path `names`, so paths (and site names) inside
    it are those of the original model."""

    proto: nn.Module
    names: tuple[str, ...]

    @nn.compact
    def __call__(self, *args, **kwargs):
        if len(self.names) == 1:
            return self.proto.clone(parent=self, name=self.names[0])(*args, **kwargs)
        return _Host(self.proto, self.names[1:], name=self.names[0])(*args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """One reconstruction block.

    Attributes:
      name: the block's module path joined by '/'.
      path: its module path.
      sites: its Conv/Dense call sites (names), in call order.
      module: an unbound copy of the block module, with its configuration.
      call_tree: the structure of the block call's ``(args, kwargs)``.
      static: the leaves of that call that are not arrays (e.g. ``train=False``), by position.
      num_inputs: how many array leaves the call takes (the block's inputs).
    """

    name: str
    path: Path
    sites: tuple[str, ...]
    module: nn.Module
    call_tree: Any
    static: tuple[tuple[int, Any], ...]
    num_inputs: int

    def call_args(self, inputs: Sequence[jax.Array]) -> tuple[tuple, dict]:
        """The block call's ``(args, kwargs)`` with `inputs` as its array leaves."""
        leaves: list[Any] = list(inputs)
        for pos, value in self.static:
            leaves.insert(pos, value)
        return jax.tree_util.tree_unflatten(self.call_tree, leaves)

    def apply(self, variables: PyTree, inputs: Sequence[jax.Array]) -> Any:
        """Runs the block alone on `inputs`; `variables` is the model's tree (or the part of
        it under the block's path, see `subtree`)."""
        args, kwargs = self.call_args(inputs)
        if not self.path:
            return self.module.apply(variables, *args, **kwargs)
        return _Host(self.module, self.path).apply(variables, *args, **kwargs)

    def subtree(self, variables: PyTree) -> PyTree:
        """The model's variables pruned to the block's path (every collection)."""
        out = {}
        for col, tree in variables.items():
            node = tree
            for p in self.path:
                if not isinstance(node, Mapping) or p not in node:
                    node = None
                    break
                node = node[p]
            if node is None:
                continue
            for p in reversed(self.path):
                node = {p: node}
            out[col] = node
        return out


def _split_call(args: tuple, kwargs: dict) -> tuple[Any, tuple[tuple[int, Any], ...], list]:
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    is_array = lambda leaf: isinstance(leaf, (jax.Array, np.ndarray))
    static = tuple((i, leaf) for i, leaf in enumerate(leaves) if not is_array(leaf))
    return tree, static, [leaf for leaf in leaves if is_array(leaf)]


def _as_path(p: Any) -> Path:
    if isinstance(p, str):
        return tuple(q for q in p.split("/") if q)
    if isinstance(p, Sequence) and all(isinstance(q, str) for q in p):
        return tuple(p)
    raise ValueError(f"blocks: each block is a module path like 'stage1_block0', got {p!r}")


def _within(site_path: Path, block: Path) -> bool:
    return site_path[: len(block)] == block


def find_blocks(
    model: nn.Module,
    variables: PyTree,
    graph: taps.Graph,
    images: jax.Array,
    *,
    paths: Iterable[Any] | None = None,
    layerwise: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Block, ...]:
    """The model's reconstruction blocks, in call order.

    Args:
      model, variables, images, apply_kwargs: an eval-mode call of the model (shapes only).
      graph: the model's `taps.trace` graph.
      paths: module paths ('a/b' or tuples) to use as blocks instead of the default; sites
        no listed block covers become one-layer blocks.
      layerwise: every Conv/Dense layer is its own block (AdaRound).

    Raises:
      ValueError naming `blocks`: for a path that is not a module of the model, holds no
        Conv/Dense layer, overlaps another block, or is called more than once per forward.
    """
    apply_kwargs = dict(apply_kwargs or {})
    site_paths = {layer.name: layer.path for layer in graph.layers}
    if layerwise:
        chosen = [layer.path for layer in graph.layers]
    elif paths is None:
        chosen = [layer.path[:1] for layer in graph.layers]
    else:
        given = [_as_path(p) for p in paths]
        for a in given:
            if not any(_within(sp, a) for sp in site_paths.values()):
                raise ValueError(
                    f"blocks: {'/'.join(a)!r} holds no Conv/Dense layer (or is not a module "
                    f"of the model); layers: {graph.names}"
                )
            for b in given:
                if a != b and _within(b, a):
                    raise ValueError(f"blocks: {'/'.join(b)!r} lies inside {'/'.join(a)!r}")
        chosen = []
        for sp in site_paths.values():
            inside = [a for a in given if _within(sp, a)]
            chosen.append(inside[0] if inside else sp)
    order: list[Path] = list(dict.fromkeys(chosen))

    found: dict[Path, list] = {}

    def record(module, call, a, kw):
        path = tuple(module.path)
        if path in wanted:
            tree, static, arrays = _split_call(a, kw)
            found.setdefault(path, []).append((module.clone(parent=None), tree, static, arrays))
        return call(*a, **kw)

    wanted = frozenset(order)
    if () in wanted:
        # The model itself is one block: its call is the model's own call.
        tree, static, arrays = _split_call((images,), apply_kwargs)
        found[()] = [(model, tree, static, arrays)]
    else:

        def run(variables, images):
            with taps.intercept_modules(record, lambda m: True):
                return model.apply(variables, images, **apply_kwargs)

        jax.eval_shape(run, variables, images)

    blocks = []
    for path in order:
        name = "/".join(path)
        calls = found.get(path, [])
        if len(calls) != 1:
            raise ValueError(
                f"blocks: {name!r} is called {len(calls)} times per forward pass; a block "
                "must be a module called exactly once"
            )
        module, tree, static, arrays = calls[0]
        sites = tuple(s for s, sp in site_paths.items() if _within(sp, path))
        blocks.append(Block(name, path, sites, module, tree, static, num_inputs=len(arrays)))
    used: dict[str, str] = {}
    for block in blocks:
        for site in block.sites:
            if site in used:
                raise ValueError(f"blocks: layer {site!r} is in {used[site]!r} and {block.name!r}")
            used[site] = block.name
    return tuple(blocks)


def inputs_of_call(args: tuple, kwargs: dict) -> list[jax.Array]:
    """The array leaves of a block call's ``(args, kwargs)``: the block's inputs."""
    return _split_call(args, kwargs)[2]


@contextlib.contextmanager
def intercept_blocks(
    found: Sequence[Block], fn: Callable[[Block, Callable[..., Any], tuple, dict], Any]
) -> Iterator[None]:
    """Within the context, each block's call becomes ``fn(block, call, args, kwargs)``, where
    ``call(*args, **kwargs)`` runs the block."""
    by_path = {b.path: b for b in found}

    def wrap(module, call, a, kw):
        return fn(by_path[tuple(module.path)], call, a, kw)

    with taps.intercept_modules(wrap, lambda m: tuple(m.path) in by_path):
        yield
