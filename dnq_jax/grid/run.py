"""Run a grid: every cell trained (or resumed), PTQ-evaluated, and the report rewritten.

One process: each distinct dataset is loaded once and handed to every cell that uses it. It
resumes: a cell with results.json is not trained again, an interrupted one resumes from its
checkpoint (the trainer's own rule), and a PTQ result already in `ptq_<method>.json` with the
same settings is not recomputed. Cells that differ only in noise keys share their warm-up
(`fork.py`). JAX and the trainer are imported on first use, so loading the grid costs little.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import ml_collections

from dnq_jax.errors import ConfigError
from dnq_jax.grid import report as grid_report
from dnq_jax.grid.cells import Cell, bits_text
from dnq_jax.train import config as config_lib
from dnq_jax.train import results


def _data_key(c: ml_collections.ConfigDict) -> tuple:
    """What decides a cell's data set: cells alike in it share one loaded copy."""
    r = c.runtime
    files = (r.npz_path, r.data_dir, r.tfds_data_dir, r.image_folder)
    path = (r.data_source, r.device_data_fraction, r.data_workers)
    return (*sorted(c.data.to_dict().items()), *files, *path)


def _eval_settings(cell: Cell, method: str, iters: int):
    from dnq_jax.train import evaluate

    return evaluate.EvalSettings.from_config(
        cell.config,
        bits=cell.bits_for(method),
        method=method,
        iters=0 if method == "rtn" else iters,
    )


def _trained(cwd: Path, c: ml_collections.ConfigDict) -> bool:
    """Whether the cell's run finished (results.json); refuse a workdir of other settings."""
    saved = results.read(cwd / "config.json")
    if saved:
        changed = config_lib.resume_conflicts(saved, c)
        if changed:
            raise ConfigError(
                f"{changed[0]}: {cwd} holds a run with other settings ({', '.join(changed)}); "
                "the grid's cells must keep their settings. Use another --workdir."
            )
    return bool(saved) and (cwd / results.TRAINED).exists()


def collect(cell: Cell, cwd: Path, ptq: list[str], iters: int) -> dict | None:
    """The cell's record for the report, or None while anything is missing (reads only)."""
    trained = results.read(cwd / results.TRAINED)
    if "fp32" not in trained:
        return None
    record = {
        "name": cell.name,
        "setting": cell.setting,
        "seed": cell.seed,
        "overrides": cell.overrides,
        "workdir": f"cells/{cell.name}",
        "fp32": trained["fp32"],
        "train_time_s": trained.get("train_time_s", 0.0),
        "ptq": {},
    }
    origin = results.read(cwd / "fork.json")
    if origin:
        record["warmup_from"] = {"cell": Path(origin["donor"]).name, "step": origin["step"]}
    for method in ptq:
        want = _eval_settings(cell, method, iters)
        have = results.read(cwd / results.method_file(method))
        keys = [config_lib.bits_name(*b) for b in want.bits]
        if not results.compatible(have, want) or any(k not in have for k in keys):
            return None
        record["ptq"][method] = {k: have[k] for k in keys}
    return record


def evaluate_cell(cell: Cell, cwd: Path, ds, ptq: list[str], iters: int) -> None:
    """PTQ-evaluate the cell's final variables with each method; only what is missing."""
    import jax

    from dnq_jax.train import builders, checkpoint, evaluate

    model = variables = None
    trained = results.read(cwd / results.TRAINED)
    for method in ptq:
        want = _eval_settings(cell, method, iters)
        path = cwd / results.method_file(method)
        have = results.read(path)
        stale = not results.compatible(have, want)  # then rewritten, even with nothing to compute
        if stale:
            # RTN at the cell's bits is what the trainer measured at the end of the run.
            have = results.ptq_only(trained) if results.compatible(trained, want) else {}
        missing = tuple(b for b in want.bits if config_lib.bits_name(*b) not in have)
        if missing:
            if variables is None:
                c = cell.config
                model = builders.create_model(c, ds.num_classes)
                like = jax.device_get(builders.init_variables(model, c, ds.image_shape))
                variables = checkpoint.load_final(cwd, like)
            print(f"dnq_jax grid: {cell.name}: {method} at {bits_text(missing)}", flush=True)
            new = evaluate.evaluate_variables(
                model,
                variables,
                ds,
                dataclasses.replace(want, bits=missing),
                progress=cell.config.runtime.progress,
            )
            have = results.merge(have, new)
        if missing or stale:
            results.write(path, have)


def write_report(
    wd: Path,
    cells: list[Cell],
    included: dict[str, dict],
    meta: dict,
    header: list[str],
    ptq: list[str],
    ptq_iters: int,
) -> dict:
    """Rewrite wd/grid.json, grid.md and grid.png from what the cell folders hold now, and
    the `included` records (those of settings this grid does not have first); returns what
    grid.json holds."""
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
    doc = results.read(wd / "grid.json")
    if records:
        from dnq_jax.diagnostics import plots  # matplotlib, only once there is a result

        plots.setting_bars(doc["summary"], wd / "grid.png")
    return doc


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
    `included` (cell name -> record, see `include.load_included`): cells finished elsewhere,
    reported and not trained unless this workdir holds their own finished results; records of
    settings this grid does not have are reported first. `share_warmup`: a cell not started
    yet begins from another cell's kept warm-up when their configs differ in noise keys only
    (`fork.py`; the same states, bit for bit), instead of training it again.
    """
    from dnq_jax.grid import fork
    from dnq_jax.train import builders
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
        return write_report(wd, cells, included, meta, header, ptq, ptq_iters)

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
                fork.begin_from_sibling(cwd, cell.config, datasets[key])
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
