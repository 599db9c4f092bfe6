"""The experiment grid: a cell is its run alone, a killed grid resumes, mean ± std over seeds."""

import json
import tarfile

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE_RUN

from configs import resnet
from dnq_jax import grid
from dnq_jax.errors import ConfigError
from dnq_jax.grid import fork, park
from dnq_jax.grid import report as grid_report
from dnq_jax.train import checkpoint, loop, metrics

# The session's smoke run (conftest.py): 5 epochs of 4 steps, noise from epoch 1, SWA from
# epoch 2, a checkpoint per epoch. Its steps are in the test cache, and cell dnq_s0 (smoke's
# method and seed) is that very run, trained alone.
RUN = "smoke," + SMOKE_RUN


def _final(workdir):
    return ocp.StandardCheckpointer().restore((workdir / "final").absolute())


class Killed(Exception):
    """Stands for the process being killed."""


def _cells(bits=""):
    return grid.make_cells(resnet.get_config, RUN, seeds=[0, 1], methods=["dnq"], bits=bits)


@pytest.fixture(scope="module")
def killed_grid(smoke_run, tmp_path_factory):
    """A grid of two seeds killed in its second cell after that cell's second checkpoint,
    then run again; returns the workdir, the cells run the second time, and the first cell's
    file times after the first sitting. After the session's smoke run: the cells load its
    programs from the compilation cache instead of compiling them beside it (pytest-xdist
    may be training it in another worker)."""
    wd = tmp_path_factory.mktemp("grid")
    real_save = checkpoint.save

    def save_then_die(mngr, step, state):
        real_save(mngr, step, state)
        if "dnq_s1" in str(mngr.directory) and step == 8:
            raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save", save_then_die)
        with pytest.raises(Killed):
            grid.run_grid(_cells(), wd)
    first = wd / "cells" / "dnq_s0"
    times = {f: (first / f).stat().st_mtime_ns for f in ("results.json", "ptq_rtn.json")}
    partial = json.loads((wd / "grid.json").read_text())
    # The sitting's end: park.save (`experiments/park.py save`) packs the unfinished cell for
    # the next clone (and the finished one's warm-up, which no unfinished cell of seed 0
    # carries).
    assert park.save(wd, wd.parent / "parked") == ["dnq_s1"]
    assert sorted(p.name for p in (wd.parent / "parked").iterdir()) == [
        "dnq_s0.tar.gz",
        "dnq_s1.tar.gz",
    ]
    trained = []
    real_train = loop.train_and_evaluate

    def spy(config, workdir, dataset=None):
        trained.append(workdir)
        return real_train(config, workdir, dataset=dataset)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "train_and_evaluate", spy)
        doc = grid.run_grid(_cells(), wd)
    return wd, doc, partial, trained, times


def test_killed_grid_resumes_skipping_finished_cells(killed_grid):
    wd, doc, partial, trained, times = killed_grid
    # The report written before the kill holds the finished cell only.
    assert [c["name"] for c in partial["cells"]] == ["dnq_s0"]
    assert partial["pending"] == ["dnq_s1"]
    # The second sitting trained only the interrupted cell, and left the finished one alone.
    assert [p.rsplit("/", 1)[-1] for p in trained] == ["dnq_s1"]
    first = wd / "cells" / "dnq_s0"
    for f, t in times.items():
        assert (first / f).stat().st_mtime_ns == t, f
    # The interrupted cell resumed from its step-8 checkpoint: epochs 1-2 before, 3-5 after.
    epochs = [r["epoch"] for r in metrics.read(wd / "cells" / "dnq_s1") if "epoch" in r]
    assert epochs == [1, 2, 3, 4, 5]
    assert [c["name"] for c in doc["cells"]] == ["dnq_s0", "dnq_s1"] and doc["pending"] == []


