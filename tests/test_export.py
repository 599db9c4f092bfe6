"""Deployable files of a quantized model (`dnq_jax.ptq.export`, docs/deploy.md): StableHLO
reloaded without dnq_jax, ONNX QDQ run by onnxruntime, both against the in-process model."""

import json
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ptq import train_on_blobs

from dnq_jax import data, ptq
from dnq_jax.errors import ConfigError
from dnq_jax.ptq import export_onnx
from dnq_jax.ptq.export import load, weight_grid

ROOT = Path(__file__).resolve().parents[1]
BITS = [(8, 8), (4, 4), (2, 4)]
METHODS = {"rtn": None, "adaround": {"iters": 20}}  # method: its recon settings
# RTN at every width; the reconstruction at the lowest only (its files differ from RTN's only
# in the learned rounding, which is read back from the kernels the same way at every width).
CASES = [("rtn", w, a) for w, a in BITS] + [("adaround", 2, 4)]


class Net(nn.Module):
    """What zoo models are made of: conv -> BN -> ReLU, max pooling, a residual block,
    average pooling, a biased conv without BN, a flatten and a global mean concatenated,
    and a Dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        x = nn.relu(bn("bn0")(nn.Conv(16, (3, 3), use_bias=False, name="stem")(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        y = nn.relu(bn("bn1")(nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
        y = bn("bn2")(nn.Conv(16, (3, 3), use_bias=False, name="conv2")(y))
        x = nn.avg_pool(nn.relu(x + y), (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (1, 1), name="mix")(x))
        x = jnp.concatenate([x.reshape(x.shape[0], -1), jnp.mean(x, axis=(1, 2))], axis=-1)
        return nn.Dense(8, name="head")(x)


@pytest.fixture(scope="module")
def net():
    """Net trained for 150 Adam steps on the blob task (tests/test_ptq.py)."""
    return train_on_blobs(Net(), 150)


@pytest.fixture(scope="module")
def quantized(net):
    """{(method, w_bits, a_bits): QuantizedModel} for RTN and AdaRound at each width."""
    model, variables, calib, _, _ = net
    return {
        (method, w, a): ptq.quantize(
            model, variables, calib, ptq.QuantSpec(w, a), method=method, recon=METHODS[method]
        )
        for method, w, a in CASES
    }


@pytest.fixture(scope="module")
def onnx_logits(quantized, net, tmp_path_factory):
    """{key: (onnx ModelProto, onnxruntime logits on the test images)} for every model."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    x_test = net[3]
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for (method, w, a), qm in quantized.items():
        result = ptq.export(qm, folder / f"{method}_w{w}a{a}.onnx", format="onnx")
        out[method, w, a] = (onnx.load(result.path), load(result)(x_test))
    return out


# Numbers no script may print without the files being the quantized model: StableHLO is
# compared bit for bit; ONNX logits differ from XLA's by float reassociation (another
# summation order in the convolutions), i.e. ~1e-6 relative, except where such an ulp moves
# a pre-activation across a rounding boundary of the next quantizer and one activation code
# flips: that changes a logit by up to a few activation steps (measured: at most 2e-3 of the
# largest logit, on 1 or 2 of 1000 images, and only at 8-bit activations, whose grid is
# finest). Hence: argmax identical, and 99% of the images within 1e-5 of the largest logit.
RELATIVE_TOLERANCE = 1e-5
FLIPPED_SHARE = 0.01
MAX_FLIP = 5e-3


def test_stablehlo_reloads_bit_exact_in_a_process_without_dnq_jax(quantized, net, tmp_path):
    x_test = net[3][:200]
    expected = {}
    for key in [("rtn", 4, 4), ("adaround", 2, 4)]:
        qm = quantized[key]
        out = qm.export(tmp_path / f"{key[0]}_w{key[1]}a{key[2]}.stablehlo")
        expected[out.path.name] = np.asarray(qm(x_test))
        meta = json.loads(out.sidecar.read_text())
        assert meta["input"]["shape"] == ["batch", 16, 16, 3] and meta["w_bits"] == key[1]
        assert meta["method"] == key[0] and meta["size_bytes"] == out.path.stat().st_size
    np.save(tmp_path / "images.npy", x_test)
    script = """
import sys, pathlib, numpy as np, jax
folder = pathlib.Path(sys.argv[1])
images = np.load(folder / "images.npy")
for path in sorted(folder.glob("*.stablehlo")):
    call = jax.export.deserialize(bytearray(path.read_bytes())).call
    np.save(folder / (path.name + ".npy"), np.asarray(call(images)))
assert np.asarray(call(images[:7])).shape[0] == 7  # any batch size
assert not [m for m in sys.modules if m.startswith("dnq_jax")], "dnq_jax was imported"
"""
    # Outside the repository, so `dnq_jax` could not be imported by accident either.
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=tmp_path)
    for name, logits in expected.items():
        np.testing.assert_array_equal(np.load(tmp_path / (name + ".npy")), logits)


