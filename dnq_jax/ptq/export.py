"""Ship a `QuantizedModel`: a StableHLO file (exact) or an ONNX QDQ file (integer weights).

    qm = ptq.quantize(model, variables, calib_images, ptq.QuantSpec(w_bits=4, a_bits=4))
    print(ptq.export(qm, "w4a4.stablehlo"))              # exact, runs wherever JAX runs
    print(ptq.export(qm, "w4a4.onnx", format="onnx"))    # onnxruntime and integer engines

Each file gets a JSON sidecar (``w4a4.onnx.json``): input shape and layout, bit-widths, the
method, normalisation if given, sizes. docs/deploy.md tells what each format is for.

StableHLO: `jax.export` of the quantized forward pass with a symbolic batch axis; anything
with JAX reloads it (``jax.export.deserialize(data).call(images)``), bit for bit the
in-process logits on the same backend; its module (``.mlir_module()``) is what XLA's or
IREE's own tools take.

ONNX: the traced forward pass translated to ONNX opset 21 (export_onnx.py). Kernels are
stored as signed integer codes with a scale and zero point per output channel: INT4 where
the weight width is at most 4 bits (2- and 3-bit codes too: ONNX has no narrower type),
INT8 up to 8 bits. Each quantized layer input is QuantizeLinear/DequantizeLinear (UINT8)
with its calibrated per-tensor scale and zero point, behind a Clip to the grid's ends when
the width is under 8 bits. BatchNorm is folded, as in the quantized model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from dnq_jax import taps
from dnq_jax.errors import ConfigError
from dnq_jax.ptq import calibration, export_onnx

FORMATS = ("stablehlo", "onnx")
ONNX_PIP = "pip install onnx onnxruntime (the tested versions are in requirements-dev.txt)"
ORT_NOTE = (
    "onnxruntime: set the session option session.disable_quant_qdq=1; its fused integer "
    "QLinearConv takes one weight zero point for all channels and fails on these"
)
# Largest |dequantized - stored| allowed when reading a kernel's grid back, relative to the
# kernel's largest weight: float32 rounding leaves ~6e-8, while a wrong step (one that is not
# a multiple of the true one, at most 255 steps per channel) misses by more than 1.5e-5.
_GRID_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Exported:
    """One written file: its format, path, sidecar, size and the float32 model's size."""

    format: str
    path: Path
    sidecar: Path
    size_bytes: int
    float_bytes: int
    bits: str

    def __str__(self) -> str:
        return (
            f"{self.format} {self.bits}: {_kb(self.size_bytes)} "
            f"(float32 weights: {_kb(self.float_bytes)}) -> {self.path}"
        )


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} kB"


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError(f"format='onnx' needs the onnx package: {ONNX_PIP}") from None
    return onnx


def bits_name(qm: Any) -> str:
    """'w4a4' (or 'w4a32' for weight-only), as the evaluation tables name precisions."""
    return f"w{qm.w_bits}a{qm.a_bits if qm.a_bits is not None else 32}"


def float_bytes(qm: Any) -> int:
    """Bytes of the model's float32 parameters (folded BatchNorm statistics not counted)."""
    folded = {bn_path for _, bn_path in qm.bn_pairs}
    total = 0
    for path, leaf in traverse_util.flatten_dict(dict(qm.variables)).items():
        if path[0] == "batch_stats" and tuple(path[1:-1]) in folded:
            continue
        total += 4 * int(np.size(leaf))
    return total