def test_a_parked_cell_resumes_in_a_fresh_workdir_to_the_uninterrupted_result(killed_grid):
    wd, *_ = killed_grid
    parked, fresh = wd.parent / "parked", wd.parent / "fresh_clone"
    assert park.restore(fresh, parked) == ["dnq_s0", "dnq_s1"]
    assert park.restore(fresh, parked) == []  # never over a cell already there
    # dnq_s0 came back as its warm-up only; dnq_s1 with its checkpoint and its warm-up.
    assert not (fresh / "cells" / "dnq_s0" / "checkpoints").exists()
    assert fork.start_state(fresh / "cells" / "dnq_s0").name == "4"
    assert fork.newest_checkpoint(fresh / "cells" / "dnq_s1").name == "8"
    assert fork.start_state(fresh / "cells" / "dnq_s1").name == "4"
    epochs = [r["epoch"] for r in metrics.read(fresh / "cells" / "dnq_s1") if "epoch" in r]
    assert epochs == [1, 2]  # the rows up to the parked step-8 checkpoint
    grid.run_grid(_cells()[1:], fresh)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        _final(fresh / "cells" / "dnq_s1"),
        _final(wd / "cells" / "dnq_s1"),
    )
    # Finished now: the next save drops the parked copy, keeping one warm-up per seed.
    assert park.save(fresh, parked) == []
    assert sorted(p.name for p in parked.iterdir()) == ["dnq_s0.tar.gz", "dnq_s1.tar.gz"]
    for archive in parked.iterdir():
        with tarfile.open(archive) as tar:
            assert not [n for n in tar.getnames() if n.startswith("checkpoints")]
    before = {p.name: p.read_bytes() for p in parked.iterdir()}
    assert park.save(fresh, parked) == []  # a warm-up archive is written once, then kept
    assert {p.name: p.read_bytes() for p in parked.iterdir()} == before


def test_grid_cell_equals_the_same_config_run_alone(killed_grid, smoke_run):
    wd, doc, *_ = killed_grid
    alone_wd, alone = smoke_run
    assert resnet.get_config(RUN) == resnet.get_config(RUN + ",method=dnq,seed=0")
    cell = wd / "cells" / "dnq_s0"
    jax.tree_util.tree_map(np.testing.assert_array_equal, _final(cell), _final(alone_wd))
    on_disk = json.loads((cell / "results.json").read_text())
    ptq_rtn = json.loads((cell / "ptq_rtn.json").read_text())
    for key in ("fp32", "w8a8", "w4a4"):
        assert on_disk[key] == alone[key] == ptq_rtn[key], key
    assert doc["cells"][0]["ptq"]["rtn"] == {"w8a8": alone["w8a8"], "w4a4": alone["w4a4"]}


