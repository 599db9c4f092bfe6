"""The grid's report: per-cell rows and mean +- std over seeds, as grid.json and grid.md.

Pure functions of the cell records `run.py` collects (no JAX), so the arithmetic is tested
on its own; `write` puts them in the grid's folder. A record is a dict: `name` (cell),
`setting`, `seed`, `fp32`, `train_time_s`, and
`ptq` = {PTQ method: {'w4a4': top-1, ...}}; a cell taken from an earlier grid also has
`included_from` (that grid.json's path), and one that began from another cell's warm-up has
`warmup_from` = {'cell': that cell, 'step': the step it began at}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FP32 = "fp32"


def summarize(records: list[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; None for one seed) per (setting, PTQ method, precision).

    FP32 is one row per setting with PTQ method '-'. Rows keep the order in which settings,
    PTQ methods and bit-widths first appear in `records`.
    """
    groups: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in records:
        groups.setdefault((r["setting"], "-", FP32), []).append((r["seed"], r["fp32"]))
        for method, accs in r["ptq"].items():
            for bits, acc in accs.items():
                groups.setdefault((r["setting"], method, bits), []).append((r["seed"], acc))
    rows = []
    for (setting, method, precision), pairs in groups.items():
        values = np.asarray([v for _, v in pairs], np.float64)
        rows.append(
            {
                "setting": setting,
                "ptq": method,
                "precision": precision,
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                "n": len(values),
                "seeds": [s for s, _ in pairs],
                "values": values.tolist(),
            }
        )
    return rows


def columns(records: list[dict]) -> list[tuple[str, str]]:
    """The (PTQ method, precision) pairs any record has, in order of first appearance."""
    out: list[tuple[str, str]] = []
    for r in records:
        for method, accs in r["ptq"].items():
            out += [(method, b) for b in accs if (method, b) not in out]
    return out


def _mean_std(row: dict) -> str:
    if row["std"] is None:
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} ± {row['std']:.2f}"


def markdown(header: list[str], records: list[dict], pending: list[str]) -> str:
    """grid.md: the header lines, the mean +- std table, the per-cell table, what is pending."""
    lines = [*header, ""]
    lines += [
        "Top-1 (%) on the full test split: mean ± sample std (ddof=1) over the seeds finished.",
        "",
        "| setting | PTQ | precision | top-1 | seeds |",
        "|---|---|---|---|---|",
    ]
    for row in summarize(records):
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(
            f"| {row['setting']} | {row['ptq']} | {row['precision'].upper()} | "
            f"{_mean_std(row)} | {seeds} |"
        )
    cols = columns(records)
    heads = [f"{m} {b.upper()}" for m, b in cols]
    lines += [
        "",
        "Per cell:",
        "",
        "| " + " | ".join(["cell", "seed", "FP32", *heads, "train time, last sitting (s)"]) + " |",
        "|" + "---|" * (len(heads) + 4),
    ]
    sources: dict[str, list[str]] = {}
    for r in records:
        accs = [r["ptq"].get(m, {}).get(b) for m, b in cols]
        shown = ["-" if a is None else f"{a:.2f}" for a in accs]
        mark = "*" if "included_from" in r else ""
        forked = "†" if "warmup_from" in r else ""
        row = [f"{r['name']}{mark}{forked}", str(r["seed"]), f"{r['fp32']:.2f}", *shown]
        lines.append("| " + " | ".join([*row, f"{r.get('train_time_s', 0):.0f}"]) + " |")
        if mark:
            sources.setdefault(r["included_from"], []).append(r["name"])
    for path, names in sources.items():
        lines += ["", f"\\* included from an earlier grid, {path}: {', '.join(names)}."]
    starts = [
        f"{r['name']} from {r['warmup_from']['cell']} at step {r['warmup_from']['step']}"
        for r in records
        if "warmup_from" in r
    ]
    if starts:
        lines += [
            "",
            "† began from another cell's warm-up (the same states up to the noise stage; its "
            f"train time counts from there): {', '.join(starts)}.",
        ]
    if pending:
        lines += ["", f"Not finished yet: {', '.join(pending)}."]
    return "\n".join(lines) + "\n"


def write(workdir: Path, meta: dict, header: list[str], records: list[dict], pending: list[str]):
    """Write workdir/grid.json and workdir/grid.md atomically."""
    # The workdir's writer, imported here: the arithmetic above stays free of JAX.
    from dnq_jax.train.workdir import write_atomic

    doc = {**meta, "summary": summarize(records), "cells": records, "pending": pending}
    write_atomic(workdir / "grid.json", json.dumps(doc, indent=2, default=float))
    write_atomic(workdir / "grid.md", markdown(header, records, pending))
