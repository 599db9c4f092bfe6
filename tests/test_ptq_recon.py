"""Reconstruction PTQ (AdaRound, BRECQ, QDrop) on models defined here and on the zoo."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_ptq import train_on_blobs

from dnq_jax import models, ptq, quant, taps
from dnq_jax.ptq import block_problem, reconstruct, rounding


class ResBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = bn("bn2")(nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y))
        if x.shape[-1] != self.features or self.strides != 1:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="proj")(x)
            x = bn("proj_bn")(x)
        return nn.relu(x + y)


class ResNetLike(nn.Module):
    """Stem conv, two residual blocks (the second with a projection shortcut), Dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        x = ResBlock(8, name="block1")(x, train)
        x = ResBlock(16, 2, name="block2")(x, train)
        return nn.Dense(8, name="head")(x.reshape(x.shape[0], -1))


ITERS = 100
W2A4 = ptq.QuantSpec(w_bits=2, a_bits=4)


@pytest.fixture(scope="module")
def net():
    """ResNetLike trained for 200 Adam steps on the blob task."""
    return train_on_blobs(ResNetLike(), 200)


@pytest.fixture(scope="module")
def results(net):
    """RTN and every reconstruction method at W2A4 with the same seed."""
    model, variables, calib, _, _ = net
    out = {"rtn": ptq.quantize(model, variables, calib, W2A4)}
    for method in ("adaround", "brecq", "qdrop"):
        recon = {"iters": ITERS}
        out[method] = ptq.quantize(model, variables, calib, W2A4, method=method, recon=recon)
    return out


def test_rounding_init_is_rtn_and_soft_value_is_the_float_kernel():
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6)) * 0.3
    lo, hi = quant.calibrate(w, 3, channel_axis=-1)
    scale, zero = rounding.grid_of_range(lo, hi, 3)
    v = rounding.init_rounding(w, scale)
    hard = rounding.rounded_kernel(w, scale, zero, 3, v, hard=True)
    np.testing.assert_array_equal(hard, quant.fake_quant_asymmetric(w, lo, hi, 3))
    soft = rounding.rounded_kernel(w, scale, zero, 3, v, hard=False)
    # Inside the grid's span; outside it (the zero point is rounded) both clip to the end.
    codes = np.asarray(w / scale + zero)
    inside = (codes >= 0) & (codes <= 7)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(np.asarray(soft)[inside], np.asarray(w)[inside], atol=1e-5)


def test_regularizer_drives_soft_rounding_to_hard_decisions_on_the_grid():
    w = jax.random.normal(jax.random.key(2), (64, 8))
    lo, hi = quant.calibrate(w, 2, channel_axis=-1)
    scale, zero = rounding.grid_of_range(lo, hi, 2)
    v = rounding.init_rounding(w, scale)
    tx = optax.adam(1e-1)
    iters = 300

    @jax.jit
    def step(v, opt, t):
        beta = rounding.beta_schedule(t, iters, 0.2)
        g = jax.grad(rounding.rounding_penalty)(v, beta)
        upd, opt = tx.update(g, opt)
        return optax.apply_updates(v, upd), opt

    opt = tx.init(v)
    for t in range(iters):
        v, opt = step(v, opt, t)
    h = np.asarray(rounding.rectified_sigmoid(v))
    assert np.all((h == 0.0) | (h == 1.0))
    soft = rounding.rounded_kernel(w, scale, zero, 2, v, hard=False)
    hard = rounding.rounded_kernel(w, scale, zero, 2, v, hard=True)
    np.testing.assert_array_equal(soft, hard)
    codes = np.asarray(hard / scale + zero)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() > -1e-4 and codes.max() < 3 + 1e-4


def test_beta_schedule_holds_then_anneals():
    b = [float(rounding.beta_schedule(t, 100, 0.2)) for t in (0, 20, 60, 100)]
    assert b == pytest.approx([20.0, 20.0, 11.0, 2.0])


