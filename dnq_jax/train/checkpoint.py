"""Checkpoints of the train state and of the final (evaluated) variables, with Orbax.

Under a workdir (see `workdir.py` for the rest of it):
  checkpoints/<step>/  train states (Orbax CheckpointManager, the newest `keep` kept)
  final/               the variables the run ends with (SWA-averaged, BN re-estimated)

Resume order: the newest complete checkpoint under checkpoints/, restored into the shape and
sharding of a freshly initialised state. Orbax writes each checkpoint into a
`<step>.orbax-checkpoint-tmp-*` folder, writes `commit_success.txt` into it last, and renames
it when complete. So a run killed mid-save leaves either such a tmp folder or (on a file
system without atomic renames, or after a torn copy) a step folder without the marker: both
are removed before the manager lists the steps, and neither is ever restored. A complete-
looking checkpoint whose files cannot be read is moved aside to `<step>.unreadable` (never
deleted) when an older one restores instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from dnq_jax.errors import CheckpointError

PyTree = Any

# Orbax's names (orbax/checkpoint/_src/path/atomicity_types.py); they are not public API.
TMP_MARK = ".orbax-checkpoint-tmp"
COMMIT_MARKER = "commit_success.txt"


def sweep_incomplete(directory: str | os.PathLike) -> list[str]:
    """Remove what interrupted saves left in `directory`; return the names removed.

    Only one trainer writes a workdir, and saves are synchronous, so anything unfinished that
    is found before the run starts belongs to a process that is gone.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in sorted(directory.iterdir()):
        unfinished = TMP_MARK in p.name
        unmarked = p.name.isdigit() and p.is_dir() and not (p / COMMIT_MARKER).exists()
        if unfinished or unmarked:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """The run's CheckpointManager over workdir/checkpoints, after sweeping torn saves."""
    directory = Path(workdir).absolute() / "checkpoints"
    removed = sweep_incomplete(directory)
    if removed:
        print(f"dnq_jax: removed incomplete checkpoint(s) {removed} in {directory}", flush=True)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    # One explicit item handler: otherwise Orbax guesses single- vs multi-item mode from the
    # newest step folder, and one damaged folder would make every checkpoint unreadable.
    return ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree) -> None:
    """Save `state` at `step` and wait until it is complete on disk."""
    if step in mngr.all_steps():
        return
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    mngr.wait_until_finished()


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def _shapes(tree: PyTree) -> dict[str, tuple]:
    """'a/b/0/c' -> shape for every leaf: one spelling for live pytrees and Orbax metadata."""

    def name(path) -> str:
        parts = []
        for k in path:
            part = next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k)
            parts.append(str(part))
        return "/".join(parts)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {name(p): tuple(getattr(leaf, "shape", ())) for p, leaf in leaves}


def _difference(saved_dir: Path, like: PyTree) -> str | None:
    """How the checkpoint in `saved_dir` differs in structure from `like`; None if it fits
    (or if its metadata is unreadable: then the checkpoint is damaged, not foreign)."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(epath.Path(saved_dir)).tree
    except Exception:  # any failure to read metadata means a damaged folder
        return None
    have, want = _shapes(meta), _shapes(like)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = [
        f"{k} {have[k]} vs {want[k]}" for k in sorted(set(have) & set(want)) if have[k] != want[k]
    ]
    if not (missing or extra or shapes):
        return None
    parts = [f"it holds {len(have)} arrays where {len(want)} are expected"]
    for label, items in (("missing", missing), ("unexpected", extra), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def restore_latest(mngr: ocp.CheckpointManager, like: PyTree) -> PyTree | None:
    """The newest readable checkpoint restored into the structure/sharding of `like`, or None.

    A checkpoint of another model/config raises CheckpointError at once (an older one would
    not fit either). One that fits but cannot be read falls back to the next older one; the
    unreadable folder is then renamed `<step>.unreadable` so a later save can reuse the step.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    directory = Path(mngr.directory)
    failures = []
    for step in steps:
        diff = _difference(directory / str(step) / "default", like)
        if diff is not None:
            raise CheckpointError(
                f"the checkpoint at step {step} in {directory} does not fit this model/"
                f"config: {diff}. Use a fresh --workdir, or the config the checkpoint was "
                "written with (the workdir's config.json)."
            )
        try:
            restored = mngr.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
        except Exception as e:  # it fits but cannot be read: damaged files
            failures.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        for bad, why in failures:
            aside = directory / f"{bad}.unreadable"
            os.replace(directory / str(bad), aside)
            print(f"dnq_jax: checkpoint {bad} unreadable ({why}); moved to {aside}", flush=True)
        if failures:
            mngr.reload()
        return restored
    if failures:
        listed = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(
            f"no checkpoint in {directory} could be read ({listed}). Move the folder away "
            "to start afresh, or restore it from a backup."
        )
    return None


def save_final(workdir: str | os.PathLike, variables: PyTree) -> None:
    """Save the run's final variables ({'params', 'batch_stats'}) under workdir/final."""
    path = Path(workdir).absolute() / "final"
    for leftover in path.parent.glob(f"final{TMP_MARK}*"):  # from a run killed mid-save
        shutil.rmtree(leftover, ignore_errors=True)
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
    if not (path / COMMIT_MARKER).exists():
        raise CheckpointError(
            f"{path} is incomplete (no {COMMIT_MARKER}): the run was stopped while saving it. "
            "Re-run the same train.py command to redo the final stage."
        )
    diff = _difference(path, like)
    if diff is not None:
        raise CheckpointError(
            f"the final variables in {path} do not fit the model of its config.json: {diff}. "
            "Was the checkpoint written by another model or config? Evaluate it with the "
            "config.json its run wrote."
        )
    try:
        return ocp.StandardCheckpointer().restore(path, _abstract(like))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(
            f"the final variables in {path} cannot be read ({type(e).__name__}: "
            f"{str(e)[:300]}). Re-run the same train.py command to rewrite them."
        ) from e
