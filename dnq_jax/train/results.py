"""The PTQ result files of a workdir, in one place: their names, reading, writing, whether
they were measured with given settings, and merging a new measurement into an old one.

A run's workdir holds up to three kinds, all of one shape ({'fp32': top-1, 'w4a4': top-1,
..., 'settings': {...}}, plus 'reconstruction' reports for the reconstruction methods):

- `TRAINED` (results.json): the trainer's own evaluation at the end of the run;
- `EVALUATED` (ptq_results.json): what `evaluate.py` (or the report) measured last;
- `method_file(method)` (ptq_<method>.json): a grid's measurement with one PTQ method, kept
  across sittings and merged bit-width by bit-width.

Reading needs no JAX (the grid's report imports this module to read its files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

TRAINED = "results.json"
EVALUATED = "ptq_results.json"
_PRECISION = re.compile(r"^w\d+a\d+$")
# Keys of results.json that describe the training run, not a PTQ measurement.
_TRAINING_KEYS = ("swa_snapshots", "steps")


def method_file(method: str) -> str:
    """'qdrop' -> 'ptq_qdrop.json': a grid's results of one PTQ method."""
    return f"ptq_{method}.json"


def is_accuracy_key(key: str) -> bool:
    """Whether a results key holds a top-1 accuracy: 'fp32' or a precision such as 'w4a4'."""
    return key == "fp32" or bool(_PRECISION.match(key))


def read(path: str | os.PathLike) -> dict:
    """The JSON object at `path`, or {} when it is missing or unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write(path: str | os.PathLike, results: dict) -> None:
    """Write `results` as JSON atomically, from process 0 only (every process enters)."""
    from dnq_jax.train import hosts, workdir  # JAX: reading the files needs none

    with hosts.agreed():
        if hosts.is_primary():
            text = json.dumps(results, indent=2, sort_keys=True, default=float)
            workdir.write_atomic(Path(path), text)


def in_workdir(wd: str | os.PathLike) -> list[tuple[str, dict]]:
    """(file name, results) of every PTQ result file in `wd` that holds an FP32 top-1:
    results.json, ptq_results.json, then the ptq_<method>.json files by name."""
    wd = Path(wd)
    names = [TRAINED, EVALUATED]
    names += sorted(p.name for p in wd.glob("ptq_*.json") if p.name not in names)
    found = [(name, read(wd / name)) for name in names]
    return [(name, r) for name, r in found if "fp32" in r]


def accuracies(results: dict) -> dict[str, float]:
    """FP32 first, then the precisions in the order evaluated (the files sort their keys)."""
    order = ["fp32", *results.get("settings", {}).get("bits", []), *sorted(results)]
    keys = [k for k in dict.fromkeys(order) if k in results and is_accuracy_key(k)]
    return {k: float(results[k]) for k in keys}


def compatible(saved: dict, want: Any) -> bool:
    """Whether `saved` was measured with the settings of `want` (a settings dataclass such
    as `evaluate.EvalSettings`), bit-widths aside."""
    s = saved.get("settings", {})
    fields = [f.name for f in dataclasses.fields(want) if f.name != "bits"]
    return all(s.get(f) == getattr(want, f) for f in fields)


def ptq_only(results: dict) -> dict:
    """`results` without the keys that describe the training run (results.json's)."""
    return {k: v for k, v in results.items() if k not in _TRAINING_KEYS}


def merge(old: dict, new: dict) -> dict:
    """`old` with `new`'s measurements added (same settings, other bit-widths): accuracies
    and reconstruction reports joined, the bit-width list extended, eval times summed."""
    if not old:
        return new
    out = {**old, **{k: v for k, v in new.items() if k not in ("settings", "reconstruction")}}
    if "reconstruction" in new:
        out["reconstruction"] = {**old.get("reconstruction", {}), **new["reconstruction"]}
    settings = dict(new["settings"])
    settings["bits"] = list(dict.fromkeys([*old["settings"]["bits"], *settings["bits"]]))
    settings["eval_time_s"] = old["settings"].get("eval_time_s", 0) + settings["eval_time_s"]
    out["settings"] = settings
    return out
