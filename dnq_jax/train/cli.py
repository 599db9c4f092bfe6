"""The command lines: `train.py` / `dnq-train` and `evaluate.py` / `dnq-evaluate`.

Flags only; the work is `loop.train_and_evaluate(config, workdir)` and
`evaluate.evaluate_workdir(workdir, ...)`. Expected failures print one paragraph (the
traceback only with --verbose) and exit with the status `dnq_jax.errors.EXIT_CODES` gives
them; anything else is a bug and keeps its traceback. Loading a config and reporting a bad
one needs no JAX: the trainer is imported only once the flags are good.

Several hosts: `--coordinator_address`, `--num_processes` and `--process_id` are passed to
`jax.distributed.initialize`; `--distributed` alone lets JAX read them from the cluster's
environment (SLURM, Open MPI, Cloud TPU pods, ...). Without any of them: one process.
"""

from __future__ import annotations

import re
import sys
import textwrap
import traceback
from collections.abc import Callable

from dnq_jax import errors
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
    _define_distributed_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    _list_in_help("config", "workdir", "verbose", *DISTRIBUTED_FLAGS)

    def main(_):
        f = flags.FLAGS
        _start_distributed(f)
        sys.exit(run_guarded(lambda: _train(f.config, f.workdir), f.verbose))

    app.run(main, argv=argv, flags_parser=parse_flags)


def _train(config, workdir: str) -> int:
    quiet_logs()
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
    _define_distributed_flags()
    flags.mark_flags_as_required(["workdir"])
    shown = ("workdir", "bits", "method", "iters", "export", "report", "report-bits")
    shown += tuple(REPORT_FLAGS)
    _list_in_help(*shown, "verbose", *DISTRIBUTED_FLAGS)

    def main(_):
        f = flags.FLAGS
        _start_distributed(f)
        evaluate = lambda: _evaluate(f.workdir, f.bits, f.method, f.iters, f.export)
        if not f.report:
            sys.exit(run_guarded(evaluate, f.verbose))
        sizes = {field: f[name].value for name, (field, _) in REPORT_FLAGS.items()}

        def evaluate_and_report() -> int:
            if any(v is not None for v in (f.bits, f.method, f.iters, f.export)):
                evaluate()
            return _report(f.workdir, f["report-bits"].value, sizes)

        sys.exit(run_guarded(evaluate_and_report, f.verbose))

    app.run(main, argv=argv, flags_parser=parse_flags)


def _evaluate(
    workdir: str, bits: str | None, method: str | None, iters: int | None, export: str | None
) -> int:
    quiet_logs()
    from dnq_jax.train import evaluate

    results = evaluate.evaluate_workdir(workdir, bits, method, iters, export_dir=export)
    used = results["settings"]["method"]
    if _primary():  # every process evaluates the same variables; process 0 writes and prints
        print(evaluate.format_table(results, f"{workdir} ({used}):"))
        print(f"written: {workdir}/ptq_results.json")
    return errors.EXIT_OK


def _report(workdir: str, bits: str | None, sizes: dict[str, int | None]) -> int:
    quiet_logs()
    if not _primary():  # the report is measured and written by process 0 alone
        return errors.EXIT_OK
    from dnq_jax.train import report

    try:
        parsed = tuple(config_lib.parse_bits(bits)) if bits else None
    except errors.ConfigError as e:
        raise errors.ConfigError(f"--report-bits: {str(e).removeprefix('eval.bits: ')}") from None
    given = {k: v for k, v in sizes.items() if v is not None}
    path = report.write_report(workdir, report.ReportSettings(bits=parsed, **given))
    print(f"written: {path} (numbers in report.json, figures in {path.parent / 'report'})")
    return errors.EXIT_OK


DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")


def _define_distributed_flags() -> None:
    from absl import flags

    flags.DEFINE_bool(
        "distributed",
        False,
        "Run as one of several processes: call jax.distributed.initialize(), which reads the "
        "cluster's environment (SLURM, Open MPI, TPU pod) unless the flags below are given.",
    )
    flags.DEFINE_string(
        "coordinator_address", None, "host:port of process 0 (implies --distributed)."
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes (implies --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")


def _start_distributed(f) -> None:
    """`jax.distributed.initialize` when asked for; before anything touches a JAX backend."""
    given = {
        k: getattr(f, k)
        for k in ("coordinator_address", "num_processes", "process_id")
        if getattr(f, k) is not None
    }
    if not (f.distributed or given):
        return
    import jax

    # CPU devices of several processes talk through gloo; GPU/TPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given)


def _primary() -> bool:
    import jax

    return jax.process_index() == 0


def _list_in_help(*names: str) -> None:
    """absl's --help lists the flags of the program's main module; these are defined here."""
    from absl import flags

    for name in names:
        flags.FLAGS.register_flag_by_module(sys.argv[0], flags.FLAGS[name])


def quiet_logs() -> None:
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console


def run_guarded(fn: Callable[[], int | None], verbose: bool) -> int:
    """Run `fn`; print a clear message (traceback only with verbose) for expected errors."""
    try:
        return fn() or errors.EXIT_OK
    except tuple(errors.EXIT_CODES) as e:
        if verbose:
            traceback.print_exc()
        _print_error(type(e).__name__, str(e), verbose)
        return errors.exit_code(e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` that reports bad flags and configs in one paragraph and exits 2.

    absl would print a traceback for a config file that raises, or for `--config.KEY` with an
    unknown KEY (the config is locked), before `main` could catch anything.
    """
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            # ml_collections defers a config file that failed to load to its first use.
            flags.FLAGS.config.keys()
        return rest
    except Exception as e:  # every parse failure is a usage error
        verbose = any(a in ("--verbose", "--verbose=true", "--verbose=1") for a in argv)
        if verbose:
            traceback.print_exc()
        # The innermost ConfigError: config_flags re-raises it with a traceback in the text.
        found = [x for x in _chain(e) if isinstance(x, errors.ConfigError)]
        if found:
            _print_error("ConfigError", str(found[-1]), verbose)
        elif (unknown := _unknown_override(argv)) is not None:
            _print_error("ConfigError", unknown, verbose)
        else:
            text = str(e).split("Traceback (most recent call last)")[0]
            text = " ".join(text.split()) or type(e).__name__
            _print_error(type(e).__name__, f"{text} (see --helpshort for the flags)", verbose)
        sys.exit(errors.USAGE_EXIT)


def _print_error(kind: str, message: str, verbose: bool) -> None:
    msg = textwrap.fill(f"error ({kind}): {message}", width=100, break_long_words=False)
    print(msg + ("" if verbose else "\n(run with --verbose for the traceback)"), file=sys.stderr)


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.KEY=...` whose KEY is not a config key, as a message."""
    known = set(config_lib.flat(config_lib.base_config()))
    for arg in argv:
        m = re.match(r"--config\.([A-Za-z_][\w.]*?)(=|$)", arg)
        if m and m.group(1) not in known:
            return config_lib.unknown_key_message(m.group(1), f"given as {arg}")
    return None
