"""Tests for dnq_jax.data: loaders on tiny files in the real formats, and the device pipeline
(the stream: tests/test_stream.py)."""

import gzip
import hashlib
import io
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dnq_jax import data

IDX_NAMES = {
    ("train", 2051): "train-images-idx3-ubyte.gz",
    ("train", 2049): "train-labels-idx1-ubyte.gz",
    ("test", 2051): "t10k-images-idx3-ubyte.gz",
    ("test", 2049): "t10k-labels-idx1-ubyte.gz",
}
REAL_NPZ = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10_jpeg_q75.npz"


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch):
    for var in ("DNQ_FASHION_MNIST_DIR", "DNQ_CIFAR10_JPEG", "DNQ_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def make_idx_dir(folder: Path, n_train: int = 12, n_test: int = 6):
    """Writes the four Fashion-MNIST IDX files; returns their digests and the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        arrays[split] = (rng.integers(0, 256, (n, 28, 28), np.uint8), np.arange(n) % 10)
        for magic, array in zip((2051, 2049), arrays[split]):
            (folder / IDX_NAMES[split, magic]).write_bytes(idx_bytes(array, magic))
    return {f.name: sha256(f) for f in folder.iterdir()}, arrays


def smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Low-frequency colour images, so JPEG q90 keeps them within a few grey levels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 200, (n, 1, 1, 3))
    slope = rng.uniform(-40, 40, (n, 1, 1, 3))
    return np.clip(base + slope * (yy + xx)[None, :, :, None], 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_npz(path: Path, n_train: int = 20, n_test: int = 8, seed: int = 0, **override):
    """Writes a small npz in the cifar10_jpeg layout; returns (digest, {split: arrays})."""
    arrays, contents = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = smooth_images(n, seed + len(split))
        blobs = [jpeg(im) for im in images]
        labels = np.sort(np.arange(n) % 10).astype(np.uint8)  # class-sorted like the real file
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = labels
        contents[split] = (images, labels)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return sha256(path), contents


# ------------------------------------------------------------------- Fashion-MNIST (IDX)


def test_fashion_mnist_from_idx_files(tmp_path):
    digests, arrays = make_idx_dir(tmp_path / "fm")
    ds = data.load("fashion_mnist", idx_dir=str(tmp_path / "fm"), expected_sha256=digests)
    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert (ds.num_train, ds.num_test, ds.image_shape) == (12, 6, (28, 28, 1))
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(ds.test_labels, arrays["test"][1])
    pixels = arrays["train"][0] / 255.0
    np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-5)
    np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-5)


def test_fashion_mnist_env_dir_and_limits(tmp_path, monkeypatch):
    make_idx_dir(tmp_path / "fm", n_train=30)
    monkeypatch.setenv("DNQ_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    a = data.load("fashion_mnist", verify=False, limit_train=7, limit_test=100)
    b = data.load("fashion_mnist", verify=False, limit_train=7)
    assert (a.num_train, a.num_test) == (7, 6)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert len(np.unique(a.train_labels)) > 1, "a limit must sample, not take the first rows"


def test_fashion_mnist_known_digests_refuse_other_files(tmp_path):
    make_idx_dir(tmp_path)
    with pytest.raises(data.DataError, match="sha256") as err:
        data.load("fashion_mnist", idx_dir=str(tmp_path))
    assert "dataset-fashion-mnist" in str(err.value)


def test_fashion_mnist_flipped_byte_refused(tmp_path):
    digests, _ = make_idx_dir(tmp_path)
    target = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[-5] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", idx_dir=str(tmp_path), expected_sha256=digests)
    message = str(err.value)
    assert target.name in message and digests[target.name] in message and sha256(target) in message


def test_fashion_mnist_bad_header_refused(tmp_path):
    make_idx_dir(tmp_path)
    # labels stored under the image magic; then images whose header overstates the count
    (tmp_path / IDX_NAMES["train", 2049]).write_bytes(idx_bytes(np.zeros(12), 2051))
    with pytest.raises(data.DataError, match="magic 2049"):
        data.load("fashion_mnist", idx_dir=str(tmp_path), verify=False)
    make_idx_dir(tmp_path)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (9, 28, 28))
    short = gzip.compress(header + bytes(5 * 28 * 28))
    (tmp_path / IDX_NAMES["test", 2051]).write_bytes(short)
    with pytest.raises(data.DataError, match=r"\(9, 28, 28\)"):
        data.load("fashion_mnist", idx_dir=str(tmp_path), verify=False)


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", idx_dir=str(tmp_path / "absent"))
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert str(tmp_path / "absent") in str(err.value)


# ------------------------------------------------------------------------ CIFAR-10 JPEG


def test_cifar10_jpeg_decodes_and_caches(tmp_path, monkeypatch):
    npz = tmp_path / "c.npz"
    digest, contents = make_npz(npz)
    cache = tmp_path / "cache"
    ds = data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(cache), expected_sha256=digest)
    assert (ds.num_train, ds.num_test, ds.image_shape, ds.num_classes) == (20, 8, (32, 32, 3), 10)
    assert ds.train_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32
    for split in ("train", "test"):
        images, labels = contents[split]
        decoded = getattr(ds, f"{split}_images").astype(int)
        assert np.abs(decoded - images).mean() < 3.0
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)
    assert [p.name for p in cache.iterdir()] == [f"cifar10_jpeg_{digest}.npz"]

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache was valid")

    monkeypatch.setattr(data.resident, "_decode_jpeg", no_decoding)
    again = data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(cache), verify=False)
    np.testing.assert_array_equal(again.train_images, ds.train_images)
    np.testing.assert_array_equal(again.mean, ds.mean)
    sub = data.load(
        "cifar10_jpeg", npz_path=str(npz), data_dir=str(cache), limit_train=5, verify=False
    )
    assert sub.num_train == 5 and sub.num_test == 8
    monkeypatch.undo()
    fresh = data.load(
        "cifar10_jpeg",
        npz_path=str(npz),
        data_dir=str(tmp_path / "other"),
        expected_sha256=digest,
        limit_train=5,
    )
    np.testing.assert_array_equal(fresh.train_images, sub.train_images)  # same subset either way
    assert not (tmp_path / "other").exists(), "a limited load must not write the full cache"


def test_cifar10_jpeg_cache_is_keyed_by_digest(tmp_path, monkeypatch):
    npz, cache = tmp_path / "c.npz", tmp_path / "cache"
    monkeypatch.setenv("DNQ_CIFAR10_JPEG", str(npz))
    monkeypatch.setenv("DNQ_DATA_DIR", str(cache))
    make_npz(npz, n_train=10, n_test=4)
    first = data.load("cifar10_jpeg", verify=False)
    make_npz(npz, n_train=10, n_test=4, seed=7, train_labels=np.full(10, 3, np.uint8))
    second = data.load("cifar10_jpeg", verify=False)
    assert len(list(cache.iterdir())) == 2
    assert np.all(second.train_labels == 3) and not np.all(first.train_labels == 3)
    assert not np.array_equal(first.test_images, second.test_images)


def test_cifar10_jpeg_sidecar_digest(tmp_path):
    npz = tmp_path / "cifar10_jpeg_q75.npz"
    digest, _ = make_npz(npz, n_train=4, n_test=2)
    with pytest.raises(data.DataError, match=data.CIFAR10_JPEG_SHA256):
        data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(tmp_path / "c"))
    npz.with_suffix(".sha256").write_text(f"{digest}  cifar10_jpeg_q75.npz\n")
    ds = data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(tmp_path / "c"))
    assert ds.num_train == 4


def test_a_folder_of_cifar_jpegs_packs_into_the_file_the_loader_reads(tmp_path, capsys):
    """dnq_jax.data.pack: ROOT/{train,test}/<class>/*.jpg -> the npz with the files' bytes
    unchanged, classes in sorted order, and its digest beside it (which the loader checks)."""
    from dnq_jax.data import pack

    root, images = tmp_path / "CIFAR-10-images", {}
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(("bird", "airplane")):  # sorted: airplane 0, bird 1
            (root / split / name).mkdir(parents=True)
            for i, im in enumerate(smooth_images(n, seed=10 * c + len(split))):
                (root / split / name / f"{i:04d}.jpg").write_bytes(jpeg(im))
                images[split, name, i] = im
    out = tmp_path / "packed" / "cifar10_jpeg_q75.npz"
    assert pack.main([str(root), str(out)]) == 0
    assert "6 training and 4 test images" in capsys.readouterr().out
    with np.load(out) as z:
        first = z["train_jpeg"][z["train_offsets"][0] : z["train_offsets"][1]].tobytes()
    assert first == (root / "train" / "airplane" / "0000.jpg").read_bytes()
    assert sha256(out) in out.with_suffix(".sha256").read_text()
    ds = data.load("cifar10_jpeg", npz_path=str(out), data_dir=str(tmp_path / "cache"))
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [
        0,
        0,
        1,
        1,
    ]
    for row, (name, i) in enumerate(
        [("airplane", i) for i in range(3)] + [("bird", i) for i in range(3)]
    ):
        decoded = np.asarray(Image.open(root / "train" / name / f"{i:04d}.jpg").convert("RGB"))
        np.testing.assert_array_equal(ds.train_images[row], decoded)
        assert np.abs(decoded.astype(int) - images["train", name, i]).max() < 16
    # Anything but a 32x32 RGB JPEG is refused with its path, and nothing is written.
    Image.fromarray(smooth_images(1, 0, size=28)[0]).save(root / "test" / "bird" / "9.jpg")
    assert pack.main([str(root), str(tmp_path / "no.npz")]) == 3
    assert "bird/9.jpg: expected a 32x32 RGB JPEG, got JPEG RGB 28x28" in capsys.readouterr().err
    assert not (tmp_path / "no.npz").exists()


def test_cifar10_jpeg_flipped_byte_refused_without_cache(tmp_path):
    npz, cache = tmp_path / "c.npz", tmp_path / "cache"
    digest, _ = make_npz(npz, n_train=6, n_test=3)
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    npz.write_bytes(bytes(raw))
    with pytest.raises(data.DataError) as err:
        data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(cache), expected_sha256=digest)
    assert str(npz) in str(err.value) and digest in str(err.value)
    assert sha256(npz) in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize(
    "override, match",
    [
        ({"test_offsets": None}, "test_offsets"),
        ({"train_offsets": np.array([0, 5, 9], np.int64)}, "train_offsets"),
        ({"train_labels": np.zeros(6, np.int64)}, "train_labels"),
        (
            {
                "train_jpeg": np.zeros(6 * 700, np.uint8),
                "train_offsets": np.arange(7, dtype=np.int64) * 700,
            },
            "not a readable JPEG",
        ),
    ],
)
def test_cifar10_jpeg_wrong_layout_refused(tmp_path, override, match):
    npz, cache = tmp_path / "c.npz", tmp_path / "cache"
    make_npz(npz, n_train=6, n_test=3, **override)
    with pytest.raises(data.DataError, match=match) as err:
        data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(cache), verify=False)
    assert str(npz) in str(err.value)
    assert not cache.exists()


def test_cifar10_jpeg_wrong_image_size_refused(tmp_path):
    npz = tmp_path / "c.npz"
    blob = jpeg(np.zeros((16, 16, 3), np.uint8))
    arrays = {
        "train_jpeg": np.frombuffer(blob, np.uint8),
        "train_offsets": np.array([0, len(blob)], np.int64),
        "train_labels": np.zeros(1, np.uint8),
    }
    make_npz(npz, n_train=1, n_test=1, **arrays)
    with pytest.raises(data.DataError, match=r"\(16, 16, 3\)"):
        data.load("cifar10_jpeg", npz_path=str(npz), data_dir=str(tmp_path), verify=False)


def test_cifar10_jpeg_missing_file_names_the_paths(tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="nope.npz"):
        data.load("cifar10_jpeg", npz_path=str(tmp_path / "nope.npz"))
    monkeypatch.setenv("DNQ_CIFAR10_JPEG", str(tmp_path / "env.npz"))
    with pytest.raises(data.DataError, match="env.npz.*DNQ_CIFAR10_JPEG"):
        data.load("cifar10_jpeg")


# -------------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(
    "name, classes, shape", [("cifar100", 100, (32, 32, 3)), ("mnist", 10, (28, 28, 1))]
)
def test_tfds_through_data_source_without_tensorflow(name, classes, shape):
    import tensorflow_datasets as tfds

    # mock_data's default policy also patches tfds.data_source (checked in tfds 4.9).
    with tfds.testing.mock_data(num_examples=9):
        ds = data.load(name, limit_test=4)
    assert (ds.num_train, ds.num_test, ds.image_shape, ds.num_classes) == (9, 4, shape, classes)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.train_labels.min() >= 0 and ds.train_labels.max() < classes
    assert "tensorflow" not in sys.modules


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(data.resident, "FASHION_MNIST_DIR", str(tmp_path / "not_installed"))
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load("fashion_mnist")
    assert (ds.num_train, ds.image_shape) == (5, (28, 28, 1))
    with pytest.raises(data.DataError) as err:
        data.load("fashion_mnist", tfds_data_dir=str(tmp_path / "tfds"))
    assert "apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert "tfds build fashion_mnist" in str(err.value)


def test_tfds_missing_dataset_says_how_to_build(tmp_path):
    with pytest.raises(data.DataError, match="tfds build cifar10 .*--data_dir"):
        data.load("cifar10", tfds_data_dir=str(tmp_path))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="cifar10_jpeg") as err:
        data.load("imagenet")
    assert not isinstance(err.value, data.DataError)
    with pytest.raises(ValueError, match="limit_train"):
        data.load("cifar10", limit_train=0)


# ------------------------------------------------------------------ on-device pipeline


def patterned(batch: int, h: int = 8, w: int = 8) -> jnp.ndarray:
    """Images whose every pixel is distinct (and non-zero), so any crop or flip is visible."""
    pix = np.arange(batch * h * w * 2).reshape(batch, h, w, 2) % 250 + 1
    return jnp.asarray(pix, jnp.uint8)


def test_augment_shapes_determinism_and_identity():
    images = patterned(16)
    key = jax.random.key(0)
    out = jax.jit(data.augment, static_argnames=("pad", "flip"))(key, images, pad=2, flip=True)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    np.testing.assert_array_equal(out, data.augment(key, images, pad=2, flip=True))
    assert not np.array_equal(out, data.augment(jax.random.key(1), images, pad=2, flip=True))
    np.testing.assert_array_equal(data.augment(key, images, pad=0, flip=False), images)


def test_augment_crop_is_a_shifted_window_of_the_padded_image():
    pad, images = 2, np.asarray(patterned(24))
    out = np.asarray(data.augment(jax.random.key(3), jnp.asarray(images), pad=pad, flip=False))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    shifts = set()
    for img, res in zip(padded, out):
        hits = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.array_equal(img[dy : dy + 8, dx : dx + 8], res)
        ]
        assert len(hits) == 1
        shifts.add(hits[0])
    assert len(shifts) > 3 and shifts != {(pad, pad)}


def test_augment_flip_mirrors_some_images_only():
    images = np.asarray(patterned(32))
    out = np.asarray(data.augment(jax.random.key(5), jnp.asarray(images), pad=0, flip=True))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 4 < sum(mirrored) < 28


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="images_uint8"):
        data.augment(jax.random.key(0), jnp.zeros((8, 8, 3), jnp.uint8))
    with pytest.raises(ValueError, match="pad"):
        data.augment(jax.random.key(0), jnp.zeros((1, 8, 8, 3), jnp.uint8), pad=-1)


def test_epoch_indices_permutation_per_epoch():
    data_key = jax.random.key(42)
    e0 = data.epoch_indices(jax.random.fold_in(data_key, 0), 10, 3)
    assert e0.shape == (3, 3) and e0.dtype == jnp.int32
    assert len(set(np.asarray(e0).ravel().tolist())) == 9
    full = data.epoch_indices(jax.random.fold_in(data_key, 0), 12, 4)
    assert sorted(np.asarray(full).ravel().tolist()) == list(range(12))
    e1 = data.epoch_indices(jax.random.fold_in(data_key, 1), 10, 3)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, data.epoch_indices(jax.random.fold_in(data_key, 0), 10, 3))
    with pytest.raises(ValueError, match="batch_size"):
        data.epoch_indices(data_key, 10, 11)


def test_normalize_matches_numpy():
    images = patterned(2, 4, 4)
    mean, std = np.array([0.2, 0.5], np.float32), np.array([0.3, 0.25], np.float32)
    out = data.normalize(images, mean, std)
    expected = (np.asarray(images) / 255.0 - mean) / std
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert data.normalize(images, mean, std, jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="mean/std"):
        data.normalize(images, np.zeros(3), np.ones(3))


def test_augment_config_per_dataset():
    assert data.augment_config("cifar100") == {"pad": 4, "flip": True}
    assert data.augment_config("cifar10_jpeg") == {"pad": 4, "flip": True}
    assert data.augment_config("fashion_mnist") == {"pad": 2, "flip": False}
    with pytest.raises(ValueError, match="mnist"):
        data.augment_config("svhn")


def tiny_dataset(n: int = 50) -> data.Dataset:
    # image i is filled with the value i + 1: distinct, and never the zero padding
    images = np.broadcast_to(np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))
    images = images.copy()
    labels = (np.arange(n) % 10).astype(np.int32)
    stats = np.zeros(1, np.float32)
    return data.Dataset("t", images, labels, images[:5], labels[:5], 10, stats, stats + 1)


def test_calibration_subset_is_seeded():
    ds = tiny_dataset()
    a, b = data.calibration_subset(ds, 10, seed=0), data.calibration_subset(ds, 10, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 4, 4, 1) and a.dtype == np.uint8
    assert len({im.tobytes() for im in a}) == 10
    assert not np.array_equal(a, data.calibration_subset(ds, 10, seed=1))
    for bad in (0, 51):
        with pytest.raises(ValueError, match="n must"):
            data.calibration_subset(ds, bad, seed=0)


def test_dataset_rejects_wrong_dtypes():
    ds = tiny_dataset()
    with pytest.raises(ValueError, match="int32"):
        data.Dataset(
            "t",
            ds.train_images,
            ds.train_labels.astype(np.int64),
            ds.test_images,
            ds.test_labels,
            10,
            ds.mean,
            ds.std,
        )


# ------------------------------------------------------------------- the real files


def test_real_fashion_mnist_debian_files():
    if not all((Path(data.FASHION_MNIST_DIR) / f).is_file() for f in IDX_NAMES.values()):
        pytest.skip(f"Fashion-MNIST not installed in {data.FASHION_MNIST_DIR}")
    ds = data.load("fashion_mnist")
    assert (ds.num_train, ds.num_test, ds.image_shape) == (60000, 10000, (28, 28, 1))
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 6000))
    np.testing.assert_allclose(ds.mean, [0.2860], atol=5e-4)
    np.testing.assert_allclose(ds.std, [0.3530], atol=5e-4)


def test_real_cifar10_jpeg_subset(tmp_path):
    if not REAL_NPZ.is_file():
        pytest.skip(f"{REAL_NPZ} not present")
    ds = data.load("cifar10_jpeg", data_dir=str(tmp_path), limit_train=200, limit_test=100)
    assert (ds.num_train, ds.num_test, ds.image_shape) == (200, 100, (32, 32, 3))
    assert set(np.unique(ds.train_labels)) == set(range(10))
    assert np.all((ds.mean > 0.35) & (ds.mean < 0.6)) and np.all((ds.std > 0.15) & (ds.std < 0.35))
    assert not any(tmp_path.iterdir())
