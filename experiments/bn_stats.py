"""What SWA's BatchNorm re-estimation did to each finished model, and what it does now.

Until the trainer re-estimated the SWA average's BatchNorm statistics over batches augmented
as in training, it used the unaugmented training images; a model trained on zero-padded crops
expects the statistics of such batches. For each finished cell of a grid workdir whose run
averaged its weights (SWA, `swa.bn_recalibration`): test top-1 at FP32 and with RTN at
`--bits`, with its final variables as saved and with their statistics re-estimated as the
trainer now does (`dnq_jax.train.loop.reestimate_batch_stats`; the averaged weights are
unchanged). A cell without SWA (SGD) keeps the running statistics of its training, before and
after: it is measured once. Each cell is paired with the SGD cell of its seed.

  python experiments/bn_stats.py --workdir workdirs/dnq_table_fair --bits w2a4 \
      --out experiments/results/bn_stats.md --json experiments/results/bn_stats.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from train_fit import cell_parser, finished, measure_cells, paired, plus_minus, write  # noqa: E402

from dnq_jax.errors import ConfigError  # noqa: E402
from dnq_jax.train import config as config_lib  # noqa: E402
from dnq_jax.train import evaluate, loop  # noqa: E402

COLUMNS = ("fp32_saved", "fp32_now", "rtn_saved", "rtn_now")


def measure(cell: Path, bits: str, ds=None) -> tuple[dict, object]:
    """(row, dataset) of one finished cell; `ds`: its data set, if loaded already."""
    c, model, saved, ds = evaluate.load_run(str(cell), ds)
    settings = evaluate.EvalSettings.from_config(
        c, bits=tuple(config_lib.parse_bits(bits)), method="rtn", iters=0
    )
    name = config_lib.bits_name(*settings.bits[0])

    def top1(variables) -> tuple[float, float]:
        r = evaluate.evaluate_variables(model, variables, ds, settings, progress=False)
        return r["fp32"], r[name]

    fp32, rtn = top1(saved)
    row = {"cell": cell.name, "method": config_lib.method_name(c), "seed": int(c.seed)}
    row.update(fp32_saved=fp32, rtn_saved=rtn, fp32_now=fp32, rtn_now=rtn, bits=name)
    n_swa = json.loads((cell / "results.json").read_text()).get("swa_snapshots", 0)
    row["re_estimated"] = loop.reestimates(c, n_swa, saved)
    if row["re_estimated"]:
        now = loop.reestimate_batch_stats(model, saved, ds, c, jax.random.key(c.seed))
        row["fp32_now"], row["rtn_now"] = top1(now)
    return row, ds


def to_markdown(rows: list[dict], pairs: list[dict], command: str) -> str:
    bits = rows[0]["bits"].upper() if rows else ""
    head = f"| FP32 saved | FP32 now | RTN {bits} saved | RTN {bits} now |"
    lines = [
        "# BatchNorm statistics of the SWA average: as saved, and as re-estimated now",
        "",
        f"command: `{command}`",
        "",
        "Saved: the statistics as the trainer that ran the cell left them (before SWA's "
        "re-estimation saw augmented batches: over the unaugmented training images; without "
        "SWA: the running statistics). Now: over batches augmented as in training "
        "(dnq_jax.train.loop.reestimate_batch_stats). Test top-1 (%), full split.",
        "",
        "| cell | method | re-estimated " + head,
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vals = " | ".join(f"{r[k]:.2f}" for k in COLUMNS)
        lines.append(f"| {r['cell']} | {r['method']} | {r['re_estimated']} | {vals} |")
    if pairs:
        lines += [
            "",
            "Minus the SGD cell of the same seed (mean ± std over the seeds listed):",
            "",
            "| setting | seeds " + head,
            "|---|---|---|---|---|---|",
        ]
        for p in pairs:
            cols = " | ".join(plus_minus(p[f"d_{k}"], p[f"d_{k}_std"], "+.2f") for k in COLUMNS)
            lines.append(f"| {p['setting']} | {','.join(map(str, p['seeds']))} | {cols} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = cell_parser(__doc__.split("\n")[0])
    p.add_argument("--bits", default="w2a4", help="the RTN column's bit-width")
    a = p.parse_args(argv)
    try:
        if len(config_lib.parse_bits(a.bits)) != 1:
            p.error(f"--bits takes one bit-width, e.g. w2a4, not {a.bits!r}")
    except ConfigError as e:
        p.error(f"--bits: {e}")
    root, names = finished(p, a)
    print(f"{'cell':<16} {'method':<10} {'FP32 saved':>10} {'now':>7} {'RTN saved':>10} {'now':>7}")
    rows = measure_cells(
        root,
        names,
        lambda cell, ds: measure(cell, a.bits, ds),
        lambda r: (
            f"{r['cell']:<16} {r['method']:<10} {r['fp32_saved']:>10.2f} "
            f"{r['fp32_now']:>7.2f} {r['rtn_saved']:>10.2f} {r['rtn_now']:>7.2f}"
        ),
    )
    write(a, "bn_stats.py", argv, rows, paired(rows, COLUMNS), to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