def test_onnx_is_a_qdq_graph_with_integer_per_channel_weights(onnx_logits, quantized):
    onnx = pytest.importorskip("onnx")
    model, _ = onnx_logits["rtn", 2, 4]
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    types = onnx.TensorProto.DataType.Name
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    layers = [n for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert len(layers) == len(quantized["rtn", 2, 4].graph.layers) == 5
    storage = []
    for layer in layers:
        data, weight = (producer[name] for name in layer.input[:2])
        # Every input is dequantized from the QuantizeLinear of its calibrated range.
        assert data.op_type == "DequantizeLinear"
        assert producer[data.input[0]].op_type == "QuantizeLinear"
        assert types(inits[data.input[2]].data_type) == "UINT8"
        assert list(inits[data.input[1]].dims) == []  # per tensor
        # Every kernel is integer codes with a scale and zero point per output channel.
        assert weight.op_type == "DequantizeLinear"
        codes, scale, zero = (inits[name] for name in weight.input)
        channels = codes.dims[weight.attribute[0].i]
        assert list(scale.dims) == list(zero.dims) == [channels]
        storage.append(types(codes.data_type))
        if storage[-1] == "INT4":  # 2-bit codes, stored in 4 bits
            values = onnx.numpy_helper.to_array(codes).astype(np.int8)
            assert values.min() >= -2 and values.max() <= 1
    # First and last layer at 8 bits, the others at 2 bits (in INT4).
    assert storage == ["INT8", "INT4", "INT4", "INT4", "INT8"]


@pytest.mark.parametrize("method, bits", [(m, (w, a)) for m, w, a in CASES], ids=str)
def test_onnx_logits_are_the_quantized_model_s(onnx_logits, quantized, net, method, bits):
    _, _, _, x_test, y_test = net
    _, logits = onnx_logits[(method, *bits)]
    expected = np.asarray(quantized[(method, *bits)](x_test))
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    top1 = lambda z: 100.0 * np.mean(z.argmax(-1) == y_test)
    assert abs(top1(logits) - top1(expected)) <= 0.1
    error = np.abs(logits - expected).max(-1) / np.abs(expected).max()
    assert np.mean(error > RELATIVE_TOLERANCE) <= FLIPPED_SHARE
    assert error.max() <= MAX_FLIP


def test_exported_model_scores_like_the_quantized_model_not_the_float_one(
    onnx_logits, quantized, net, tmp_path
):
    """The failure of converters that walk the Flax layers: a graph with the float (or
    twice-normalised) kernels scores like another model. At W2A4 quantization changes many
    predictions; the files must make the quantized model's, not the float model's."""
    model, variables, _, x_test, _ = net
    qm = quantized["rtn", 2, 4]
    expected, float_logits = np.asarray(qm(x_test)), np.asarray(ptq.fp32(model, variables)(x_test))
    changed = expected.argmax(-1) != float_logits.argmax(-1)
    assert changed.sum() >= 20  # quantization matters on this model
    stablehlo = np.asarray(load(qm.export(tmp_path / "w2a4.stablehlo"))(x_test))
    for logits in (onnx_logits["rtn", 2, 4][1], stablehlo):
        assert np.array_equal(logits.argmax(-1)[changed], expected.argmax(-1)[changed])
        gap = np.abs(logits - expected).mean()
        assert gap < 1e-3 * np.abs(expected - float_logits).mean()


def test_weight_grid_reads_back_codes_scales_and_zero_points():
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        qmax = 2**bits - 1
        codes = rng.integers(0, qmax + 1, (3, 3, 4, 6))
        codes[..., 1] = rng.integers(3, 5, (3, 3, 4)) if bits > 2 else 1  # few codes used
        zero = rng.integers(0, qmax + 1, 6)
        scale = rng.uniform(0.001, 0.1, 6).astype(np.float32)
        kernel = ((codes - zero) * scale).astype(np.float32)
        kernel[..., 5] = 0.0  # a dead channel
        got, s, z, _ = weight_grid(kernel, bits)
        assert got.min() >= -(2 ** (bits - 1)) and got.max() < 2 ** (bits - 1)
        back = (got.astype(np.float64) - z) * s
        np.testing.assert_allclose(back, kernel, rtol=0, atol=1e-6 * np.abs(kernel).max())
    off_grid = rng.normal(size=(3, 3, 4, 2)).astype(np.float32)
    with pytest.raises(ValueError, match="not on a 4-bit grid"):
        weight_grid(off_grid, 4, "conv")


def test_onnx_export_without_onnx_names_the_pip_command(quantized, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ConfigError, match="pip install onnx onnxruntime"):
        ptq.export(quantized["rtn", 4, 4], tmp_path / "m.onnx", format="onnx")
    with pytest.raises(ValueError, match="format must be one of"):
        ptq.export(quantized["rtn", 4, 4], tmp_path / "m.tflite", format="tflite")


def test_onnx_refuses_a_primitive_it_cannot_translate():
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="'sort'.*stablehlo"):
        export_onnx.to_graph(lambda x: jnp.sort(x, axis=-1), (4, 4, 3), lambda k: None)


