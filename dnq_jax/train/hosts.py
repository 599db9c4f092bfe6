"""Several processes (`jax.distributed`, one per host) agreeing: who writes, and how it went.

Every write of the workdir is made by process 0 alone (`is_primary`), inside an `agreed`
block that every process enters: it ends with a collective, so the others go on only once
process 0's write is done, and an error raised by any process in the block is raised by all
of them (same type, same message, same exit status) instead of leaving the others waiting at
the next collective for a process that has exited. One process (the default) needs none of
this and gets none of it.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from dnq_jax import errors

# Bytes of an error message passed between processes by `agreed` (longer ones are cut).
_MESSAGE_BYTES = 2048


def is_primary() -> bool:
    """Whether this process writes the workdir (process 0; the only one without
    `jax.distributed`)."""
    return jax.process_index() == 0


def log(message: str) -> None:
    """Print a progress line, from process 0 only."""
    if is_primary():
        print(message, flush=True)


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
