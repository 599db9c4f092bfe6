"""VGG with BatchNorm (Simonyan & Zisserman 2015; BN as in Ioffe & Szegedy) for CIFAR.

The common CIFAR variant: the 13 conv layers of VGG-16, each conv -> BN -> ReLU, five 2x2
max-pools, and a single Dense 512 -> classes in place of the ImageNet net's three
fully connected layers (14.7M parameters with 10 classes). The pools pad ('SAME') so odd
feature maps such as 7x7 from a 28x28 input are not cut, and the head pools globally; on
32x32 inputs the last feature map is already 1x1, where global pooling equals flattening.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dnq_jax.models.layers import Dtype, check_images, check_positive, classifier_head, conv_bn

POOL = "M"
# Output channels of each 3x3 conv, "M" for a 2x2 stride-2 max-pool (configuration D).
VGG16_LAYERS = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL) + (512, 512, 512, POOL) * 2


class VGG(nn.Module):
    """A plain stack of 3x3 conv -> BN -> ReLU layers and max-pools, then a Dense head.

    Attributes:
      layers: output channels of each conv in order, with ``"M"`` marking a max-pool.
      num_classes: size of the logits.
      dtype: compute dtype; parameters stay float32 and logits are returned in float32.

    Layer paths read ``conv1``, ``bn1``, ..., ``conv13``, ``bn13``, ``head``.
    """

    layers: Sequence[int | str]
    num_classes: int
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        for item in self.layers:
            if item != POOL:
                check_positive("layers", item, integer=True)
        check_positive("num_classes", self.num_classes, integer=True)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits (float32) for an NHWC image batch of any size and channel count."""
        check_images(x)
        index = 0
        for item in self.layers:
            if item == POOL:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                continue
            index += 1
            x = conv_bn(
                x,
                item,
                3,
                train=train,
                dtype=self.dtype,
                conv_name=f"conv{index}",
                bn_name=f"bn{index}",
                act=nn.relu,
            )
        return classifier_head(x, self.num_classes, dtype=self.dtype)


def vgg16_bn(*, num_classes: int, dtype: Dtype = jnp.float32) -> VGG:
    """VGG-16 with BatchNorm, CIFAR head (a single Dense 512 -> classes)."""
    return VGG(VGG16_LAYERS, num_classes, dtype=dtype)
