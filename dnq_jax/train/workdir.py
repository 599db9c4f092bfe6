"""The workdir of a run: what is written there besides checkpoints and metrics, and when.

Layout:
  config.json          the config of the run (read back by evaluate.py and on resume)
  checkpoints/<step>/  train states (`checkpoint.py`)
  noise_start/<step>/  the train state at the noise stage's first step (`fork.py`)
  final/               the evaluated variables (`checkpoint.py`)
  metrics.jsonl, events.out.tfevents.*   per-epoch metrics (`metrics.py`)
  results.json         FP32 and PTQ top-1 of the finished run; ptq_results.json: evaluate.py

Every file here is written atomically (a temporary file renamed into place), so a kill
mid-write leaves the previous version whole.

Several processes (`jax.distributed`): every write of the workdir is made by process 0 alone
(`is_primary`), inside an `agreed` block that every process enters: it ends with a collective,
so the others go on only once process 0's write is done, and an error raised by any process in
the block is raised by all of them (same type, same message, same exit status) instead of
leaving the others waiting at the next collective for a process that has exited. One process
(the default) needs none of this and gets none of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import jax
import ml_collections
import numpy as np

from dnq_jax import errors
from dnq_jax.errors import CheckpointError, ConfigError
from dnq_jax.train import config as config_lib

# Bytes of an error message passed between processes by `agreed` (longer ones are cut).
_MESSAGE_BYTES = 2048


def is_primary() -> bool:
    """Whether this process writes the workdir (process 0; the only one without
    `jax.distributed`)."""
    return jax.process_index() == 0


@contextlib.contextmanager
def agreed():
    """Run the block on every process, then agree on how it went: if it raised on any
    process, every process raises the error of the lowest-numbered process that failed.

    That process re-raises its own error; the others raise one of the same kind (the kind
    decides the CLI's exit status, `errors.EXIT_CODES`; any other error, a bug, becomes a
    RuntimeError on the others) with its message. The agreement is a collective over all
    processes, so every process must reach it, in the same order: blocks hold host work only
    (file checks and writes, data loading, the evaluation), never a collective of their own.
    With one process it does nothing.
    """
    try:
        yield
    except Exception as e:
        _agree(e)
        raise
    _agree(None)


def _agree(error: Exception | None) -> None:
    if jax.process_count() == 1:
        return
    seen = allgather(_encode(error))
    failed = [i for i, row in enumerate(seen) if row[0]]
    if not failed or failed[0] == jax.process_index():
        return  # nothing failed, or this process's own error is the one raised
    raise _decode(seen[failed[0]], failed[0]) from error


def allgather(row: np.ndarray) -> np.ndarray:
    """Every process's `row` (same shape and dtype everywhere), stacked in process order.

    Like `multihost_utils.process_allgather`, but it returns only once the gather has ended
    on every local device (that one waits for the first device's copy alone), so no half of
    it is still running when the caller exits or raises.
    """
    devices = np.asarray(jax.devices()).reshape(jax.process_count(), -1)
    mesh = jax.sharding.Mesh(devices, ("processes", "local"))
    spec = jax.sharding.PartitionSpec
    mine = jax.make_array_from_process_local_data(
        jax.sharding.NamedSharding(mesh, spec("processes")), row[None]
    )
    # A top-level function: the same jit every call, compiled once.
    out = jax.jit(_identity, out_shardings=jax.sharding.NamedSharding(mesh, spec()))(mine)
    return np.asarray(jax.block_until_ready(out).addressable_data(0))


def _identity(x):
    return x


def _encode(error: Exception | None) -> np.ndarray:
    """[failed, exit status, message bytes...] of one process, a fixed-size uint8 row."""
    row = np.zeros(2 + _MESSAGE_BYTES, np.uint8)
    if error is not None:
        code = errors.exit_code(error)
        text = str(error) if code is not None else f"{type(error).__name__}: {error}"
        data = text.encode()[:_MESSAGE_BYTES]
        row[:2] = 1, code or 1
        row[2 : 2 + len(data)] = np.frombuffer(data, np.uint8)
    return row


def _decode(row: np.ndarray, process: int) -> Exception:
    """The error another process reported, as an error of the kind its exit status names."""
    text = row[2:].tobytes().rstrip(b"\0").decode(errors="ignore")
    kinds = {code: kind for kind, code in errors.EXIT_CODES.items()}
    kind = kinds.get(int(row[1]), RuntimeError)
    return kind(f"{text} (on process {process})")


def log(message: str) -> None:
    """Print a progress line, from process 0 only."""
    if is_primary():
        print(message, flush=True)


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
    with agreed():
        if is_primary():
            _write_atomic(Path(workdir) / "config.json", config_lib.to_json(c))


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


def write_results(path: str | os.PathLike, results: dict) -> None:
    with agreed():
        if is_primary():
            text = json.dumps(results, indent=2, sort_keys=True, default=float)
            _write_atomic(Path(path), text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file of the workdir atomically (process 0 only)."""
    if is_primary():
        _write_atomic(Path(path), text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
