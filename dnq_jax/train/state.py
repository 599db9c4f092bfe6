"""The train state: everything a run needs to continue bit-exactly, checkpointed as one pytree.

Random streams: the state holds the run's root key; each purpose (init, shuffling,
augmentation, weight noise, drop-in) folds its own constant into it, and each step or epoch
folds in its number. No key is ever split from another, so any step's keys can be
recomputed from the state alone (docs/method.md, "Noise at step t").
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dnq_jax import taps
from dnq_jax.dnq import profiler

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
    noise_stats: profiler.NoiseStats
    rng: jax.Array  # raw key data of the run's root key (jax.random.key_data, threefry)
    lam_scale: jax.Array  # float32, 1.0; halved by each rollback after a divergence

    def variables(self, params: PyTree | None = None) -> dict:
        """The Flax variables of the model: {'params', 'batch_stats' if the model has BN}."""
        v = {"params": self.params if params is None else params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def root_key(state: TrainState) -> jax.Array:
    return jax.random.wrap_key_data(state.rng)


def sub_key(root: jax.Array, purpose: int) -> jax.Array:
    return jax.random.fold_in(root, purpose)


def init_key(seed: int) -> jax.Array:
    """The key the model's params are initialised from."""
    return sub_key(jax.random.key(seed), KEY_INIT)


def create_train_state(
    seed: int, variables: dict, graph: taps.Graph, tx: optax.GradientTransformation
) -> TrainState:
    """Step 0 of a run: the initial variables, a fresh optimizer state, zero noise statistics."""
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        noise_stats=profiler.init_stats(graph),
        rng=jax.random.key_data(jax.random.key(seed)),
        lam_scale=jnp.ones([], jnp.float32),
    )
