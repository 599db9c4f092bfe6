"""Model zoo: shapes on CIFAR and Fashion-MNIST inputs, parameter counts, layer conventions."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import models
from dnq_jax.models.mobilenet import make_divisible

CIFAR = (2, 32, 32, 3)
FMNIST = (2, 28, 28, 1)
WEIGHT_AND_BN = (nn.Conv, nn.Dense, nn.BatchNorm)

# Published parameter counts with 10 classes (He et al. 2016 for the CIFAR ResNets; the
# common CIFAR ports for the rest).
PUBLISHED = {
    "resnet20": 0.27e6,
    "resnet56": 0.85e6,
    "resnet18": 11.17e6,
    "resnet50": 23.5e6,
    "mobilenet_v2": 2.24e6,
    "mobilenet_v1": 3.2e6,
    "vgg16_bn": 14.7e6,
}


@functools.cache
def _abstract(name, shape, num_classes=10, **kwargs):
    """Shapes of (variables, logits) of init + apply, without computing anything.

    Also returns the apply's Conv/Dense/BatchNorm calls in order of completion, as
    (module type, whether its input is the output of the call logged just before it).
    """
    model = models.create(name, num_classes=num_classes, **kwargs)
    calls = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and type(context.module) in WEIGHT_AND_BN:
            fed = bool(calls) and args[0] is calls[-1][2]
            calls.append((type(context.module), fed, out))
        return out

    def run(x):
        variables = model.init(jax.random.key(0), x)
        with nn.intercept_methods(interceptor):
            return variables, model.apply(variables, x)

    variables, logits = jax.eval_shape(run, jax.ShapeDtypeStruct(shape, jnp.float32))
    return variables, logits, tuple((kind, fed) for kind, fed, _ in calls)


def _count(params):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def test_registry_names():
    assert set(models.names()) == {
        "resnet8",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet18",
        "resnet50",
        "resnet18_imagenet",
        "resnet50_imagenet",
        "mobilenet_v2",
        "mobilenet_v1",
        "vgg16_bn",
    }


@pytest.mark.parametrize(
    "name, published", [("resnet18_imagenet", 11_689_512), ("resnet50_imagenet", 25_557_032)]
)
def test_imagenet_resnets_have_torchvision_s_parameter_count(name, published):
    """The ImageNet form (7x7 stride-2 stem, max-pool) at 1000 classes: torchvision's
    resnet18 / resnet50 counts exactly."""
    variables, logits, _ = _abstract(name, (2, 224, 224, 3), num_classes=1000)
    assert _count(variables["params"]) == published
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("shape", [CIFAR, FMNIST], ids=["cifar", "fmnist"])
@pytest.mark.parametrize("name", models.names())
def test_logits_shape_and_dtype(name, shape):
    _, logits, _ = _abstract(name, shape)
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    variables, _, _ = _abstract(name, CIFAR)
    count = _count(variables["params"])
    assert abs(count / PUBLISHED[name] - 1) < 0.03, count


def test_num_classes_changes_only_the_head():
    small, _, _ = _abstract("resnet20", CIFAR)
    big, logits, _ = _abstract("resnet20", CIFAR, num_classes=100)
    assert logits.shape == (2, 100)
    # 64 pooled features -> 90 more classes: 90 kernel columns of 64, plus 90 biases.
    assert _count(big["params"]) - _count(small["params"]) == 90 * 65


def test_width_multiplier():
    narrow, _, _ = _abstract("mobilenet_v2", CIFAR, width=0.25)
    params = narrow["params"]
    assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 8)
    # The last conv keeps 1280 channels below width 1, as in the paper.
    assert params["last_conv"]["kernel"].shape == (1, 1, 80, 1280)
    assert _count(params) < 0.25 * PUBLISHED["mobilenet_v2"]


@pytest.mark.parametrize(
    "value,expected",
    [(32 * 0.25, 8), (5.6, 8), (20, 24), (12, 16), (11, 16), (72, 72), (1280, 1280)],
)
def test_make_divisible(value, expected):
    # 11 rounds to 8, more than 10% below 11, so it goes up to 16.
    assert make_divisible(value) == expected


def _weight_layers(params, path=()):
    """(path, params dict) of every Conv/Dense layer, found by its kernel."""
    if "kernel" in params:
        return [(path, params)]
    found = []
    for key, sub in params.items():
        if isinstance(sub, dict):
            found += _weight_layers(sub, path + (key,))
    return found


@pytest.mark.parametrize("name", models.names())
def test_layer_conventions(name):
    variables, _, _ = _abstract(name, CIFAR)
    layers = _weight_layers(variables["params"])
    dense = [(p, leaf) for p, leaf in layers if leaf["kernel"].ndim == 2]
    convs = [(p, leaf) for p, leaf in layers if leaf["kernel"].ndim == 4]
    assert len(dense) + len(convs) == len(layers), "only Conv (HWIO) and Dense (IO) kernels"
    assert [p for p, _ in dense] == [("head",)]
    assert dense[0][1]["kernel"].shape[-1] == 10
    assert all("bias" not in leaf for _, leaf in convs), "a conv before BN needs no bias"
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    stats = jax.tree_util.tree_leaves(variables["batch_stats"])
    assert len(stats) == 2 * len(convs)  # mean and var of one BatchNorm per conv


@pytest.mark.parametrize("name", models.names())
def test_every_conv_output_feeds_its_batchnorm_directly(name):
    """BN folding pairs a BatchNorm with the conv whose output it receives unchanged."""
    calls = _abstract(name, CIFAR)[2]
    kinds = [kind for kind, _ in calls]
    n_conv = kinds.count(nn.Conv)
    assert n_conv > 0 and kinds.count(nn.BatchNorm) == n_conv
    # Calls are logged on return, so a BatchNorm's entry directly follows its conv's.
    for i, (kind, fed) in enumerate(calls):
        if kind is nn.BatchNorm:
            assert calls[i - 1][0] is nn.Conv and fed, f"BN call {i} is not fed by a conv"
    assert kinds[-1] is nn.Dense and kinds.count(nn.Dense) == 1


def test_conv_init_is_he_normal_fan_out():
    # A one-block ResNet runs the zoo's shared conv/BN code; initialising a full model would
    # spend seconds compiling its RNG program on XLA:CPU.
    model = models.ResNet((1,), (64,), num_classes=10, stem_width=8)
    # The rbg generator compiles several times faster than threefry on XLA:CPU.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))
    block = variables["params"]["stage1_block0"]
    # 8 -> 64 channels, so fan_out (9 * 64) and fan_in (9 * 8) give different scales.
    kernel = block["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 8, 64)
    np.testing.assert_allclose(np.std(kernel), math.sqrt(2.0 / (9 * 64)), rtol=0.05)
    np.testing.assert_allclose(np.mean(kernel), 0.0, atol=0.002)
    np.testing.assert_array_equal(block["bn2"]["scale"], 1.0)
    np.testing.assert_array_equal(block["bn2"]["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["stage1_block0"]["bn2"]["var"], 1.0)


def _fill(abstract, seed=0):
    """Concrete variables shaped like ``abstract``: He-normal kernels, BatchNorm as at init.

    Stands in for ``model.init``, whose compilation costs 5-20 s per model on XLA:CPU.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        key = path[-1].key
        if key == "kernel":
            fan = spec.shape[-1] * math.prod(spec.shape[:-2]) if spec.ndim == 4 else spec.shape[0]
            return (rng.standard_normal(spec.shape) * math.sqrt(2.0 / fan)).astype(np.float32)
        fill = 1.0 if key in ("scale", "var") else 0.0
        return np.full(spec.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@pytest.mark.parametrize(
    "name,kwargs", [("resnet20", {}), ("mobilenet_v2", {"width": 0.25})], ids=["resnet20", "mbv2"]
)
def test_real_forward(name, kwargs):
    model = models.create(name, num_classes=10, **kwargs)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
    variables = _fill(jax.eval_shape(model.init, jax.random.key(0), x))

    train_fn = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    eval_fn = jax.jit(lambda v, x: model.apply(v, x))

    logits, updates = train_fn(variables, x)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    old, new = variables["batch_stats"], updates["batch_stats"]
    bns = jax.tree_util.tree_leaves(old, is_leaf=lambda d: "mean" in d)
    new_bns = jax.tree_util.tree_leaves(new, is_leaf=lambda d: "mean" in d)
    assert len(bns) == len(new_bns) > 0
    # A BN fed by a 1x1 conv of a zero-mean BN output keeps its running mean, so only ask
    # that each BN moved its mean or its variance.
    for a, b in zip(bns, new_bns):
        assert not (np.allclose(a["mean"], b["mean"]) and np.allclose(a["var"], b["var"]))

    # Eval uses running statistics: deterministic, and a sample's logits do not depend on the
    # rest of the batch; training uses batch statistics, so there they do.
    first = eval_fn(variables, x)
    np.testing.assert_array_equal(first, eval_fn(variables, x))
    other = x.at[2:].set(rng.standard_normal((2, 16, 16, 3)))
    np.testing.assert_allclose(eval_fn(variables, other)[:2], first[:2], rtol=1e-5, atol=1e-5)
    train_other, _ = train_fn(variables, other)
    assert not np.allclose(train_other[:2], logits[:2], atol=1e-4)

    bf16 = models.create(name, num_classes=10, dtype=jnp.bfloat16, **kwargs)
    bf16_vars = jax.eval_shape(bf16.init, jax.random.key(0), x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_vars)} == {jnp.dtype("float32")}
    low = jax.jit(lambda v, x: bf16.apply(v, x))(variables, x)
    assert low.dtype == jnp.float32
    scale = float(np.max(np.abs(first)))
    np.testing.assert_allclose(low, first, atol=0.1 * scale)


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="resnet20.*vgg16_bn"):
        models.create("resnet21", num_classes=10)
    with pytest.raises(ValueError, match="width"):
        models.create("resnet20", num_classes=10, width=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        models.create("mobilenet_v2", num_classes=10, width=-1.0)
    with pytest.raises(ValueError, match="depth"):
        models.cifar_resnet(21, num_classes=10)
    model = models.create("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="x must be an NHWC"):
        model.init(jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="x must be floating"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
