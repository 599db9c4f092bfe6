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

`--qdrop-iters N` adds QDrop at `--bits` with N iterations per block, saved and now (about
4.5 minutes per ResNet-8 point at 5,000 on 2 CPU cores). The saved column can come from the
grid that measured the cell (`--recorded GRID.json ...`, the grids' own JSON with the same
`ptq_iters`): a recorded cell is taken where its FP32 equals the one measured here (the same
model), and measured otherwise; each row says where its value came from. The now column
is always today's code: measured, except where saved was just measured on the same
variables (statistics not re-estimated, or re-estimated to the saved ones bit for bit).

  python experiments/bn_stats.py --workdir workdirs/dnq_table_fair --bits w2a4 \
      --cells sgd_s0,sgd_s1,dnq_w2a4_s0,dnq_w2a4_s1 --qdrop-iters 5000 \
      --recorded experiments/results/fair_table.json experiments/results/authors_path.json \
      --out experiments/results/bn_stats_qdrop.md --json experiments/results/bn_stats_qdrop.json

`--unaugmented` re-estimates every cell's statistics, SGD's included, over the unaugmented
training images instead (the trainer's way before the CIFAR-10 fix): how far a model's
numbers move with the estimate alone, whichever way the trainer saved it.

  python experiments/bn_stats.py --workdir workdirs/dnq_table_fair --bits w4a4 --unaugmented \
      --out experiments/results/bn_stats_w4a4.md --json experiments/results/bn_stats_w4a4.json
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from train_fit import cell_parser, finished, measure_cells, paired, plus_minus, write  # noqa: E402

from dnq_jax import data  # noqa: E402
from dnq_jax.errors import ConfigError  # noqa: E402
from dnq_jax.train import config as config_lib  # noqa: E402
from dnq_jax.train import evaluate, loop  # noqa: E402

COLUMNS = ("fp32_saved", "fp32_now", "rtn_saved", "rtn_now")
QDROP_COLUMNS = ("qdrop_saved", "qdrop_now")


def recorded_qdrop(paths: list[str], iters: int) -> dict[str, dict]:
    """{cell name: {"fp32", "qdrop": {bits name: top-1}, "from": file name}} from grid JSONs
    whose QDrop ran at `iters` iterations per block; ConfigError for any other count."""
    out: dict[str, dict] = {}
    for path in paths:
        grid = json.loads(Path(path).read_text())
        if grid.get("ptq_iters") != iters:
            raise ConfigError(
                f"--recorded {path}: its QDrop ran at {grid.get('ptq_iters')} iterations "
                f"per block, not {iters}"
            )
        for c in grid.get("cells", []):
            if c.get("ptq", {}).get("qdrop"):
                q = c["ptq"]["qdrop"]
                out[c["name"]] = {"fp32": c["fp32"], "qdrop": q, "from": Path(path).name}
    return out


def same_variables(a, b) -> bool:
    """Whether two variable trees hold the same arrays, bit for bit."""
    same = jax.tree.structure(a) == jax.tree.structure(b)
    return same and all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def measure(
    cell: Path,
    bits: str,
    ds=None,
    qdrop_iters: int = 0,
    recorded: dict | None = None,
    unaugmented: bool = False,
) -> tuple[dict, object]:
    """(row, dataset) of one finished cell; `ds`: its data set, if loaded already; with
    `qdrop_iters`, QDrop's columns too (`recorded`: `recorded_qdrop`'s saved values);
    `unaugmented`: "now" is every cell re-estimated over the unaugmented training images."""
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
    if unaugmented and isinstance(ds, data.Stream):
        raise ConfigError(
            f"{cell.name}: --unaugmented re-estimates over in-memory images; a streamed data "
            "set's workers apply their own training transform"
        )
    row["re_estimated"] = (unaugmented and "batch_stats" in saved) or loop.reestimates(
        c, n_swa, saved
    )
    now = saved
    if row["re_estimated"]:
        est = c
        if unaugmented:
            est = copy.deepcopy(c)
            with est.unlocked():
                est.data.augment = "none"
        now = loop.reestimate_batch_stats(model, saved, ds, est, jax.random.key(c.seed))
        row["fp32_now"], row["rtn_now"] = top1(now)
    if qdrop_iters:
        qs = dataclasses.replace(settings, method="qdrop", iters=qdrop_iters)
        row["qdrop_iters"] = qdrop_iters
        qdrop = lambda v: evaluate.evaluate_variables(model, v, ds, qs, progress=True)[name]
        rec = (recorded or {}).get(cell.name)
        if rec and name in rec["qdrop"] and abs(rec["fp32"] - fp32) < 0.005:
            row["qdrop_saved"], row["qdrop_saved_from"] = rec["qdrop"][name], rec["from"]
        else:
            row["qdrop_saved"], row["qdrop_saved_from"] = qdrop(saved), "measured"
        # "Now" is measured by today's code unless "saved" just was on the same variables
        # (not re-estimated, or re-estimated to the saved statistics bit for bit).
        fresh = row["qdrop_saved_from"] == "measured" and same_variables(now, saved)
        row["qdrop_now"] = row["qdrop_saved"] if fresh else qdrop(now)
    return row, ds


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The measured columns of `rows`: FP32 and RTN, and QDrop's where they were run."""
    return COLUMNS + (QDROP_COLUMNS if rows and "qdrop_saved" in rows[0] else ())


NOW_AUGMENTED = (
    "Now: over batches augmented as in training (dnq_jax.train.loop.reestimate_batch_stats)."
)
NOW_UNAUGMENTED = (
    "Now (`--unaugmented`): every cell, SGD's included, re-estimated over the unaugmented "
    "training images (dnq_jax.train.loop.reestimate_batch_stats with data.augment=none)."
)


def to_markdown(
    rows: list[dict], pairs: list[dict], command: str, unaugmented: bool = False
) -> str:
    bits = rows[0]["bits"].upper() if rows else ""
    cols = columns(rows)
    with_qdrop = cols != COLUMNS
    head = f"| FP32 saved | FP32 now | RTN {bits} saved | RTN {bits} now |"
    if with_qdrop:
        head += f" QDrop {bits} saved | QDrop {bits} now |"
    rule = "|---" * len(cols) + "|"
    lines = [
        "# BatchNorm statistics of the SWA average: as saved, and as re-estimated now",
        "",
        f"command: `{command}`",
        "",
        "Saved: the statistics as the trainer that ran the cell left them (SWA's re-estimation "
        "over the unaugmented training images for runs made before it read augmented batches, "
        "over augmented batches for runs made after; without SWA: the running statistics). "
        + (NOW_UNAUGMENTED if unaugmented else NOW_AUGMENTED)
        + " Test top-1 (%), full split.",
        "",
        "| cell | method | re-estimated " + head,
        "|---|---|---" + rule,
    ]
    for r in rows:
        vals = " | ".join(f"{r[k]:.2f}" for k in cols)
        lines.append(f"| {r['cell']} | {r['method']} | {r['re_estimated']} | {vals} |")
    if with_qdrop:
        lines += ["", "QDrop saved, where from: " + ", ".join(
            f"{r['cell']} {r['qdrop_saved_from']}" for r in rows
        )]  # fmt: skip
    if pairs:
        lines += [
            "",
            "Minus the SGD cell of the same seed (mean ± std over the seeds listed):",
            "",
            "| setting | seeds " + head,
            "|---|---" + rule,
        ]
        for p in pairs:
            vals = " | ".join(plus_minus(p[f"d_{k}"], p[f"d_{k}_std"], "+.2f") for k in cols)
            lines.append(f"| {p['setting']} | {','.join(map(str, p['seeds']))} | {vals} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = cell_parser(__doc__.split("\n")[0])
    p.add_argument("--bits", default="w2a4", help="the RTN (and QDrop) columns' bit-width")
    p.add_argument(
        "--qdrop-iters", type=int, default=0, help="add QDrop at N iterations per block (0: no)"
    )
    p.add_argument(
        "--recorded",
        nargs="*",
        default=[],
        help="grid JSONs holding the cells' QDrop results (a later file wins)",
    )
    p.add_argument(
        "--unaugmented",
        action="store_true",
        help="now: every cell re-estimated over the unaugmented training images",
    )
    a = p.parse_args(argv)
    try:
        if len(config_lib.parse_bits(a.bits)) != 1:
            p.error(f"--bits takes one bit-width, e.g. w2a4, not {a.bits!r}")
    except ConfigError as e:
        p.error(f"--bits: {e}")
    if a.qdrop_iters < 0 or (a.recorded and not a.qdrop_iters):
        p.error("--qdrop-iters takes a count > 0; --recorded needs it")
    try:
        recorded = recorded_qdrop(a.recorded, a.qdrop_iters) if a.recorded else {}
    except (OSError, ValueError, ConfigError) as e:
        p.error(str(e))
    except KeyError as e:
        p.error(f"--recorded: a cell without {e} (not a grid's JSON)")
    root, names = finished(p, a)
    q_head = f" {'QDrop saved':>11} {'now':>7}" if a.qdrop_iters else ""
    print(
        f"{'cell':<16} {'method':<10} {'FP32 saved':>10} {'now':>7} {'RTN saved':>10} "
        f"{'now':>7}{q_head}"
    )
    q_line = lambda r: f" {r['qdrop_saved']:>11.2f} {r['qdrop_now']:>7.2f}" if a.qdrop_iters else ""
    try:
        rows = measure_cells(
            root,
            names,
            lambda cell, ds: measure(cell, a.bits, ds, a.qdrop_iters, recorded, a.unaugmented),
            lambda r: (
                f"{r['cell']:<16} {r['method']:<10} {r['fp32_saved']:>10.2f} "
                f"{r['fp32_now']:>7.2f} {r['rtn_saved']:>10.2f} {r['rtn_now']:>7.2f}" + q_line(r)
            ),
        )
    except ConfigError as e:
        p.error(str(e))
    render = functools.partial(to_markdown, unaugmented=a.unaugmented)
    write(a, "bn_stats.py", argv, rows, paired(rows, columns(rows)), render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
