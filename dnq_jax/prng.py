"""Random draws laid out flat.

`flat_draw(draw, key, shape, ...)` draws ``prod(shape)`` values over a 1-D shape and reshapes
them. With JAX's partitionable threefry (its default) the values are exactly those of the
same draw over `shape` (tests/test_prng.py checks it), but XLA:CPU compiles the flat draw
several times faster: for a (32, 16, 16, 16) Bernoulli mask ~0.3 s instead of ~3 s. The
noise transforms (`dnq_jax.dnq.noise`) and QDrop's drop masks (`dnq_jax.ptq`) draw this way.

`fair_coins(key, shape)` draws independent Bernoulli(1/2) values 32 to a random word (bit j
of word i is element 32 i + j of the flat array): a thirty-second of the threefry work of a
Bernoulli draw, which spends a word per element. `bernoulli(key, shape, p)` takes it at
p = 1/2 (QDrop's drop rate) and the flat Bernoulli draw at any other rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def flat_draw(draw: Callable, key: jax.Array, shape: Sequence[int], **kwargs) -> jax.Array:
    """``draw(key, shape=(prod(shape),), **kwargs).reshape(shape)``, for any of
    `jax.random`'s samplers that take a `shape` (bits, normal, uniform, bernoulli, ...)."""
    shape = tuple(int(d) for d in shape)
    return draw(key, shape=(math.prod(shape),), **kwargs).reshape(shape)


def fair_coins(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A boolean array of `shape`, its elements independent and each True with probability
    1/2: ``ceil(n / 32)`` random 32-bit words (``jax.random.bits``), element ``32 i + j`` of
    the flat array bit ``j`` (least significant first) of word ``i``."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    words = jax.random.bits(key, (-(-n // 32),), dtype=jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(-1)[:n].astype(bool).reshape(shape)


def bernoulli(key: jax.Array, shape: Sequence[int], p: float) -> jax.Array:
    """A boolean array of `shape`, each element True with probability `p` (a Python float):
    `fair_coins` at 1/2, else a flat ``jax.random.bernoulli`` draw."""
    if p == 0.5:
        return fair_coins(key, shape)
    return flat_draw(jax.random.bernoulli, key, shape, p=p)
