"""The workdir of a run: what is written there besides checkpoints and metrics, and when.

Layout:
  config.json          the config of the run (read back by evaluate.py and on resume)
  checkpoints/<step>/  train states (`checkpoint.py`)
  noise_start/<step>/  the train state at the noise stage's first step (`checkpoint.py`;
                       a grid's cells share it, `dnq_jax/grid/fork.py`)
  final/               the evaluated variables (`checkpoint.py`)
  metrics.jsonl, events.out.tfevents.*   per-epoch metrics (`metrics.py`)
  results.json         FP32 and PTQ top-1 of the finished run; ptq_results.json: evaluate.py

Every file here is written atomically (a temporary file renamed into place), so a kill
mid-write leaves the previous version whole.

Several processes (`jax.distributed`): every write of the workdir is made by process 0 alone,
inside an `agreed` block that every process enters (`hosts.py`: `is_primary`, `agreed`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import ml_collections

from dnq_jax.errors import CheckpointError, ConfigError
from dnq_jax.train import config as config_lib
from dnq_jax.train.hosts import agreed, is_primary


def check_writable(workdir: str | os.PathLike, create: bool = True) -> Path:
    """Prove `workdir` can be written (creating it only if `create`), or raise PermissionError.

    With `create=False` nothing is left behind: an existing folder gets a probe file that is
    removed again; for a missing one, a probe folder is made and removed in its nearest
    existing parent. So a run refused later (bad data, say) leaves the workdir as it was.
    Process 0 probes and creates; the others wait for its verdict and share it.
    """
    path = Path(workdir)
    with agreed():
        if is_primary():
            _probe(path, create)
    return path


def _probe(path: Path, create: bool) -> None:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise PermissionError(f"{parent} is a file, not a folder")
        if parent == path:
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".dnq_write_test_", dir=parent))
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror if e.strerror else str(e)
        raise PermissionError(
            f"workdir {path} is not writable: cannot write in {parent} ({why}). Choose a "
            "--workdir you can write to; checkpoints, metrics and results go there."
        ) from None


def write_config(workdir: str | os.PathLike, c: ml_collections.ConfigDict) -> None:
    """Write the run's config to workdir/config.json (process 0; every process calls)."""
    with agreed():
        if is_primary():
            write_atomic(Path(workdir) / "config.json", config_lib.to_json(c))


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run wrote to workdir/config.json, checked like a new one.

    Raises CheckpointError naming the problem (missing file, unknown key, value out of range).
    """
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: {workdir} is not a dnq_jax workdir (train.py writes "
            "config.json there first)."
        )
    try:
        return config_lib.from_json_text(path.read_text(), str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def check_resume(workdir: str | os.PathLike, c: ml_collections.ConfigDict) -> None:
    """Refuse to continue a run with settings that change its training (a silent mix).

    Process 0 reads config.json and decides, for all processes."""
    with agreed():
        if is_primary():
            _check_resume(Path(workdir), c)


def _check_resume(workdir: Path, c: ml_collections.ConfigDict) -> None:
    path = workdir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no readable record of the old settings: nothing to compare with
    changed = config_lib.resume_conflicts(saved, c)
    if changed:
        old, new = config_lib.flat(saved), config_lib.flat(c)
        listed = ", ".join(f"{k}={old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{changed[0]}: {workdir} holds a run with other settings ({listed}); resuming "
            "it would mix two runs. Use a fresh --workdir, or the settings in its config.json "
            f"(only the groups {', '.join(config_lib.RESUME_FREE_GROUPS)} may change)."
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file of the workdir atomically (process 0 only)."""
    if is_primary():
        write_atomic(Path(path), text)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file renamed into place: a kill mid-write
    leaves the previous version whole. Any process may call it (no agreement, no check)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
