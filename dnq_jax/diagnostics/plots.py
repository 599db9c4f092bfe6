"""PNG plots (matplotlib, Agg: files only): accuracy against bit-width per model, training
curves from metrics.jsonl, and the diagnostics: error histograms with their fitted Gaussian,
the per-layer output-error decomposition, loss landscapes and power-iteration convergence."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # plotting needs no jax: the results are read through their attributes
    from dnq_jax.diagnostics.error_stats import ErrorStats
    from dnq_jax.diagnostics.landscape import Landscape


def _save(fig, path: str | os.PathLike) -> Path:
    """Lays out, writes (PNG, 120 dpi) and closes `fig`; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_bits(
    results: Mapping[str, Mapping[str, float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """One line per model: top-1 at FP32 and each wXaY precision (x axis in table order)."""
    plt = _pyplot()
    first = next(iter(results.values()))
    keys = ["fp32"] + [k for k in first if k.startswith("w") and k[1:2].isdigit()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        ys = [res.get(k, float("nan")) for k in keys]
        ax.plot(range(len(keys)), ys, marker="o", label=name)
        for i, y in enumerate(ys):
            if not np.isfinite(y):  # a precision this model was not evaluated at
                continue
            ax.annotate(
                f"{y:.1f}",
                (i, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    ax.set_xticks(range(len(keys)), [k.upper() for k in keys])
    ax.set_xlabel("precision (RTN PTQ)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "Accuracy after post-training quantization")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def training_curves(
    runs: Mapping[str, Sequence[Mapping]],
    path: str | os.PathLike,
    title: str = "",
    show_lambda: bool | None = None,
) -> Path:
    """Train loss, top-1 (test FP32 solid, train dashed where logged) and lambda per epoch for
    each run (rows of metrics.jsonl). `show_lambda` None: the lambda panel is drawn when some
    run has a nonzero lambda (a run with noise)."""
    plt = _pyplot()
    if show_lambda is None:
        show_lambda = any(r.get("lambda", 0.0) for rows in runs.values() for r in rows)
    panels = 3 if show_lambda else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.4 * panels, 3.6))
    for i, (name, rows) in enumerate(runs.items()):
        color = f"C{i % 10}"
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_loss"] for r in rows], color=color, label=name)
        acc = [(r["epoch"], r["test_acc"]) for r in rows if "test_acc" in r]
        if acc:
            axes[1].plot(*zip(*acc), marker=".", color=color, label=f"{name} test")
        train = [(r["epoch"], r["train_acc"]) for r in rows if "train_acc" in r]
        if train:
            axes[1].plot(*zip(*train), ls="--", color=color, label=f"{name} train")
        if show_lambda:
            axes[2].plot(ep, [r.get("lambda", 0.0) for r in rows], color=color, label=name)
    labels = ("train loss", "top-1 (%)", "noise lambda")[:panels]
    for ax, label in zip(axes, labels):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def error_histograms(
    stats: Mapping[str, ErrorStats],
    path: str | os.PathLike,
    layers: Sequence[str] | None = None,
    title: str = "",
    cols: int = 4,
) -> Path:
    """One panel per layer: the error histogram as a density, with N(mean, std^2) overlaid.

    `stats` maps layer names to `ErrorStats` (e.g. from `weight_error_stats`); `layers`
    selects and orders the panels (default all). Each panel's legend gives the KS distance
    and the excess kurtosis.
    """
    plt = _pyplot()
    names = list(stats) if layers is None else list(layers)
    if not names:
        raise ValueError("stats: no layers to plot")
    cols = max(1, min(cols, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        s = stats[name]
        edges = np.asarray(s.edges, np.float64)
        ax.stairs(np.asarray(s.density(), np.float64), edges, fill=True, alpha=0.5)
        mean, std = float(s.mean), max(float(s.std), 1e-30)
        t = np.linspace(edges[0], edges[-1], 200)
        pdf = np.exp(-0.5 * ((t - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
        label = f"KS {float(s.ks):.3f}\nkurt {float(s.kurtosis):+.2f}"
        ax.plot(t, pdf, color="C3", lw=1.2, label=label)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def error_decomposition(
    decomposition: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str = "",
    log: bool = True,
) -> Path:
    """Grouped bars per layer: activation, weight and cross terms of the output error,
    relative to ||y||^2 (from `output_error_decomposition`), on a log axis by default."""
    plt = _pyplot()
    names = list(decomposition)
    if not names:
        raise ValueError("decomposition: no layers to plot")
    terms = ("activation", "weight", "cross")
    x = np.arange(len(names))
    width = 0.8 / len(terms)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    for i, term in enumerate(terms):
        ys = [decomposition[n][term] for n in names]
        ax.bar(x + (i - 1) * width, ys, width, label=term)
    ax.set_xticks(x, names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("E||term||^2 / E||y||^2")
    if log:
        ax.set_yscale("log")
    ax.set_title(title or "Output error of each quantized layer")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, path)


def landscape_1d(
    landscapes: Mapping[str, Landscape], path: str | os.PathLike, title: str = ""
) -> Path:
    """One line per model: loss against alpha along its filter-normalised direction."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, land in landscapes.items():
        ax.plot(land.alphas, land.losses, marker=".", label=name)
    ax.set_xlabel("alpha (filter-normalised direction)")
    ax.set_ylabel("loss")
    ax.set_title(title or "1-D loss landscape")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def landscape_2d(
    landscape: Landscape, path: str | os.PathLike, title: str = "", levels: int = 20
) -> Path:
    """Contour plot of a 2-D landscape (alpha on x, beta on y), params at the origin."""
    if landscape.betas is None:
        raise ValueError("landscape: a 2-D landscape is needed (betas is None)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    cs = ax.contour(a, b, landscape.losses, levels=levels, cmap="viridis")
    ax.clabel(cs, fontsize=6)
    ax.plot([0], [0], marker="*", color="C3")
    ax.set_xlabel("alpha")
    ax.set_ylabel("beta")
    ax.set_title(title or "2-D loss landscape")
    return _save(fig, path)


def eigenvalue_convergence(
    histories: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Power-iteration estimate of the top Hessian eigenvalue against iteration, per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, hist in histories.items():
        ax.plot(np.arange(1, len(hist) + 1), hist, marker=".", label=name)
    ax.set_xlabel("power iteration")
    ax.set_ylabel("top Hessian eigenvalue estimate")
    ax.set_title(title or "Power iteration")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def setting_bars(summary: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars of an experiment grid: one group per (PTQ method, precision), FP32 first,
    one bar per setting at its mean top-1 with the sample std over seeds as an error bar.

    `summary`: rows with keys setting, ptq, precision, mean, std (None: one seed), n, as
    `dnq_jax.grid.report.summarize` returns them.
    """
    plt = _pyplot()
    settings = list(dict.fromkeys(r["setting"] for r in summary))
    groups = list(dict.fromkeys((r["ptq"], r["precision"]) for r in summary))
    cell = {(r["setting"], r["ptq"], r["precision"]): r for r in summary}
    width = 0.8 / max(1, len(settings))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4))
    for i, s in enumerate(settings):
        xs, ys, errs = [], [], []
        for g, (method, precision) in enumerate(groups):
            r = cell.get((s, method, precision))
            if r is not None:
                xs.append(g + (i - (len(settings) - 1) / 2) * width)
                ys.append(r["mean"])
                errs.append(r["std"] or 0.0)
        n = max((r["n"] for r in summary if r["setting"] == s), default=0)
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=2, label=f"{s} (seeds: {n})")
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    labels = ["FP32" if p == "fp32" else f"{m.upper()}\n{p.upper()}" for m, p in groups]
    ax.set_xticks(range(len(groups)), labels)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "Top-1 per setting: mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
