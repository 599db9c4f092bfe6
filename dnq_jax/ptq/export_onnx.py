"""A JAX ``images -> logits`` function as an ONNX graph, fake-quantizers as QDQ nodes.

The function is traced once (`jax.make_jaxpr`, batch 2 so the batch axis is never mistaken
for a singleton) and its jaxpr is translated primitive by primitive: every computation on
constants alone (folded BatchNorm biases, activation ranges, broadcasts) is evaluated here,
so the graph holds only what depends on the images. Each call of the activation quantizer
(`quant.fake_quant_asymmetric`) becomes QuantizeLinear -> DequantizeLinear with the same
scale and zero point; each quantized kernel becomes integer codes behind a per-axis
DequantizeLinear. Because the graph is read off the traced computation, not off the Flax
layers, the taps (folded biases, identity BatchNorms, input quantizers) are in it exactly.

Layout: JAX keeps NHWC, ONNX convolutions want NCHW. Each value carries the permutation it is
stored in; a conv leaves its output channel-first and element-wise ops keep that layout, so
transposes appear only where a reshape or an op without a layout rule needs the JAX order.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.extend import core

from dnq_jax import quant

OPSET = 21
IR_VERSION = 10  # opset 21 (4-bit types) needs IR 10; onnxruntime 1.23 reads up to 11
TRACE_BATCH = 2
# The pjit name of the activation quantizer; it is replaced by a QDQ pair.
QUANTIZER = quant._fake_quant_asymmetric.__name__

# (signed codes in the kernel's layout, scale and signed zero point per output channel, bits)
Grid = tuple[np.ndarray, np.ndarray, np.ndarray, int]
KernelLookup = Callable[[np.ndarray], "Grid | None"]

# JAX primitive -> ONNX op, where the ONNX name is the capitalised JAX one.
_UNARY = {p: p.capitalize() for p in ("neg", "exp", "log", "tanh", "sqrt", "abs", "erf")}
_UNARY |= {p: p.capitalize() for p in ("floor", "ceil", "sign")} | {"logistic": "Sigmoid"}
_BINARY = {p: p.capitalize() for p in ("add", "sub", "mul", "div", "max", "min")}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}
_CALLS = ("pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")


@dataclasses.dataclass(frozen=True)
class _Val:
    """A tensor of the graph: its name, JAX shape, the permutation it is stored in (None:
    JAX order), and the Conv node that made it when a bias may still be fused into it."""

    name: str
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None = None
    conv: Any = None


def _inner(eqn) -> tuple[Any, list]:
    """(jaxpr, consts) of a call-like equation."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            sub = eqn.params[key]
            if isinstance(sub, core.ClosedJaxpr):
                return sub.jaxpr, list(sub.consts)
            return sub, []
    raise ValueError(f"ONNX export: cannot read the body of {eqn.primitive.name}")


def _literals(jaxpr) -> list[float]:
    out = []
    for eqn in jaxpr.eqns:
        out += [float(v.val) for v in eqn.invars if isinstance(v, core.Literal)]
        if eqn.primitive.name in _CALLS:
            out += _literals(_inner(eqn)[0])
    return out


