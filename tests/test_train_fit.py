"""experiments/train_fit.py: clean top-1 and cross-entropy of a split, and the same-seed
differences against SGD, checked against numpy (float64) on made-up models and rows."""

import importlib.util
import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train_fit", ROOT / "experiments" / "train_fit.py")
train_fit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_fit)


def test_split_fit_matches_numpy_over_uneven_batches():
    rng = np.random.default_rng(0)
    n = 2 * train_fit.BATCH + 37  # the last batch is short
    images = rng.integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    w = rng.normal(size=(16, 5)).astype(np.float32)
    mean, std = 0.45, 0.25  # the data module's convention: (x / 255 - mean) / std
    apply = lambda v, x: x.reshape(x.shape[0], -1) @ v
    got = train_fit.split_fit(apply, jnp.asarray(w), images, labels, mean, std)
    x = (images.reshape(n, -1).astype(np.float64) / 255.0 - mean) / std
    logits = x @ w.astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    assert got["n"] == n
    assert got["top1"] == pytest.approx(100.0 * np.mean(logits.argmax(1) == labels), abs=1e-9)
    assert got["loss"] == pytest.approx(-np.mean(logp[np.arange(n), labels]), rel=1e-5)


def _row(cell, seed, train, test, tl=0.2, vl=0.3):
    return {
        "cell": cell,
        "method": train_fit.setting_of(cell),
        "seed": seed,
        "train_top1": train,
        "test_top1": test,
        "train_loss": tl,
        "test_loss": vl,
        "gap_top1": train - test,
    }


def test_paired_differences_are_per_seed_and_skip_seeds_without_sgd():
    rows = [
        _row("sgd_s0", 0, 95.0, 93.0),
        _row("sgd_s1", 1, 94.0, 92.0),
        _row("lam08_s0", 0, 94.0, 92.5, tl=0.25),
        _row("lam08_s1", 1, 92.0, 91.0, tl=0.30),
        _row("dnq_w2a4_s0", 0, 92.5, 91.6),
        _row("dnq_w2a4_s5", 5, 10.0, 10.0),  # no SGD of seed 5: not paired
    ]
    pairs = {p["setting"]: p for p in train_fit.paired(rows)}
    assert set(pairs) == {"lam08", "dnq_w2a4"}
    lam = pairs["lam08"]
    assert lam["seeds"] == [0, 1]
    assert lam["d_train_top1"] == pytest.approx(np.mean([-1.0, -2.0]))
    assert lam["d_train_top1_std"] == pytest.approx(np.std([-1.0, -2.0], ddof=1))
    assert lam["d_test_top1"] == pytest.approx(np.mean([-0.5, -1.0]))
    assert lam["d_train_loss"] == pytest.approx(np.mean([0.05, 0.10]))
    one = pairs["dnq_w2a4"]
    assert one["seeds"] == [0] and one["d_test_top1_std"] is None
    assert one["d_test_top1"] == pytest.approx(-1.4)
    md = train_fit.to_markdown(rows[:3], train_fit.paired(rows[:3]), "cmd")
    assert "| lam08 | 0 | -1.00 | -0.50 | +0.0500 | +0.0000 |" in md
    alone = train_fit.to_markdown(rows[:1], train_fit.paired(rows[:1]), "cmd")
    assert "| sgd_s0 | sgd | 95.00 | 93.00 | 2.00 |" in alone and "Minus" not in alone


def test_a_workdir_without_finished_cells_is_refused(tmp_path, capsys):
    (tmp_path / "cells" / "sgd_s0").mkdir(parents=True)
    with pytest.raises(SystemExit):
        train_fit.main(["--workdir", str(tmp_path)])
    assert "no finished cell" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_fit.main(["--workdir", str(tmp_path / "absent")])
    assert "not a folder" in capsys.readouterr().err


def test_a_grid_workdir_is_measured_and_the_test_column_is_the_runs_fp32(smoke_run, tmp_path):
    """On the session's smoke run laid out as a grid cell: the test split's top-1 is the one
    the run reported (the same clean forward), and the tables are written."""
    smoke_wd, results = smoke_run
    cell = tmp_path / "cells" / "dnq_s0"
    shutil.copytree(smoke_wd, cell, ignore=shutil.ignore_patterns("checkpoints", "noise_start"))
    out, js = tmp_path / "fit.md", tmp_path / "fit.json"
    assert train_fit.main(["--workdir", str(tmp_path), "--out", str(out), "--json", str(js)]) == 0
    (row,) = json.loads(js.read_text())["cells"]
    assert row["cell"] == "dnq_s0" and row["method"] == "dnq" and row["seed"] == 0
    assert row["test_top1"] == pytest.approx(results["fp32"], abs=1e-9)
    assert 0 <= row["train_top1"] <= 100 and row["train_loss"] > 0
    assert "| dnq_s0 | dnq |" in out.read_text()
