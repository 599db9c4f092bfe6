"""Metrics to JSON lines (workdir/metrics.jsonl) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dnq_jax.train import hosts


def _plain(v: Any) -> Any:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return v
    return v if math.isfinite(v) else str(v)


class MetricWriter:
    """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard.

    Each line is flushed and fsynced, so a killed run keeps every line it wrote.
    TensorBoard output needs tensorboardX; without it only the JSON lines are written.
    With several processes only process 0 writes, inside `hosts.agreed` blocks: every
    process calls, and a failed write stops them all.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        self.enabled = hosts.is_primary()
        with hosts.agreed():
            if self.enabled:
                _end_torn_line(self.path)
                if tensorboard:
                    self._tb = _tensorboard(workdir)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        with hosts.agreed():
            if self.enabled:
                self._write(step, scalars)

    def _write(self, step: int, scalars: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard(workdir: str | os.PathLike):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(workdir))


def _end_torn_line(path: Path) -> None:
    """A run killed mid-write may leave the file without its final newline; end that line
    so the next row is not glued onto it (`read` skips the torn line alone)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def read(workdir: str | os.PathLike) -> list[dict]:
    """All rows of workdir/metrics.jsonl (a torn last line from a crash is skipped)."""
    path = Path(workdir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def text_upto(workdir: str | os.PathLike, step: int | None) -> str:
    """workdir/metrics.jsonl's rows up to `step` (None: all) as JSON lines: the history a
    run restored or begun at that step takes along."""
    rows = [r for r in read(workdir) if step is None or r.get("step", step + 1) <= step]
    return "".join(json.dumps(r) + "\n" for r in rows)
