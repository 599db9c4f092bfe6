"""The device-resident data sets: files -> host uint8 arrays, loaded whole.

Images stay uint8 until the train step (a CIFAR split is 150 MB), so they live on the
device and training never waits on the host. Sources of `load(name)`:

- ``fashion_mnist``: the original gzipped IDX files (Debian package
  ``dataset-fashion-mnist``), checksum-verified; TFDS when they are not installed.
- ``cifar10_jpeg``: ``cifar10_jpeg_q75.npz`` (JPEG q75 re-encodings of CIFAR-10), decoded
  once with Pillow and cached as uint8 under ``data_dir``, keyed by the file's sha256.
- ``cifar10``, ``cifar100``, ``mnist``: TFDS array_record files via ``tfds.data_source``
  (no TensorFlow needed).
- ``synthetic``: random images made in memory (tests, smoke runs, benchmarks).

Image folders and other TFDS builds reach the device through `dnq_jax.data.stream`
(`Stream.materialize`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import tempfile
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dnq_jax.errors import DataError

# name -> (num_classes, image shape)
_SPECS: dict[str, tuple[int, tuple[int, int, int]]] = {
    "cifar10": (10, (32, 32, 3)),
    "cifar10_jpeg": (10, (32, 32, 3)),
    "cifar100": (100, (32, 32, 3)),
    "mnist": (10, (28, 28, 1)),
    "fashion_mnist": (10, (28, 28, 1)),
    "synthetic": (10, (16, 16, 3)),  # made in memory: tests, smoke runs, benchmarks
}
RESIDENT_NAMES: tuple[str, ...] = tuple(sorted(_SPECS))

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist  (as root)"
_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
# The Debian package repacked the upstream gzip files without their stored file names: same
# IDX bytes, different .gz digests. Both copies are accepted.
_IDX_SHA256_DEBIAN = {
    ("train", "images"): "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    ("train", "labels"): "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    ("test", "images"): "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    ("test", "labels"): "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_IDX_SHA256_UPSTREAM = {
    ("train", "images"): "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ("train", "labels"): "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ("test", "images"): "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ("test", "labels"): "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

CIFAR10_JPEG_FILE = "cifar10_jpeg_q75.npz"
CIFAR10_JPEG_SHA256 = "fdef8a4f8ffc8d30250e96c70293706a31eeb1af139bf284db10b42d65dca644"
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits as host uint8 images (N, H, W, C) and int32 labels (N,); `mean` and `std`
    are per-channel statistics of the train images in [0, 1] units, for `normalize`."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        for x, y in ((self.train_images, self.train_labels), (self.test_images, self.test_labels)):
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int32 or y.shape != x.shape[:1]:
                got = f"{x.dtype}{x.shape}, {y.dtype}{y.shape}"
                raise ValueError(f"images/labels must be uint8 (N,H,W,C)/int32 (N,), got {got}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.test_images.shape[0])


def load(
    name: str,
    *,
    data_dir: str | None = None,
    npz_path: str | None = None,
    tfds_data_dir: str | None = None,
    idx_dir: str | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    verify: bool = True,
    expected_sha256: str | Mapping[str, str] | None = None,
) -> Dataset:
    """Loads dataset `name` (one of `RESIDENT_NAMES`) into host uint8 arrays.

    Args:
      name: dataset name.
      data_dir: decoded cache for ``cifar10_jpeg`` (env ``DNQ_DATA_DIR``, else ./data_cache).
      npz_path: the ``cifar10_jpeg_q75.npz`` file (default env ``DNQ_CIFAR10_JPEG``, else
        ``../shared/data/`` next to the repository, then next to the working directory).
      tfds_data_dir: TFDS data directory (TFDS's own default when None).
      idx_dir: folder of the Fashion-MNIST IDX files (default env ``DNQ_FASHION_MNIST_DIR``,
        else the Debian location, falling back to TFDS only when that is absent).
      limit_train, limit_test: keep this many examples per split, a fixed seeded sample (the
        CIFAR file is sorted by class); only those JPEGs are decoded, no full cache is written.
      verify: check the sha256 of source files (switch off only for files you made).
      expected_sha256: digest(s) to check instead of the known ones: a hex string for
        ``cifar10_jpeg``, a mapping file name -> hex digest for ``fashion_mnist``.

    Raises:
      ValueError: unknown `name` or bad limits.
      DataError: missing files (with how to get them), wrong checksum or layout.
    """
    if name not in _SPECS:
        known = ", ".join(RESIDENT_NAMES)
        raise ValueError(f"unknown dataset name {name!r}; known: {known} (see data.NAMES)")
    for arg, limit in (("limit_train", limit_train), ("limit_test", limit_test)):
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {limit!r}")
    limits = {"train": limit_train, "test": limit_test}
    if name == "cifar10_jpeg":
        if expected_sha256 is not None and not isinstance(expected_sha256, str):
            raise ValueError("expected_sha256 must be a hex string for cifar10_jpeg")
        arrays = _load_cifar10_jpeg(npz_path, data_dir, limits, verify, expected_sha256)
    elif name == "synthetic":
        arrays = _synthetic(limits)
    elif name == "fashion_mnist":
        if expected_sha256 is not None and not isinstance(expected_sha256, Mapping):
            raise ValueError("expected_sha256 must map file name -> digest for fashion_mnist")
        arrays = _load_fashion_mnist(idx_dir, tfds_data_dir, limits, verify, expected_sha256)
    else:
        arrays = _load_tfds(name, tfds_data_dir, limits)
    num_classes, shape = _SPECS[name]
    for split in ("train", "test"):
        images, labels = arrays[split]
        if images.shape[1:] != shape:
            raise DataError(f"{name} {split}: expected images {shape}, got {images.shape[1:]}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"{name} {split}: labels outside [0, {num_classes})")
    mean, std = _channel_stats(arrays["train"][0])
    return Dataset(name, *arrays["train"], *arrays["test"], num_classes, mean, std)


def _synthetic(limits) -> dict:
    """A learnable 10-class task made from a fixed seed: class templates plus pixel noise."""
    rng = np.random.default_rng(1234)
    templates = rng.normal(size=(10, 16, 16, 3))
    out = {}
    for split, n, seed in (
        ("train", limits["train"] or 2048, 1),
        ("test", limits["test"] or 512, 2),
    ):
        r = np.random.default_rng(seed)
        labels = r.integers(0, 10, n).astype(np.int32)
        x = 128 + 50 * templates[labels] + 40 * r.normal(size=(n, 16, 16, 3))
        out[split] = (np.clip(x, 0, 255).astype(np.uint8), labels)
    return out


def subset(n: int, limit: int | None) -> np.ndarray:
    """Indices kept by a limit: seeded and sorted, so every call keeps the same examples."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


class ChannelSums:
    """Exact per-channel sums of uint8 images, chunk by chunk: the statistics `normalize`
    uses, the same whether the images arrive whole or in batches."""

    def __init__(self, channels: int) -> None:
        self.total = np.zeros(channels, np.uint64)
        self.total_sq = np.zeros(channels, np.uint64)
        self.count = 0

    def add(self, images: np.ndarray) -> None:
        c = self.total.shape[0]
        # Chunks of 2048: a float copy of a whole CIFAR split would cost 1.2 GB.
        for start in range(0, images.shape[0], 2048):
            chunk = images[start : start + 2048].reshape(-1, c)
            self.total += chunk.sum(axis=0, dtype=np.uint64)
            self.total_sq += np.square(chunk, dtype=np.uint32).sum(axis=0, dtype=np.uint64)
            self.count += chunk.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) in [0, 1] units, float32."""
        count = max(self.count, 1)
        mean = self.total / count
        var = np.maximum(self.total_sq / count - mean**2, 0.0)
        return (mean / 255).astype(np.float32), (np.sqrt(var) / 255).astype(np.float32)


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sums = ChannelSums(images.shape[-1])
    sums.add(images)
    return sums.result()


def _load_fashion_mnist(idx_dir, tfds_data_dir, limits, verify, expected):
    explicit = idx_dir or os.environ.get("DNQ_FASHION_MNIST_DIR")
    folder = Path(explicit or FASHION_MNIST_DIR)
    missing = [f for f in _IDX_FILES.values() if not (folder / f).is_file()]
    if missing and (explicit or len(missing) < len(_IDX_FILES)):
        # A folder the user named, or a half-installed package, must not silently switch source.
        raise DataError(f"Fashion-MNIST files {missing} not in {folder}; install: {_APT_HINT}")
    if missing:
        try:
            return _load_tfds("fashion_mnist", tfds_data_dir, limits)
        except DataError as err:
            msg = f"Fashion-MNIST: no IDX files in {folder} (install: {_APT_HINT}), and {err}"
            raise DataError(msg) from err
    out = {}
    for split in ("train", "test"):
        images = _read_idx(folder, (split, "images"), verify, expected)
        labels = _read_idx(folder, (split, "labels"), verify, expected)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{folder}: {split} has {len(images)} images, {len(labels)} labels")
        keep = subset(images.shape[0], limits[split])
        out[split] = (images[keep][..., None], labels[keep].astype(np.int32))
    return out


def _read_idx(folder: Path, part: tuple[str, str], verify: bool, expected) -> np.ndarray:
    """Reads one gzipped IDX file of unsigned bytes (magic 2051: images, 2049: labels)."""
    path = folder / _IDX_FILES[part]
    magic = 2051 if part[1] == "images" else 2049
    raw = path.read_bytes()
    if verify:
        digest = hashlib.sha256(raw).hexdigest()
        if expected is not None and path.name not in expected:
            raise ValueError(f"expected_sha256 has no digest for {path.name}")
        known = (_IDX_SHA256_DEBIAN[part], _IDX_SHA256_UPSTREAM[part])
        wanted = (expected[path.name].lower(),) if expected is not None else known
        if digest not in wanted:
            msg = f"sha256 {digest}, expected {' or '.join(wanted)}; reinstall: {_APT_HINT}"
            raise DataError(f"{path}: {msg}")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a valid gzip file ({err})") from err
    ndim = magic - 2048
    head = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found != magic or len(data) < head:
        raise DataError(f"{path}: expected IDX magic {magic}, found {found}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - head != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says shape {dims}, payload is {len(data) - head} B")
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


def _find_npz(npz_path: str | None) -> Path:
    explicit = npz_path or os.environ.get("DNQ_CIFAR10_JPEG")
    if explicit:
        candidates = [Path(explicit)]
    else:
        rel = Path("..", "shared", "data", CIFAR10_JPEG_FILE)
        candidates = [(_REPO_ROOT / rel).resolve(), (Path.cwd() / rel).resolve()]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(dict.fromkeys(str(p) for p in candidates))
    how = "pass npz_path= or set DNQ_CIFAR10_JPEG (layout: docs/data.md)"
    raise DataError(f"{CIFAR10_JPEG_FILE} not found; looked at: {looked}; {how}")


def _expected_npz_digest(path: Path, expected: str | None) -> str:
    if expected:
        return expected.lower()
    sidecar = path.with_suffix(".sha256")
    if sidecar.is_file():
        token = (sidecar.read_text().split() or [""])[0].lower()
        if len(token) != 64 or any(ch not in "0123456789abcdef" for ch in token):
            raise DataError(f"{sidecar}: no sha256 hex digest at the start of the file")
        return token
    return CIFAR10_JPEG_SHA256


def _load_cifar10_jpeg(npz_path, data_dir, limits, verify, expected):
    path = _find_npz(npz_path)
    raw = path.read_bytes()  # decode the very bytes that were verified, not a later re-read
    digest = hashlib.sha256(raw).hexdigest()
    if verify:
        wanted = _expected_npz_digest(path, expected)
        if digest != wanted:
            raise DataError(f"{path}: sha256 {digest}, expected {wanted}; corrupt or wrong file")
    cache = Path(data_dir or os.environ.get("DNQ_DATA_DIR") or "data_cache")
    cache_file = cache / f"cifar10_jpeg_{digest}.npz"
    full = _read_cache(cache_file)
    if full is not None:
        # The same seeded subset a direct decode keeps: limits give the same data either way.
        keep = {
            s: subset(len(y), limits[s]) if limits[s] else slice(None) for s, (_, y) in full.items()
        }
        return {s: (x[keep[s]], y[keep[s]]) for s, (x, y) in full.items()}
    out = {}
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        for split in ("train", "test"):
            blob, offsets, labels = _jpeg_layout(z, path, split)
            keep, where = subset(len(labels), limits[split]), f"{path} {split}"
            jpegs = (blob[offsets[i] : offsets[i + 1]] for i in keep)
            pairs = ((_decode_jpeg(b, f"{where} item {i}"), labels[i]) for i, b in zip(keep, jpegs))
            out[split] = _collect(keep, pairs, _SPECS["cifar10_jpeg"][1], where)
    if limits["train"] is None and limits["test"] is None:
        _write_cache(cache_file, out)
    return out


def _jpeg_layout(z, path: Path, split: str):
    keys = [f"{split}_jpeg", f"{split}_offsets", f"{split}_labels"]
    absent = [k for k in keys if k not in z.files]
    if absent:
        raise DataError(f"{path}: missing arrays {absent}; expected {keys} (found {z.files})")
    blob, offsets, labels = (z[k] for k in keys)
    n = labels.shape[0] if labels.ndim == 1 else -1
    ok = [blob.dtype == np.uint8, blob.ndim == 1, labels.dtype == np.uint8, n >= 0]
    ok += [offsets.shape == (n + 1,), np.issubdtype(offsets.dtype, np.integer)]
    if not all(ok):
        got = ", ".join(f"{k} {z[k].dtype}{z[k].shape}" for k in keys)
        raise DataError(f"{path}: expected uint8 (M,), int (N+1,), uint8 (N,); got {got}")
    if offsets[0] != 0 or offsets[-1] != blob.shape[0] or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{path}: {split}_offsets must rise from 0 to {blob.shape[0]}")
    return blob, offsets, labels


def _collect(keep: np.ndarray, pairs, shape: tuple, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Fills uint8 images and int32 labels from `pairs` of (image, label), one per `keep`."""
    images = np.empty((len(keep), *shape), np.uint8)
    labels = np.empty((len(keep),), np.int32)
    for row, (i, (image, label)) in enumerate(zip(keep, pairs)):
        if image.shape != shape or image.dtype != np.uint8:
            got = f"{image.dtype}{image.shape}"
            raise DataError(f"{where} item {i}: expected uint8 {shape}, got {got}")
        images[row], labels[row] = image, label
    return images, labels


