"""Reconstruction PTQ of any Flax model: AdaRound, BRECQ and QDrop, block by block.

Each block (`blocks.find_blocks`: a layer for AdaRound, a residual block for BRECQ/QDrop) is
reconstructed in call order. Its inputs come from the model whose preceding blocks are
already quantized (with their learned rounding and step sizes); its target is the float
model's output of the block. Learned, per block:

- the rounding of every kernel (`rounding`, AdaRound's rectified sigmoid and regularizer
  with beta annealed 20 -> 2 after a 20% warm-up; Adam, lr 1e-3);
- BRECQ/QDrop: the step sizes of the block's activation quantizers (LSQ; Adam, lr 4e-5,
  cosine decay), and the output error is weighted by the Fisher diagonal ``(|g| + 1)^2``,
  ``g`` the gradient of the KL divergence between the float and the quantized model's
  outputs with respect to the block's output (BRECQ's choice);
- QDrop: each activation quantizer's output is replaced by its float input, per element and
  per iteration, with probability `drop_prob` (0.5). QDrop with ``drop_prob=0`` is BRECQ.

One iteration is one pure function of (rounding variables, step sizes, optimizer state,
iteration number) over the block's device-resident inputs and targets; a compiled call runs
`chunk` iterations: a `lax.scan` on GPU/TPU, straight-line code on XLA:CPU (where a loop
around a conv step runs many times slower). The batch of each iteration and the drop masks
come from ``fold_in(key, iteration)``, so results do not depend on the chunking.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from dnq_jax import backend, progress, quant, taps
from dnq_jax.ptq import block_problem, calibration, fold, rounding
from dnq_jax.ptq import blocks as blocks_lib
from dnq_jax.ptq.result import Calibrated, QuantizedModel

PyTree = Any


def _batched(fn: Callable, n: int, batch: int, *trees: PyTree) -> PyTree:
    """``fn`` over rows 0..n-1 of each tree's arrays, in equal padded batches (one compile);
    the outputs' real rows concatenated."""
    outs = []
    for idx in calibration.batch_indices(n, batch, pad=True):
        real = min(batch, n - int(idx[0]))
        got = fn(*[jax.tree.map(lambda a, idx=idx: a[idx], t) for t in trees])
        outs.append(jax.tree.map(lambda a, real=real: a[:real], got))
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)


class _Runner:
    """The whole model with any kernels, any activation ranges and activation quantization
    switched on per site, recording every block's inputs and output (and adding a
    perturbation to each block's output, for the Fisher weights). One compile serves the
    float model, the partly quantized ones and every block."""

    def __init__(self, cal: Calibrated, found: tuple[blocks_lib.Block, ...], n: int, batch: int):
        self.cal, self.found, self.n, self.batch = cal, found, n, batch
        self.capture = jax.jit(lambda *a: self._run(*a)[1])
        self.logits = jax.jit(lambda *a: self._run(*a)[0])
        # BRECQ's Fisher weights (|g| + 1)^2 of every block's output, in the compiled call.
        kl_grad = jax.grad(self._kl)
        self.fisher_weights = jax.jit(
            lambda *a: jax.tree.map(lambda g: (jnp.abs(g) + 1.0) ** 2, kl_grad(*a))
        )

    def _run(self, params, ranges, enabled, images, deltas=None):
        cal = self.cal
        model_vars, biases = fold.split_folded({**cal.variables, "params": params})
        bits = cal.bits_per_layer
        store: dict[str, Any] = {}

        def quant_input(name: str, x: jax.Array) -> jax.Array:
            xq = quant.fake_quant_asymmetric(x, *ranges[name], bits[name][1])
            return jnp.where(enabled[name], xq, x)

        def at_block(block, call, a, kw):
            out = call(*a, **kw)
            if deltas is not None:
                out = jax.tree.map(jnp.add, out, deltas[block.name])
            store[block.name] = (blocks_lib.inputs_of_call(a, kw), out)
            return out

        with fold.folded(biases, cal.bn_pairs), taps.map_inputs(quant_input, ranges):
            with blocks_lib.intercept_blocks(self.found, at_block):
                logits = cal.model.apply(model_vars, images, **cal.apply_kwargs)
        return logits, store

    def _kl(self, deltas, params, ranges, enabled, images, p_logits):
        logits = self._run(params, ranges, enabled, images, deltas)[0]
        log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32))
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q)) / images.shape[0]

    def enabled(self, quantized: Iterable[str]) -> dict[str, jax.Array]:
        on = frozenset(quantized)
        return {site: jnp.asarray(site in on) for site in self.cal.act_ranges}

    def block_data(self, block, params, ranges, enabled, images) -> tuple[list, PyTree]:
        """The block's (inputs, output) over all images."""
        fn = lambda x: self.capture(params, ranges, enabled, x)[block.name]
        return _batched(fn, self.n, self.batch, images)

    def fisher(self, block, params, ranges, enabled, images, p_logits, batch) -> PyTree:
        """BRECQ's Fisher weights ``(|g| + 1)^2`` of the block's output, ``g`` the gradient
        of the batch-mean KL(float || quantized) over batches of `batch` images."""
        batch = min(batch, self.n)
        shapes = jax.eval_shape(self.capture, params, ranges, enabled, images[:batch])
        zeros = {name: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out)
                 for name, (_, out) in shapes.items()}  # fmt: skip

        def fn(x, p):
            return self.fisher_weights(zeros, params, ranges, enabled, x, p)[block.name]

        return _batched(fn, self.n, batch, images, p_logits)


