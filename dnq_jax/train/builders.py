"""Build the parts of a run from its config: data, model, mesh, optimizer.

Each builder is a plain function of the config (and of what an earlier builder returned);
the loop in `loop.py` calls them in order, so its call sites show what depends on what.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dnq_jax import backend, data, models
from dnq_jax.dnq import profiler
from dnq_jax.errors import ConfigError, DataError
from dnq_jax.ptq.spec import QuantSpec
from dnq_jax.train import hosts, optim
from dnq_jax.train.state import init_key

PyTree = Any


def load_dataset(c: ml_collections.ConfigDict) -> data.Dataset | data.Stream:
    """The config's data set, device-resident or streamed as `runtime.data_source` decides
    (logged); a DataError says which config keys chose the files. A stream's image folder is
    checked here (each process a share of the files) and its normalisation statistics
    computed, so a bad file stops the run before it starts."""
    r = c.runtime
    try:
        ds, how = data.open_dataset(
            c.data.name,
            source=r.data_source,
            device_fraction=r.device_data_fraction,
            image_size=c.data.image_size,
            augment=c.data.augment,
            val_split=c.data.val_split,
            image_folder=r.image_folder,
            tfds_data_dir=r.tfds_data_dir or None,
            data_dir=r.data_dir or None,
            npz_path=r.npz_path or None,
            limit_train=c.data.limit_train or None,
            limit_test=c.data.limit_test or None,
            workers=data_workers(c),
            check_share=(jax.process_index(), jax.process_count()),
        )
        if isinstance(ds, data.Stream):
            ds.stats()
    except DataError as e:
        keys = _FILE_KEYS
        if data.streams(c.data.name):
            keys = "runtime.image_folder" if c.data.name == "folder" else "runtime.tfds_data_dir"
        raise DataError(
            f"data.name={c.data.name}: {str(e).rstrip('.')}. The files come from the config "
            f"keys {keys}."
        ) from e
    hosts.log(f"dnq_jax: data: {how}")
    return ds


_FILE_KEYS = (
    "runtime.npz_path, runtime.data_dir and runtime.tfds_data_dir: point them at a good copy"
)


def data_workers(c: ml_collections.ConfigDict) -> int:
    """`runtime.data_workers`, -1 resolved: the host's cores minus 2 (the trainer's), at
    most 64 (each worker is a Python process with its own imports)."""
    n = c.runtime.data_workers
    return n if n >= 0 else max(0, min(64, (os.cpu_count() or 1) - 2))


def steps_per_epoch(c: ml_collections.ConfigDict, ds) -> int:
    spe = c.optim.steps_per_epoch or ds.num_train // c.optim.batch_size
    if spe < 1 or spe * c.optim.batch_size > ds.num_train:
        raise ConfigError(
            f"optim.steps_per_epoch: {spe} steps of batch {c.optim.batch_size} need "
            f"{spe * c.optim.batch_size} images; {c.data.name} has {ds.num_train} training images"
        )
    return spe


def profiler_images(c: ml_collections.ConfigDict, ds) -> np.ndarray:
    """The profiler's fixed calibration images, normalised: `noise.n_calib` of them (0: the
    evaluation's `quant.n_calib`), drawn with `quant.calib_seed`."""
    n = c.noise.n_calib or c.quant.n_calib
    calib = data.calibration_subset(ds, n, c.quant.calib_seed)
    return np.asarray(data.normalize(calib, ds.mean, ds.std))


def create_profiler(c: ml_collections.ConfigDict, model, graph):
    """The run's DNQ profiler (un-jitted): the modelled quantizer of its `noise.*` keys, the
    evaluation's 8-bit ends; fn(variables, calib_images) -> NoiseStats."""
    n = c.noise
    spec = QuantSpec(
        w_bits=n.w_bits,
        a_bits=n.a_bits,
        keep_ends_8bit=c.quant.keep_ends_8bit,
        a_calibrator=n.calibrator,
    )
    return profiler.make_profiler(
        model, graph, spec, w_quantizer=n.w_quantizer, error_sign=n.error_sign
    )


def compute_dtype(c: ml_collections.ConfigDict):
    return jnp.bfloat16 if c.model.dtype == "bfloat16" else jnp.float32


def create_model(c: ml_collections.ConfigDict, num_classes: int):
    kwargs = {"width": c.model.width} if c.model.name == "mobilenet_v2" else {}
    return models.create(c.model.name, num_classes=num_classes, dtype=compute_dtype(c), **kwargs)


def init_variables(model, c: ml_collections.ConfigDict, image_shape) -> dict:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, train=False))(init_key(c.seed))


def variable_shapes(model, image_shape) -> dict:
    """The structure of the model's variables as `jax.ShapeDtypeStruct`s: nothing compiled
    or computed (what a restore needs to know)."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)


def create_optimizer(c: ml_collections.ConfigDict, spe: int) -> optax.GradientTransformation:
    o, swa = c.optim, c.swa
    return optim.make_optimizer(
        learning_rate=o.learning_rate,
        total_steps=spe * o.num_epochs,
        steps_per_epoch=spe,
        momentum=o.momentum,
        nesterov=o.nesterov,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_epochs * spe,
        swa_start_epoch=swa.start_epoch if swa.enabled else None,
        swa_lr=swa.lr,
        sam_rho=o.sam_rho if o.sam else None,
        schedule=o.schedule,
    )


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ('data',) mesh over the first `num_devices` devices (0 = all, on every host;
    with several processes only 0 or the full count).

    Params and state are replicated, batches split along 'data'; under `jax.jit` BatchNorm
    statistics are global, so the model needs no axis names.
    """
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ConfigError(
            f"runtime.num_devices: {num_devices} requested but {len(devices)} "
            f"{jax.default_backend()} device(s) are available"
        )
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ConfigError(
            f"runtime.num_devices: {num_devices} of {len(devices)} devices with "
            f"{jax.process_count()} processes; use 0 (all): every process must own part "
            "of the mesh"
        )
    devices = np.asarray(devices[: num_devices or len(devices)])
    return Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """The shardings the trainer uses, by role."""
    rep = NamedSharding(mesh, P())
    return {
        "replicated": rep,
        "state": rep,
        "data": rep,  # device-resident datasets are replicated; batches are gathered per step
        "idx": NamedSharding(mesh, P(None, "data")),  # (steps, batch): split the batch
    }


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array with `sharding` (works on one host and across hosts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree(tree: PyTree, sharding: NamedSharding) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def placed(shapes: PyTree, sharding: NamedSharding) -> PyTree:
    """`jax.ShapeDtypeStruct`s of `shapes` with `sharding`: what a restore fills."""
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes
    )


def scans_steps(c: ml_collections.ConfigDict) -> bool:
    """Whether a chunk's steps run in a rolled `lax.scan` (GPU/TPU) or straight-line (CPU).

    The rule is `dnq_jax.backend.scans`; `runtime.loop` may force either.
    """
    return backend.scans(c.runtime.loop)


def device_description(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{mesh.size} x {kind} ({jax.default_backend()}, jax {jax.__version__})"
