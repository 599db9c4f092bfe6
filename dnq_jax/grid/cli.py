"""The grid's command line: `python -m dnq_jax.grid` (also installed as `dnq-grid`).

  python -m dnq_jax.grid --config configs/resnet.py:smoke --methods sgd,dnq \
      --seeds 0,1,2 --ptq rtn,qdrop --ptq-iters 50 --bits w4a4,w2a4 --workdir W

Flags only (the package docstring says what a grid does); the work is `run.run_grid`.
Expected errors print one paragraph and exit with their status, as the trainer's CLIs do.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dnq_jax.errors import ConfigError, Preempted
from dnq_jax.grid import cells as cells_lib
from dnq_jax.grid import include, run

PROG = "python -m dnq_jax.grid"
DESCRIPTION = (
    "An experiment grid as one command: every (setting, seed) cell trained, PTQ-evaluated, "
    "summed up."
)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and run the grid; returns the exit status."""
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    p.add_argument("--config", required=True, help="e.g. configs/resnet.py:smoke,k=v")
    p.add_argument("--workdir", required=True, help="the grid's folder (cells/, grid.md, ...)")
    p.add_argument("--methods", default="", help="comma-separated method presets")
    p.add_argument("--cell", action="append", default=[], help="NAME:key=value,...[,bits=..]")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--ptq", default="rtn", help="PTQ methods, comma-separated (rtn, qdrop, ...)")
    p.add_argument(
        "--ptq-iters", type=int, default=0, help="reconstruction iterations (0 = default)"
    )
    p.add_argument("--bits", default="", help="bit-widths of cells without their own (wXaY,...)")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        help="an earlier grid.json of the same settings whose finished cells count here",
    )
    p.add_argument("--report-only", action="store_true", help="write the report, train nothing")
    p.add_argument(
        "--no-shared-warmup",
        action="store_true",
        help="train every cell's warm-up itself (default: a cell whose config differs from "
        "another's only in noise keys and swa.bn_recalibration starts from that cell's state "
        "at the noise stage)",
    )
    p.add_argument("--verbose", action="store_true", help="tracebacks for expected errors")
    args = p.parse_args(argv)
    from dnq_jax.train import cli

    return cli.run_guarded(lambda: _main(args, argv), args.verbose)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: write integers, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give each seed once, at least one (got {text!r})")
    return seeds


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    get_config, arg = cells_lib.load_config_file(args.config)
    seeds = _seeds(args.seeds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cells = cells_lib.make_cells(get_config, arg, seeds, methods, args.cell, args.bits)
    wd = Path(args.workdir)
    run.enable_compile_cache(wd / ".jax_cache")
    import jax

    from dnq_jax.train import builders, cli

    cli.quiet_logs()
    command = f"{PROG} " + " ".join(argv if argv is not None else sys.argv[1:])
    device = builders.device_description(builders.make_mesh(0))
    ptq = [m.strip() for m in args.ptq.split(",") if m.strip()]
    iters = f"{args.ptq_iters} iterations per block" if args.ptq_iters else "default iterations"
    header = [
        f"# Grid: {args.config}",
        "",
        f"command: `{command}`",
        f"device: {device}",
        f"PTQ: {', '.join(ptq)} (reconstruction: {iters}); cells: {len(cells)}",
    ]
    included = include.load_included(args.include, cells, args.config, ptq, args.ptq_iters)
    meta = {"command": command, "device": device, "config": args.config, "seeds": seeds}
    print(f"{command}\ndevice: {device} ({jax.default_backend()})", flush=True)
    t0 = time.time()
    try:
        run.run_grid(
            cells,
            wd,
            ptq,
            args.ptq_iters,
            header,
            meta,
            not args.report_only,
            included,
            share_warmup=not args.no_shared_warmup,
        )
    except Preempted as e:
        # The trainer's message already says to run the same command again: here that
        # command is the grid's, which resumes the stopped cell and then the others.
        print(f"dnq_jax grid: {e}", file=sys.stderr)
        return 0
    print((wd / "grid.md").read_text())
    print(f"wall time {time.time() - t0:.0f} s; written: {wd}/grid.md, {wd}/grid.json")
    return 0
