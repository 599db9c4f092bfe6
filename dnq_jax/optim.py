"""Optimizers: SGD with Nesterov momentum and a cosine schedule, SWA as an optax transform, SAM.

SWA (stochastic weight averaging) is an `optax.GradientTransformation` placed last in the
chain: it passes updates through unchanged and keeps, in its state, the equal-weight average
of the parameters at the end of every epoch from `start_epoch` on. Being optimizer state, the
average is checkpointed, sharded and restored like everything else.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
) -> optax.GradientTransformation:
    """SGD (Nesterov) with coupled weight decay and a cosine learning rate.

    With `swa_start_epoch` the chain ends in `swa(...)`; `swa_lr`, if set, holds the learning
    rate constant at that value from the SWA start (the usual SWA schedule); otherwise the
    cosine schedule runs to the end. With `sam_rho` the optimizer is wrapped in
    `optax.contrib.sam` (opaque mode: the trainer passes a `grad_fn`).
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else learning_rate,
        learning_rate,
        warmup_steps,
        max(total_steps, warmup_steps + 1),
    )
    if swa_start_epoch is not None and swa_lr is not None:
        boundary = swa_start_epoch * steps_per_epoch
        schedule = optax.join_schedules([schedule, optax.constant_schedule(swa_lr)], [boundary])
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    tx = optax.chain(*parts)
    if sam_rho:
        adv = optax.chain(optax.contrib.normalize(), optax.sgd(sam_rho))
        tx = optax.contrib.sam(tx, adv, sync_period=2, opaque_mode=True)
    if swa_start_epoch is not None:
        tx = optax.chain(tx, swa(swa_start_epoch, steps_per_epoch))
    return tx
