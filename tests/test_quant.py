"""Fake-quantizers and calibrators against an independent numpy float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import quant

FLOOR = 1e-12  # the documented step-size floor for constant channels


def ref_asym(x, lo, hi, bits):
    """Section-3 asymmetric quantizer in float64: returns x_hat, s, z and the raw x/s."""
    x, lo, hi = (np.asarray(a, np.float64) for a in (x, lo, hi))
    qmax = 2**bits - 1
    s = np.maximum((hi - lo) / qmax, FLOOR)
    z = np.clip(np.round(-lo / s), 0, qmax)
    t = x / s
    return (np.clip(np.round(t) + z, 0, qmax) - z) * s, s, z, t


def ref_sym(x, absmax, bits, denominator=None):
    x, absmax = np.asarray(x, np.float64), np.asarray(absmax, np.float64)
    d = 2 ** (bits - 1) - 1 if denominator is None else denominator
    s = np.maximum(absmax / d, FLOOR)
    t = x / s
    return np.clip(np.round(t), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s, s, t


def near_tie(t, tol=1e-3):
    """Where float32 and float64 may round x/s to different neighbours (x/s near k + 1/2)."""
    return np.abs(t - np.floor(t) - 0.5) < tol


def assert_matches(got, want, s, t):
    """got == want up to float32 precision, except near ties where one step either way is ok."""
    got = np.asarray(got, np.float64)
    err = np.abs(got - want)
    tie = np.broadcast_to(near_tie(t), err.shape)
    s = np.broadcast_to(s, err.shape)
    tol = 1e-5 * s + 3e-7 * np.abs(want)
    assert np.all(err[~tie] <= tol[~tie]), np.max(err[~tie] / s[~tie])
    assert np.all(err[tie] <= 1.0001 * s[tie])
    assert tie.mean() < 0.01


def np_minmax(x, axis):
    return x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)


def heavy_tailed(seed, shape):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=2.0, size=shape)
    x[rng.random(shape) < 0.002] *= 20.0  # a few gross outliers
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_uses_exactly_2_pow_b_levels(bits):
    x = jnp.linspace(-1.0, 2.0, 20001, dtype=jnp.float32)
    lo, hi = quant.minmax(x)
    y = np.asarray(quant.fake_quant_asymmetric(x, lo, hi, bits))
    want, s, z, _ = ref_asym(x, lo, hi, bits)
    assert len(np.unique(y)) == 2**bits
    np.testing.assert_allclose(np.unique(y), (np.arange(2**bits) - z) * s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 8])
def test_range_without_zero_follows_the_formula(bits):
    # the zero point is clipped to the grid, so a positive range gets a grid anchored at 0
    x = np.random.default_rng(1).uniform(0.5, 2.0, size=(256, 3)).astype(np.float32)
    lo, hi = quant.minmax(jnp.asarray(x), channel_axis=-1)
    want, s, z, t = ref_asym(x, lo, hi, bits)
    assert np.all(z == 0)
    assert_matches(quant.fake_quant_asymmetric(jnp.asarray(x), lo, hi, bits), want, s, t)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("channel_axis", [None, -1, 2])
def test_asymmetric_matches_reference(bits, channel_axis):
    w = np.random.default_rng(bits).normal(size=(3, 3, 8, 16)).astype(np.float32)
    axes = quant.reduce_axes(4, channel_axis)
    lo, hi = quant.minmax(w, channel_axis)
    np.testing.assert_array_equal(np.asarray(lo), w.min(axis=axes, keepdims=True))
    np.testing.assert_array_equal(np.asarray(hi), w.max(axis=axes, keepdims=True))

    want, s, z, t = ref_asym(w, lo, hi, bits)
    scale, zp = quant.asymmetric_qparams(lo, hi, bits)
    np.testing.assert_allclose(scale, s, rtol=1e-6)
    np.testing.assert_array_equal(zp, z)

    y = quant.fake_quant_asymmetric(jnp.asarray(w), lo, hi, bits)
    assert y.shape == w.shape and y.dtype == jnp.float32
    assert_matches(y, want, s, t)
    # every input lies in [lo, hi] and the range spans zero, so rounding error is half a step
    assert np.all(np.abs(np.asarray(y, np.float64) - w) <= s / 2 * (1 + 1e-5) + 1e-7)
    # grid points map to themselves
    np.testing.assert_allclose(quant.fake_quant_asymmetric(y, lo, hi, bits), y, atol=1e-6)
    np.testing.assert_allclose(quant.quantize(jnp.asarray(w), bits, channel_axis=channel_axis), y)


@pytest.mark.parametrize("bits", [2, 4])
def test_per_channel_scale_equivariance(bits):
    rng = np.random.default_rng(7)
    w = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    a = np.exp(rng.uniform(-2.0, 2.0, size=16)).astype(np.float32)
    q = functools.partial(quant.quantize, bits=bits, channel_axis=-1)
    got = np.asarray(q(jnp.asarray(a * w)), np.float64)
    want = a * np.asarray(q(jnp.asarray(w)), np.float64)
    s = a * (w.max((0, 1, 2)) - w.min((0, 1, 2))) / (2**bits - 1)
    assert np.all(np.abs(got - want) <= 1e-5 * s)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("denominator", [None, "qwix"])
def test_symmetric_grid_and_reference(bits, denominator):
    d = 2 ** (bits - 1) - 0.5 if denominator == "qwix" else None
    x = np.random.default_rng(bits).laplace(size=(512, 4)).astype(np.float32)
    absmax = np.abs(x).max(axis=0, keepdims=True)
    y = quant.fake_quant_symmetric(jnp.asarray(x), jnp.asarray(absmax), bits, denominator=d)
    want, s, t = ref_sym(x, absmax, bits, d)
    assert_matches(y, want, s, t)
    codes = np.asarray(y, np.float64) / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() >= -(2 ** (bits - 1)) - 1e-4 and codes.max() <= 2 ** (bits - 1) - 1 + 1e-4
    y2 = quant.fake_quant_symmetric(y, jnp.asarray(absmax), bits, denominator=d)
    np.testing.assert_allclose(y2, y, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_default_uses_2_pow_b_minus_1_levels(bits):
    x = jnp.linspace(-3.0, 3.0, 20001, dtype=jnp.float32)
    y = quant.quantize(x, bits, symmetric=True)
    assert len(np.unique(np.asarray(y))) == 2**bits - 1
    np.testing.assert_allclose(np.unique(np.asarray(y))[[0, -1]], [-3.0, 3.0], rtol=1e-6)
    # codes saturate at -2^(b-1) and 2^(b-1) - 1; with absmax = 2^(b-1) - 1 the step is 1
    top = 2 ** (bits - 1)
    x = jnp.asarray([-top - 0.1, -top + 0.4, top - 0.4, top + 0.1, -100.0, 100.0])
    y = quant.fake_quant_symmetric(x, top - 1.0, bits)
    np.testing.assert_array_equal(y, [-top, -top, top - 1, top - 1, -top, top - 1])
    # Qwix's denominator: -absmax sits on a tie that rounds (half to even) to -2^(b-1)
    half = top - 0.5
    y = quant.fake_quant_symmetric(jnp.asarray([-half]), half, bits, denominator=half)
    np.testing.assert_array_equal(y, [-top])


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_reproduces_qwix(bits):
    qwix = pytest.importorskip("qwix")
    w = jax.random.normal(jax.random.key(bits), (3, 3, 8, 16))
    qtype = {4: jnp.int4, 8: jnp.int8}[bits]
    want = qwix.dequantize(qwix.quantize(w, qtype, channelwise_axes=(3,)))
    absmax = jnp.max(jnp.abs(w), axis=(0, 1, 2), keepdims=True)
    got = quant.fake_quant_symmetric(w, absmax, bits, denominator=2 ** (bits - 1) - 0.5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _brute_force(x, lo, hi, bits, p, n, symmetric, axis):
    """Best mean |Q(x) - x|^p over alpha in {1, 1 - 1/n, ..., 1/n}, per channel, in numpy."""
    best = np.inf
    for alpha in 1.0 - np.arange(n) / n:
        if symmetric:
            y = ref_sym(x, alpha * hi, bits)[0]
        else:
            y = ref_asym(x, alpha * lo, alpha * hi, bits)[0]
        best = np.minimum(best, np.mean(np.abs(y - x) ** p, axis=axis, keepdims=True))
    return best


@pytest.mark.parametrize(
    "method,p,symmetric",
    [("mse", 2.0, False), ("lp", 3.0, False), ("mse", 2.0, True)],
)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("shape,channel_axis", [((2048,), None), ((512, 6), -1)])
def test_search_calibrator_finds_the_best_clipping(method, p, symmetric, bits, shape, channel_axis):
    n = 40
    x = heavy_tailed(bits, shape)
    axis = quant.reduce_axes(x.ndim, channel_axis)
    lo, hi = quant.calibrate(
        jnp.asarray(x),
        bits,
        method=method,
        channel_axis=channel_axis,
        symmetric=symmetric,
        p=p,
        num_candidates=n,
    )
    mlo, mhi = np_minmax(x, axis)
    if symmetric:
        mhi = np.maximum(-mlo, mhi)
        mlo = -mhi
        np.testing.assert_array_equal(lo, -hi)
    ratio = np.asarray(hi, np.float64) / mhi
    np.testing.assert_allclose(np.asarray(lo, np.float64) / mlo, ratio, rtol=1e-5)

    def err(lo_, hi_):
        y = ref_sym(x, hi_, bits)[0] if symmetric else ref_asym(x, lo_, hi_, bits)[0]
        return np.mean(np.abs(y - x) ** p, axis=axis, keepdims=True)

    searched, plain = err(lo, hi), err(mlo, mhi)
    assert np.all(searched <= plain * (1 + 1e-6))
    # heavy tails make clipping pay off clearly at low bit-widths
    assert searched.sum() < 0.97 * plain.sum()
    best = _brute_force(x, mlo, mhi, bits, p, n, symmetric, axis)
    np.testing.assert_allclose(searched, best, rtol=1e-4)


def test_search_in_batches_of_candidates(monkeypatch):
    # a tensor too large for all candidates at once is searched a few candidates at a time,
    # including a final short batch (7 candidates in batches of 2)
    monkeypatch.setattr(quant, "_SEARCH_ELEMENTS", 2 * 999 * 3)
    x = heavy_tailed(11, (999, 3))
    lo, hi = quant.calibrate(jnp.asarray(x), 3, method="mse", channel_axis=-1, num_candidates=7)
    mlo, mhi = np_minmax(x, (0,))
    searched = np.mean((ref_asym(x, lo, hi, 3)[0] - x) ** 2, axis=0, keepdims=True)
    best = _brute_force(x, mlo, mhi, 3, 2.0, 7, False, (0,))
    np.testing.assert_allclose(searched, best, rtol=1e-4)


def test_search_keeps_full_range_when_clipping_cannot_help():
    # uniform data on a dense 4-bit grid: any clipping only adds error, so alpha must be 1
    x = jnp.asarray(np.repeat(np.arange(16.0) - 5.0, 64), jnp.float32)
    lo, hi = quant.calibrate(x, 4, method="mse", num_candidates=100)
    np.testing.assert_allclose([float(lo[0]), float(hi[0])], [-5.0, 10.0])


@pytest.mark.parametrize("channel_axis", [None, 0])
def test_percentile_calibrator(channel_axis):
    x = heavy_tailed(3, (4, 1000))
    axis = quant.reduce_axes(2, channel_axis)
    lo, hi = quant.calibrate(
        jnp.asarray(x), 4, method="percentile", channel_axis=channel_axis, percentile=99.0
    )
    want_lo = np.percentile(x.astype(np.float64), 1.0, axis=axis, keepdims=True)
    want_hi = np.percentile(x.astype(np.float64), 99.0, axis=axis, keepdims=True)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-5)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-5)
    mlo, mhi = np_minmax(x, axis)
    assert np.all(np.asarray(lo) > mlo) and np.all(np.asarray(hi) < mhi)
    _, shi = quant.calibrate(
        jnp.asarray(x),
        4,
        method="percentile",
        channel_axis=channel_axis,
        percentile=99.0,
        symmetric=True,
    )
    want = np.percentile(np.abs(x.astype(np.float64)), 99.0, axis=axis, keepdims=True)
    np.testing.assert_allclose(shi, want, rtol=1e-5)


@pytest.mark.parametrize("method,symmetric", [("minmax", False), ("mse", True)])
def test_16_bits_is_near_lossless(method, symmetric):
    w = jax.random.normal(jax.random.key(0), (64, 32))
    y = quant.quantize(
        w, 16, channel_axis=-1, symmetric=symmetric, method=method, num_candidates=10
    )
    assert float(jnp.linalg.norm(y - w) / jnp.linalg.norm(w)) < 1e-4


@pytest.mark.parametrize(
    "method,symmetric",
    [("minmax", False), ("minmax", True), ("percentile", False), ("mse", False), ("lp", True)],
)
def test_constant_channel_gives_no_nan(method, symmetric):
    w = np.random.default_rng(0).normal(size=(3, 3, 4, 5)).astype(np.float32)
    w[..., 1] = 0.7
    w[..., 2] = 0.0
    q = functools.partial(
        quant.quantize,
        bits=4,
        channel_axis=-1,
        symmetric=symmetric,
        method=method,
        num_candidates=10,
    )
    y = np.asarray(q(jnp.asarray(w)))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[..., 2], 0.0)
    # one channel's range never leaks into another's
    np.testing.assert_allclose(y[..., [0, 3]], q(jnp.asarray(w[..., [0, 3]])), atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_bf16_keeps_dtype_and_computes_in_f32(symmetric):
    x = jax.random.normal(jax.random.key(1), (32, 8), jnp.bfloat16)
    y = quant.quantize(x, 4, channel_axis=-1, symmetric=symmetric)
    assert y.dtype == jnp.bfloat16
    want = quant.quantize(x.astype(jnp.float32), 4, channel_axis=-1, symmetric=symmetric)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32)
    )


@pytest.mark.parametrize("bits", [1, 17, 3.5, True, "4", 0])
def test_bad_bits_raise(bits):
    x = jnp.ones((4, 4))
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(x, bits)
    with pytest.raises(ValueError, match="bits"):
        quant.fake_quant_asymmetric(x, -1.0, 1.0, bits)
    with pytest.raises(ValueError, match="bits"):
        quant.fake_quant_symmetric(x, 1.0, bits)


def test_bad_arguments_raise():
    x = jnp.ones((3, 3, 8, 16))
    assert quant.check_bits(np.int32(4)) == 4
    with pytest.raises(ValueError, match="method"):
        quant.calibrate(x, 4, method="foo")
    for axis in (4, -5):
        with pytest.raises(ValueError, match="channel_axis"):
            quant.quantize(x, 4, channel_axis=axis)
    with pytest.raises(ValueError, match="percentile"):
        quant.calibrate(x, 4, method="percentile", percentile=101.0)
    with pytest.raises(ValueError, match="lo"):
        quant.fake_quant_asymmetric(x, jnp.zeros((1, 1, 1, 8)), jnp.ones(()), 4)
    with pytest.raises(ValueError, match="denominator"):
        quant.fake_quant_symmetric(x, 1.0, 4, denominator=0.0)
    with pytest.raises(ValueError, match="bits"):
        jax.jit(quant.quantize)(x, 4)  # a traced bit-width cannot fix the grid


@pytest.mark.parametrize(
    "method,symmetric", [("minmax", False), ("percentile", True), ("mse", False), ("lp", True)]
)
def test_jit_matches_eager(method, symmetric):
    w = jnp.asarray(heavy_tailed(5, (3, 3, 4, 8)))
    kw = dict(channel_axis=-1, symmetric=symmetric, method=method, num_candidates=20, p=2.5)
    eager = quant.quantize(w, 3, **kw)
    by_partial = jax.jit(functools.partial(quant.quantize, bits=3, **kw))(w)
    np.testing.assert_allclose(by_partial, eager, atol=1e-5)
    if method == "mse":
        by_static = jax.jit(quant.quantize, static_argnames=("bits", *kw))(w, bits=3, **kw)
        np.testing.assert_allclose(by_static, eager, atol=1e-5)


def test_ste_passes_gradient_straight_through():
    x = jnp.linspace(-1.0, 1.0, 33)
    fq = quant.ste(functools.partial(quant.quantize, bits=2))
    np.testing.assert_allclose(fq(x), quant.quantize(x, 2), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(3.0 * fq(v)))(x), 3.0)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_one_signed_data_gets_a_range_with_zero_and_no_far_end_clipping(method):
    # e.g. the pooled post-ReLU input of a classifier head: all values in [2, 5]
    x = jnp.asarray(np.random.default_rng(0).uniform(2.0, 5.0, (512,)), jnp.float32)
    lo, hi = quant.calibrate(x, 4, method=method)
    lo, hi = lo.reshape(()), hi.reshape(())
    assert float(lo) == 0.0 and float(hi) > 4.0
    err = np.abs(np.asarray(quant.fake_quant_asymmetric(x, lo, hi, 4)) - np.asarray(x))
    step = float(hi - lo) / 15
    if method == "minmax":
        assert err.max() <= step / 2 + 1e-6
    assert err.mean() < step
