"""The data sets by name: which exist, which can stream, and their augmentation recipe.

A name is one of `NAMES` or ``tfds:BUILDER`` (any TFDS ArrayRecord build, e.g.
``tfds:imagenette/320px``). `folder` is an image folder (`dnq_jax.data.folder`).
"""

from __future__ import annotations

from dnq_jax.choices import AUGMENTS
from dnq_jax.data.resident import _SPECS, RESIDENT_NAMES

TFDS_PREFIX = "tfds:"
# Read from files as they are needed (`dnq_jax.data.stream`): TFDS ArrayRecord builds and
# image folders. The other resident sets (one npz file, IDX files, made in memory) are read
# whole.
_STREAMED = ("cifar10", "cifar100", "folder", "imagenet2012", "mnist")
NAMES: tuple[str, ...] = tuple(sorted({*RESIDENT_NAMES, *_STREAMED}))


def known(name: str) -> bool:
    return name in NAMES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX))


def check(name: str) -> None:
    if not known(name):
        raise ValueError(
            f"unknown dataset name {name!r}; known: {', '.join(NAMES)}, or "
            f"{TFDS_PREFIX}BUILDER for any TFDS ArrayRecord build"
        )


def streams(name: str) -> bool:
    """Whether `name` can be read as a stream (else only whole, on the device)."""
    return name in _STREAMED or name.startswith(TFDS_PREFIX)


def tfds_builder(name: str) -> str:
    """The TFDS builder name (with its config, if any) a streamed name reads."""
    return name[len(TFDS_PREFIX) :] if name.startswith(TFDS_PREFIX) else name


def fixed_shape(name: str) -> tuple[int, int, int] | None:
    """(H, W, C) of a set whose images all have one size, else None (decided by image_size)."""
    return _SPECS[name][1] if name in _SPECS else None


def recipe(name: str, augment: str = "auto") -> str:
    """The augmentation recipe a run uses (`data.augment`; docs/data.md):

    - ``crop_flip`` / ``crop``: random crop after zero padding (size / 8 pixels), with or
      without a horizontal flip, on the device inside the train step (CIFAR's recipe);
    - ``inception``: random-resized crop + flip on the host workers of the stream, resize and
      centre crop for evaluation (the ImageNet recipe);
    - ``none``.

    ``auto``: the small sets' own on-device recipe (CIFAR: crop_flip; MNIST-like: crop),
    ``inception`` for image folders, ImageNet and other TFDS builds.
    """
    check(name)
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTS}")
    if augment != "auto":
        return augment
    if name in _SPECS:
        return "crop_flip" if name.startswith("cifar") else "crop"
    return "inception"


def augment_config(name: str, augment: str = "auto", size: int | None = None) -> dict:
    """`augment` kwargs of the on-device part of the recipe: crop+flip for CIFAR; crop only
    for (Fashion-)MNIST, whose mirrored digits change meaning and which is conventionally
    trained without flips; nothing for the host recipe (``inception``) and ``none``.

    ``auto`` on the small sets keeps their conventional padding (CIFAR 4 pixels, MNIST-like
    2); an explicit ``crop``/``crop_flip`` pads size / 8 pixels (4 at 32, 2 at 16).
    """
    kind = recipe(name, augment)
    if kind in ("inception", "none"):
        return {"pad": 0, "flip": False}
    if augment == "auto":
        return {"pad": 4, "flip": True} if kind == "crop_flip" else {"pad": 2, "flip": False}
    side = size or (fixed_shape(name) or (32,))[0]
    return {"pad": max(1, side // 8), "flip": kind == "crop_flip"}
