"""The trainer: config, builders, state, step, optimizer, checkpoints, loop, evaluation.

  from dnq_jax.train import train_and_evaluate
  results = train_and_evaluate(config, workdir)

`config.py` (groups of keys, method presets, validation) imports no JAX, so config files and
the CLIs load it cheaply; the names below are imported on first use for the same reason.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train_and_evaluate": "dnq_jax.train.loop",
    "evaluate_workdir": "dnq_jax.train.evaluate",
    "TrainState": "dnq_jax.train.state",
    "create_train_state": "dnq_jax.train.state",
    "make_train_step": "dnq_jax.train.step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
