"""Uniform fake-quantizers and range calibrators: pure, jittable JAX math.

Everything here maps float arrays to float arrays that lie on a uniform integer grid
("fake" quantization), so the same code serves the DNQ error profiler, round-to-nearest PTQ
and the reconstruction methods. Bit-widths are static Python ints, checked at trace time;
ranges (``lo``, ``hi``, ``absmax``) are arrays with ``keepdims`` shapes that broadcast
against the tensor they describe.

Granularity is given by ``channel_axis``: ``None`` means one range for the whole tensor,
an int means one range per index of that axis. Flax kernels keep the output channel on the
last axis for both ``Conv`` (HWIO) and ``Dense`` (IO), so per-output-channel weight
quantization is ``channel_axis=-1``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Floor on the step size. A constant channel has hi == lo, hence s == 0 and 0/0 in x/s; a
# floor this small leaves every real range untouched yet keeps x/s finite for any |x| below
# 3e26, so the rounding and clipping never meet Inf or NaN.
_SCALE_FLOOR = 1e-12

CALIBRATION_METHODS = ("minmax", "percentile", "mse", "lp")

# Upper bound on elements materialised at once by the clipping-ratio search: candidates are
# evaluated in batches so that a large activation tensor does not cost num_candidates copies.
_SEARCH_ELEMENTS = 1 << 24


def check_bits(bits: int, name: str = "bits") -> int:
    """Returns ``bits`` as an int after checking it is an integer in 2..16.

    Raises:
      ValueError: naming ``name`` when ``bits`` is not a (non-bool) integer in 2..16; this
        includes traced values, since the bit-width fixes the grid at trace time.
    """
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise ValueError(f"{name} must be a Python int in 2..16, got {bits!r}")
    if not 2 <= int(bits) <= 16:
        raise ValueError(f"{name} must be in 2..16, got {bits}")
    return int(bits)


def reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    """Axes to reduce over for a range: all but ``channel_axis`` (all when it is None).

    Raises:
      ValueError: if ``channel_axis`` is not an int in ``[-ndim, ndim)``.
    """
    if channel_axis is None:
        return tuple(range(ndim))
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise ValueError(f"channel_axis must be an int or None, got {channel_axis!r}")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}-d array")
    keep = int(channel_axis) % ndim
    return tuple(a for a in range(ndim) if a != keep)


def _compute_dtype(dtype) -> jnp.dtype:
    # bf16/f16 carry too few mantissa bits for x/s and the grid arithmetic; f64 stays f64.
    return jnp.promote_types(dtype, jnp.float32)


def _check_float(x: jax.Array, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    return x


def _check_range_shape(x: jax.Array, r: jax.Array, name: str) -> None:
    try:
        shape = jnp.broadcast_shapes(x.shape, jnp.shape(r))
    except ValueError:
        shape = None
    if shape != x.shape:
        raise ValueError(f"{name} of shape {jnp.shape(r)} does not broadcast to x {x.shape}")


def minmax(x: jax.Array, channel_axis: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Data minimum and maximum, per tensor or per ``channel_axis``, with keepdims shapes."""
    x = _check_float(x, "x")
    return _minmax(x, reduce_axes(x.ndim, channel_axis))


# Public functions check their arguments in Python and run the math as one jitted program,
# so eager callers (a profiler looping over layers) compile one kernel per shape instead of
# dispatching every op; inside a caller's jit the nested programs are simply inlined.
@functools.partial(jax.jit, static_argnames="axes")
def _minmax(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)


