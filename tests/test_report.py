"""The run report (`evaluate.py --report`, `dnq_jax.report`) on the session's smoke run
with tiny sizes: the files it writes, its numbers checked against direct computations, the
PTQ rows it collects, and its refusal of an unfinished run."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import resnet
from dnq_jax import data, report
from dnq_jax import diagnostics as dg
from dnq_jax.errors import ConfigError
from dnq_jax.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
SIZES = dict(
    images=48,
    error_images=16,
    batch_size=16,
    hessian_iters=3,
    hessian_tol=None,
    trace_samples=2,
    landscape_points=3,
    landscape_grid=3,
    bins=16,
    seed=1,
)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def reported(smoke_run, tmp_path_factory):
    """A copy of the smoke run without PTQ results (so the report evaluates its eval.bits,
    set to w4a4 alone), reported on; returns (workdir, report.md text, report.json)."""
    src, _ = smoke_run
    wd = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(src, wd, ignore=shutil.ignore_patterns("checkpoints"))
    (wd / "results.json").unlink()
    c = json.loads((wd / "config.json").read_text())
    c["eval"]["bits"] = "w4a4"  # an eval key: a finished run may change it
    (wd / "config.json").write_text(json.dumps(c))
    path = report.write_report(wd, report.ReportSettings(progress=False, **SIZES))
    return wd, path.read_text(), json.loads((wd / "report.json").read_text())


def test_report_links_figures_that_exist_and_times_each_section(reported):
    wd, md, doc = reported
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(doc["figures"].values())
    for key in ("ptq", "training", "weight_errors_w2a4", "activation_errors_w2a4"):
        assert key in doc["figures"]
    for key in ("decomposition_w2a4", "eigenvalue_convergence", "landscape_1d", "landscape_2d"):
        assert key in doc["figures"]
    for link in links:
        assert (wd / link).read_bytes()[:8] == PNG, link
    # No PTQ result was there: the run's eval settings were evaluated and written.
    assert doc["ptq"]["computed"] and (wd / "ptq_results.json").exists()
    (row,) = doc["ptq"]["rows"]
    assert list(row["accuracy"]) == ["fp32", "w4a4"] and row["sources"] == ["ptq_results.json"]
    timed = set(doc["timings_s"])
    assert {"load", "ptq", "training curves", "errors w2a4", "total"} <= timed
    assert {"flatness: top Hessian eigenvalue", "flatness: Hessian trace"} <= timed
    assert all(t >= 0 for t in doc["timings_s"].values())


def test_report_error_tables_are_complete_and_finite(reported):
    _, md, doc = reported
    assert list(doc["errors"]) == ["w2a4"]  # a DNQ run: the precision its noise modelled
    e = doc["errors"]["w2a4"]
    quantized = [n for n, v in e["layers"].items() if v["w_bits"] == 2]
    assert len(quantized) >= 6 and e["layers"]["stem_conv"]["w_bits"] == 8
    for name, v in e["layers"].items():
        assert all(np.isfinite(v["output"][t]) for t in ("activation", "weight", "total"))
        assert f"| {name} | w{v['w_bits']}a{v['a_bits']} |" in md
        for kind in ("weight", "activation"):
            s = v[kind]
            assert s["std"] > 0 and 0 <= s["ks"] <= 1 and np.isfinite(s["kurtosis"]), (name, kind)
    sums = {t: sum(v["output"][t] for v in e["layers"].values()) for t in ("activation", "weight")}
    assert e["activation_to_weight"] == pytest.approx(sums["activation"] / sums["weight"])
    assert "activation term / weight term = **" in md


def test_report_flatness_equals_direct_computations(reported):
    """The report's numbers against the diagnostics called here on a loss built here: the
    image subset from the documented rule, the keys fold_in(key(seed), 0) and (.., 1)."""
    wd, _, doc = reported
    f = doc["flatness"]
    assert np.isfinite(f["top_eigenvalue"]) and np.isfinite(f["trace"]) and f["trace_stderr"] >= 0
    c, model, variables, ds = evaluate.load_run(str(wd))
    idx = np.random.default_rng(SIZES["seed"]).permutation(ds.num_train)[: SIZES["images"]]
    x = data.normalize(ds.train_images[idx], ds.mean, ds.std)
    y = jnp.asarray(ds.train_labels[idx])
    params = variables["params"]

    def loss(p):  # the training loss written out: smoothed cross-entropy, BatchNorm in eval
        logits = model.apply({**variables, "params": p}, x, train=False)
        target = optax.smooth_labels(jax.nn.one_hot(y, 10), c.optim.label_smoothing)
        return optax.softmax_cross_entropy(logits, target).mean()

    assert f["loss"] == pytest.approx(float(loss(params)), rel=1e-5)
    loss_fn = dg.make_loss_fn(
        model, variables, x, y, batch_size=16, label_smoothing=c.optim.label_smoothing
    )
    key = jax.random.key(SIZES["seed"])
    top = dg.top_hessian_eigenvalue(loss_fn, params, jax.random.fold_in(key, 0), iters=3)
    assert f["top_eigenvalue"] == pytest.approx(top.eigenvalue, rel=1e-5)
    np.testing.assert_allclose(f["eigenvalue_history"], top.history, rtol=1e-5)
    tr = dg.hessian_trace(loss_fn, params, jax.random.fold_in(key, 1), samples=2)
    np.testing.assert_allclose(f["trace_samples"], tr.samples, rtol=1e-5)
    line = f["landscape_1d"]
    assert line["alphas"] == [-1.0, 0.0, 1.0] and line["losses"][1] == pytest.approx(f["loss"])
    assert np.asarray(f["landscape_2d"]["losses"]).shape == (3, 3)


def test_report_cli_refuses_a_run_without_final_variables(smoke_run, tmp_path):
    src, _ = smoke_run
    wd = tmp_path / "unfinished"
    wd.mkdir()
    shutil.copy(src / "config.json", wd)
    cmd = [sys.executable, "evaluate.py", f"--workdir={wd}", "--report", "--hessian-iters=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    text = " ".join(r.stderr.split())
    assert "CheckpointError" in text and "has not finished" in text and "Traceback" not in text
    assert sorted(p.name for p in wd.iterdir()) == ["config.json"]


def test_collect_ptq_keeps_one_row_per_distinct_result(tmp_path):
    rtn = {"fp32": 90.0, "w4a4": 80.0, "w2a4": 20.0}
    rtn["settings"] = {"method": "rtn", "iters": 0, "n_calib": 100, "bits": ["w4a4", "w2a4"]}
    qdrop = {**rtn, "w4a4": 85.0, "settings": {**rtn["settings"], "method": "qdrop", "iters": 9}}
    for name, doc in (("results.json", rtn), ("ptq_rtn.json", rtn), ("ptq_qdrop.json", qdrop)):
        (tmp_path / name).write_text(json.dumps(doc, sort_keys=True))
    (tmp_path / "ptq_torn.json").write_text('{"fp32": 9')
    rows = report.collect_ptq(tmp_path)
    assert [r["sources"] for r in rows] == [["results.json", "ptq_rtn.json"], ["ptq_qdrop.json"]]
    assert list(rows[0]["accuracy"]) == ["fp32", "w4a4", "w2a4"]  # evaluated order, not sorted
    assert rows[1]["method"] == "qdrop" and rows[1]["accuracy"]["w4a4"] == 85.0


def test_report_defaults_and_settings_check():
    assert report.default_bits(resnet.get_config("method=sgd")) == ((4, 4), (2, 4))
    c = resnet.get_config("noise.w_bits=4,noise.a_bits=4")
    assert report.default_bits(c) == ((4, 4),)
    with pytest.raises(ConfigError, match="trace_samples"):
        report.ReportSettings(trace_samples=1).check()
    with pytest.raises(ConfigError, match="landscape_grid"):
        report.ReportSettings(landscape_grid=1).check()
    with pytest.raises(ConfigError, match="images"):
        report.ReportSettings(images=0).check()


def test_flatness_experiment_measures_like_the_report_and_skips_unfinished(reported, tmp_path):
    """experiments/flatness.py on the reported run and an unfinished one, with the report's
    sizes: the same numbers as report.json; the unfinished run listed as skipped; a rerun
    keeps the measured run instead of measuring it again."""
    wd, _, doc = reported
    spec = importlib.util.spec_from_file_location("flatness", ROOT / "experiments/flatness.py")
    flatness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flatness)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    out = tmp_path / "flatness"
    argv = [str(wd), str(unfinished), "--bits=w2a4", "--out", str(out), "--landscape-grid=0"]
    for flag in ("images", "error_images", "batch_size", "hessian_iters", "trace_samples"):
        argv.append(f"--{flag.replace('_', '-')}={SIZES[flag]}")
    argv += [f"--landscape-points={SIZES['landscape_points']}", f"--seed={SIZES['seed']}"]
    assert flatness.main(argv) == 0
    got = json.loads(out.with_suffix(".json").read_text())
    assert got["skipped"] == [str(unfinished)] and list(got["runs"]) == [str(wd)]
    run = got["runs"][str(wd)]
    for k in ("loss", "top_eigenvalue", "trace"):
        assert run["flatness"][k] == pytest.approx(doc["flatness"][k], rel=1e-5), k
    ratio = doc["errors"]["w2a4"]["activation_to_weight"]
    assert run["errors"]["w2a4"]["activation_to_weight"] == pytest.approx(ratio, rel=1e-5)
    assert out.with_suffix(".png").read_bytes()[:8] == PNG
    assert "Skipped (no final variables yet)" in out.with_suffix(".md").read_text()
    assert flatness.main(argv) == 0  # nothing changed: kept, not measured again
    again = json.loads(out.with_suffix(".json").read_text())["runs"][str(wd)]
    assert again == run
