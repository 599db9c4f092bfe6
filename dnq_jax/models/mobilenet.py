"""MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al. 2018) with CIFAR strides.

Both keep the ImageNet channel plans but downsample less, as in the common CIFAR ports: the
stem conv has stride 1, and in V2 the 24-channel stage too, so a 32x32 input reaches the head
at 4x4 (V2) or 2x2 (V1) instead of 1x1. Depthwise convs are ``nn.Conv`` with
``feature_group_count`` equal to their channel count (kernel shape ``(3, 3, 1, C)``), each
followed by its BatchNorm like every other conv.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnq_jax.models.layers import Dtype, check_images, check_positive, classifier_head, conv_bn

# (expansion t, output channels c, blocks n, stride of the first block s) from the V2 paper's
# table 2, with the 24-channel stage's stride 2 -> 1 for 32x32 inputs.
V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
V2_STEM = 32
V2_LAST = 1280

# (output channels, stride) of the 13 depthwise separable blocks of V1.
V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)
V1_STEM = 32


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to the nearest multiple of ``divisor``.

    The result is at least ``divisor`` and never more than 10% below ``value``, so narrow
    width multipliers do not starve a layer (the rule of the reference MobileNet code).
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class _WidthScaled(nn.Module):
    """Fields and their checks shared by both MobileNets."""

    num_classes: int
    width: float = 1.0
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        check_positive("num_classes", self.num_classes, integer=True)
        check_positive("width", self.width)
        super().__post_init__()


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (both ReLU6), linear 1x1 projection; residual if shapes match."""

    features: int
    expansion: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC batch; the output has ``features`` channels."""
        kw = dict(train=train, dtype=self.dtype)
        in_features = x.shape[-1]
        hidden = int(round(in_features * self.expansion))
        y = x
        if self.expansion != 1:
            y = conv_bn(
                y, hidden, 1, conv_name="expand_conv", bn_name="expand_bn", act=nn.relu6, **kw
            )
        y = conv_bn(
            y,
            hidden,
            3,
            strides=self.strides,
            groups=hidden,
            conv_name="dw_conv",
            bn_name="dw_bn",
            act=nn.relu6,
            **kw,
        )
        # No activation after the projection: the V2 paper shows ReLU on the narrow
        # bottleneck destroys information.
        y = conv_bn(y, self.features, 1, conv_name="project_conv", bn_name="project_bn", **kw)
        if self.strides == 1 and in_features == self.features:
            y = x + y
        return y


class MobileNetV2(_WidthScaled):
    """MobileNetV2 with CIFAR strides (2.24M parameters with 10 classes at width 1.0).

    Attributes:
      num_classes: size of the logits.
      width: width multiplier on every channel count except the last conv's 1280, which only
        grows (for width > 1), as in the paper.
      dtype: compute dtype; parameters stay float32 and logits are returned in float32.

    Layer paths read ``stem_conv``, ``stage1_block0/dw_conv``, ..., ``last_conv``, ``head``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32) for an NHWC image batch of any size and channel count."""
        check_images(x)
        kw = dict(train=train, dtype=self.dtype)
        stem = make_divisible(V2_STEM * self.width)
        x = conv_bn(x, stem, 3, conv_name="stem_conv", bn_name="stem_bn", act=nn.relu6, **kw)
        for i, (t, c, n, s) in enumerate(V2_STAGES):
            features = make_divisible(c * self.width)
            for j in range(n):
                x = InvertedResidual(
                    features,
                    t,
                    strides=s if j == 0 else 1,
                    dtype=self.dtype,
                    name=f"stage{i + 1}_block{j}",
                )(x, train)
        last = make_divisible(V2_LAST * max(1.0, self.width))
        x = conv_bn(x, last, 1, conv_name="last_conv", bn_name="last_bn", act=nn.relu6, **kw)
        return classifier_head(x, self.num_classes, dtype=self.dtype)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv (ReLU), then 1x1 pointwise conv to ``features`` channels (ReLU)."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC batch."""
        kw = dict(train=train, dtype=self.dtype)
        channels = x.shape[-1]
        y = conv_bn(
            x,
            channels,
            3,
            strides=self.strides,
            groups=channels,
            conv_name="dw_conv",
            bn_name="dw_bn",
            act=nn.relu,
            **kw,
        )
        return conv_bn(y, self.features, 1, conv_name="pw_conv", bn_name="pw_bn", act=nn.relu, **kw)


class MobileNetV1(_WidthScaled):
    """MobileNetV1 with CIFAR strides (3.2M parameters with 10 classes at width 1.0).

    Attributes:
      num_classes: size of the logits.
      width: width multiplier on every channel count (rounded to multiples of 8).
      dtype: compute dtype; parameters stay float32 and logits are returned in float32.

    Layer paths read ``stem_conv``, ``block1/dw_conv``, ``block1/pw_conv``, ..., ``head``.
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32) for an NHWC image batch of any size and channel count."""
        check_images(x)
        stem = make_divisible(V1_STEM * self.width)
        x = conv_bn(
            x,
            stem,
            3,
            train=train,
            dtype=self.dtype,
            conv_name="stem_conv",
            bn_name="stem_bn",
            act=nn.relu,
        )
        for i, (c, s) in enumerate(V1_BLOCKS):
            features = make_divisible(c * self.width)
            x = DepthwiseSeparable(features, strides=s, dtype=self.dtype, name=f"block{i + 1}")(
                x, train
            )
        return classifier_head(x, self.num_classes, dtype=self.dtype)


def mobilenet_v2(
    *, num_classes: int, width: float = 1.0, dtype: Dtype = jnp.float32
) -> MobileNetV2:
    """MobileNetV2 with CIFAR strides and width multiplier ``width``."""
    return MobileNetV2(num_classes=num_classes, width=width, dtype=dtype)


def mobilenet_v1(
    *, num_classes: int, width: float = 1.0, dtype: Dtype = jnp.float32
) -> MobileNetV1:
    """MobileNetV1 with CIFAR strides and width multiplier ``width``."""
    return MobileNetV1(num_classes=num_classes, width=width, dtype=dtype)
