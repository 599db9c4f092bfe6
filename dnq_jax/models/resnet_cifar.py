"""CIFAR ResNet-20/32/56 (He et al. 2016, section 4.2): 6n+2 layers, 16/32/64 channels.

Three stages of n basic blocks on 32x32, 16x16 and 8x8 feature maps (for 32x32 inputs); the
first block of stages 2 and 3 has stride 2. The paper's CIFAR nets used the parameter-free
option A shortcut (strided identity, zero-padded channels). Here the two shape-changing
shortcuts are 1x1 conv + BN projections (option B) instead: they add 2,752 parameters (about
1% of ResNet-20) and make every shortcut a conv -> BN pair, like the rest of the zoo, which
is what BN folding and per-layer quantization expect. Parameter counts with 10 classes
(published, option A -> here): ResNet-20 0.270M -> 0.272M, ResNet-32 0.464M -> 0.467M,
ResNet-56 0.853M -> 0.856M.
"""

from __future__ import annotations

import jax.numpy as jnp

from dnq_jax.models.layers import Dtype
from dnq_jax.models.resnet import BasicBlock, ResNet

CIFAR_WIDTHS = (16, 32, 64)


def cifar_resnet(depth: int, *, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """CIFAR ResNet with ``depth = 6n + 2`` layers (n basic blocks per stage).

    Raises:
      ValueError: if ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 for some n >= 1 (20, 32, 56, ...), got {depth!r}")
    n = (depth - 2) // 6
    return ResNet(
        stage_sizes=(n,) * len(CIFAR_WIDTHS),
        widths=CIFAR_WIDTHS,
        num_classes=num_classes,
        block=BasicBlock,
        stem_width=CIFAR_WIDTHS[0],
        dtype=dtype,
    )


def resnet8(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-8: 1 block per stage (78k parameters); for demos, smoke runs and tests."""
    return cifar_resnet(8, num_classes=num_classes, dtype=dtype)


def resnet20(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-20: 3 blocks per stage."""
    return cifar_resnet(20, num_classes=num_classes, dtype=dtype)


def resnet32(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-32: 5 blocks per stage."""
    return cifar_resnet(32, num_classes=num_classes, dtype=dtype)


def resnet56(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
    """ResNet-56: 9 blocks per stage."""
    return cifar_resnet(56, num_classes=num_classes, dtype=dtype)
