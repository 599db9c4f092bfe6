"""What the taps learn from inside Flax's lifted transforms and from the traced data flow.

Two helpers of `dnq_jax.taps`, kept apart because they deal with JAX/Flax machinery rather
than with layers:

- Lifted transforms (`nn.remat`, `nn.scan`, `nn.vmap`) run a module's body in an
  inner JAX trace. A Flax scope records them in its debug path (``'scan(ScanMLP_0)'``), which
  is how a tap knows where it runs. Values made in that trace must leave it as the
  transform's outputs; Flax lifts variable collections (params among them) with the body, so
  the taps pass data in and out through the layer's own params: an iteration index in, the
  captured values out (see `taps.prepare` and `taps.collect`).
- Folding a BatchNorm into the conv feeding it is exact only if nothing else reads the
  conv's raw output (a residual add, a second branch). Module interceptors do not see
  `x + y`; the jaxpr does, so `trace` marks each layer output and each BatchNorm call in a
  shape-only jaxpr and `exclusive_consumers` checks every use of the marked value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

PyTree = Any

# Transforms a tap can see through. remat/fold_rngs keep the variables as they are; scan and
# vmap slice the collections named in `variable_axes` (params stacked on axis 0).
SUPPORTED = frozenset({"remat", "fold_rngs", "scan", "vmap"})
# Why the others are refused, where there is more to say than "not supported".
_WHY = {
    "jit": "nn.jit reuses a traced body across calls and across modules of equal "
    "configuration, so a tap around the second call never runs; drop nn.jit (inside "
    "an outer jax.jit it adds nothing)",
}
STACKING = frozenset({"scan", "vmap"})

_WRAPPED = re.compile(r"^(\w+)\((.*)\)$")


class LiftedTransformError(ValueError):
    """A layer sits inside a Flax transform the taps cannot reach (raised by `taps.trace`)."""


def lifted_kinds(module: nn.Module) -> tuple[str, ...]:
    """Names of the lifted transforms around `module`, outermost first ('' none)."""
    scope = module.scope
    kinds: list[str] = []
    for element in getattr(scope, "debug_path", ()) or ():
        inner: list[str] = []
        text = str(element)
        while (m := _WRAPPED.match(text)) is not None:
            inner.append(m.group(1))
            text = m.group(2)
        kinds.extend(inner)
    return tuple(kinds)


def body_root_key(module: nn.Module) -> tuple | None:
    """A key for `module` if it is the root of a lifted body (its own scope is wrapped)."""
    path = getattr(module.scope, "debug_path", ()) or ()
    if path and _WRAPPED.match(str(path[-1])):
        return (tuple(module.path), tuple(str(p) for p in path))
    return None


def check_supported(module: nn.Module, kinds: tuple[str, ...], what: str) -> None:
    """Raises LiftedTransformError if `kinds` holds a transform the taps cannot see through."""
    bad = [k for k in kinds if k not in SUPPORTED]
    if bad:
        name = "/".join(str(p) for p in module.path)
        raise LiftedTransformError(
            f"model: the {what} {name!r} runs inside the Flax transform nn.{bad[0]}, which "
            f"the taps cannot reach: "
            + _WHY.get(bad[0], f"supported are nn.{', nn.'.join(sorted(SUPPORTED))}")
        )


class Sites:
    """Names call sites within one forward pass: 'a/b', then 'a/b#1' for a repeated call.

    `nn.scan` traces its body twice in a row (once to check its broadcast values are loop
    invariant); the second trace is the real one and must name its sites as the first did,
    so a scan body entered again with no call in between restarts from the same counts.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.events = 0
        self.entered: list[tuple[tuple, dict[str, int]]] = []
        self.last_exit: tuple[tuple, dict[str, int], int] | None = None

    def __call__(self, module: nn.Module) -> str:
        base = "/".join(str(p) for p in module.path)
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"

    def enter(self, key: tuple | None, kinds: tuple[str, ...]) -> bool:
        """Called before each module call; True if it retraces the scan body just left."""
        repeat = False
        if key is not None:
            last = self.last_exit
            if last is not None and last[0] == key and last[2] == self.events and "scan" in kinds:
                self.counts = dict(last[1])
                repeat = True
            self.entered.append((key, dict(self.counts)))
        self.events += 1
        return repeat

    def exit(self, key: tuple | None) -> None:
        if key is not None:
            entry_key, counts = self.entered.pop()
            self.last_exit = (entry_key, counts, self.events)


def stored_kernel_shape(params: PyTree, path: Sequence[str]) -> tuple[int, ...] | None:
    node = params
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    kernel = node.get("kernel") if isinstance(node, Mapping) else None
    return None if kernel is None else tuple(np.shape(kernel))


