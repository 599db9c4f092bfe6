"""The demo: plain SGD vs DNQ on Fashion-MNIST, same budget, then RTN PTQ of both.

  python -m dnq_jax.train.demo --workdir demo_out   (what `make demo` runs; also `dnq-demo`)

Trains a small CIFAR-style ResNet twice for the same short budget, once plainly and once with
DNQ (differential weight noise, activation drop-in, SWA), evaluates both at FP32, W8A8, W4A4
and W2A4 with round-to-nearest PTQ, prints one table, and writes results.json,
accuracy_vs_bits.png and training_curves.png under the workdir. The numbers are whatever the
run measures; with so short a budget they vary with the seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax

from dnq_jax.diagnostics import plots
from dnq_jax.train import config as config_lib
from dnq_jax.train import metrics
from dnq_jax.train.loop import train_and_evaluate

METHODS = ("sgd", "dnq")


def demo_config(method: str, epochs: int = 10):
    """The demo's budget: resnet8, batch 128, `epochs` epochs of 60 steps on Fashion-MNIST.

    Clean for the first third of the epochs, then noise with lambda ramped over the next third,
    SWA over the last three epochs.
    """
    c = config_lib.apply_method(config_lib.base_config(), method)
    c.model.name = "resnet8"
    c.data.name = "fashion_mnist"
    c.optim.batch_size = 128
    c.optim.steps_per_epoch = 60
    c.optim.num_epochs = epochs
    c.optim.learning_rate = 0.1
    c.optim.weight_decay = 5e-4
    c.noise.start_epoch = epochs // 3
    c.noise.ramp_epochs = max(1, epochs // 3)
    c.swa.start_epoch = max(0, epochs - 3)
    c.eval.bits = "w8a8,w4a4,w2a4"
    c.eval.every_epochs = 2
    c.eval.batch_size = 1000
    c.runtime.ckpt_every_epochs = 2
    c.lock()
    return c


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo_out")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = parser.parse_args(argv)
    out = Path(args.workdir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    print(f"dnq_jax demo on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    results, curves = {}, {}
    for method in METHODS:
        wd = out / method
        results[method] = train_and_evaluate(demo_config(method, args.epochs), str(wd))
        curves[method] = [r for r in metrics.read(wd) if "epoch" in r]
    keys = ["fp32"] + [f"w{w}a{a}" for w, a in config_lib.parse_bits(demo_config("sgd").eval.bits)]
    lines = [
        f"\nFashion-MNIST test top-1 (%), resnet8, {args.epochs} epochs, RTN PTQ",
        "precision   " + "".join(f"{m.upper():>9}" for m in METHODS) + "   DNQ-SGD",
    ]
    for k in keys:
        row = [results[m][k] for m in METHODS]
        lines.append(
            f"{k.upper():<11} " + "".join(f"{v:>9.2f}" for v in row) + f"   {row[1] - row[0]:+7.2f}"
        )
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "table.txt").write_text(table + "\n")
    plots.accuracy_vs_bits({m.upper(): results[m] for m in METHODS}, out / "accuracy_vs_bits.png")
    plots.training_curves({m.upper(): curves[m] for m in METHODS}, out / "training_curves.png")
    print(
        f"\nwall time {time.time() - t0:.0f} s; written under {out.resolve()}: table.txt, "
        "results.json, accuracy_vs_bits.png, training_curves.png, sgd/, dnq/"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
