"""Parking a grid's cells (`dnq_jax/grid/park.py`, the command line experiments/park.py) on
hand-made cell folders: what is packed, and what comes back."""

import importlib.util
import json
import tarfile
from pathlib import Path

from configs import resnet
from dnq_jax.grid import park

ROOT = Path(__file__).resolve().parent.parent


def _cell(wd: Path, name: str, files: dict[str, str]) -> Path:
    cell = wd / "cells" / name
    for rel, text in files.items():
        (cell / rel).parent.mkdir(parents=True, exist_ok=True)
        (cell / rel).write_text(text)
    return cell


def test_a_trained_cell_whose_ptq_is_pending_is_parked_with_its_final_variables(tmp_path):
    wd, parked = tmp_path / "grid", tmp_path / "parked"
    config = resnet.get_config("smoke").to_json()
    rows = "".join(json.dumps({"step": s, "epoch": s // 4}) + "\n" for s in (4, 8))
    files = {
        "config.json": config,
        "metrics.jsonl": rows,
        "results.json": '{"fp32": 50.0}',
        "ptq_rtn.json": '{"w4a4": 40.0}',
        "final/default/array": "weights",
    }
    _cell(wd, "evaluating_s0", files)
    _cell(wd, "done_s0", {**files, "results.json": '{"fp32": 60.0}'})
    (wd / "grid.json").write_text(
        json.dumps({"cells": [{"name": "done_s0"}], "pending": ["evaluating_s0"]})
    )
    assert park.save(wd, parked) == ["evaluating_s0"]
    assert [p.name for p in parked.iterdir()] == ["evaluating_s0.tar.gz"]  # done_s0: finished
    with tarfile.open(parked / "evaluating_s0.tar.gz") as tar:
        assert not [n for n in tar.getnames() if n.startswith("checkpoints")]
    fresh = tmp_path / "fresh"
    assert park.restore(fresh, parked) == ["evaluating_s0"]
    back = fresh / "cells" / "evaluating_s0"
    for rel, text in files.items():
        assert (back / rel).read_text() == text, rel
    assert [p.name for p in (fresh / "cells").iterdir()] == ["evaluating_s0"]  # no leftovers
    # --keep-final: the finished cell too, final variables and all, for a later grid with
    # other PTQ settings.
    assert park.save(wd, parked, keep_final=True) == ["done_s0", "evaluating_s0"]
    other = tmp_path / "other"
    assert park.restore(other, parked) == ["done_s0", "evaluating_s0"]
    assert (other / "cells/done_s0/final/default/array").read_text() == "weights"
    assert (other / "cells/done_s0/results.json").read_text() == '{"fp32": 60.0}'


def test_without_a_grid_report_results_json_marks_a_finished_cell(tmp_path):
    wd, parked = tmp_path / "grid", tmp_path / "parked"
    config = resnet.get_config("smoke").to_json()
    _cell(wd, "a_s0", {"config.json": config, "results.json": "{}"})
    parked.mkdir()
    (parked / "a_s0.tar.gz").write_bytes(b"an older parked copy")
    assert park.save(wd, parked) == [] and not list(parked.iterdir())


def test_the_script_parks_under_experiments_parked(tmp_path):
    """experiments/park.py: the package's save and restore, with experiments/parked/NAME/."""
    spec = importlib.util.spec_from_file_location("park_script", ROOT / "experiments" / "park.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (script.save, script.restore) == (park.save, park.restore)
    assert script.main(["restore", str(tmp_path / "grid"), "no_such_experiment"]) == 0
    assert (
        not (tmp_path / "grid").exists()
        and not (ROOT / "experiments/parked/no_such_experiment").exists()
    )
