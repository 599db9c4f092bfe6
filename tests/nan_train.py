"""train.py with a NaN injected at one step, for the divergence tests (tests/test_faults.py).

  python tests/nan_train.py STEP --config=... --workdir=...

The params are set to NaN just before the trainer's compiled chunk of steps that begins at
global step STEP, only while lam_scale == 1 (a run rolled back with lambda halved replays that
step clean). The poison goes in between compiled calls, so every step the run takes runs the
program a clean run compiles (the same float rounding: its checkpoints before STEP are the
clean run's, bit for bit), and the trainer itself carries no testing switch. STEP must begin a
chunk; a chunk that runs past it without the poison stops the run.
"""

import sys

import jax
import jax.numpy as jnp

from dnq_jax.train import step as step_lib

NAN_STEP = int(sys.argv.pop(1))
make_chunk_fn = step_lib.make_chunk_fn


def poisoned_chunk_fn(*args, **kwargs):
    chunk = make_chunk_fn(*args, **kwargs)

    def call(state, *rest):
        # chunk(state, images, labels, idx, lam, noise_on); streamed: no idx, labels (K, B).
        steps = (rest[2] if len(rest) == 5 else rest[1]).shape[0]
        first = int(state.step)
        if float(state.lam_scale) == 1.0:
            if first == NAN_STEP:
                nan = lambda p: jnp.full_like(p, jnp.nan)
                state = state.replace(params=jax.tree_util.tree_map(nan, state.params))
            elif first < NAN_STEP < first + steps:
                sys.exit(f"nan_train.py: step {NAN_STEP} does not begin a chunk ({first}..)")
        return chunk(state, *rest)

    return call


step_lib.make_chunk_fn = poisoned_chunk_fn

if __name__ == "__main__":
    from dnq_jax.cli.train import train_main

    train_main()
