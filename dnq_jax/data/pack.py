"""Packs a folder of CIFAR-10 JPEGs into the `cifar10_jpeg` file, bytes unchanged.

The `cifar10_jpeg` set is the public "CIFAR-10-images" JPEG re-encoding of CIFAR-10 (baseline
JFIF, quality 75): one JPEG file per image under ``ROOT/train/<class>/`` and
``ROOT/test/<class>/``. This module concatenates those files, as they are, into the one
uncompressed ``.npz`` the loader reads (``{split}_jpeg``, ``{split}_offsets``,
``{split}_labels``; docs/data.md) and writes its sha256 beside it (``NAME.sha256``), which the
loader then checks instead of the digest of the file this project measured with::

  python -m dnq_jax.data.pack CIFAR-10-images cifar10_jpeg_q75.npz

The folders are listed as the image-folder stream lists them (`dnq_jax.data.folder.scan`):
classes are the sorted class folders of ``train/`` (for CIFAR-10: airplane ... truck, the
official label order); images go class by class, in sorted file-name order. Every file must be
a 32x32 RGB JPEG; anything else is refused with its path, before anything is written.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dnq_jax.data import folder
from dnq_jax.errors import EXIT_CODES, DataError

SHAPE = (32, 32)


def _checked(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            ok = im.format == "JPEG" and im.size == SHAPE and im.mode == "RGB"
            got = f"{im.format} {im.mode} {im.size[0]}x{im.size[1]}"
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
    if not ok:
        raise DataError(f"{path}: expected a 32x32 RGB JPEG, got {got}")
    return data


def pack(root: str | Path, out: str | Path) -> tuple[Path, str, dict[str, int]]:
    """Writes `out` (the ``.npz``) and its ``.sha256`` from the JPEG folder `root`; returns
    (out, its sha256, {split: number of images})."""
    root, out = Path(root), Path(out)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise DataError(f"{root}: expected ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg")
    other = [d for d in ("val", "validation") if (root / d).is_dir()]
    if other:  # the listing would take it for the test split
        raise DataError(f"{root}: holds {other[0]}/ beside test/; pack reads train/ and test/ only")
    classes, splits = folder.scan(str(root), val_split=0.0)  # the stream's own listing
    if len(classes) > 256:
        raise DataError(f"{root}/train: {len(classes)} class folders; uint8 labels hold 256")
    arrays, counts = {}, {}
    for split, files in splits.items():
        order = np.lexsort((files.paths, files.labels))  # by class, then by file name
        blobs = [np.frombuffer(_checked(Path(files.where(i))), np.uint8) for i in order]
        sizes = np.array([0] + [b.size for b in blobs], np.int64)
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.cumsum(sizes)
        arrays[f"{split}_labels"] = files.labels[order].astype(np.uint8)
        counts[split] = len(order)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    raw = buf.getvalue()
    digest = hashlib.sha256(raw).hexdigest()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(raw)
    out.with_suffix(".sha256").write_text(f"{digest}  {out.name}\n")
    return out, digest, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the folder holding train/<class>/*.jpg and test/<class>/*.jpg")
    p.add_argument("out", help="the .npz to write (its .sha256 is written beside it)")
    args = p.parse_args(argv)
    try:
        out, digest, counts = pack(args.root, args.out)
    except DataError as err:
        print(f"pack: {err}", file=sys.stderr)
        return EXIT_CODES[DataError]
    print(f"{out}: {counts['train']} training and {counts['test']} test images, sha256 {digest}")
    print(f"train with --config.runtime.npz_path={out} (or env DNQ_CIFAR10_JPEG={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
