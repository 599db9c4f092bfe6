"""One block's reconstruction problem: constants, quantized forward, compiled iterations.

Used by `dnq_jax.ptq.reconstruct`, which documents the methods. A block's kernels get
AdaRound's learned rounding on their RTN grid (`rounding`); its Conv/Dense inputs are
fake-quantized with learnable step sizes (LSQ) and, for QDrop, randomly left in float.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dnq_jax import prng, taps
from dnq_jax.ptq import blocks as blocks_lib
from dnq_jax.ptq import calibration, fold, rounding
from dnq_jax.ptq.result import Calibrated

PyTree = Any

RECONSTRUCTION_METHODS = ("adaround", "brecq", "qdrop")


@dataclasses.dataclass(frozen=True)
class ReconSettings:
    """How a block is reconstructed (AdaRound, BRECQ, QDrop); build it with `for_method`,
    which gives the method's own defaults, those of the original papers.

    Attributes:
      method: 'adaround' (layer-wise, weights only), 'brecq' or 'qdrop' (block-wise, with
        learned activation step sizes and Fisher-weighted output error).
      iters: iterations per block (20,000 in the papers).
      batch_size: calibration images per iteration (32).
      lr: Adam learning rate of the rounding variables (1e-3).
      act_lr: Adam learning rate of the activation step sizes (4e-5), cosine-decayed.
      reg_weight: weight of the rounding regularizer (0.01).
      warmup: fraction of the iterations without the regularizer, beta held at its start.
      beta: the regularizer's beta, annealed from the first to the second value.
      drop_prob: QDrop's probability of replacing a quantized activation by its float value.
      fisher: weight the output error by the Fisher diagonal (BRECQ, QDrop).
      learn_act: learn the step sizes of the block's activation quantizers (BRECQ, QDrop).
      seed: seeds the batches and the drop masks.
      chunk: iterations per compiled call (None: 1 on CPU, 500 elsewhere).
      progress: show a progress bar per block.
    """

    method: str
    iters: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    act_lr: float = 4e-5
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.0
    fisher: bool = False
    learn_act: bool = False
    seed: int = 0
    chunk: int | None = None
    progress: bool = False

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> ReconSettings:
        """The method's defaults (QDrop: drop_prob 0.5), with `overrides` (None: default)."""
        if method not in RECONSTRUCTION_METHODS:
            raise ValueError(f"method must be one of {RECONSTRUCTION_METHODS}, got {method!r}")
        block_wise = method != "adaround"
        base = cls(
            method=method,
            drop_prob=0.5 if method == "qdrop" else 0.0,
            fisher=block_wise,
            learn_act=block_wise,
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown reconstruction option(s) {sorted(unknown)}")
        return dataclasses.replace(base, **overrides)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ValueError naming the first bad setting (the constructor calls it)."""
        if self.method not in RECONSTRUCTION_METHODS:
            methods = RECONSTRUCTION_METHODS
            raise ValueError(f"method must be one of {methods}, got {self.method!r}")
        calibration.check_positive_int(self.iters, "iters")
        calibration.check_positive_int(self.batch_size, "batch_size")
        if self.chunk is not None:
            calibration.check_positive_int(self.chunk, "chunk")
        for name in ("lr", "act_lr", "reg_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {self.drop_prob!r}")
        if len(self.beta) != 2 or min(self.beta) <= 0:
            raise ValueError(f"beta must be two positive numbers (start, end), got {self.beta!r}")


def kernel_name(layer: taps.Layer) -> str:
    """A layer's kernel as a string key: its path, with ``[i]`` for a slice of a stack."""
    name = "/".join(layer.path)
    return name + "".join(f"[{i}]" for i in layer.stack_index)


def rec_error(out: PyTree, target: PyTree, weight: PyTree | None) -> jax.Array:
    """Per-sample output error: squared error summed over channels (the last axis),
    averaged over the other axes; Fisher-weighted when `weight` is given."""

    def one(o, t, w):
        d = (o.astype(jnp.float32) - t.astype(jnp.float32)) ** 2
        if w is not None:
            d = d * w
        d = jnp.sum(d, axis=-1) if d.ndim > 1 else d
        return jnp.mean(d.reshape(d.shape[0], -1), axis=1)

    weights = jax.tree.leaves(weight) if weight is not None else [None] * len(jax.tree.leaves(out))
    errs = [one(o, t, w) for o, t, w in zip(jax.tree.leaves(out), jax.tree.leaves(target), weights)]
    return sum(errs)


class BlockProblem:
    """The reconstruction of one block: its constants, its forward and its compiled steps."""

    def __init__(self, cal: Calibrated, block: blocks_lib.Block, s: ReconSettings) -> None:
        self.cal, self.block, self.s = cal, block, s
        graph = cal.graph
        self.layers = tuple(graph[name] for name in block.sites)
        kbits = cal.kernel_bits()
        # One entry per kernel (a kernel shared by several sites of the block is learned once).
        first = {}
        for layer in self.layers:
            first.setdefault(kernel_name(layer), layer)
        self.bits = {k: kbits[layer.kernel_key] for k, layer in first.items()}
        self.act_sites = tuple(n for n in block.sites if cal.bits_per_layer[n][1] is not None)
        self.a_bits = {n: cal.bits_per_layer[n][1] for n in self.act_sites}
        model_vars, biases = fold.split_folded(cal.variables)
        self.variables = block.subtree(model_vars)
        self.biases = {n: b for n, b in biases.items() if n in block.sites}
        self.tx = optax.multi_transform(
            {
                "v": optax.adam(s.lr),
                "s": optax.adam(optax.cosine_decay_schedule(s.act_lr, s.iters)),
            },
            {"v": "v", "s": "s"},
        )
        float_params = cal.variables["params"]
        self.kernels = {k: taps.get_kernel(float_params, layer) for k, layer in first.items()}

        def grids(kernels):  # one compiled call per block, not a dozen small ones per kernel
            out = {}
            for k, w in kernels.items():
                lo, hi = calibration.kernel_range(
                    w, self.bits[k], cal.spec.w_calibrator, **cal.spec.calib_options
                )
                scale, zero = rounding.grid_of_range(lo, hi, self.bits[k])
                out[k] = (scale, zero, rounding.init_rounding(w, scale))
            return out

        self._grids = jax.jit(grids)
        got = self._grids(self.kernels)
        self.scales = {k: g[0] for k, g in got.items()}
        self.zeros = {k: g[1] for k, g in got.items()}
        self._hard = jax.jit(self._hard_kernels)

    def init_trainable(self, ranges: calibration.Ranges) -> tuple[dict, dict]:
        """(rounding variables, activation grid) at round-to-nearest and the given ranges."""
        # Fresh arrays on every call (the compiled chunk donates its inputs); no new compile.
        v = {k: g[2] for k, g in self._grids(self.kernels).items()}
        act = {}
        for n in self.act_sites:
            lo, hi = ranges[n]
            act[n] = rounding.grid_of_range(lo, hi, self.a_bits[n])
        return v, act

    def hard_kernels(self, v: dict) -> dict:
        """``{kernel name: kernel}`` with the hard rounding decisions of `v` (on the grid)."""
        return self._hard(v)

    def _hard_kernels(self, v: dict) -> dict:
        return {
            k: rounding.rounded_kernel(
                self.kernels[k], self.scales[k], self.zeros[k], self.bits[k], v[k], True
            )
            for k in self.kernels
        }

    def forward(
        self, v: dict, act_scale: dict, act_zero: dict, inputs: list, key, hard: bool, drop: float
    ) -> PyTree:
        """The block's quantized output: kernels with learned rounding (soft or hard), layer
        inputs fake-quantized with the step sizes `act_scale`, a fraction `drop` of them
        left in float (QDrop)."""
        kernels = {
            k: rounding.rounded_kernel(
                self.kernels[k], self.scales[k], self.zeros[k], self.bits[k], v[k], hard
            )
            for k in self.kernels
        }
        params = taps.map_kernels(
            self.variables["params"], self.layers, lambda layer, w: kernels[kernel_name(layer)]
        )
        variables = {**self.variables, "params": params}
        index = {n: i for i, n in enumerate(self.act_sites)}

        def quant_input(name: str, x: jax.Array, call):
            scale = jnp.maximum(act_scale[name], 1e-8)
            xq = rounding.lsq_fake_quant(x, scale, act_zero[name], self.a_bits[name])
            if drop > 0:
                k = jax.random.fold_in(key, index[name])
                xq = jnp.where(prng.bernoulli(k, x.shape, drop), x, xq)
            return call(xq)

        with fold.folded(self.biases, self.cal.bn_pairs):
            with taps.intercept_layers(quant_input, only=self.act_sites):
                return self.block.apply(variables, inputs)

    def make_chunk(self, n: int, on_cpu: bool) -> Callable:
        """A jitted ``(train, opt_state, t0, data, act_zero, key) -> (train, opt_state, losses)``
        running `length` iterations (static)."""
        s, tx = self.s, self.tx
        batch = min(s.batch_size, n)
        warm = s.warmup * s.iters

        def step(train, opt_state, t, data, act_const, act_zero, key):
            k_batch, k_drop = jax.random.split(jax.random.fold_in(key, t))
            idx = jax.random.choice(k_batch, n, (batch,), replace=False)
            x = [a[idx] for a in data["inputs"]]
            y = jax.tree.map(lambda a: a[idx], data["target"])
            w = None if data["weight"] is None else jax.tree.map(lambda a: a[idx], data["weight"])

            def loss_fn(train):
                act_scale = train["s"] if s.learn_act else act_const
                out = self.forward(train["v"], act_scale, act_zero, x, k_drop, False, s.drop_prob)
                rec = jnp.mean(rec_error(out, y, w))
                beta = rounding.beta_schedule(t, s.iters, s.warmup, *s.beta)
                reg = sum(rounding.rounding_penalty(v, beta) for v in train["v"].values())
                reg = jnp.where(t >= warm, s.reg_weight * reg, 0.0)
                return rec + reg, (rec, reg)

            grads, (rec, reg) = jax.grad(loss_fn, has_aux=True)(train)
            updates, opt_state = tx.update(grads, opt_state, train)
            return optax.apply_updates(train, updates), opt_state, jnp.stack([rec, reg])

        def chunk(train, opt_state, t0, data, act_const, act_zero, key, length):
            if on_cpu:
                losses = []
                for i in range(length):
                    train, opt_state, m = step(
                        train, opt_state, t0 + i, data, act_const, act_zero, key
                    )
                    losses.append(m)
                return train, opt_state, jnp.stack(losses)

            def body(carry, t):
                train, opt_state = carry
                train, opt_state, m = step(train, opt_state, t, data, act_const, act_zero, key)
                return (train, opt_state), m

            (train, opt_state), losses = jax.lax.scan(
                body, (train, opt_state), t0 + jnp.arange(length)
            )
            return train, opt_state, losses

        return jax.jit(chunk, static_argnames="length", donate_argnums=(0, 1))

    def make_eval(self) -> Callable:
        """Jitted per-sample plain output error (no Fisher weight) with hard rounding."""

        def err(v, act_scale, act_zero, inputs, target):
            out = self.forward(v, act_scale, act_zero, inputs, None, True, 0.0)
            return rec_error(out, target, None)

        return jax.jit(err)
