"""Checkpoints of the train state and of the final (evaluated) variables, with Orbax.

Under a workdir (see `workdir.py` for the rest of it):
  checkpoints/<step>/  train states (Orbax CheckpointManager, the newest `keep` kept)
  noise_start/<step>/  the train state at the first step of epoch noise.start_epoch: what
                       every run of the same settings but its noise keys shares
                       (a grid begins such runs from it: `dnq_jax/grid/fork.py`)
  final/               the variables the run ends with (SWA-averaged, BN re-estimated)

Resume order: the newest complete checkpoint under checkpoints/, restored into the shape and
sharding of a freshly initialised state. Whether a step folder is complete is Orbax's own
answer (`ocp.utils.is_checkpoint_finalized` / `is_tmp_checkpoint`): on a local or network file
system Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when complete (the rename
is the commit; some versions also leave a marker file, which no code here relies on); on an
object store it writes in place and commits with a marker file. Nothing is ever deleted on the
strength of a file name: a folder Orbax calls unfinished is moved aside to
`<step>.incomplete` and reported, and a complete-looking checkpoint whose files cannot be read
is moved aside to `<step>.unreadable` when an older one restores instead.

Several processes (`jax.distributed`): every process calls the save and restore functions
(Orbax coordinates their writes); the moving aside is done by process 0 alone, and the checks
of the final variables by every process, each inside a `hosts.agreed` block, so an error
there stops every process with the same error. Orbax's own restore ends in a barrier: a
checkpoint that one process cannot read while the others can (files that differ between
hosts) still leaves the others waiting there; on a shared file system all read the same files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from dnq_jax.errors import CheckpointError
from dnq_jax.train import hosts

PyTree = Any


def is_finalized(path: str | os.PathLike) -> bool:
    """Whether Orbax considers the checkpoint folder `path` complete (public Orbax API)."""
    path = epath.Path(path)
    return not ocp.utils.is_tmp_checkpoint(path) and bool(ocp.utils.is_checkpoint_finalized(path))


def _looks_unfinished(p: Path) -> bool:
    if not p.is_dir():
        return False
    if ocp.utils.is_tmp_checkpoint(epath.Path(p)):
        return True
    return p.name.isdigit() and not is_finalized(p)


def set_aside(p: Path, suffix: str) -> Path:
    """Rename `p` to `<leading name>.<suffix>` (`-2`, `-3`, ... if taken); never deletes."""
    base = re.match(r"[^.]+", p.name).group(0)
    aside = p.with_name(f"{base}.{suffix}")
    n = 2
    while aside.exists():
        aside = p.with_name(f"{base}.{suffix}-{n}")
        n += 1
    os.replace(p, aside)
    return aside


def set_aside_incomplete(directory: str | os.PathLike) -> list[tuple[str, str]]:
    """Move what interrupted saves left in `directory` to `<step>.incomplete`.

    Returns (old name, new name) pairs. Saves are synchronous, so anything unfinished found
    before a run starts belongs to a process that is gone. Call on process 0 only.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    moved = []
    for p in sorted(directory.iterdir()):
        if _looks_unfinished(p):
            moved.append((p.name, set_aside(p, "incomplete").name))
    return moved


# The folder of the state at the noise stage's start (one step folder, like checkpoints/).
NOISE_START = "noise_start"


def manager(
    workdir: str | os.PathLike, keep: int, folder: str = "checkpoints"
) -> ocp.CheckpointManager:
    """The run's CheckpointManager over workdir/<folder>, after setting torn saves aside."""
    directory = Path(workdir).absolute() / folder
    with hosts.agreed():
        if hosts.is_primary():
            moved = set_aside_incomplete(directory)
            if moved:
                listed = ", ".join(f"{a} -> {b}" for a, b in moved)
                print(
                    f"dnq_jax: incomplete checkpoint(s) moved aside in {directory}: {listed}",
                    flush=True,
                )
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


def save_noise_start(workdir: str | os.PathLike, step: int, state: PyTree) -> None:
    """Keep `state` at `step` (the noise stage's first) in workdir/noise_start/, once."""
    mngr = manager(workdir, 1, NOISE_START)
    if not mngr.all_steps():
        save(mngr, step, state)


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
        if failures:
            with hosts.agreed():
                if hosts.is_primary():
                    for bad, why in failures:
                        aside = set_aside(directory / str(bad), "unreadable")
                        print(f"dnq_jax: checkpoint {bad} unreadable ({why}); moved to {aside}")
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
    """Save the run's final variables ({'params', 'batch_stats'}) under workdir/final.

    Every process calls it (Orbax writes once); what a run killed mid-save left is moved aside.
    """
    path = Path(workdir).absolute() / "final"
    with hosts.agreed():
        if hosts.is_primary():
            for leftover in _final_leftovers(path):
                aside = set_aside(leftover, "incomplete")
                print(f"dnq_jax: unfinished final save moved aside to {aside}", flush=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, variables, force=True)
    ckptr.wait_until_finished()


def _final_leftovers(path: Path) -> list[Path]:
    """Orbax's temporary folders of `path` (a save of it that did not finish)."""
    return [
        p
        for p in sorted(path.parent.glob(f"{path.name}.*"))
        if p.is_dir() and ocp.utils.is_tmp_checkpoint(epath.Path(p))
    ]


def load_final(workdir: str | os.PathLike, like: PyTree) -> PyTree:
    """The final variables of a run, restored into the structure of `like` (arrays or
    `jax.ShapeDtypeStruct`s)."""
    path = Path(workdir).absolute() / "final"
    with hosts.agreed():  # every process checks; any refusal stops all before Orbax
        _check_final(path, workdir, like)
    try:
        return ocp.StandardCheckpointer().restore(path, _abstract(like))
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(
            f"the final variables in {path} cannot be read ({type(e).__name__}: "
            f"{str(e)[:300]}). Re-run the same train.py command to rewrite them."
        ) from e


def _check_final(path: Path, workdir: str | os.PathLike, like: PyTree) -> None:
    torn = (path.exists() and not is_finalized(path)) or (
        not path.exists() and _final_leftovers(path)
    )
    if torn:
        raise CheckpointError(
            f"{path} is incomplete (Orbax did not finalise it): the run was stopped while "
            "saving it. Re-run the same train.py command to redo the final stage."
        )
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: the run in {workdir} has not finished (no final "
            "variables). Finish or resume it with train.py, or point --workdir at a finished run."
        )
    diff = _difference(path, like)
    if diff is not None:
        raise CheckpointError(
            f"the final variables in {path} do not fit the model of its config.json: {diff}. "
            "Was the checkpoint written by another model or config? Evaluate it with the "
            "config.json its run wrote."
        )
