"""Speed of the DNQ train step against a plain Flax train step, measured in the same run.

  python benchmarks/train_speed.py                       # ResNet-20, B=128, fp32
  python benchmarks/train_speed.py --dtype bfloat16 --batch 512 --epoch --breakdown

Prints ms/step and images/s of both steps (same model, batch, data pipeline: device-resident
uint8 CIFAR-shaped data, gather, crop+flip, normalise), their ratio, the compile times and
their ratio, the profiler's cost as a fraction of an epoch, and (with --epoch) the time of a
50,000-image epoch of the trainer with DNQ on and without noise (scanned on GPU/TPU; on CPU,
where the trainer makes one jitted call per step, estimated from --steps calls); with
--breakdown also the step with its noise off and with each kind of noise alone. The last line is
`ratio dnq/plain: R`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dnq_jax import data, models, taps  # noqa: E402
from dnq_jax.dnq import profiler  # noqa: E402
from dnq_jax.ptq import QuantSpec  # noqa: E402
from dnq_jax.train import builders, optim  # noqa: E402
from dnq_jax.train.state import TrainState  # noqa: E402
from dnq_jax.train.step import StepSettings, make_chunk_fn, make_train_step  # noqa: E402


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def plain_flax_step(model, tx, mean, std, dtype):
    """The baseline: what a plain Flax CIFAR trainer's step does, nothing more."""

    def step(params, batch_stats, opt_state, t, images, labels, idx, key):
        # A fresh augmentation key per step, as a trainer must draw (Flax's examples fold
        # the step into their dropout key the same way).
        x = data.augment(jax.random.fold_in(key, t), images[idx], pad=4, flip=True)
        x = data.normalize(x, mean, std, dtype)
        y = labels[idx]

        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            onehot = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), 0.1)
            return optax.softmax_cross_entropy(logits, onehot).mean(), upd["batch_stats"]

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), bs, opt_state, t + 1, loss

    return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def compile_times(lowerers: dict, repeats: int) -> dict:
    """name -> (best seconds to trace, lower and compile, the compiled function).

    Each run clears the in-memory caches (the persistent cache is off), so every run
    compiles from scratch. The functions take turns, `repeats` rounds, so a change in the
    machine's load reaches all of them alike; the minimum is the least disturbed run.
    """
    best, compiled = dict.fromkeys(lowerers, float("inf")), {}
    for _ in range(repeats):
        for name, lower in lowerers.items():
            jax.clear_caches()
            t0 = time.perf_counter()
            compiled[name] = lower().compile()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], compiled[name]) for name in lowerers}


