"""The WQE/AQE profiler against an independent numpy float64 computation."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import taps
from dnq_jax.dnq import profiler
from dnq_jax.dnq.profiler import NoiseStats
from dnq_jax.ptq import QuantSpec


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a depthwise conv with BN, and a Dense head: known to the test only."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
        x = nn.relu(bn("bn1")(nn.Conv(6, (3, 3), name="c1")(x)))
        x = nn.Conv(6, (3, 3), strides=2, feature_group_count=6, use_bias=False, name="dw")(x)
        x = nn.relu(bn("bn2")(x))
        return nn.Dense(5, name="fc")(x.mean((1, 2)))


def random_variables(model, images, rng):
    """Random variables of `model` with non-trivial running statistics, so eval-mode BN
    differs from batch statistics."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), jnp.float32)
        return jnp.asarray(rng.normal(size=s.shape) * 0.5, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def setup():
    model = SmallCNN()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    variables = random_variables(model, images, rng)
    graph = taps.trace(model, variables, images)

    @jax.jit
    def layer_inputs(variables, images):
        store = {}
        with taps.capture_inputs(store):
            model.apply(variables, images, train=False)
        return store

    inputs = {k: np.asarray(v, np.float64) for k, v in layer_inputs(variables, images).items()}
    return model, images, variables, graph, inputs


def _fake_quant(x: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    """The asymmetric min-max quantizer of docs/method.md, in float64."""
    axes = tuple(range(x.ndim - 1)) if per_channel else None
    lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    qmax = 2.0**bits - 1
    s = (hi - lo) / qmax
    z = np.clip(np.round(-lo / s), 0, qmax)
    return (np.clip(np.round(x / s) + z, 0, qmax) - z) * s


def _reference(variables, graph, inputs, bits):
    """Per-name tables: kernel site -> per-channel mu, sigma; site -> scalar mu, sigma."""
    w_mu, w_sigma = {}, {}
    for layer in graph.kernel_layers():
        w = np.asarray(taps.get_kernel(variables["params"], layer), np.float64)
        err = (_fake_quant(w, bits[layer.name][0], True) - w).reshape(-1, w.shape[-1])
        w_mu[layer.name], w_sigma[layer.name] = err.mean(0), err.std(0)
    a_mu, a_sigma = {}, {}
    for name in graph.names:
        x = inputs[name]
        err = _fake_quant(x, bits[name][1], False) - x
        a_mu[name], a_sigma[name] = err.mean(), err.std()
    return w_mu, w_sigma, a_mu, a_sigma


def test_layer_bits_keeps_the_ends_at_8_bits(setup):
    graph = setup[3]
    assert graph.names == ("c1", "dw", "fc")
    assert profiler.layer_bits(graph, 2, 4) == {"c1": (8, 8), "dw": (2, 4), "fc": (8, 8)}
    assert set(profiler.layer_bits(graph, 2, 4, keep_ends_8bit=False).values()) == {(2, 4)}
    with pytest.raises(ValueError, match="w_bits"):
        profiler.layer_bits(graph, 1, 4)


@pytest.mark.parametrize("keep_ends", [True, False])
def test_profiler_matches_numpy_float64(setup, keep_ends):
    model, images, variables, graph, inputs = setup
    spec = QuantSpec(w_bits=2, a_bits=4, keep_ends_8bit=keep_ends)
    profile = profiler.make_profiler(model, graph, spec)
    got = jax.jit(profile)(variables, images)
    bits = profiler.layer_bits(graph, 2, 4, keep_ends)
    w_mu, w_sigma, a_mu, a_sigma = _reference(variables, graph, inputs, bits)
    assert int(got.count) == 1
    assert list(got.w_mu) == [k.name for k in graph.kernel_layers()]
    assert list(got.a_mu) == list(graph.names)
    for layer in graph.kernel_layers():
        mu = got.w_mu[layer.name]
        assert mu.shape == (layer.out_channels,) and mu.dtype == jnp.float32
        np.testing.assert_allclose(mu, w_mu[layer.name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            got.w_sigma[layer.name], w_sigma[layer.name], rtol=1e-4, atol=1e-6
        )
    for name in graph.names:
        np.testing.assert_allclose(got.a_mu[name], a_mu[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.a_sigma[name], a_sigma[name], rtol=1e-4, atol=1e-6)
    # The ends' bit-widths matter: at 2/4 bits their errors are far larger than at 8.
    low = profiler.layer_bits(graph, 2, 4, keep_ends_8bit=False)
    _, w_sigma_low, _, a_sigma_low = _reference(variables, graph, inputs, low)
    ratio = np.asarray(got.w_sigma[graph.first]) / w_sigma_low[graph.first]
    assert np.all(ratio < 0.1) if keep_ends else np.allclose(ratio, 1, rtol=1e-4)
    assert (got.a_sigma[graph.last] < 0.1 * a_sigma_low[graph.last]) == keep_ends


def test_search_calibrators_reach_the_quantizer(setup):
    model, images, variables, graph, _ = setup
    spec = QuantSpec(w_bits=2, a_bits=4, keep_ends_8bit=False)
    base = jax.jit(profiler.make_profiler(model, graph, spec))(variables, images)
    mse_spec = dataclasses.replace(spec, w_calibrator="mse", a_calibrator="mse")
    mse = jax.jit(profiler.make_profiler(model, graph, mse_spec))(variables, images)
    # The MSE search minimises mean(e^2) = mu^2 + sigma^2 and has min-max among its candidates.
    msq = lambda mu, sd: np.square(np.asarray(mu)) + np.square(np.asarray(sd))
    for n in base.w_mu:
        w_base, w_mse = msq(base.w_mu[n], base.w_sigma[n]), msq(mse.w_mu[n], mse.w_sigma[n])
        assert np.all(w_mse <= w_base * (1 + 1e-5))
    sites = lambda table: np.array([table[n] for n in graph.names])
    a_base = msq(sites(base.a_mu), sites(base.a_sigma))
    a_mse = msq(sites(mse.a_mu), sites(mse.a_sigma))
    assert np.all(a_mse <= a_base * (1 + 1e-5)) and np.any(a_mse < 0.9 * a_base)
    with pytest.raises(ValueError, match="a_calibrator"):
        profiler.make_profiler(model, graph, dataclasses.replace(spec, a_calibrator="max"))


def _stats(graph, fill, count: int = 1) -> NoiseStats:
    """Stats shaped for `graph` with every float leaf replaced by fill(leaf)."""
    init = profiler.init_stats(graph)
    floats = jax.tree_util.tree_map(fill, init.replace(count=None))
    return floats.replace(count=jnp.asarray(count, jnp.int32))


def test_ema_initialises_then_decays(setup):
    graph = setup[3]
    init = profiler.init_stats(graph)
    assert int(init.count) == 0 and all(np.all(np.asarray(m) == 0) for m in init.w_mu.values())
    assert {n: m.shape for n, m in init.w_mu.items()} == {
        k.name: (k.out_channels,) for k in graph.kernel_layers()
    }
    assert {n: jnp.shape(m) for n, m in init.a_mu.items()} == {n: () for n in graph.names}
    update = jax.jit(profiler.ema_update, static_argnames="decay")
    first = _stats(graph, lambda z: z + 2.0)
    second = _stats(graph, lambda z: z + 1.0)
    s1 = update(init, first, decay=0.9)
    assert int(s1.count) == 1
    for v in s1.a_sigma.values():
        np.testing.assert_array_equal(v, 2.0)  # replaced, not shrunk to 0.2
    s2 = update(s1, second, decay=0.9)
    assert int(s2.count) == 2
    for leaf in jax.tree_util.tree_leaves(s2.replace(count=None)):
        np.testing.assert_allclose(leaf, 0.9 * 2.0 + 0.1 * 1.0, rtol=1e-6)
    s3 = update(s2, second, decay=0.5)
    for v in s3.a_mu.values():
        np.testing.assert_allclose(v, 0.5 * 1.9 + 0.5 * 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        profiler.ema_update(s1, second, decay=1.0)


def test_noise_stats_is_a_pytree_through_jit(setup):
    graph = setup[3]
    stats = _stats(graph, lambda z: z + 0.5, count=0)
    stats = stats.replace(a_mu={n: jnp.float32(i) for i, n in enumerate(graph.names)})
    leaves, treedef = jax.tree_util.tree_flatten(stats)
    assert len(leaves) == 2 * len(graph.kernel_layers()) + 2 * len(graph.names) + 1
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    out = jax.jit(lambda s: s.replace(count=s.count + 1))(back)
    assert isinstance(out, NoiseStats) and int(out.count) == 1
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, out.replace(count=0), stats.replace(count=0)
    )


def test_stats_summary_magnitudes(setup):
    graph = setup[3]
    rng = np.random.default_rng(1)
    stats = _stats(graph, lambda z: jnp.asarray(rng.normal(size=z.shape), jnp.float32))
    got = jax.jit(profiler.stats_summary)(stats)
    flat = lambda table: np.concatenate(
        [np.ravel(np.asarray(v, np.float64)) for v in table.values()]
    )
    np.testing.assert_allclose(got["w_mu_abs"], np.abs(flat(stats.w_mu)).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["w_sigma"], flat(stats.w_sigma).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["a_mu_abs"], np.abs(flat(stats.a_mu)).mean(), rtol=1e-6)
    np.testing.assert_allclose(got["a_sigma"], flat(stats.a_sigma).mean(), rtol=1e-6)
