"""The train state and the jitted, sharded train step of DNQ (and of every ablation).

One pure step: gather the batch from device-resident data, augment it, draw this step's
differential weight noise and activation drop-in from keys folded from the step number, take
the gradient at the noisy point and apply it to the latent (clean) weights. Steps are run in
chunks: `lax.scan` on GPU/TPU (one dispatch per chunk, no host round-trip per step) and an
unrolled body on CPU, where XLA runs conv steps inside a rolled loop many times slower.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dnq_jax import data, taps
from dnq_jax.dnq import noise
from dnq_jax.dnq.profiler import NoiseStats

PyTree = Any

# Sub-keys of the run's root key, one per purpose, so no two streams ever share a key.
KEY_WEIGHT_NOISE, KEY_ACT_NOISE, KEY_AUGMENT, KEY_SHUFFLE, KEY_INIT = 1, 2, 3, 4, 5


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue bit-exactly: checkpointed as one pytree."""

    step: jax.Array  # int32 global step
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    noise_stats: NoiseStats
    rng: jax.Array  # raw key data of the run's root key (jax.random.key_data)
    lam_scale: jax.Array  # float32, 1.0; halved by each rollback after a divergence

    def variables(self, params: PyTree | None = None) -> dict:
        v = {"params": self.params if params is None else params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def root_key(state: TrainState, impl: str) -> jax.Array:
    return jax.random.wrap_key_data(state.rng, impl=impl)


def sub_key(root: jax.Array, purpose: int) -> jax.Array:
    return jax.random.fold_in(root, purpose)


def step_keys(root: jax.Array, t) -> dict[str, jax.Array]:
    """The keys of step t: 'augment', 'act' = fold_in(sub_key(root, purpose), t) and the
    weight-noise pair 'w_t', 'w_prev' = noise.step_keys(sub_key(root, KEY_WEIGHT_NOISE), t).

    Computed as two batched fold_ins (`noise.per_key`), whose rows equal the separate
    calls: each separate fold_in is its own threefry computation for XLA to compile.
    """
    purposes = jnp.array([KEY_AUGMENT, KEY_ACT_NOISE, KEY_WEIGHT_NOISE], jnp.uint32)
    subs = noise.per_key(jax.random.fold_in, jnp.stack([root] * 3), purposes)
    t = jnp.asarray(t, jnp.int32)
    data = jnp.stack([t, t, t, t - 1]).astype(jnp.uint32)  # t - 1 wraps for t = 0, as there
    keys = noise.per_key(jax.random.fold_in, subs[jnp.array([0, 1, 2, 2])], data)
    return dict(zip(("augment", "act", "w_t", "w_prev"), keys))


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static (compile-time) settings of a train step."""

    weight_noise: str = "none"  # none | differential | naive | accumulate
    act_noise: bool = False
    rho: float = 0.5
    mask: str = "uniform"
    tau: float = 1.0
    label_smoothing: float = 0.0
    sam: bool = False
    pad: int = 0
    flip: bool = False
    prng_impl: str = "threefry2x32"
    debug_nan_step: int = -1


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()


def _max_abs(tree: PyTree) -> jax.Array:
    """max |x| over all float leaves; NaN if any entry is NaN, inf if any is infinite."""
    leaves = [
        x.ravel().astype(jnp.float32)
        for x in jax.tree_util.tree_leaves(tree)
        if x.size and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    # One reduction over the concatenation: a reduction per leaf is a separate kernel for
    # XLA to compile, and a model has dozens of leaves.
    return jnp.max(jnp.abs(jnp.concatenate(leaves))) if leaves else jnp.zeros([], jnp.float32)


def make_step(
    model: nn.Module,
    graph: taps.Graph,
    tx: optax.GradientTransformation,
    s: StepSettings,
    mean: jax.Array,
    std: jax.Array,
    dtype: Any = jnp.float32,
) -> Callable:
    """fn(state, images_u8, labels, idx_b, lam, noise_on) -> (state, metrics) for one step.

    `noise_on` is a Python bool (static): the warm-up compiles a step without any noise op.
    A step whose loss, gradients or new state are not finite reports `finite=False`; the
    state it returns is then poisoned and is to be discarded (the trainer stops or rolls
    back to the last checkpoint, which never holds such a state).
    """

    def step(state: TrainState, images_u8, labels, idx_b, lam, noise_on: bool):
        root = root_key(state, s.prng_impl)
        t = state.step
        x = images_u8[idx_b]
        y = labels[idx_b]
        keys = step_keys(root, t)
        if s.pad or s.flip:
            x = data.augment(keys["augment"], x, pad=s.pad, flip=s.flip)
        x = data.normalize(x, mean, std, dtype)
        if s.debug_nan_step >= 0:
            x = jnp.where(t == s.debug_nan_step, jnp.nan, x).astype(x.dtype)
        stats = state.noise_stats
        k_t, k_prev, act_key = keys["w_t"], keys["w_prev"], keys["act"]
        perturb_w = noise_on and s.weight_noise in ("differential", "naive")

        def loss_fn(params):
            p = params
            if perturb_w:
                p = noise.weight_noise(p, graph, stats, k_t, k_prev, lam, mode=s.weight_noise)
            ctx = contextlib.nullcontext()
            if noise_on and s.act_noise:
                fn = noise.activation_noise_fn(
                    graph, stats, act_key, lam, batch=x.shape[0], rho=s.rho, mask=s.mask, tau=s.tau
                )
                ctx = taps.map_inputs(fn)
            with ctx:
                logits, upd = model.apply(
                    state.variables(p), x, train=True, mutable=["batch_stats"]
                )
            loss = cross_entropy(logits, y, s.label_smoothing)
            return loss, (upd.get("batch_stats", {}), logits)

        (loss, (new_bs, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {}
        if s.sam:
            extra["grad_fn"] = lambda p, _: jax.grad(lambda q: loss_fn(q)[0])(p)
        updates, new_opt = tx.update(grads, state.opt_state, state.params, **extra)
        new_params = optax.apply_updates(state.params, updates)
        if noise_on and s.weight_noise == "accumulate":
            sample = noise.weight_sample(new_params, graph, stats, k_t, lam)
            new_params = jax.tree_util.tree_map(jnp.add, new_params, sample)
        # max |v| is NaN or inf exactly when some entry is; unlike a norm it cannot overflow.
        # Taken over the gradients and everything the step writes (params, BN statistics,
        # optimizer and SWA state), so whatever poisons them (SAM's second gradient, the
        # accumulate sample, an optimizer overflow) is seen. Reporting is all the step does:
        # holding the old state back with a select over every leaf made the compiled step
        # markedly larger, and the trainer never keeps a state past a non-finite step.
        written = (grads, new_params, new_bs, new_opt)
        finite = jnp.isfinite(loss) & jnp.isfinite(_max_abs(written))
        new_state = state.replace(
            step=t + 1, params=new_params, batch_stats=new_bs, opt_state=new_opt
        )
        metrics = {
            "loss": loss,
            "correct": jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.int32),
            "finite": finite,
        }
        return new_state, metrics

    return step


def make_chunk_fn(step: Callable, unroll: bool, shardings: dict | None = None) -> Callable:
    """jit(fn(state, images_u8, labels, idx (K, B), lam, noise_on) -> (state, metrics (K,))).

    The K steps run in one rolled `lax.scan` on GPU/TPU and as straight-line code on CPU
    (`unroll=True`), where XLA runs conv loops many times slower. The state
    argument is donated. `shardings` (optional) gives 'state', 'data', 'idx' NamedShardings.
    """

    def chunk(state, images_u8, labels, idx, lam, noise_on):
        body = lambda st, idx_b: step(st, images_u8, labels, idx_b, lam, noise_on)
        if not unroll:
            return jax.lax.scan(body, state, idx)
        # XLA:CPU runs convolutions inside any loop, even `scan(unroll=True)` of length 1,
        # about 10x slower than straight-line code, so on CPU the steps are traced one by one.
        outs = []
        for k in range(idx.shape[0]):
            state, m = body(state, idx[k])
            outs.append(m)
        return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    kwargs: dict = {"static_argnums": (5,), "donate_argnums": (0,)}
    if shardings is not None:
        kwargs["in_shardings"] = (
            shardings["state"],
            shardings["data"],
            shardings["data"],
            shardings["idx"],
            shardings["replicated"],
        )
        kwargs["out_shardings"] = (shardings["state"], shardings["replicated"])
    return jax.jit(chunk, **kwargs)
