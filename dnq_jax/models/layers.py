"""Building blocks shared by the model zoo: conv -> BatchNorm -> activation, and the head.

Every conv in the zoo is followed by a BatchNorm that consumes the conv's output directly,
with nothing in between, so BN folding can pair the two from the data flow alone. The helpers
create their layers in the scope of the calling module (they must run inside a compact
method), so parameter paths stay flat and readable: ``stage2_block0/conv1``, not
``stage2_block0/ConvBN_0/Conv_0``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# He et al. (2015) init with fan_out, as in the reference ResNet/MobileNet/VGG code: it keeps
# the variance of back-propagated gradients constant through a ReLU conv stack.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's BatchNorm2d defaults (its momentum 0.1 is Flax's 0.9), so the reference training
# recipes, tuned with those running-statistic dynamics, carry over unchanged.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def check_images(x: jax.Array) -> None:
    """Raise ValueError unless ``x`` is a floating NHWC batch of images."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x must be an NHWC batch of images, got shape {getattr(x, 'shape', x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point (normalised images), got dtype {x.dtype}")


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    """Raise ValueError naming the field unless ``value`` is a positive number (or integer)."""
    kinds = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def batch_norm(train: bool, *, dtype: Dtype, name: str) -> nn.BatchNorm:
    """The zoo's BatchNorm: batch statistics when training, running averages otherwise."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        name=name,
    )


def conv_bn(
    x: jax.Array,
    features: int,
    kernel_size: int,
    *,
    train: bool,
    dtype: Dtype,
    conv_name: str,
    bn_name: str,
    strides: int = 1,
    groups: int = 1,
    act: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Square conv without bias, then BatchNorm on its output, then ``act`` if given.

    Padding is symmetric ``(kernel_size - 1) // 2`` as in the PyTorch reference models (Flax's
    'SAME' would pad stride-2 convs on one side only). ``groups`` is the feature group count:
    pass the input channel count for a depthwise conv. Call only from a compact method.
    """
    pad = (kernel_size - 1) // 2
    y = nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=conv_init,
        name=conv_name,
    )(x)
    y = batch_norm(train, dtype=dtype, name=bn_name)(y)
    return y if act is None else act(y)


def classifier_head(x: jax.Array, num_classes: int, *, dtype: Dtype) -> jax.Array:
    """Global average pool over height and width, then a Dense layer named ``head``.

    Pooling instead of flattening keeps every model independent of the input's spatial size.
    The logits are returned in float32 whatever the compute dtype, so losses stay accurate.
    """
    pooled = jnp.mean(x, axis=(1, 2))
    return nn.Dense(num_classes, dtype=dtype, name="head")(pooled).astype(jnp.float32)
