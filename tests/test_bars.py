"""experiments/bars.py: the study's two bars from paired, same-seed differences, checked
against numpy on made-up grids (no training)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bars", ROOT / "experiments" / "bars.py")
bars = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bars)

# seed -> (FP32, RTN W2A4, QDrop W2A4)
SGD = {0: (93.20, 37.76, 91.67), 1: (93.00, 50.10, 90.90), 2: (93.40, 44.00, 91.20)}
GOOD = {0: (93.00, 85.00, 93.10), 1: (92.90, 80.00, 92.20), 2: (93.10, 83.00, 92.00)}
BAD = {0: (91.74, 81.19, 91.00), 1: (92.00, 77.00, 93.90)}  # seed 2 unfinished


def _grid(path, rows: dict, iters=5000):
    cells = [
        {
            "name": f"{name}_s{s}",
            "fp32": v[0],
            "ptq": {"rtn": {"w2a4": v[1]}, "qdrop": {"w2a4": v[2]}},
        }
        for name, seeds in rows.items()
        for s, v in seeds.items()
    ]
    path.write_text(json.dumps({"ptq": "rtn,qdrop", "ptq_iters": iters, "cells": cells}))
    return str(path)


def test_paired_means_and_stds_match_numpy_and_the_verdicts_follow_the_bars(tmp_path):
    grid = _grid(tmp_path / "g.json", {"sgd": SGD, "good": GOOD, "bad": BAD})
    out = tmp_path / "bars.md"
    fig = tmp_path / "bars.png"
    assert bars.main(["--grids", grid, "--out", str(out), "--plot", str(fig)]) == 0
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = out.read_text()
    summary = text.split("Per seed")[0]  # the first table; the per-seed one follows
    rows = {
        ln.split(" | ")[0][2:]: ln.split(" | ") for ln in summary.splitlines() if ln[:2] == "| "
    }
    for name, seeds in (("good", GOOD), ("bad", BAD)):
        for col, k in ((2, 0), (3, 1), (4, 2)):
            d = np.array([seeds[s][k] - SGD[s][k] for s in seeds], np.float64)
            want = f"{d.mean():+.2f} ± {d.std(ddof=1):.2f}"
            assert rows[name][col] == want, (name, col)
    assert rows["good"][1] == "0,1,2" and rows["good"][-1] == "meets both |"
    # FP32 -1.23 on average: misses the FP32 bar; QDrop +1.17 meets its own; two seeds only.
    assert rows["bad"][5:7] == ["no", "yes"]
    assert rows["bad"][-1] == "misses (provisional, 2 seeds) |"
    assert "| bad | 1 | -1.00 | +26.90 | +3.00 |" in text
    # A row measured at another bit-width only is named once, in no table.
    other = tmp_path / "other.json"
    other.write_text(
        json.dumps(
            {
                "ptq_iters": 5000,
                "cells": [{"name": "w4_s0", "fp32": 92.0, "ptq": {"rtn": {"w4a4": 90.0}}}],
            }
        )
    )
    assert bars.main(["--grids", f"{grid},{other}", "--out", str(out)]) == 0
    assert "| w4 |" not in out.read_text()
    assert out.read_text().endswith("No RTN or QDrop result at W2A4: w4.\n")


def test_the_sweep_points_and_cell_folders_fill_what_the_grids_lack(tmp_path):
    # SGD's QDrop at the count only in a qdrop_iters.py sweep; its RTN only in its cell folder.
    sweep = tmp_path / "sweep.json"
    points = [
        {"cell": "sgd_s0", "bits": "w2a4", "iters": 5000, "fp32": 93.2, "top1": 91.67},
        {"cell": "sgd_s0", "bits": "w2a4", "iters": 2000, "fp32": 93.2, "top1": 89.34},
        # another reconstruction seed of the same point (qdrop_iters.py --recon-seeds): the
        # tables use seed 0 only, so it does not replace that value
        {
            "cell": "sgd_s0",
            "bits": "w2a4",
            "iters": 5000,
            "fp32": 93.2,
            "top1": 80.0,
            "recon_seed": 1,
        },
    ]
    sweep.write_text(json.dumps({"method": "qdrop", "points": points}))
    cell = tmp_path / "cells" / "sgd_s0"
    cell.mkdir(parents=True)
    rtn = {"fp32": 93.2, "w2a4": 37.76, "settings": {"method": "rtn", "bits": ["w2a4"]}}
    (cell / "ptq_rtn.json").write_text(json.dumps(rtn))
    qdrop_200 = {
        "fp32": 93.2,
        "w2a4": 68.39,
        "settings": {"method": "qdrop", "iters": 200, "bits": ["w2a4"]},
    }
    (cell / "ptq_qdrop.json").write_text(json.dumps(qdrop_200))  # another count: not read
    grid = _grid(tmp_path / "g.json", {"dnq": {0: (91.74, 81.19, 91.00)}})
    cells = bars.load([str(sweep), str(tmp_path / "cells"), grid], 5000)
    assert cells[("sgd", 0)] == {"fp32": 93.2, "qdrop": {"w2a4": 91.67}, "rtn": {"w2a4": 37.76}}
    # A later sweep's point of the same cell and bits (a re-measurement) replaces it.
    again = tmp_path / "again.json"
    point = {"cell": "sgd_s0", "bits": "w2a4", "iters": 5000, "fp32": 93.25, "top1": 90.57}
    again.write_text(json.dumps({"method": "qdrop", "points": [point]}))
    later = bars.load([str(sweep), str(tmp_path / "cells"), grid, str(again)], 5000)
    assert later[("sgd", 0)]["qdrop"] == {"w2a4": 90.57} and later[("sgd", 0)]["fp32"] == 93.25
    diffs = bars.differences(cells, "sgd", "w2a4")
    want = {"FP32": {0: -1.46}, "RTN": {0: 43.43}, "QDrop": {0: -0.67}}
    assert {k: v[0] for k, v in diffs["dnq"].items()} == pytest.approx(
        {k: v[0] for k, v in want.items()}
    )


def test_refusals(tmp_path, capsys):
    with pytest.raises(SystemExit, match="200 iterations per block, not 5000"):
        bars.load([_grid(tmp_path / "g200.json", {"sgd": SGD}, iters=200)], 5000)
    assert bars.main(["--grids", str(tmp_path / "absent.json")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    assert bars.main(["--grids", _grid(tmp_path / "g.json", {"good": GOOD})]) == 2
    assert "no 'sgd' cell" in capsys.readouterr().err


def test_rtn_is_averaged_over_the_seeds_the_row_is_judged_on(tmp_path):
    # RTN on three seeds, QDrop on seed 0 only (a sweep's point): the row is judged on seed
    # 0, and its RTN column is seed 0's difference, not the three seeds' mean.
    rtn_only = {s: (v[0], v[1]) for s, v in GOOD.items()}
    cells = [
        {"name": f"{name}_s{s}", "fp32": v[0], "ptq": {"rtn": {"w2a4": v[1]}}}
        for name, seeds in (("sgd", SGD), ("good", rtn_only))
        for s, v in seeds.items()
    ]
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"ptq": "rtn", "cells": cells}))
    sweep = tmp_path / "sweep.json"
    points = [
        {"cell": f"{c}_s0", "bits": "w2a4", "iters": 5000, "fp32": v[0][0], "top1": v[0][2]}
        for c, v in (("sgd", SGD), ("good", GOOD))
    ]
    sweep.write_text(json.dumps({"method": "qdrop", "points": points}))
    out = tmp_path / "bars.md"
    assert bars.main(["--grids", f"{grid},{sweep}", "--out", str(out)]) == 0
    row = next(ln for ln in out.read_text().splitlines() if ln.startswith("| good | 0 |"))
    assert row.split(" | ")[3] == f"{GOOD[0][1] - SGD[0][1]:+.2f}"
    # Without any QDrop, RTN is averaged over every seed that has it.
    assert bars.main(["--grids", str(grid), "--out", str(out)]) == 0
    d = np.array([GOOD[s][1] - SGD[s][1] for s in SGD], np.float64)
    assert f"| {d.mean():+.2f} ± {d.std(ddof=1):.2f} |" in out.read_text()


def test_bn_stats_now_columns_are_read_and_an_unrecorded_count_is_refused(tmp_path):
    # experiments/bn_stats.py's rows: "now" (today's code, statistics re-estimated) is what
    # counts, "saved" is not read; a later sweep's point still replaces its QDrop value.
    def row(cell, saved, now, **extra):
        return {
            "cell": cell,
            "bits": "w2a4",
            **{f"{k}_saved": v for k, v in zip(("fp32", "rtn", "qdrop"), saved)},
            **{f"{k}_now": v for k, v in zip(("fp32", "rtn", "qdrop"), now)},
            **extra,
        }

    rows = [
        row("sgd_s0", SGD[0], SGD[0], qdrop_iters=5000),
        row("dnq_s0", (91.74, 81.19, 91.00), (91.70, 49.09, 90.79), qdrop_iters=5000),
    ]
    stats = tmp_path / "bn_stats.json"
    stats.write_text(json.dumps({"cells": rows, "paired": []}))
    cells = bars.load([str(stats)], 5000)
    assert cells[("dnq", 0)] == {"fp32": 91.70, "rtn": {"w2a4": 49.09}, "qdrop": {"w2a4": 90.79}}
    sweep = tmp_path / "sweep.json"
    point = {"cell": "sgd_s0", "bits": "w2a4", "iters": 5000, "fp32": 93.2, "top1": 90.57}
    sweep.write_text(json.dumps({"method": "qdrop", "points": [point]}))
    diffs = bars.differences(bars.load([str(stats), str(sweep)], 5000), "sgd", "w2a4")
    got = {k: v[0] for k, v in diffs["dnq"].items()}
    assert got == pytest.approx({"FP32": 91.70 - 93.2, "RTN": 49.09 - 37.76, "QDrop": 0.22})
    with pytest.raises(SystemExit, match="QDrop at 5000 iterations per block, not 2000"):
        bars.load([str(stats)], 2000)
    del rows[1]["qdrop_iters"]
    stats.write_text(json.dumps({"cells": rows, "paired": []}))
    with pytest.raises(SystemExit, match="dnq_s0's QDrop at an unrecorded iterations"):
        bars.load([str(stats)], 5000)


def test_rows_picks_the_reported_rows_and_names_the_rest(tmp_path, capsys):
    grid = _grid(tmp_path / "g.json", {"sgd": SGD, "good": GOOD, "bad": BAD})
    out = tmp_path / "bars.md"
    assert bars.main(["--grids", grid, "--rows", "good", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| good | 0,1,2 |" in text and "| bad |" not in text
    assert text.endswith("Left out (--rows): bad.\n")
    assert bars.main(["--grids", grid, "--rows", "good,ugly"]) == 2
    assert "no such row: ugly; choose from: bad, good" in capsys.readouterr().err
