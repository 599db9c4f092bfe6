"""Random draws laid out flat.

`flat_draw(draw, key, shape, ...)` draws ``prod(shape)`` values over a 1-D shape and reshapes
them. With JAX's partitionable threefry (its default) the values are exactly those of the
same draw over `shape` (tests/test_prng.py checks it), but XLA:CPU compiles the flat draw
several times faster: for a (32, 16, 16, 16) Bernoulli mask ~0.3 s instead of ~3 s. The
noise transforms (`dnq_jax.dnq.noise`) and QDrop's drop masks (`dnq_jax.ptq`) draw this way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax


def flat_draw(draw: Callable, key: jax.Array, shape: Sequence[int], **kwargs) -> jax.Array:
    """``draw(key, shape=(prod(shape),), **kwargs).reshape(shape)``, for any of
    `jax.random`'s samplers that take a `shape` (bits, normal, uniform, bernoulli, ...)."""
    shape = tuple(int(d) for d in shape)
    return draw(key, shape=(math.prod(shape),), **kwargs).reshape(shape)
