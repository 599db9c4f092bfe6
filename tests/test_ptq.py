"""Round-to-nearest PTQ: numerics against independent computations, on models defined here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dnq_jax import ptq, quant
from dnq_jax.ptq import QuantSpec, calibration


class SmallCNN(nn.Module):
    num_classes: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, (features, strides) in enumerate([(8, 1), (16, 2), (16, 2)], start=1):
            x = nn.Conv(features, (3, 3), strides=strides, use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
            x = nn.relu(x)
        # Flatten, not pool: the label depends on where the blob is.
        return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


def blobs(seed: int, n: int, size: int = 16):
    """Class = quadrant of a noisy Gaussian blob x its tint (red-ish or green-ish): learnable,
    but the tint is a fine colour difference, so coarse weights visibly lose accuracy."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, n)
    quadrant = labels // 2
    half = size // 2
    centre = rng.uniform(1.5, half - 1.5, (n, 2)) + half * np.stack(
        [quadrant // 2, quadrant % 2], 1
    )
    grid = np.arange(size) + 0.5
    d2 = (grid[None, :, None] - centre[:, 0, None, None]) ** 2
    d2 = d2 + (grid[None, None, :] - centre[:, 1, None, None]) ** 2
    tint = np.array([[1.0, 0.85, 0.9], [0.85, 1.0, 0.9]])[labels % 2]
    amplitude = rng.uniform(1.0, 2.0, (n, 1, 1, 1))
    x = np.exp(-d2 / 4.0)[..., None] * amplitude * tint[:, None, None, :]
    x = x + 0.2 * rng.normal(size=x.shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def train_on_blobs(model, steps: int, n_train=2048, n_test=1000, init_seed=0, calib=128):
    """(model, trained variables, the first `calib` training images (None: all), test images,
    test labels): `model` trained for `steps` Adam steps (cosine learning rate from 5e-3) on
    the blob task."""
    x_train, y_train = blobs(0, n_train)
    x_test, y_test = blobs(1, n_test)
    variables = jax.jit(model.init)(jax.random.key(init_seed), x_train[:1])
    tx = optax.adam(optax.cosine_decay_schedule(5e-3, steps))

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], opt_state

    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    for i in range(steps):
        idx = np.arange(i * 64, (i + 1) * 64) % x_train.shape[0]
        params, stats, opt_state = step(params, stats, opt_state, x_train[idx], y_train[idx])
    return model, {"params": params, "batch_stats": stats}, x_train[:calib], x_test, y_test


@pytest.fixture(scope="module")
def trained():
    """SmallCNN trained for 300 Adam steps; returns model, variables, train and test data."""
    return train_on_blobs(SmallCNN(), 300, n_train=4096, n_test=2000, init_seed=2, calib=None)


@pytest.fixture(scope="module")
def accuracies(trained):
    """Top-1 of FP32 and of RTN at several widths, and each one's mean logit error."""
    model, variables, x_train, x_test, y_test = trained
    fp = ptq.fp32(model, variables)
    acc = {"fp32": ptq.accuracy(fp, x_test, y_test)}
    err = {}
    ref = fp(x_test[:256])
    for w, a in [(16, 16), (8, 8), (4, 4), (2, 4)]:
        qm = ptq.quantize(model, variables, x_train[:128], QuantSpec(w_bits=w, a_bits=a))
        acc[f"W{w}A{a}"] = ptq.accuracy(qm, x_test, y_test)
        err[f"W{w}A{a}"] = float(jnp.mean(jnp.abs(qm(x_test[:256]) - ref)))
    return acc, err


def test_fp32_model_learned_the_task(accuracies):
    assert accuracies[0]["fp32"] > 85.0  # chance is 12.5


def test_w16a16_is_lossless(accuracies):
    acc, _ = accuracies
    assert abs(acc["W16A16"] - acc["fp32"]) <= 0.1


def test_accuracy_does_not_drop_as_bits_grow(accuracies):
    acc, err = accuracies
    # Neighbouring widths can sit within a few test images of each other: a perturbation
    # flips borderline images either way, so the order of top-1 is checked up to 0.5 points
    # (10 of the 2000 test images) ...
    assert acc["W2A4"] <= acc["W4A4"] + 0.5
    assert acc["W4A4"] <= acc["W8A8"] + 0.5
    # ... while the logits' distance from FP32, which has no such ties, must shrink strictly.
    assert err["W2A4"] > err["W4A4"] > err["W8A8"] > err["W16A16"]


def distinct_per_channel(kernel) -> int:
    k = np.asarray(kernel).reshape(-1, kernel.shape[-1])
    return max(len(np.unique(k[:, c])) for c in range(k.shape[1]))


def test_first_and_last_layers_stay_at_8_bits(trained):
    model, variables, x_train, _, _ = trained
    qm = ptq.quantize(model, variables, x_train[:64], QuantSpec(w_bits=2, a_bits=4))
    assert qm.bits_per_layer == {
        "conv1": (8, 8),
        "conv2": (2, 4),
        "conv3": (2, 4),
        "head": (8, 8),
    }
    p = qm.variables["params"]
    # conv1 has 27 weights per output channel, head 256: at 8 bits most stay distinct.
    assert distinct_per_channel(p["conv1"]["kernel"]) > 16
    assert distinct_per_channel(p["head"]["kernel"]) > 16
    assert distinct_per_channel(p["conv2"]["kernel"]) <= 4
    # The first layer's input (the image) is calibrated on its own min-max for the 8-bit grid.
    lo, hi = qm.act_ranges["conv1"]
    assert lo == pytest.approx(float(x_train[:64].min())) and hi == pytest.approx(
        float(x_train[:64].max())
    )
    spec = QuantSpec(w_bits=2, a_bits=4, keep_ends_8bit=False)
    all_low = ptq.quantize(model, variables, x_train[:64], spec)
    assert all_low.bits_per_layer["conv1"] == (2, 4) == all_low.bits_per_layer["head"]
    assert distinct_per_channel(all_low.variables["params"]["conv1"]["kernel"]) <= 4


def test_weight_only_and_unfolded_16_bit_match_fp32_logits(trained):
    model, variables, _, x_test, _ = trained
    # Calibrated on the very images compared, so that 16-bit activations are never clipped.
    images = x_test[:64]
    ref = ptq.fp32(model, variables)(images)
    weight_only = ptq.quantize(model, variables, images, QuantSpec(w_bits=16, a_bits=None))
    assert weight_only.act_ranges == {} and weight_only.a_bits is None
    assert all(a is None for _, a in weight_only.bits_per_layer.values())
    unfolded = ptq.quantize(model, variables, images, QuantSpec(16, 16, fold_bn=False))
    assert unfolded.bn_pairs == () and "folded_bias" not in unfolded.variables
    for qm in (weight_only, unfolded):
        np.testing.assert_allclose(qm(images), ref, rtol=1e-3, atol=1e-3)


TINY_TRACES = []


class TinyNet(nn.Module):
    """1x1 convs are matmuls over channels, so numpy can redo the whole quantized forward."""

    @nn.compact
    def __call__(self, x):
        TINY_TRACES.append(x.shape)  # runs only while jax traces
        h = nn.Conv(6, (1, 1), use_bias=False, name="c1")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="b1")(h))
        h = nn.Conv(5, (1, 1), name="c2")(h)
        h = nn.relu(nn.BatchNorm(use_running_average=True, name="b2")(h))
        return nn.Dense(3, name="d")(h.mean((1, 2)))


