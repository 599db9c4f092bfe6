"""Is a noisy run's FP32 cost a worse fit of the training set, or a worse generalisation?

For each finished cell of a grid workdir: its final variables (SWA-averaged, BN re-estimated,
as evaluated) measured clean, without augmentation or noise, on the whole training split and
on the test split: top-1 and mean cross-entropy (no label smoothing). Each cell is then paired
with the `sgd` cell of its seed: if a method's test top-1 falls about as much as its training
top-1, the noise made the model fit less (a capacity cost, which a larger model may absorb);
if the training top-1 holds and the test top-1 falls, it generalises worse.

  python experiments/train_fit.py --workdir workdirs/dnq_table_fair \
      --out experiments/results/train_fit.md --json experiments/results/train_fit.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnq_jax import data  # noqa: E402
from dnq_jax.train import config as config_lib  # noqa: E402
from dnq_jax.train import evaluate  # noqa: E402

BATCH = 1000


def split_fit(apply, variables, images_u8, labels, mean, std) -> dict:
    """Top-1 % and mean cross-entropy of `apply` over uint8 `images_u8`, in batches."""
    correct, loss_sum = 0, 0.0
    for i in range(0, len(labels), BATCH):
        x = data.normalize(jnp.asarray(images_u8[i : i + BATCH]), mean, std)
        y = jnp.asarray(labels[i : i + BATCH], jnp.int32)
        logits = apply(variables, x).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        loss_sum += float(-jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1)))
        correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == y))
    n = len(labels)
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}


def data_key(cell: Path) -> str:
    """The cell's data settings (its config.json's `data` group): cells with equal keys read
    the same data set, loaded once."""
    return json.dumps(json.loads((cell / "config.json").read_text()).get("data"), sort_keys=True)


def measure(cell: Path, ds=None) -> tuple[dict, object]:
    """(row, dataset) of one finished cell; `ds`: its data set, if loaded already."""
    c, model, variables, ds = evaluate.load_run(str(cell), ds)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    train = split_fit(apply, variables, ds.train_images, ds.train_labels, ds.mean, ds.std)
    test = split_fit(apply, variables, ds.test_images, ds.test_labels, ds.mean, ds.std)
    row = {
        "cell": cell.name,
        "method": config_lib.method_name(c),
        "seed": int(c.seed),
        "train_top1": train["top1"],
        "test_top1": test["top1"],
        "train_loss": train["loss"],
        "test_loss": test["loss"],
        "gap_top1": train["top1"] - test["top1"],
    }
    return row, ds


def setting_of(cell: str) -> str:
    """'lam08_s1' -> 'lam08' (the grid's cell names end in _s<seed>)."""
    return cell.rsplit("_s", 1)[0]


FIT_KEYS = ("train_top1", "test_top1", "train_loss", "test_loss")


def paired(rows: list[dict], keys: tuple[str, ...] = FIT_KEYS) -> list[dict]:
    """Per setting other than sgd: mean and std over seeds of (cell - sgd of its seed), for
    each of the rows' `keys` (d_<key>, d_<key>_std)."""
    sgd = {r["seed"]: r for r in rows if setting_of(r["cell"]) == "sgd"}
    by: dict[str, list[dict]] = {}
    for r in rows:
        s = setting_of(r["cell"])
        if s != "sgd" and r["seed"] in sgd:
            by.setdefault(s, []).append(r)
    out = []
    for s, rs in by.items():
        d = {k: [r[k] - sgd[r["seed"]][k] for r in rs] for k in keys}
        out.append(
            {
                "setting": s,
                "seeds": sorted(r["seed"] for r in rs),
                **{f"d_{k}": float(np.mean(v)) for k, v in d.items()},
                **{
                    f"d_{k}_std": float(np.std(v, ddof=1)) if len(v) > 1 else None
                    for k, v in d.items()
                },
            }
        )
    return out


def plus_minus(mean: float, std: float | None, fmt: str) -> str:
    """The mean in `fmt` (e.g. '+.2f'), the std with the same number of decimals."""
    std_fmt = "." + fmt.split(".")[-1] if "." in fmt else fmt
    return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{std_fmt}}"