def weight_grid(kernel: np.ndarray, bits: int, name: str = "kernel") -> export_onnx.Grid:
    """The integer grid a fake-quantized kernel lies on, per output channel (last axis).

    Every stored weight is ``(q - z) * s`` for integer codes q and zero point z in
    ``0..2^b - 1``, so 0 and every gap between weights are multiples of s, and the smallest
    gap is m * s for some m in 1..2^b - 1. Each such candidate step is refitted by least
    squares to its codes; the coarsest that reproduces every weight within float32 rounding
    with codes in b bits is taken (a coarser exact grid, where one exists, dequantizes to
    the same weights).

    Returns:
      ``(codes, scale, zero_point, bits)``: signed codes ``q - 2^(b-1)`` in the kernel's
      shape, per-channel scale and signed zero point ``z - 2^(b-1)``, and `bits`.

    Raises:
      ValueError: if a channel is not on any b-bit grid containing 0, or b > 8.
    """
    if bits > 8:
        raise ValueError(f"{name}: ONNX export stores weights of 2..8 bits, got {bits}")
    qmax = 2**bits - 1
    flat = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    codes = np.zeros(flat.shape, np.int64)
    scale = np.ones(flat.shape[1])
    zero = np.zeros(flat.shape[1], np.int64)
    for c in range(flat.shape[1]):
        v = np.unique(flat[:, c])
        gaps = np.concatenate([np.abs(v[v != 0]), np.diff(v)])
        if gaps.size == 0:  # an all-zero channel: any grid, code = zero point
            continue
        # Candidate steps: the smallest gap over 1..qmax, each refitted to its codes.
        k = np.round(v[:, None] / (gaps.min() / np.arange(1, qmax + 1)))
        fit = (k * v[:, None]).sum(0) / np.maximum((k * k).sum(0), 1)
        miss = np.abs(k * fit - v[:, None]).max(0)
        z = np.clip(-k[0], 0, qmax)
        ok = (miss <= _GRID_TOLERANCE * np.abs(v).max()) & (k[0] + z >= 0) & (k[-1] + z <= qmax)
        if not ok.any():
            raise ValueError(f"{name}: output channel {c} is not on a {bits}-bit grid")
        i = int(np.argmax(ok))  # the coarsest grid that holds every weight
        scale[c], zero[c] = fit[i], z[i]
        codes[:, c] = np.round(flat[:, c] / fit[i]) + z[i]
    error = np.abs((codes - zero) * scale - flat).max()
    if error > _GRID_TOLERANCE * max(np.abs(flat).max(), 1e-30):
        raise ValueError(f"{name}: the {bits}-bit grid misses the stored weights by {error:g}")
    half = 2 ** (bits - 1)
    return (codes - half).reshape(kernel.shape), scale.astype(np.float32), zero - half, bits


def _kernel_lookup(qm: Any, found: dict[str, str]) -> export_onnx.KernelLookup:
    """Maps a constant of the traced graph to its grid when it is one of the quantized
    kernels (matched by value); records ``{site: storage type}`` in `found`."""
    widths = {name: w for name, (w, _) in qm.bits_per_layer.items()}
    bits = calibration.kernel_bits(qm.graph, widths)
    key = lambda a: (a.shape, a.dtype.str, hashlib.sha1(np.ascontiguousarray(a)).hexdigest())
    table = {}
    for layer in qm.graph.kernel_layers():
        kernel = np.asarray(taps.get_kernel(qm.variables["params"], layer))
        table[key(kernel)] = (layer.name, bits[layer.kernel_key])

    def lookup(kernel: np.ndarray):
        hit = table.get(key(np.asarray(kernel)))
        if hit is None:
            return None
        grid = weight_grid(kernel, hit[1], hit[0])
        found[hit[0]] = "int4" if hit[1] <= 4 else "int8"
        return grid

    return lookup


