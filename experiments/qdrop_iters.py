"""QDrop's top-1 against its iterations per block, for finished runs: where does it stop rising?

A reconstruction run too short to repair a bad start punishes the sharper model twice (once by
the rounding, once by the unfinished repair), so a comparison of training methods under QDrop
is only fair at a count where every model has stopped rising. This script measures that curve.

  python experiments/qdrop_iters.py --workdir workdirs/dnq_table_fair \
      --cells sgd_s0,dnq_w2a4_s0 --bits w2a4,w4a4 --iters 200,500,1000,2000,5000

Each (iterations, cell, bit-width) point is computed once and written to
experiments/results/NAME.json as soon as it is measured (NAME: --name, default qdrop_iters),
with NAME.md (a table) and NAME.png (the curves); run the same command again to continue an
interrupted sweep. Points run count by count (every cell at 200 before any at 500), so an
interrupted sweep still gives whole curves up to some count. Calibration, kept 8-bit ends and
everything but the method and its iteration count are the run's own `eval`/`quant` settings.

`--recon-seeds 0,1,2` repeats each point with other reconstruction seeds (the calibration
batches each iteration draws and QDrop's drop masks; 0 is the seed every table uses): how far
one model's QDrop result moves by the reconstruction's own randomness. The table then gives
the mean ± sample std over the seeds, and every seed's value below it.

  python experiments/qdrop_iters.py --workdir workdirs/dnq_table_fair \
      --cells sgd_s0,dnq_w2a4_s0 --bits w2a4 --iters 5000 --recon-seeds 0,1,2 --name qdrop_seeds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnq_jax.train import config as config_lib  # noqa: E402
from dnq_jax.train import evaluate  # noqa: E402
from dnq_jax.train import results as results_lib  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def _seed(point: dict) -> int:
    return point.get("recon_seed", 0)  # points written before the option: seed 0


def _by_point(points: list[dict]) -> dict[tuple, list[float]]:
    """{(cell, bits, iters): [top-1 of each reconstruction seed, by seed]}."""
    out: dict[tuple, list[tuple[int, float]]] = {}
    for p in points:
        out.setdefault((p["cell"], p["bits"], p["iters"]), []).append((_seed(p), p["top1"]))
    return {k: [v for _, v in sorted(vals)] for k, vals in out.items()}


def _mean_std(vals: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for one value) of one point's seeds."""
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _cell_text(vals: list[float] | None) -> str:
    if not vals:
        return ""
    mean, std = _mean_std(vals)
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f} ({len(vals)})"


