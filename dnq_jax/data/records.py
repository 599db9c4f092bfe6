"""TFDS ArrayRecord builds, read without TensorFlow or TFDS's pipeline.

A build made once with ``tfds build NAME --file_format=array_record --data_dir=DIR`` is a
folder ``DIR/NAME/VERSION/`` holding ``dataset_info.json`` (the splits, their shard files and
example counts), ``features.json`` (the features: an encoded image, a class label) and the
shards ``NAME-SPLIT.array_record-0000i-of-0000n``. Each record is a serialized
``tf.train.Example``; its image stays encoded (JPEG or PNG) until a worker decodes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dnq_jax.errors import DataError

IMAGENET_NOTE = (
    " imagenet2012 cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar in a folder and add --manual_dir=THAT_FOLDER."
)


def default_data_dir(data_dir: str | None) -> Path:
    """The TFDS data_dir: `data_dir`, else env TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def build_command(builder: str, root: Path) -> str:
    note = IMAGENET_NOTE if builder.split("/")[0] == "imagenet2012" else ""
    return (
        f"build it once (with internet, and TensorFlow for most sets; reading it needs "
        f"neither): tfds build {builder} "
        f"--file_format=array_record --data_dir={root}.{note} runtime.tfds_data_dir names "
        "that data_dir."
    )


def find_build(builder: str, data_dir: str | None) -> Path:
    """The newest complete version folder of `builder`'s build under the TFDS data_dir."""
    root = default_data_dir(data_dir)
    base = root / builder
    versions = []
    if base.is_dir():
        for d in base.iterdir():
            parts = d.name.split(".")
            complete = (d / "dataset_info.json").is_file()
            if d.is_dir() and all(p.isdigit() for p in parts) and complete:
                versions.append((tuple(int(p) for p in parts), d))
    if not versions:
        raise DataError(
            f"TFDS {builder!r}: no build under {base} (no VERSION/dataset_info.json there); "
            + build_command(builder, root)
        )
    return max(versions)[1]


class RecordSplit:
    """One split of a build: random access to (encoded image bytes, label, where)."""

    def __init__(
        self, name: str, split: str, paths: list[str], length: int, keys, num_classes: int
    ) -> None:
        self.name, self.split, self.paths, self.length = name, split, paths, length
        self.image_key, self.label_key = keys
        self.num_classes = num_classes
        self._source = None  # opened on first use, in each process

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:  # to worker processes: paths, not open files
        return {**self.__dict__, "_source": None}

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        raw, label, where = self.read(i)
        if not 0 <= label < self.num_classes:
            # -1 is TFDS's "no label" (ImageNet's test split); to the stream it would be padding.
            raise DataError(
                f"{where}: label {label} is outside [0, {self.num_classes}) (an unlabelled split?)"
            )
        return raw, label, where

    def read(self, i: int) -> tuple[bytes, int, str]:
        """(encoded image, label as stored, where) of record `i`, the label unchecked."""
        from google.protobuf.message import DecodeError
        from tensorflow_datasets.proto import tf_example_pb2  # no TensorFlow needed

        if self._source is None:
            from grain.sources import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.paths)
        where = f"TFDS {self.name} {self.split} record {i}"
        try:
            record = self._source[i]
        except (OSError, RuntimeError, ValueError) as err:
            raise DataError(f"{where}: unreadable ({err}); rebuild the split") from err
        try:
            feature = tf_example_pb2.Example.FromString(record).features.feature
            return (
                feature[self.image_key].bytes_list.value[0],
                int(feature[self.label_key].int64_list.value[0]),
                where,
            )
        except DecodeError as err:
            raise DataError(f"{where}: not a tf.train.Example ({err}); rebuild the split") from err
        except (IndexError, KeyError, ValueError) as err:
            raise DataError(f"{where}: no {self.image_key}/{self.label_key} ({err})") from err


def open_build(builder: str, data_dir: str | None) -> dict:
    """{'train', 'test': RecordSplit, 'num_classes', 'shape': (H or None, W or None, C)} of
    `builder`'s ArrayRecord build; the test split is 'test' where its records carry labels,
    else 'validation' (ImageNet's 'test' split, built when its tar is at hand, has none)."""
    version = find_build(builder, data_dir)
    root = default_data_dir(data_dir)
    info = json.loads((version / "dataset_info.json").read_text())
    if info.get("fileFormat", "tfrecord") != "array_record":
        raise DataError(
            f"{version} holds a {info.get('fileFormat', 'tfrecord')} build; the stream reads "
            f"ArrayRecord: rebuild with tfds build {builder} --file_format=array_record "
            f"--data_dir={root} (or convert it: tfds convert_format "
            f"--dataset_version_dir={version} --out_file_format=array_record)"
        )
    image_key, label_key, shape, num_classes = _features(version / "features.json")
    splits = {s["name"]: s for s in info.get("splits", [])}
    held_out = [s for s in ("test", "validation") if s in splits]
    if "train" not in splits or not held_out:
        raise DataError(f"{version}: splits {sorted(splits)}; need train and test or validation")
    out = {"num_classes": num_classes, "shape": shape}
    keys = (image_key, label_key)
    out["train"] = _split(builder, version, info, splits["train"], keys, num_classes, root)
    for name in held_out:
        split = _split(builder, version, info, splits[name], keys, num_classes, root)
        if split.read(0)[1] >= 0:  # TFDS stores -1 for "no label"
            out["test"] = split
            return out
    raise DataError(
        f"{version}: the held-out splits ({', '.join(held_out)}) carry no labels (-1); "
        "evaluation needs a labelled test or validation split"
    )


def _split(builder, version: Path, info: dict, s: dict, keys, num_classes: int, root: Path):
    """The RecordSplit of split entry `s` of `info` (dataset_info.json), its files checked."""
    theirs = s["name"]
    lengths = [int(n) for n in s.get("shardLengths", [])]
    template = s.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    paths = [
        str(version / template.replace("{DATASET}", info["name"])
            .replace("{SPLIT}", theirs).replace("{FILEFORMAT}", "array_record")
            .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}"))
        for i in range(len(lengths))
    ]  # fmt: skip
    missing = [p for p in paths if not Path(p).is_file()]
    if missing or not lengths:
        raise DataError(
            f"{version}: the {theirs} split's files are missing ({missing[:3] or 'none listed'}"
            f"); the build is incomplete: {build_command(builder, root)}"
        )
    return RecordSplit(builder, theirs, paths, sum(lengths), keys, num_classes)


def _features(path: Path):
    """(image key, label key, (H, W, C) with None for a free size, number of classes)."""
    try:
        features = json.loads(path.read_text())["featuresDict"]["features"]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path}: unreadable TFDS features ({err})") from err
    images = [k for k, v in features.items() if "image" in v]
    labels = [k for k, v in features.items() if "classLabel" in v]
    if not images or not labels:
        raise DataError(f"{path}: an image and a class label feature are needed, found {features}")
    image_key = "image" if "image" in images else images[0]
    label_key = "label" if "label" in labels else labels[0]
    dims = [int(d) for d in features[image_key]["image"]["shape"]["dimensions"]]
    shape = tuple(None if d < 0 else d for d in dims)
    num_classes = int(features[label_key]["classLabel"]["numClasses"])
    return image_key, label_key, shape, num_classes
