"""Flatness and quantization-error statistics of several finished runs, measured alike.

  python experiments/flatness.py workdirs/dnq_table/cells/sgd_s0 \
      workdirs/dnq_table/cells/dnq_w2a4_s0 --out experiments/results/flatness

For each workdir with final variables (the others are listed as skipped): the loss, the top
Hessian eigenvalue, the Hessian trace (mean +- s.e.) and a 1-D filter-normalised landscape of
the training loss, all on the same training images with the same random vectors, and the
per-layer weight/activation error statistics and output-error decomposition at each --bits
(`dnq_jax.diagnostics.measure`: `measure_flatness`, `measure_errors`, one `MeasureSettings`
for all runs, as a run's report measures). Writes OUT.md, OUT.json and OUT.png (the 1-D
landscapes side by side), and prints the exact command, the wall time and the device.
Rerunnable: a run whose final variables and settings are those already in OUT.json is not
measured again, so adding runs as they finish costs only the new ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dnq_jax.diagnostics import Landscape, plots  # noqa: E402
from dnq_jax.diagnostics.measure import (  # noqa: E402
    MeasureSettings,
    measure_errors,
    measure_flatness,
)
from dnq_jax.report import collect_ptq  # noqa: E402
from dnq_jax.train import builders  # noqa: E402
from dnq_jax.train import config as config_lib  # noqa: E402
from dnq_jax.train import evaluate as train_eval  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+", help="finished training runs")
    p.add_argument("--bits", default="w4a4,w2a4", help="precisions of the error statistics")
    p.add_argument("--images", type=int, default=1024, help="training images of the loss")
    p.add_argument("--error-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="images per chunk of the loss")
    p.add_argument("--hessian-iters", type=int, default=20)
    p.add_argument("--trace-samples", type=int, default=20)
    p.add_argument("--landscape-points", type=int, default=21)
    p.add_argument("--landscape-grid", type=int, default=0, help="2-D landscape (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=None, help="default: each run's own")
    p.add_argument("--out", default="experiments/results/flatness")
    args = p.parse_args(argv)
    t_start = time.time()
    dev = jax.devices()[0]
    device = f"{dev.platform} ({dev.device_kind}), jax {jax.__version__}"
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    print(f"command: {command}\ndevice: {device}", flush=True)
    settings = MeasureSettings(
        bits=tuple(config_lib.parse_bits(args.bits)),
        images=args.images,
        error_images=args.error_images,
        batch_size=args.batch_size,
        hessian_iters=args.hessian_iters,
        trace_samples=args.trace_samples,
        landscape_points=args.landscape_points,
        landscape_grid=args.landscape_grid,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
    )
    settings.check()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = _previous(out.with_suffix(".json"), settings)
    runs, skipped, datasets = {}, [], {}
    for wd in args.workdirs:
        final = Path(wd) / "final"
        if not (final.is_dir() and (Path(wd) / "config.json").exists()):
            skipped.append(wd)
            print(f"skipped {wd}: no final variables (not finished)", flush=True)
            continue
        stamp = final.stat().st_mtime
        if wd in old and old[wd]["final_mtime"] == stamp:
            runs[wd] = old[wd]
            print(f"{wd}: unchanged since the last measurement, kept", flush=True)
            continue
        t0 = time.time()
        c = config_lib.from_json_text((Path(wd) / "config.json").read_text(), wd)
        key = json.dumps({**c.data.to_dict(), **c.runtime.to_dict()}, sort_keys=True)
        if key not in datasets:
            datasets[key] = builders.load_dataset(c)
        c, model, variables, ds = train_eval.load_run(wd, datasets[key])
        print(f"{wd}: {c.model.name} on {ds.name}, {config_lib.method_name(c)}", flush=True)
        ls = c.optim.label_smoothing if settings.label_smoothing is None else args.label_smoothing
        fl = measure_flatness(model, variables, ds, settings, ls)
        timings = dict(fl["timings"])
        errors = {}
        for wb, ab in settings.bits:
            name, t1 = train_eval.bits_name(wb, ab), time.time()
            e = measure_errors(model, variables, ds, c, (wb, ab), settings)
            errors[name] = _error_summary(e["numbers"])
            timings[f"errors {name}"] = round(time.time() - t1, 2)
        noisy = c.noise.weight != "none" or bool(c.noise.act)
        rtn = next((r for r in collect_ptq(wd) if r["method"] == "rtn"), None)
        runs[wd] = {
            "name": Path(wd).name,
            "method": config_lib.method_name(c),
            "noise_target": train_eval.bits_name(c.noise.w_bits, c.noise.a_bits) if noisy else None,
            "rtn": rtn["accuracy"] if rtn else None,
            "flatness": fl["numbers"],
            "errors": errors,
            "final_mtime": stamp,
            "time_s": round(time.time() - t0, 1),
            "timings_s": timings,
        }
        print(f"{wd}: measured in {runs[wd]['time_s']:.0f} s", flush=True)
    wall = time.time() - t_start
    doc = {
        "command": command,
        "device": device,
        "wall_time_s": round(wall, 1),
        "settings": settings.as_dict(),
        "runs": runs,
        "skipped": skipped,
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=float))
    out.with_suffix(".md").write_text(format_md(doc))
    curves = {r["name"]: _line(r) for r in runs.values() if "landscape_1d" in r["flatness"]}
    if curves:
        title = "1-D loss landscapes (filter-normalised, same key)"
        plots.landscape_1d(curves, out.with_suffix(".png"), title=title)
    print(format_md(doc))
    print(f"wall time {wall:.0f} s on {device}; written {out}.md, {out}.json, {out}.png")
    return 0


def _previous(path: Path, settings: MeasureSettings) -> dict:
    """The runs of an earlier OUT.json measured with the same settings."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc.get("runs", {}) if doc.get("settings") == settings.as_dict() else {}


