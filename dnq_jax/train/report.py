"""A finished run's report: W/report.md, W/report.json (every number) and W/report/*.png.

  python evaluate.py --workdir W --report [--report-bits w4a4,w2a4] [--report-images 1024]

`write_report(workdir, settings)` loads the run's config and final variables and writes:

1. PTQ: every result table the workdir holds (results.json from training, ptq_results.json
   from evaluate.py, a grid's ptq_<method>.json), one row per PTQ method, and accuracy
   against bit-width. With none, the run's own `eval` settings are evaluated first (and
   written to ptq_results.json).
2. Training curves from metrics.jsonl.
3. Quantization error per layer at each bit-width of `bits` (default: the precision the
   run's noise was modelled at, for a run without noise W4A4 and W2A4), with the
   evaluation's own RTN (`diagnostics.error_setup`: BN folded, first/last layer at 8 bits,
   calibrated on the run's quant.n_calib images): weight and activation error statistics
   (std, KS distance to the fitted Gaussian, excess kurtosis) with histograms, and the
   output-error decomposition W dx vs dW x per layer, summed over layers into one ratio.
4. Flatness of the training loss (cross-entropy with the run's label smoothing, BatchNorm in
   eval mode, weight decay left out) on `images` training images: the top Hessian eigenvalue
   (power iteration, stopped once an estimate changes by at most `hessian_tol` relative
   to the previous one), the Hessian trace (Hutchinson, mean +- standard error) and 1-D and
   2-D filter-normalised loss landscapes.

Images: the first `images` (flatness) and `error_images` (error statistics) of a permutation
of the training set drawn by numpy's default_rng(seed) (`report_subset`), unaugmented. PRNG
keys: fold_in(key(seed), i) with i = 0 for the power iteration, 1 for the trace probes, 2 for
the 1-D direction, 3 for the 2-D directions. So runs of one data set measured with the same
settings see the same images and the same random vectors (experiments/flatness.py).
Every section's wall time is recorded in report.json and report.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dnq_jax import data
from dnq_jax import diagnostics as dg
from dnq_jax.diagnostics import plots
from dnq_jax.errors import CheckpointError, ConfigError
from dnq_jax.train import config as config_lib
from dnq_jax.train import evaluate as train_eval
from dnq_jax.train import metrics, report_md, workdir


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the report measures and how much; the defaults take a few minutes for a ResNet-8
    on 2 CPU cores. A count of 0 skips that measure."""

    bits: tuple[tuple[int, int], ...] | None = None  # None: `default_bits(config)`
    images: int = 1024  # training images of the flatness loss
    error_images: int = 256  # training images the error statistics are measured on
    batch_size: int = 256  # images per chunk of the loss
    hessian_iters: int = 20  # power iterations at most
    hessian_tol: float | None = 1e-4  # stop at this relative change (None: all iterations)
    trace_samples: int = 20  # Hutchinson probes (0, or at least 2)
    landscape_points: int = 21  # points of the 1-D landscape
    landscape_grid: int = 7  # points per axis of the 2-D landscape
    landscape_radius: float = 1.0  # both landscapes span [-radius, radius]
    bins: int = 64  # histogram bins
    seed: int = 0  # image subset and random vectors
    label_smoothing: float | None = None  # None: the run's optim.label_smoothing
    progress: bool = True

    def check(self) -> None:
        """Raise ConfigError naming the first setting out of range."""
        positive = ("images", "error_images", "batch_size", "bins")
        counts = ("hessian_iters", "trace_samples", "landscape_points", "landscape_grid")
        for name in positive + counts:
            v = getattr(self, name)
            low = 1 if name in positive else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"report {name}: an int >= {low} is needed, got {v!r}")
        if self.trace_samples == 1:
            raise ConfigError("report trace_samples: 0, or at least 2 (for the standard error)")
        if self.landscape_grid == 1:
            raise ConfigError("report landscape_grid: 0, or at least 2 (a contour needs 2 x 2)")
        if self.hessian_tol is not None and not self.hessian_tol >= 0:
            raise ConfigError(f"report hessian_tol: >= 0 or None needed, got {self.hessian_tol}")
        if not self.landscape_radius > 0:
            raise ConfigError(f"report landscape_radius: > 0 needed, got {self.landscape_radius}")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bits"] = None if self.bits is None else [train_eval.bits_name(*b) for b in self.bits]
        return d


