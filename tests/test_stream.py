"""The streamed data path (dnq_jax/data/stream.py, dnq_jax/train/feed.py) against the
device path, on small image folders and a TFDS ArrayRecord build made in the test.

The two paths feed the same bytes in the same order for the same seed, and so train to the
same results; a stream stopped mid-epoch resumes where it was; bad input is refused before
the run starts, in one paragraph, with the data exit status. Two processes, and a SIGKILL:
tests/test_stream_multihost.py (`make test-multiprocess`).
"""

import io
import json
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE_RUN
from PIL import Image

from configs import resnet
from dnq_jax import data
from dnq_jax.cli import common
from dnq_jax.data import folder, images
from dnq_jax.errors import EXIT_CODES, ConfigError, DataError, Preempted
from dnq_jax.train import builders, feed, metrics, optim
from dnq_jax.train import config as config_lib
from dnq_jax.train import loop as loop_lib
from dnq_jax.train.loop import train_and_evaluate


def write_folder(root, classes=10, train=8, val=2, size=64, seed=0):
    """`classes` folders of random size x size JPEGs under root/train and root/val."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("jpegs"))


def _config(more: str):
    return resnet.get_config(f"smoke,runtime.progress=False,{more}")


def test_stream_feeds_the_device_path_s_bytes_in_its_order(jpegs):
    """Same seed, same epoch, from the same step: the stream's global batches are the device
    path's gathered ones, byte for byte, labels too (the order computed on the host's CPU is
    the device's; 64x64 JPEGs at their own size are the decoded files)."""
    more = f"data.name=folder,runtime.image_folder={jpegs},data.image_size=64,"
    more += "data.augment=crop_flip,optim.batch_size=8,optim.steps_per_epoch=0"
    mesh = builders.make_mesh(2)
    sh = builders.shardings(mesh)
    runs = {}
    for source in ("device", "stream"):
        c = _config(f"{more},runtime.data_source={source},runtime.data_workers=0")
        ds = builders.load_dataset(c)
        spe = builders.steps_per_epoch(c, ds)
        runs[source] = feed.make_feed(c, ds, mesh, sh, spe), ds
    (dev, dev_ds), (stream, stream_ds) = runs["device"], runs["stream"]
    assert isinstance(stream_ds, data.Stream) and isinstance(dev_ds, data.Dataset)
    assert (dev.spe, stream_ds.num_train, stream_ds.num_test) == (10, 80, 20)
    np.testing.assert_array_equal(stream_ds.mean, dev_ds.mean)
    key = jax.random.fold_in(jax.random.key(0), 1)
    got = list(stream.epoch(key, 1, 3, 2))
    want = list(dev.epoch(key, 1, 3, 2))
    assert [k for k, _ in got] == [k for k, _ in want] == [2, 2, 2, 1]
    for (_, (x, y)), (_, (images_u8, labels, idx)) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(images_u8)[np.asarray(idx)])
        np.testing.assert_array_equal(np.asarray(y), np.asarray(labels)[np.asarray(idx)])
    # The calibration images (profiler, PTQ) are the same too.
    np.testing.assert_array_equal(
        data.calibration_subset(stream_ds, 5, 0), data.calibration_subset(dev_ds, 5, 0)
    )