def to_markdown(rows: list[dict], pairs: list[dict], command: str) -> str:
    lines = [
        "# Training fit against test accuracy (experiments/train_fit.py)",
        "",
        f"command: `{command}`",
        "",
        "Final variables, clean (no noise, no augmentation), whole splits; cross-entropy "
        "without label smoothing.",
        "",
        "| cell | method | train top-1 | test top-1 | train - test | train loss | test loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['train_top1']:.2f} | {r['test_top1']:.2f} | "
            f"{r['gap_top1']:.2f} | {r['train_loss']:.4f} | {r['test_loss']:.4f} |"
        )
    if not pairs:  # no SGD cell, or nothing beside it
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Minus the SGD cell of the same seed (mean ± std over the seeds listed):",
        "",
        "| setting | seeds | train top-1 | test top-1 | train loss | test loss |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        cols = [
            plus_minus(p[f"d_{k}"], p[f"d_{k}_std"], "+.2f" if "top1" in k else "+.4f")
            for k in FIT_KEYS
        ]
        lines.append(
            f"| {p['setting']} | {','.join(map(str, p['seeds']))} | " + " | ".join(cols) + " |"
        )
    return "\n".join(lines) + "\n"


def cell_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a script that measures a grid's finished cells (with `finished`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workdir", required=True, help="a grid workdir (its cells/ folder)")
    p.add_argument("--cells", default="", help="comma-separated; default: every finished cell")
    p.add_argument("--out", default="", help="write the markdown tables here")
    p.add_argument("--json", default="", help="write the numbers here")
    return p


def finished(p: argparse.ArgumentParser, a: argparse.Namespace) -> tuple[Path, list[str]]:
    """(cells folder, names) of the cells `a.cells` names, or of every finished one; exits
    with `p.error` on a workdir that is no grid's or a named cell that has not finished."""
    root = Path(a.workdir) / "cells"
    if not root.is_dir():
        p.error(f"{root} is not a folder: --workdir takes a grid workdir")
    names = [s.strip() for s in a.cells.split(",") if s.strip()] or sorted(
        d.name for d in root.iterdir() if (d / "final").is_dir()
    )
    if not names:
        p.error(f"no finished cell (with final variables) in {root}")
    missing = [n for n in names if not (root / n / "final").is_dir()]
    if missing:
        p.error(f"not finished (no final variables): {', '.join(missing)}")
    return root, names


def measure_cells(root: Path, names: list[str], measure_one, line) -> list[dict]:
    """The rows of ``measure_one(cell folder, dataset or None) -> (row, dataset)`` over
    `names`, each data set loaded once; prints ``line(row)`` as each cell is done."""
    rows, datasets = [], {}
    for name in names:
        key = data_key(root / name)
        r, datasets[key] = measure_one(root / name, datasets.get(key))
        rows.append(r)
        print(line(r), flush=True)
    return rows


def write(a: argparse.Namespace, script: str, argv, rows: list[dict], pairs, render) -> None:
    """Renders the tables (``render(rows, pairs, command)``), prints them below the command
    line, and writes `--out` (markdown) and `--json` (rows and pairs) if given."""
    args = argv if argv is not None else sys.argv[1:]
    md = render(rows, pairs, f"python experiments/{script} " + " ".join(args))
    print("\n" + md.split("\n\n", 3)[-1])
    if a.out:
        Path(a.out).write_text(md)
    if a.json:
        Path(a.json).write_text(json.dumps({"cells": rows, "paired": pairs}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = cell_parser(__doc__.split("\n")[0])
    a = p.parse_args(argv)
    root, names = finished(p, a)
    print(f"{'cell':<16} {'method':<10} {'train':>7} {'test':>7} {'gap':>6}")
    rows = measure_cells(
        root,
        names,
        measure,
        lambda r: (
            f"{r['cell']:<16} {r['method']:<10} {r['train_top1']:>7.2f} "
            f"{r['test_top1']:>7.2f} {r['gap_top1']:>6.2f}"
        ),
    )
    write(a, "train_fit.py", argv, rows, paired(rows), to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