def _decode_jpeg(data: np.ndarray, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{where} is not a readable JPEG ({err})") from err


def _read_cache(cache_file: Path):
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            out = {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in ("train", "test")}
        if any(
            x.dtype != np.uint8 or y.dtype != np.int32 or len(x) != len(y) for x, y in out.values()
        ):
            raise ValueError("wrong dtypes or lengths")
    except (OSError, KeyError, ValueError, zlib.error) as err:
        warnings.warn(f"ignoring unusable cache {cache_file}: {err}", stacklevel=3)
        return None
    return out


def _write_cache(cache_file: Path, arrays) -> None:
    # Temp file + os.replace in the same folder: a crash leaves a stray temp file, never a
    # truncated cache that a later run would trust.
    flat = {f"{s}_images": x for s, (x, _) in arrays.items()}
    flat.update({f"{s}_labels": y for s, (_, y) in arrays.items()})
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp_", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **flat)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must stay readable
            os.replace(tmp, cache_file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        warnings.warn(f"could not write cache {cache_file}: {err}", stacklevel=3)


def _load_tfds(name: str, tfds_data_dir: str | None, limits) -> dict:
    # Imported here: tensorflow_datasets is slow to import and only these datasets need it.
    import tensorflow_datasets as tfds

    out = {}
    for split in ("train", "test"):
        try:
            source = tfds.data_source(name, split=split, data_dir=tfds_data_dir, download=False)
        except Exception as err:  # tfds raises several unrelated types for "not prepared"
            where = f" --data_dir={tfds_data_dir}" if tfds_data_dir else ""
            how = f"build it once (needs internet): tfds build {name} --file_format=array_record"
            raise DataError(f"TFDS {name!r} ({split}) not available ({err}); {how}{where}") from err
        keep = subset(len(source), limits[split])
        pairs = ((np.asarray(r["image"]), r["label"]) for r in (source[int(i)] for i in keep))
        out[split] = _collect(keep, pairs, _SPECS[name][1], f"TFDS {name} {split}")
    return out
