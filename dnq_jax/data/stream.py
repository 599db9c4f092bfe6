"""A data set read from its files as it is needed: the stream (Grain), per host.

`open_stream` opens an image folder or a TFDS ArrayRecord build without reading its images.
`Stream.batches(split, rows)` is the input pipeline: a Grain `MapDataset` over the example
indices `rows` (one row per batch), each example read, decoded and transformed
(`dnq_jax.data.images`) on `workers` worker processes (0: threads of this process), batches
stacked, in order. The trainer gives each process only its part of each global batch, so a
process reads only its shard, and assembles the global arrays itself
(`dnq_jax.train.feed`).

The order is the caller's (the trainer: `epoch_indices` of the seed and the epoch, as on the
device path); the training crops come from numpy Generators seeded with (seed, epoch, step,
row of the global batch). So a batch is a pure function of where it sits in the run: the
same for any number of processes or workers, and the same after a resume, which starts the
pipeline at the step the checkpoint holds.

A `Stream` stands where a `Dataset` does: `train_images[idx]`, `test_labels[idx]`, ... read
just those examples (unaugmented: the evaluation transform); `materialize()` reads it whole
into a `Dataset` (the device path for an image folder).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from dnq_jax.data import folder, images, names, records
from dnq_jax.data.resident import ChannelSums, Dataset, subset
from dnq_jax.errors import DataError

# The normalisation statistics: exact over the training images when there are at most
# STATS_ALL of them (all the small sets: the device path's own figures), else over a fixed
# seeded sample of STATS_SAMPLE; ImageNet's are the conventional ones.
STATS_ALL, STATS_SAMPLE = 60_000, 10_000
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
DEFAULT_SIZE = 224  # sets of varied image sizes (folders, ImageNet) without data.image_size


@dataclasses.dataclass(frozen=True)
class _Examples:
    """Grain's source: flat position j -> one transformed example of `rows` (j // b, j % b).
    Row entries of -1 are padding: a zero image labelled -1."""

    source: object  # FolderSplit | RecordSplit
    keep: np.ndarray  # example index -> index in `source` (the data.limit_* sample)
    rows: np.ndarray  # (batches, b) example indices
    shape: tuple[int, int, int]
    recipe: str
    seed: tuple[int, ...] | None  # None: the evaluation transform
    first_step: int
    first_row: int

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, j: int) -> dict:
        s, r = divmod(int(j), self.rows.shape[1])
        i = int(self.rows[s, r])
        if i < 0:
            return {"image": np.zeros(self.shape, np.uint8), "label": np.int32(-1)}
        raw, label, where = self.source[int(self.keep[i])]
        rng = None
        if self.seed is not None:
            rng = np.random.default_rng((*self.seed, self.first_step + s, self.first_row + r))
        size, _, channels = self.shape
        image = images.transform(
            raw, where, size=size, channels=channels, recipe=self.recipe, rng=rng
        )
        return {"image": image, "label": np.int32(label)}


class _View:
    """`stream.train_images[idx]` and kin: reads just the examples asked for."""

    def __init__(self, stream: Stream, split: str, labels: bool = False) -> None:
        self._stream, self._split, self._labels = stream, split, labels
        n = len(stream.keep[split])
        self.shape = (n,) if labels else (n, *stream.image_shape)
        self.dtype = np.dtype(np.int32 if labels else np.uint8)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        """As numpy indexes the first axis: an int, a slice, integer arrays (negative ones
        from the end) or a boolean mask of every example."""
        n = self.shape[0]
        if isinstance(idx, slice):
            idx = np.arange(n)[idx]
        idx = np.asarray(idx)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean index of these {n} examples has shape ({n},)")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"a stream's examples are indexed by integers, not {idx.dtype}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} examples")
        flat = np.where(idx < 0, idx + n, idx).astype(np.int64).reshape(-1)
        if self._labels:
            out = self._stream.labels(self._split, flat)
        else:
            out = self._stream.read(self._split, flat)[0]
        return out.reshape(idx.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[np.arange(self.shape[0])]
        return out if dtype is None else out.astype(dtype)


class Stream:
    """An image folder or a TFDS ArrayRecord build read as it is needed (module docstring).

    Holds what a `Dataset` holds but the images: name, num_classes, image_shape, num_train,
    num_test, mean, std (computed on first use), and views `train_images`, `train_labels`,
    `test_images`, `test_labels` that read what they are indexed with.
    """

    def __init__(self, name, num_classes, image_shape, recipe, sources, keep, workers, where):
        self.name, self.num_classes, self.image_shape = name, num_classes, tuple(image_shape)
        self.recipe, self.sources, self.keep, self.workers = recipe, sources, keep, workers
        self.where = where  # the folder or the build, for messages
        self._stats = None
        self.train_images, self.train_labels = _View(self, "train"), _View(self, "train", True)
        self.test_images, self.test_labels = _View(self, "test"), _View(self, "test", True)

    @property
    def num_train(self) -> int:
        return len(self.keep["train"])

    @property
    def num_test(self) -> int:
        return len(self.keep["test"])

    @property
    def mean(self) -> np.ndarray:
        return self.stats()[0]

    @property
    def std(self) -> np.ndarray:
        return self.stats()[1]

    def device_bytes(self) -> int:
        """What the device path would hold on each device: the training images as uint8 and
        the test images normalised as float32."""
        return int(np.prod(self.image_shape)) * (self.num_train + 4 * self.num_test)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per channel of the training images in [0, 1] units (`STATS_ALL`)."""
        if self._stats is None:
            if names.tfds_builder(self.name).split("/")[0] == "imagenet2012":
                self._stats = (IMAGENET_MEAN, IMAGENET_STD)
            else:
                sums = ChannelSums(self.image_shape[-1])
                rows = _rows(stats_indices(self.num_train), 256)
                for batch, labels in self.batches("train", rows):
                    sums.add(batch[labels >= 0])
                self._stats = sums.result()
        return self._stats

    def labels(self, split: str, indices: np.ndarray) -> np.ndarray:
        source, keep = self.sources[split], self.keep[split]
        if isinstance(source, folder.FolderSplit):
            return source.labels[keep[indices]].astype(np.int32)
        return np.array([source[int(keep[i])][1] for i in indices], np.int32)

    def read(self, split: str, indices, threads: int | None = None):
        """(uint8 images, int32 labels) of the examples `indices` of `split`, unaugmented,
        read by threads of this process."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        examples = self._examples(split, indices[None, :])
        threads = threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            items = list(pool.map(examples.__getitem__, range(len(indices))))
        h, w, c = self.image_shape
        xs = np.stack([e["image"] for e in items]) if items else np.zeros((0, h, w, c), np.uint8)
        return xs, np.array([e["label"] for e in items], np.int32)

    def batches(self, split: str, rows, *, seed=None, first_step: int = 0, first_row: int = 0):
        """Iterator of (uint8 images (b, H, W, C), int32 labels (b,)), one per row of `rows`
        (example indices of `split`; -1: padding). `seed` (ints, e.g. (seed, epoch)): the
        training transform seeded per (step, row) counted from `first_step`, `first_row`;
        None: the evaluation transform."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 2:
            raise ValueError(f"rows must be (batches, batch), got shape {rows.shape}")
        if rows.size == 0:
            return iter(())
        examples = self._examples(split, rows, seed, first_step, first_row)
        return _pipeline(examples, rows.shape[1], self.workers)

    def materialize(self) -> Dataset:
        """The whole set in host memory, as the device path holds it."""
        arrays = {}
        for split in ("train", "test"):
            n = len(self.keep[split])
            x = np.empty((n, *self.image_shape), np.uint8)
            y = np.empty((n,), np.int32)
            start = 0
            for batch, labels in self.batches(split, _rows(np.arange(n), 256)):
                stop = start + int((labels >= 0).sum())
                x[start:stop], y[start:stop] = batch[: stop - start], labels[: stop - start]
                start = stop
            arrays[split] = (x, y)
        if self._stats is None and self.num_train <= STATS_ALL:
            sums = ChannelSums(self.image_shape[-1])
            sums.add(arrays["train"][0])
            self._stats = sums.result()
        splits = (*arrays["train"], *arrays["test"])
        return Dataset(self.name, *splits, self.num_classes, *self.stats())

    def _examples(self, split, rows, seed=None, first_step=0, first_row=0) -> _Examples:
        if split not in self.sources:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        seed = None if seed is None else tuple(int(s) for s in seed)
        return _Examples(
            self.sources[split], self.keep[split], rows, self.image_shape, self.recipe, seed,
            first_step, first_row,
        )  # fmt: skip


