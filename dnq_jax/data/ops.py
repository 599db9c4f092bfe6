"""Pure functions of PRNG keys for the device: normalise, augment, the epoch's order.

`augment`, `normalize` and `epoch_indices` are meant to run inside the jitted step (or, for
the stream's order, on the host's CPU device: the same function, the same key, the same
order). Shuffling convention: epoch ``e`` draws its order from
``jax.random.fold_in(data_key, e)``, so a resumed run replays exactly the order it would have
seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def normalize(images_uint8: jax.Array, mean, std, dtype=jnp.float32) -> jax.Array:
    """Maps uint8 images to ``(x / 255 - mean) / std`` per channel, computed in float32."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    if mean.shape != std.shape or mean.shape not in ((), images_uint8.shape[-1:]):
        msg = f"{images_uint8.shape[-1]} channels of images_uint8"
        raise ValueError(f"mean/std shapes {mean.shape}/{std.shape} do not match the {msg}")
    x = images_uint8.astype(jnp.float32) / 255.0
    return ((x - mean) / std).astype(dtype)


def augment(
    key: jax.Array, images_uint8: jax.Array, *, pad: int = 4, flip: bool = True
) -> jax.Array:
    """Random crop after `pad`-pixel zero padding, then random horizontal flip, per image.

    Vectorised over the batch (one padded copy, one batched slice), so it is cheap inside a
    jitted train step. `pad` and `flip` are static. ``pad=0, flip=False`` returns the input.
    """
    if images_uint8.ndim != 4:
        raise ValueError(f"images_uint8 must be (B, H, W, C), got shape {images_uint8.shape}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    b, h, w, c = images_uint8.shape
    crop_key, flip_key = jax.random.split(key)
    out = images_uint8
    if pad:
        padded = jnp.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        corners = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
        crop = lambda img, yx: jax.lax.dynamic_slice(img, (yx[0], yx[1], 0), (h, w, c))
        out = jax.vmap(crop)(padded, corners)
    if flip:
        mirror = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        out = jnp.where(mirror, out[:, :, ::-1, :], out)
    return out


def epoch_indices(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Shuffled example indices for one epoch, int32 (steps, batch_size), remainder dropped.

    Use ``key = jax.random.fold_in(data_key, epoch)`` so each epoch's order depends only on
    the seed and the epoch number.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be an int in [1, {num_examples}], got {batch_size!r}")
    steps = num_examples // batch_size
    order = jax.random.permutation(key, num_examples)[: steps * batch_size]
    return order.reshape(steps, batch_size).astype(jnp.int32)


def calibration_subset(ds, n: int, seed: int) -> np.ndarray:
    """`n` distinct training images (uint8, unaugmented) drawn by a numpy RNG seeded `seed`.

    `ds`: a `Dataset`, or a `Stream`, which reads just those images (the same indices, so
    the same images when both hold the same data).
    """
    if not isinstance(n, int) or not 1 <= n <= ds.num_train:
        raise ValueError(f"n must be an int in [1, {ds.num_train}], got {n!r}")
    idx = np.random.default_rng(seed).choice(ds.num_train, size=n, replace=False)
    return np.asarray(ds.train_images[idx])