# Seconds between two loss readings shown on a block's progress bar.
LOSS_EVERY_S = 0.5


def _train_block(
    problem: block_problem.BlockProblem,
    data: dict,
    v: dict,
    act_scale: dict,
    act_zero: dict,
    key: jax.Array,
    bar,
) -> tuple[dict, dict, dict]:
    """Runs the block's iterations; returns the learned (rounding variables, step sizes) and
    timings: the first compiled call (compile included) and iterations/s after it."""
    s = problem.s
    n = int(jax.tree.leaves(data["target"])[0].shape[0])
    chunk = default_chunk(s)
    run = problem.make_chunk(n, not backend.scans())
    train = {"v": v, "s": dict(act_scale) if s.learn_act else {}}
    opt_state = problem.tx.init(train)
    done, t0, t_first, shown = 0, time.perf_counter(), None, 0.0
    while done < s.iters:
        length = min(chunk, s.iters - done)
        train, opt_state, losses = run(
            train, opt_state, jnp.int32(done), data, act_scale, act_zero, key, length=length
        )
        done += length
        if t_first is None:
            jax.block_until_ready(losses)
            t_first, done_first = time.perf_counter(), done
        if bar is not None:
            bar.update(length)
            # Reading a loss waits for its iteration (no call queued behind it): every
            # iteration, that stall cost the small blocks (stem, head) a fifth of their speed.
            if time.perf_counter() - shown >= LOSS_EVERY_S or done >= s.iters:
                rec, reg = (float(x) for x in losses[-1])
                bar.set_postfix(rec=f"{rec:.4g}", reg=f"{reg:.3g}")
                shown = time.perf_counter()
    jax.block_until_ready(train)
    t_end = time.perf_counter()
    rest = done - done_first
    timing = {
        "first_call_s": round(t_first - t0, 3),
        "iters_per_s": round(rest / (t_end - t_first), 2) if rest else None,
    }
    return train["v"], (train["s"] if s.learn_act else act_scale), timing


def default_chunk(settings: block_problem.ReconSettings) -> int:
    """Iterations per compiled call: `settings.chunk`, else 500 in a scan, 1 on CPU."""
    return settings.chunk or (500 if backend.scans() else 1)


def _block_data(
    runner: _Runner,
    index: int,
    params: PyTree,
    ranges: calibration.Ranges,
    images: jax.Array,
    fp_logits: jax.Array | None,
    settings: block_problem.ReconSettings,
) -> dict:
    """Block `index`'s inputs from the model quantized before it, its float output (the
    target) and, for BRECQ/QDrop, its Fisher weights in the model quantized up to and
    including it and float after it; all on the device."""
    found, cal = runner.found, runner.cal
    block = found[index]
    float_params = cal.variables["params"]
    inputs, _ = runner.block_data(block, params, ranges, runner.enabled(ranges), images)
    _, target = runner.block_data(block, float_params, ranges, runner.enabled(()), images)
    weight = None
    if settings.fisher:
        later = [cal.graph[site] for b in found[index + 1 :] for site in b.sites]
        mixed = taps.map_kernels(
            params, later, lambda layer, w: taps.get_kernel(float_params, layer)
        )
        upto = [site for b in found[: index + 1] for site in b.sites]
        weight = runner.fisher(
            block, mixed, ranges, runner.enabled(upto), images, fp_logits, settings.batch_size
        )
    return {"inputs": inputs, "target": target, "weight": weight}