def test_lsq_fake_quant_matches_the_range_quantizer_and_passes_gradients():
    x = jax.random.normal(jax.random.key(3), (256,)) * 2
    lo, hi = jnp.float32(-1.5), jnp.float32(3.0)
    scale, zero = rounding.grid_of_range(lo, hi, 4)
    np.testing.assert_allclose(
        rounding.lsq_fake_quant(x, scale, zero, 4), quant.fake_quant_asymmetric(x, lo, hi, 4)
    )
    lo2, hi2 = rounding.range_of_grid(scale, zero, 4)
    np.testing.assert_allclose(
        quant.fake_quant_asymmetric(x, lo2, hi2, 4), quant.fake_quant_asymmetric(x, lo, hi, 4)
    )
    g = jax.grad(lambda s: jnp.sum(rounding.lsq_fake_quant(x, s, zero, 4) ** 2))(scale)
    assert np.isfinite(g) and g != 0


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstructed_kernels_are_on_the_rtn_grid(net, results, method):
    model, variables, calib, _, _ = net
    qm, rtn = results[method], results["rtn"]
    float_params = ptq.fold_batchnorm(model, variables, calib[:2])[0]["params"]
    changed = 0
    for layer in qm.graph.layers:
        bits = qm.bits_per_layer[layer.name][0]
        lo, hi = quant.calibrate(taps.get_kernel(float_params, layer), bits, channel_axis=-1)
        scale, zero = (np.asarray(a, np.float64) for a in quant.asymmetric_qparams(lo, hi, bits))
        w = np.asarray(taps.get_kernel(qm.variables["params"], layer), np.float64)
        codes = w / scale + zero
        np.testing.assert_allclose(codes, np.round(codes), atol=2e-3)
        assert codes.min() > -2e-3 and codes.max() < 2**bits - 1 + 2e-3
        rtn_w = np.asarray(taps.get_kernel(rtn.variables["params"], layer))
        changed += int(np.sum(np.abs(w - rtn_w) > 1e-6 * np.abs(scale)))
    assert changed > 0  # the learned rounding is not round-to-nearest


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_reconstruction_reduces_every_block_error(results, method):
    report = results[method].report
    assert report["method"] == method and report["settings"]["iters"] == ITERS
    names = [b["block"] for b in report["blocks"]]
    if method == "adaround":
        assert names == ["stem", "block1/conv1", "block1/conv2", "block2/conv1", "block2/conv2",
                         "block2/proj", "head"]  # fmt: skip
    else:
        assert names == ["stem", "block1", "block2", "head"]
    bits = results[method].bits_per_layer
    for b in report["blocks"]:
        # The 8-bit ends start from a fine grid; the objective (Fisher-weighted for BRECQ and
        # QDrop) is not this plain error, so only the low-bit blocks must improve on it.
        if max(bits[site][0] for site in b["layers"]) < 8:
            assert b["loss_after"] < b["loss_before"], b
    assert sum(b["loss_after"] for b in report["blocks"]) < sum(
        b["loss_before"] for b in report["blocks"]
    )


def test_reconstructed_model_is_closer_to_the_float_model_than_rtn(net, results):
    model, variables, calib, x_test, y_test = net
    fp = ptq.fp32(model, variables)(x_test[:500])
    err = {m: float(jnp.mean((results[m](x_test[:500]) - fp) ** 2)) for m in results}
    for method in ("adaround", "brecq", "qdrop"):
        assert err[method] < err["rtn"], err
    # All still classify, on every test image: in batches of 500, the shape compiled above.
    for m in results:
        assert ptq.accuracy(results[m], x_test, y_test, batch_size=500) > 50.0


def test_first_block_output_is_closer_after_reconstruction(net, results):
    """Independent of the report: the block's output inside each quantized model, captured
    by the test, against the float model's."""
    model, variables, calib, _, _ = net

    def block_out(fn, x):
        store = {}

        def grab(module, call, a, kw):
            store["y"] = call(*a, **kw)
            return store["y"]

        with taps.intercept_modules(grab, lambda m: tuple(m.path) == ("block1",)):
            fn(x)
        return store["y"]

    x = calib[:64]
    fp = block_out(lambda x: model.apply(variables, x), x)
    for method in ("brecq", "qdrop"):
        qm = results[method]
        q = block_out(lambda x, qm=qm: qm.apply(qm.variables, x), x)
        r = block_out(lambda x: results["rtn"].apply(results["rtn"].variables, x), x)
        assert float(jnp.mean((q - fp) ** 2)) < float(jnp.mean((r - fp) ** 2))


def test_learned_activation_ranges_stay_on_a_grid_with_the_same_zero_point(results):
    rtn, qm = results["rtn"], results["brecq"]
    moved = 0
    for site, (lo, hi) in qm.act_ranges.items():
        bits = qm.bits_per_layer[site][1]
        s0, z0 = quant.asymmetric_qparams(*rtn.act_ranges[site], bits)
        s1, z1 = quant.asymmetric_qparams(lo, hi, bits)
        assert float(z1) == float(z0)
        moved += float(s1) != float(s0)
    assert moved > 0


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(16, name="fc")(x)))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (48, 12))
    variables = model.init(jax.random.key(1), x)
    spec = dataclasses.replace(W2A4, keep_ends_8bit=False)
    run = lambda method="qdrop", **kw: ptq.quantize(
        model, variables, x, spec, method=method, recon={"iters": 4, **kw}
    )  # fmt: skip
    return run, run(chunk=1)