def default_bits(c) -> tuple[tuple[int, int], ...]:
    """The noise's target precision for a run trained with noise; W4A4 and W2A4 otherwise."""
    if c.noise.weight != "none" or c.noise.act:
        return ((c.noise.w_bits, c.noise.a_bits),)
    return ((4, 4), (2, 4))


def report_subset(ds: data.Dataset, n: int, seed: int) -> np.ndarray:
    """Indices of the first min(n, num_train) images of a seeded permutation of the training
    set: a smaller count is a prefix of a larger one."""
    return np.random.default_rng(seed).permutation(ds.num_train)[: min(n, ds.num_train)]


def _images(ds: data.Dataset, idx: np.ndarray):
    return data.normalize(ds.train_images[idx], ds.mean, ds.std), ds.train_labels[idx]


class _Progress:
    """Progress lines and tqdm bars (both off with progress=False); section wall times."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str):
        if self.show:
            workdir.log(f"report: {name} ...")
        t = time.time()
        yield
        self.timings[name] = round(time.time() - t, 2)
        if self.show:
            workdir.log(f"report: {name}: {self.timings[name]:.1f} s")

    def bar(self, total: int, desc: str):
        bar = tqdm(total=total, desc=desc, disable=not self.show, leave=False)

        def callback(_, value: float) -> None:
            bar.set_postfix_str(f"{value:.4g}", refresh=False)
            bar.update(1)

        return bar, callback


def measure_errors(model, variables, ds, c, bits: tuple[int, int], s: ReportSettings) -> dict:
    """Per-layer weight/activation error statistics and output-error decomposition at `bits`.

    Returns {'numbers': JSON-ready dict, 'weight': {layer: ErrorStats}, 'activation': ...,
    'decomposition': {layer: {term: value}}}.
    """
    wb, ab = bits
    calib = data.calibration_subset(ds, c.quant.n_calib, c.quant.calib_seed)
    calib_x = data.normalize(calib, ds.mean, ds.std)
    setup = dg.error_setup(
        model,
        variables,
        calib_x,
        wb,
        ab,
        keep_ends_8bit=c.quant.keep_ends_8bit,
        a_calibrator=c.eval.calibrator,
    )
    x, _ = _images(ds, report_subset(ds, s.error_images, s.seed))
    wst = dg.weight_error_stats(setup, bins=s.bins)
    ast = dg.activation_error_stats(setup, x, bins=s.bins)
    dec = dg.output_error_decomposition(setup, x)
    layers = {}
    for name in setup.graph.names:
        w, a = setup.qmodel.bits_per_layer[name]
        layers[name] = {
            "w_bits": int(w),
            "a_bits": None if a is None else int(a),
            "weight": wst[name].summary() if name in wst else None,
            "activation": ast[name].summary() if name in ast else None,
            "output": dec[name],
        }
    sums = {t: float(sum(d[t] for d in dec.values())) for t in ("activation", "weight", "cross")}
    ratio = sums["activation"] / sums["weight"] if sums["weight"] > 0 else float("inf")
    numbers = {
        "n_calib": int(c.quant.n_calib),
        "images": int(x.shape[0]),
        "layers": layers,
        "sum_over_layers": sums,
        "activation_to_weight": ratio,
    }
    return {"numbers": numbers, "weight": wst, "activation": ast, "decomposition": dec}


def measure_flatness(model, variables, ds, s: ReportSettings, label_smoothing: float) -> dict:
    """Loss, top Hessian eigenvalue, Hessian trace and landscapes of the training loss.

    Returns {'numbers': JSON-ready dict, 'eigen': EigenResult | None, 'trace': TraceResult |
    None, 'line': Landscape | None, 'plane': Landscape | None, 'timings': {part: s}}.
    """
    pr = _Progress(s.progress)
    x, y = _images(ds, report_subset(ds, s.images, s.seed))
    loss_fn = dg.make_loss_fn(
        model, variables, x, y, batch_size=s.batch_size, label_smoothing=label_smoothing
    )
    params = variables["params"]
    key = jax.random.key(s.seed)
    out: dict[str, Any] = {"eigen": None, "trace": None, "line": None, "plane": None}
    nums: dict[str, Any] = {"images": int(x.shape[0]), "label_smoothing": float(label_smoothing)}
    with pr.section("flatness: loss"):
        nums["loss"] = float(loss_fn(params))
    if s.hessian_iters:
        with pr.section("flatness: top Hessian eigenvalue"):
            bar, cb = pr.bar(s.hessian_iters, "power iteration")
            k0 = jax.random.fold_in(key, 0)
            eig = dg.top_hessian_eigenvalue(
                loss_fn, params, k0, s.hessian_iters, tol=s.hessian_tol or None, callback=cb
            )
            bar.close()
        h = eig.history
        nums["top_eigenvalue"] = eig.eigenvalue
        nums["eigenvalue_history"] = h.tolist()
        nums["eigenvalue_last_change"] = (
            float(abs(h[-1] - h[-2]) / max(abs(h[-1]), 1e-30)) if len(h) > 1 else None
        )
        out["eigen"] = eig
    if s.trace_samples:
        with pr.section("flatness: Hessian trace"):
            bar, cb = pr.bar(s.trace_samples, "Hutchinson")
            tr = dg.hessian_trace(
                loss_fn, params, jax.random.fold_in(key, 1), s.trace_samples, callback=cb
            )
            bar.close()
        nums.update(trace=tr.trace, trace_stderr=tr.stderr, trace_samples=tr.samples.tolist())
        out["trace"] = tr
    r = s.landscape_radius
    if s.landscape_points:
        with pr.section("flatness: 1-D landscape"):
            alphas = np.linspace(-r, r, s.landscape_points)
            bar, cb = pr.bar(len(alphas), "1-D landscape")
            line = dg.loss_landscape_1d(
                loss_fn, params, jax.random.fold_in(key, 2), alphas, callback=cb
            )
            bar.close()
        ends = line.losses[[0, -1]].mean() if len(alphas) > 1 else line.losses[0]
        nums["landscape_1d"] = {
            "alphas": line.alphas.tolist(),
            "losses": line.losses.tolist(),
            "rise_at_radius": float(ends - nums["loss"]),
        }
        out["line"] = line
    if s.landscape_grid:
        with pr.section("flatness: 2-D landscape"):
            grid = np.linspace(-r, r, s.landscape_grid)
            bar, cb = pr.bar(len(grid) ** 2, "2-D landscape")
            plane = dg.loss_landscape_2d(
                loss_fn, params, jax.random.fold_in(key, 3), grid, grid, callback=cb
            )
            bar.close()
        nums["landscape_2d"] = {
            "alphas": plane.alphas.tolist(),
            "betas": plane.betas.tolist(),
            "losses": plane.losses.tolist(),
        }
        out["plane"] = plane
    out["numbers"] = nums
    out["timings"] = pr.timings
    return out


def collect_ptq(wd: str | Path) -> list[dict]:
    """One row per distinct PTQ result in the workdir's JSON files: {'method', 'iters',
    'n_calib', 'accuracy': {'fp32': top-1, 'w4a4': ...}, 'sources': [file names]}.
    Files holding the same numbers (a grid's results.json and ptq_rtn.json) share a row."""
    wd = Path(wd)
    names = ["results.json", "ptq_results.json"]
    names += sorted(p.name for p in wd.glob("ptq_*.json") if p.name not in names)
    rows: list[dict] = []
    for name in names:
        try:
            r = json.loads((wd / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict) or "fp32" not in r:
            continue
        st = r.get("settings", {})
        # FP32, then the precisions in the order evaluated (the files sort their keys).
        order = ["fp32", *st.get("bits", []), *sorted(r)]
        keys = [k for k in dict.fromkeys(order) if k in r and train_eval.is_accuracy_key(k)]
        acc = {k: float(r[k]) for k in keys}
        row = {
            "method": st.get("method", "rtn"),
            "iters": st.get("iters", 0),
            "n_calib": st.get("n_calib"),
            "accuracy": acc,
        }
        same = next((x for x in rows if {**x, "sources": None} == {**row, "sources": None}), None)
        if same is not None:
            same["sources"].append(name)
        else:
            rows.append({**row, "sources": [name]})
    return rows


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
    pr = _Progress(s.progress)
    with pr.section("load"):
        _check_finished(wd)
        c, model, variables, ds = train_eval.load_run(str(wd))
    out = wd / "report"
    out.mkdir(exist_ok=True)
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
    figures = doc["figures"]
    title = f"{c.model.name} on {ds.name} ({doc['run']['method']})"

    with pr.section("ptq"):
        rows = collect_ptq(wd)
        computed = not rows
        if computed:
            es = train_eval.EvalSettings.from_config(c)
            res = train_eval.evaluate_variables(model, variables, ds, es, progress=s.progress)
            workdir.write_results(wd / "ptq_results.json", res)
            rows = collect_ptq(wd)
        doc["ptq"] = {"rows": rows, "computed": computed}
        curves = {report_md.row_label(r): r["accuracy"] for r in rows}
        if curves:
            keys = list(dict.fromkeys(k for a in curves.values() for k in a))
            first = next(iter(curves))
            curves[first] = {k: curves[first].get(k, float("nan")) for k in keys}
            figures["ptq"] = _fig(out, "accuracy_vs_bits.png")
            plots.accuracy_vs_bits(curves, wd / figures["ptq"], title)

    with pr.section("training curves"):
        epochs = [r for r in metrics.read(wd) if "epoch" in r and "train_loss" in r]
        doc["training"] = _training_summary(epochs)
        if epochs:
            figures["training"] = _fig(out, "training_curves.png")
            plots.training_curves({doc["run"]["method"].upper(): epochs}, wd / figures["training"])

    doc["errors"] = {}
    for wb, ab in bits:
        name = train_eval.bits_name(wb, ab)
        with pr.section(f"errors {name}"):
            e = measure_errors(model, variables, ds, c, (wb, ab), s)
            doc["errors"][name] = e["numbers"]
            for kind in ("weight", "activation"):
                figures[f"{kind}_errors_{name}"] = f = _fig(out, f"{kind}_errors_{name}.png")
                t = f"{kind} quantization error at {name.upper()}, {title}"
                plots.error_histograms(e[kind], wd / f, title=t)
            figures[f"decomposition_{name}"] = f = _fig(out, f"decomposition_{name}.png")
            t = f"Output error per layer at {name.upper()}, {title}"
            plots.error_decomposition(e["decomposition"], wd / f, title=t)

    ls = c.optim.label_smoothing if s.label_smoothing is None else s.label_smoothing
    fl = measure_flatness(model, variables, ds, s, ls)
    pr.timings.update(fl["timings"])
    doc["flatness"] = fl["numbers"]
    if fl["eigen"] is not None:
        figures["eigenvalue_convergence"] = f = _fig(out, "eigenvalue_convergence.png")
        plots.eigenvalue_convergence({title: fl["eigen"].history}, wd / f)
    if fl["line"] is not None:
        figures["landscape_1d"] = f = _fig(out, "landscape_1d.png")
        plots.landscape_1d({title: fl["line"]}, wd / f)
    if fl["plane"] is not None:
        figures["landscape_2d"] = f = _fig(out, "landscape_2d.png")
        plots.landscape_2d(fl["plane"], wd / f, title=f"2-D loss landscape, {title}")

    doc["timings_s"] = {**pr.timings, "total": round(time.time() - t0, 2)}
    doc["device"] = f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
    workdir.write_results(wd / "report.json", doc)
    workdir.write_text(wd / "report.md", report_md.format_report(doc))
    return wd / "report.md"


def _fig(out: Path, name: str) -> str:
    """A figure's path relative to the workdir (as report.md links it)."""
    return f"{out.name}/{name}"


def _training_summary(rows: list[dict]) -> dict:
    if not rows:
        return {"epochs_logged": 0}
    last = rows[-1]
    tested = [r for r in rows if "test_acc" in r]
    return {
        "epochs_logged": len(rows),
        "final_epoch": last["epoch"],
        "train_loss": last["train_loss"],
        "train_acc": last.get("train_acc"),
        "test_acc": tested[-1]["test_acc"] if tested else None,
        "max_lambda": max(float(r.get("lambda", 0.0)) for r in rows),
        "epoch_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in rows),
    }