def _reconstruct_block(
    problem: block_problem.BlockProblem,
    data: dict,
    ranges: calibration.Ranges,
    key: jax.Array,
    bar,
    calib_batch_size: int,
) -> tuple[dict, dict[str, tuple[jax.Array, jax.Array]], dict]:
    """Learns one block; returns its hard kernels ``{kernel name: kernel}``, its sites' new
    ranges, and its report: output error before and after, timings."""
    v, grid = problem.init_trainable(ranges)
    act_scale = {k: sz[0] for k, sz in grid.items()}
    act_zero = {k: sz[1] for k, sz in grid.items()}
    evaluate = problem.make_eval()
    n = int(jax.tree.leaves(data["target"])[0].shape[0])

    def error(v, scale) -> float:
        fn = lambda x, y: evaluate(v, scale, act_zero, x, y)
        return float(jnp.mean(_batched(fn, n, calib_batch_size, data["inputs"], data["target"])))

    before = error(v, act_scale)
    v, scale, timing = _train_block(problem, data, v, act_scale, act_zero, key, bar)
    after = error(v, scale)
    new_ranges = {}
    for site in problem.act_sites:
        lo, hi = rounding.range_of_grid(scale[site], act_zero[site], problem.a_bits[site])
        new_ranges[site] = (jnp.reshape(lo, ()), jnp.reshape(hi, ()))
    return (
        problem.hard_kernels(v),
        new_ranges,
        {"loss_before": before, "loss_after": after, **timing},
    )


def reconstruct(
    cal: Calibrated,
    rtn: QuantizedModel,
    calib_images: jax.Array,
    settings: block_problem.ReconSettings,
    *,
    blocks: Iterable[Any] | None = None,
    calib_batch_size: int = 128,
) -> QuantizedModel:
    """Reconstructs every block of the RTN-quantized model `rtn` in call order.

    Returns the `QuantizedModel` with learned rounding (and, for BRECQ/QDrop, learned step
    sizes); its ``.report`` holds the settings, the wall time and each block's mean output
    error (squared error summed over channels, hard rounding, no Fisher weight, all
    calibration images) before (RTN) and after.
    """
    t_start = time.time()
    lifted = [layer.name for layer in cal.graph.layers if layer.lifted]
    if lifted:
        raise ValueError(
            f"method: {settings.method!r} does not yet reach layers under a lifted transform "
            f"(nn.remat, nn.scan, nn.vmap): {lifted[:4]}; use method='rtn' for this model"
        )
    n = int(calib_images.shape[0])
    found = blocks_lib.find_blocks(
        cal.model,
        cal.variables,
        cal.graph,
        calib_images[: min(n, calib_batch_size)],
        paths=blocks,
        layerwise=settings.method == "adaround",
        apply_kwargs=cal.apply_kwargs,
    )
    key = jax.random.key(settings.seed)
    params = rtn.variables["params"]
    ranges = dict(rtn.act_ranges)
    runner = _Runner(cal, found, n, calib_batch_size)
    fp_logits = None
    if settings.fisher:
        off = runner.enabled(())
        fp = lambda x: runner.logits(cal.variables["params"], ranges, off, x)
        fp_logits = _batched(fp, n, calib_batch_size, calib_images)
    report_blocks = []
    for index, block in enumerate(found):
        t0 = time.time()
        problem = block_problem.BlockProblem(cal, block, settings)
        data = _block_data(runner, index, params, ranges, calib_images, fp_logits, settings)
        bar = _progress(settings, block, index, len(found))
        hard, new_ranges, block_report = _reconstruct_block(
            problem, data, ranges, jax.random.fold_in(key, index), bar, calib_batch_size
        )
        if bar is not None:
            bar.close()
        # The block's hard kernels and step sizes are what the following blocks see.
        learned = lambda layer, w, hard=hard: hard[block_problem.kernel_name(layer)]
        params = taps.map_kernels(params, problem.layers, learned)
        ranges.update(new_ranges)
        report_blocks.append(
            {
                "block": block.name,
                "layers": list(block.sites),
                **block_report,
                "time_s": round(time.time() - t0, 3),
            }
        )
    report = {
        "method": settings.method,
        "settings": {
            **dataclasses.asdict(settings),
            "chunk": default_chunk(settings),
            "num_calib": n,
        },
        "blocks": report_blocks,
        "time_s": round(time.time() - t_start, 3),
    }
    return cal.quantized(params, ranges, **report)


def _progress(s: block_problem.ReconSettings, block: blocks_lib.Block, index: int, total: int):
    if not s.progress:
        return None
    desc = f"{s.method} {index + 1}/{total} {block.name}"
    return progress.bar(s.iters, desc=desc, unit="it", leave=False)
