"""Which path a data set takes: whole on every device, or streamed from its files per host.

`open_dataset` returns a `Dataset` (device path) or a `Stream`, and a sentence saying which
and why. ``source='auto'`` keeps the device path (a step never waits for the host) when the
device copy fits in `device_fraction` of one device's memory and the augmentation runs on
the device; otherwise it streams.
"""

from __future__ import annotations

import os

import jax

from dnq_jax.data import names, resident
from dnq_jax.data.stream import Stream, open_stream
from dnq_jax.errors import ConfigError, DataError


def device_memory() -> tuple[int, str]:
    """(bytes, description) of one local device's memory: GPU/TPU report it; on CPU, the
    host's RAM shared by its devices."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # backends without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"one {device.device_kind}'s"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = jax.local_device_count()
    return ram // count, f"the host's RAM over its {count} device(s),"


def open_dataset(
    name: str,
    *,
    source: str = "auto",
    device_fraction: float = 0.25,
    image_size: int = 0,
    augment: str = "auto",
    val_split: float = 0.1,
    image_folder: str = "",
    tfds_data_dir: str | None = None,
    data_dir: str | None = None,
    npz_path: str | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    workers: int = 0,
    check_share: tuple[int, int] = (0, 1),
) -> tuple[resident.Dataset | Stream, str]:
    """(the data set, which path it took and why) under `source`: auto, device or stream."""
    names.check(name)
    recipe = names.recipe(name, augment)
    fixed = names.fixed_shape(name)
    whole = dict(data_dir=data_dir, npz_path=npz_path, tfds_data_dir=tfds_data_dir)
    whole.update(limit_train=limit_train, limit_test=limit_test)
    if not names.streams(name):
        if source == "stream" or recipe == "inception":
            raise ConfigError(f"data.name={name} is read whole: it has no streaming form")
        if image_size not in (0, fixed[0]):
            raise ConfigError(f"data.image_size: {name} is read at its own size, {fixed[0]}")
        ds = resident.load(name, **whole)
        return ds, f"{_described(ds)}; device-resident (its files are read whole)"
    if source == "device" and recipe == "inception":
        raise ConfigError(
            "runtime.data_source=device: the inception recipe (data.augment) runs on the "
            "stream's host workers; use the stream, or data.augment=crop_flip"
        )
    stream = open_stream(
        name,
        image_folder=image_folder,
        tfds_data_dir=tfds_data_dir,
        image_size=image_size,
        augment=augment,
        val_split=val_split,
        limit_train=limit_train,
        limit_test=limit_test,
        workers=workers,
        check_share=check_share,
    )
    need = stream.device_bytes()
    memory, which = device_memory()
    fits = need <= device_fraction * memory
    size = f"its device copy ({_mb(need)}) is {need / memory:.1%} of {which} {_mb(memory)}"
    if source == "stream" or (source == "auto" and (not fits or recipe == "inception")):
        why = "runtime.data_source=stream"
        if source == "auto":
            why = (
                "the inception recipe runs on the host workers"
                if recipe == "inception"
                else f"{size}, over runtime.device_data_fraction={device_fraction}"
            )
        return stream, f"{_described(stream)}; streamed, {stream.workers} worker(s) ({why})"
    why = "runtime.data_source=device" if source == "device" else f"auto: {size}"
    # The small TFDS sets at their own size keep TFDS's own reader (the same images).
    legacy = name in resident.RESIDENT_NAMES and image_size in (0, (fixed or (0,))[0])
    ds = resident.load(name, **whole) if legacy else stream.materialize()
    return ds, f"{_described(ds)}; device-resident ({why})"


def _described(ds) -> str:
    h, w, c = ds.image_shape
    where = f" ({ds.where})" if isinstance(ds, Stream) else ""
    return (
        f"{ds.name}{where}: {ds.num_train:,} training and {ds.num_test:,} test images of "
        f"{h}x{w}x{c}, {ds.num_classes} classes"
    )


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


__all__ = ["DataError", "device_memory", "open_dataset"]
