"""An image folder as a data set: one subfolder of JPEG/PNG files per class.

Layouts (docs/data.md):
- ``ROOT/train/<class>/...`` and ``ROOT/val/<class>/...`` (``validation/`` or ``test/``
  also name the evaluation split);
- Tiny-ImageNet's own: ``ROOT/train/<wnid>/images/*.JPEG`` and ``ROOT/val/images/*.JPEG``
  with ``ROOT/val/val_annotations.txt`` naming each file's class;
- ``ROOT/<class>/...`` alone: `val_split` of each class (a seeded draw) is held out for
  evaluation.

Files may sit anywhere below their class folder. Classes are the train split's class
folders in sorted order (label i is the i-th). A split's examples are ordered by their path
below the class folder, then by class: a pure function of the listing, the same on every
host. Every file's header is read before the run starts, so a file that is no image stops
the run there, named.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dnq_jax.errors import DataError

SUFFIXES = (".jpeg", ".jpg", ".png")
_LAYOUT = (
    "an image folder holds one subfolder of .jpg/.jpeg/.png files per class: "
    "ROOT/train/<class>/ and ROOT/val/<class>/, or ROOT/<class>/ alone with data.val_split "
    "of each class held out for evaluation (docs/data.md)"
)


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: file paths below `root` and their labels; random
    access to (encoded bytes, label, where) for the stream."""

    root: str
    paths: np.ndarray  # bytes (numpy "S"): compact to send to worker processes
    labels: np.ndarray  # int32

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def where(self, i: int) -> str:
        return str(Path(self.root) / self.paths[i].decode())

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        where = self.where(i)
        try:
            raw = Path(where).read_bytes()
        except OSError as err:
            raise DataError(f"{where}: cannot be read ({err})") from err
        return raw, int(self.labels[i]), where


def scan(root: str, val_split: float, seed: int = 0) -> tuple[list[str], dict[str, FolderSplit]]:
    """(class names, {'train': FolderSplit, 'test': FolderSplit}) of the folder `root`."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder {root!r} does not exist or is not a folder; {_LAYOUT}")
    train_dir = base / "train"
    val_dir = next((base / d for d in ("val", "validation", "test") if (base / d).is_dir()), None)
    top = train_dir if train_dir.is_dir() else base
    classes = _classes(top)
    if not classes:
        raise DataError(f"{top}: no class subfolders with images; {_LAYOUT}")
    train = _listing(top, classes, base)
    if top is train_dir and val_dir is not None:
        test = _val_listing(val_dir, classes)
    else:
        if not 0 < val_split < 1:
            raise DataError(
                f"{root}: no val/ folder, and data.val_split={val_split} holds nothing out for "
                "evaluation; set data.val_split in (0, 1) or add ROOT/val/<class>/"
            )
        train, test = _hold_out(train, val_split, seed)
    if not test:
        raise DataError(f"{val_dir or root}: no images for evaluation; {_LAYOUT}")
    splits = {}
    for split, items in (("train", train), ("test", test)):
        items = sorted(items)  # (path below the class folder, label, path below root)
        paths = np.array([p.encode() for _, _, p in items], dtype=bytes)
        labels = np.array([label for _, label, _ in items], np.int32)
        splits[split] = FolderSplit(str(base), paths, labels)
    return classes, splits


def check_headers(split: FolderSplit, share: tuple[int, int] = (0, 1), threads: int = 8) -> None:
    """Read the header of every `share[1]`-th file from `share[0]` on: DataError naming the
    first that is no image (and how many others there are)."""
    start, step = share
    indices = range(start, len(split), step)

    def bad(i: int) -> str | None:
        path = split.where(i)
        try:
            with Image.open(path):
                pass  # the header is read and checked by open
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return f"{path}: not a readable image ({str(err).replace(repr(path), '').strip()})"
        return None

    found = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        # A slice at a time: the pool's map submits every task at once (ImageNet: 1.28 M).
        for i in range(0, len(indices), 4096):
            found += [b for b in pool.map(bad, indices[i : i + 4096]) if b]
    if found:
        more = f"; {len(found) - 1} more such files" if len(found) > 1 else ""
        raise DataError(f"{found[0]}{more}; remove or replace it. The run has not started.")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in SUFFIXES and p.is_file()


def _classes(top: Path) -> list[str]:
    dirs = sorted(d for d in top.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = []
    for d in dirs:
        if not any(_is_image(p) for p in d.rglob("*")):
            raise DataError(f"class folder {d} holds no .jpg/.jpeg/.png file; {_LAYOUT}")
        classes.append(d.name)
    return classes


def _listing(top: Path, classes: list[str], base: Path) -> list[tuple[str, int, str]]:
    """(path below the class folder, label, path below `base`) of every image."""
    out = []
    for label, name in enumerate(classes):
        d = top / name
        for p in d.rglob("*"):
            if _is_image(p):
                out.append((p.relative_to(d).as_posix(), label, p.relative_to(base).as_posix()))
    return out


def _val_listing(val_dir: Path, classes: list[str]) -> list[tuple[str, int, str]]:
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():  # Tiny-ImageNet: val/images/*.JPEG, a file's class in a table
        index = {c: i for i, c in enumerate(classes)}
        out = []
        for n, line in enumerate(annotations.read_text().splitlines()):
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{annotations} line {n + 1}: no known class in {line!r}")
            path = val_dir / "images" / fields[0]
            rel = path.relative_to(val_dir.parent).as_posix()
            out.append((fields[0], index[fields[1]], rel))
        return out
    unknown = sorted(
        d.name
        for d in val_dir.iterdir()
        if d.is_dir() and not d.name.startswith(".") and d.name not in classes
    )
    if unknown:
        raise DataError(f"{val_dir}: class folders {unknown} are not among train/'s classes")
    present = [c for c in classes if (val_dir / c).is_dir()]
    index = {c: classes.index(c) for c in present}
    out = _listing(val_dir, present, val_dir.parent)
    return [(p, index[present[label]], rel) for p, label, rel in out]


def _hold_out(items, fraction: float, seed: int):
    """Each class's `fraction` (at least one image of a class of two or more), drawn by a
    numpy RNG seeded `seed`, for evaluation; the rest for training."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    by_class: dict[int, list] = {}
    for item in sorted(items):
        by_class.setdefault(item[1], []).append(item)
    for label in sorted(by_class):
        members = by_class[label]
        n = len(members)
        k = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        chosen = set(rng.permutation(n)[:k].tolist())
        for i, item in enumerate(members):
            (test if i in chosen else train).append(item)
    return train, test
