"""train.py with a NaN injected at one step, for the divergence tests (tests/test_faults.py).

  python tests/nan_train.py STEP --config=... --workdir=...

The params are poisoned at global step STEP, only while lam_scale == 1: a run rolled back
with lambda halved replays that step clean. The injection wraps the trainer's step function
here, so the trainer itself carries no testing switch.
"""

import sys

import jax
import jax.numpy as jnp

from dnq_jax.train import step as step_lib

NAN_STEP = int(sys.argv.pop(1))
make_train_step = step_lib.make_train_step


def poisoned_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)

    def poisoned(state, *rest):
        hit = (state.step == NAN_STEP) & (state.lam_scale == 1.0)
        nan = lambda p: jnp.where(hit, jnp.nan, p).astype(p.dtype)
        return step(state.replace(params=jax.tree_util.tree_map(nan, state.params)), *rest)

    return poisoned


step_lib.make_train_step = poisoned_train_step

if __name__ == "__main__":
    from dnq_jax.cli.train import train_main

    train_main()
