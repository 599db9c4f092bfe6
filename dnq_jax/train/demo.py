"""The demo: plain SGD vs DNQ on Fashion-MNIST, same budget, then RTN and QDrop PTQ.

  python -m dnq_jax.train.demo --workdir demo_out   (what `make demo` runs; also `dnq-demo`)

Trains a small CIFAR-style ResNet three times for the same short budget: once plainly (SGD)
and twice with DNQ (differential weight noise, activation drop-in, SWA), the noise modelled
at the precision that model is evaluated at (W4A4 for one, W2A4 for the other), as the paper
trains one model per target. Each model is evaluated at FP32 and, with round-to-nearest and
with QDrop (`--qdrop-iters` iterations per block, far fewer than the papers' 20,000), at W4A4
and W2A4 (the SGD model at both, each DNQ model at its own target). It is a grid
(`dnq_jax.train.grid`) of three cells, so it resumes and writes grid.md; it prints one table
and writes table.txt, results.json, accuracy_vs_bits.png (RTN) and training_curves.png under
the workdir. The numbers are whatever the run measures; with so short a budget they vary with
the seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax

from dnq_jax.diagnostics import plots
from dnq_jax.train import config as config_lib
from dnq_jax.train import grid, metrics

# (cell, method, noise modelled at, bits evaluated)
MODELS = (
    ("sgd", "sgd", None, ((4, 4), (2, 4))),
    ("dnq_w4a4", "dnq", (4, 4), ((4, 4),)),
    ("dnq_w2a4", "dnq", (2, 4), ((2, 4),)),
)
BITS = ("w4a4", "w2a4")
PTQ = ("rtn", "qdrop")


def demo_config(method: str, epochs: int = 10, noise_bits: tuple[int, int] = (2, 4)):
    """The demo's budget: resnet8, batch 128, `epochs` epochs of 60 steps on Fashion-MNIST.

    Clean for the first third of the epochs, then noise (modelled at `noise_bits`) with
    lambda ramped over the next third, SWA over the last three epochs.
    """
    c = config_lib.apply_method(config_lib.base_config(), method)
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist"
    c.optim.batch_size = 128
    c.optim.steps_per_epoch = 60
    c.optim.num_epochs = epochs
    c.optim.learning_rate = 0.1
    c.optim.weight_decay = 5e-4
    c.noise.start_epoch = epochs // 3
    c.noise.ramp_epochs = max(1, epochs // 3)
    c.noise.w_bits, c.noise.a_bits = noise_bits
    c.swa.start_epoch = max(0, epochs - 3)
    c.eval.bits = "w4a4,w2a4"
    c.eval.every_epochs = 2
    c.eval.batch_size = 1000
    c.runtime.ckpt_every_epochs = 2
    c.lock()
    return c


def demo_cells(epochs: int) -> list[grid.Cell]:
    cells = []
    for name, method, noise_bits, bits in MODELS:
        c = demo_config(method, epochs, noise_bits or (2, 4))
        c.eval.bits = ",".join(f"w{w}a{a}" for w, a in bits)
        cells.append(grid.Cell(name, 0, c, bits, f"method={method}"))
    return cells


def format_table(records: dict[str, dict], epochs: int, iters: int) -> str:
    """One row per model: FP32, then RTN and QDrop at W4A4 and W2A4 ('-': not its target)."""
    cols = [(b, m) for b in BITS for m in PTQ]
    head = "".join(f"{b.upper() + ' ' + m.upper():>12}" for b, m in cols)
    lines = [
        f"\nFashion-MNIST test top-1 (%), resnet8, {epochs} epochs of 60 steps; "
        f"QDrop: {iters} iterations per block",
        f"{'model':<22}{'FP32':>7}{head}",
    ]
    labels = {"sgd": "SGD", "dnq_w4a4": "DNQ (noise at W4A4)", "dnq_w2a4": "DNQ (noise at W2A4)"}
    for name, r in records.items():
        accs = [r["ptq"][m].get(b) for b, m in cols]
        shown = "".join(f"{'-' if a is None else f'{a:.2f}':>12}" for a in accs)
        lines.append(f"{labels[name]:<22}{r['fp32']:>7.2f}{shown}")
    gains = []
    for b in BITS:
        dnq = records[f"dnq_{b}"]["ptq"]
        diffs = [dnq[m][b] - records["sgd"]["ptq"][m][b] for m in PTQ]
        gains.append(
            f"{b.upper()} " + ", ".join(f"{m.upper()} {d:+.2f}" for m, d in zip(PTQ, diffs))
        )
    lines.append("DNQ - SGD at the DNQ model's target: " + "; ".join(gains))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--qdrop-iters", type=int, default=50, help="QDrop iterations per block")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = parser.parse_args(argv)
    out = Path(args.workdir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    grid.enable_compile_cache(out / ".jax_cache")  # the two DNQ models share one step
    print(f"dnq_jax demo on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    cells = demo_cells(args.epochs)
    header = [f"# The demo: SGD vs DNQ, {args.epochs} epochs, QDrop {args.qdrop_iters} iterations"]
    doc = grid.run_grid(cells, out, PTQ, args.qdrop_iters, header)
    records = {r["name"].rsplit("_s", 1)[0]: r for r in doc["cells"]}
    table = format_table(records, args.epochs, args.qdrop_iters)
    print(table)
    (out / "results.json").write_text(json.dumps(records, indent=2, default=float))
    (out / "table.txt").write_text(table + "\n")
    rtn = {n: {"fp32": r["fp32"], **r["ptq"]["rtn"]} for n, r in records.items()}
    plots.accuracy_vs_bits({n.upper(): rtn[n] for n in rtn}, out / "accuracy_vs_bits.png")
    curves = {c.setting.upper(): metrics.read(out / "cells" / c.name) for c in cells}
    curves = {n: [r for r in rows if "epoch" in r] for n, rows in curves.items()}
    plots.training_curves(curves, out / "training_curves.png")
    print(
        f"\nwall time {time.time() - t0:.0f} s; written under {out.resolve()}: table.txt, "
        "results.json, grid.md, accuracy_vs_bits.png, training_curves.png, cells/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
