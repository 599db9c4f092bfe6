"""The jitted, sharded train step of DNQ (and of every ablation), and chunks of steps.

One pure step: gather the batch from device-resident data (or take the streamed batch as it
comes), augment it, draw this step's
differential weight noise and activation drop-in from keys folded from the step number, take
the gradient at the noisy point and apply it to the latent (clean) weights. Steps run in
chunks: `lax.scan` on GPU/TPU (one dispatch per chunk) and straight-line code on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dnq_jax import data, taps
from dnq_jax.dnq import noise
from dnq_jax.train.state import (
    KEY_ACT_NOISE,
    KEY_AUGMENT,
    KEY_WEIGHT_NOISE,
    TrainState,
    root_key,
    sub_key,
)

PyTree = Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static (compile-time) settings of a train step."""

    weight_noise: str = "none"  # none | differential | naive | accumulate
    w_scale: float = 1.0  # the weight perturbation's scale relative to lambda
    act_noise: bool = False
    rho: float = 0.5
    mask: str = "uniform"
    tau: float = 1.0
    dist: str = "gaussian"  # law of the samples: gaussian | uniform (same mean, variance)
    act_sites: str = "inputs"  # inputs (every Conv/Dense input) | relu (ReLU outputs only)
    # The last step of each noise epoch applies its update to the perturbed weights, so
    # that step's perturbation stays in the stored weights (the authors' in-place noise).
    leftover: bool = False
    steps_per_epoch: int = 0  # needed by `leftover` only
    label_smoothing: float = 0.0
    sam: bool = False
    pad: int = 0
    flip: bool = False

    @classmethod
    def from_config(
        cls, c, dataset_name: str, steps_per_epoch: int = 0, image_size: int | None = None
    ) -> StepSettings:
        """The step of config `c`; `image_size`: the side of the images (the padding of an
        explicit crop recipe is an eighth of it)."""
        n = c.noise
        return cls(
            weight_noise=n.weight,
            w_scale=float(n.w_scale),
            act_noise=bool(n.act),
            rho=n.rho,
            mask=n.mask,
            tau=n.tau,
            dist=n.dist,
            act_sites=n.act_sites,
            leftover=bool(n.leftover),
            steps_per_epoch=int(steps_per_epoch),
            label_smoothing=c.optim.label_smoothing,
            sam=bool(c.optim.sam),
            **data.augment_config(dataset_name, c.data.augment, image_size),
        )


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    if smoothing:
        onehot = optax.smooth_labels(onehot, smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()


def make_train_step(
    model: nn.Module,
    graph: taps.Graph,
    tx: optax.GradientTransformation,
    s: StepSettings,
    mean: jax.Array,
    std: jax.Array,
    dtype: Any = jnp.float32,
) -> Callable:
    """fn(state, images_u8, labels, idx_b, lam, noise_on) -> (state, metrics) for one step.

    The batch is ``images_u8[idx_b], labels[idx_b]`` (device-resident data), or with
    ``idx_b=None`` the arrays themselves (a streamed batch).

    `noise_on` is a Python bool (static): the warm-up compiles a step without any noise op.
    With `s.leftover` the last step of each epoch updates the perturbed weights instead of
    the latent ones (its perturbation stays in the stored weights, as in the authors' code,
    which adds the noise to the weights in place and forgets the last draw at each epoch).
    A step whose loss, gradients or new state are not finite reports `finite=False`; its
    state is then to be discarded (the loop stops or rolls back to the last checkpoint).
    """

    if s.leftover and s.steps_per_epoch < 1:
        raise ValueError("leftover needs steps_per_epoch >= 1")
    # None: every site; otherwise the sites whose input is a ReLU output.
    sites = None
    if s.act_sites == "relu":
        sites = tuple(layer.name for layer in graph.layers if layer.relu_input)

    def step(state: TrainState, images_u8, labels, idx_b, lam, noise_on: bool):
        root, t = root_key(state), state.step
        k_t, k_prev = noise.step_keys(sub_key(root, KEY_WEIGHT_NOISE), t)
        x, y = (images_u8, labels) if idx_b is None else (images_u8[idx_b], labels[idx_b])
        if s.pad or s.flip:
            aug_key = jax.random.fold_in(sub_key(root, KEY_AUGMENT), t)
            x = data.augment(aug_key, x, pad=s.pad, flip=s.flip)
        x = data.normalize(x, mean, std, dtype)
        stats = state.noise_stats
        perturbs = noise_on and s.weight_noise in ("differential", "naive")

        def perturbed(p):
            w_lam = lam * s.w_scale
            return noise.weight_noise(
                p, graph, stats, k_t, k_prev, w_lam, mode=s.weight_noise, dist=s.dist
            )

        def loss_fn(params):
            p = perturbed(params) if perturbs else params
            ctx = contextlib.nullcontext()
            if noise_on and s.act_noise and sites != ():
                act_key = jax.random.fold_in(sub_key(root, KEY_ACT_NOISE), t)
                fn = noise.activation_noise_fn(
                    graph,
                    stats,
                    act_key,
                    lam,
                    batch=x.shape[0],
                    rho=s.rho,
                    mask=s.mask,
                    tau=s.tau,
                    dist=s.dist,
                    sites=sites,
                )
                ctx = taps.map_inputs(fn)
            with ctx:
                # The iteration index of scanned stacks, for the per-site drop-in (a no-op
                # for models without stacks).
                variables = taps.prepare(state.variables(p), graph)
                logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
            loss = cross_entropy(logits, y, s.label_smoothing)
            return loss, (upd.get("batch_stats", {}), logits)

        (loss, (new_bs, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {}
        if s.sam:
            extra["grad_fn"] = lambda p, _: jax.grad(lambda q: loss_fn(q)[0])(p)
        base = state.params
        if perturbs and s.leftover:
            last = (t + 1) % s.steps_per_epoch == 0
            base = jax.tree_util.tree_map(
                lambda a, b: jnp.where(last, a, b), perturbed(state.params), state.params
            )
        updates, new_opt = tx.update(grads, state.opt_state, base, **extra)
        new_params = optax.apply_updates(base, updates)
        if noise_on and s.weight_noise == "accumulate":
            sample = noise.weight_sample(new_params, graph, stats, k_t, lam * s.w_scale, s.dist)
            new_params = jax.tree_util.tree_map(jnp.add, new_params, sample)
        # Over the gradients and everything the step writes, so whatever poisons them (SAM's
        # second gradient, the accumulate sample, an optimizer overflow) is seen.
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


def _max_abs(tree: PyTree) -> jax.Array:
    """max |x| over all float leaves: NaN or inf exactly when some entry is (no overflow)."""
    leaves = [
        x.ravel().astype(jnp.float32)
        for x in jax.tree_util.tree_leaves(tree)
        if x.size and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    # One reduction over the concatenation: one per leaf is a kernel each for XLA to compile.
    return jnp.max(jnp.abs(jnp.concatenate(leaves))) if leaves else jnp.zeros([], jnp.float32)


def make_chunk_fn(
    step: Callable, scan: bool, shardings: dict | None = None, streamed: bool = False
) -> Callable:
    """jit(fn(state, images_u8, labels, idx (K, B), lam, noise_on) -> (state, metrics (K,))).

    The K steps run in one rolled `lax.scan` (`scan=True`, for GPU/TPU) or as straight-line
    code (for XLA:CPU, which runs convolutions inside any loop, even a scan unrolled, about
    10x slower). The state argument is donated. `shardings` (optional) gives the 'state',
    'data', 'idx' and 'replicated' NamedShardings.

    `streamed`: fn(state, images_u8 (K, B, ...), labels (K, B), lam, noise_on), the K
    batches themselves (the stream's), split over 'data' like `idx`.
    """

    def chunk(state, images_u8, labels, idx, lam, noise_on):
        body = lambda st, idx_b: step(st, images_u8, labels, idx_b, lam, noise_on)
        return _steps(body, state, idx, idx.shape[0], scan)

    def streamed_chunk(state, images_u8, labels, lam, noise_on):
        body = lambda st, batch: step(st, *batch, None, lam, noise_on)
        return _steps(body, state, (images_u8, labels), labels.shape[0], scan)

    static = 4 if streamed else 5
    kwargs: dict = {"static_argnums": (static,), "donate_argnums": (0,)}
    if shardings is not None:
        sh = shardings
        data_sh = (sh["idx"], sh["idx"]) if streamed else (sh["data"], sh["data"], sh["idx"])
        kwargs["in_shardings"] = (sh["state"], *data_sh, sh["replicated"])
        kwargs["out_shardings"] = (sh["state"], sh["replicated"])
    return jax.jit(streamed_chunk if streamed else chunk, **kwargs)


def _steps(body: Callable, state, xs, k: int, scan: bool):
    """`body` over the K leading slices of `xs`: one rolled scan, or K straight-line steps."""
    if scan:
        return jax.lax.scan(body, state, xs)
    outs = []
    for i in range(k):
        state, m = body(state, jax.tree_util.tree_map(lambda x, i=i: x[i], xs))
        outs.append(m)
    return state, jax.tree_util.tree_map(lambda *ms: jnp.stack(ms), *outs)