def time_steps(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    _block(out)
    return (time.perf_counter() - t0) / n


def jit_dnq_step(step, noise_on=True):
    """The DNQ step, one jitted call per step; the data are arguments, as in the plain step
    (a closed-over array would be embedded in the program as a constant and inflate the
    compile time)."""
    return jax.jit(lambda s, im, lb, ix, lam: step(s, im, lb, ix, lam, noise_on), donate_argnums=0)


def time_dnq_step(fn, st, images, labels, idx, lam, steps):
    """(ms/step, [final state]) of the compiled DNQ step `fn`, starting from state `st`."""
    box = [st]

    def run():
        box[0], _ = fn(box[0], images, labels, idx, lam)
        return box[0].params

    run()
    return 1e3 * time_steps(run, steps), box


def time_epochs(step, box, images, labels, key, lam, n, b, cpu_steps):
    """The trainer's epoch, without and with noise: one scanned call of all its steps on
    GPU/TPU; on CPU, where the trainer calls a jitted one-step chunk per step, `cpu_steps`
    such calls timed and scaled to the epoch."""
    spe = n // b
    cpu = jax.default_backend() == "cpu"
    sh = builders.shardings(builders.make_mesh(1))
    chunk = make_chunk_fn(step, scan=not cpu, shardings=sh)
    all_idx = jax.jit(lambda k: data.epoch_indices(k, n, b), out_shardings=sh["idx"])(key)
    # Placed as the trainer places it: a state with other shardings would make the first
    # calls compile again.
    box[0] = jax.device_put(box[0], sh["state"])
    for noise_on in (False, True):
        name = "dnq" if noise_on else "no-noise"
        if cpu:
            rows = [all_idx[k % spe : k % spe + 1] for k in range(cpu_steps + 1)]
            box[0], _ = _block(chunk(box[0], images, labels, rows[0], lam, noise_on))
            t0 = time.perf_counter()
            for row in rows[1:]:
                box[0], _ = chunk(box[0], images, labels, row, lam, noise_on)
            _block(box[0])
            per_step = (time.perf_counter() - t0) / cpu_steps
            print(
                f"epoch ({name}, {spe} one-step calls): {per_step * spe:.1f} s "
                f"(from {cpu_steps} calls)"
            )
            continue
        t0 = time.perf_counter()
        box[0], _ = _block(chunk(box[0], images, labels, all_idx, lam, noise_on))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        box[0], _ = _block(chunk(box[0], images, labels, all_idx, lam, noise_on))
        print(
            f"scanned epoch ({name}, {spe} steps): {time.perf_counter() - t0:.3f} s "
            f"(first call {first:.1f} s)"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--num-train", type=int, default=50000)
    ap.add_argument(
        "--epoch", action="store_true", help="also time the trainer's epoch (scanned on GPU/TPU)"
    )
    ap.add_argument("--compile-repeats", type=int, default=3, help="compiles timed per step")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the step with its noise off, and with only the weight noise or only "
        "the drop-in",
    )
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"model {args.model}, batch {args.batch}, {args.dtype}")
    rng = np.random.default_rng(0)
    n = args.num_train
    images = jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    mean, std = jnp.full((3,), 0.5), jnp.full((3,), 0.25)
    model = models.create(args.model, num_classes=10, dtype=dtype)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.key(0)
    )
    graph = taps.trace(model, variables, jnp.zeros((2, 32, 32, 3)), train=False)
    spe = n // args.batch
    tx = optim.make_optimizer(
        learning_rate=0.05,
        total_steps=spe * 10,
        steps_per_epoch=spe,
        weight_decay=5e-4,
        swa_start_epoch=5,
    )
    idx = jnp.asarray(rng.permutation(n)[: args.batch].astype(np.int32))

    key = jax.random.key(1)
    lam = jnp.float32(0.5)
    plain = plain_flax_step(model, tx, mean, std, dtype)
    # Copies: the plain step donates its inputs, and `variables` is used again below.
    p, bs = jax.tree_util.tree_map(jnp.copy, (variables["params"], variables["batch_stats"]))
    plain_state = [p, bs, tx.init(p), jnp.zeros([], jnp.int32)]

    # DNQ step: differential weight noise + activation drop-in, one jitted step per call.
    settings = StepSettings(
        weight_noise="differential",
        act_noise=True,
        label_smoothing=0.1,
        pad=4,
        flip=True,
    )
    step = make_train_step(model, graph, tx, settings, mean, std, dtype)
    measure = jax.jit(profiler.make_profiler(model, graph, QuantSpec(w_bits=2, a_bits=4)))
    calib = data.normalize(images[:100], mean, std)
    t0 = time.perf_counter()
    stats = _block(measure(variables, calib))
    prof_compile = time.perf_counter() - t0
    prof_ms = 1e3 * time_steps(lambda: measure(variables, calib), 5)
    st = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        noise_stats=stats,
        rng=jax.random.key_data(jax.random.key(0)),
        lam_scale=jnp.ones([], jnp.float32),
    )
    # Copies: each timed step donates its state, and `st` is used again by --breakdown.
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, st)
    dnq_args = (images, labels, idx, lam)
    compiled = compile_times(
        {
            "plain": lambda: plain.lower(*plain_state, images, labels, idx, key),
            "dnq": lambda: jit_dnq_step(step).lower(st, *dnq_args),
        },
        args.compile_repeats,
    )
    plain_compile, plain = compiled["plain"]
    dnq_compile, dnq_fn = compiled["dnq"]

    def run_plain():
        plain_state[:] = plain(*plain_state, images, labels, idx, key)[:4]
        return plain_state[0]

    run_plain()
    plain_ms = 1e3 * time_steps(run_plain, args.steps)
    dnq_ms, box = time_dnq_step(dnq_fn, fresh(), *dnq_args, args.steps)
    ratio = dnq_ms / plain_ms
    epoch_ms = dnq_ms * spe
    b = args.batch
    print(f"{'step':<9}{'ms/step':>10}{'img/s':>10}{'compile s':>11}")
    row = lambda name, ms, comp: f"{name:<9}{ms:>10.2f}{1e3 * b / ms:>10.0f}{comp:>11.2f}"
    print(row("plain", plain_ms, plain_compile))
    print(row("dnq", dnq_ms, dnq_compile))
    if args.breakdown:
        # The trainer's step with its noise off (what the warm-up runs: step keys, metrics,
        # the finiteness check), then with each kind of noise alone.
        parts = {
            "no-noise": (settings, False),
            "w-noise": (dataclasses.replace(settings, act_noise=False), True),
            "drop-in": (dataclasses.replace(settings, weight_noise="none"), True),
        }
        for name, (kw, on) in parts.items():
            jitted = jit_dnq_step(make_train_step(model, graph, tx, kw, mean, std, dtype), on)
            lower = lambda f=jitted: f.lower(st, *dnq_args)
            comp, fn = compile_times({name: lower}, 1)[name]
            ms, _ = time_dnq_step(fn, fresh(), *dnq_args, args.steps)
            print(f"{row(name, ms, comp)}   (x{ms / plain_ms:.2f} of plain)")
    print(f"compile ratio dnq/plain: {dnq_compile / plain_compile:.2f}")
    print(
        f"profiler: {prof_ms:.1f} ms per call (compile {prof_compile:.1f} s) = "
        f"{100 * prof_ms / epoch_ms:.2f}% of a {spe}-step epoch"
    )
    if args.epoch:
        time_epochs(step, box, images, labels, key, lam, n, b, args.steps)
    print(f"ratio dnq/plain: {ratio:.2f}")


if __name__ == "__main__":
    main()
