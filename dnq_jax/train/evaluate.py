"""Final variables -> PTQ at each bit-width -> table and JSON (docs/protocol.md).

`evaluate_variables` measures FP32 top-1 and the PTQ top-1 at each (w_bits, a_bits) on the
full test split; `evaluate_workdir` does it for a finished run's final variables (what
evaluate.py calls).

Several processes: each evaluates the same variables on its own default device (no
collective), inside `hosts.agreed` blocks, so an error on one stops all; process 0 alone
shows progress and writes ptq_results.json.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dnq_jax import data, ptq
from dnq_jax import progress as progress_lib
from dnq_jax.errors import ConfigError
from dnq_jax.ptq.export import ONNX_PIP, available_formats, export_all, load
from dnq_jax.train import builders, checkpoint, hosts, workdir
from dnq_jax.train import config as config_lib
from dnq_jax.train import results as results_lib


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How PTQ is measured: bit-widths, method, calibration set, calibrator, kept layers."""

    bits: tuple[tuple[int, int], ...] = ((8, 8), (4, 4), (2, 4), (2, 2))
    method: str = "rtn"
    iters: int = 0  # reconstruction iterations; 0 = the method's default
    recon_seed: int = 0  # the reconstruction's calibration batches and drop masks
    n_calib: int = 100
    calib_seed: int = 0
    calibrator: str = "minmax"
    keep_ends_8bit: bool = True
    batch_size: int = 500

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict, **overrides: Any) -> EvalSettings:
        s = cls(
            bits=tuple(config_lib.parse_bits(c.eval.bits)),
            method=c.eval.method,
            iters=c.eval.iters,
            n_calib=c.quant.n_calib,
            calib_seed=c.quant.calib_seed,
            calibrator=c.eval.calibrator,
            keep_ends_8bit=c.quant.keep_ends_8bit,
            batch_size=c.eval.batch_size,
        )
        return dataclasses.replace(s, **overrides)


bits_name = config_lib.bits_name


def make_accuracy_fn(model, batch_size: int):
    """fn(variables, images, labels) -> top-1 %; one compiled forward reused across calls.

    ``fn(variables, batches)``: over an iterable of (normalised images, labels) batches
    instead, labels -1 marking padding (a streamed test split, `batches_accuracy`).
    """
    apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))

    def accuracy(variables, images, labels=None) -> float:
        fn = lambda x: apply(variables, x)
        if labels is None:
            return batches_accuracy(fn, images)
        return ptq.accuracy(fn, images, labels, batch_size=batch_size)

    return accuracy


def batches_accuracy(fn, batches) -> float:
    """Top-1 % of ``fn(images)`` logits over (images, labels) batches; labels < 0 are
    padding, not counted. Works on global arrays split over devices as on host arrays."""
    correct = total = 0
    for x, y in batches:
        hit = (jnp.argmax(fn(x), axis=-1) == y) & (y >= 0)
        correct += int(jnp.sum(hit))
        total += int(jnp.sum(y >= 0))
    return 100.0 * correct / max(total, 1)


