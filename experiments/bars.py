"""The study's two bars, seed by seed: does a row keep FP32 within 0.5 of SGD's and gain at
least +1.0 over SGD under QDrop, at one bit-width, over the seeds both have finished?

Reads grid results (`grid.json`, experiments/results/NAME.json) whose cells are named
SETTING_sSEED, the points of experiments/qdrop_iters.py at the same count, the "now"
columns of experiments/bn_stats.py, and a grid's cells/ folder (each cell's
ptq_<method>.json); pairs each row's
cell with the baseline's of the same seed, and prints per row the mean and sample std of the
paired differences (FP32, RTN and QDrop against the baseline, over the seeds where both have
FP32 and QDrop; RTN over its own where none has QDrop), whether each bar is met on the
mean, and the per-seed differences; `--out` writes the markdown, `--plot` a figure (each
row's per-seed differences and their mean against the two bars). A row judged on fewer than
`--min-seeds` seeds is marked provisional. QDrop results of grids run at another iteration
count are refused. Where two files hold the same measurement of a cell, the later file's
value is taken.

  python experiments/bars.py --grids experiments/results/qdrop_iters.json,\\
      experiments/results/fair_points.json,experiments/results/authors_path_rtn.json,\\
      experiments/results/authors_path.json,experiments/results/fair_table.json,\\
      workdirs/dnq_table_fair/cells --out experiments/results/fair_bars.md \\
      --plot experiments/results/fair_bars.png

(`--bits w4a4` / `w2a2` with `--out experiments/results/fair_bars_w4a4.md` ... for the other
targets. W2A2 is judged at 10,000, where SGD's QDrop has levelled off: `--grids
experiments/results/fair_points.json,workdirs/dnq_table_fair/cells --bits w2a2 --qdrop-iters
10000 --out experiments/results/fair_bars_w2a2_10000.md`. The ablations, every value by one
code: `--grids experiments/results/bn_stats_qdrop.json,experiments/results/qdrop_sgd_now.json,\
experiments/results/dnq_ablations_fair.json --rows ROW,... --out
experiments/results/ablation_bars.md`; `--rows` leaves out the rest, named under the tables.)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

CELL = re.compile(r"(?P<setting>.+)_s(?P<seed>\d+)$")


def load(paths: list[str], qdrop_iters: int) -> dict[tuple[str, int], dict]:
    """(setting, seed) -> {'fp32': x, 'rtn': x, 'qdrop': x} over all bit-widths as
    {'rtn': {bits: acc}, ...}; a grid whose QDrop ran at another count is refused."""
    cells: dict[tuple[str, int], dict] = {}
    for p in paths:
        if Path(p).is_dir():  # a grid's cells/ folder: each cell's ptq_<method>.json
            for f in sorted(Path(p).glob("*/ptq_*.json")):
                m, doc = CELL.match(f.parent.name), json.loads(f.read_text())
                settings = doc.get("settings", {})
                if not m or (
                    settings.get("method") == "qdrop" and settings.get("iters") != qdrop_iters
                ):
                    continue
                rec = cells.setdefault((m["setting"], int(m["seed"])), {"fp32": None})
                rec["fp32"] = doc.get("fp32", rec["fp32"])
                accs = {b: doc[b] for b in settings.get("bits", []) if b in doc}
                rec.setdefault(settings.get("method"), {}).update(accs)
            continue
        doc = json.loads(Path(p).read_text())
        if "points" in doc:  # experiments/qdrop_iters.py: its points at this count
            for point in doc["points"]:
                m = CELL.match(point["cell"])
                # the tables' reconstruction seed only (qdrop_iters.py --recon-seeds)
                if m and point["iters"] == qdrop_iters and point.get("recon_seed", 0) == 0:
                    rec = cells.setdefault((m["setting"], int(m["seed"])), {"fp32": None})
                    rec["fp32"] = point["fp32"]
                    rec.setdefault(doc["method"], {})[point["bits"]] = point["top1"]
            continue
        if doc.get("cells") and "fp32_now" in doc["cells"][0]:  # experiments/bn_stats.py
            _bn_stats_now(doc["cells"], cells, qdrop_iters, p)
            continue
        methods = doc.get("ptq") or ""
        if "qdrop" in methods and doc.get("ptq_iters") != qdrop_iters:
            raise SystemExit(
                f"{p}: QDrop at {doc.get('ptq_iters')} iterations per block, not "
                f"{qdrop_iters} (--qdrop-iters)"
            )
        for cell in doc["cells"]:
            m = CELL.match(cell["name"])
            if not m:
                continue
            rec = cells.setdefault((m["setting"], int(m["seed"])), {"fp32": None})
            if cell.get("fp32") is not None:
                rec["fp32"] = cell["fp32"]
            for method, accs in (cell.get("ptq") or {}).items():
                rec.setdefault(method, {}).update(accs)
    return cells


def _bn_stats_now(rows: list[dict], cells: dict, qdrop_iters: int, path: str) -> None:
    """The "now" columns of experiments/bn_stats.py (each cell measured by today's code with
    its statistics as the trainer re-estimates them) into `cells`; QDrop only where its
    recorded count is `qdrop_iters`, and a file without the count is refused."""
    for row in rows:
        m = CELL.match(row["cell"])
        if not m:
            continue
        rec = cells.setdefault((m["setting"], int(m["seed"])), {"fp32": None})
        rec["fp32"] = row["fp32_now"]
        rec.setdefault("rtn", {})[row["bits"]] = row["rtn_now"]
        if "qdrop_now" in row:
            if row.get("qdrop_iters") != qdrop_iters:
                raise SystemExit(
                    f"{path}: {row['cell']}'s QDrop at {row.get('qdrop_iters', 'an unrecorded')}"
                    f" iterations per block, not {qdrop_iters} (--qdrop-iters)"
                )
            rec.setdefault("qdrop", {})[row["bits"]] = row["qdrop_now"]


def differences(cells: dict, baseline: str, bits: str) -> dict[str, dict[str, dict[int, float]]]:
    """setting -> measure ('FP32', 'RTN', 'QDrop') -> seed -> row minus baseline, for the
    seeds where both have the measurement."""

    def measure(rec: dict, name: str) -> float | None:
        if name == "FP32":
            return rec.get("fp32")
        return (rec.get(name.lower()) or {}).get(bits)

    out: dict[str, dict[str, dict[int, float]]] = {}
    for (setting, seed), rec in sorted(cells.items()):
        base = cells.get((baseline, seed))
        if setting == baseline or base is None:
            continue
        row = out.setdefault(setting, {"FP32": {}, "RTN": {}, "QDrop": {}})
        for name in row:
            a, b = measure(rec, name), measure(base, name)
            if a is not None and b is not None:
                row[name][seed] = a - b
    return out


def judged(row: dict[str, dict[int, float]], measure: str) -> dict[int, float]:
    """`row[measure]` over the seeds the row is judged on (those with FP32 and QDrop); over
    its own seeds where none has QDrop (a training-only pass)."""
    seeds = set(row["FP32"]) & set(row["QDrop"])
    return {s: v for s, v in row[measure].items() if s in seeds or not seeds}


def _fmt(xs: dict[int, float]) -> str:
    if not xs:
        return "-"
    vals = list(xs.values())
    return f"{statistics.mean(vals):+.2f}" + (
        f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
    )


def report(
    diffs: dict,
    *,
    bits: str,
    baseline: str,
    fp32_bar: float,
    qdrop_bar: float,
    min_seeds: int,
    qdrop_iters: int,
) -> str:
    head = (
        f"Paired differences against `{baseline}` (same seed) at {bits.upper()}: mean ± sample "
        f"std over the seeds both finished; QDrop at {qdrop_iters:,} iterations per block. "
        f"Bars: FP32 at least -{fp32_bar} and QDrop at least +{qdrop_bar}, on the mean; a "
        f"row with fewer than {min_seeds} seeds is provisional."
    )
    lines = [
        head,
        "",
        "| row | seeds | FP32 | RTN | QDrop | FP32 bar | QDrop bar | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    per_seed = [
        "",
        "Per seed (row minus baseline; FP32 / RTN / QDrop):",
        "",
        "| row | seed | FP32 | RTN | QDrop |",
        "|---|---|---|---|---|",
    ]
    for setting, row in diffs.items():
        seeds = sorted(set(row["FP32"]) & set(row["QDrop"]))
        fp, q = ({s: row[k][s] for s in seeds} for k in ("FP32", "QDrop"))
        rtn = judged(row, "RTN")
        if seeds:
            fp_ok = statistics.mean(fp.values()) >= -fp32_bar
            q_ok = statistics.mean(q.values()) >= qdrop_bar
            verdict = "meets both" if fp_ok and q_ok else "misses"
            if len(seeds) < min_seeds:
                verdict += f" (provisional, {len(seeds)} seed{'s' * (len(seeds) > 1)})"
            marks = ("yes" if fp_ok else "no", "yes" if q_ok else "no")
        else:
            verdict, marks = "no seed with FP32 and QDrop", ("-", "-")
        seed_list = ",".join(map(str, seeds)) or "-"
        lines.append(
            f"| {setting} | {seed_list} | {_fmt(fp)} | {_fmt(rtn)} | {_fmt(q)} | "
            f"{marks[0]} | {marks[1]} | {verdict} |"
        )
        for s in sorted(set(row["FP32"]) | set(row["RTN"]) | set(row["QDrop"])):
            vals = [row[k].get(s) for k in ("FP32", "RTN", "QDrop")]
            cells = " | ".join("-" if v is None else f"{v:+.2f}" for v in vals)
            per_seed.append(f"| {setting} | {s} | {cells} |")
    return "\n".join(lines + per_seed) + "\n"


def plot(diffs: dict, path: str, *, bits: str, baseline: str, fp32_bar: float, qdrop_bar: float):
    """Two panels, FP32 and QDrop minus the baseline: each row's seeds (dots) and their mean
    (a bar), the study's bar as a dashed line; a row is on the good side right of the line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(diffs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(names) + 1.6), sharey=True)
    for ax, measure, bar in ((axes[0], "FP32", -fp32_bar), (axes[1], "QDrop", qdrop_bar)):
        for y, name in enumerate(names):
            vals = list(judged(diffs[name], measure).values())
            if vals:
                ax.barh(y, statistics.mean(vals), color="#9ecae1", height=0.6)
                ax.plot(vals, [y] * len(vals), "o", color="#08519c", ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(bar, color="#d62728", ls="--", lw=1, label=f"bar ({bar:+g})")
        ax.set_xlabel(f"{measure} minus {baseline} (points, {bits.upper()})")
        ax.legend(loc="lower left", fontsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("Paired by seed: dots are seeds, bars their mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--grids", required=True, help="comma-separated grid json files and cells/ folders"
    )
    ap.add_argument("--bits", default="w2a4")
    ap.add_argument("--baseline", default="sgd")
    ap.add_argument("--qdrop-iters", type=int, default=5000)
    ap.add_argument("--fp32-bar", type=float, default=0.5)
    ap.add_argument("--qdrop-bar", type=float, default=1.0)
    ap.add_argument("--min-seeds", type=int, default=3)
    ap.add_argument(
        "--rows", default="", help="comma-separated settings to report (default: every one)"
    )
    ap.add_argument("--out", default="")
    ap.add_argument("--plot", default="", help="write the figure here (png)")
    args = ap.parse_args(argv)
    paths = [p for p in args.grids.split(",") if p]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        print(f"no such grid file or cells folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    cells = load(paths, args.qdrop_iters)
    if not any(setting == args.baseline for setting, _ in cells):
        print(f"no '{args.baseline}' cell in {', '.join(paths)}", file=sys.stderr)
        return 2
    every = differences(cells, args.baseline, args.bits)
    picked = [r for r in args.rows.split(",") if r]
    unknown = [r for r in picked if r not in every]
    if unknown:
        print(
            f"no such row: {', '.join(unknown)}; choose from: {', '.join(every)}", file=sys.stderr
        )
        return 2
    left_out = [k for k in every if picked and k not in picked]
    every = {k: row for k, row in every.items() if k not in left_out}
    # Rows measured at other bit-widths only (their FP32 difference alone) are named once.
    diffs = {k: row for k, row in every.items() if row["RTN"] or row["QDrop"]}
    text = report(
        diffs,
        bits=args.bits,
        baseline=args.baseline,
        fp32_bar=args.fp32_bar,
        qdrop_bar=args.qdrop_bar,
        min_seeds=args.min_seeds,
        qdrop_iters=args.qdrop_iters,
    )
    if left_out:
        text += f"\nLeft out (--rows): {', '.join(left_out)}.\n"
    elsewhere = [k for k in every if k not in diffs]
    if elsewhere:
        text += f"\nNo RTN or QDrop result at {args.bits.upper()}: {', '.join(elsewhere)}.\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    if args.plot:
        plot(
            diffs,
            args.plot,
            bits=args.bits,
            baseline=args.baseline,
            fp32_bar=args.fp32_bar,
            qdrop_bar=args.qdrop_bar,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
