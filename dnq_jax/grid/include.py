"""Cells finished by earlier grids (`--include OLD/grid.json`), reported with this one.

A grid can span machines whose cell folders are gone: the finished cells of an earlier grid of
the same `--config` and PTQ settings count as finished here (not trained again; their rows are
marked as included), so seeds run elsewhere join one mean ± std; its cells of settings this
grid does not have are reported too, so a grid run for a few settings keeps the others' rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dnq_jax.errors import ConfigError
from dnq_jax.grid.cells import Cell
from dnq_jax.train import config as config_lib
from dnq_jax.train import results


def load_included(
    paths: Iterable[str | Path], cells: list[Cell], config: str, ptq: list[str], iters: int
) -> dict[str, dict]:
    """Finished cells of earlier grids (their grid.json), by name, to report with this one.

    Each file must come from a grid of the same `--config` string and reconstruction iteration
    count (ConfigError otherwise). A record named like a cell of this grid stands for it when
    its overrides are the cell's and it holds every PTQ method at every bit-width the cell
    evaluates (else the cell runs here). A record of another setting is carried over as it is
    when it holds every PTQ method, so a grid run for some settings keeps the others' rows.
    What is left out is printed.
    """
    by_name = {c.name: c for c in cells}
    overrides = {c.setting: c.overrides for c in cells}
    out: dict[str, dict] = {}
    for path in map(Path, paths):
        doc = _read_grid(path, config, iters)
        skipped = []
        for r in doc["cells"]:
            keys = _usable_keys(r, by_name.get(r.get("name")), overrides, ptq)
            if keys is None:
                skipped.append(str(r.get("name")))
                continue
            have = r.get("ptq", {})
            ptq_accs = {m: {k: have[m][k] for k in keys[m]} for m in ptq}
            out[r["name"]] = {**r, "ptq": ptq_accs, "included_from": str(path)}
        if skipped:
            print(
                f"dnq_jax grid: --include {path}: left out (other overrides, or PTQ results "
                f"missing): {', '.join(skipped)}"
            )
    return out


def _read_grid(path: Path, config: str, iters: int) -> dict:
    """The grid.json at `path`, checked to come from a grid of the same settings."""
    if not path.is_file():
        raise ConfigError(f"--include: no file {path}")
    doc = results.read(path)
    if "cells" not in doc:
        raise ConfigError(f"--include: {path} is not a readable grid.json (no 'cells')")
    for key, want in (("config", config), ("ptq_iters", iters)):
        if doc.get(key) != want:
            raise ConfigError(
                f"--include: {path} was run with {key} {doc.get(key)!r}, this grid with "
                f"{want!r}; only a grid of the same settings can be included"
            )
    return doc


def _usable_keys(
    r: dict, cell: Cell | None, overrides: dict[str, str], ptq: list[str]
) -> dict[str, list[str]] | None:
    """The precisions of record `r` to carry per PTQ method, or None when it cannot stand in:
    for a cell of this grid (`cell`), its overrides and every bit-width it evaluates; for
    another cell, all its bit-widths, and the overrides of its setting if this grid has it."""
    have = r.get("ptq", {})
    if cell is None:  # another cell: carried with all its bit-widths
        keys = {m: list(have.get(m, {})) for m in ptq}
        usable = all(keys.values())
        # A seed of a setting this grid has joins its mean only with its overrides.
        mine = overrides.get(r.get("setting"), r.get("overrides"))
        usable = usable and r.get("overrides") == mine
    else:
        keys = {m: [config_lib.bits_name(*b) for b in cell.bits_for(m)] for m in ptq}
        usable = r.get("overrides") == cell.overrides and all(
            k in have.get(m, {}) for m in ptq for k in keys[m]
        )
    return keys if usable else None
