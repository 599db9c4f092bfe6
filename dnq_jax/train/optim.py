"""Optimizers: SGD with Nesterov momentum and a cosine schedule, SWA, SAM; BN re-estimation.

SWA (stochastic weight averaging) is an `optax.GradientTransformation` placed last in the
chain: it passes updates through unchanged and keeps, in its state, the equal-weight average
of the parameters at the end of every epoch from `start_epoch` on. Being optimizer state, the
average is checkpointed, sharded and restored like everything else.

Averaged weights need their own BatchNorm statistics: the running averages collected while
training belong to the individual iterates, not to their mean. `recompute_batch_stats` runs
the model in train mode over clean training data and replaces each BN's running mean/var by
the equal-weight average of the batch statistics it saw (the usual SWA recipe). BN inputs are
read through `taps.intercept_modules`, so any Linen model with `nn.BatchNorm` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dnq_jax import data, taps
from dnq_jax.choices import SCHEDULES

PyTree = Any


class SWAState(NamedTuple):
    """count: optimizer steps seen; n: snapshots averaged; mean: the running average."""

    count: jax.Array
    n: jax.Array
    mean: PyTree


def swa(start_epoch: int, steps_per_epoch: int) -> optax.GradientTransformation:
    """Equal-weight average of the params after the last step of each epoch >= start_epoch.

    Needs `params` in `update` (the params the updates are about to be applied to). The
    averaged params are `state.mean` (see `swa_params`).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def init(params):
        mean = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return SWAState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), mean)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("swa needs params: call update(updates, state, params)")
        count = state.count + 1
        take = (count % steps_per_epoch == 0) & (count // steps_per_epoch > start_epoch)
        n = state.n + take.astype(jnp.int32)
        # Running mean: m_n = m_{n-1} + (p - m_{n-1}) / n, only on snapshot steps.
        w = jnp.where(take, 1.0 / jnp.maximum(n, 1), 0.0)
        mean = jax.tree_util.tree_map(
            lambda m, p, u: m + w * ((p + u).astype(jnp.float32) - m), state.mean, params, updates
        )
        return updates, SWAState(count, n, mean)

    return optax.GradientTransformation(init, update)


def find_swa_state(opt_state: PyTree) -> SWAState | None:
    """The SWAState inside a (possibly nested) optax state, or None."""
    found = []

    def visit(node):
        if isinstance(node, SWAState):
            found.append(node)
            return True
        return False

    jax.tree_util.tree_map(lambda x: x, opt_state, is_leaf=visit)
    return found[0] if found else None


def swa_params(opt_state: PyTree, params: PyTree) -> tuple[PyTree, int]:
    """(averaged params cast to the params' dtypes, number of snapshots); the params
    themselves when no snapshot was taken yet."""
    state = find_swa_state(opt_state)
    if state is None:
        return params, 0
    n = int(jax.device_get(state.n))
    if n == 0:
        return params, 0
    avg = jax.tree_util.tree_map(lambda m, p: m.astype(p.dtype), state.mean, params)
    return avg, n


def _decay_mask(params: PyTree) -> PyTree:
    # Decay kernels only: BN scales/biases and layer biases are not regularised.
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    steps_per_epoch: int,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    swa_start_epoch: int | None = None,
    swa_lr: float | None = None,
    sam_rho: float | None = None,
    schedule: str = "cosine",
) -> optax.GradientTransformation:
    """SGD (Nesterov) with coupled weight decay and a cosine learning rate.

    With `swa_start_epoch` the chain ends in `swa(...)`; `swa_lr`, if set, holds the learning
    rate constant at that value from the SWA start (the usual SWA schedule); otherwise the
    cosine schedule runs to the end. `schedule='cosine_to_swa'` (needs `swa_start_epoch`)
    anneals the cosine to zero at the SWA start instead of at the end, then holds `swa_lr`
    (0.01 x `learning_rate` when None): the authors' schedule. With `sam_rho` the optimizer
    is wrapped in `optax.contrib.sam` (opaque mode: the trainer passes a `grad_fn`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "cosine_to_swa":
        if swa_start_epoch is None:
            raise ValueError("schedule='cosine_to_swa' needs swa_start_epoch")
        total_steps = swa_start_epoch * steps_per_epoch
        swa_lr = 0.01 * learning_rate if swa_lr is None else swa_lr
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    lr = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else learning_rate,
        learning_rate,
        warmup_steps,
        max(total_steps, warmup_steps + 1),
    )
    if swa_start_epoch is not None and swa_lr is not None:
        boundary = swa_start_epoch * steps_per_epoch
        lr = optax.join_schedules([lr, optax.constant_schedule(swa_lr)], [boundary])
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    tx = optax.chain(*parts)
    if sam_rho:
        adv = optax.chain(optax.contrib.normalize(), optax.sgd(sam_rho))
        tx = optax.contrib.sam(tx, adv, sync_period=2, opaque_mode=True)
    if swa_start_epoch is not None:
        tx = optax.chain(tx, swa(swa_start_epoch, steps_per_epoch))
    return tx


# --- BatchNorm statistics for averaged weights -------------------------------------


def _moments(module: nn.BatchNorm, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    feat = {a % x.ndim for a in axis}
    red = tuple(i for i in range(x.ndim) if i not in feat)
    x = x.astype(jnp.float32)
    mean = x.mean(red)
    # Biased variance, as nn.BatchNorm uses for its running average.
    var = jnp.maximum((x * x).mean(red) - mean * mean, 0.0)
    return mean, var


def make_batch_moments(
    model: nn.Module, apply_kwargs: dict | None = None
) -> Callable[[PyTree, jax.Array], dict[tuple[str, ...], tuple[jax.Array, jax.Array]]]:
    """A jitted fn(variables, images) -> {bn module path: (batch mean, batch var)}."""
    kwargs = {"train": True} if apply_kwargs is None else dict(apply_kwargs)

    @jax.jit
    def moments(variables, images):
        found: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}

        def record(module, call, a, kw):
            x = a[0] if a else kw["x"]
            found[tuple(module.path)] = _moments(module, x)
            return call(*a, **kw)

        with taps.intercept_modules(record, lambda m: isinstance(m, nn.BatchNorm)):
            model.apply(variables, images, mutable=["batch_stats"], **kwargs)
        return found

    return moments


def bn_batches(
    ds, batch_size: int, key: jax.Array, *, pad: int = 0, flip: bool = False, stream_seed=None
):
    """One pass over `ds`'s training images (a `data.Dataset` or `data.Stream`), normalised,
    in batches of `batch_size` drawn in a shuffled order from `key`, transformed as the
    training batches are: the on-device random crop after `pad`-pixel zero padding and the
    flip (`data.augment`, batch i keyed by ``fold_in(key, i)``; the run's own are its
    `StepSettings.pad` / `.flip`), and for a stream its workers' training transform seeded by
    `stream_seed` (None: their evaluation transform). ``pad=0, flip=False``: unaugmented.

    Transformed as in training because the BatchNorm statistics the later layers were trained
    against are those of augmented batches: on CIFAR-10 a ResNet-20 whose statistics were
    re-estimated on unaugmented images (no zero-padded borders) lost 2.4 points of test
    top-1 against its own running statistics, and got them back with augmented batches.
    Shuffled because a stored order can be sorted by class (the CIFAR-10 file is): a one-class
    batch's statistics are the class's, and their average misses the between-class part of
    every variance (and, with BN in train mode, every later layer's input is then wrong too).
    """
    rows = np.sort(np.asarray(data.epoch_indices(key, ds.num_train, batch_size)), axis=1)
    if isinstance(ds, data.Stream):  # read by its workers, as the training batches are
        host = (x for x, _ in ds.batches("train", rows, seed=stream_seed))
    else:
        host = (ds.train_images[r] for r in rows)
    for i, images in enumerate(host):
        x = jnp.asarray(images)
        if pad or flip:
            x = data.augment(jax.random.fold_in(key, i), x, pad=pad, flip=flip)
        yield data.normalize(x, ds.mean, ds.std)


def recompute_batch_stats(
    model: nn.Module,
    variables: PyTree,
    batches: Iterable[jax.Array],
    apply_kwargs: dict | None = None,
    moments_fn: Callable | None = None,
) -> PyTree:
    """New variables whose `batch_stats` are the average batch statistics over `batches`.

    `batches` yields model-ready (normalised) image arrays of equal size (`bn_batches`).
    A model without BatchNorm gets its variables back unchanged.
    """
    if "batch_stats" not in variables:
        return variables
    moments = moments_fn or make_batch_moments(model, apply_kwargs)
    total = None
    n = 0
    for images in batches:
        m = moments(variables, images)
        total = m if total is None else jax.tree_util.tree_map(jnp.add, total, m)
        n += 1
    if n == 0:
        raise ValueError("batches: no batch to estimate BatchNorm statistics from")
    stats = variables["batch_stats"]
    for path, (mean, var) in total.items():
        stats = _replace(stats, path, {"mean": mean / n, "var": var / n})
    return {**variables, "batch_stats": stats}


def _replace(tree: PyTree, path: tuple[str, ...], leaves: dict) -> dict:
    tree = dict(tree)
    if len(path) == 1:
        node = dict(tree[path[0]])
        for k, v in leaves.items():
            node[k] = v.astype(node[k].dtype)
        tree[path[0]] = node
        return tree
    tree[path[0]] = _replace(tree[path[0]], path[1:], leaves)
    return tree