def np_fake_quant(x, lo, hi, bits):
    """The asymmetric quantizer of docs/method.md, written again in numpy."""
    s = (hi - lo) / (2.0**bits - 1)
    z = np.clip(np.round(-lo / s), 0, 2**bits - 1)
    return (np.clip(np.round(x / s) + z, 0, 2**bits - 1) - z) * s


def test_quantized_forward_matches_numpy():
    model = TinyNet()
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(12, 4, 4, 3)).astype(np.float32)
    x = rng.normal(size=(5, 4, 4, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), calib)

    def draw(path, s):
        leaf = path[-1].key
        if leaf in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) * (1.0 if leaf == "kernel" else 0.3), s.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    qm = ptq.quantize(model, variables, calib, QuantSpec(w_bits=3, a_bits=4), calib_batch_size=5)

    p, st = jax.tree_util.tree_map(np.asarray, (variables["params"], variables["batch_stats"]))

    def fold(w, b, bn, eps):
        s = p[bn]["scale"] / np.sqrt(st[bn]["var"] + eps)
        return w * s, p[bn]["bias"] + (b - st[bn]["mean"]) * s

    w1, b1 = fold(p["c1"]["kernel"][0, 0], 0.0, "b1", 1e-3)
    w2, b2 = fold(p["c2"]["kernel"][0, 0], p["c2"]["bias"], "b2", 1e-5)
    w3, b3 = p["d"]["kernel"], p["d"]["bias"]
    # Per output channel; ranges always contain 0.
    wq = lambda w, bits: np_fake_quant(w, np.minimum(w.min(0), 0), np.maximum(w.max(0), 0), bits)
    bits = {"c1": 8, "c2": 4, "d": 8}

    def forward(x, ranges=None, seen=None):
        """The folded model; with `ranges`, fake-quantized (weights at 8/3/8 bits)."""

        def tap(name, v):
            if seen is not None:
                seen.setdefault(name, []).append(v)
            return v if ranges is None else np_fake_quant(v, *ranges[name], bits[name])

        wt = (lambda w, _: w) if ranges is None else wq
        h = np.maximum(tap("c1", x) @ wt(w1, 8) + b1, 0)
        h = np.maximum(tap("c2", h) @ wt(w2, 3) + b2, 0)
        return tap("d", h.mean((1, 2))) @ wt(w3, 8) + b3

    seen = {}
    forward(calib, seen=seen)
    ranges = {
        k: (min(0, *(v.min() for v in vs)), max(0, *(v.max() for v in vs)))
        for k, vs in seen.items()
    }
    assert ranges["d"][0] == 0  # the mean of a ReLU'd tensor: the widening is exercised
    for name, (lo, hi) in ranges.items():
        np.testing.assert_allclose(qm.act_ranges[name], (lo, hi), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(qm(x), forward(x, ranges), rtol=1e-4, atol=1e-4)

    # Weights are quantized once, at quantize time; the forward compiles once per shape.
    np.testing.assert_allclose(qm.variables["params"]["c2"]["kernel"][0, 0], wq(w2, 3), rtol=1e-5)
    before = len(TINY_TRACES)  # qm(x) above compiled this shape
    qm(x)
    qm(x + 1.0)
    assert len(TINY_TRACES) == before
    qm(x[:2])
    assert len(TINY_TRACES) == before + 1


def test_activation_calibrators_match_numpy_and_ignore_batching(trained):
    model, variables, x_train, _, _ = trained
    calib = np.asarray(x_train[:40])
    qm = ptq.quantize(model, variables, calib, QuantSpec(w_bits=4, a_bits=4))
    forward = lambda v, x: ptq.apply_folded(model, v, qm.bn_pairs, x)
    folded, _ = ptq.fold_batchnorm(model, variables, calib[:1])
    a_bits = {name: a for name, (_, a) in qm.bits_per_layer.items()}

    def ranges(**kw):
        return calibration.activation_ranges(forward, folded, calib, qm.graph, a_bits, **kw)

    whole, split = ranges(batch_size=40), ranges(batch_size=7)  # 7 does not divide 40
    for name in a_bits:
        np.testing.assert_allclose(whole[name], split[name], rtol=0)
        np.testing.assert_allclose(whole[name], qm.act_ranges[name], rtol=1e-6)

    pct = ranges(method="percentile", batch_size=7, max_capture_bytes=1, percentile=99.0)
    # The first layer's input is the image itself: an independent percentile.
    np.testing.assert_allclose(pct["conv1"], np.percentile(calib, [1.0, 99.0]), rtol=1e-5)
    mse = ranges(method="mse", batch_size=16)
    for name in a_bits:
        lo, hi = whole[name]
        assert lo <= pct[name][0] <= pct[name][1] <= hi
        assert lo <= mse[name][0] and mse[name][1] <= hi


def test_accuracy_pads_the_last_batch_and_counts_only_real_images():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(10, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=10)
    shapes = []

    @jax.jit
    def logits(x):
        shapes.append(x.shape)
        return x

    expected = 100.0 * np.mean(images.argmax(-1) == labels)
    assert ptq.accuracy(logits, images, labels, batch_size=4) == pytest.approx(expected)
    assert shapes == [(4, 3)]
    assert ptq.accuracy(logits, jnp.asarray(images), labels, batch_size=4) == pytest.approx(
        expected
    )


def test_weights_agree_with_qwix_symmetric_ptq():
    qwix = pytest.importorskip("qwix")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
            return nn.Dense(5, name="dense")(x.reshape(x.shape[0], -1))

    model = Net()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = model.init(jax.random.key(1), x)["params"]
    for qtype, bits in [(jnp.int8, 8), (jnp.int4, 4)]:
        rule = qwix.QuantizationRule(module_path=".*", weight_qtype=qtype, act_qtype=qtype)
        qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
        abstract = jax.eval_shape(qmodel.init, jax.random.key(1), x)
        qparams = qwix.quantize_params(params, abstract["params"])
        for layer in ("conv", "dense"):
            kernel = params[layer]["kernel"]
            qarray = qparams[layer]["kernel"]
            qarray = getattr(qarray, "array", qarray)  # unwrap Qwix's WithAux
            theirs = np.asarray(jnp.asarray(qarray.qvalue, jnp.float32) * qarray.scale)
            absmax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
            ours = quant.fake_quant_symmetric(
                kernel, absmax, bits, denominator=2 ** (bits - 1) - 0.5
            )
            scale = np.asarray(absmax) / (2 ** (bits - 1) - 0.5)
            assert np.max(np.abs(np.asarray(ours) - theirs) / scale) <= 1e-6, (layer, bits)


class NoLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x.mean((1, 2))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(spec=4), "QuantSpec"),
        (dict(calib_images=np.zeros((0, 16, 16, 3), np.float32)), "calib_images"),
        (dict(calib_images=np.zeros((2, 16, 16, 5), np.float32)), "calib_images"),
        (dict(model=NoLayers()), "model"),
        (dict(calib_batch_size=0), "calib_batch_size"),
        (dict(method="gptq"), "method"),
        (dict(recon={"iters": 10}), "iters"),
        (dict(recon=ptq.ReconSettings.for_method("brecq")), "recon"),
        (dict(blocks=["stage1"]), "blocks"),
        (dict(method="qdrop", recon={"iters": 0}), "iters"),
        (dict(method="adaround", recon={"iters": 2.5}), "iters"),
        (dict(method="brecq", recon={"batch_size": 0}), "batch_size"),
        (dict(method="qdrop", recon={"drop_prob": 1.5}), "drop_prob"),
        (dict(method="brecq", blocks=["no_such_block"]), "blocks"),
        (dict(method="brecq", recon={"lrate": 1.0}), "lrate"),
        (dict(method="qdrop", recon=ptq.ReconSettings.for_method("brecq")), "recon"),
        (dict(method="qdrop", recon=[("iters", 1)]), "recon"),
        (dict(spec=QuantSpec(), w_bits=2), "w_bits"),
        (dict(method="qdrop", recon={}, iters=2), "iters"),
    ],
)
def test_bad_arguments_are_named(trained, kwargs, match):
    model, variables, x_train, _, _ = trained
    args = dict(model=model, variables=variables, calib_images=x_train[:8])
    args.update(kwargs)
    error = TypeError if isinstance(args.get("spec"), int) else ValueError
    with pytest.raises(error, match=match):
        ptq.quantize(**args)


def test_bad_accuracy_arguments_are_named(trained):
    model, variables, x_train, _, y_test = trained
    qm = ptq.quantize(model, variables, x_train[:8], QuantSpec(w_bits=4, a_bits=4))
    with pytest.raises(ValueError, match="images"):
        ptq.accuracy(qm, np.zeros((4, 16, 16, 5), np.float32), np.zeros(4, int))
    with pytest.raises(ValueError, match="labels"):
        ptq.accuracy(qm, x_train[:4], y_test[:3])
    with pytest.raises(ValueError, match="batch_size"):
        ptq.accuracy(qm, x_train[:4], y_test[:4], batch_size=0)