def _test_batches(ds, batch_size: int):
    """A stream's test split in batches of `batch_size` on this process's default device,
    normalised, the last padded (labels -1), each process reading all of it."""
    n = ds.num_test
    rows = np.arange(-(-n // batch_size) * batch_size)
    rows[rows >= n] = -1
    for images, labels in ds.batches("test", rows.reshape(-1, batch_size)):
        yield data.normalize(jnp.asarray(images), ds.mean, ds.std), labels


def _top1(fn, ds, test_x, batch_size: int) -> float:
    """Test top-1 % of `fn`: on the normalised test images `test_x`, or, for a stream
    (`test_x` None), on its test split read in batches."""
    if test_x is None:
        return batches_accuracy(fn, _test_batches(ds, batch_size))
    return ptq.accuracy(fn, test_x, ds.test_labels, batch_size=batch_size)


def evaluate_variables(
    model,
    variables,
    ds: data.Dataset,
    settings: EvalSettings,
    progress: bool = True,
    export_dir: str | None = None,
) -> dict:
    """FP32 and PTQ top-1 (percent) on the full test split, plus the settings used.

    With `export_dir`, each quantized model is also written there as StableHLO and ONNX
    (`dnq_jax.ptq.export`, docs/deploy.md; ONNX where onnx and onnxruntime are installed,
    said before the evaluation starts), and each file, reloaded, is measured on the test
    split: one printed line per file, its top-1 next to the in-process one.
    """
    methods = config_lib.ptq_methods()
    if settings.method not in methods:
        raise ConfigError(f"eval.method: unknown {settings.method!r}; choose from {methods}")
    formats = available_formats() if export_dir is not None else ()
    if export_dir is not None and "onnx" not in formats:
        print(f"export: StableHLO only; ONNX needs onnx and onnxruntime: {ONNX_PIP}", flush=True)
    # A stream's test split is read batch by batch for each model, never whole.
    streamed = isinstance(ds, data.Stream)
    test_x = None if streamed else np.asarray(data.normalize(ds.test_images, ds.mean, ds.std))
    calib = data.calibration_subset(ds, settings.n_calib, settings.calib_seed)
    calib_x = np.asarray(data.normalize(calib, ds.mean, ds.std))
    recon = None  # RTN; a reconstruction method's iterations (0: its default) and bar
    if settings.method != "rtn":
        recon = {"iters": settings.iters or None, "progress": progress, "seed": settings.recon_seed}
    results: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    t0 = time.time()
    bar = progress_lib.bar(
        1 + len(settings.bits), desc="PTQ eval", disable=not progress, unit="cfg"
    )
    apply = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    results["fp32"] = _top1(lambda x: apply(variables, x), ds, test_x, settings.batch_size)
    bar.update(1)
    for wb, ab in settings.bits:
        spec = ptq.QuantSpec(
            w_bits=wb,
            a_bits=ab,
            keep_ends_8bit=settings.keep_ends_8bit,
            a_calibrator=settings.calibrator,
        )
        qm = ptq.quantize(model, variables, calib_x, spec, method=settings.method, recon=recon)
        results[bits_name(wb, ab)] = _top1(qm, ds, test_x, settings.batch_size)
        if export_dir is not None:
            top1 = results[bits_name(wb, ab)]
            _export(qm, export_dir, formats, ds, test_x, top1, settings)
        if settings.method != "rtn":
            # Each block's output error before and after, the settings and the wall time.
            reports[bits_name(wb, ab)] = qm.report
        bar.update(1)
    bar.close()
    if reports:
        results["reconstruction"] = reports
    results["settings"] = {
        **dataclasses.asdict(settings),
        "bits": [bits_name(*b) for b in settings.bits],
        "dataset": ds.name,
        "num_test": int(ds.num_test),
        "eval_time_s": round(time.time() - t0, 2),
    }
    return results


def _export(qm, directory: str, formats, ds: data.Dataset, test_x, top1: float, settings):
    formula = "(uint8_image / 255 - mean) / std, per channel"
    normalization = {"mean": ds.mean, "std": ds.std, "formula": formula}
    for out in export_all(qm, directory, normalization=normalization, formats=formats):
        checked = _top1(load(out), ds, test_x, settings.batch_size)
        print(f"export {out}, top-1 {checked:.2f} (in-process {top1:.2f})", flush=True)


def format_table(results: dict, title: str = "") -> str:
    """A plain-text table: one row per precision, FP32 first."""
    keys = ["fp32"] + [k for k in results if k != "fp32" and results_lib.is_accuracy_key(k)]
    lines = [title] if title else []
    lines += ["precision   top-1 (%)", "---------   ---------"]
    lines += [f"{k.upper():<11} {results[k]:>9.2f}" for k in keys if k in results]
    return "\n".join(lines)


def load_run(
    wd: str, ds: data.Dataset | None = None
) -> tuple[ml_collections.ConfigDict, Any, Any, data.Dataset]:
    """``(config, model, final variables, dataset)`` of the finished run in `wd`.

    `ds`: the run's dataset when the caller has it loaded already (several runs on one set).
    """
    with hosts.agreed():  # every process reads; a failure on any stops all
        c = workdir.read_config(wd)
        ds = builders.load_dataset(c) if ds is None else ds
    model = builders.create_model(c, ds.num_classes)
    like = builders.variable_shapes(model, ds.image_shape)
    return c, model, checkpoint.load_final(wd, like), ds


def evaluate_workdir(
    wd: str,
    bits: str | None = None,
    method: str | None = None,
    iters: int | None = None,
    progress: bool = True,
    export_dir: str | None = None,
) -> dict:
    """Evaluate the final variables of the run in `wd`; writes wd/ptq_results.json.

    `bits`, `method` and `iters` default to the run's own `eval` settings. `export_dir`:
    write and check deployable files there too (process 0 only; see `evaluate_variables`).
    """
    c, model, variables, ds = load_run(wd)
    overrides: dict[str, Any] = {}
    if bits:
        overrides["bits"] = tuple(config_lib.parse_bits(bits))
    if method is not None:
        overrides["method"] = method
    if iters is not None:
        overrides["iters"] = iters
    with hosts.agreed():
        settings = EvalSettings.from_config(c, **overrides)
        progress = progress and hosts.is_primary()
        export_dir = export_dir if hosts.is_primary() else None
        results = evaluate_variables(model, variables, ds, settings, progress, export_dir)
    results_lib.write(Path(wd) / results_lib.EVALUATED, results)
    return results
