"""Carry a grid's unfinished cells from one sitting (or machine) to the next.

A cell of a table trains for over an hour on a 2-core CPU, and a sitting that ends kills it:
its checkpoints live in the grid's workdir, which a fresh clone does not have. `save` packs
each unfinished cell's newest complete checkpoint (or, for a cell trained but not yet
PTQ-evaluated, its final variables and results), its config.json and its metrics rows up to
that step into `<parked>/<cell>.tar.gz` (under 1 MB for ResNet-8), to be committed; `restore`
unpacks them into a workdir that does not hold the cell yet, where the grid resumes the cell
from that checkpoint (the trainer's own resume: bit-exact). A parked cell that has since
finished is removed by the next `save`.

Warm-ups (`fork.py`): a cell's archive also holds its `noise_start/` state, and for each
warm-up (seed and settings but the noise keys) that no unfinished cell carries, one finished
cell that kept it is parked as a donor (config, metrics up to it, `noise_start/`, no
checkpoint), so the cells of the next sitting that share it begin from it.

The command line is `experiments/park.py` (`main` here, with the experiments' folder of
parked cells).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

from dnq_jax.grid import fork
from dnq_jax.train import metrics


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _pack(cell: Path, archive: Path, parts: list[Path], rows_to: int | None) -> None:
    """Write the cell's config.json, its metrics rows (up to step `rows_to`; None: all) and
    `parts` (files and folders of the cell) to `archive`, atomically."""
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(cell / "config.json", "config.json")
        _add_bytes(tar, "metrics.jsonl", metrics.text_upto(cell, rows_to).encode())
        for part in parts:
            tar.add(part, str(part.relative_to(cell)))
    tmp.replace(archive)


def _warmup(cell: Path) -> str:
    return fork.warmup_key(json.loads((cell / "config.json").read_text()))


def _reported(workdir: Path) -> set[str] | None:
    """The cells the grid's report counts as finished (trained and PTQ-evaluated), or None
    when there is no readable grid.json."""
    try:
        doc = json.loads((workdir / "grid.json").read_text())
    except (OSError, ValueError):
        return None
    return {r["name"] for r in doc.get("cells", [])} - set(doc.get("pending", []))


def _is_donor_archive(archive: Path) -> bool:
    """Whether `archive` holds a warm-up only (no checkpoint, no final variables)."""
    try:
        with tarfile.open(archive) as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError):
        return False
    return not any(n.startswith(("checkpoints", "final")) for n in names)


def save(workdir: Path, parked: Path, keep_final: bool = False) -> list[str]:
    """Pack every unfinished cell, and one finished donor per warm-up no unfinished cell
    carries; drop the parked copies of the other finished cells. A cell trained but not yet
    PTQ-evaluated (grid.json lists it as pending) is packed with its final variables and
    results. `keep_final`: finished cells are packed like those, final variables and all,
    for another grid that evaluates them with other PTQ settings (e.g. a training-only pass,
    then QDrop in a later sitting). Returns the cells packed."""
    out, carried, donors, finished = [], set(), {}, []
    reported = _reported(workdir)
    for cell in sorted((workdir / "cells").glob("*")):
        if cell.name.startswith(".") or not (cell / "config.json").exists():
            continue  # a temporary folder, or not a run
        start = fork.start_state(cell)
        trained = (cell / "results.json").exists()
        if trained and (reported is None or cell.name in reported) and not keep_final:
            finished.append(cell)
            if start is not None:
                donors.setdefault(_warmup(cell), (cell, start))
            continue
        packed = _park_unfinished(cell, parked, start, trained)
        if packed:
            out.append(cell.name)
            if start is not None:
                carried.add(_warmup(cell))
    kept = {cell.name: start for key, (cell, start) in donors.items() if key not in carried}
    for cell in finished:
        _park_finished(cell, parked, kept.get(cell.name))
    return out


def _park_unfinished(cell: Path, parked: Path, start: Path | None, trained: bool) -> bool:
    """Pack an unfinished cell (with its warm-up `start`, if any); False when it has nothing
    to pack yet (no complete checkpoint)."""
    archive = parked / f"{cell.name}.tar.gz"
    step = None if trained else fork.newest_checkpoint(cell)
    if trained:
        parts = [cell / "final", *sorted(cell.glob("*.json"))]
        parts = [q for q in parts if q.name != "config.json"]
        what = "trained: final variables and results"
    elif step is not None:
        parts, what = [step], f"at step {step.name}"
    else:
        return False
    if start is not None:
        parts.append(start)
    parked.mkdir(parents=True, exist_ok=True)
    _pack(cell, archive, parts, None if trained else int(step.name))
    print(f"{cell.name}: parked {what} ({archive.stat().st_size // 1024} KB)")
    return True


def _park_finished(cell: Path, parked: Path, start: Path | None) -> None:
    """Keep a finished cell's warm-up `start` as a donor archive (None: it is not needed,
    and a parked copy of the cell is removed)."""
    archive = parked / f"{cell.name}.tar.gz"
    if start is not None:
        if not _is_donor_archive(archive):  # a warm-up never changes: written once
            parked.mkdir(parents=True, exist_ok=True)
            _pack(cell, archive, [start], int(start.name))
            print(f"{cell.name}: its warm-up (step {start.name}) parked for the cells after it")
    elif archive.exists():
        archive.unlink()
        print(f"{cell.name}: finished, parked copy removed")


def restore(workdir: Path, parked: Path) -> list[str]:
    """Unpack each parked cell whose folder the workdir does not have."""
    out = []
    for archive in sorted(parked.glob("*.tar.gz")):
        name = archive.name[: -len(".tar.gz")]
        cell = workdir / "cells" / name
        if cell.exists():
            continue
        # Into a temporary folder renamed into place: an interrupted restore leaves no
        # half-filled cell behind (which a later restore would skip).
        tmp = cell.with_name(f".{name}.restoring")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            _extract(tar, tmp)
        tmp.rename(cell)
        out.append(name)
        print(f"{name}: restored from {archive}")
    return out


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract plain files and folders under `dest` only (Python's 'data' filter where it
    exists; the same checks by hand on a Python 3.11 older than 3.11.4)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for m in tar.getmembers():
        parts = Path(m.name).parts
        if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"{tar.name}: refusing to extract {m.name!r}")
    tar.extractall(dest)