def _write(out: Path, results: dict) -> None:
    results_lib.write(out.with_suffix(".json"), results)
    points = results["points"]
    cells = list(dict.fromkeys(p["cell"] for p in points))
    bits = list(dict.fromkeys(p["bits"] for p in points))
    iters = sorted({p["iters"] for p in points})
    lookup = _by_point(points)
    seeds = sorted({_seed(p) for p in points})
    head = "| cell | bits | " + " | ".join(str(i) for i in iters) + " |"
    lines = [
        f"# QDrop top-1 (%) against iterations per block ({results['method']})",
        "",
        head,
        "|" + "---|" * (2 + len(iters)),
    ]
    for cell in cells:
        for b in bits:
            text = [_cell_text(lookup.get((cell, b, i))) for i in iters]
            if any(text):
                lines.append(f"| {cell} | {b.upper()} | " + " | ".join(text) + " |")
    if seeds != [0]:
        lines += [
            "",
            "Mean ± sample std (number of seeds) over the reconstruction seeds "
            f"{', '.join(map(str, seeds))}; each seed's value:",
            "",
        ]
        for p in sorted(points, key=lambda q: (q["cell"], q["bits"], q["iters"], _seed(q))):
            lines.append(
                f"- {p['cell']} {p['bits'].upper()} {p['iters']} seed {_seed(p)}: {p['top1']:.2f}"
            )
    lines += ["", "Wall time of each point (s, this machine):", ""]
    for p in points:
        seed = f" seed {_seed(p)}" if seeds != [0] else ""
        lines.append(f"- {p['cell']} {p['bits'].upper()} {p['iters']}{seed}: {p['time_s']:.0f}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(out.with_suffix(".png"), points, cells, bits)


def _plot(path: Path, points: list[dict], cells: list[str], bits: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bits), figsize=(5 * len(bits), 3.8), squeeze=False)
    lookup = _by_point(points)
    for ax, b in zip(axes[0], bits):
        for cell in cells:
            pts = sorted((i, v) for (c, bb, i), v in lookup.items() if c == cell and bb == b)
            if pts:
                stats = [_mean_std(v) for _, v in pts]
                x, mean, err = (
                    [i for i, _ in pts],
                    [m for m, _ in stats],
                    [e or 0.0 for _, e in stats],
                )
                ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=cell)
        ax.set_xscale("log")
        ticks = sorted({p["iters"] for p in points})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("QDrop iterations per block")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(b.upper())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the grid's workdir (cells/ inside)")
    p.add_argument("--cells", required=True, help="finished cells, comma-separated")
    p.add_argument("--bits", default="w2a4,w4a4")
    p.add_argument("--iters", default="200,500,1000,2000,5000")
    p.add_argument("--method", default="qdrop", choices=["qdrop", "brecq", "adaround"])
    p.add_argument("--name", default="qdrop_iters")
    p.add_argument(
        "--recon-seeds", default="0", help="reconstruction seeds, comma-separated (0: the tables')"
    )
    a = p.parse_args(argv)
    try:
        recon_seeds = _ints(a.recon_seeds)
    except ValueError:
        p.error(f"--recon-seeds takes integers, comma-separated, not {a.recon_seeds!r}")
    if not recon_seeds or min(recon_seeds) < 0:
        p.error(f"--recon-seeds takes seeds >= 0, not {a.recon_seeds!r}")
    out = ROOT / "experiments" / "results" / a.name
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {"method": a.method, "workdir": a.workdir, "points": [], **results}
    done = {(q["cell"], q["bits"], q["iters"], _seed(q)) for q in results["points"]}
    cells = [c.strip() for c in a.cells.split(",") if c.strip()]
    for cell in cells:
        if not (Path(a.workdir) / "cells" / cell / "results.json").exists():
            print(f"qdrop_iters: cell {cell} has not finished training in {a.workdir}")
            return 2
    bits = config_lib.parse_bits(a.bits)
    loaded, ds = {}, None
    todo = [
        (i, cell, b, r) for i in _ints(a.iters) for r in recon_seeds for cell in cells for b in bits
    ]  # count by count, and within a count seed by seed: an interrupted sweep stays paired
    for iters, cell, (wb, ab), seed in todo:
        name = config_lib.bits_name(wb, ab)
        if (cell, name, iters, seed) in done:
            continue
        if cell not in loaded:
            loaded[cell] = evaluate.load_run(str(Path(a.workdir) / "cells" / cell), ds)
            ds = loaded[cell][3]
        c, model, variables, ds = loaded[cell]
        settings = evaluate.EvalSettings.from_config(
            c, bits=((wb, ab),), method=a.method, iters=iters, recon_seed=seed
        )
        t0 = time.time()
        r = evaluate.evaluate_variables(model, variables, ds, settings, progress=False)
        point = {
            "cell": cell,
            "bits": name,
            "iters": iters,
            "recon_seed": seed,
            "top1": r[name],
            "fp32": r["fp32"],
            "time_s": round(time.time() - t0, 1),
            # Each block's output error after reconstruction: which model this point measured.
            "loss_after": [
                float(b["loss_after"])
                for b in r.get("reconstruction", {}).get(name, {}).get("blocks", [])
            ],
        }
        results["points"].append(point)
        _write(out, results)
        print(
            f"qdrop_iters: {cell} {name} {iters} it., seed {seed}: {point['top1']:.2f} "
            f"({point['time_s']:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
