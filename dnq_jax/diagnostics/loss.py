"""The loss of a fixed data set as a function of params: what sharpness is measured on.

Flatness measures (Hessian eigenvalue and trace, loss landscapes) take a ``loss_fn`` that
maps a params pytree to a scalar. Any such callable works. `make_loss_fn` builds one for a
Flax classifier in eval mode (BatchNorm running statistics fixed, so the loss is a function
of params alone) over any number of images: the data is split into equal chunks and the loss
is the sum of one jitted term per chunk. The measures use that structure: the Hessian of a
sum is the sum of the Hessians, so a Hessian-vector product over many images is a Python
loop of one compiled per-chunk product, never one program holding every chunk (slow to
compile) or a rolled loop around convolutions (slow on XLA:CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


@functools.partial(jax.jit, static_argnums=0)
def _term(fn: Callable[..., jax.Array], params: PyTree, *data: Any) -> jax.Array:
    return fn(params, *data)


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkedLoss:
    """A scalar loss over fixed data, ``sum(fn(params, *chunk) for chunk in chunks)``.

    Callable on params like any ``loss_fn``. `fn` is jitted with the chunk's arrays as
    arguments (one compile for all chunks of one shape), and is what the flatness measures
    differentiate.

    Attributes:
      fn: ``fn(params, *chunk) -> scalar``, one term of the sum.
      chunks: the data of each term, a tuple of argument tuples.
    """

    fn: Callable[..., jax.Array]
    chunks: tuple[tuple[Any, ...], ...]

    def __call__(self, params: PyTree) -> jax.Array:
        """The loss at `params` (a Python loop over jitted chunk terms)."""
        total = jnp.float32(0.0)
        for chunk in self.chunks:
            total = total + _term(self.fn, params, *chunk)
        return total


def as_chunked(loss_fn: Callable[[PyTree], jax.Array] | ChunkedLoss) -> ChunkedLoss:
    """`loss_fn` as a `ChunkedLoss` (a plain callable is one chunk without data).

    A plain callable is jitted as it is: arrays it closes over become constants of the
    compiled program, so close over small data only, or use `make_loss_fn`.
    """
    if isinstance(loss_fn, ChunkedLoss):
        return loss_fn
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a callable params -> scalar, got {type(loss_fn)}")
    return ChunkedLoss(fn=loss_fn, chunks=((),))


def _make_term(model: nn.Module, apply_kwargs: Mapping[str, Any], label_smoothing: float):
    def term(params, state, x, y, w):
        logits = model.apply({**state, "params": params}, x, **apply_kwargs)
        logits = logits.astype(jnp.float32)
        onehot = jax.nn.one_hot(y, logits.shape[-1])
        if label_smoothing:
            onehot = optax.smooth_labels(onehot, label_smoothing)
        return jnp.sum(optax.softmax_cross_entropy(logits, onehot) * w)

    return term


# The measures jit the term with the function itself as a static argument, so equal models
# (Linen modules compare by their fields) must get the very same function to share compiled
# programs: a grid of checkpoints of one architecture compiles each product once.
@functools.lru_cache(maxsize=32)
def _cached_term(model: nn.Module, apply_items: tuple, label_smoothing: float):
    return _make_term(model, dict(apply_items), label_smoothing)


def make_loss_fn(
    model: nn.Module,
    variables: PyTree,
    images: jax.Array,
    labels: jax.Array,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    label_smoothing: float = 0.0,
) -> ChunkedLoss:
    """Mean cross-entropy of `model` on fixed (images, labels), as a function of params.

    Args:
      model: a Flax classifier returning logits.
      variables: its variables; everything but ``'params'`` (e.g. ``'batch_stats'``) is
        held fixed.
      images: the images, batch first.
      labels: integer class ids, one per image.
      apply_kwargs: keyword arguments of every ``model.apply``; default ``{'train': False}``
        (BatchNorm in eval mode, so the loss depends on params only).
      batch_size: images per chunk (default all in one). The last chunk is padded with
        repeated images of zero weight, so every chunk has one shape (one compile).
      label_smoothing: as in training (0 gives the plain cross-entropy).

    Returns:
      A `ChunkedLoss`: ``loss_fn(params)`` is the mean loss over all images.

    Raises:
      ValueError: for empty images, labels that do not match them, or a bad batch_size.
    """
    n = int(images.shape[0])
    labels = np.asarray(labels)
    if n == 0:
        raise ValueError("images: the image set is empty")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integer class ids, got shape {labels.shape} dtype {labels.dtype}"
        )
    batch_size = n if batch_size is None else batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    batch_size = min(batch_size, n)
    apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    state = {k: v for k, v in variables.items() if k != "params"}

    try:
        term = _cached_term(model, tuple(sorted(apply_kwargs.items())), float(label_smoothing))
    except TypeError:  # an unhashable model or option: no sharing, same function
        term = _make_term(model, apply_kwargs, float(label_smoothing))

    chunks = []
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        idx = np.arange(start, start + batch_size) % n
        # Weight 1/n per real image, 0 per filler: the chunk terms sum to the mean.
        w = np.where(np.arange(batch_size) < real, 1.0 / n, 0.0).astype(np.float32)
        chunks.append((state, jnp.asarray(images[idx]), jnp.asarray(labels[idx]), jnp.asarray(w)))
    return ChunkedLoss(fn=term, chunks=tuple(chunks))
