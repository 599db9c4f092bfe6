"""The grid's command lines: `dnq-grid` (`python -m dnq_jax.cli.grid`), `dnq-demo` (what
`make demo` runs) and `experiments/park.py`.

  python -m dnq_jax.cli.grid --config configs/resnet.py:smoke --methods sgd,dnq \
      --seeds 0,1,2 --ptq rtn,qdrop --ptq-iters 50 --bits w4a4,w2a4 --workdir W

Flags only (`dnq_jax.grid` says what a grid does); the work is `grid.run.run_grid`,
`grid.demo.run_demo` and `grid.park.save` / `restore`. The flags are absl's, as for
train.py and evaluate.py, each command parsing into a FlagValues of its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from absl import flags

from dnq_jax.cli import common
from dnq_jax.errors import ConfigError, Preempted
from dnq_jax.grid import cells as grid_cells
from dnq_jax.grid import include as grid_include
from dnq_jax.grid import run as grid_run
from dnq_jax.train import config as config_lib

PROG = "dnq-grid"


def _grid_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    s, i, b, m = (
        flags.DEFINE_string,
        flags.DEFINE_integer,
        flags.DEFINE_bool,
        flags.DEFINE_multi_string,
    )
    s("config", None, "Config file and argument, e.g. configs/resnet.py:smoke,k=v.", flag_values=fv)
    s("workdir", None, "The grid's folder (cells/, grid.md, grid.json, grid.png).", flag_values=fv)
    s("methods", "", "Comma-separated method presets (a cell each).", flag_values=fv)
    m(
        "cell",
        [],
        "NAME:key=value,...[,bits=wXaY+wXaY][,recon_bits=wXaY+...] (repeatable; recon_bits: "
        "the reconstruction methods run at these of the cell's bits only, RTN at all).",
        flag_values=fv,
    )
    s("seeds", "0", "Comma-separated seeds.", flag_values=fv)
    s("ptq", "rtn", "PTQ methods, comma-separated (rtn, adaround, brecq, qdrop).", flag_values=fv)
    i("ptq-iters", 0, "Reconstruction iterations per block (0 = the default).", flag_values=fv)
    s("bits", "", "Bit-widths of cells without their own (wXaY,...).", flag_values=fv)
    m(
        "include",
        [],
        "An earlier grid.json of the same settings whose finished cells count here (repeatable).",
        flag_values=fv,
    )
    b("report-only", False, "Write the report, train nothing.", flag_values=fv)
    b(
        "no-shared-warmup",
        False,
        "Train every cell's warm-up itself (default: a cell whose config differs from "
        "another's only in noise keys and swa.bn_recalibration starts from that cell's "
        "state at the noise stage).",
        flag_values=fv,
    )
    b("verbose", False, "Tracebacks for expected errors.", flag_values=fv)
    return fv


def main(argv: list[str] | None = None) -> int:
    """Parse the grid's flags and run it; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    f = _grid_flags()
    common.parse_into(f, [PROG, *argv], required=("config", "workdir"))
    return common.run_guarded(lambda: _run_grid(f, argv), f.verbose)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: write integers, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give each seed once, at least one (got {text!r})")
    return seeds


def _run_grid(f, argv: list[str]) -> int:
    get_config, arg = grid_cells.load_config_file(f.config)
    seeds = _seeds(f.seeds)
    methods = [m.strip() for m in f.methods.split(",") if m.strip()]
    cells = grid_cells.make_cells(get_config, arg, seeds, methods, f.cell, f.bits)
    wd = Path(f.workdir)
    grid_run.enable_compile_cache(wd / ".jax_cache")
    import jax

    from dnq_jax.train import builders

    common.quiet_logs()
    command = f"{PROG} " + " ".join(argv)
    device = builders.device_description(builders.make_mesh(0))
    ptq = [m.strip() for m in f.ptq.split(",") if m.strip()]
    iters = (
        f"{f['ptq-iters'].value} iterations per block"
        if f["ptq-iters"].value
        else "default iterations"
    )
    header = [
        f"# Grid: {f.config}",
        "",
        f"command: `{command}`",
        f"device: {device}",
        f"PTQ: {', '.join(ptq)} (reconstruction: {iters}); cells: {len(cells)}",
    ]
    included = grid_include.load_included(f.include, cells, f.config, ptq, f["ptq-iters"].value)
    meta = {"command": command, "device": device, "config": f.config, "seeds": seeds}
    print(f"{command}\ndevice: {device} ({jax.default_backend()})", flush=True)
    t0 = time.time()
    try:
        grid_run.run_grid(
            cells,
            wd,
            ptq,
            f["ptq-iters"].value,
            header,
            meta,
            not f["report-only"].value,
            included,
            share_warmup=not f["no-shared-warmup"].value,
        )
    except Preempted as e:
        # The trainer's message already says to run the same command again: here that
        # command is the grid's, which resumes the stopped cell and then the others.
        print(f"dnq_jax grid: {e}", file=sys.stderr)
        return 0
    print((wd / "grid.md").read_text())
    print(f"wall time {time.time() - t0:.0f} s; written: {wd}/grid.md, {wd}/grid.json")
    return 0


