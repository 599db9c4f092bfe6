"""taps on models that exist only in this file: the library has never seen them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import taps


class PlainCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(6, (3, 3), name="c1")(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), strides=2, use_bias=False, name="c2")(x)
        x = nn.BatchNorm(use_running_average=not train, name="n2")(x)
        x = nn.relu(x).mean((1, 2))
        return nn.Dense(3, name="fc")(x)


class ResidualNet(nn.Module):
    """Residual block with a 1x1 projection shortcut; BN after a ReLU is not a fold pair."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
        h = nn.relu(bn("bn_a")(nn.Conv(8, (3, 3), use_bias=False, name="conv_a")(x)))
        h = bn("bn_b")(nn.Conv(8, (3, 3), strides=2, use_bias=False, name="conv_b")(h))
        s = bn("bn_s")(nn.Conv(8, (1, 1), strides=2, use_bias=False, name="proj")(x))
        h = nn.relu(h + s)
        h = bn("bn_after_relu")(nn.relu(nn.Conv(8, (1, 1), use_bias=False, name="conv_c")(h)))
        return nn.Dense(5, name="head")(h.mean((1, 2)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16, name="d0")(x))
        return nn.Dense(2, name="d1")(x)


class NoWeights(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return x.mean((1, 2))


def _setup(model, shape=(2, 8, 8, 3)):
    x = jax.random.normal(jax.random.key(0), shape)
    variables = model.init(jax.random.key(1), x)
    return x, variables


@pytest.mark.parametrize(
    "model,names,kinds",
    [
        (PlainCNN(), ("c1", "c2", "fc"), ("conv", "conv", "dense")),
        (
            ResidualNet(),
            ("conv_a", "conv_b", "proj", "conv_c", "head"),
            ("conv",) * 4 + ("dense",),
        ),
        (MLP(), ("d0", "d1"), ("dense", "dense")),
    ],
)
def test_trace_finds_every_layer_in_call_order(model, names, kinds):
    x, variables = _setup(model)
    graph = taps.trace(model, variables, x)
    assert graph.names == names
    assert tuple(layer.kind for layer in graph.layers) == kinds
    assert [layer.index for layer in graph.layers] == list(range(len(names)))
    assert graph.first == names[0] and graph.last == names[-1]
    for layer in graph.layers:
        assert taps.get_kernel(variables["params"], layer).shape == layer.kernel_shape


def test_bn_pairs_come_from_data_flow_not_names():
    model = ResidualNet()
    x, variables = _setup(model)
    pairs = dict(taps.trace(model, variables, x).bn_pairs)
    assert pairs == {"conv_a": ("bn_a",), "conv_b": ("bn_b",), "proj": ("bn_s",)}
    # conv_c feeds a ReLU before its BatchNorm: folding it would be wrong.
    assert "conv_c" not in pairs


def test_map_kernels_is_pure_and_matches_a_manual_rewrite():
    model = ResidualNet()
    x, variables = _setup(model)
    graph = taps.trace(model, variables, x)
    before = jax.tree_util.tree_map(np.asarray, variables["params"])
    new = taps.map_kernels(variables["params"], graph.layers, lambda layer, w: 2.0 * w)
    # input untouched
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, variables["params"])
    for layer in graph.layers:
        np.testing.assert_allclose(
            taps.get_kernel(new, layer), 2.0 * taps.get_kernel(before, layer), rtol=0
        )
    # biases and BN params unchanged
    np.testing.assert_array_equal(new["head"]["bias"], before["head"]["bias"])
    np.testing.assert_array_equal(new["bn_a"]["scale"], before["bn_a"]["scale"])


def test_map_inputs_transforms_each_layer_input_once():
    model = PlainCNN()
    x, variables = _setup(model)
    graph = taps.trace(model, variables, x)
    seen = []
    with taps.map_inputs(lambda name, v: (seen.append(name), v)[1]):
        ref = model.apply(variables, x)
    assert seen == list(graph.names)
    # Zeroing only the Dense input leaves only its bias in the logits.
    with taps.map_inputs(lambda name, v: jnp.zeros_like(v), only=["fc"]):
        out = model.apply(variables, x)
    np.testing.assert_allclose(out, jnp.broadcast_to(variables["params"]["fc"]["bias"], out.shape))
    assert not np.allclose(ref, out)


def test_capture_matches_manual_forward_under_jit():
    model = MLP()
    x, variables = _setup(model, (3, 4, 4, 1))

    @jax.jit
    def run(variables, x):
        store = {}
        with taps.capture_inputs(store):
            model.apply(variables, x)
        return store

    store = run(variables, x)
    p = variables["params"]
    flat = np.asarray(x, np.float64).reshape(3, -1)
    h = np.maximum(
        flat @ np.asarray(p["d0"]["kernel"], np.float64) + np.asarray(p["d0"]["bias"]), 0
    )
    np.testing.assert_allclose(store["d0"], flat, rtol=1e-6)
    np.testing.assert_allclose(store["d1"], h, rtol=1e-4, atol=1e-5)


def test_shared_module_gets_one_kernel_and_several_sites():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            d = nn.Dense(4, name="shared")
            return d(d(x))

    model = Shared()
    x = jnp.ones((2, 4))
    variables = model.init(jax.random.key(0), x)
    graph = taps.trace(model, variables, x)
    assert graph.names == ("shared", "shared#1")
    assert len(graph.kernel_layers()) == 1
    calls = []
    new = taps.map_kernels(
        variables["params"], graph.layers, lambda layer, w: (calls.append(layer), w)[1]
    )
    assert len(calls) == 1 and new["shared"]["kernel"] is variables["params"]["shared"]["kernel"]


def test_bad_inputs_raise_value_errors():
    model = PlainCNN()
    x, variables = _setup(model)
    with pytest.raises(ValueError, match="images"):
        taps.trace(model, variables, jnp.ones((2, 8, 8, 5)))
    no_w = NoWeights()
    with pytest.raises(ValueError, match="no Conv or Dense"):
        taps.trace(no_w, no_w.init(jax.random.key(0), x), x)