def test_host_augmentation_is_a_function_of_seed_epoch_step_and_row(jpegs):
    """The ImageNet recipe on the host: the same crops for the same (seed, epoch, step, row)
    whoever reads the row (two processes' halves of each batch, a worker process, a resumed
    pipeline), other crops at another epoch; evaluation is a fixed centre crop."""
    s = data.open_stream("folder", image_folder=str(jpegs), image_size=32)
    assert s.recipe == "inception" and s.image_shape == (32, 32, 3)
    rows = np.asarray(data.epoch_indices(jax.random.key(3), s.num_train, 8))
    whole = list(s.batches("train", rows, seed=(0, 5)))
    halves = zip(
        s.batches("train", rows[:, :4], seed=(0, 5)),
        s.batches("train", rows[:, 4:], seed=(0, 5), first_row=4),
        strict=True,
    )
    for (x, y), ((a, ya), (b, yb)) in zip(whole, halves, strict=True):
        np.testing.assert_array_equal(x, np.concatenate([a, b]))
        np.testing.assert_array_equal(y, np.concatenate([ya, yb]))
    tail = list(s.batches("train", rows[6:], seed=(0, 5), first_step=6))
    for (x, _), (t, _) in zip(whole[6:], tail, strict=True):
        np.testing.assert_array_equal(x, t)
    worker = data.open_stream("folder", image_folder=str(jpegs), image_size=32, workers=1)
    for (x, _), (w, _) in zip(
        whole[:3], worker.batches("train", rows[:3], seed=(0, 5)), strict=True
    ):
        np.testing.assert_array_equal(x, w)
    other = next(iter(s.batches("train", rows[:1], seed=(0, 6))))[0]
    assert not np.array_equal(other, whole[0][0])
    once, again = s.read("test", [0, 1])[0], s.test_images[[0, 1]]
    np.testing.assert_array_equal(once, again)
    # The views index as numpy does: ints, negative ints, slices, masks; others refused.
    images_, labels_ = np.asarray(s.test_images), np.asarray(s.test_labels)
    mask = np.arange(len(labels_)) % 3 == 0
    for idx in (-1, 4, [-1, 0], slice(-3, None), mask, []):
        np.testing.assert_array_equal(s.test_images[idx], images_[idx])
        np.testing.assert_array_equal(s.test_labels[idx], labels_[idx])
    for bad in ([len(labels_)], mask[:-1], [0.5]):
        with pytest.raises(IndexError):
            s.test_labels[bad]


def test_bn_re_estimation_reads_a_streams_training_transform(jpegs):
    """SWA's BatchNorm re-estimation sees a stream's images as its training batches are (the
    ImageNet recipe's random crops, seeded as an epoch is), not its evaluation centre crops."""
    s = data.open_stream("folder", image_folder=str(jpegs), image_size=32)
    key = jax.random.key(7)
    rows = np.sort(np.asarray(data.epoch_indices(key, s.num_train, 8)), axis=1)
    got = [np.asarray(b) for b in optim.bn_batches(s, 8, key, stream_seed=(0, 9))]
    want = [
        np.asarray(data.normalize(jnp.asarray(x), s.mean, s.std))
        for x, _ in s.batches("train", rows, seed=(0, 9))
    ]
    assert len(got) == len(want) == 10
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    evaluation = np.asarray(next(optim.bn_batches(s, 8, key)))  # no seed: centre crops
    assert not np.array_equal(evaluation, got[0])


def test_streamed_smoke_run_stopped_mid_epoch_resumes_to_the_device_run(smoke_run, tmp_path):
    """The smoke run's own images as a PNG folder, streamed from the device run's checkpoint
    at step 8 (the test above shows the earlier batches are the same): stopped after step 10
    (one step into an epoch with noise and SWA), resumed there, it ends exactly as the
    uninterrupted device-path smoke run (conftest.py): the same losses, accuracies, PTQ
    table and final weights, bit for bit."""
    wd_device, results_device = smoke_run
    ds = data.load("synthetic", limit_train=256, limit_test=128)
    root = tmp_path / "synthetic"
    for split, xs, ys in (
        ("train", ds.train_images, ds.train_labels),
        ("val", ds.test_images, ds.test_labels),
    ):
        for i, (x, y) in enumerate(zip(xs, ys)):
            (root / split / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / split / str(y) / f"{i:05d}.png")  # named in order
    c = resnet.get_config(
        f"smoke,{SMOKE_RUN},data.name=folder,runtime.image_folder={root},data.image_size=16,"
        "data.augment=crop,runtime.data_source=stream,runtime.data_workers=0"
    )
    wd = tmp_path / "run"
    shutil.copytree(wd_device / "checkpoints" / "8", wd / "checkpoints" / "8")
    calls = []
    agree = loop_lib._StopFlag.agree

    def signal_after_step_10(self):  # as if SIGTERM had come during step 10
        calls.append(1)
        if len(calls) == 2:
            self.signal = signal.SIGTERM
        return agree(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_lib._StopFlag, "agree", signal_after_step_10)
        with pytest.raises(Preempted, match="at step 10"):
            train_and_evaluate(c, str(wd))
    results = train_and_evaluate(c, str(wd))
    rows, rows_device = metrics.read(wd), metrics.read(wd_device)
    for key in ("test_acc", "lambda", "lr_step"):
        assert [r[key] for r in rows] == [r[key] for r in rows_device][2:], key
    # The resumed epoch's row averages the steps run after the resume (11, 12) alone.
    assert [r["train_loss"] for r in rows[1:]] == [r["train_loss"] for r in rows_device[3:]]
    for key in ("fp32", "w8a8", "w4a4", "steps"):
        assert results[key] == results_device[key], key
    final = [ocp.StandardCheckpointer().restore((w / "final").absolute()) for w in (wd, wd_device)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, *final)
    assert json.loads((wd / "config.json").read_text())["runtime"]["data_source"] == "stream"


