"""The data: files -> uint8 images for the train step, on two paths (docs/data.md).

- Device-resident (`load`, `Dataset`): the whole set as uint8 on every device, each step's
  batch gathered there; augmentation, normalisation and the epoch's order are pure
  functions of PRNG keys run inside the jitted step (`augment`, `normalize`,
  `epoch_indices`). Fashion-MNIST, CIFAR (npz file or TFDS), MNIST, synthetic data.
- Streamed (`open_stream`, `Stream`): an image folder or a TFDS ArrayRecord build (ImageNet,
  ...) read per host by Grain worker processes, in the same order (`epoch_indices` of the
  same key), decoded and augmented on the host.

`open_dataset` chooses between them (`runtime.data_source`) and says which it took.
Shuffling convention: epoch ``e`` draws its order from ``jax.random.fold_in(data_key, e)``,
so a resumed run replays exactly the order it would have seen, on either path.

Layout: `resident` (the whole-file loaders), `ops` (the device functions), `names` (the
names and augmentation recipes), `images` (host decode and transforms), `folder` (image
folders), `records` (TFDS ArrayRecord builds), `stream` (the Grain pipeline), `choose` (the
path), `pack` (a folder of CIFAR-10 JPEGs into the `cifar10_jpeg` file).
"""

from dnq_jax.data.choose import device_memory, open_dataset
from dnq_jax.data.names import NAMES, TFDS_PREFIX, augment_config, known, recipe, streams
from dnq_jax.data.ops import augment, calibration_subset, epoch_indices, normalize
from dnq_jax.data.resident import (
    CIFAR10_JPEG_FILE,
    CIFAR10_JPEG_SHA256,
    FASHION_MNIST_DIR,
    RESIDENT_NAMES,
    Dataset,
    load,
)
from dnq_jax.data.stream import Stream, open_stream
from dnq_jax.errors import DataError

__all__ = ["CIFAR10_JPEG_FILE", "CIFAR10_JPEG_SHA256", "FASHION_MNIST_DIR", "NAMES"]
__all__ += ["RESIDENT_NAMES", "TFDS_PREFIX", "DataError", "Dataset", "Stream", "augment"]
__all__ += ["augment_config", "calibration_subset", "device_memory", "epoch_indices", "known"]
__all__ += ["load", "normalize", "open_dataset", "open_stream", "recipe", "streams"]
