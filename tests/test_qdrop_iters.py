"""experiments/qdrop_iters.py: a sweep over reconstruction seeds on the smoke run laid out as
a grid cell; each point is the reconstruction run with that seed, and a rerun skips the
points already measured."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "qdrop_iters", ROOT / "experiments" / "qdrop_iters.py"
)
qdrop_iters = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qdrop_iters)


def test_each_reconstruction_seed_is_its_own_point_and_a_rerun_skips_them(
    smoke_run, tmp_path, capsys
):
    from dnq_jax.train import evaluate

    smoke_wd, _ = smoke_run
    cell = tmp_path / "cells" / "dnq_s0"
    shutil.copytree(smoke_wd, cell, ignore=shutil.ignore_patterns("checkpoints", "noise_start"))
    out = tmp_path / "sweep"
    # A point written before the option (no recon_seed) is seed 0: not measured again.
    old = {"cell": "dnq_s0", "bits": "w4a4", "iters": 2, "top1": 12.5, "fp32": 0.0, "time_s": 1}
    out.with_suffix(".json").write_text(json.dumps({"method": "qdrop", "points": [old]}))
    argv = ["--workdir", str(tmp_path), "--cells", "dnq_s0", "--bits", "w4a4", "--iters", "2"]
    argv += ["--recon-seeds", "0,1,3", "--name", str(out)]
    assert qdrop_iters.main(argv) == 0
    points = json.loads(out.with_suffix(".json").read_text())["points"]
    assert [p.get("recon_seed", 0) for p in points] == [0, 1, 3]
    assert points[0]["top1"] == 12.5

    # The seed reaches the reconstruction: the same settings run here by hand.
    c, model, variables, ds = evaluate.load_run(str(cell))
    refs = {}
    for seed in (1, 3):
        settings = evaluate.EvalSettings.from_config(
            c, bits=((4, 4),), method="qdrop", iters=2, recon_seed=seed
        )
        refs[seed] = evaluate.evaluate_variables(model, variables, ds, settings, progress=False)
        assert refs[seed]["reconstruction"]["w4a4"]["settings"]["seed"] == seed
    # Each point is the model of its seed, and another seed gives another model: the blocks'
    # errors after reconstruction (the top-1 on the smoke run's 128 test images can coincide).
    after = {
        s: [float(b["loss_after"]) for b in r["reconstruction"]["w4a4"]["blocks"]]
        for s, r in refs.items()
    }
    for point, seed in ((points[1], 1), (points[2], 3)):
        assert point["top1"] == pytest.approx(refs[seed]["w4a4"], abs=1e-9)
        assert point["loss_after"] == pytest.approx(after[seed], rel=1e-6) and after[seed]
    assert after[1] != after[3]

    md = out.with_suffix(".md").read_text()
    vals = [12.5, points[1]["top1"], points[2]["top1"]]
    assert f"| dnq_s0 | W4A4 | {qdrop_iters._cell_text(vals)} |" in md
    assert "± " in qdrop_iters._cell_text(vals) and "(3)" in qdrop_iters._cell_text(vals)
    assert "- dnq_s0 W4A4 2 seed 1: " in md
    capsys.readouterr()
    assert qdrop_iters.main(argv) == 0  # everything measured: nothing runs
    assert "qdrop_iters:" not in capsys.readouterr().out
    assert len(json.loads(out.with_suffix(".json").read_text())["points"]) == 3


@pytest.mark.parametrize("seeds", ["a,b", "-1", ""])
def test_bad_seeds_are_refused(seeds, tmp_path, capsys):
    with pytest.raises(SystemExit):
        qdrop_iters.main(["--workdir", str(tmp_path), "--cells", "x", "--recon-seeds", seeds])
    assert "--recon-seeds" in capsys.readouterr().err
