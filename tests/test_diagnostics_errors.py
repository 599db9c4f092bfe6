"""Error statistics and the output-error decomposition against numpy float64 computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from test_profiler import SmallCNN, random_variables

from dnq_jax import diagnostics as dg
from dnq_jax import taps
from dnq_jax.diagnostics import plots
from dnq_jax.ptq import QuantSpec


def _fake_quant(x: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
    """Asymmetric min-max quantizer with the range widened to contain 0, in float64."""
    axes = tuple(range(x.ndim - 1)) if per_channel else None
    lo = np.minimum(x.min(axis=axes, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=axes, keepdims=True), 0.0)
    qmax = 2.0**bits - 1
    s = (hi - lo) / qmax
    z = np.clip(np.round(-lo / s), 0, qmax)
    return (np.clip(np.round(x / s) + z, 0, qmax) - z) * s


def test_error_stats_match_numpy_and_scipy():
    x = np.random.default_rng(0).standard_t(df=5, size=5000).astype(np.float32)
    s = dg.error_stats(jnp.asarray(x).reshape(50, 100), bins=32)
    x64 = x.astype(np.float64)
    assert float(s.mean) == pytest.approx(x64.mean(), abs=1e-6)
    assert float(s.std) == pytest.approx(x64.std(), rel=1e-5)
    assert float(s.kurtosis) == pytest.approx(sps.kurtosis(x64), rel=1e-4)
    ks = sps.kstest(x64, "norm", args=(x64.mean(), x64.std())).statistic
    assert float(s.ks) == pytest.approx(ks, abs=1e-5)
    edges = np.asarray(s.edges, np.float64)
    assert edges[0] == pytest.approx(x64.min()) and edges[-1] == pytest.approx(x64.max())
    np.testing.assert_array_equal(s.counts, np.histogram(x64, bins=edges)[0])
    assert int(s.size) == 5000 and int(np.sum(s.counts)) == 5000
    inside = dg.error_stats(jnp.asarray(x), bins=10, value_range=(-1.0, 1.0))
    np.testing.assert_array_equal(inside.counts, np.histogram(x64, bins=10, range=(-1, 1))[0])


def test_ks_and_kurtosis_tell_gaussian_from_uniform():
    rng = np.random.default_rng(1)
    gauss = dg.error_stats(jnp.asarray(rng.normal(0.3, 2.0, 20000), jnp.float32))
    unif = dg.error_stats(jnp.asarray(rng.uniform(-1.0, 1.0, 20000), jnp.float32))
    assert float(gauss.ks) < 0.015
    assert abs(float(gauss.kurtosis)) < 0.1
    # sup |F_U - Phi| between U(-1, 1) and N(0, 1/3) is about 0.057.
    assert float(unif.ks) > 0.045
    assert float(unif.kurtosis) == pytest.approx(-1.2, abs=0.05)


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN()
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
    variables = random_variables(model, images, rng)

    @jax.jit
    def layer_inputs(variables, images):
        store = {}
        with taps.capture_inputs(store):
            model.apply(variables, images, train=False)
        return store

    inputs = {k: np.asarray(v, np.float64) for k, v in layer_inputs(variables, images).items()}
    setups = {
        fold: dg.error_setup(model, variables, images, QuantSpec(3, 3, fold_bn=fold), batch_size=4)
        for fold in (False, True)
    }
    return model, images, variables, inputs, setups


# keep_ends_8bit: the first (c1) and last (fc) layers at 8 bits, dw at 3.
BITS = {"c1": 8, "dw": 3, "fc": 8}
BN_OF = {"c1": "bn1", "dw": "bn2"}


@pytest.mark.parametrize("fold_bn", [False, True])
def test_weight_error_stats_match_numpy(cnn, fold_bn):
    _, _, variables, _, setups = cnn
    got = dg.weight_error_stats(setups[fold_bn])
    assert set(got) == set(BITS)
    for name, bits in BITS.items():
        w = np.asarray(variables["params"][name]["kernel"], np.float64)
        if fold_bn and name in BN_OF:
            bn, st = variables["params"][BN_OF[name]], variables["batch_stats"][BN_OF[name]]
            w = w * np.asarray(bn["scale"]) / np.sqrt(np.asarray(st["var"]) + 1e-5)
        err = _fake_quant(w, bits, per_channel=True) - w
        s = got[name]
        assert float(s.mean) == pytest.approx(err.mean(), abs=1e-6 * np.abs(w).max()), name
        assert float(s.std) == pytest.approx(err.std(), rel=1e-4), name
        assert float(s.kurtosis) == pytest.approx(sps.kurtosis(err.ravel()), abs=1e-3), name


@pytest.mark.parametrize("fold_bn", [False, True])
def test_activation_error_stats_match_numpy(cnn, fold_bn):
    _, images, _, inputs, setups = cnn
    got = dg.activation_error_stats(setups[fold_bn], images, bins=16, batch_size=4)
    assert set(got) == set(BITS)
    for name, bits in BITS.items():
        x = inputs[name]
        err = (_fake_quant(x, bits, per_channel=False) - x).ravel()
        s = got[name]
        assert int(s.size) == err.size
        assert float(s.mean) == pytest.approx(err.mean(), abs=1e-4 * err.std()), name
        assert float(s.std) == pytest.approx(err.std(), rel=1e-4), name
        assert float(s.kurtosis) == pytest.approx(sps.kurtosis(err), abs=1e-3), name
        ks = sps.kstest(err, "norm", args=(err.mean(), err.std())).statistic
        assert float(s.ks) == pytest.approx(ks, abs=1e-4), name


def _conv(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    out = jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
        (stride, stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )
    return np.asarray(out, np.float64)


def test_decomposition_of_conv_and_depthwise_matches_direct_convolutions(cnn):
    _, images, variables, inputs, setups = cnn
    got = dg.output_error_decomposition(setups[False], images, batch_size=4)
    for name, stride, groups in (("c1", 1, 1), ("dw", 2, 6)):
        bits = BITS[name]
        x = inputs[name]
        w = np.asarray(variables["params"][name]["kernel"], np.float64)
        dx = _fake_quant(x, bits, per_channel=False) - x
        dw = _fake_quant(w, bits, per_channel=True) - w
        y_sq = np.sum(_conv(x, w, stride, groups) ** 2)
        # Terms computed by linearity from the error alone, not as differences of outputs.
        want = {
            "activation": np.sum(_conv(dx, w, stride, groups) ** 2) / y_sq,
            "weight": np.sum(_conv(x, dw, stride, groups) ** 2) / y_sq,
            "cross": np.sum(_conv(dx, dw, stride, groups) ** 2) / y_sq,
        }
        for term, value in want.items():
            assert got[name][term] == pytest.approx(value, rel=2e-3), (name, term)
        assert got[name]["y_sq"] == pytest.approx(y_sq / images.shape[0], rel=1e-5)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(4, name="out")(nn.relu(nn.Dense(6, name="hidden")(x)))


def test_decomposition_of_dense_layers_matches_numpy():
    model = MLP()
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    variables = model.init(jax.random.key(1), images)
    spec = QuantSpec(w_bits=3, a_bits=3, keep_ends_8bit=False, fold_bn=False)
    setup = dg.error_setup(model, variables, images, spec)
    got = dg.output_error_decomposition(setup, images, batch_size=3)
    x = np.asarray(images, np.float64)
    for name in ("hidden", "out"):
        p = variables["params"][name]
        w = np.asarray(p["kernel"], np.float64)
        x_hat, w_hat = _fake_quant(x, 3, per_channel=False), _fake_quant(w, 3, per_channel=True)
        y_sq = np.sum((x @ w) ** 2)
        want = {
            "activation": np.sum(((x_hat - x) @ w) ** 2) / y_sq,
            "weight": np.sum((x @ (w_hat - w)) ** 2) / y_sq,
            "cross": np.sum(((x_hat - x) @ (w_hat - w)) ** 2) / y_sq,
            "total": np.sum((x_hat @ w_hat - x @ w) ** 2) / y_sq,
        }
        for term, value in want.items():
            # The cross term is a second-order difference of float32 outputs: looser.
            rel = 2e-3 if term == "cross" else 2e-4
            assert got[name][term] == pytest.approx(value, rel=rel), (name, term)
        x = np.maximum(x @ w + np.asarray(p["bias"], np.float64), 0.0)


def test_weight_only_decomposition_has_no_activation_term(cnn):
    _, images, variables, _, _ = cnn
    setup = dg.error_setup(SmallCNN(), variables, images, QuantSpec(3, None), batch_size=4)
    got = dg.output_error_decomposition(setup, images, batch_size=6)
    for name, terms in got.items():
        assert terms["activation"] == 0.0 and terms["cross"] == 0.0, name
        assert terms["weight"] > 0.0
        assert terms["total"] == pytest.approx(terms["weight"], rel=1e-6), name


def test_error_plots_are_written(cnn, tmp_path):
    _, images, _, _, setups = cnn
    stats = dg.weight_error_stats(setups[True], bins=12)
    decomposition = dg.output_error_decomposition(setups[True], images, batch_size=6)
    files = [
        plots.error_histograms(stats, tmp_path / "hist.png", layers=["dw", "fc"]),
        plots.error_decomposition(decomposition, tmp_path / "decomp.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
