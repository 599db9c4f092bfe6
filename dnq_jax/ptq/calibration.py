"""Bit assignment, per-channel weight quantization and per-tensor activation ranges.

The measuring protocol (BRECQ/QDrop, and the DNQ paper): weights asymmetric per output
channel, activations asymmetric per tensor on the input of every Conv/Dense call site, the
first and last layer at 8 bits. Flax keeps the output channel on the last kernel axis for
Conv (HWIO), depthwise Conv (HW1O) and Dense (IO) alike, so per output channel is always
``channel_axis=-1``.

Every range is widened to contain 0 (as in BRECQ/QDrop), so the grid's zero point is never
clipped. Activation ranges are measured by running calibration images through a forward function
(normally the BN-folded model in eval mode) with `taps.capture_inputs`. Min-max needs only a
running minimum and maximum, so the forward returns two scalars per site. Percentile and MSE
need every captured value; those are gathered for a group of sites at a time, sized so the
captured values stay under a byte budget, at the cost of one pass over the calibration
images per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import quant, taps
from dnq_jax.choices import ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS

PyTree = Any
Ranges = dict[str, tuple[jax.Array, jax.Array]]

END_BITS = 8


def check_calibrator(method: str, allowed: tuple[str, ...], name: str) -> str:
    """Returns `method` if it is one of `allowed`; otherwise raises ValueError naming `name`."""
    if method not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {method!r}")
    return method


def check_positive_int(value: Any, name: str) -> int:
    """Returns `value` if it is a positive int; otherwise raises ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_image_batch(images: Any, name: str) -> None:
    """Raises ValueError naming `name` unless `images` is a non-empty array, batch first."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) < 1:
        raise ValueError(f"{name} must be an array of images, batch first, got {type(images)}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)})")


def assign_bits(
    graph: taps.Graph,
    w_bits: int,
    a_bits: int | None,
    keep_ends_8bit: bool = True,
) -> dict[str, tuple[int, int | None]]:
    """``{site: (weight bits, input activation bits)}`` for every Conv/Dense site.

    With `keep_ends_8bit`, the first and the last layer get 8 bits for both their weights and
    their input (or the global width where that is higher: keeping the ends at 8 bits is
    meant to protect them, never to quantize them harder). ``a_bits=None`` means weight-only.
    """
    w_bits = quant.check_bits(w_bits, "w_bits")
    if a_bits is not None:
        a_bits = quant.check_bits(a_bits, "a_bits")
    ends = {graph.first, graph.last} if keep_ends_8bit else set()
    out = {}
    for layer in graph.layers:
        w, a = w_bits, a_bits
        if layer.name in ends:
            w = max(w, END_BITS)
            a = None if a is None else max(a, END_BITS)
        out[layer.name] = (w, a)
    return out


def kernel_range(
    kernel: jax.Array, bits: int, method: str = "minmax", **calib_kw: Any
) -> tuple[jax.Array, jax.Array]:
    """Per-output-channel range ``(lo, hi)`` of a kernel (keepdims shapes), widened to 0.

    The range behind `quantize_kernel`; reconstruction methods learn the rounding on the grid
    of exactly this range.
    """
    check_calibrator(method, WEIGHT_CALIBRATORS, "w_calibrator")
    return quant.calibrate(kernel, bits, method=method, channel_axis=-1, **calib_kw)


def quantize_kernel(
    kernel: jax.Array, bits: int, method: str = "minmax", **calib_kw: Any
) -> jax.Array:
    """One kernel fake-quantized asymmetric per output channel (the last axis).

    The range comes from `quant.calibrate` (min-max, or the MSE clipping search) and is
    widened to contain 0 (`quant.include_zero`). Use this wherever the evaluation's weight
    quantizer must be reproduced (e.g. to profile weight quantization error).
    """
    lo, hi = kernel_range(kernel, bits, method, **calib_kw)
    return quant.fake_quant_asymmetric(kernel, lo, hi, bits)


def kernel_bits(graph: taps.Graph, w_bits: Mapping[str, int]) -> dict[tuple, int]:
    """``{layer.kernel_key: bits}``: a kernel shared by several sites gets the highest width
    any of its sites asks for (one kernel has one grid); each slice of a stacked kernel is
    its own kernel."""
    out: dict[tuple, int] = {}
    for layer in graph.layers:
        bits = w_bits[layer.name]
        out[layer.kernel_key] = max(bits, out.get(layer.kernel_key, bits))
    return out


def quantize_weights(
    params: PyTree,
    graph: taps.Graph,
    w_bits: Mapping[str, int],
    method: str = "minmax",
    **calib_kw: Any,
) -> PyTree:
    """Params with every Conv/Dense kernel fake-quantized, asymmetric per output channel.

    `w_bits` maps site names to bit-widths; a shared kernel is quantized once, at the width
    `kernel_bits` gives it. `calib_kw` goes to `quant.calibrate` (e.g. ``num_candidates``).
    Biases are left in float, as is usual.
    """
    check_calibrator(method, WEIGHT_CALIBRATORS, "w_calibrator")
    bits_of_kernel = kernel_bits(graph, w_bits)

    def fn(layer: taps.Layer, kernel: jax.Array) -> jax.Array:
        return quantize_kernel(kernel, bits_of_kernel[layer.kernel_key], method, **calib_kw)

    return taps.map_kernels(params, graph.layers, fn)


def batch_indices(n: int, batch_size: int, pad: bool):
    """Index arrays covering 0..n-1; with `pad`, the last one is filled up with repeats so
    every batch has the same shape (one compile). Repeats are harmless only for statistics
    that ignore multiplicity, such as the minimum and maximum."""
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        idx = np.arange(start, start + batch_size if pad else stop)
        yield idx % n


def _per_image_bytes(layer: taps.Layer) -> int:
    shape = layer.input_shape
    return 4 * math.prod(shape[1:]) if len(shape) > 1 else 4


def activation_ranges(
    apply_fn: Callable[[PyTree, jax.Array], Any],
    variables: PyTree,
    images: jax.Array,
    graph: taps.Graph,
    a_bits: Mapping[str, int],
    *,
    method: str = "minmax",
    batch_size: int = 128,
    max_capture_bytes: int = 1 << 29,
    **calib_kw: Any,
) -> Ranges:
    """Per-tensor asymmetric ranges ``{site: (lo, hi)}`` of each listed site's input,
    widened to contain 0.

    Args:
      apply_fn: ``apply_fn(variables, images)`` runs the model whose layer inputs are
        measured (normally the BN-folded model in eval mode); its output is ignored. For a
        graph with sites inside lifted transforms (`taps.Graph.lifted`) it is called as
        ``apply_fn(variables, images, mutable=['params'])`` and must pass `mutable` on to
        ``model.apply`` and return what that returns: the captured values come back in
        the params (`taps.collect`). `variables` arrive `taps.prepare`d.
      variables: the variables `apply_fn` takes.
      images: calibration images, batch first, as the model takes them.
      graph: the model's `taps.trace` graph.
      a_bits: ``{site: bits}`` for the sites to calibrate (the width matters for MSE).
      method: ``'minmax'``, ``'percentile'`` or ``'mse'``.
      batch_size: images per forward pass.
      max_capture_bytes: budget for the values held at once by percentile/MSE.
      **calib_kw: options of `quant.calibrate` (``percentile``, ``num_candidates``).

    Returns:
      float32 scalars ``(lo, hi)`` per site.
    """
    check_calibrator(method, ACTIVATION_CALIBRATORS, "a_calibrator")
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("calib_images: the calibration set is empty")
    batch_size = min(check_positive_int(batch_size, "batch_size"), n)
    sites = [layer.name for layer in graph.layers if a_bits.get(layer.name) is not None]
    if not sites:
        return {}
    variables = taps.prepare(variables, graph)
    if method == "minmax":
        return _minmax_ranges(apply_fn, variables, images, graph, sites, batch_size)
    layers = {layer.name: layer for layer in graph.layers}
    groups: list[list[str]] = [[]]
    used = 0
    for site in sites:
        size = _per_image_bytes(layers[site]) * n
        if groups[-1] and used + size > max_capture_bytes:
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += size
    ranges: Ranges = {}
    for group in groups:
        captured = _capture(apply_fn, variables, images, graph, group, batch_size)
        for site in group:
            lo, hi = quant.calibrate(captured.pop(site), a_bits[site], method=method, **calib_kw)
            ranges[site] = (lo.reshape(()), hi.reshape(()))
    return ranges


def _captured(apply_fn, variables, x, graph, sites, reduce) -> dict:
    """``{site: reduce(site, input)}`` over one forward pass, lifted sites included."""
    store: dict = {}
    with taps.capture_inputs(store, only=sites, reduce=reduce):
        if not graph.lifted:
            apply_fn(variables, x)
            return store
        _, state = apply_fn(variables, x, mutable=[taps.COLLECTION])
    return taps.collect(store, state, graph, only=sites)


def _minmax_ranges(apply_fn, variables, images, graph, sites, batch_size) -> Ranges:
    def reduce(name: str, x: jax.Array):
        x = x.astype(jnp.float32)
        return jnp.min(x), jnp.max(x)

    @jax.jit
    def stats(variables, x):
        return _captured(apply_fn, variables, x, graph, sites, reduce)

    ranges: Ranges = {}
    for idx in batch_indices(images.shape[0], batch_size, pad=True):
        batch_stats = stats(variables, images[idx])
        for site in sites:
            lo, hi = batch_stats[site]
            if site in ranges:
                lo, hi = jnp.minimum(ranges[site][0], lo), jnp.maximum(ranges[site][1], hi)
            ranges[site] = (lo, hi)
    return {site: quant.include_zero(lo, hi) for site, (lo, hi) in ranges.items()}


def _capture(apply_fn, variables, images, graph, sites, batch_size) -> dict[str, jax.Array]:
    """Every value entering each site over all images, flattened (per-tensor ranges do not
    care about the layout)."""

    @jax.jit
    def grab(variables, x):
        reduce = lambda name, v: v.astype(jnp.float32).reshape(-1)
        return _captured(apply_fn, variables, x, graph, sites, reduce)

    parts: dict[str, list[jax.Array]] = {site: [] for site in sites}
    for idx in batch_indices(images.shape[0], batch_size, pad=False):
        store = grab(variables, images[idx])
        for site in sites:
            parts[site].append(store[site])
    return {site: jnp.concatenate(p) for site, p in parts.items()}
