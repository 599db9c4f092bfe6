"""Host image work for the stream: decode, resize, crop, flip (Pillow), one example at a time.

Run by the stream's worker processes (and by `Stream.read` in the main process). Every
random choice comes from the numpy Generator it is given, which the stream seeds from (seed,
epoch, step, row of the global batch): an example's crop is a pure function of where it sits
in the run, whatever process or worker makes it.

The recipes (`dnq_jax.data.names.recipe`):
- on-device recipes (``crop_flip``, ``crop``, ``none``): every image is `fit` to the run's
  size (the shorter side resized to it, the centre cropped; an image already of that size is
  passed through unchanged), train and test alike; the crop and flip happen on the device.
- ``inception`` (the ImageNet recipe): training images get a random-resized crop (area 8% to
  100%, aspect ratio 3/4 to 4/3, the torchvision algorithm) resized to the run's size, then a
  horizontal flip with probability 1/2; evaluation images the shorter side resized to
  size / 0.875 and the centre cropped.

JPEGs are decoded at a reduced scale (Pillow's `draft`, libjpeg's DCT scaling) when the crop
needs no more than that: the bytes depend only on the file and the crop, as above.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from dnq_jax.errors import DataError

CROP_FRACTION = 0.875  # evaluation of the ImageNet recipe: a 224 crop of the image at 256
SCALE = (0.08, 1.0)  # random-resized crop: the crop's share of the image's area
RATIO = (3 / 4, 4 / 3)  # and its aspect ratio (drawn log-uniformly)


def open_image(raw: bytes, where: str) -> Image.Image:
    """The image in `raw` (not yet decoded); DataError naming `where` if it is not one."""
    try:
        return Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{where}: not a readable image ({err}); remove or replace it") from err


def transform(
    raw: bytes,
    where: str,
    *,
    size: int,
    channels: int,
    recipe: str,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """uint8 (size, size, channels) of the encoded image `raw` under `recipe`; `rng` given:
    the training transform, else the evaluation one."""
    im = open_image(raw, where)
    try:
        w, h = im.size
        if recipe == "inception" and rng is not None:
            box, mirror = random_resized_box(w, h, rng), rng.random() < 0.5
        else:
            scale = CROP_FRACTION if recipe == "inception" else 1.0
            box, mirror = centre_box(w, h, scale), False
        out = _resized(im, box, size, channels)
    except (OSError, ValueError) as err:  # a truncated or corrupt body, found while decoding
        raise DataError(f"{where}: not a readable image ({err}); remove or replace it") from err
    return np.ascontiguousarray(out[:, ::-1]) if mirror else out


def centre_box(w: int, h: int, scale: float = 1.0) -> tuple[float, float, float, float]:
    """The centred square that, resized, is the centre crop of the image with its shorter
    side at size / scale."""
    side = min(w, h) * scale
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def random_resized_box(w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 10 tries at a random area and aspect ratio, then
    the centre at the nearest allowed ratio."""
    area = w * h
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x = int(rng.integers(0, w - cw + 1))
            y = int(rng.integers(0, h - ch + 1))
            return (x, y, x + cw, y + ch)
    if w / h < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif w / h > RATIO[1]:
        cw, ch = int(round(h * RATIO[1])), h
    else:
        cw, ch = w, h
    x, y = (w - cw) // 2, (h - ch) // 2
    return (x, y, x + cw, y + ch)


def _resized(im: Image.Image, box, size: int, channels: int) -> np.ndarray:
    """The region `box` of `im` resized to size x size (bilinear, antialiased), uint8 HWC."""
    w, h = im.size
    mode = "L" if channels == 1 else "RGB"
    if box == (0, 0, w, h) and (w, h) == (size, size):
        out = im.convert(mode)  # already the run's size: the decoded bytes themselves
    else:
        bw, bh = box[2] - box[0], box[3] - box[1]
        # Decode a JPEG no larger than the crop needs (never below `size` over the box).
        im.draft(mode, (max(1, math.ceil(w * size / bw)), max(1, math.ceil(h * size / bh))))
        sx, sy = im.size[0] / w, im.size[1] / h
        scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = im.convert(mode).resize((size, size), Image.BILINEAR, box=scaled)
    arr = np.asarray(out, np.uint8)
    return arr[..., None] if channels == 1 else arr