def test_a_conv_output_read_twice_inside_a_nested_call_keeps_its_bias_to_itself(tmp_path):
    """hard_swish is a jitted function that reads its input twice (x * relu6(x + 3) / 6): the
    `+ 3` must not become the bias of the bias-free conv feeding it, or the other read would
    see conv + 3."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dnq_jax.ptq.export import onnx_model, onnx_session

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    dims = ("NHWC", "HWIO", "NHWC")
    conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims)
    fn = lambda x: jax.nn.hard_swish(conv(x))
    graph, _ = export_onnx.to_graph(fn, (6, 6, 3), lambda k: None)
    path = tmp_path / "hswish.onnx"
    path.write_bytes(onnx_model(graph).SerializeToString())
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(onnx_session(path)(x), fn(x), rtol=1e-5, atol=1e-5)


def test_a_model_that_flattens_first_exports_for_its_images(tmp_path):
    """The file takes the calibration images' shape, not the first layer's input (here the
    flattened images)."""

    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(5, name="head")(
                nn.relu(nn.Dense(8, name="fc")(x.reshape(x.shape[0], -1)))
            )

    images = np.random.default_rng(0).normal(size=(16, 6, 6, 3)).astype(np.float32)
    model = Flat()
    qm = ptq.quantize(model, model.init(jax.random.key(0), images[:1]), images, ptq.QuantSpec(4, 4))
    assert qm.image_shape == (6, 6, 3)
    result = ptq.export(qm, tmp_path / "flat.stablehlo")
    np.testing.assert_array_equal(load(result)(images), qm(images))


def test_load_reads_an_exported_file_by_its_format_not_its_name(
    onnx_logits, quantized, net, tmp_path
):
    result = ptq.export(quantized["rtn", 4, 4], tmp_path / "model.qdq", format="onnx")
    np.testing.assert_array_equal(load(result)(net[3]), onnx_logits["rtn", 4, 4][1])


def test_evaluate_writes_and_checks_both_formats(net, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dnq_jax.train import evaluate

    model, variables, _, x_test, y_test = net
    # The blob images as uint8 and the statistics that normalise them back (to 1/255).
    u8 = np.clip(np.round((x_test + 1.5) / 6.0 * 255.0), 0, 255).astype(np.uint8)
    mean, std = np.full(3, 0.25, np.float32), np.full(3, 1 / 6, np.float32)
    labels = y_test.astype(np.int32)
    ds = data.Dataset("blobs", u8, labels, u8, labels, 8, mean, std)
    settings = evaluate.EvalSettings(bits=((4, 4),), n_calib=128, batch_size=250)
    results = evaluate.evaluate_variables(model, variables, ds, settings, False, str(tmp_path))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("export")]
    assert len(lines) == 2 and "stablehlo w4a4" in lines[0] and "onnx w4a4" in lines[1]
    for line in lines:
        checked = float(re.search(r"top-1 ([\d.]+) \(", line).group(1))
        in_process = float(re.search(r"in-process ([\d.]+)", line).group(1))
        assert in_process == results["w4a4"] and abs(checked - in_process) <= 0.1
    meta = json.loads((tmp_path / "w4a4.onnx.json").read_text())
    assert meta["normalization"]["mean"] == pytest.approx([0.25] * 3)
    assert {p.name for p in tmp_path.iterdir()} == {
        "w4a4.stablehlo",
        "w4a4.stablehlo.json",
        "w4a4.onnx",
        "w4a4.onnx.json",
    }
    # Without onnx: said before the evaluation, StableHLO written and checked, nothing lost.
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
        again = evaluate.evaluate_variables(
            model, variables, ds, settings, False, str(tmp_path / "h")
        )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("export: StableHLO only; ONNX needs onnx and onnxruntime: pip install")
    assert len(out) == 2 and "stablehlo w4a4" in out[1] and again["w4a4"] == results["w4a4"]
    assert {p.name for p in (tmp_path / "h").iterdir()} == {"w4a4.stablehlo", "w4a4.stablehlo.json"}


def test_evaluate_cli_passes_export_on(monkeypatch, capsys):
    from dnq_jax.cli import train as cli
    from dnq_jax.train import evaluate

    seen = {}

    def fake(workdir, bits, method, iters, export_dir=None):
        seen.update(workdir=workdir, export_dir=export_dir)
        return {"fp32": 90.0, "settings": {"method": "rtn"}}

    monkeypatch.setattr(evaluate, "evaluate_workdir", fake)
    with pytest.raises(SystemExit) as exit_:
        cli.evaluate_main(["evaluate.py", "--workdir=run", "--export=run/deploy"])
    assert exit_.value.code == 0 and seen == {"workdir": "run", "export_dir": "run/deploy"}


def deploy_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs/deploy.md").read_text(), re.S)


def test_deploy_page_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "docs_example"}
    blocks = deploy_blocks()
    assert len(blocks) >= 2
    for block in blocks:  # in order, sharing names, as a reader would run them
        exec(compile(block, str(ROOT / "docs/deploy.md"), "exec"), namespace)
    out = capsys.readouterr().out
    assert "onnx w4a4" in out and "stablehlo w4a4" in out
