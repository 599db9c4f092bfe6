"""BN folding: the folded model must compute what the original computes in eval mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import models
from dnq_jax.ptq import fold


def randomize(shapes, seed: int = 0):
    """Variables with the given shapes, far from an identity BatchNorm so folding must work:
    non-zero means, variances away from 1, random affine parameters."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, s in leaves:
        leaf = path[-1].key
        if leaf == "kernel":
            value = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        elif leaf == "var":
            value = rng.uniform(0.3, 2.0, s.shape)
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, s.shape) * rng.choice([-1.0, 1.0], s.shape)
        else:  # mean and biases
            value = rng.normal(size=s.shape) * 0.3
        out.append(jnp.asarray(value, s.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def assert_same_outputs(out, ref):
    # float32 rounding after re-association grows with the magnitude of the activations, so
    # the absolute tolerance is relative to the largest logit (at least 1e-5).
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * scale)


def count_batchnorms(batch_stats) -> int:
    return sum(
        1
        for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]
        if path[-1].key == "mean"
    )


# Every family of the zoo once: the CIFAR ResNets of other depths (20, 32, 56) stack the
# same blocks as resnet8, and their BatchNorms fold by the same rule.
ZOO_FAMILIES = [n for n in models.names() if n not in ("resnet20", "resnet32", "resnet56")]


@pytest.mark.parametrize("name", ZOO_FAMILIES)
def test_folded_zoo_model_matches_original(name):
    model = models.create(name, num_classes=7)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), x))
    folded, pairs = fold.fold_batchnorm(model, variables, x)
    # Every conv of the zoo feeds its own BatchNorm, so every BatchNorm must be folded.
    assert len(pairs) == count_batchnorms(variables["batch_stats"])
    ref = jax.jit(model.apply)(variables, x)
    out = jax.jit(lambda v, x: fold.apply_folded(model, v, pairs, x))(folded, x)
    assert out.dtype == ref.dtype
    assert_same_outputs(out, ref)


class Residual(nn.Module):
    """Conv with and without bias, BN without scale or without bias and with its own epsilon,
    a depthwise conv, a projection shortcut, and a BN after a ReLU that must stay a BN."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name, **kw: nn.BatchNorm(use_running_average=not train, name=name, **kw)
        h = nn.Conv(8, (3, 3), use_bias=True, name="conv_a")(x)
        h = nn.relu(bn("bn_a", use_scale=False, epsilon=1e-3)(h))
        h = nn.Conv(8, (3, 3), feature_group_count=8, use_bias=False, name="dw")(h)
        h = nn.relu(bn("bn_dw", use_bias=False)(h))
        h = bn("bn_b")(nn.Conv(8, (3, 3), strides=2, use_bias=False, name="conv_b")(h))
        s = bn("bn_s", use_scale=False, use_bias=False)(
            nn.Conv(8, (1, 1), strides=2, name="proj")(x)
        )
        h = nn.relu(h + s)
        h = bn("bn_relu")(nn.relu(nn.Conv(8, (1, 1), use_bias=False, name="conv_c")(h)))
        return nn.Dense(5, name="head")(h.mean((1, 2)))


@pytest.fixture(scope="module")
def residual():
    model = Residual()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), x), seed=3)
    folded, pairs = fold.fold_batchnorm(model, variables, x)
    return model, x, variables, folded, pairs


def test_residual_net_folds_only_conv_fed_batchnorms(residual):
    model, x, variables, folded, pairs = residual
    assert dict(pairs) == {
        "conv_a": ("bn_a",),
        "dw": ("bn_dw",),
        "conv_b": ("bn_b",),
        "proj": ("bn_s",),
    }
    assert_same_outputs(fold.apply_folded(model, folded, pairs, x), model.apply(variables, x))


def test_folded_values_follow_the_formula(residual):
    _, _, variables, folded, _ = residual
    p, st = variables["params"], variables["batch_stats"]
    # conv_a has a bias and bn_a no scale (gamma = 1) and epsilon 1e-3.
    s = 1.0 / np.sqrt(np.float64(st["bn_a"]["var"]) + 1e-3)
    np.testing.assert_allclose(
        folded["params"]["conv_a"]["kernel"], p["conv_a"]["kernel"] * s, rtol=1e-6
    )
    expected_bias = p["bn_a"]["bias"] + (p["conv_a"]["bias"] - st["bn_a"]["mean"]) * s
    np.testing.assert_allclose(folded["folded_bias"]["conv_a"], expected_bias, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(folded["params"]["conv_a"]["bias"], 0.0)
    # bn_s has neither scale nor bias: bias' = (conv_bias - mean) / sqrt(var + 1e-5).
    s = 1.0 / np.sqrt(np.float64(st["bn_s"]["var"]) + 1e-5)
    np.testing.assert_allclose(
        folded["folded_bias"]["proj"],
        (p["proj"]["bias"] - st["bn_s"]["mean"]) * s,
        rtol=1e-6,
        atol=1e-7,
    )
    # The input is not modified.
    assert not np.allclose(p["conv_a"]["bias"], 0.0)


def test_folded_batchnorms_are_bypassed_and_the_others_kept(residual):
    model, x, variables, folded, pairs = residual
    ref = fold.apply_folded(model, folded, pairs, x)
    stats = dict(folded["batch_stats"])
    for _, (bn,) in pairs:
        stats[bn] = jax.tree_util.tree_map(lambda a: jnp.full_like(a, jnp.nan), stats[bn])
    out = fold.apply_folded(model, {**folded, "batch_stats": stats}, pairs, x)
    np.testing.assert_array_equal(out, ref)
    stats["bn_relu"] = {**stats["bn_relu"], "mean": stats["bn_relu"]["mean"] + 1.0}
    moved = fold.apply_folded(model, {**folded, "batch_stats": stats}, pairs, x)
    assert not np.allclose(moved, ref)


def test_shared_conv_is_not_folded():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(3, (3, 3), use_bias=False, name="shared")
            h = nn.BatchNorm(use_running_average=True, name="bn1")(conv(x))
            return nn.BatchNorm(use_running_average=True, name="bn2")(conv(h))

    model = Shared()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), x))
    folded, pairs = fold.fold_batchnorm(model, variables, x)
    assert pairs == ()
    assert_same_outputs(fold.apply_folded(model, folded, pairs, x), model.apply(variables, x))


def test_folded_batchnorm_keeps_its_output_dtype():
    class HalfBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
            return nn.BatchNorm(use_running_average=True, dtype=jnp.bfloat16, name="bn")(h)

    model = HalfBN()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), x))
    folded, pairs = fold.fold_batchnorm(model, variables, x)
    assert len(pairs) == 1
    ref = model.apply(variables, x)
    out = fold.apply_folded(model, folded, pairs, x)
    assert ref.dtype == out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(ref), rtol=2e-2, atol=2e-2)


# Folding is exact only where the BatchNorm is the one reader of the layer's raw output.
# Each model below is checked the way a user sees it: the 16-bit weight-only quantized model
# (BN folded wherever `trace` allows) must equal the float model, with BatchNorm statistics
# far from the identity so a wrong fold cannot hide.


class PreActivation(nn.Module):
    """A pre-activation residual block: the residual add reads the conv output un-normalised."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        y = nn.Conv(4, (3, 3))(nn.relu(nn.BatchNorm(use_running_average=True)(x)))
        x = x + y
        y = nn.Conv(4, (3, 3))(nn.relu(nn.BatchNorm(use_running_average=True)(x)))
        return nn.Dense(5)((x + y).mean((1, 2)))


