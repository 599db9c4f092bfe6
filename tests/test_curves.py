"""experiments/curves.py: a grid's training curves and the rise of each cell's test accuracy,
checked on made-up metrics (no training)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("curves", ROOT / "experiments" / "curves.py")
curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curves)


def _cell(root: Path, name: str, accs: dict[int, float], planned: int | None = 40) -> Path:
    cell = root / "cells" / name
    cell.mkdir(parents=True)
    rows = []
    for ep in range(1, max(accs) + 1):
        row = {"step": ep * 10, "epoch": float(ep), "train_loss": 2.0 / ep, "lambda": 0.0}
        if ep in accs:
            row["test_acc"] = accs[ep]
        rows.append(row)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (cell / "metrics.jsonl").write_text(text + '{"step": 9')  # a torn last line: skipped
    if planned:
        (cell / "config.json").write_text(json.dumps({"optim": {"num_epochs": planned}}))
    return cell


def test_rise_is_the_last_point_minus_the_one_a_window_earlier():
    test = [(2, 50.0), (4, 70.0), (6, 80.0), (8, 81.0), (10, 81.5)]
    assert curves.rise(test, 4) == pytest.approx(81.5 - 80.0)  # epoch 6 = 10 - 4
    assert curves.rise(test, 3) == pytest.approx(81.5 - 80.0)  # latest at or before 7
    assert curves.rise(test, 20) == pytest.approx(81.5 - 50.0)  # none that early: the first
    assert curves.rise(test[:1], 4) is None


def test_table_and_plot_of_finished_and_unfinished_cells(tmp_path, capsys):
    _cell(tmp_path, "sgd_s0", {2: 60.0, 4: 80.0, 6: 85.0, 8: 86.0})
    _cell(tmp_path, "dnq_s0", {2: 55.0}, planned=None)
    (tmp_path / "cells" / "empty_s0").mkdir()  # no epoch yet: left out
    out, fig = tmp_path / "c.md", tmp_path / "c.png"
    argv = [str(tmp_path), "--window", "4", "--out", str(out), "--plot", str(fig)]
    assert curves.main(argv) == 0
    md = out.read_text()
    assert "| sgd_s0 | 8 of 40 | 86.00 | 86.00 | +6.00 | 2: 60.00, 4: 80.00, 6: 85.00" in md
    assert "| dnq_s0 | 2 | 55.00 | 55.00 | - | 2: 55.00 |" in md
    assert "empty_s0" not in md and md.split("\n", 2)[2] in capsys.readouterr().out
    assert fig.stat().st_size > 0


def test_bad_input_is_refused(tmp_path, capsys):
    assert curves.main([str(tmp_path / "absent")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "cells").mkdir()
    assert curves.main([str(tmp_path)]) == 1
    with pytest.raises(SystemExit):
        curves.main([str(tmp_path), "--window", "0"])
