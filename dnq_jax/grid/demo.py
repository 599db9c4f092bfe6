"""The demo: plain SGD vs DNQ on Fashion-MNIST, same budget, then RTN and QDrop PTQ.

  dnq-demo --workdir demo_out   (what `make demo` runs; the flags: dnq_jax/cli/grid.py)

Trains a small CIFAR-style ResNet for the same short budget plainly (SGD) and with DNQ (weight
noise, activation drop-in, SWA), the noise modelled at W2A4. `--method` picks the form:
`dnq_half` by default (the paper's differential form with the noise held at lambda 0.5 after
the ramp: over three seeds of the Fashion-MNIST study the variant closest to SGD's FP32
accuracy and the best under QDrop, docs/results.md), the paper's `dnq` (lambda 1), or another
preset (`lam08`, `naive`, `authors`). With
`--dnq-targets w4a4,w2a4`, one DNQ model per target as the paper trains them (a third training
run, and a third QDrop). Each model is evaluated at FP32 and with round-to-nearest at W4A4 and
W2A4, and with QDrop (`--qdrop-iters` iterations per block) at the DNQ targets only: a
reconstruction cut short punishes the sharper SGD model a second time, so the count is as high
as the demo's time allows (2,000: the DNQ model levels off by 200, the SGD one still gains 4
points from 1,000 to 2,000, experiments/results/demo_qdrop_iters.md). That costs 1.6 to 2.4
minutes per model on 2 CPU cores, so QDrop gets one column (W4A4 is shown with RTN only);
`--qdrop-iters 0` leaves QDrop out (215 s of 520 in a capture on an AVX-512 CPU; on an
AVX2-only one the whole demo took 1178 s). A DNQ model evaluated
at a precision its noise was not modelled at is marked off target. It is a grid
(`dnq_jax.grid`) of one cell per model, so it resumes and writes grid.md; it prints one table
and writes table.txt, results.json, accuracy_vs_bits.png (RTN) and training_curves.png under
the workdir. The numbers are whatever the run measures; with so short a budget they vary with
the seed.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax

from dnq_jax.diagnostics import plots
from dnq_jax.grid.cells import Cell
from dnq_jax.grid.run import enable_compile_cache, run_grid
from dnq_jax.train import config as config_lib
from dnq_jax.train import metrics

BITS = ("w4a4", "w2a4")
# The DNQ form the demo trains unless told (`--method`).
DEMO_METHOD = "dnq_half"
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


def demo_cells(epochs: int, targets: tuple[str, ...], method: str = DEMO_METHOD) -> list[Cell]:
    """SGD evaluated at every precision of BITS; one DNQ model (`method`) per target,
    evaluated at its target and at each precision of BITS no DNQ model is trained for
    (off-target). QDrop runs at the targets only, RTN at all of a cell's precisions."""
    qdrop_bits = tuple(config_lib.parse_bits(",".join(targets)))
    cells = [_cell("sgd", demo_config("sgd", epochs), BITS, qdrop_bits)]
    for t in targets:
        own = [t] + [b for b in BITS if b not in targets]
        ((w, a),) = config_lib.parse_bits(t)
        c = demo_config(method, epochs, (w, a))
        cells.append(_cell(f"dnq_{t}", c, tuple(own), qdrop_bits))
    return cells


def _cell(name: str, c, bits: tuple[str, ...], qdrop_bits) -> Cell:
    parsed = tuple(config_lib.parse_bits(",".join(b for b in BITS if b in bits)))
    c.eval.bits = ",".join(b for b in BITS if b in bits)
    method = config_lib.method_name(c)
    return Cell(name, 0, c, parsed, f"method={method}", (("qdrop", qdrop_bits),))


def format_table(
    records: dict[str, dict], epochs: int, iters: int, method: str = DEMO_METHOD
) -> str:
    """One row per model: FP32, then RTN at W4A4 and W2A4 and QDrop at the DNQ targets (a
    column only where some model has it).

    '-': not evaluated (another DNQ model has that target); '*': a DNQ model evaluated off
    its target (the noise was modelled at another precision).
    """
    have = lambda b, m: any(b in r["ptq"].get(m, {}) for r in records.values())
    cols = [(b, m) for b in BITS for m in PTQ if have(b, m)]
    head = "".join(f"{b.upper() + ' ' + m.upper():>12}" for b, m in cols)
    name_of = "DNQ" if method == "dnq" else f"DNQ {method}"
    lines = [
        f"\nFashion-MNIST test top-1 (%), resnet8, {epochs} epochs of 60 steps; "
        + (f"QDrop: {iters} iterations per block" if iters > 0 else "no QDrop (--qdrop-iters 0)"),
        f"{'model':<28}{'FP32':>7}{head}",
    ]
    for name, r in records.items():
        target = None if name == "sgd" else name.removeprefix("dnq_")
        label = "SGD" if target is None else f"{name_of} (noise at {target.upper()})"
        shown = ""
        for b, m in cols:
            a = r["ptq"].get(m, {}).get(b)
            mark = "*" if target is not None and b != target else ""
            shown += f"{'-' if a is None else f'{a:.2f}{mark}':>12}"
        lines.append(f"{label:<28}{r['fp32']:>7.2f}{shown}")
    gains = []
    for b in BITS:
        dnq = records.get(f"dnq_{b}") or next(r for n, r in records.items() if n != "sgd")
        pairs = [
            (m, dnq["ptq"].get(m, {}).get(b), records["sgd"]["ptq"].get(m, {}).get(b))
            for bb, m in cols
            if bb == b
        ]
        diffs = [(m, d - s) for m, d, s in pairs if d is not None and s is not None]
        mark = "" if f"dnq_{b}" in records else "*"
        gains.append(f"{b.upper()}{mark} " + ", ".join(f"{m.upper()} {d:+.2f}" for m, d in diffs))
    fp32 = {n: r["fp32"] - records["sgd"]["fp32"] for n, r in records.items() if n != "sgd"}
    if len(fp32) == 1:
        lines.append(f"{name_of} - SGD: FP32 {next(iter(fp32.values())):+.2f}")
    else:
        each = [f"noise at {n.removeprefix('dnq_').upper()} {d:+.2f}" for n, d in fp32.items()]
        lines.append(f"{name_of} - SGD: FP32 " + ", ".join(each))
    lines.append(f"{name_of} - SGD: " + "; ".join(gains))
    off = [b.upper() for b in BITS if f"dnq_{b}" not in records]
    if off:
        lines.append(f"* off target: no DNQ model was trained with the noise at {', '.join(off)}")
    return "\n".join(lines)


def run_demo(
    workdir: str,
    epochs: int,
    qdrop_iters: int,
    targets: tuple[str, ...],
    fresh: bool = False,
    method: str = DEMO_METHOD,
) -> int:
    """Train, evaluate and tabulate the demo's models (one DNQ model per target in `targets`,
    each of `BITS`); prints the table and writes it under `workdir`; returns 0."""
    out = Path(workdir)
    if fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    enable_compile_cache(out / ".jax_cache")  # DNQ models of several targets share one step
    print(f"dnq_jax demo on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    cells = demo_cells(epochs, targets, method)
    ptq = PTQ if qdrop_iters > 0 else ("rtn",)
    header = [f"# The demo: SGD vs DNQ ({method}), {epochs} epochs, QDrop {qdrop_iters} iterations"]
    doc = run_grid(cells, out, ptq, qdrop_iters, header)
    records = {r["name"].rsplit("_s", 1)[0]: r for r in doc["cells"]}
    table = format_table(records, epochs, qdrop_iters, method)
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
