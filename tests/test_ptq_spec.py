"""`QuantSpec`: its checks, and the deprecated keyword forms that map onto it (same result)."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from dnq_jax import diagnostics, ptq, taps
from dnq_jax.dnq import profiler
from dnq_jax.ptq import QuantSpec, ReconSettings


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(w_bits=1), "w_bits"),
        (dict(w_bits=17), "w_bits"),
        (dict(w_bits=True), "w_bits"),
        (dict(a_bits=1), "a_bits"),
        (dict(a_bits=4.0), "a_bits"),
        (dict(keep_ends_8bit=1), "keep_ends_8bit"),
        (dict(fold_bn="yes"), "fold_bn"),
        (dict(w_calibrator="percentile"), "w_calibrator"),
        (dict(a_calibrator="kl"), "a_calibrator"),
        (dict(calib_options=[("p", 2.0)]), "calib_options"),
        (dict(calib_options={"pct": 99.0}), "calib_options: unknown"),
        (dict(calib_options={"percentile": 40.0}), r"calib_options\['percentile'\]"),
        (dict(calib_options={"p": 0}), r"calib_options\['p'\]"),
        (dict(calib_options={"num_candidates": 0}), r"calib_options\['num_candidates'\]"),
    ],
)
def test_bad_fields_are_named(fields, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**fields)
    with pytest.raises(ValueError, match=match):  # replace builds a new spec, checked too
        dataclasses.replace(QuantSpec(), **fields)


def test_a_spec_is_a_frozen_normalised_value():
    options = {"percentile": 99.0}
    spec = QuantSpec(w_bits=np.int64(2), a_bits=None, calib_options=options)
    assert type(spec.w_bits) is int and spec.weight_only and not QuantSpec().weight_only
    options["percentile"] = 60.0  # the spec holds its own copy
    assert spec.calib_options == {"percentile": 99.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.w_bits = 4
    same = QuantSpec(w_bits=2, a_bits=None, calib_options={"percentile": 99.0})
    assert spec == same and hash(spec) == hash(same) and spec != QuantSpec()
    assert QuantSpec(calib_options=None).calib_options == {}


def test_recon_settings_are_checked_when_made():
    assert ReconSettings.for_method("qdrop").drop_prob == 0.5
    with pytest.raises(ValueError, match="iters"):
        ReconSettings(method="brecq", iters=0)
    with pytest.raises(ValueError, match="method"):
        ReconSettings(method="rtn")
    with pytest.warns(DeprecationWarning, match="ReconSettings"):
        assert ptq.Settings is ReconSettings


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="c1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="c2")(x))
        return nn.Dense(4, name="head")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (24, 8, 8, 3))
    variables = model.init(jax.random.key(1), x[:1])
    # Non-trivial BatchNorm statistics, so that folding changes the kernels.
    stats = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
    return model, {**variables, "batch_stats": stats}, x


def same_model(a: ptq.QuantizedModel, b: ptq.QuantizedModel, x) -> None:
    assert a.bits_per_layer == b.bits_per_layer and a.bn_pairs == b.bn_pairs
    jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
    jax.tree.map(np.testing.assert_array_equal, a.act_ranges, b.act_ranges)
    np.testing.assert_array_equal(a(x), b(x))


@pytest.mark.parametrize(
    "old,spec",
    [
        (dict(w_bits=3, a_bits=4), QuantSpec(3, 4)),
        (
            dict(w_bits=2, a_bits=6, keep_ends_8bit=False, fold_bn=False, a_calibrator="mse"),
            QuantSpec(2, 6, keep_ends_8bit=False, fold_bn=False, a_calibrator="mse"),
        ),
        (dict(w_bits=4, quantize_activations=False), QuantSpec(4, None)),
        (dict(w_bits=4, a_bits=None), QuantSpec(4, None)),
    ],
)
def test_old_keywords_warn_and_give_the_spec_s_model(net, old, spec):
    model, variables, x = net
    new = ptq.quantize(model, variables, x, spec)
    with pytest.warns(DeprecationWarning, match="QuantSpec") as caught:
        legacy = ptq.quantize(model, variables, x, **old)
    (ours,) = [w for w in caught if "QuantSpec" in str(w.message)]
    assert ours.filename == __file__  # the warning points at the caller's line
    same_model(new, legacy, x)
    with pytest.warns(DeprecationWarning):
        cal = ptq.calibrate_model(model, variables, x, **old)
    assert cal.spec == spec


def test_old_reconstruction_keywords_warn_and_give_the_same_model(net):
    model, variables, x = net
    spec = QuantSpec(w_bits=2, a_bits=4)
    # A ReconSettings object here; the mapping form ({"iters": ...}) is what the other PTQ
    # tests use. Two chunks of 2 iterations: one compiled program per block.
    given = ReconSettings.for_method("qdrop", iters=4, chunk=2)
    new = ptq.quantize(model, variables, x, spec, method="qdrop", recon=given)
    with pytest.warns(DeprecationWarning, match="recon"):
        old = ptq.quantize(
            model, variables, x, spec, method="qdrop", iters=4, recon_options={"chunk": 2}
        )
    same_model(new, old, x)
    # RTN never rejected seed and progress, and still does not.
    ptq.quantize(model, variables, x, spec, recon={"seed": 1, "progress": False})


def test_diagnostics_and_profiler_take_the_spec_or_the_old_keywords(net):
    model, variables, x = net
    spec = QuantSpec(w_bits=3, a_bits=4, fold_bn=False)
    new = diagnostics.error_setup(model, variables, x, spec)
    with pytest.warns(DeprecationWarning):
        old = diagnostics.error_setup(model, variables, x, w_bits=3, a_bits=4, fold_bn=False)
    assert not new.fold_bn and not old.fold_bn
    same_model(new.qmodel, old.qmodel, x)

    graph = taps.trace(model, variables, x, train=False)
    stats = jax.jit(profiler.make_profiler(model, graph, spec))(variables, x)
    with pytest.warns(DeprecationWarning):
        fn = profiler.make_profiler(model, graph, w_bits=3, a_bits=4, w_quantizer="symmetric")
    symmetric = jax.jit(profiler.make_profiler(model, graph, spec, w_quantizer="symmetric"))
    jax.tree.map(np.testing.assert_array_equal, jax.jit(fn)(variables, x), symmetric(variables, x))
    assert not np.array_equal(stats.w_sigma["c1"], symmetric(variables, x).w_sigma["c1"])
    with pytest.raises(TypeError, match="spec"):
        profiler.make_profiler(model, graph)
    with pytest.raises(ValueError, match="a_bits"):
        profiler.make_profiler(model, graph, QuantSpec(w_bits=3, a_bits=None))