def _line(run: dict):
    land = run["flatness"]["landscape_1d"]
    alphas, losses = np.asarray(land["alphas"]), np.asarray(land["losses"])
    return Landscape(alphas=alphas, betas=None, losses=losses, directions=())


def _error_summary(numbers: dict) -> dict:
    """Means over the layers quantized at the asked precision (the 8-bit ends left out)."""
    lay = [v for v in numbers["layers"].values() if v["weight"] and v["w_bits"] != 8]
    act = [v for v in numbers["layers"].values() if v["activation"] and v["a_bits"] != 8]
    mean = lambda rows, kind, k: float(np.mean([v[kind][k] for v in rows])) if rows else None
    return {
        "layers": numbers["layers"],
        "activation_to_weight": numbers["activation_to_weight"],
        "sum_over_layers": numbers["sum_over_layers"],
        "mean_weight_ks": mean(lay, "weight", "ks"),
        "mean_weight_kurtosis": mean(lay, "weight", "kurtosis"),
        "mean_activation_ks": mean(act, "activation", "ks"),
        "mean_activation_kurtosis": mean(act, "activation", "kurtosis"),
    }


def _f(v, fmt=".4g") -> str:
    return "-" if v is None else format(v, fmt)


def format_md(doc: dict) -> str:
    s = doc["settings"]
    stop = f", stopped at a relative change <= {s['hessian_tol']:g}" if s["hessian_tol"] else ""
    lines = [
        "# Flatness and quantization error of finished runs",
        "",
        f"`{doc['command']}`",
        "",
        f"Device: {doc['device']}; wall time of this invocation {doc['wall_time_s']:.0f} s "
        "(a run kept from an earlier one was measured then; its own time is in the table). "
        "Training loss "
        f"(cross-entropy with the run's label smoothing unless --label-smoothing, BatchNorm in "
        f"eval mode, weight decay left out) on the same {s['images']} training images (seed "
        f"{s['seed']}) for every run; the same PRNG keys for the probe vectors and directions. "
        f"Top eigenvalue: power iteration (at most {s['hessian_iters']} iterations{stop}); "
        f"trace: {s['trace_samples']} "
        f"Rademacher probes (mean ± s.e.); 1-D landscape: {s['landscape_points']} points on "
        f"[-{s['landscape_radius']:g}, {s['landscape_radius']:g}], rise = mean loss at the "
        "two ends minus the loss.",
        "",
        "| run | method | noise at | RTN FP32 | loss | top eigenvalue | trace | 1-D rise | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"].values():
        f = r["flatness"]
        trace = f"{_f(f.get('trace'))} ± {_f(f.get('trace_stderr'), '.2g')}"
        rise = f.get("landscape_1d", {}).get("rise_at_radius")
        fp32 = (r["rtn"] or {}).get("fp32")
        its = len(f.get("eigenvalue_history", []))
        target = r["noise_target"].upper() if r["noise_target"] else "-"
        lines.append(
            f"| {r['name']} | {r['method']} | {target} | {_f(fp32, '.2f')} | {_f(f['loss'])} | "
            f"{_f(f.get('top_eigenvalue'))} ({its} it) | {trace} | {_f(rise)} | "
            f"{r['time_s']:.0f} s |"
        )
    lines += [
        "",
        f"Quantization error (RTN as evaluated, statistics over {s['error_images']} training "
        "images): means over the layers at the given precision (first/last layer at 8 bits "
        "left out) of the KS distance to the fitted Gaussian and the excess kurtosis; act/weight "
        "= sum over all layers of E||W dx||^2 / E||y||^2 over that of E||dW x||^2 / E||y||^2.",
        "",
        "| run | bits | RTN top-1 | act/weight | W KS | W kurt | x KS | x kurt |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"].values():
        for bits, e in r["errors"].items():
            acc = (r["rtn"] or {}).get(bits)
            lines.append(
                f"| {r['name']} | {bits.upper()} | {_f(acc, '.2f')} | "
                f"{_f(e['activation_to_weight'], '.3g')} | {_f(e['mean_weight_ks'], '.3f')} | "
                f"{_f(e['mean_weight_kurtosis'], '.2f')} | {_f(e['mean_activation_ks'], '.3f')} | "
                f"{_f(e['mean_activation_kurtosis'], '.2f')} |"
            )
    if doc["skipped"]:
        lines += ["", "Skipped (no final variables yet): " + ", ".join(doc["skipped"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
