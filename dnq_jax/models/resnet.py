"""ResNet (He et al. 2016) in its CIFAR form (3x3 stride-1 stem, no max-pool) and its
ImageNet form (7x7 stride-2 stem, 3x3 stride-2 max-pool: a quarter of the side before the
first stage, for 224-pixel images).

One generic :class:`ResNet` serves both families: ResNet-18/50 here (64..512 channels, four
stages) and the 3-stage CIFAR ResNet-20/32/56 in :mod:`resnet_cifar`. Where a block changes
the shape of its input the shortcut is a 1x1 conv + BatchNorm projection (option B of the
paper), so every conv in the network is a conv -> BN pair that BN folding can merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnq_jax.models.layers import Dtype, check_images, check_positive, classifier_head, conv_bn


def _shortcut(x: jax.Array, features: int, strides: int, *, train: bool, dtype: Dtype) -> jax.Array:
    """Identity when the shape is kept, else a 1x1 conv + BN projection (option B)."""
    if strides == 1 and x.shape[-1] == features:
        return x
    return conv_bn(
        x,
        features,
        1,
        strides=strides,
        train=train,
        dtype=dtype,
        conv_name="shortcut_conv",
        bn_name="shortcut_bn",
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first one carries the stride. Output channels: ``features``."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC batch."""
        kw = dict(train=train, dtype=self.dtype)
        y = conv_bn(
            x,
            self.features,
            3,
            strides=self.strides,
            conv_name="conv1",
            bn_name="bn1",
            act=nn.relu,
            **kw,
        )
        y = conv_bn(y, self.features, 3, conv_name="conv2", bn_name="bn2", **kw)
        return nn.relu(y + _shortcut(x, self.features, self.strides, **kw))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision's ResNet v1.5), 1x1 expand by 4."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to an NHWC batch; the output has ``4 * features`` channels."""
        kw = dict(train=train, dtype=self.dtype)
        out = self.features * self.expansion
        y = conv_bn(x, self.features, 1, conv_name="conv1", bn_name="bn1", act=nn.relu, **kw)
        y = conv_bn(
            y,
            self.features,
            3,
            strides=self.strides,
            conv_name="conv2",
            bn_name="bn2",
            act=nn.relu,
            **kw,
        )
        y = conv_bn(y, out, 1, conv_name="conv3", bn_name="bn3", **kw)
        return nn.relu(y + _shortcut(x, out, self.strides, **kw))


class ResNet(nn.Module):
    """Stem conv, then stages of residual blocks, then global average pool and a Dense head.

    Attributes:
      stage_sizes: number of blocks in each stage.
      widths: block width of each stage (a bottleneck's output is ``4 * width``).
      num_classes: size of the logits.
      block: :class:`BasicBlock` or :class:`Bottleneck`.
      stem_width: output channels of the stem conv.
      stem: "cifar" (3x3 stride-1 conv) or "imagenet" (7x7 stride-2 conv, then a 3x3
        stride-2 max-pool).
      dtype: compute dtype; parameters stay float32 and logits are returned in float32.

    Every stage except the first halves the spatial size in its first block. Layer paths read
    ``stem_conv``, ``stage1_block0/conv1``, ..., ``head``.
    """

    stage_sizes: Sequence[int]
    widths: Sequence[int]
    num_classes: int
    block: type[nn.Module] = BasicBlock
    stem_width: int = 64
    stem: str = "cifar"
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(
                f"stage_sizes and widths must be non-empty and of equal length, got "
                f"{self.stage_sizes} and {self.widths}"
            )
        for n in self.stage_sizes:
            check_positive("stage_sizes", n, integer=True)
        for w in self.widths:
            check_positive("widths", w, integer=True)
        check_positive("num_classes", self.num_classes, integer=True)
        check_positive("stem_width", self.stem_width, integer=True)
        if self.stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}, got {self.stem!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32) for an NHWC image batch of any size and channel count."""
        check_images(x)
        imagenet = self.stem == "imagenet"
        x = conv_bn(
            x,
            self.stem_width,
            7 if imagenet else 3,
            strides=2 if imagenet else 1,
            train=train,
            dtype=self.dtype,
            conv_name="stem_conv",
            bn_name="stem_bn",
            act=nn.relu,
        )
        if imagenet:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(n_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                name = f"stage{i + 1}_block{j}"
                x = self.block(width, strides=strides, dtype=self.dtype, name=name)(x, train)
        return classifier_head(x, self.num_classes, dtype=self.dtype)


_STEMS = ("cifar", "imagenet")


def resnet18(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-18, CIFAR variant (11.17M parameters with 10 classes)."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, BasicBlock, dtype=dtype)


def resnet50(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-50, CIFAR variant (23.5M parameters with 10 classes)."""
    return ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes, Bottleneck, dtype=dtype)


def resnet18_imagenet(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-18, ImageNet form (11.69M parameters with 1000 classes, as published)."""
    blocks, widths = (2, 2, 2, 2), (64, 128, 256, 512)
    return ResNet(blocks, widths, num_classes, BasicBlock, stem="imagenet", dtype=dtype)


def resnet50_imagenet(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-50, ImageNet form (25.56M parameters with 1000 classes, as published)."""
    blocks, widths = (3, 4, 6, 3), (64, 128, 256, 512)
    return ResNet(blocks, widths, num_classes, Bottleneck, stem="imagenet", dtype=dtype)