def demo_main(argv: list[str] | None = None) -> int:
    """`dnq-demo`: train, evaluate and tabulate the demo's models; returns the exit status."""
    from dnq_jax.grid import demo

    argv = sys.argv[1:] if argv is None else list(argv)
    f = flags.FlagValues()
    flags.DEFINE_string("workdir", "demo_out", "Where the demo's grid goes.", flag_values=f)
    flags.DEFINE_integer("epochs", 10, "Epochs of each model.", flag_values=f)
    flags.DEFINE_integer(
        "qdrop-iters",
        2000,
        "QDrop iterations per block at the DNQ targets (fewer cut the SGD model's short; 0: "
        "no QDrop).",
        flag_values=f,
    )
    flags.DEFINE_string(
        "method",
        demo.DEMO_METHOD,
        "The DNQ models' method or recipe: dnq_half (the paper's form at lambda 0.5), dnq "
        "(the paper's form), lam08 (the in-place noise at lambda_max 0.8), naive, authors, ...",
        flag_values=f,
    )
    flags.DEFINE_string(
        "dnq-targets",
        "w2a4",
        "One DNQ model per precision, its noise modelled there (w4a4, w2a4 or both).",
        flag_values=f,
    )
    flags.DEFINE_bool("fresh", False, "Delete the workdir first.", flag_values=f)
    flags.DEFINE_bool("verbose", False, "Tracebacks for expected errors.", flag_values=f)
    common.parse_into(f, ["dnq-demo", *argv])
    targets = tuple(t.strip().lower() for t in f["dnq-targets"].value.split(",") if t.strip())

    def run() -> int:
        if f["qdrop-iters"].value < 0:
            raise ConfigError("--qdrop-iters: must be >= 0 (0: no QDrop)")
        if not targets or any(t not in demo.BITS for t in targets):
            raise ConfigError(f"--dnq-targets: choose from {', '.join(demo.BITS)}")
        # An unknown method is named with the known ones; one without noise is no DNQ model.
        if not config_lib.uses_noise(config_lib.apply_method(config_lib.base_config(), f.method)):
            raise ConfigError(f"--method: {f.method} trains without noise; choose a noise method")
        iters = f["qdrop-iters"].value
        return demo.run_demo(f.workdir, f.epochs, iters, targets, f.fresh, f.method)

    return common.run_guarded(run, f.verbose)


def park_main(argv: list[str] | None, parked_root: Path, description: str = "") -> int:
    """`save|restore WORKDIR NAME`: park the unfinished cells of the grid in WORKDIR under
    `parked_root/NAME/`, or unpack them from there; returns the exit status."""
    from dnq_jax.grid import park

    argv = sys.argv[1:] if argv is None else list(argv)
    f = flags.FlagValues()
    flags.DEFINE_bool("verbose", False, "Tracebacks for expected errors.", flag_values=f)
    flags.DEFINE_bool(
        "keep_final",
        False,
        "save: pack finished cells too, with their final variables, for a later grid that "
        "evaluates them with other PTQ settings.",
        flag_values=f,
    )
    prog = "park.py save|restore WORKDIR NAME"
    rest = common.parse_into(f, [prog, *argv])
    if len(rest) != 3 or rest[0] not in ("save", "restore"):
        common.print_error(
            "UsageError", f"{description} usage: {prog} (parked under {parked_root}/NAME/)", False
        )
        return common.errors.USAGE_EXIT
    action, workdir, name = rest
    if action == "save":
        fn = lambda w, p: park.save(w, p, keep_final=f.keep_final)
    else:
        fn = park.restore
    return common.run_guarded(lambda: fn(Path(workdir), parked_root / name) and 0, f.verbose)


if __name__ == "__main__":
    sys.exit(main())