def test_qdrop_without_dropping_is_brecq(mlp):
    run, _ = mlp
    a, b = run(drop_prob=0.0), run("brecq")
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    jax.tree.map(np.testing.assert_array_equal, a.act_ranges, b.act_ranges)
    keys = ("block", "layers", "loss_before", "loss_after")
    assert [{k: blk[k] for k in keys} for blk in a.report["blocks"]] == [
        {k: blk[k] for k in keys} for blk in b.report["blocks"]
    ]


def test_qdrop_masks_are_fair_coins_and_its_bar_ends_on_each_blocks_last_loss(
    mlp, capsys, monkeypatch
):
    """At drop_prob 0.5 each quantized input's mask is `prng.fair_coins` of its shape (32
    coins per random word, tests/test_prng.py); at any other rate a Bernoulli draw. With a
    bar the losses are read now and then (each reading waits for its iteration), the last
    always; neither changes the result."""
    run, one = mlp
    drawn = []
    coins = block_problem.prng.fair_coins

    def spy(key, shape):
        drawn.append(tuple(shape))
        return coins(key, shape)

    monkeypatch.setattr(block_problem.prng, "fair_coins", spy)
    monkeypatch.setattr(reconstruct, "LOSS_EVERY_S", 1e9)  # only the last loss is read
    shown = run(chunk=1, progress=True)
    assert sorted(set(drawn)) == [(32, 12), (32, 16)]  # the two Dense inputs, batch 32
    jax.tree.map(np.testing.assert_array_equal, shown.variables, one.variables)
    err = capsys.readouterr().err
    finals = [ln for ln in err.splitlines() if "4/4" in ln]
    assert len(finals) == len(one.report["blocks"]) and all("rec=" in ln for ln in finals), err
    drawn.clear()
    run(chunk=1, drop_prob=0.25)
    assert drawn == []


def test_the_scanned_path_and_its_chunks_give_the_straight_line_result(mlp, monkeypatch):
    """The GPU/TPU path (iterations inside lax.scan, here chunks of 3 then 1) forced on CPU
    equals the straight-line path of one iteration per call."""
    run, one = mlp
    monkeypatch.setattr(reconstruct.backend, "scans", lambda loop="auto": True)
    scanned = run(chunk=3)
    assert scanned.report["settings"]["chunk"] == 3 and one.report["settings"]["chunk"] == 1
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        one.variables["params"],
        scanned.variables["params"],
    )
    for site in one.act_ranges:
        np.testing.assert_allclose(one.act_ranges[site], scanned.act_ranges[site], rtol=1e-5)
    moved = [b["loss_after"] != b["loss_before"] for b in one.report["blocks"]]
    assert any(moved)


def test_blocks_override_and_its_errors(net):
    model, variables, calib, _, _ = net
    graph = taps.trace(model, variables, calib[:2])
    found = ptq.find_blocks(model, variables, graph, calib[:2], paths=["block2", "block1/conv2"])
    assert [b.name for b in found] == ["stem", "block1/conv1", "block1/conv2", "block2", "head"]
    assert found[3].sites == ("block2/conv1", "block2/conv2", "block2/proj")
    for paths, match in [
        (["block1", "block1/conv1"], "inside"),
        (["nothing_here"], "holds no Conv/Dense"),
        ([3], "module path"),
    ]:
        with pytest.raises(ValueError, match="blocks"):
            ptq.find_blocks(model, variables, graph, calib[:2], paths=paths)
        with pytest.raises(ValueError, match=match):
            ptq.find_blocks(model, variables, graph, calib[:2], paths=paths)


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(8, name="shared")
        return nn.Dense(3, name="head")(dense(nn.relu(dense(x))))


def test_a_block_called_twice_is_refused():
    model = Shared()
    x = jnp.ones((2, 8))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="blocks: 'shared' is called 2 times"):
        ptq.quantize(model, variables, x, method="brecq", recon={"iters": 1})


@pytest.mark.parametrize(
    "name,count",
    [
        ("resnet8", 5),
        ("resnet50", 18),
        ("mobilenet_v2", 20),
        ("mobilenet_v1", 15),
        ("vgg16_bn", 14),
    ],
)
def test_zoo_block_structure(name, count):
    model = models.create(name, num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    graph = taps.trace(model, variables, x)
    found = ptq.find_blocks(model, variables, graph, x)
    assert len(found) == count
    assert found[0].sites == (graph.first,) and found[-1].sites == (graph.last,)
    assert sum(len(b.sites) for b in found) == len(graph.layers)
    if name.startswith("resnet"):
        assert found[1].name == "stage1_block0" and len(found[1].sites) >= 2