def stack_of(module: nn.Module, kinds: tuple[str, ...], stored, inner) -> tuple[int, ...]:
    """The leading stacked shape of a layer's stored kernel, checked against its transforms."""
    name = "/".join(str(p) for p in module.path)
    stacking = [k for k in kinds if k in STACKING]
    extra = len(stored) - len(inner) if stored is not None else 0
    if stored is None or extra < 0 or tuple(stored[extra:]) != tuple(inner):
        raise LiftedTransformError(
            f"model: the kernel of {name!r} (inside nn.{'/nn.'.join(kinds)}) is stored with "
            f"shape {stored} but used with shape {inner}; the taps reach kernels stacked on "
            "their leading axes only (variable_axes={'params': 0})"
        )
    if extra != len(stacking):
        what = "shared by every iteration (params broadcast)" if extra < len(stacking) else ""
        raise LiftedTransformError(
            f"model: the kernel of {name!r} runs inside nn.{'/nn.'.join(kinds)} but is "
            f"{what or 'stacked more times than it is mapped'}; the taps reach scanned or "
            "vmapped layers whose params are stacked (variable_axes={'params': 0})"
        )
    return tuple(stored[:extra])


def stack_owner(module: nn.Module) -> tuple[str, ...]:
    """Path of the outermost scanned/vmapped module around `module` (groups its iterations)."""
    for i, element in enumerate(getattr(module.scope, "debug_path", ()) or ()):
        if any(f"{k}(" in str(element) for k in STACKING):
            return tuple(module.path[: i + 1])
    return ()


def _subjaxprs(params: dict) -> Iterator[Any]:
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _jaxprs(jaxpr) -> Iterator[Any]:
    yield jaxpr
    for eqn in jaxpr.eqns:
        for sub in _subjaxprs(eqn.params):
            yield from _jaxprs(sub)


def _scopes(eqn) -> list[str]:
    return str(eqn.source_info.name_stack).split("/")


def exclusive_consumers(jaxpr, marks: dict[str, str]) -> set[str]:
    """The output marks whose every consumer lies inside the scope paired with it.

    `marks` maps the named scope of a marked layer output (an `optimization_barrier` traced
    inside it) to the named scope of the one module call that should be its only reader. A
    mark is in the result when no equation outside that scope reads the marked value and
    it is not an output of its jaxpr (a lifted body's output is read by the caller).
    """
    ok: set[str] = set()
    for jx in _jaxprs(jaxpr):
        found: dict[int, str] = {}
        for eqn in jx.eqns:
            if eqn.primitive.name != "optimization_barrier":
                continue
            for scope in _scopes(eqn):
                if scope in marks:
                    for var in eqn.outvars:
                        found[id(var)] = scope
        if not found:
            continue
        readers: dict[str, list[Any]] = {s: [] for s in found.values()}
        for eqn in jx.eqns:
            for var in eqn.invars:
                if id(var) in found:
                    readers[found[id(var)]].append(eqn)
        leaving = {found[id(v)] for v in jx.outvars if id(v) in found}
        for scope, eqns in readers.items():
            if scope in leaving or not eqns:
                continue
            if all(marks[scope] in _scopes(eqn) for eqn in eqns):
                ok.add(scope)
    return ok


# What jax.nn.relu / relu6 trace to: a custom_jvp_call around a jit of that name.
_RELUS = frozenset({"relu", "relu6"})


def _is_relu(eqn) -> bool:
    name = eqn.primitive.name
    if name == "max":  # jnp.maximum(x, 0) written out
        return any(getattr(v, "val", None) is not None and float(v.val) == 0.0 for v in eqn.invars)
    if name in ("jit", "pjit"):
        return eqn.params.get("name") in _RELUS
    if name == "custom_jvp_call":
        inner = eqn.params["call_jaxpr"]
        inner = getattr(inner, "jaxpr", inner)
        return len(inner.eqns) == 1 and _is_relu(inner.eqns[0])
    return False


def relu_fed(jaxpr, marks: set[str]) -> set[str]:
    """The input marks whose marked value is a ReLU (or ReLU6) output.

    Each mark names the scope of an `optimization_barrier` traced on a layer's input; the
    input counts as a ReLU output when the equation producing the barrier's operand in the
    same jaxpr is a relu. An input that enters a lifted body from outside is not followed
    across the boundary (it is reported as not a ReLU output).
    """
    found: set[str] = set()
    for jx in _jaxprs(jaxpr):
        producer = {id(v): eqn for eqn in jx.eqns for v in eqn.outvars}
        for eqn in jx.eqns:
            if eqn.primitive.name != "optimization_barrier":
                continue
            hit = [s for s in _scopes(eqn) if s in marks]
            if hit and eqn.invars and id(eqn.invars[0]) in producer:
                if _is_relu(producer[id(eqn.invars[0])]):
                    found.add(hit[0])
    return found
