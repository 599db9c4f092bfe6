"""Devices, the data mesh, and placing arrays on it.

One ('data',) mesh over the devices in use (all hosts' devices after
`jax.distributed.initialize()`); params and state replicated, batches split along 'data'.
No pmap and no axis names in the model: under `jax.jit` BatchNorm statistics are global.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ('data',) mesh over the first `num_devices` devices (0 = all)."""
    devices = jax.devices()
    if num_devices < 0 or num_devices > len(devices):
        raise ValueError(
            f"num_devices: {num_devices} requested but {len(devices)} "
            f"{jax.default_backend()} device(s) are available"
        )
    devices = devices[: num_devices or len(devices)]
    try:
        axis_types = (jax.sharding.AxisType.Auto,)
        return Mesh(np.asarray(devices), ("data",), axis_types=axis_types)
    except (AttributeError, TypeError):  # older jax: every axis is Auto already
        return Mesh(np.asarray(devices), ("data",))


def shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    """The shardings the trainer uses, by role."""
    rep = NamedSharding(mesh, P())
    return {
        "replicated": rep,
        "state": rep,
        "data": rep,  # device-resident datasets are replicated; batches are gathered per step
        "idx": NamedSharding(mesh, P(None, "data")),  # (steps, batch): split the batch
        "batch": NamedSharding(mesh, P("data")),
    }


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array with `sharding` (works on one host and across hosts)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_tree(tree: PyTree, sharding: NamedSharding) -> PyTree:
    return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), tree)


def is_cpu() -> bool:
    return jax.default_backend() == "cpu"


def device_description(mesh: Mesh) -> str:
    d = mesh.devices.flat[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{mesh.size} x {kind} ({jax.default_backend()}, jax {jax.__version__})"
