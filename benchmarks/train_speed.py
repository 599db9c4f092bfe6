"""Speed of the DNQ train step against a plain Flax train step, measured in the same run.

  python benchmarks/train_speed.py                       # ResNet-20, B=128, fp32
  python benchmarks/train_speed.py --dtype bfloat16 --batch 512 --epoch --breakdown

Prints ms/step and images/s of both steps (same model, batch, data pipeline: device-resident
uint8 CIFAR-shaped data, gather, crop+flip, normalise), their ratio, the compile times and
their ratio, the profiler's cost as a fraction of an epoch, and (with --epoch) the time of a
50,000-image epoch of the trainer with DNQ on and without noise (scanned on GPU/TPU; on CPU,
where the trainer makes one jitted call per step, estimated from --steps calls); with
--breakdown also steps with only the weight noise and only the drop-in. The last line is
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

from dnq_jax import data, models, optim, runtime, taps  # noqa: E402
from dnq_jax.dnq import profiler  # noqa: E402
from dnq_jax.step import StepSettings, TrainState, make_chunk_fn, make_step  # noqa: E402


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def plain_flax_step(model, tx, mean, std, dtype):
    """The baseline: what a plain Flax CIFAR trainer's step does, nothing more."""

    def step(params, batch_stats, opt_state, images, labels, idx, key):
        x = data.augment(key, images[idx], pad=4, flip=True)
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
        return optax.apply_updates(params, upd), bs, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def compile_time(lower, repeats):
    """(best seconds to trace, lower and compile, the compiled function) over `repeats` runs.

    The in-memory caches are cleared before each run and the persistent cache is off, so
    every run compiles from scratch; the minimum is the least disturbed by other load.
    """
    best, compiled = float("inf"), None
    for _ in range(repeats):
        jax.clear_caches()
        t0 = time.perf_counter()
        compiled = lower().compile()
        best = min(best, time.perf_counter() - t0)
    return best, compiled


def time_steps(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    _block(out)
    return (time.perf_counter() - t0) / n


def time_dnq_step(step, st, images, labels, idx, lam, steps, repeats):
    """(ms/step, compile s, [final state]) of `step` with noise on, one jitted call per step."""
    # The data are arguments, as in the plain step: a closed-over array would be embedded in
    # the program as a constant and inflate the compile time.
    fn = jax.jit(lambda s, im, lb, ix, lam: step(s, im, lb, ix, lam, True), donate_argnums=0)
    compile_s, fn = compile_time(lambda: fn.lower(st, images, labels, idx, lam), repeats)
    box = [st]

    def run():
        box[0], _ = fn(box[0], images, labels, idx, lam)
        return box[0].params

    run()
    return 1e3 * time_steps(run, steps), compile_s, box


def time_epochs(step, box, images, labels, key, lam, n, b, cpu_steps):
    """The trainer's epoch, without and with noise: one scanned call of all its steps on
    GPU/TPU; on CPU, where the trainer calls a jitted one-step chunk per step, `cpu_steps`
    such calls timed and scaled to the epoch."""
    spe = n // b
    cpu = runtime.is_cpu()
    sh = runtime.shardings(runtime.make_mesh(1))
    chunk = make_chunk_fn(step, unroll=cpu, shardings=sh)
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
    ap.add_argument("--prng-impl", default="threefry2x32")
    ap.add_argument("--compile-repeats", type=int, default=3, help="compiles timed per step")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time steps with only the weight noise and only the drop-in",
    )
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    )
    print(f"model {args.model}, batch {args.batch}, {args.dtype}, prng {args.prng_impl}")
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

    # Plain Flax step.
    plain = plain_flax_step(model, tx, mean, std, dtype)
    # Copies: the plain step donates its inputs, and `variables` is used again below.
    p, bs = jax.tree_util.tree_map(jnp.copy, (variables["params"], variables["batch_stats"]))
    os_ = tx.init(p)
    key = jax.random.key(1)
    plain_compile, plain = compile_time(
        lambda: plain.lower(p, bs, os_, images, labels, idx, key), args.compile_repeats
    )
    state = [p, bs, os_]

    def run_plain():
        state[:3] = plain(*state, images, labels, idx, key)[:3]
        return state[0]

    run_plain()
    plain_ms = 1e3 * time_steps(run_plain, args.steps)

    # DNQ step: differential weight noise + activation drop-in, one jitted step per call.
    settings = StepSettings(
        weight_noise="differential",
        act_noise=True,
        label_smoothing=0.1,
        pad=4,
        flip=True,
        prng_impl=args.prng_impl,
    )
    step = make_step(model, graph, tx, settings, mean, std, dtype)
    measure = jax.jit(profiler.make_profiler(model, graph, w_bits=2, a_bits=4))
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
        rng=jax.random.key_data(jax.random.key(0, impl=args.prng_impl)),
        lam_scale=jnp.ones([], jnp.float32),
    )
    lam = jnp.float32(0.5)
    # Copies: each timed step donates its state, and `st` is used again by --breakdown.
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, st)
    dnq_ms, dnq_compile, box = time_dnq_step(
        step, fresh(), images, labels, idx, lam, args.steps, args.compile_repeats
    )
    ratio = dnq_ms / plain_ms
    epoch_ms = dnq_ms * spe
    b = args.batch
    print(f"{'step':<8}{'ms/step':>10}{'img/s':>10}{'compile s':>11}")
    print(f"{'plain':<8}{plain_ms:>10.2f}{1e3 * b / plain_ms:>10.0f}{plain_compile:>11.2f}")
    print(f"{'dnq':<8}{dnq_ms:>10.2f}{1e3 * b / dnq_ms:>10.0f}{dnq_compile:>11.2f}")
    if args.breakdown:
        parts = {
            "w-noise": dict(weight_noise="differential", act_noise=False),
            "drop-in": dict(weight_noise="none", act_noise=True),
        }
        for name, kw in parts.items():
            part = make_step(
                model, graph, tx, dataclasses.replace(settings, **kw), mean, std, dtype
            )
            ms, comp, _ = time_dnq_step(part, fresh(), images, labels, idx, lam, args.steps, 1)
            print(
                f"{name:<8}{ms:>10.2f}{1e3 * b / ms:>10.0f}{comp:>11.2f}"
                f"   (x{ms / plain_ms:.2f} of plain)"
            )
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
