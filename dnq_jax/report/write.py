"""`write_report(workdir, settings)`: measure a finished run and write its report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax

from dnq_jax.diagnostics import plots
from dnq_jax.diagnostics.measure import MeasureSettings, Progress, measure_errors, measure_flatness
from dnq_jax.errors import CheckpointError
from dnq_jax.report import markdown
from dnq_jax.report.collect import collect_ptq, training_summary
from dnq_jax.train import config as config_lib
from dnq_jax.train import evaluate as train_eval
from dnq_jax.train import metrics, results, workdir

# The report's settings are the measurements' (`bits`: the precisions of the error
# statistics, default `default_bits(config)`).
ReportSettings = MeasureSettings


def default_bits(c) -> tuple[tuple[int, int], ...]:
    """The noise's target precision for a run trained with noise; W4A4 and W2A4 otherwise."""
    if c.noise.weight != "none" or c.noise.act:
        return ((c.noise.w_bits, c.noise.a_bits),)
    return ((4, 4), (2, 4))


def _check_finished(wd: Path) -> None:
    workdir.read_config(wd)  # CheckpointError for a folder that is not a run's workdir
    if not (wd / "final").exists():
        raise CheckpointError(
            f"{wd / 'final'} does not exist: the run in {wd} has not finished (no final "
            "variables), so there is nothing to report on. Finish or resume it with "
            "train.py, or point --workdir at a finished run."
        )
    workdir.check_writable(wd, create=False)


def write_report(wd: str | Path, settings: ReportSettings | None = None) -> Path:
    """Measure the finished run in `wd` and write wd/report.md, wd/report.json and
    wd/report/*.png; returns the path of report.md.

    Raises:
      ConfigError: a setting out of range.
      CheckpointError: `wd` holds no config.json or no (readable) final variables.
      PermissionError: `wd` cannot be written.
    """
    s = settings or ReportSettings()
    s.check()
    wd = Path(wd)
    t0 = time.time()
    pr = Progress(s.progress)
    with pr.section("load"):
        _check_finished(wd)
        c, model, variables, ds = train_eval.load_run(str(wd))
    (wd / "report").mkdir(exist_ok=True)
    bits = s.bits or default_bits(c)
    noisy = c.noise.weight != "none" or bool(c.noise.act)
    doc: dict[str, Any] = {
        "workdir": str(wd),
        "run": {
            "model": c.model.name,
            "dataset": ds.name,
            "method": config_lib.method_name(c),
            "seed": int(c.seed),
            "epochs": int(c.optim.num_epochs),
            "noise_target": train_eval.bits_name(c.noise.w_bits, c.noise.a_bits) if noisy else None,
        },
        "settings": {**s.as_dict(), "bits": [train_eval.bits_name(*b) for b in bits]},
        "figures": {},
    }
    title = f"{c.model.name} on {ds.name} ({doc['run']['method']})"
    with pr.section("ptq"):
        _ptq(wd, doc, c, model, variables, ds, s.progress, title)
    with pr.section("training curves"):
        epochs = [r for r in metrics.read(wd) if "epoch" in r and "train_loss" in r]
        doc["training"] = training_summary(epochs)
        if epochs:
            doc["figures"]["training"] = f = _fig("training_curves.png")
            plots.training_curves({doc["run"]["method"].upper(): epochs}, wd / f)
    doc["errors"] = {}
    for wb, ab in bits:
        with pr.section(f"errors {train_eval.bits_name(wb, ab)}"):
            _errors(wd, doc, (model, variables, ds, c), (wb, ab), s, title)
    ls = c.optim.label_smoothing if s.label_smoothing is None else s.label_smoothing
    fl = measure_flatness(model, variables, ds, s, ls)
    pr.timings.update(fl["timings"])
    doc["flatness"] = fl["numbers"]
    _flatness_figures(wd, doc["figures"], fl, title)
    doc["timings_s"] = {**pr.timings, "total": round(time.time() - t0, 2)}
    doc["device"] = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    results.write(wd / "report.json", doc)
    workdir.write_text(wd / "report.md", markdown.format_report(doc))
    return wd / "report.md"


def _ptq(wd: Path, doc: dict, c, model, variables, ds, progress: bool, title: str) -> None:
    """The PTQ rows the workdir holds (with none, the run's own `eval` settings evaluated
    now, into ptq_results.json) and their accuracy-vs-bits figure."""
    rows = collect_ptq(wd)
    computed = not rows
    if computed:
        es = train_eval.EvalSettings.from_config(c)
        res = train_eval.evaluate_variables(model, variables, ds, es, progress=progress)
        results.write(wd / results.EVALUATED, res)
        rows = collect_ptq(wd)
    doc["ptq"] = {"rows": rows, "computed": computed}
    curves = {markdown.row_label(r): r["accuracy"] for r in rows}
    if curves:
        keys = list(dict.fromkeys(k for a in curves.values() for k in a))
        first = next(iter(curves))
        curves[first] = {k: curves[first].get(k, float("nan")) for k in keys}
        doc["figures"]["ptq"] = f = _fig("accuracy_vs_bits.png")
        plots.accuracy_vs_bits(curves, wd / f, title)


def _errors(wd: Path, doc: dict, run: tuple, bits: tuple[int, int], s, title: str) -> None:
    """The error statistics at `bits` into doc['errors'], and their three figures."""
    model, variables, ds, c = run
    name = train_eval.bits_name(*bits)
    e = measure_errors(model, variables, ds, c, bits, s)
    doc["errors"][name] = e["numbers"]
    figures = doc["figures"]
    for kind in ("weight", "activation"):
        figures[f"{kind}_errors_{name}"] = f = _fig(f"{kind}_errors_{name}.png")
        t = f"{kind} quantization error at {name.upper()}, {title}"
        plots.error_histograms(e[kind], wd / f, title=t)
    figures[f"decomposition_{name}"] = f = _fig(f"decomposition_{name}.png")
    t = f"Output error per layer at {name.upper()}, {title}"
    plots.error_decomposition(e["decomposition"], wd / f, title=t)


def _flatness_figures(wd: Path, figures: dict, fl: dict, title: str) -> None:
    if fl["eigen"] is not None:
        figures["eigenvalue_convergence"] = f = _fig("eigenvalue_convergence.png")
        plots.eigenvalue_convergence({title: fl["eigen"].history}, wd / f)
    if fl["line"] is not None:
        figures["landscape_1d"] = f = _fig("landscape_1d.png")
        plots.landscape_1d({title: fl["line"]}, wd / f)
    if fl["plane"] is not None:
        figures["landscape_2d"] = f = _fig("landscape_2d.png")
        plots.landscape_2d(fl["plane"], wd / f, title=f"2-D loss landscape, {title}")


def _fig(name: str) -> str:
    """A figure's path relative to the workdir (as report.md links it): report/<name>."""
    return f"report/{name}"
