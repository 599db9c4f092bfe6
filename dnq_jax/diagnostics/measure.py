"""A finished model measured: per-layer quantization error and flatness of the training loss.

`measure_errors` and `measure_flatness` take a model, its variables, the data set and one
`MeasureSettings`, and return JSON-ready numbers plus the objects the plots draw. Runs of one
data set measured with the same settings see the same images and the same random vectors:

Images: the first `images` (flatness) and `error_images` (error statistics) of a permutation
of the training set drawn by numpy's default_rng(seed) (`training_subset`), unaugmented. PRNG
keys: fold_in(key(seed), i) with i = 0 for the power iteration, 1 for the trace probes, 2 for
the 1-D direction, 3 for the 2-D directions. A run's report (`dnq_jax.report`) and
experiments/flatness.py measure with these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from dnq_jax import data, progress, ptq
from dnq_jax.diagnostics.hessian import hessian_trace, top_hessian_eigenvalue
from dnq_jax.diagnostics.landscape import loss_landscape_1d, loss_landscape_2d
from dnq_jax.diagnostics.layer_errors import (
    activation_error_stats,
    error_setup,
    output_error_decomposition,
    weight_error_stats,
)
from dnq_jax.diagnostics.loss import make_loss_fn
from dnq_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """What is measured and how much; the defaults take a few minutes for a ResNet-8 on 2 CPU
    cores. A count of 0 skips that measure."""

    bits: tuple[tuple[int, int], ...] | None = None  # precisions of the error statistics
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
        """The settings as JSON holds them (bit-widths as 'w4a4')."""
        d = dataclasses.asdict(self)
        d["bits"] = None if self.bits is None else [f"w{w}a{a}" for w, a in self.bits]
        return d


def training_subset(ds: data.Dataset, n: int, seed: int) -> np.ndarray:
    """Indices of the first min(n, num_train) images of a seeded permutation of the training
    set: a smaller count is a prefix of a larger one."""
    return np.random.default_rng(seed).permutation(ds.num_train)[: min(n, ds.num_train)]


def _images(ds: data.Dataset, idx: np.ndarray):
    return data.normalize(ds.train_images[idx], ds.mean, ds.std), ds.train_labels[idx]


class Progress:
    """Progress lines and bars (`dnq_jax.progress`; both off with show=False, and printed by
    process 0 only); the wall time of each section in `timings`."""

    def __init__(self, show: bool) -> None:
        self.show = show
        self.timings: dict[str, float] = {}

    def _log(self, message: str) -> None:
        if self.show and jax.process_index() == 0:
            print(message, flush=True)

    @contextlib.contextmanager
    def section(self, name: str):
        """Time the block as section `name` (and say when it starts and ends)."""
        self._log(f"report: {name} ...")
        t = time.time()
        yield
        self.timings[name] = round(time.time() - t, 2)
        self._log(f"report: {name}: {self.timings[name]:.1f} s")

    def bar(self, total: int, desc: str):
        """A progress bar of `total` steps and a callback(step, value) that advances it."""
        bar = progress.bar(total, desc=desc, disable=not self.show, leave=False)

        def callback(_, value: float) -> None:
            bar.set_postfix_str(f"{value:.4g}", refresh=False)
            bar.update(1)

        return bar, callback


def measure_errors(model, variables, ds, c, bits: tuple[int, int], s: MeasureSettings) -> dict:
    """Per-layer weight/activation error statistics and output-error decomposition at `bits`,
    with the evaluation's own RTN as the run's config `c` sets it (`quant` and `eval`).

    Returns {'numbers': JSON-ready dict, 'weight': {layer: ErrorStats}, 'activation': ...,
    'decomposition': {layer: {term: value}}}.
    """
    wb, ab = bits
    calib = data.calibration_subset(ds, c.quant.n_calib, c.quant.calib_seed)
    calib_x = data.normalize(calib, ds.mean, ds.std)
    spec = ptq.QuantSpec(
        w_bits=wb, a_bits=ab, keep_ends_8bit=c.quant.keep_ends_8bit, a_calibrator=c.eval.calibrator
    )
    setup = error_setup(model, variables, calib_x, spec)
    x, _ = _images(ds, training_subset(ds, s.error_images, s.seed))
    wst = weight_error_stats(setup, bins=s.bins)
    ast = activation_error_stats(setup, x, bins=s.bins)
    dec = output_error_decomposition(setup, x)
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


def measure_flatness(model, variables, ds, s: MeasureSettings, label_smoothing: float) -> dict:
    """Loss, top Hessian eigenvalue, Hessian trace and landscapes of the training loss
    (cross-entropy with `label_smoothing`, BatchNorm in eval mode, weight decay left out).

    Returns {'numbers': JSON-ready dict, 'eigen': EigenResult | None, 'trace': TraceResult |
    None, 'line': Landscape | None, 'plane': Landscape | None, 'timings': {part: s}}.
    """
    pr = Progress(s.progress)
    x, y = _images(ds, training_subset(ds, s.images, s.seed))
    loss_fn = make_loss_fn(
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
            eig = top_hessian_eigenvalue(
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
            tr = hessian_trace(
                loss_fn, params, jax.random.fold_in(key, 1), s.trace_samples, callback=cb
            )
            bar.close()
        nums.update(trace=tr.trace, trace_stderr=tr.stderr, trace_samples=tr.samples.tolist())
        out["trace"] = tr
    _landscapes(loss_fn, params, key, s, pr, nums, out)
    out["numbers"] = nums
    out["timings"] = pr.timings
    return out


def _landscapes(loss_fn, params, key, s: MeasureSettings, pr: Progress, nums, out) -> None:
    """The 1-D and 2-D landscapes of `measure_flatness`, into its `nums` and `out`."""
    r = s.landscape_radius
    if s.landscape_points:
        with pr.section("flatness: 1-D landscape"):
            alphas = np.linspace(-r, r, s.landscape_points)
            bar, cb = pr.bar(len(alphas), "1-D landscape")
            line = loss_landscape_1d(
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
            plane = loss_landscape_2d(
                loss_fn, params, jax.random.fold_in(key, 3), grid, grid, callback=cb
            )
            bar.close()
        nums["landscape_2d"] = {
            "alphas": plane.alphas.tolist(),
            "betas": plane.betas.tolist(),
            "losses": plane.losses.tolist(),
        }
        out["plane"] = plane