def _image_shape(qm: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        # The calibration images' shape; for a model made without it, the first layer's
        # input as seen then (the images, for every model that starts with a conv).
        return tuple(qm.image_shape) or tuple(qm.graph.layers[0].input_shape[1:])
    shape = tuple(int(n) for n in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be the image shape without the batch, got {shape}")
    return shape


def export(
    qm: Any,
    path: str | Path,
    format: str = "stablehlo",
    *,
    input_shape: Sequence[int] | None = None,
    normalization: Mapping[str, Any] | None = None,
    platforms: Sequence[str] | None = None,
) -> Exported:
    """Writes the quantized model to `path` and a JSON sidecar to ``path + '.json'``.

    Args:
      qm: what `dnq_jax.ptq.quantize` returned (any method).
      path: the file to write (parent folders are created).
      format: ``'stablehlo'`` (exact; `jax.export` with a symbolic batch axis) or
        ``'onnx'`` (QDQ model, opset 21, integer weights; needs onnx).
      input_shape: the image shape without the batch axis, e.g. ``(32, 32, 3)``; default:
        the calibration images' shape.
      normalization: how images must be prepared, e.g. ``{'mean': [...], 'std': [...]}``;
        written to the sidecar only (the file takes normalised images).
      platforms: StableHLO only: the platforms to lower for (``('cpu', 'cuda')``);
        default the current backend.

    Returns:
      An `Exported` (print it for the size next to the float32 model's).

    Raises:
      ConfigError: for format='onnx' without the onnx package (naming the pip command).
      ValueError: for an unknown format, or a model the ONNX translation cannot express
        (naming the primitive; StableHLO takes any model).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if normalization is not None and not isinstance(normalization, Mapping):
        raise ValueError(f"normalization must be a mapping or None, got {type(normalization)}")
    path = Path(path)
    image = _image_shape(qm, input_shape)
    if format == "stablehlo":
        data, info = _stablehlo(qm, image, platforms)
    else:
        data, info = _onnx(qm, image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    sidecar = path.with_name(path.name + ".json")
    result = Exported(format, path, sidecar, len(data), float_bytes(qm), bits_name(qm))
    meta = {
        "format": format,
        "file": path.name,
        "input": {"name": "images", "shape": ["batch", *image], "dtype": "float32"},
        "input_layout": "NHWC (batch, height, width, channels)" if len(image) == 3 else None,
        "normalization": dict(normalization) if normalization is not None else None,
        "w_bits": qm.w_bits,
        "a_bits": qm.a_bits,
        "method": qm.report.get("method", "rtn"),
        "bits_per_layer": {k: f"w{w}a{a or 32}" for k, (w, a) in qm.bits_per_layer.items()},
        "size_bytes": result.size_bytes,
        "float32_bytes": result.float_bytes,
        **info,
    }
    sidecar.write_text(json.dumps(meta, indent=1, default=_plain) + "\n")
    return result


def _stablehlo(qm: Any, image: tuple[int, ...], platforms: Sequence[str] | None):
    def forward(images: jax.Array) -> jax.Array:
        # The barrier keeps XLA from specialising the program on the weights' and ranges'
        # values (x / scale became x * (1 / scale), flipping roundings); compiled like the
        # in-process model, which takes them as inputs, the file gives its logits bit for bit.
        variables, ranges = jax.lax.optimization_barrier((qm.variables, qm.act_ranges))
        return qm.apply(variables, images, ranges)

    dims = ", ".join(["b", *map(str, image)])
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), np.float32)
    exp = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
    info = {
        "output": {"name": "logits", "shape": [str(d) for d in exp.out_avals[0].shape]},
        "platforms": list(exp.platforms),
        "load": "jax.export.deserialize(data).call(images), with jax only",
    }
    return bytes(exp.serialize()), info


def onnx_model(graph: Any, doc: str = "") -> Any:
    """An ONNX ModelProto of a GraphProto (opset 21, IR 10), checked."""
    onnx = _require_onnx()
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", export_onnx.OPSET)],
        ir_version=export_onnx.IR_VERSION,
        doc_string=doc,
    )
    onnx.checker.check_model(model)
    return model


def _onnx(qm: Any, image: tuple[int, ...]):
    onnx = _require_onnx()
    found: dict[str, str] = {}
    method = qm.report.get("method", "rtn")
    graph, qdq = export_onnx.to_graph(
        lambda images: qm.apply(qm.variables, images), image, _kernel_lookup(qm, found)
    )
    model = onnx_model(graph, f"{bits_name(qm)} {method} QDQ model; {ORT_NOTE}")
    props = {"w_bits": qm.w_bits, "a_bits": qm.a_bits, "method": method}
    onnx.helper.set_model_props(model, {k: str(v) for k, v in props.items()})
    missing = sorted({layer.name for layer in qm.graph.kernel_layers()} - set(found))
    sites = sum(a is not None for _, a in qm.bits_per_layer.values())
    if missing or qdq != sites:
        # The failure this guards against: a graph that silently holds float kernels or
        # unquantized inputs scores like the float model, not like the quantized one.
        raise ValueError(
            f"ONNX export: the traced graph has {qdq} of {sites} input quantizers and misses "
            f"the kernels of {missing}; it would not be the quantized model"
        )
    out = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    info = {
        "output": {"name": "logits", "shape": out},
        "opset": export_onnx.OPSET,
        "weight_storage": found,
        "activation_storage": "uint8",
        "notes": [
            "weights: signed codes q - 2^(b-1) with a scale and zero point per output channel",
            "2- and 3-bit codes are stored in INT4, 5- to 7-bit codes in INT8",
            "activations under 8 bits: Clip to the grid's ends, then UINT8 QuantizeLinear",
            ORT_NOTE,
        ],
    }
    return model.SerializeToString(), info


def _plain(x: Any) -> Any:
    return x.tolist() if hasattr(x, "tolist") else str(x)


def load_stablehlo(path: str | Path) -> Callable[[Any], jax.Array]:
    """The ``images -> logits`` function of a StableHLO file (needs JAX only)."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    return exported.call


def onnx_session(path: str | Path) -> Callable[[Any], np.ndarray]:
    """The ``images -> logits`` function of an ONNX file, run by onnxruntime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"running ONNX files needs onnxruntime: {ONNX_PIP}") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # no warnings about initializers the optimizer drops
    # onnxruntime would fuse DequantizeLinear -> Conv -> QuantizeLinear into its integer
    # QLinearConv, which takes one weight zero point for all channels (symmetric weights)
    # and fails at run time on per-channel zero points; unfused, the graph runs as written.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": np.asarray(images, np.float32)})[0]


def load(exported: Exported | str | Path) -> Callable[[Any], Any]:
    """The ``images -> logits`` function of a written file: an `Exported`'s own format, a
    path's from its name (``.onnx``, else StableHLO)."""
    if isinstance(exported, Exported):
        path, fmt = Path(exported.path), exported.format
    else:
        path = Path(exported)
        fmt = "onnx" if path.suffix == ".onnx" else "stablehlo"
    return onnx_session(path) if fmt == "onnx" else load_stablehlo(path)


def available_formats() -> tuple[str, ...]:
    """The formats this installation can write and run back: ONNX needs onnx and
    onnxruntime (the `dev` extra), StableHLO only jax."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return tuple(f for f in FORMATS if f != "onnx")
    return FORMATS


def export_all(
    qm: Any,
    directory: str | Path,
    *,
    normalization: Mapping[str, Any] | None = None,
    formats: tuple[str, ...] = FORMATS,
) -> list[Exported]:
    """Writes ``<bits>.stablehlo`` and ``<bits>.onnx`` (with sidecars) to `directory`, of
    `formats`; ONNX only where every width is at most 8 bits (what it stores)."""
    formats = [f for f in FORMATS if f in formats]
    if "onnx" in formats and max(max(w, a or 0) for w, a in qm.bits_per_layer.values()) > 8:
        formats.remove("onnx")
    directory = Path(directory)
    return [
        export(qm, directory / f"{bits_name(qm)}.{fmt}", fmt, normalization=normalization)
        for fmt in formats
    ]
