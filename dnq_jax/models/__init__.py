"""The model zoo: plain Flax Linen image classifiers, chosen by name.

Every model maps a float NHWC batch of any spatial size and channel count to float32 logits,
``model.apply(variables, x, train=...)``, with BatchNorm statistics in ``batch_stats``. The
models know nothing of noise or quantization; those reach the layers from outside.

    model = create("resnet20", num_classes=10)
    model = create("mobilenet_v2", num_classes=100, width=0.5, dtype=jnp.bfloat16)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp

from dnq_jax.models.layers import Dtype, check_positive
from dnq_jax.models.mobilenet import MobileNetV1, MobileNetV2, mobilenet_v1, mobilenet_v2
from dnq_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet18_imagenet,
    resnet50,
    resnet50_imagenet,
)
from dnq_jax.models.resnet_cifar import cifar_resnet, resnet8, resnet20, resnet32, resnet56
from dnq_jax.models.vgg import VGG, vgg16_bn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet18_imagenet": resnet18_imagenet,
    "resnet50_imagenet": resnet50_imagenet,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v1": mobilenet_v1,
    "vgg16_bn": vgg16_bn,
}


def names() -> tuple[str, ...]:
    """Names accepted by :func:`create`."""
    return tuple(_REGISTRY)


def create(name: str, *, num_classes: int, dtype: Dtype = jnp.float32, **kwargs) -> nn.Module:
    """Build the model registered as ``name``.

    Args:
      name: one of :func:`names`.
      num_classes: size of the logits.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters are always float32.
      **kwargs: model options, e.g. ``width`` for ``mobilenet_v1``/``mobilenet_v2``.

    Raises:
      ValueError: for an unknown ``name``, an option the model does not take, or a bad value.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(names())}")
    check_positive("num_classes", num_classes, integer=True)
    factory = _REGISTRY[name]
    options = set(inspect.signature(factory).parameters) - {"num_classes", "dtype"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise ValueError(
            f"{name} takes no option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(sorted(options)) or 'none'}"
        )
    return factory(num_classes=num_classes, dtype=dtype, **kwargs)


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "MobileNetV1",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "cifar_resnet",
    "create",
    "mobilenet_v1",
    "mobilenet_v2",
    "names",
    "resnet18",
    "resnet18_imagenet",
    "resnet20",
    "resnet32",
    "resnet50",
    "resnet50_imagenet",
    "resnet56",
    "vgg16_bn",
]
