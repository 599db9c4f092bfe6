"""Shared warm-ups: a run begun from another's noise-stage start is the run trained alone."""

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE_RUN

from configs import resnet
from dnq_jax import grid
from dnq_jax.cli import grid as grid_cli
from dnq_jax.grid import fork
from dnq_jax.grid import run as grid_run
from dnq_jax.train import checkpoint, loop, metrics

# The session's smoke run (conftest.py): 5 epochs of 4 steps, noise from epoch 1 (step 4).
RUN = "smoke," + SMOKE_RUN


def _restore(path):
    return ocp.StandardCheckpointer().restore(path.absolute())


def _saved(arg: str) -> dict:
    return json.loads(resnet.get_config(arg).to_json())


def test_only_noise_keys_may_differ_between_runs_sharing_a_warm_up():
    base = resnet.get_config(RUN)
    for arg, conflicts in [
        (RUN + ",noise.w_bits=4,noise.a_bits=4", []),
        (RUN + ",noise.w_scale=0.7071,noise.ramp=exp,noise.n_calib=16", []),
        (RUN + ",method=swa", []),  # no noise at all, SWA like dnq
        (RUN + ",method=naive,eval.bits=w2a4,runtime.chunk_steps=2", []),
        (RUN + ",swa.bn_recalibration=False", []),  # read after the last epoch
        (RUN + ",swa.lr=0.01", ["swa.lr"]),
        (RUN + ",method=sgd", []),  # SWA's first snapshot (epoch 2) is after the noise start
        (RUN + ",noise.start_epoch=2", ["noise.start_epoch"]),
        (RUN + ",optim.learning_rate=0.2,seed=3", ["optim.learning_rate", "seed"]),
    ]:
        saved = _saved(arg)
        assert fork.prefix_conflicts(saved, base) == conflicts, arg
        same_key = fork.warmup_key(saved) == fork.warmup_key(json.loads(base.to_json()))
        assert same_key == (not conflicts), arg
    # With SWA's first snapshot before the noise stage, the SWA switch changes the warm-up.
    early = RUN + ",noise.start_epoch=3"
    saved, c = _saved(early + ",method=sgd"), resnet.get_config(early)
    assert fork.prefix_conflicts(saved, c) == ["swa.enabled"]
    assert fork.warmup_key(saved) != fork.warmup_key(json.loads(c.to_json()))


def test_the_run_keeps_its_state_at_the_noise_stage_start(smoke_run):
    wd, _ = smoke_run
    start = fork.start_state(wd)
    assert start.name == "4"  # epoch 1 of 4 steps
    # The same state as the regular checkpoint at that step (the run keeps 10 of those).
    jax.tree_util.tree_map(
        np.testing.assert_array_equal,
        _restore(start / "default"),
        _restore(wd / "checkpoints" / "4" / "default"),
    )


def test_a_torn_warm_up_save_is_set_aside_and_the_state_kept_once(tmp_path):
    """A run killed while keeping its warm-up (just after that step's checkpoint) leaves an
    Orbax tmp folder; the resumed run sets it aside and keeps the state once, as checkpoints/."""
    torn = tmp_path / checkpoint.NOISE_START / "4.orbax-checkpoint-tmp-1700000000"
    torn.mkdir(parents=True)
    (torn / "junk").write_bytes(b"\0" * 8)
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}
    checkpoint.save_noise_start(tmp_path, 4, state)
    checkpoint.save_noise_start(tmp_path, 4, {"w": state["w"] + 1, "step": np.int32(4)})
    kept = sorted(p.name for p in (tmp_path / checkpoint.NOISE_START).iterdir())
    assert kept == ["4", "4.incomplete"]
    assert (tmp_path / checkpoint.NOISE_START / "4.incomplete" / "junk").exists()
    start = fork.start_state(tmp_path)
    assert start.name == "4"
    np.testing.assert_array_equal(_restore(start / "default")["w"], state["w"])  # the first


def test_a_grid_cell_begun_from_a_donor_warm_up_is_the_run_trained_alone(
    smoke_run, tmp_path, monkeypatch
):
    smoke_wd, _ = smoke_run
    wd = tmp_path / "grid"
    shutil.copytree(smoke_wd, wd / "cells" / "dnq_s0")  # a finished cell of the grid
    cells = grid.make_cells(
        resnet.get_config,
        RUN,
        seeds=[0],
        settings=["dnq:method=dnq", "w4:noise.w_bits=4,noise.a_bits=4", "sgd:method=sgd"],
    )
    trained = []
    real = loop.train_and_evaluate

    def spy(config, workdir, dataset=None):
        trained.append((workdir.rsplit("/", 1)[-1], fork.newest_checkpoint(workdir)))
        return real(config, workdir, dataset=dataset)

    monkeypatch.setattr(loop, "train_and_evaluate", spy)
    # sgd is left out here (test_an_sgd_warm_up_begins_a_dnq_run_and_the_other_way_round).
    doc = grid.run_grid(cells[:2], wd)
    cell = wd / "cells" / "w4_s0"
    assert [(n, None if s is None else s.name) for n, s in trained] == [("w4_s0", "4")]
    assert json.loads((cell / "fork.json").read_text())["step"] == 4
    assert [r["epoch"] for r in metrics.read(cell)] == [1, 2, 3, 4, 5]
    assert doc["cells"][1]["warmup_from"] == {"cell": "dnq_s0", "step": 4}
    assert "| w4_s0† | 0 |" in (wd / "grid.md").read_text()

    monkeypatch.setattr(loop, "train_and_evaluate", real)
    alone = tmp_path / "alone"
    results = real(cells[1].config, str(alone))
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, _restore(cell / "final"), _restore(alone / "final")
    )
    forked = json.loads((cell / "results.json").read_text())
    for key in ("fp32", "w8a8", "w4a4"):
        assert forked[key] == results[key], key
    assert fork.find_donor([wd / "cells" / "dnq_s0"], cells[2].config) == wd / "cells" / "dnq_s0"