class _Builder:
    """Translates one jaxpr into ONNX nodes and initializers."""

    def __init__(self, onnx_mod, kernels: KernelLookup):
        self.onnx = onnx_mod
        self.kernels = kernels
        self.nodes: list = []
        self.inits: list = []
        self.count = collections.Counter()
        self.qdq_inputs = 0

    # -- graph pieces ---------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self.count[hint] += 1
        return f"{hint}_{self.count[hint]}"

    def init(self, array: np.ndarray, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], **attrs))
        return out

    def layout(self, v: _Val, perm: tuple[int, ...] | None) -> str:
        """The name of `v` stored in `perm` (None: JAX order), transposing if needed."""
        if v.perm == perm:
            return v.name
        back = [int(i) for i in np.argsort(v.perm or ())]
        name = v.name if v.perm is None else self.node("Transpose", [v.name], perm=back)
        return name if perm is None else self.node("Transpose", [name], perm=list(perm))

    def operand(self, x: Any, like: _Val, perm: tuple[int, ...] | None) -> str:
        """An element-wise operand stored as `perm`: constants are broadcast to the rank of
        `like`, and a constant that repeats one row over the traced batch keeps one row."""
        if isinstance(x, _Val):
            return self.layout(x, perm)
        c = np.asarray(x)
        if c.ndim == 0:
            return self.init(c)
        c = c.reshape((1,) * (len(like.shape) - c.ndim) + c.shape)
        if like.shape[0] == TRACE_BATCH and c.shape[0] == TRACE_BATCH:
            if not np.all(c == c[:1]):
                raise ValueError("ONNX export: a constant differs across the batch")
            c = c[:1]
        return self.init(c if perm is None else np.transpose(c, perm))

    def batch_shape(self, shape: tuple[int, ...], like: tuple[int, ...]) -> list[int]:
        """A Reshape target: the batch axis is copied from the input (0), never fixed."""
        if not shape or shape[0] != TRACE_BATCH or not like or like[0] != TRACE_BATCH:
            raise ValueError(f"ONNX export: a reshape {like} -> {shape} merges the batch axis")
        return [0, *shape[1:]]

    # -- translation ----------------------------------------------------------------------
    def run(self, jaxpr, consts: list, args: list) -> list:
        env: dict = {}
        read = lambda v: np.asarray(v.val) if isinstance(v, core.Literal) else env[v]
        uses = collections.Counter(v for e in jaxpr.eqns for v in e.invars if not _lit(v))
        uses.update({v: 2 for v in jaxpr.outvars if not _lit(v)})  # outer readers unknown
        for var, val in zip(jaxpr.constvars, consts):
            env[var] = np.asarray(val)
        for var, val in zip(jaxpr.invars, args):
            # A conv output passed into a nested call (read once outside it) may be read
            # twice inside: its bias can be fused only if this body reads it once too.
            if isinstance(val, _Val) and val.conv is not None and uses[var] != 1:
                val = dataclasses.replace(val, conv=None)
            env[var] = val
        for eqn in jaxpr.eqns:
            vals = [read(v) for v in eqn.invars]
            if not any(isinstance(v, _Val) for v in vals):
                outs = [np.asarray(o) for o in _evaluate(eqn, vals)]
            else:
                outs = self.translate(eqn, vals, single_use=uses[eqn.outvars[0]] == 1)
            for var, out in zip(eqn.outvars, outs):
                env[var] = out
        return [read(v) for v in jaxpr.outvars]

    def translate(self, eqn, vals: list, single_use: bool) -> list:
        prim, p = eqn.primitive.name, eqn.params
        shape = tuple(eqn.outvars[0].aval.shape)
        if prim in _CALLS and p.get("name") == QUANTIZER:
            return [self.quantizer(eqn, *vals)]
        if prim in _CALLS:
            jaxpr, consts = _inner(eqn)
            return self.run(jaxpr, consts, vals)
        x = next(v for v in vals if isinstance(v, _Val))
        if prim in _BINARY:
            return [self.binary(prim, vals, shape)]
        if prim in _UNARY:
            return [_Val(self.node(_UNARY[prim], [x.name]), shape, x.perm)]
        if prim == "rsqrt":
            root = self.node("Sqrt", [x.name])
            return [_Val(self.node("Reciprocal", [root]), shape, x.perm)]
        if prim in ("integer_pow", "square") and p.get("y", 2) == 2:
            return [_Val(self.node("Mul", [x.name, x.name]), shape, x.perm)]
        if prim == "convert_element_type":
            if np.dtype(p["new_dtype"]) == np.float32:
                return [dataclasses.replace(x, shape=shape, conv=None)]
            to = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"]))
            return [_Val(self.node("Cast", [x.name], to=to), shape, x.perm)]
        if prim in ("copy", "copy_p", "optimization_barrier"):
            return vals
        if prim == "clamp":
            lo, hi = (self.init(np.asarray(v, np.float32)) for v in (vals[0], vals[2]))
            return [_Val(self.node("Clip", [x.name, lo, hi]), shape, x.perm)]
        if prim == "conv_general_dilated":
            return [self.conv(vals[0], vals[1], p, shape, single_use)]
        if prim == "dot_general":
            return [self.dot(vals[0], vals[1], p, shape)]
        if prim in _REDUCE:
            return [self.reduce(_REDUCE[prim], x, tuple(p["axes"]), shape)]
        if prim in ("reduce_window_max", "reduce_window_sum"):
            return [self.pool(prim, x, p, shape)]
        return [self.reshaping(prim, vals, x, p, shape)]

    def binary(self, prim: str, vals: list, shape: tuple[int, ...]) -> _Val:
        a, b = vals
        dyn = [v for v in vals if isinstance(v, _Val)]
        perms = {v.perm for v in dyn}
        perm = perms.pop() if len(perms) == 1 else None
        like = _Val("", shape)
        if prim == "add" and len(dyn) == 1 and dyn[0].conv is not None:
            fused = self.fuse_bias(dyn[0], b if dyn[0] is a else a, shape)
            if fused is not None:
                return fused
        if prim == "max" and len(dyn) == 1:
            const = b if dyn[0] is a else a
            if not np.any(const) and np.asarray(const).size == 1:
                return _Val(self.node("Relu", [dyn[0].name]), shape, dyn[0].perm)
        inputs = [self.operand(v, like, perm) for v in vals]
        return _Val(self.node(_BINARY[prim], inputs), shape, perm)

    def fuse_bias(self, y: _Val, const: Any, shape: tuple[int, ...]) -> _Val | None:
        """A per-channel constant added to a conv's only output becomes the conv's bias."""
        c = np.asarray(const)
        c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
        channel = y.perm[1]  # the conv output is stored (N, C, ...): C is JAX axis perm[1]
        if c.ndim != len(shape) or any(n != 1 for i, n in enumerate(c.shape) if i != channel):
            return None
        bias = np.broadcast_to(c.reshape(-1), (shape[channel],)).astype(np.float32)
        y.conv.input.append(self.init(bias, "bias"))
        return _Val(y.name, shape, y.perm)

    def quantizer(self, eqn, x: _Val, lo: Any, hi: Any) -> _Val:
        if not isinstance(lo, np.ndarray) or not isinstance(hi, np.ndarray) or lo.size != 1:
            raise ValueError("ONNX export: an activation quantizer with a non-constant range")
        qmax = max(_literals(_inner(eqn)[0]))
        bits = int(round(math.log2(qmax + 1)))
        if 2.0**bits - 1 != qmax or bits > 8:
            raise ValueError(f"ONNX export takes activations of 2..8 bits, got a {qmax:g} grid")
        scale, zero = (
            np.asarray(v, np.float32).reshape(())
            for v in quant.asymmetric_qparams(lo.reshape(()), hi.reshape(()), bits)
        )
        # Quantized inputs feed convs: store them channel-first before the QDQ pair, so the
        # engine sees DequantizeLinear -> Conv with no transpose in between.
        perm = x.perm
        if perm is None and len(x.shape) > 2:
            perm = (0, len(x.shape) - 1, *range(1, len(x.shape) - 1))
        name = self.layout(x, perm)
        if bits < 8:
            # QuantizeLinear saturates at the container's 0..255; the b-bit grid's own ends
            # are enforced by clipping to them first (exact: both ends are grid points).
            ends = [(np.float32(q) - zero) * scale for q in (0.0, qmax)]
            name = self.node("Clip", [name, *(self.init(np.float32(e)) for e in ends)])
        s, z = self.init(scale, "act_scale"), self.init(zero.astype(np.uint8), "act_zero")
        q = self.node("QuantizeLinear", [name, s, z], "act_q")
        self.qdq_inputs += 1
        return _Val(self.node("DequantizeLinear", [q, s, z], "act_dq"), x.shape, perm)

    def weight(self, kernel: np.ndarray, perm: tuple[int, ...]) -> str:
        """The kernel stored as `perm`: integer codes behind DequantizeLinear when it is a
        quantized kernel, float32 otherwise."""
        grid = self.kernels(kernel)
        if grid is None:
            return self.init(np.transpose(kernel, perm).astype(np.float32), "weight")
        codes, scale, zero, bits = grid
        axis = perm.index(kernel.ndim - 1)  # the output channel, last in Flax kernels
        container = ml_dtypes.int4 if bits <= 4 else np.int8
        w = self.init(np.transpose(codes, perm).astype(container), "weight_q")
        s = self.init(scale.astype(np.float32), "weight_scale")
        z = self.init(zero.astype(container), "weight_zero")
        return self.node("DequantizeLinear", [w, s, z], "weight_dq", axis=axis)

    def conv(self, x: Any, kernel: Any, p: dict, shape: tuple[int, ...], single: bool) -> _Val:
        if not isinstance(x, _Val) or not isinstance(kernel, np.ndarray):
            raise ValueError("ONNX export: a convolution of two computed tensors")
        dn = p["dimension_numbers"]
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ValueError("ONNX export: transposed or batch-grouped convolutions")
        pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
        if min(pads) < 0:
            raise ValueError("ONNX export: negative convolution padding")
        w = self.weight(kernel, tuple(dn.rhs_spec))
        attrs = dict(strides=list(p["window_strides"]), pads=pads)
        attrs.update(dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
        out = self.node("Conv", [self.layout(x, tuple(dn.lhs_spec)), w], **attrs)
        return _Val(out, shape, tuple(dn.out_spec), self.nodes[-1] if single else None)

    def dot(self, x: Any, w: Any, p: dict, shape: tuple[int, ...]) -> _Val:
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        if lb or rb or not isinstance(x, _Val) or tuple(lc) != (len(x.shape) - 1,):
            raise ValueError("ONNX export: a dot_general other than x @ W")
        if len(w.shape) != 2 or (isinstance(w, _Val) and tuple(rc) != (0,)):
            raise ValueError("ONNX export: a dot_general other than x @ W")
        perm = (0, 1) if tuple(rc) == (0,) else (1, 0)
        name = self.layout(w, None) if isinstance(w, _Val) else self.weight(w, perm)
        return _Val(self.node("MatMul", [self.layout(x, None), name]), shape)

    def reduce(self, op: str, x: _Val, axes: tuple[int, ...], shape: tuple[int, ...]) -> _Val:
        perm = x.perm or tuple(range(len(x.shape)))
        phys = [perm.index(a) for a in axes]
        out = self.node(op, [x.name, self.init(np.asarray(phys, np.int64))], keepdims=0)
        kept = [a for a in perm if a not in axes]
        out_perm = tuple(sorted(kept).index(a) for a in kept)
        return _Val(out, shape, None if out_perm == tuple(sorted(out_perm)) else out_perm)

    def pool(self, prim: str, x: _Val, p: dict, shape: tuple[int, ...]) -> _Val:
        n = len(x.shape)
        window, strides = p["window_dimensions"], p["window_strides"]
        edges = (0, n - 1)  # batch and channel (NHWC) must not be pooled
        trivial = all(
            window[i] == 1 and strides[i] == 1 and p["padding"][i] == (0, 0) for i in edges
        )
        dilated = any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"]))
        if n < 3 or not trivial or dilated:
            raise ValueError(f"ONNX export: {prim} over the batch or channel axis, or dilated")
        perm = (0, n - 1, *range(1, n - 1))
        spatial = range(1, n - 1)
        attrs = dict(kernel_shape=[int(window[i]) for i in spatial])
        attrs.update(strides=[int(strides[i]) for i in spatial])
        attrs["pads"] = [int(p["padding"][i][0]) for i in spatial]
        attrs["pads"] += [int(p["padding"][i][1]) for i in spatial]
        name = self.layout(x, perm)
        if prim == "reduce_window_max":
            return _Val(self.node("MaxPool", [name], **attrs), shape, perm)
        mean = self.node("AveragePool", [name], count_include_pad=1, **attrs)
        size = np.float32(math.prod(attrs["kernel_shape"]))
        return _Val(self.node("Mul", [mean, self.init(size)]), shape, perm)

    def reshaping(self, prim: str, vals: list, x: _Val, p: dict, shape: tuple) -> _Val:
        """Ops that move data between axes, computed in JAX order."""
        name = self.layout(x, None)
        if prim in ("reshape", "squeeze", "expand_dims"):
            target = self.init(np.asarray(self.batch_shape(shape, x.shape), np.int64))
            return _Val(self.node("Reshape", [name, target]), shape)
        if prim == "broadcast_in_dim":
            # Only new singleton axes (a reshape); an expanding broadcast has no user here.
            dims = tuple(p["broadcast_dimensions"])
            kept = tuple(shape[d] for d in dims) == x.shape and list(dims) == sorted(dims)
            if not kept or math.prod(shape) != math.prod(x.shape):
                raise ValueError("ONNX export: a broadcast that expands a computed tensor")
            target = np.asarray(self.batch_shape(shape, x.shape), np.int64)
            return _Val(self.node("Reshape", [name, self.init(target)]), shape)
        if prim == "transpose":
            return _Val(self.node("Transpose", [name], perm=list(p["permutation"])), shape)
        if prim == "concatenate":
            like = _Val("", shape)
            inputs = [self.operand(v, like, None) for v in vals]
            return _Val(self.node("Concat", inputs, axis=int(p["dimension"])), shape)
        raise ValueError(
            f"ONNX export: no translation for the JAX primitive {prim!r}; "
            "format='stablehlo' exports any model"
        )


def _evaluate(eqn, vals: list) -> list:
    """An equation of constants, evaluated now (as `jax.core.eval_jaxpr` does)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    # Older JAX returns (sub-functions, params); newer JAX the params alone.
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    outs = eqn.primitive.bind(*subfuns, *vals, **params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _lit(v) -> bool:
    return isinstance(v, core.Literal)


def to_graph(fn: Callable[[jax.Array], jax.Array], image: tuple[int, ...], kernels: KernelLookup):
    """`fn` (``images -> logits``, float32 images of shape `image` after a batch axis) as an
    ONNX GraphProto with a dynamic batch axis, input 'images' and output 'logits'.

    `kernels` maps a constant kernel (Flax layout, output channel last) to its integer grid
    ``(signed codes, scale per channel, signed zero point per channel, bits)``, stored in
    INT4 up to 4 bits and INT8 above, or to None to keep it in float32. Returns ``(graph,
    number of QDQ-quantized inputs)``.

    Raises:
      ValueError: for a primitive or pattern with no translation, naming it.
    """
    import onnx

    spec = jax.ShapeDtypeStruct((TRACE_BATCH, *image), np.float32)
    closed = jax.make_jaxpr(fn)(spec)
    b = _Builder(onnx, kernels)
    (out,) = b.run(closed.jaxpr, list(closed.consts), [_Val("images", spec.shape)])
    if not isinstance(out, _Val):
        raise ValueError("ONNX export: the output does not depend on the images")
    b.nodes.append(onnx.helper.make_node("Identity", [b.layout(out, None)], ["logits"]))
    f32 = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        b.nodes,
        "quantized_model",
        [onnx.helper.make_tensor_value_info("images", f32, ["batch", *image])],
        [onnx.helper.make_tensor_value_info("logits", f32, ["batch", *out.shape[1:]])],
        b.inits,
    )
    return graph, b.qdq_inputs
