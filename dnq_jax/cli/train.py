"""The trainer's command lines: `train.py` / `dnq-train` and `evaluate.py` / `dnq-evaluate`.

Flags only; the work is `loop.train_and_evaluate(config, workdir)`,
`evaluate.evaluate_workdir(workdir, ...)` and, with `evaluate.py --report`,
`dnq_jax.report.write_report`. Loading a config and reporting a bad one needs no JAX: the
trainer is imported only once the flags are good.
"""

from __future__ import annotations

import sys

from dnq_jax import errors
from dnq_jax.cli import common
from dnq_jax.train import config as config_lib


def train_main(argv: list[str] | None = None) -> None:
    """Train per --config in --workdir (resuming there), then print the PTQ table."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py[:args]).", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks for expected errors.")
    common.define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    common.list_in_help("config", "workdir", "verbose", *common.DISTRIBUTED_FLAGS)

    def main(_):
        f = flags.FLAGS
        common.start_distributed(f)
        sys.exit(common.run_guarded(lambda: _train(f.config, f.workdir), f.verbose))

    app.run(main, argv=argv, flags_parser=common.parse_flags)


def _train(config, workdir: str) -> int:
    common.quiet_logs()
    from dnq_jax.train import evaluate, loop

    try:
        results = loop.train_and_evaluate(config, workdir)
    except errors.Preempted as e:
        if _primary():
            print(f"dnq_jax: {e}", file=sys.stderr)
        return errors.EXIT_OK
    if _primary():
        print(evaluate.format_table(results, f"\nresults ({workdir}/results.json):"))
    return errors.EXIT_OK


# --report's sizes: flag -> (ReportSettings field, help). Unset flags keep the field's default.
REPORT_FLAGS = {
    "report-images": ("images", "Training images of the flatness loss (default 1024)."),
    "report-error-images": ("error_images", "Images of the error statistics (default 256)."),
    "hessian-iters": ("hessian_iters", "Power iterations at most (default 20; 0 skips)."),
    "trace-samples": ("trace_samples", "Hutchinson probes of the trace (default 20; 0 skips)."),
    "landscape-points": ("landscape_points", "Points of the 1-D landscape (default 21; 0 skips)."),
    "landscape-grid": ("landscape_grid", "Points per axis, 2-D landscape (default 7; 0 skips)."),
    "report-seed": ("seed", "Seed of the image subset and random vectors (default 0)."),
}


def evaluate_main(argv: list[str] | None = None) -> None:
    """PTQ-evaluate the final variables of the run in --workdir; print a table. With
    --report, write the run's report (report.md, report.json, report/*.png) instead, after
    a PTQ evaluation only if --bits, --method or --iters asks for one."""
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A workdir written by train.py.")
    flags.DEFINE_string("bits", None, "Comma-separated wXaY list; default: the run's eval.bits.")
    flags.DEFINE_string("method", None, "PTQ method (rtn, ...); default: the run's eval.method.")
    flags.DEFINE_integer("iters", None, "Reconstruction iterations; default: eval.iters.")
    flags.DEFINE_bool(
        "report",
        False,
        "Write WORKDIR/report.md, report.json and report/*.png: PTQ table, training curves, "
        "per-layer error statistics, Hessian eigenvalue and trace, loss landscapes.",
    )
    flags.DEFINE_string(
        "report-bits",
        None,
        "Bit-widths of the report's error statistics (wXaY list); default: the run's noise "
        "target, or w4a4,w2a4 for a run without noise.",
    )
    for name, (_, text) in REPORT_FLAGS.items():
        flags.DEFINE_integer(name, None, text)
    flags.DEFINE_string(
        "export",
        None,
        "Also write each quantized model to this folder as StableHLO and ONNX (w4a4.stablehlo, "
        "w4a4.onnx, JSON sidecars) and check each file's top-1 (docs/deploy.md).",
    )
    flags.DEFINE_bool("verbose", False, "Show tracebacks for expected errors.")
    common.define_distributed_flags()
    flags.mark_flags_as_required(["workdir"])
    shown = ("workdir", "bits", "method", "iters", "export", "report", "report-bits")
    shown += tuple(REPORT_FLAGS)
    common.list_in_help(*shown, "verbose", *common.DISTRIBUTED_FLAGS)

    def main(_):
        f = flags.FLAGS
        common.start_distributed(f)
        evaluate = lambda: _evaluate(f.workdir, f.bits, f.method, f.iters, f.export)
        if not f.report:
            sys.exit(common.run_guarded(evaluate, f.verbose))
        sizes = {field: f[name].value for name, (field, _) in REPORT_FLAGS.items()}

        def evaluate_and_report() -> int:
            if any(v is not None for v in (f.bits, f.method, f.iters, f.export)):
                evaluate()
            return _report(f.workdir, f["report-bits"].value, sizes)

        sys.exit(common.run_guarded(evaluate_and_report, f.verbose))

    app.run(main, argv=argv, flags_parser=common.parse_flags)


def _evaluate(
    workdir: str, bits: str | None, method: str | None, iters: int | None, export: str | None
) -> int:
    common.quiet_logs()
    from dnq_jax.train import evaluate

    results = evaluate.evaluate_workdir(workdir, bits, method, iters, export_dir=export)
    used = results["settings"]["method"]
    if _primary():  # every process evaluates the same variables; process 0 writes and prints
        print(evaluate.format_table(results, f"{workdir} ({used}):"))
        print(f"written: {workdir}/ptq_results.json")
    return errors.EXIT_OK


def _report(workdir: str, bits: str | None, sizes: dict[str, int | None]) -> int:
    common.quiet_logs()
    if not _primary():  # the report is measured and written by process 0 alone
        return errors.EXIT_OK
    from dnq_jax import report

    try:
        parsed = tuple(config_lib.parse_bits(bits)) if bits else None
    except errors.ConfigError as e:
        raise errors.ConfigError(f"--report-bits: {str(e).removeprefix('eval.bits: ')}") from None
    given = {k: v for k, v in sizes.items() if v is not None}
    path = report.write_report(workdir, report.ReportSettings(bits=parsed, **given))
    print(f"written: {path} (numbers in report.json, figures in {path.parent / 'report'})")
    return errors.EXIT_OK


def _primary() -> bool:
    from dnq_jax.train import hosts  # JAX, loaded only once the flags are good

    return hosts.is_primary()
