"""An experiment grid as one command: every (setting, seed) cell trained, PTQ-evaluated, summed up.

  python -m dnq_jax.train.grid --config configs/resnet.py:smoke --methods sgd,dnq \
      --seeds 0,1,2 --ptq rtn,qdrop --ptq-iters 50 --bits w4a4,w2a4 --workdir W
  python -m dnq_jax.train.grid --config configs/resnet.py:fast --seeds 0,1 --workdir W \
      --cell sgd:method=sgd,bits=w4a4+w2a4 \
      --cell dnq_w4a4:method=dnq,noise.w_bits=4,noise.a_bits=4,bits=w4a4

(also installed as `dnq-grid`). A setting is a name and config overrides (`--cell
NAME:key=value,...`, repeatable; `--methods a,b` is short for `--cell a:method=a --cell
b:method=b`; given both, every method is crossed with every setting, named METHOD-SETTING).
The grid key `bits=w4a4+w2a4` sets the cell's evaluated bit-widths (default `--bits`, else the
config's `eval.bits`); FP32 is always measured. Cell (setting, seed) trains in
`W/cells/<setting>_s<seed>/` with the config `--config` gives plus the overrides plus
`seed=<seed>`, and is evaluated with each `--ptq` method into `ptq_<method>.json` there.

One process: each distinct dataset is loaded once and handed to every cell that uses it, and
the persistent compilation cache (`W/.jax_cache`) turns a step already compiled for an earlier
cell (same shapes and settings, another seed) into a load. It resumes: a cell with
results.json is not trained again, an interrupted one resumes from its checkpoint (the
trainer's own rule), and a PTQ result already in `ptq_<method>.json` with the same settings
is not recomputed. After each cell, `W/grid.json`, `W/grid.md` and `W/grid.png` are
rewritten: mean ± sample std over seeds per (setting, PTQ method, precision), as a table and
as bars, and one row per finished cell.

A grid can also span machines whose cell folders are gone: `--include OLD/grid.json`
(repeatable) takes the finished cells of an earlier grid of the same `--config` and PTQ
settings as finished here (not trained again; their rows are marked as included), so seeds run
elsewhere join one mean ± std; its cells of settings this grid does not have are reported
too, so a grid run for a few settings keeps the others' rows.

Cells that differ only in `noise.*` keys (not `noise.start_epoch`) and `swa.bn_recalibration`
share their warm-up, the epochs before the noise stage, bit for bit: a cell not started yet
begins from the state another cell kept at the noise stage's start
(`W/cells/<cell>/noise_start/`; `fork.py`) and trains only from there (`--no-shared-warmup`
trains every warm-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_collections

from dnq_jax.errors import ConfigError, Preempted
from dnq_jax.train import config as config_lib
from dnq_jax.train import grid_report

Bits = tuple[tuple[int, int], ...]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid: a setting (named overrides) at one seed, and its bit-widths."""

    setting: str
    seed: int
    config: ml_collections.ConfigDict
    bits: Bits
    overrides: str = ""

    @property
    def name(self) -> str:
        return f"{self.setting}_s{self.seed}"


