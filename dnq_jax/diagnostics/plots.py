"""PNG plots: accuracy against bit-width per model, and training curves from metrics.jsonl."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path


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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def training_curves(
    runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Train loss, test accuracy and lambda per epoch for each run (rows of metrics.jsonl)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, rows in runs.items():
        ep = [r["epoch"] for r in rows]
        axes[0].plot(ep, [r["train_loss"] for r in rows], label=name)
        acc = [(r["epoch"], r["test_acc"]) for r in rows if "test_acc" in r]
        if acc:
            axes[1].plot(*zip(*acc), marker=".", label=name)
        axes[2].plot(ep, [r.get("lambda", 0.0) for r in rows], label=name)
    for ax, label in zip(axes, ("train loss", "test top-1 FP32 (%)", "noise lambda")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
