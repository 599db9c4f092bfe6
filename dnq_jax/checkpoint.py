"""Checkpoints of the train state and of the final (evaluated) variables, with Orbax.

Layout of a workdir:
  config.json          the resolved config of the run (read back by evaluate.py)
  checkpoints/<step>/  train states (Orbax CheckpointManager, the newest `keep` kept)
  final/               the variables the run ends with (SWA-averaged, BN re-estimated)
  metrics.jsonl, events.out.tfevents.*, results.json

Resume order: the newest complete checkpoint under checkpoints/, restored into the shape and
sharding of a freshly initialised state. Orbax writes each checkpoint into a temporary folder
and renames it when complete, so a run killed mid-save leaves no checkpoint that looks whole;
such leftovers are ignored (and cleaned) by the manager.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model/config."""


def manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree) -> None:
    """Save `state` at `step` and wait until it is complete on disk."""
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def restore_latest(mngr: ocp.CheckpointManager, like: PyTree) -> PyTree | None:
    """The newest checkpoint restored into the structure/sharding of `like`, or None."""
    step = mngr.latest_step()
    if step is None:
        return None
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"the checkpoint at step {step} in {mngr.directory} does not fit this model/"
            f"config ({type(e).__name__}: {str(e)[:300]}). Use a fresh --workdir, or the "
            "config the checkpoint was written with."
        ) from e


def save_final(workdir: str | os.PathLike, variables: PyTree) -> None:
    """Save the run's final variables ({'params', 'batch_stats'}) under workdir/final."""
    path = Path(workdir).absolute() / "final"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, variables, force=True)
    ckptr.wait_until_finished()


def load_final(workdir: str | os.PathLike, like: PyTree) -> PyTree:
    """The final variables of a run, restored into the structure of `like`."""
    path = Path(workdir).absolute() / "final"
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: the run in {workdir} has not finished (no final "
            "variables). Finish or resume it with train.py, or point --workdir at a finished run."
        )
    try:
        return ocp.StandardCheckpointer().restore(path, _abstract(like))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"the final variables in {path} do not fit the model of its config.json "
            f"({type(e).__name__}: {str(e)[:300]}): was the checkpoint written by another "
            "model or config?"
        ) from e


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    path = Path(workdir) / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: {workdir} is not a dnq_jax workdir (train.py writes "
            "config.json there first)."
        )
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the workdir is damaged.") from e