def parse_setting(spec: str) -> tuple[str, str, Bits | None]:
    """'NAME:k=v,...,bits=w4a4+w2a4' -> (NAME, 'k=v,...', ((4, 4), (2, 4)) or None)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(f"--cell {spec!r}: name the setting with letters, digits, _ . + -")
    pairs, bits = [], None
    for item in [s.strip() for s in rest.split(",") if s.strip()]:
        if item.startswith("bits="):
            bits = tuple(config_lib.parse_bits(item[5:].replace("+", ",")))
        else:
            pairs.append(item)
    return name, ",".join(pairs), bits


def load_config_file(spec: str) -> tuple[Callable[[str], ml_collections.ConfigDict], str]:
    """'configs/resnet.py:smoke,k=v' -> (the file's get_config, 'smoke,k=v')."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"--config: no config file {path!r}")
    module_spec = importlib.util.spec_from_file_location("dnq_grid_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config, arg


def make_cells(
    get_config: Callable[[str], ml_collections.ConfigDict],
    config_arg: str,
    seeds: Iterable[int],
    methods: Iterable[str] = (),
    settings: Iterable[str] = (),
    bits: str = "",
) -> list[Cell]:
    """The cells, seed-major (every setting at the first seed before any at the second)."""
    methods, parsed = list(methods), [parse_setting(s) for s in settings]
    if methods and parsed:
        parsed = [
            (f"{m}-{n}", f"method={m},{p}".rstrip(","), b) for m in methods for n, p, b in parsed
        ]
    elif methods:
        parsed = [(m, f"method={m}", None) for m in methods]
    if not parsed:
        raise ConfigError("the grid has no cells: give --methods and/or --cell NAME:overrides")
    cells = []
    for seed in seeds:
        for name, pairs, own_bits in parsed:
            arg = ",".join(s for s in (config_arg, pairs, f"seed={seed}") if s)
            c = get_config(arg)
            cell_bits = own_bits or tuple(config_lib.parse_bits(bits or c.eval.bits))
            # The trainer's own evaluation (results.json) is then the RTN one the grid needs.
            c.eval.bits = _bits_text(cell_bits)
            config_lib.validate(c)  # every cell is checked before the first one trains
            cells.append(Cell(name, int(seed), c, cell_bits, pairs))
    names = [c.name for c in cells]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"the grid names cells {dup} twice: give each setting its own name")
    return cells


def _data_key(c: ml_collections.ConfigDict) -> tuple:
    d, r = c.data, c.runtime
    return (d.name, d.limit_train, d.limit_test, r.npz_path, r.data_dir, r.tfds_data_dir)


def _eval_settings(cell: Cell, method: str, iters: int):
    from dnq_jax.train import evaluate

    return evaluate.EvalSettings.from_config(
        cell.config, bits=cell.bits, method=method, iters=0 if method == "rtn" else iters
    )


def _compatible(saved: dict, want) -> bool:
    """Whether results `saved` were measured with the settings of `want` (bits aside)."""
    s = saved.get("settings", {})
    fields = [f.name for f in dataclasses.fields(want) if f.name != "bits"]
    return all(s.get(f) == getattr(want, f) for f in fields)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _trained(cwd: Path, c: ml_collections.ConfigDict) -> bool:
    """Whether the cell's run finished (results.json); refuse a workdir of other settings."""
    saved = _read(cwd / "config.json")
    if saved:
        changed = config_lib.resume_conflicts(saved, c)
        if changed:
            raise ConfigError(
                f"{changed[0]}: {cwd} holds a run with other settings ({', '.join(changed)}); "
                "the grid's cells must keep their settings. Use another --workdir."
            )
    return bool(saved) and (cwd / "results.json").exists()


def collect(cell: Cell, cwd: Path, ptq: list[str], iters: int) -> dict | None:
    """The cell's record for the report, or None while anything is missing (reads only)."""
    results = _read(cwd / "results.json")
    if "fp32" not in results:
        return None
    record = {
        "name": cell.name,
        "setting": cell.setting,
        "seed": cell.seed,
        "overrides": cell.overrides,
        "workdir": f"cells/{cell.name}",
        "fp32": results["fp32"],
        "train_time_s": results.get("train_time_s", 0.0),
        "ptq": {},
    }
    origin = _read(cwd / "fork.json")
    if origin:
        record["warmup_from"] = {"cell": Path(origin["donor"]).name, "step": origin["step"]}
    for method in ptq:
        want = _eval_settings(cell, method, iters)
        have = _read(cwd / f"ptq_{method}.json")
        keys = [config_lib.bits_name(*b) for b in want.bits]
        if not _compatible(have, want) or any(k not in have for k in keys):
            return None
        record["ptq"][method] = {k: have[k] for k in keys}
    return record


def evaluate_cell(cell: Cell, cwd: Path, ds, ptq: list[str], iters: int) -> None:
    """PTQ-evaluate the cell's final variables with each method; only what is missing."""
    import jax

    from dnq_jax.train import builders, checkpoint, evaluate, workdir

    model = variables = None
    results = _read(cwd / "results.json")
    for method in ptq:
        want = _eval_settings(cell, method, iters)
        path = cwd / f"ptq_{method}.json"
        have = _read(path)
        stale = not _compatible(have, want)  # then rewritten, even with nothing to compute
        if stale:
            # RTN at the cell's bits is what the trainer measured at the end of the run.
            have = results if _compatible(results, want) else {}
            have = {k: v for k, v in have.items() if k not in ("swa_snapshots", "steps")}
        missing = tuple(b for b in want.bits if config_lib.bits_name(*b) not in have)
        if missing:
            if variables is None:
                c = cell.config
                model = builders.create_model(c, ds.num_classes)
                like = jax.device_get(builders.init_variables(model, c, ds.image_shape))
                variables = checkpoint.load_final(cwd, like)
            print(f"dnq_jax grid: {cell.name}: {method} at {_bits_text(missing)}", flush=True)
            new = evaluate.evaluate_variables(
                model,
                variables,
                ds,
                dataclasses.replace(want, bits=missing),
                progress=cell.config.runtime.progress,
            )
            have = _merge(have, new)
        if missing or stale:
            workdir.write_results(path, have)


def _merge(old: dict, new: dict) -> dict:
    if not old:
        return new
    out = {**old, **{k: v for k, v in new.items() if k not in ("settings", "reconstruction")}}
    if "reconstruction" in new:
        out["reconstruction"] = {**old.get("reconstruction", {}), **new["reconstruction"]}
    settings = dict(new["settings"])
    settings["bits"] = list(dict.fromkeys([*old["settings"]["bits"], *settings["bits"]]))
    settings["eval_time_s"] = old["settings"].get("eval_time_s", 0) + settings["eval_time_s"]
    out["settings"] = settings
    return out


def load_included(
    paths: Iterable[str | Path], cells: list[Cell], config: str, ptq: list[str], iters: int
) -> dict[str, dict]:
    """Finished cells of earlier grids (their grid.json), by name, to report with this one.

    Each file must come from a grid of the same `--config` string and reconstruction iteration
    count (ConfigError otherwise). A record named like a cell of this grid stands for it when
    its overrides are the cell's and it holds every PTQ method at every bit-width the cell
    evaluates (else the cell runs here). A record of another setting is carried over as it is
    when it holds every PTQ method, so a grid run for some settings keeps the others' rows.
    What is left out is printed.
    """
    by_name = {c.name: c for c in cells}
    overrides = {c.setting: c.overrides for c in cells}
    out: dict[str, dict] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--include: no file {path}")
        doc = _read(path)
        if "cells" not in doc:
            raise ConfigError(f"--include: {path} is not a readable grid.json (no 'cells')")
        for key, want in (("config", config), ("ptq_iters", iters)):
            if doc.get(key) != want:
                raise ConfigError(
                    f"--include: {path} was run with {key} {doc.get(key)!r}, this grid with "
                    f"{want!r}; only a grid of the same settings can be included"
                )
        skipped = []
        for r in doc["cells"]:
            cell, have = by_name.get(r.get("name")), r.get("ptq", {})
            if cell is None:  # another cell: carried with all its bit-widths
                keys = {m: list(have.get(m, {})) for m in ptq}
                usable = all(keys.values())
                # A seed of a setting this grid has joins its mean only with its overrides.
                mine = overrides.get(r.get("setting"), r.get("overrides"))
                usable = usable and r.get("overrides") == mine
            else:
                keys = {m: [config_lib.bits_name(*b) for b in cell.bits] for m in ptq}
                usable = r.get("overrides") == cell.overrides and all(
                    k in have.get(m, {}) for m in ptq for k in keys[m]
                )
            if not usable:
                skipped.append(str(r.get("name")))
                continue
            ptq_accs = {m: {k: have[m][k] for k in keys[m]} for m in ptq}
            out[r["name"]] = {**r, "ptq": ptq_accs, "included_from": str(path)}
        if skipped:
            print(
                f"dnq_jax grid: --include {path}: left out (other overrides, or PTQ results "
                f"missing): {', '.join(skipped)}"
            )
    return out


def _bits_text(bits: Bits) -> str:
    return ",".join(config_lib.bits_name(*b) for b in bits)


def run_grid(
    cells: list[Cell],
    workdir: str | Path,
    ptq: Iterable[str] = ("rtn",),
    ptq_iters: int = 0,
    header: Iterable[str] = (),
    meta: dict | None = None,
    train: bool = True,
    included: dict[str, dict] | None = None,
    share_warmup: bool = True,
) -> dict:
    """Train (or resume) and evaluate every cell in order; rewrite the report after each.

    Returns what grid.json holds. `train=False` only reports what is already there.
    `included` (cell name -> record, see `load_included`): cells finished elsewhere, reported
    and not trained unless this workdir holds their own finished results; records of settings
    this grid does not have are reported first. `share_warmup`: a cell not started yet begins
    from another cell's kept warm-up when their configs differ in noise keys only (`fork.py`;
    the same states, bit for bit), instead of training it again.
    """
    from dnq_jax.train import builders, fork
    from dnq_jax.train.loop import train_and_evaluate

    ptq = list(ptq)
    for method in ptq:
        if method not in config_lib.ptq_methods():
            raise ConfigError(f"--ptq: unknown {method!r}; choose from {config_lib.ptq_methods()}")
    wd = Path(workdir)
    header = list(header) or [f"# Grid: {len(cells)} cells"]
    meta = {**(meta or {}), "ptq": ptq, "ptq_iters": ptq_iters}
    datasets: dict[tuple, object] = {}
    included = included or {}

    def report() -> dict:
        names = {c.name for c in cells}
        records = [r for n, r in included.items() if n not in names]  # other settings first
        pending = []
        for cell in cells:
            r = collect(cell, wd / "cells" / cell.name, ptq, ptq_iters)
            r = r or included.get(cell.name)
            if r is None:
                pending.append(cell.name)
            else:
                records.append(r)
        grid_report.write(wd, meta, header, records, pending)
        doc = _read(wd / "grid.json")
        if records:
            from dnq_jax.diagnostics import plots  # matplotlib, only once there is a result

            plots.setting_bars(doc["summary"], wd / "grid.png")
        return doc

    (wd / "cells").mkdir(parents=True, exist_ok=True)
    if train:
        # Before any cell trains: an older grid.json left here never outlives this run's
        # inputs (the experiment scripts copy it out even after an interrupted run).
        report()
    for cell in cells if train else ():
        cwd = wd / "cells" / cell.name
        done = _trained(cwd, cell.config)
        if done and collect(cell, cwd, ptq, ptq_iters) is not None:
            continue
        if cell.name in included:
            print(f"dnq_jax grid: {cell.name} from {included[cell.name]['included_from']}")
            continue
        key = _data_key(cell.config)
        if key not in datasets:
            datasets[key] = builders.load_dataset(cell.config)
        t0 = time.time()
        if not done:
            if share_warmup:
                fork.begin_from_sibling(cwd, cell.config)
            print(f"dnq_jax grid: training {cell.name} in {cwd}", flush=True)
            train_and_evaluate(cell.config, str(cwd), dataset=datasets[key])
        evaluate_cell(cell, cwd, datasets[key], ptq, ptq_iters)
        print(f"dnq_jax grid: {cell.name} done ({time.time() - t0:.0f} s)", flush=True)
        report()
    return report()


def enable_compile_cache(path: str | Path) -> None:
    """Persist compiled programs under `path`: an equal step of a later cell is a load."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dnq_jax.train.grid", description=__doc__.splitlines()[0]
    )
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


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    get_config, arg = load_config_file(args.config)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: write integers, e.g. 0,1,2 (got {args.seeds!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give each seed once, at least one (got {args.seeds!r})")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cells = make_cells(get_config, arg, seeds, methods, args.cell, args.bits)
    wd = Path(args.workdir)
    enable_compile_cache(wd / ".jax_cache")
    import jax

    from dnq_jax.train import builders, cli

    cli.quiet_logs()
    command = "python -m dnq_jax.train.grid " + " ".join(argv if argv is not None else sys.argv[1:])
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
    included = load_included(args.include, cells, args.config, ptq, args.ptq_iters)
    meta = {"command": command, "device": device, "config": args.config, "seeds": seeds}
    print(f"{command}\ndevice: {device} ({jax.default_backend()})", flush=True)
    t0 = time.time()
    try:
        run_grid(
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


if __name__ == "__main__":
    raise SystemExit(main())