# ----------------------------------------------------------------- TFDS ArrayRecord builds


def _tiny_tfds_build(root, class_name: str, splits: dict):
    """A genuine TFDS ArrayRecord build named after `class_name` (snake case): JPEGs of 20x24,
    3 classes; `splits`: name -> (examples, seed, labelled), an unlabelled split's labels
    -1 as TFDS stores them (ImageNet's test split). Written by TFDS itself (encoded images in,
    so no TensorFlow)."""
    import tensorflow_datasets as tfds

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(*spec) for name, spec in splits.items()}

    def _generate_examples(self, n, seed, labelled):
        rng = np.random.default_rng(seed)
        for i in range(n):
            buf = io.BytesIO()
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, "JPEG")
            buf.seek(0)
            yield i, {"image": buf, "label": i % 3 if labelled else -1}

    methods = dict(_info=_info, _split_generators=_split_generators)
    methods.update(_generate_examples=_generate_examples, VERSION=tfds.core.Version("1.0.0"))
    builder_class = type(class_name, (tfds.core.GeneratorBasedBuilder,), methods)
    builder = builder_class(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    return builder


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """`dnq_tiny_images`: 12 training and 6 test examples, labelled."""
    root = tmp_path_factory.mktemp("tfds")
    splits = {"train": (12, 0, True), "test": (6, 1, True)}
    return root, _tiny_tfds_build(root, "DnqTinyImages", splits)


def test_tfds_array_record_build_is_read_as_tfds_reads_it(tfds_dir):
    """Every record's image and label as TFDS's own reader gives them; streamed and
    device-resident at one size alike; no TensorFlow imported."""
    import sys

    root, builder = tfds_dir
    s = data.open_stream("tfds:dnq_tiny_images", tfds_data_dir=str(root), image_size=16)
    assert (s.num_train, s.num_test, s.num_classes, s.recipe) == (12, 6, 3, "inception")
    for split in ("train", "test"):
        theirs = builder.as_data_source(split)
        for i in range(len(theirs)):
            raw, label, _ = s.sources[split][i]
            mine = np.asarray(images.open_image(raw, "test").convert("RGB"))
            np.testing.assert_array_equal(mine, theirs[i]["image"])
            assert label == theirs[i]["label"]
    kw = dict(tfds_data_dir=str(root), image_size=16, augment="crop_flip")
    dev, how = data.open_dataset("tfds:dnq_tiny_images", source="device", **kw)
    streamed, _ = data.open_dataset("tfds:dnq_tiny_images", source="stream", **kw)
    assert "device-resident (runtime.data_source=device)" in how
    x, y = next(iter(streamed.batches("train", [[3, 0, 7]])))
    np.testing.assert_array_equal(x, dev.train_images[[3, 0, 7]])
    np.testing.assert_array_equal(y, dev.train_labels[[3, 0, 7]])
    assert "tensorflow" not in sys.modules


def test_unlabelled_test_split_gives_way_to_validation_and_bad_records_are_named(
    tfds_dir, tmp_path
):
    """ImageNet's TFDS build has a `test` split whose labels are all -1 (TFDS's "no label"):
    the stream evaluates on `validation`, and refuses a build with no labelled held-out split.
    A label outside the classes and a record that is no tf.train.Example are data errors that
    name the record, never padding or a bare protobuf error."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dnq_jax.data import records

    splits = {"train": (6, 0, True), "test": (3, 1, False), "validation": (4, 2, True)}
    _tiny_tfds_build(tmp_path, "DnqTinyUnlabelledTest", splits)
    s = data.open_stream("tfds:dnq_tiny_unlabelled_test", tfds_data_dir=str(tmp_path))
    assert (s.num_train, s.num_test) == (6, 4)
    held_out = [s.sources["test"][i] for i in range(4)]
    assert sorted(label for _, label, _ in held_out) == [0, 0, 1, 2]
    assert held_out[0][2] == "TFDS dnq_tiny_unlabelled_test validation record 0"
    splits = {"train": (6, 0, True), "test": (3, 1, False)}
    _tiny_tfds_build(tmp_path, "DnqTinyNoLabels", splits)
    with pytest.raises(DataError, match=r"carry no labels \(-1\)"):
        data.open_stream("tfds:dnq_tiny_no_labels", tfds_data_dir=str(tmp_path))

    root, _ = tfds_dir
    build = records.open_build("dnq_tiny_images", str(root))
    labels = [build["train"][i][1] for i in range(12)]
    keys = ("name", "split", "paths", "length", "image_key", "label_key")
    name, split, paths, length, *feature_keys = (build["train"].__dict__[k] for k in keys)
    two = records.RecordSplit(name, split, paths, length, tuple(feature_keys), num_classes=2)
    assert two[labels.index(1)][1] == 1
    k = labels.index(2)
    with pytest.raises(DataError, match=rf"train record {k}: label 2 is outside \[0, 2\)"):
        two[k]
    path = tmp_path / "junk.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    writer.write(b"\xff\xff\xff not a protocol buffer")
    writer.close()
    junk = records.RecordSplit("junk", "train", [str(path)], 1, ("image", "label"), 3)
    with pytest.raises(DataError, match="junk train record 0: not a tf.train.Example"):
        junk[0]


def test_auto_says_which_path_it_took(jpegs):
    kw = dict(image_folder=str(jpegs), image_size=64, augment="crop_flip")
    ds, how = data.open_dataset("folder", **kw)
    assert isinstance(ds, data.Dataset) and "device-resident (auto: its device copy" in how
    ds, how = data.open_dataset("folder", device_fraction=1e-9, **kw)
    assert isinstance(ds, data.Stream) and "over runtime.device_data_fraction=1e-09" in how
    ds, how = data.open_dataset("folder", image_folder=str(jpegs))
    assert isinstance(ds, data.Stream) and "inception recipe runs on the host workers" in how


# --------------------------------------------------------------------------- bad input


def _refused(c, tmp_path, capsys) -> tuple[int, str]:
    """(exit status, message) of a run of `c` as the CLI runs it; the workdir never made."""
    wd = tmp_path / "wd"
    status = common.run_guarded(lambda: train_and_evaluate(c, str(wd)), verbose=False)
    assert not wd.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error (") == 1
    return status, " ".join(err.split())


def test_folder_without_classes_or_with_an_unreadable_file_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    c = _config(f"data.name=folder,runtime.image_folder={empty}")
    status, err = _refused(c, tmp_path, capsys)
    assert status == EXIT_CODES[DataError] == 3
    assert "no class subfolders" in err and "ROOT/train/<class>/" in err
    broken = write_folder(tmp_path / "broken", classes=2, train=2, val=1, size=8)
    (broken / "train" / "class01" / "001.jpg").write_bytes(b"not an image")
    c = _config(f"data.name=folder,runtime.image_folder={broken}")
    status, err = _refused(c, tmp_path, capsys)
    assert status == 3 and "class01/001.jpg: not a readable image" in err, err
    assert "The run has not started" in err
    # Hidden folders (a notebook's checkpoints) are no classes, in train/ or val/.
    hidden = write_folder(tmp_path / "hidden", classes=2, train=2, val=1, size=8)
    for split in ("train", "val"):
        (hidden / split / ".ipynb_checkpoints").mkdir()
    s = data.open_stream("folder", image_folder=str(hidden), image_size=8)
    assert (s.num_classes, s.num_train, s.num_test) == (2, 4, 2)


def test_unbuilt_tfds_set_names_the_build_command(tmp_path, capsys):
    c = _config(f"data.name=imagenet2012,runtime.tfds_data_dir={tmp_path / 'tfds'}")
    status, err = _refused(c, tmp_path, capsys)
    assert status == 3
    command = f"tfds build imagenet2012 --file_format=array_record --data_dir={tmp_path}/tfds"
    assert command in err
    assert "--manual_dir" in err
    version = tmp_path / "tfds" / "my_set" / "1.0.0"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
    c = _config(f"data.name=tfds:my_set,runtime.tfds_data_dir={tmp_path / 'tfds'}")
    status, err = _refused(c, tmp_path, capsys)
    assert status == 3 and "tfds convert_format" in err and "--file_format=array_record" in err


def test_shard_count_that_does_not_divide_is_said(jpegs, capsys):
    """80 images in batches of 24: 3 steps, 8 images left out of each epoch's order, said;
    the 20 test images in padded batches of 8 (eval.batch_size 6 rounded up to the 4
    devices)."""
    c = _config(
        f"data.name=folder,runtime.image_folder={jpegs},data.image_size=16,"
        "runtime.data_source=stream,optim.batch_size=24,optim.steps_per_epoch=0,"
        "eval.batch_size=6,runtime.num_devices=4,runtime.data_workers=0"
    )
    config_lib.validate(c, 4)
    mesh = builders.make_mesh(4)
    ds = builders.load_dataset(c)
    f = feed.make_feed(c, ds, mesh, builders.shardings(mesh), builders.steps_per_epoch(c, ds))
    out = " ".join(capsys.readouterr().out.split())
    assert "3 steps of 24 images an epoch" in out and "8 of the 80 training images" in out
    assert "batches of 8, the last padded" in out
    counted = [int((np.asarray(y) >= 0).sum()) for _, y in f._test_batches()]
    assert counted == [8, 8, 4]


def test_config_refuses_what_a_source_cannot_do():
    for more, key in (
        ("data.name=cifar10_jpeg,runtime.data_source=stream", "runtime.data_source"),
        ("data.name=folder,runtime.image_folder=x,runtime.data_source=device", "runtime"),
        ("data.name=synthetic,data.augment=inception", "data.augment"),
        ("data.name=folder", "runtime.image_folder"),
        ("data.name=tfds:", "data.name"),
        ("data.image_size=4", "data.image_size"),
    ):
        with pytest.raises(ConfigError, match=key):
            config_lib.validate(_config(more))


def test_tiny_imagenet_layout_and_held_out_split(tmp_path):
    """Tiny-ImageNet as shipped (train/<wnid>/images/, val/images/ + val_annotations.txt),
    and a bare class folder with data.val_split held out per class."""
    root = tmp_path / "tiny"
    for wnid in ("n01", "n02"):
        (root / "train" / wnid / "images").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    for name in ("val_0.JPEG", "val_1.JPEG"):
        Image.new("RGB", (8, 8)).save(root / "val" / "images" / name)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\nval_1.JPEG\tn01\t0\n")
    classes, splits = folder.scan(str(root), val_split=0.1)
    assert classes == ["n01", "n02"] and len(splits["train"]) == 6
    assert splits["test"].labels.tolist() == [1, 0]
    assert splits["test"].where(0).endswith("val/images/val_0.JPEG")
    classes, splits = folder.scan(str(root / "train"), val_split=0.34)
    assert (len(splits["train"]), len(splits["test"])) == (4, 2)
    assert sorted(splits["test"].labels.tolist()) == [0, 1]
    with pytest.raises(DataError, match="val_split"):
        folder.scan(str(root / "train"), val_split=0)
