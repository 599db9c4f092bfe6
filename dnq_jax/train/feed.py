"""Where each step's batch comes from: arrays on the devices, or the stream (docs/data.md).

Both feeds give the loop the same thing, `epoch(key, epoch, first, chunk)`: (steps, the
chunk function's data arguments) per chunk of the epoch from step `first` on, the order
`data.epoch_indices(key, ...)` of the epoch's shuffle key, and `test_accuracy`. The train
step is the same on both; only the data arguments differ.

- `DeviceFeed`: the whole set on every device; the chunk gathers its batches there from the
  epoch's indices (computed on the devices).
- `StreamFeed`: each process computes the same indices on its CPU, reads its rows of each
  global batch through the stream's Grain pipeline, and assembles global arrays with
  `jax.make_array_from_process_local_data`, two chunks ahead of the one running. A resumed
  run restarts the pipeline at the step in the checkpoint, which is the iterator's whole
  position: the order and every crop are pure functions of (seed, epoch, step, row).
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dnq_jax import data
from dnq_jax.errors import ConfigError
from dnq_jax.train import builders, hosts

PREFETCH = 2  # chunks on their way to the devices while one runs


def make_feed(c: ml_collections.ConfigDict, ds, mesh: Mesh, sh: dict, spe: int):
    """The feed of `ds`: a `StreamFeed` for a `data.Stream`, else a `DeviceFeed`."""
    kind = StreamFeed if isinstance(ds, data.Stream) else DeviceFeed
    return kind(c, ds, mesh, sh, spe)


class DeviceFeed:
    """The device-resident path: uint8 images replicated on every device (module docstring)."""

    streamed = False

    def __init__(self, c, ds: data.Dataset, mesh: Mesh, sh: dict, spe: int) -> None:
        self.spe = spe
        self.images = builders.put(ds.train_images, sh["data"])
        self.labels = builders.put(ds.train_labels.astype(np.int32), sh["data"])
        self._indices = jax.jit(
            lambda key: data.epoch_indices(key, ds.num_train, c.optim.batch_size)[:spe],
            out_shardings=sh["idx"],
        )
        # Kept on device: the per-epoch evaluation moves no images from the host.
        test = builders.put(ds.test_images, sh["replicated"])
        self.test_images = data.normalize(test, ds.mean, ds.std)
        self.test_labels = ds.test_labels

    def epoch(self, key: jax.Array, epoch: int, first: int, chunk: int):
        idx = self._indices(key)
        for a in range(first, self.spe, chunk):
            b = min(a + chunk, self.spe)
            yield b - a, (self.images, self.labels, idx[a:b])

    def test_accuracy(self, accuracy, variables) -> float:
        return accuracy(variables, self.test_images, self.test_labels)


class StreamFeed:
    """The streamed path: each process reads its rows of each global batch (module
    docstring)."""

    streamed = True

    def __init__(self, c, ds: data.Stream, mesh: Mesh, sh: dict, spe: int) -> None:
        self.ds, self.spe, self.seed = ds, spe, int(c.seed)
        self.batch = c.optim.batch_size
        self.sharding = sh["idx"]  # (chunk, batch, ...): the batch split over 'data'
        self.lo, self.hi = _local_rows(self.sharding, (1, self.batch), 1)
        # Evaluation batches: eval.batch_size rounded up to a multiple of the devices, the
        # last padded (label -1, not counted).
        self.eval_batch = math.ceil(c.eval.batch_size / mesh.size) * mesh.size
        self.eval_sharding = NamedSharding(mesh, P("data"))
        self.eval_lo, self.eval_hi = _local_rows(self.eval_sharding, (self.eval_batch,), 0)
        left = ds.num_train - spe * self.batch
        hosts.log(
            f"dnq_jax: stream: {spe} steps of {self.batch} images an epoch, each of "
            f"{jax.process_count()} process(es) reading {self.hi - self.lo} of every batch; "
            f"{left:,} of the {ds.num_train:,} training images are left out of each epoch's "
            "order (a different set each epoch, as on the device path); the test split in "
            f"batches of {self.eval_batch}, the last padded"
        )

    def epoch(self, key: jax.Array, epoch: int, first: int, chunk: int):
        order = self._order(key)
        host = self.ds.batches(
            "train",
            order[first:, self.lo : self.hi],
            seed=(self.seed, epoch),
            first_step=first,
            first_row=self.lo,
        )
        sizes = [min(a + chunk, self.spe) - a for a in range(first, self.spe, chunk)]
        placed = (self._place(host, k) for k in sizes)
        return _ahead(zip(sizes, placed), PREFETCH, close=getattr(host, "close", None))

    def test_accuracy(self, accuracy, variables) -> float:
        return accuracy(variables, self._test_batches())

    def _order(self, key: jax.Array) -> np.ndarray:
        """The epoch's (steps, batch) indices, computed on this host's CPU: the device
        path's function of the same key."""
        raw = np.asarray(jax.random.key_data(key).addressable_data(0))
        cpu = jax.local_devices(backend="cpu")[0]
        with jax.default_device(cpu):
            k = jax.random.wrap_key_data(jnp.asarray(raw))
            return np.asarray(data.epoch_indices(k, self.ds.num_train, self.batch)[: self.spe])

    def _place(self, host, k: int):
        """The next `k` host batches as one global (k, batch, ...) chunk of images and
        labels."""
        parts = [next(host) for _ in range(k)]
        images = np.stack([x for x, _ in parts])
        labels = np.stack([y for _, y in parts])
        glob = lambda a: jax.make_array_from_process_local_data(
            self.sharding, a, (k, self.batch, *a.shape[2:])
        )
        return glob(images), glob(labels)

    def _test_batches(self):
        n, e = self.ds.num_test, self.eval_batch
        rows = np.arange(-(-n // e) * e)
        rows[rows >= n] = -1
        rows = rows.reshape(-1, e)[:, self.eval_lo : self.eval_hi]
        for images, labels in self.ds.batches("test", rows):
            glob = lambda a: jax.make_array_from_process_local_data(
                self.eval_sharding, a, (e, *a.shape[1:])
            )
            yield data.normalize(glob(images), self.ds.mean, self.ds.std), glob(labels)


def _local_rows(sharding: NamedSharding, shape: tuple, dim: int) -> tuple[int, int]:
    """The rows [lo, hi) of dimension `dim` of a global array of `shape` that this
    process's devices hold: one contiguous block, which is what its pipeline reads."""
    spans = {
        (idx[dim].start or 0, shape[dim] if idx[dim].stop is None else idx[dim].stop)
        for idx in sharding.addressable_devices_indices_map(shape).values()
    }
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != hi - lo:
        raise ConfigError(
            f"this process's devices hold rows {sorted(spans)} of each batch, not one block; "
            "the stream needs each process's devices next to each other in the mesh"
        )
    return lo, hi


def _ahead(items, size: int, close=None):
    """`items`, kept `size` ahead of the consumer (each placed chunk starts its transfer to
    the devices when made); `close` runs when the consumer stops."""
    queue = collections.deque()
    try:
        for item in items:
            queue.append(item)
            if len(queue) > size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        if close is not None:
            close()
