"""report.md from the numbers `write.py` collects (report.json's dict); no JAX, pure text."""

from __future__ import annotations

import math

from dnq_jax.choices import DECOMPOSITION_TERMS as _TERMS


def _f(v, fmt: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _image(doc: dict, key: str, alt: str) -> list[str]:
    path = doc["figures"].get(key)
    return [f"![{alt}]({path})", ""] if path else []


def row_label(row: dict) -> str:
    """A PTQ row's name in the table and the figure: method, and its iterations if any."""
    label = row["method"].upper()
    return f"{label} ({row['iters']} it)" if row["method"] != "rtn" and row["iters"] else label


def format_report(doc: dict) -> str:
    """The markdown report: run, PTQ table, training, per-layer errors, flatness, timings."""
    run = doc["run"]
    noise = f", noise modelled at {run['noise_target'].upper()}" if run["noise_target"] else ""
    lines = [
        f"# Report: {run['model']} on {run['dataset']}, method {run['method']}",
        "",
        f"Workdir `{doc['workdir']}`: seed {run['seed']}, {run['epochs']} epochs{noise}. "
        f"Measured on {doc['device']} in {doc['timings_s']['total']:.0f} s; every number is "
        "in report.json.",
        "",
    ]
    lines += _ptq(doc) + _training(doc)
    for name, e in doc["errors"].items():
        lines += _errors(doc, name, e)
    lines += _flatness(doc)
    lines += ["## Wall time per section", ""]
    lines += _table(["section", "s"], [[k, f"{v:.1f}"] for k, v in doc["timings_s"].items()])
    return "\n".join(lines) + "\n"


def _ptq(doc: dict) -> list[str]:
    rows = doc["ptq"]["rows"]
    lines = ["## Post-training quantization (test top-1, %)", ""]
    if doc["ptq"]["computed"]:
        note = "No PTQ results were in the workdir: the run's eval settings were evaluated now."
        lines += [note + " (ptq_results.json)", ""]
    keys = list(dict.fromkeys(k for r in rows for k in r["accuracy"]))
    body = []
    for r in rows:
        method = row_label(r)
        accs = [_f(r["accuracy"].get(k), ".2f") for k in keys]
        body.append([method, *accs, str(r["n_calib"]), ", ".join(r["sources"])])
    head = ["PTQ", *(k.upper() for k in keys), "calib images", "from"]
    return lines + _table(head, body) + [""] + _image(doc, "ptq", "accuracy vs bit-width")


def _training(doc: dict) -> list[str]:
    t = doc["training"]
    lines = ["## Training", ""]
    if not t["epochs_logged"]:
        return lines + ["metrics.jsonl holds no epoch rows.", ""]
    lines += [
        f"{t['epochs_logged']} epochs logged; last (epoch {t['final_epoch']:.0f}): train loss "
        f"{_f(t['train_loss'])}, train top-1 {_f(t['train_acc'], '.2f')}%, last test top-1 "
        f"{_f(t['test_acc'], '.2f')}%; largest noise lambda {_f(t['max_lambda'])}; "
        f"{t['epoch_time_s']:.0f} s of epochs.",
        "",
    ]
    return lines + _image(doc, "training", "training curves")


def _errors(doc: dict, name: str, e: dict) -> list[str]:
    lines = [
        f"## Quantization error per layer at {name.upper()}",
        "",
        f"Round-to-nearest as the evaluation does it (BN folded, first/last layer at 8 bits, "
        f"per-channel weights, per-tensor activations calibrated on {e['n_calib']} training "
        f"images); activation errors and the output decomposition over {e['images']} training "
        "images. std, KS (distance to the fitted Gaussian) and excess kurtosis of Q(W) - W and "
        "Q(x) - x (a spike at 0 in an activation histogram: inputs the grid holds exactly, "
        "such as the zeros after a ReLU, which raise KS and kurtosis); output terms "
        "E||W dx||^2, E||dW x||^2, E||dW dx||^2 and the total, each over E||W x||^2 of the "
        "layer.",
        "",
    ]
    body = []
    for layer, v in e["layers"].items():
        w, a, o = v["weight"] or {}, v["activation"] or {}, v["output"]
        bits = f"w{v['w_bits']}a{v['a_bits'] if v['a_bits'] is not None else '-'}"
        row = [layer, bits]
        row += [_f(w.get(k), ".3g") for k in ("std", "ks", "kurtosis")]
        row += [_f(a.get(k), ".3g") for k in ("std", "ks", "kurtosis")]
        row += [_f(o[t], ".3g") for t in _TERMS]
        body.append(row)
    head = ["layer", "bits", "W std", "W KS", "W kurt", "x std", "x KS", "x kurt"]
    head += ["W dx", "dW x", "dW dx", "total"]
    lines += _table(head, body) + [""]
    s, r = e["sum_over_layers"], e["activation_to_weight"]
    side = "activation" if r > 1 else "weight"
    lines += [
        f"Summed over layers, activation term / weight term = **{_f(r, '.3g')}** "
        f"(sum W dx {_f(s['activation'], '.3g')}, sum dW x {_f(s['weight'], '.3g')}, sum cross "
        f"{_f(s['cross'], '.3g')}): the {side} error dominates the output error at "
        f"{name.upper()}.",
        "",
    ]
    for kind in ("weight", "activation"):
        lines += _image(doc, f"{kind}_errors_{name}", f"{kind} errors {name}")
    return lines + _image(doc, f"decomposition_{name}", f"output error decomposition {name}")


def _flatness(doc: dict) -> list[str]:
    f, st = doc["flatness"], doc["settings"]
    lines = [
        "## Flatness of the training loss",
        "",
        f"Cross-entropy (label smoothing {f['label_smoothing']:g}, BatchNorm in eval mode, "
        f"weight decay left out) on {f['images']} training images (seed {st['seed']}): "
        f"loss {_f(f['loss'])}.",
        "",
    ]
    body = []
    if "top_eigenvalue" in f:
        n = len(f["eigenvalue_history"])
        change = _f(f["eigenvalue_last_change"], ".2g")
        tol = f" of at most {st['hessian_iters']}" if st["hessian_tol"] else ""
        body.append(
            [
                f"top Hessian eigenvalue (power iteration, {n} iterations{tol})",
                f"{_f(f['top_eigenvalue'])} (last relative change {change})",
            ]
        )
    if "trace" in f:
        n = len(f["trace_samples"])
        body.append(
            [
                f"Hessian trace (Hutchinson, {n} Rademacher probes)",
                f"{_f(f['trace'])} ± {_f(f['trace_stderr'], '.2g')} (s.e.)",
            ]
        )
    if "landscape_1d" in f:
        r = st["landscape_radius"]
        body.append(
            [
                f"1-D landscape: mean loss rise at alpha = ±{r:g} (filter-normalised)",
                _f(f["landscape_1d"]["rise_at_radius"]),
            ]
        )
    lines += _table(["measure", "value"], body) + [""]
    lines += _image(doc, "eigenvalue_convergence", "power iteration")
    lines += _image(doc, "landscape_1d", "1-D loss landscape")
    return lines + _image(doc, "landscape_2d", "2-D loss landscape")