def asymmetric_qparams(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Step size and zero point of the asymmetric uniform quantizer over ``[lo, hi]``.

    ``s = (hi - lo) / (2^b - 1)`` (floored at a tiny positive value so a constant channel
    gives no NaN) and ``z = clip(round(-lo / s), 0, 2^b - 1)``, returned as floats. The zero
    point is clipped, so the grid covers ``[lo, hi]`` only when ``lo <= 0 <= hi``; a range
    that excludes zero gets a grid anchored at zero (widen it to include zero if that matters).
    """
    return _asymmetric_qparams(lo, hi, check_bits(bits))


@functools.partial(jax.jit, static_argnames="bits")
def _asymmetric_qparams(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    dtype = _compute_dtype(jnp.result_type(lo, hi))
    lo, hi = jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)
    qmax = 2.0**bits - 1
    scale = jnp.maximum((hi - lo) / qmax, _SCALE_FLOOR)
    zero_point = jnp.clip(jnp.round(-lo / scale), 0.0, qmax)
    return scale, zero_point


def fake_quant_asymmetric(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
    """Quantizes ``x`` onto the ``bits``-bit asymmetric grid of ``[lo, hi]`` and back.

    ``x_int = clip(round(x / s) + z, 0, 2^b - 1)``, ``x_hat = (x_int - z) * s``. The result
    has the dtype of ``x``; half-precision inputs are computed in float32.
    """
    bits = check_bits(bits)
    x = _check_float(x, "x")
    _check_range_shape(x, lo, "lo")
    _check_range_shape(x, hi, "hi")
    return _fake_quant_asymmetric(x, lo, hi, bits)


@functools.partial(jax.jit, static_argnames="bits")
def _fake_quant_asymmetric(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: int) -> jax.Array:
    scale, zero_point = _asymmetric_qparams(lo, hi, bits)
    xf = x.astype(_compute_dtype(x.dtype))
    x_int = jnp.clip(jnp.round(xf / scale) + zero_point, 0.0, 2.0**bits - 1)
    return ((x_int - zero_point) * scale).astype(x.dtype)


def fake_quant_symmetric(
    x: jax.Array, absmax: jax.Array, bits: int, *, denominator: float | None = None
) -> jax.Array:
    """Quantizes ``x`` onto the symmetric signed ``bits``-bit grid of scale ``absmax/denominator``.

    Integer codes are clipped to ``[-2^(b-1), 2^(b-1) - 1]``. ``denominator`` defaults to
    ``2^(b-1) - 1``, which keeps ``absmax`` itself on the grid; ``2^(b-1) - 0.5`` is Qwix's
    choice (int8: ``absmax / 127.5``) and reproduces its dequantized values.
    """
    bits = check_bits(bits)
    x = _check_float(x, "x")
    _check_range_shape(x, absmax, "absmax")
    if denominator is None:
        denominator = 2.0 ** (bits - 1) - 1
    elif not isinstance(denominator, (int, float, np.floating, np.integer)) or denominator <= 0:
        raise ValueError(f"denominator must be a positive number, got {denominator!r}")
    return _fake_quant_symmetric(x, absmax, bits, float(denominator))


@functools.partial(jax.jit, static_argnames=("bits", "denominator"))
def _fake_quant_symmetric(x: jax.Array, absmax: jax.Array, bits: int, denominator: float):
    dtype = _compute_dtype(x.dtype)
    scale = jnp.maximum(jnp.asarray(absmax, dtype) / denominator, _SCALE_FLOOR)
    q = jnp.clip(jnp.round(x.astype(dtype) / scale), -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    return (q * scale).astype(x.dtype)


def _percentiles(
    x: jax.Array, qs: tuple[float, ...], axes: tuple[int, ...]
) -> tuple[jax.Array, ...]:
    out = jnp.percentile(x, jnp.asarray(qs, x.dtype), axis=axes, keepdims=True)
    return tuple(out[i] for i in range(len(qs)))


def _search_ratio(
    x: jax.Array,
    axes: tuple[int, ...],
    quantizer: Callable[[jax.Array], jax.Array],
    p: float,
    num_candidates: int,
) -> jax.Array:
    """Per-range clipping ratio in {1, 1 - 1/n, ..., 1/n} minimising mean |Q(x) - x|^p.

    ``quantizer(alpha)`` fake-quantizes ``x`` with its range scaled by ``alpha`` (keepdims
    shape). Index 0 is alpha = 1 (the unclipped range) and argmin keeps the first of equal
    errors, so the search can only match or beat the range it started from.
    """
    alphas = 1.0 - jnp.arange(num_candidates, dtype=x.dtype) / num_candidates

    def error(alpha: jax.Array) -> jax.Array:
        d = jnp.abs(quantizer(alpha) - x)
        d = d * d if p == 2.0 else d**p
        return jnp.mean(d, axis=axes, keepdims=True)

    batch = max(1, min(num_candidates, _SEARCH_ELEMENTS // max(x.size, 1)))
    errors = jax.lax.map(error, alphas, batch_size=batch)
    return alphas[jnp.argmin(errors, axis=0)]


def _check_calib_args(method: str, percentile: float, p: float, num_candidates: int) -> None:
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, (int, np.integer)):
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates}")


def include_zero(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The range widened to contain 0, as BRECQ/QDrop's quantizers do.

    The asymmetric grid clips its zero point into [0, 2^b - 1], so a range without 0 (the
    pooled post-ReLU input of a head, a channel of all-positive weights) would be anchored at
    0 and clip everything above ``hi - lo``; containing 0 keeps the grid on the data.
    """
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def calibrate(
    x: jax.Array,
    bits: int,
    *,
    method: str = "minmax",
    channel_axis: int | None = None,
    symmetric: bool = False,
    percentile: float = 99.99,
    p: float = 2.0,
    num_candidates: int = 100,
) -> tuple[jax.Array, jax.Array]:
    """Quantization range ``(lo, hi)`` of ``x`` for a ``bits``-bit grid, keepdims shapes.

    Methods:
      ``"minmax"``: the data range, widened to include zero (asymmetric ranges always
        contain zero, so a one-signed tensor is not clipped at its far end).
      ``"percentile"``: the ``(100 - percentile)``-th and ``percentile``-th percentiles.
      ``"mse"`` / ``"lp"``: the min-max range scaled by the clipping ratio alpha in
        ``{1, 1 - 1/n, ..., 1/n}`` (n = ``num_candidates``) that minimises
        ``mean |Q(x) - x|^p`` (p = 2 for ``"mse"``); alpha = 1 is a candidate, so the
        result is never worse than min-max under that error.
    With ``symmetric=True`` the range is ``(-absmax, absmax)``, absmax taken from ``|x|`` by
    the same method and searched with :func:`fake_quant_symmetric` (default denominator).
    Ranges of half-precision inputs are returned in float32.

    Raises:
      ValueError: on a bad ``bits``, ``method``, ``channel_axis``, ``percentile``, ``p`` or
        ``num_candidates``.
    """
    bits = check_bits(bits)
    _check_calib_args(method, percentile, p, num_candidates)
    x = _check_float(x, "x")
    reduce_axes(x.ndim, channel_axis)
    return _calibrate(
        x,
        bits,
        method,
        channel_axis,
        bool(symmetric),
        float(percentile),
        2.0 if method == "mse" else float(p),
        int(num_candidates),
    )


@functools.partial(jax.jit, static_argnums=tuple(range(1, 8)))
def _calibrate(
    x: jax.Array,
    bits: int,
    method: str,
    channel_axis: int | None,
    symmetric: bool,
    percentile: float,
    p: float,
    num_candidates: int,
) -> tuple[jax.Array, jax.Array]:
    axes = reduce_axes(x.ndim, channel_axis)
    xf = x.astype(_compute_dtype(x.dtype))
    if symmetric:
        ax = jnp.abs(xf)
        if method == "percentile":
            (absmax,) = _percentiles(ax, (percentile,), axes)
        else:
            absmax = jnp.max(ax, axis=axes, keepdims=True)
        if method in ("mse", "lp"):
            quantizer = lambda a: _fake_quant_symmetric(xf, a * absmax, bits, 2.0 ** (bits - 1) - 1)
            absmax = absmax * _search_ratio(xf, axes, quantizer, p, num_candidates)
        return -absmax, absmax

    if method == "percentile":
        lo, hi = _percentiles(xf, (100.0 - percentile, percentile), axes)
    else:
        lo, hi = _minmax(xf, axes)
    lo, hi = include_zero(lo, hi)
    if method == "percentile":
        return lo, hi
    if method in ("mse", "lp"):
        quantizer = lambda a: _fake_quant_asymmetric(xf, a * lo, a * hi, bits)
        alpha = _search_ratio(xf, axes, quantizer, p, num_candidates)
        lo, hi = alpha * lo, alpha * hi
    return lo, hi


def quantize(
    x: jax.Array,
    bits: int,
    *,
    channel_axis: int | None = None,
    symmetric: bool = False,
    method: str = "minmax",
    **calib_kw,
) -> jax.Array:
    """Calibrates a range on ``x`` itself and fake-quantizes ``x`` with it.

    This is the weight path: ``quantize(kernel, 4, channel_axis=-1)`` is 4-bit asymmetric
    per-output-channel min-max quantization of a Flax Conv or Dense kernel. ``calib_kw``
    goes to :func:`calibrate` (``percentile``, ``p``, ``num_candidates``).
    """
    lo, hi = calibrate(
        x, bits, method=method, channel_axis=channel_axis, symmetric=symmetric, **calib_kw
    )
    if symmetric:
        return fake_quant_symmetric(x, hi, bits)
    return fake_quant_asymmetric(x, lo, hi, bits)


def ste(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Straight-through estimator: forward ``fn(x, ...)``, gradient of the identity in ``x``.

    ``ste(fn)(x, *args, **kw) = x + stop_gradient(fn(x, *args, **kw) - x)``, so rounding does
    not zero the gradient; the other arguments receive no gradient through this path.
    """

    @functools.wraps(fn)
    def wrapped(x: jax.Array, *args, **kwargs) -> jax.Array:
        return x + jax.lax.stop_gradient(fn(x, *args, **kwargs) - x)

    return wrapped
