"""The authors' path as one table: each row's FP32 (and its cost against SGD), RTN and QDrop
at W2A4, and how large its weight noise was against the evaluation quantizer's error.

Reads the grid results of experiments/authors_path.sh (the training-only pass and, when it
exists, the QDrop pass), the SGD reference cell of experiments/fair_eval.sh and the output of
experiments/noise_size.py; prints a markdown table and writes it with `--out`.

  python experiments/path_table.py \\
      --grids experiments/results/authors_path_rtn.json,experiments/results/authors_path.json \\
      --noise experiments/results/authors_path_noise.json \\
      --out experiments/results/authors_path_table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Row -> what it adds to the row above (the path of experiments/authors_path.sh).
ROWS = {
    "dnq_w2a4": "the paper's form: W + lambda (D(k_t) - D(k_t-1)), lambda 1",
    "naive": "the authors' in-place form in effect: W + lambda D_t",
    "lam08": "+ lambda_max 0.8",
    "symmetric": "+ their profiler: symmetric grid of max abs W, every layer at 2 bits",
    "leftover": "+ one draw per epoch left in the stored weights",
    "relu": "+ drop-in on ReLU-fed inputs, their error sign, 256 images",
    "authors": "+ cosine to 0 at the SWA start, then 0.01 x peak (= method=authors)",
    "uniform": "the paper's form with uniform samples (same mean and variance)",
}


def _cells(paths: list[str]) -> dict[str, dict]:
    """Cell name -> the grid's record (a later file's value of a measurement wins)."""
    out: dict[str, dict] = {}
    for p in paths:
        for cell in json.loads(Path(p).read_text())["cells"]:
            rec = out.setdefault(cell["name"], {"fp32": cell.get("fp32"), "ptq": {}})
            for method, accs in (cell.get("ptq") or {}).items():
                rec["ptq"].setdefault(method, {}).update(accs)
    return out


def _iters(path: str) -> int | None:
    doc = json.loads(Path(path).read_text())
    return doc.get("ptq_iters") if "qdrop" in (doc.get("ptq") or "") else None


def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def table(cells: dict, noise: dict, sgd: dict, seed: int, bits: str, iters: int) -> str:
    sgd_fp32 = sgd.get("fp32")
    sgd_q = (sgd.get("ptq") or {}).get("qdrop", {}).get(bits)
    sgd_rtn = (sgd.get("ptq") or {}).get("rtn", {}).get(bits)
    lines = [
        f"Seed {seed}, W2A4 noise, ResNet-8 / Fashion-MNIST, 16 epochs. SGD: FP32 "
        f"{_fmt(sgd_fp32)}, RTN {bits.upper()} {_fmt(sgd_rtn)}, QDrop {_fmt(sgd_q)}. QDrop at "
        f"{iters:,} iterations per block; noise / error std: the forward pass's weight "
        "perturbation against the evaluation quantizer's error (experiments/noise_size.py).",
        "",
        f"| row | what it adds | FP32 | FP32 - SGD | RTN {bits.upper()} | QDrop {bits.upper()} "
        "| QDrop - SGD | noise / error std (all; 2-bit layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, what in ROWS.items():
        rec = cells.get(f"{row}_s{seed}")
        if rec is None:
            lines.append(f"| {row} | {what} | not run yet | | | | | |")
            continue
        fp32 = rec.get("fp32")
        rtn = rec["ptq"].get("rtn", {}).get(bits)
        qd = rec["ptq"].get("qdrop", {}).get(bits)
        n = noise.get(f"{row}_s{seed}")
        ratio = "-" if n is None else f"{n['mean_ratio']:.2f}; {n['mean_ratio_low_bit_layers']:.2f}"
        cost = None if fp32 is None or sgd_fp32 is None else fp32 - sgd_fp32
        gain = None if qd is None or sgd_q is None else qd - sgd_q
        lines.append(
            f"| {row} | {what} | {_fmt(fp32)} | {_fmt(cost, True)} | {_fmt(rtn)} | {_fmt(qd)} "
            f"| {_fmt(gain, True)} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--grids", required=True, help="grid JSON files, comma-separated")
    p.add_argument("--sgd", default="experiments/results/qdrop_iters.json",
                   help="grid JSON (or qdrop_iters JSON) holding the SGD cell")  # fmt: skip
    p.add_argument("--sgd-grid", default="workdirs/dnq_table_fair/cells/sgd_s0/results.json")
    p.add_argument("--noise", default="", help="experiments/noise_size.py --json output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", default="w2a4")
    p.add_argument(
        "--qdrop-iters",
        type=int,
        default=5000,
        help="the QDrop count: SGD's point at it; a grid whose QDrop ran at another is refused",
    )
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    grids = [s for s in a.grids.split(",") if s]
    for g, n in zip(grids, map(_iters, grids)):
        if n not in (None, a.qdrop_iters):
            p.error(f"{g}: QDrop at {n} iterations per block, not {a.qdrop_iters}")
    cells = _cells(grids)
    noise = {}
    if a.noise and Path(a.noise).exists():
        noise = {r["cell"]: r for r in json.loads(Path(a.noise).read_text())}
    sgd = {"fp32": None, "ptq": {}}
    if Path(a.sgd_grid).exists():
        res = json.loads(Path(a.sgd_grid).read_text())
        sgd["fp32"] = res.get("fp32")
        sgd["ptq"]["rtn"] = {a.bits: res.get(a.bits)}
    if Path(a.sgd).exists():  # QDrop of the SGD cell at the chosen count
        doc = json.loads(Path(a.sgd).read_text())
        for pt in doc.get("points", []):
            if (pt.get("cell"), pt.get("bits"), pt.get("iters")) == (
                f"sgd_s{a.seed}",
                a.bits,
                a.qdrop_iters,
            ):
                sgd["ptq"].setdefault("qdrop", {})[a.bits] = pt.get("top1")
                sgd["fp32"] = sgd["fp32"] if sgd["fp32"] is not None else pt.get("fp32")
    text = table(cells, noise, sgd, a.seed, a.bits, a.qdrop_iters)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