def stats_indices(num_train: int) -> np.ndarray:
    """The training examples the normalisation statistics are taken over (`STATS_ALL`)."""
    return np.arange(num_train) if num_train <= STATS_ALL else subset(num_train, STATS_SAMPLE)


def open_stream(
    name: str,
    *,
    image_folder: str = "",
    tfds_data_dir: str | None = None,
    image_size: int = 0,
    augment: str = "auto",
    val_split: float = 0.1,
    limit_train: int | None = None,
    limit_test: int | None = None,
    workers: int = 0,
    check_share: tuple[int, int] = (0, 1),
) -> Stream:
    """The stream of `name` (``folder``, a TFDS name, ``tfds:BUILDER``); nothing decoded.

    An image folder's files are listed and their headers read (each process its
    `check_share`: (index, count)), so a bad file stops the run before it starts.
    """
    names.check(name)
    if not names.streams(name):
        raise DataError(f"{name} is read whole from its files; it has no streaming form")
    if name == "folder":
        if not image_folder:
            raise DataError("data.name=folder needs runtime.image_folder: the folder to read")
        classes, sources = folder.scan(image_folder, val_split)
        for split in sources.values():
            folder.check_headers(split, check_share)
        num_classes, shape, where = len(classes), (None, None, 3), image_folder
    else:
        build = records.open_build(names.tfds_builder(name), tfds_data_dir)
        sources = {s: build[s] for s in ("train", "test")}
        num_classes, shape = build["num_classes"], build["shape"]
        where = f"TFDS {names.tfds_builder(name)}"
    channels = shape[2] or 3
    size = image_size or (shape[0] if shape[0] and shape[0] == shape[1] else DEFAULT_SIZE)
    keep = {
        split: subset(len(sources[split]), limit)
        for split, limit in (("train", limit_train), ("test", limit_test))
    }
    recipe = names.recipe(name, augment)
    return Stream(name, num_classes, (size, size, channels), recipe, sources, keep, workers, where)


def _rows(indices: np.ndarray, batch: int) -> np.ndarray:
    """`indices` in rows of `batch`, the last padded with -1."""
    n = len(indices)
    padded = np.full(-(-n // batch) * batch, -1, np.int64)
    padded[:n] = indices
    return padded.reshape(-1, batch)


def _pipeline(examples: _Examples, batch: int, workers: int):
    """Grain: examples -> batches, made on `workers` processes (0: two threads here)."""
    import grain

    ds = grain.MapDataset.source(examples).batch(batch)
    threads = 1 if workers else 2
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2))
    if workers:
        _flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
        it = it.mp_prefetch(options, worker_init_fn=_worker_ignores_signals)
    return _batches(iter(it))


def _batches(it):
    try:
        for b in it:
            yield b["image"], b["label"]
    finally:
        if hasattr(it, "close"):
            it.close()  # the worker processes stop with it


def _worker_ignores_signals(index: int, count: int) -> None:
    """SIGTERM/SIGINT sent to the whole process group (a cluster's preemption, Ctrl-C) are the
    trainer's to handle: it finishes its chunk, saves, and closes the workers itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _flags_parsed() -> None:
    """Grain's worker processes read absl flags: a program that has not parsed any (a test,
    a notebook) takes the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
