"""Speed of reconstruction PTQ (AdaRound, BRECQ, QDrop) per block, against a plain Flax step.

  python benchmarks/ptq_speed.py                          # ResNet-20, 1024 images, CPU-sized
  python benchmarks/ptq_speed.py --iters 2000 --methods qdrop     # on a GPU

Runs each method on a randomly initialised model (speed does not depend on the weights) with
`--iters` iterations per block and prints, per block, the iterations per second after the
first compiled call and that call's time (compile included); then, per method, the projected
wall time of the papers' full run (`--full-iters` = 20,000 iterations per block, plus the
measured compile, capture and evaluation time), and the ratio of one iteration over every
block to one plain Flax train step of the whole model at the same batch, measured in the same
run. The last line is `ratio recon/plain: R` for the last method.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import optax  # noqa: E402

from dnq_jax import models, ptq  # noqa: E402


def plain_step_ms(model, variables, images, labels, steps: int) -> float:
    """ms per plain Flax SGD train step of the whole model on `images` (one batch)."""
    tx = optax.sgd(0.01, momentum=0.9)

    @jax.jit
    def step(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (_, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), upd["batch_stats"], opt_state

    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    state = jax.block_until_ready(step(*state, images, labels))
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(*state, images, labels)
    jax.block_until_ready(state)
    return 1000 * (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--methods", default="adaround,brecq,qdrop")
    p.add_argument("--n-calib", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=None, help="default: 20 on CPU, 2000 elsewhere")
    p.add_argument("--full-iters", type=int, default=20_000)
    p.add_argument("--w-bits", type=int, default=2)
    p.add_argument("--a-bits", type=int, default=4)
    args = p.parse_args(argv)
    on_cpu = jax.default_backend() == "cpu"
    iters = args.iters or (20 if on_cpu else 2000)
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    print(f"{args.model}, {args.n_calib} calibration images, batch {args.batch}, "
          f"W{args.w_bits}A{args.a_bits}, {iters} iterations per block")  # fmt: skip

    model = models.create(args.model, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (args.n_calib, 32, 32, 3))
    variables = jax.jit(lambda: model.init(jax.random.key(1), x[:1]))()
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    plain = plain_step_ms(model, variables, x[: args.batch], labels, steps=5 if on_cpu else 50)
    print(f"plain Flax train step (whole model, batch {args.batch}): {plain:.2f} ms")

    ratio = float("nan")
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        qm = ptq.quantize(
            model, variables, x, ptq.QuantSpec(w_bits=args.w_bits, a_bits=args.a_bits),
            method=method, recon={"iters": iters, "batch_size": args.batch},
            apply_kwargs={"train": False},
        )  # fmt: skip
        wall = time.perf_counter() - t0
        blocks = qm.report["blocks"]
        print(f"\n{method}: {len(blocks)} blocks, {wall:.1f} s in all")
        print(f"{'block':<18} {'it/s':>9} {'first call s':>13}")
        per_iter_s, overhead = 0.0, wall
        for b in blocks:
            rate = b["iters_per_s"]
            shown = rate if rate else float("nan")
            print(f"{b['block']:<18} {shown:>9.1f} {b['first_call_s']:>13.2f}")
            if rate:
                per_iter_s += 1.0 / rate
                overhead -= (iters - 1) / rate
        full = overhead + args.full_iters * per_iter_s
        ratio = 1000 * per_iter_s / plain
        print(f"one iteration over all blocks: {1000 * per_iter_s:.2f} ms "
              f"= {ratio:.2f} plain steps")  # fmt: skip
        print(f"projected full {method} ({args.full_iters} iterations per block): "
              f"{full / 60:.1f} min (overhead {overhead:.1f} s)")  # fmt: skip
    print(f"ratio recon/plain: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