def test_grid_reports_mean_and_std_over_seeds(killed_grid):
    wd, doc, *_ = killed_grid
    cells = [wd / "cells" / n for n in ("dnq_s0", "dnq_s1")]
    fp32 = [json.loads((c / "results.json").read_text())["fp32"] for c in cells]
    rtn = [json.loads((c / "ptq_rtn.json").read_text()) for c in cells]
    expected = {("-", "fp32"): fp32, **{("rtn", b): [r[b] for r in rtn] for b in ("w8a8", "w4a4")}}
    rows = {(r["ptq"], r["precision"]): r for r in doc["summary"] if r["setting"] == "dnq"}
    assert set(rows) == set(expected)
    md = (wd / "grid.md").read_text()
    for key, values in expected.items():
        row = rows[key]
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row["seeds"] == [0, 1] and row["n"] == 2
        text = f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
        assert f"| dnq | {key[0]} | {key[1].upper()} | {text} | 0,1 |" in md
    assert "| dnq_s1 | 1 |" in md
    assert (wd / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the bars


def test_a_ptq_file_of_other_settings_is_rewritten(killed_grid, tmp_path):
    wd, *_ = killed_grid
    cwd = tmp_path / "dnq_s0"
    for f in ("config.json", "results.json", "ptq_rtn.json"):
        (cwd / f).parent.mkdir(exist_ok=True)
        (cwd / f).write_bytes((wd / "cells" / "dnq_s0" / f).read_bytes())
    stale = json.loads((cwd / "ptq_rtn.json").read_text())
    stale["settings"]["batch_size"] += 1
    (cwd / "ptq_rtn.json").write_text(json.dumps(stale))
    cell = _cells()[0]
    assert grid.collect(cell, cwd, ["rtn"], 0) is None
    grid.evaluate_cell(cell, cwd, None, ["rtn"], 0)  # all of it is in results.json
    assert grid.collect(cell, cwd, ["rtn"], 0) == grid.collect(
        cell, wd / "cells" / "dnq_s0", ["rtn"], 0
    )


def test_new_bit_widths_are_evaluated_without_training_again(killed_grid, monkeypatch):
    wd, *_ = killed_grid
    before = json.loads((wd / "cells" / "dnq_s0" / "ptq_rtn.json").read_text())
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    doc = grid.run_grid(_cells(bits="w8a8,w4a4,w2a4"), wd)
    after = json.loads((wd / "cells" / "dnq_s0" / "ptq_rtn.json").read_text())
    assert {k: after[k] for k in ("fp32", "w8a8", "w4a4")} == {
        k: before[k] for k in ("fp32", "w8a8", "w4a4")
    }
    assert 0 <= after["w2a4"] <= 100 and after["settings"]["bits"] == ["w8a8", "w4a4", "w2a4"]
    assert set(doc["cells"][1]["ptq"]["rtn"]) == {"w8a8", "w4a4", "w2a4"}


def test_a_method_evaluates_only_the_bits_its_cell_names_for_it(killed_grid, monkeypatch):
    """`Cell.method_bits`: the demo reconstructs at the DNQ targets only, RTN at every
    precision; here RTN is kept to one of the cell's two precisions (all in results.json)."""
    import dataclasses

    wd, *_ = killed_grid
    cell = _cells(bits="w8a8,w4a4")[0]
    assert cell.bits_for("rtn") == ((8, 8), (4, 4))
    only = dataclasses.replace(cell, method_bits=(("rtn", ((4, 4), (2, 2))),))
    assert only.bits_for("rtn") == ((4, 4),) and only.bits_for("qdrop") == cell.bits
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    full = grid.collect(cell, wd / "cells" / "dnq_s0", ["rtn"], 0)
    doc = grid.run_grid([only], wd)
    (record,) = [r for r in doc["cells"] if r["name"] == "dnq_s0"]
    assert record["ptq"]["rtn"] == {"w4a4": full["ptq"]["rtn"]["w4a4"]}


def test_a_grid_counts_the_finished_cells_of_an_included_earlier_grid(
    killed_grid, tmp_path, monkeypatch
):
    wd, doc, *_ = killed_grid
    old = tmp_path / "old_grid.json"
    old.write_text(json.dumps({**doc, "config": RUN, "ptq_iters": 0}))
    cells = _cells()
    included = grid.load_included([old], cells, RUN, ["rtn"], 0)
    assert sorted(included) == ["dnq_s0", "dnq_s1"]
    monkeypatch.setattr(loop, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    new = grid.run_grid(cells, tmp_path / "elsewhere", included=included)
    assert new["summary"] == doc["summary"] and new["pending"] == []
    assert [c["included_from"] for c in new["cells"]] == [str(old)] * 2
    md = (tmp_path / "elsewhere" / "grid.md").read_text()
    assert "| dnq_s1* | 1 |" in md and f"included from an earlier grid, {old}" in md
    # A grid of another setting keeps the earlier cells' rows (first) and trains only its own.
    other = grid.make_cells(resnet.get_config, RUN, seeds=[0], settings=["other:method=sgd"])
    carried = grid.load_included([old], other, RUN, ["rtn"], 0)
    assert carried == included
    doc2 = grid.run_grid(other, tmp_path / "other", train=False, included=carried)
    assert [c["name"] for c in doc2["cells"]] == ["dnq_s0", "dnq_s1"]
    assert doc2["pending"] == ["other_s0"]
    # Not usable: a PTQ method or a bit-width the earlier grid did not measure.
    assert grid.load_included([old], cells, RUN, ["rtn", "qdrop"], 0) == {}
    assert grid.load_included([old], _cells(bits="w2a4"), RUN, ["rtn"], 0) == {}
    # Another base config or iteration count is refused, naming what differs.
    with pytest.raises(ConfigError, match="config"):
        grid.load_included([old], cells, RUN + ",optim.learning_rate=0.2", ["rtn"], 0)
    with pytest.raises(ConfigError, match="ptq_iters"):
        grid.load_included([old], cells, RUN, ["rtn"], 50)
    with pytest.raises(ConfigError, match="no file"):
        grid.load_included([tmp_path / "missing.json"], cells, RUN, ["rtn"], 0)
    (tmp_path / "torn.json").write_text('{"cells": [')
    with pytest.raises(ConfigError, match="not a readable grid.json"):
        grid.load_included([tmp_path / "torn.json"], cells, RUN, ["rtn"], 0)
    # Other seeds of a setting this grid has join its mean only with the same overrides.
    seed2 = grid.make_cells(resnet.get_config, RUN, seeds=[2], methods=["dnq"])
    assert sorted(grid.load_included([old], seed2, RUN, ["rtn"], 0)) == ["dnq_s0", "dnq_s1"]
    lr = grid.make_cells(
        resnet.get_config, RUN, seeds=[2], settings=["dnq:method=dnq,optim.learning_rate=0.02"]
    )
    assert grid.load_included([old], lr, RUN, ["rtn"], 0) == {}


def test_summary_matches_numpy_per_setting_method_and_bits():
    rng = np.random.default_rng(0)
    records = []
    for seed in range(3):
        for setting in ("sgd", "dnq_w2a4"):
            records.append(
                {
                    "name": f"{setting}_s{seed}",
                    "setting": setting,
                    "seed": seed,
                    "fp32": float(rng.uniform(80, 90)),
                    "ptq": {m: {"w2a4": float(rng.uniform(10, 80))} for m in ("rtn", "qdrop")},
                }
            )
    records.append({**records[0], "setting": "one", "name": "one_s0"})
    rows = {(r["setting"], r["ptq"], r["precision"]): r for r in grid_report.summarize(records)}
    assert len(rows) == 2 * 3 + 3
    for setting in ("sgd", "dnq_w2a4"):
        mine = [r for r in records if r["setting"] == setting]
        for key, values in [
            (("-", "fp32"), [r["fp32"] for r in mine]),
            (("rtn", "w2a4"), [r["ptq"]["rtn"]["w2a4"] for r in mine]),
            (("qdrop", "w2a4"), [r["ptq"]["qdrop"]["w2a4"] for r in mine]),
        ]:
            row = rows[(setting, *key)]
            assert row["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert row["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
            assert row["n"] == 3 and row["values"] == values
    assert rows[("one", "rtn", "w2a4")]["std"] is None  # one seed: no spread to report


def test_cells_cross_methods_settings_and_seeds_with_their_own_bits():
    cells = grid.make_cells(
        resnet.get_config,
        "smoke",
        seeds=[0, 2],
        settings=["w4:noise.w_bits=4,noise.a_bits=4,bits=w4a4", "base:"],
        methods=["sgd", "dnq"],
        bits="w2a4",
    )
    assert [c.name for c in cells[:4]] == ["sgd-w4_s0", "sgd-base_s0", "dnq-w4_s0", "dnq-base_s0"]
    assert [c.seed for c in cells] == [0] * 4 + [2] * 4
    w4 = cells[2]
    assert w4.bits == ((4, 4),) and w4.config.eval.bits == "w4a4"
    assert (w4.config.noise.w_bits, w4.config.noise.a_bits, w4.config.seed) == (4, 4, 0)
    assert cells[0].config.noise.weight == "none" and w4.config.noise.weight == "differential"
    assert cells[3].bits == ((2, 4),) and cells[7].config.seed == 2
    with pytest.raises(ConfigError, match="twice"):
        grid.make_cells(resnet.get_config, "smoke", [0], settings=["a:seed=1", "a:seed=2"])
    with pytest.raises(ConfigError, match="noise.w_bit"):
        grid.make_cells(resnet.get_config, "smoke", [0], settings=["a:noise.w_bit=4"])


def test_recon_bits_keeps_reconstruction_to_some_of_a_cells_bits():
    (cell,) = grid.make_cells(
        resnet.get_config, "smoke", [0], settings=["s:method=sgd,bits=w4a4+w2a4,recon_bits=w2a4"]
    )
    assert cell.overrides == "method=sgd" and cell.config.eval.bits == "w4a4,w2a4"
    assert cell.bits_for("rtn") == ((4, 4), (2, 4))
    assert [cell.bits_for(m) for m in ("adaround", "brecq", "qdrop")] == [((2, 4),)] * 3
    with pytest.raises(ConfigError, match="recon_bits w2a2 not among the cell's bits"):
        grid.make_cells(resnet.get_config, "smoke", [0], settings=["s:bits=w4a4,recon_bits=w2a2"])