class UsedTwice(nn.Module):
    """The conv output feeds a BatchNorm and, separately, a second branch."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), use_bias=False)(x)
        a = nn.relu(nn.BatchNorm(use_running_average=True)(h))
        b = nn.Conv(4, (1, 1))(h)
        return nn.Dense(5)((a * b).mean((1, 2)))


class DenseBN(nn.Module):
    """A BatchNorm right after a Dense (foldable), then one after a Dense read twice (not)."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(6)(x)))
        g = nn.Dense(6)(h)
        h = nn.BatchNorm(use_running_average=True)(g) + g
        return nn.Dense(5)(h)


class BiasedConvBN(nn.Module):
    """conv (with bias) -> BN -> relu, the plain post-activation case: folds."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(5)(x.mean((1, 2)))


def far_from_identity(variables, seed: int = 0):
    """`randomize`d variables whose BatchNorms scale by about 3 and shift by 0.5."""
    rng = np.random.default_rng(seed)

    def bn(path, leaf):
        keys = [getattr(p, "key", "") for p in path]
        if not any("BatchNorm" in k for k in keys):
            return leaf
        if keys[-1] == "scale":
            return jnp.asarray(3.0 + 0.3 * rng.normal(size=leaf.shape), leaf.dtype)
        if keys[-1] == "bias":
            return jnp.asarray(0.5 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(bn, randomize(variables, seed))


def relative_error(out, ref) -> float:
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


EXACT_FOLD_CASES = {
    # model, the (site, BatchNorm) pairs that may be folded
    "pre_activation": (PreActivation(), ()),
    "conv_used_twice": (UsedTwice(), ()),
    "bn_after_dense": (DenseBN(), (("Dense_0", ("BatchNorm_0",)),)),
    "conv_with_bias": (BiasedConvBN(), (("Conv_0", ("BatchNorm_0",)),)),
}


@pytest.mark.parametrize("case", sorted(EXACT_FOLD_CASES))
def test_16bit_weight_only_model_equals_float_model(case):
    from dnq_jax import ptq

    model, want_pairs = EXACT_FOLD_CASES[case]
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    variables = far_from_identity(jax.eval_shape(model.init, jax.random.key(1), x))
    qm = ptq.quantize(model, variables, x, ptq.QuantSpec(w_bits=16, a_bits=None))
    assert qm.bn_pairs == want_pairs
    ref = model.apply(variables, x)
    assert relative_error(qm(x), ref) < 1e-4