def test_an_sgd_warm_up_begins_a_dnq_run_and_the_other_way_round(smoke_run, tmp_path):
    """SGD (no SWA) and DNQ (SWA from epoch 2) are the same run up to the noise start (epoch
    1): begun from each other's warm-up, with SWA's optimizer state added or taken off, each
    starts from the state it keeps there when trained alone, bit for bit, and the DNQ run (the
    grids' case) ends where it ends trained alone. (A run resumed from an equal state ends
    equal: tests/test_train.py, tests/test_faults.py.)"""
    smoke_wd, _ = smoke_run
    sgd, dnq = RUN + ",method=sgd,eval.bits=", RUN + ",eval.bits="  # FP32 alone
    sgd_alone = tmp_path / "sgd_alone"
    loop.train_and_evaluate(resnet.get_config(sgd), str(sgd_alone))
    (tmp_path / "cells").mkdir()
    for name, donor, arg, alone in [
        ("dnq", sgd_alone, dnq, smoke_wd),
        ("sgd", smoke_wd, sgd, sgd_alone),
    ]:
        run, c = tmp_path / "cells" / name, resnet.get_config(arg)
        assert fork.begin_from(donor, run, c) == 4
        assert json.loads((run / "fork.json").read_text())["step"] == 4
        # The converted state is the one the run kept at that step when trained alone.
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            _restore(run / "checkpoints" / "4" / "default"),
            _restore(fork.start_state(alone) / "default"),
        )
        if name == "dnq":
            loop.train_and_evaluate(c, str(run))
            jax.tree_util.tree_map(
                np.testing.assert_array_equal, _restore(run / "final"), _restore(alone / "final")
            )
    # Of two donors, the one with the run's SWA switch (copied, not converted) is taken.
    assert fork.find_donor([sgd_alone, smoke_wd], resnet.get_config(dnq)) == smoke_wd
    assert fork.find_donor([smoke_wd, sgd_alone], resnet.get_config(sgd)) == sgd_alone


def test_a_conversion_that_fails_leaves_the_run_to_train_its_own_warm_up(
    smoke_run, tmp_path, monkeypatch, capsys
):
    smoke_wd, _ = smoke_run
    shutil.copytree(smoke_wd, tmp_path / "cells" / "donor", ignore=shutil.ignore_patterns("final"))

    def broken(*args):
        raise ValueError("SWA has averaged 3 snapshots already")

    monkeypatch.setattr(fork, "_swa_state_added_or_dropped", broken)
    run = tmp_path / "cells" / "sgd"
    assert fork.begin_from_sibling(run, resnet.get_config(RUN + ",method=sgd")) is None
    assert "sgd trains its own warm-up (donor's: SWA has averaged" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["donor"]


def test_a_run_with_a_checkpoint_is_never_overwritten_by_a_donor(smoke_run, tmp_path):
    smoke_wd, _ = smoke_run
    with pytest.raises(ValueError, match="resumes from its own"):
        fork.begin_from(smoke_wd, smoke_wd, resnet.get_config(RUN))
    with pytest.raises(ValueError, match=checkpoint.NOISE_START):
        fork.begin_from(tmp_path, tmp_path / "run", resnet.get_config(RUN))


def test_a_begin_cut_short_is_undone_and_done_again(smoke_run, tmp_path):
    smoke_wd, _ = smoke_run
    shutil.copytree(smoke_wd, tmp_path / "cells" / "donor")
    run = tmp_path / "cells" / "w4"
    run.mkdir()
    # What a kill between fork.json and the checkpoint's move leaves behind.
    (run / "fork.json").write_text('{"donor": "elsewhere", "step": 99}')
    (run / "metrics.jsonl").write_text('{"step": 99, "epoch": 25}\n')
    c = resnet.get_config(RUN + ",noise.w_bits=4")
    assert fork.begin_from_sibling(run, c) == tmp_path / "cells" / "donor"
    assert fork.newest_checkpoint(run).name == "4"
    assert [r["step"] for r in metrics.read(run)] == [4]
    assert json.loads((run / "fork.json").read_text())["step"] == 4
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == ["donor", "w4"]
    assert fork.begin_from_sibling(run, c) is None  # it has its checkpoint now


@pytest.mark.parametrize("flag, shared", [([], True), (["--no-shared-warmup"], False)])
def test_the_grid_command_shares_warm_ups_unless_told_not_to(tmp_path, monkeypatch, flag, shared):
    seen = {}

    def run_grid(*args, **kwargs):  # records its options, writes the report _main prints
        seen.update(kwargs)
        (tmp_path / "grid.md").write_text("# the report\n")

    monkeypatch.setattr(grid_run, "run_grid", run_grid)
    argv = ["--config", "configs/resnet.py:smoke", "--methods", "dnq", "--workdir", str(tmp_path)]
    assert grid_cli.main(argv + flag) == 0
    assert seen["share_warmup"] is shared
