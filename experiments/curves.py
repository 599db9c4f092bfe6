"""Training curves of a grid's cells, and whether each one's test accuracy has stopped rising.

Reads each cell's metrics.jsonl under WORKDIR/cells, finished or not (a cell still training
shows the epochs it has done; a parked one, once `experiments/park.py restore` has put it
back), and its config.json for the epochs planned. Prints per cell the epochs done, the test
top-1 (FP32) at each evaluation, the last and best of them, and the rise over the last
`--window` epochs (last evaluation minus the one `--window` epochs before it, or the first
one if there is none that early); `--out` writes that as markdown, `--plot` draws train
loss, top-1 and lambda per epoch for every cell (dnq_jax.diagnostics.plots.training_curves).

  python experiments/curves.py workdirs/cifar10_resnet20 --window 10 \\
      --out experiments/results/cifar10_resnet20_curves.md \\
      --plot experiments/results/cifar10_resnet20_curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dnq_jax.diagnostics import plots
from dnq_jax.train import metrics


def curve(cell: Path) -> dict:
    """{'epochs_done', 'epochs_planned', 'test': [(epoch, top-1)], 'rows': epoch rows}."""
    rows = [r for r in metrics.read(cell) if "epoch" in r]
    planned = None
    if (cell / "config.json").exists():
        planned = json.loads((cell / "config.json").read_text())["optim"]["num_epochs"]
    return {
        "epochs_done": int(max((r["epoch"] for r in rows), default=0)),
        "epochs_planned": planned,
        "test": [(int(r["epoch"]), float(r["test_acc"])) for r in rows if "test_acc" in r],
        "rows": rows,
    }


def rise(test: list[tuple[int, float]], window: int) -> float | None:
    """Last top-1 minus the one `window` epochs before it (the latest at or before that
    epoch; the first evaluation if none is that early); None with fewer than 2 points."""
    if len(test) < 2:
        return None
    last_epoch, last = test[-1]
    earlier = [acc for ep, acc in test[:-1] if ep <= last_epoch - window]
    return last - (earlier[-1] if earlier else test[0][1])


def table(curves: dict[str, dict], window: int) -> str:
    lines = [
        f"| cell | epochs | last top-1 | best top-1 | rise over the last {window} epochs "
        "| test top-1 by epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in curves.items():
        test = c["test"]
        of = f" of {c['epochs_planned']}" if c["epochs_planned"] else ""
        r = rise(test, window)
        lines.append(
            f"| {name} | {c['epochs_done']}{of} "
            f"| {f'{test[-1][1]:.2f}' if test else '-'} "
            f"| {f'{max(a for _, a in test):.2f}' if test else '-'} "
            f"| {f'{r:+.2f}' if r is not None else '-'} "
            f"| {', '.join(f'{ep}: {acc:.2f}' for ep, acc in test) or '-'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", help="a grid's workdir (its cells/ folder is read)")
    ap.add_argument("--window", type=int, default=10, help="epochs the rise is taken over")
    ap.add_argument("--out", help="write the table as markdown here")
    ap.add_argument("--plot", help="draw the curves here (png)")
    args = ap.parse_args(argv)
    if args.window < 1:
        ap.error("--window must be at least 1")
    cells = Path(args.workdir) / "cells"
    if not cells.is_dir():
        print(f"curves.py: {cells} is not a folder: give a grid's workdir", file=sys.stderr)
        return 2
    curves = {p.name: curve(p) for p in sorted(cells.iterdir()) if p.is_dir()}
    curves = {n: c for n, c in curves.items() if c["rows"]}
    if not curves:
        print(f"curves.py: no cell under {cells} has trained an epoch yet", file=sys.stderr)
        return 1
    md = table(curves, args.window)
    print(md)
    if args.out:
        head = f"Training curves of {args.workdir} (experiments/curves.py)\n\n"
        Path(args.out).write_text(head + md + "\n")
    if args.plot:
        plots.training_curves({n: c["rows"] for n, c in curves.items()}, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
