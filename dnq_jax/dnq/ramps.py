"""Noise-strength schedules: lambda_t = lambda_max * f((epoch - noise_start) / ramp_epochs).

The noise stage starts from a network trained clean; switching the full noise on at once
would knock it out of its basin, so the strength rises along a ramp f from f(0) to f(1) = 1.
All functions accept traced values, so the trainer can compute lambda inside a jitted step
from a fractional epoch (step / steps_per_epoch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax.choices import RAMPS


def _check_kind(kind: str) -> None:
    if kind not in RAMPS:
        raise ValueError(f"kind must be one of {RAMPS}, got {kind!r}")


def ramp(kind: str, u) -> jax.Array:
    """The ramp shape f(u) for u clipped to [0, 1], as float32.

    linear: u; cosine: (1 - cos(pi u)) / 2; exp: exp(-5 (1 - u)^2). Every shape reaches 1 at
    u = 1 and stays there; `exp` starts at exp(-5) ~ 0.0067 rather than 0.

    Raises:
      ValueError: if `kind` is not one of RAMPS.
    """
    _check_kind(kind)
    u = jnp.clip(jnp.asarray(u, jnp.float32), 0.0, 1.0)
    if kind == "linear":
        return u
    if kind == "cosine":
        return 0.5 * (1.0 - jnp.cos(jnp.pi * u))
    return jnp.exp(-5.0 * jnp.square(1.0 - u))


def _check_number(value, name: str, *, positive: bool = False) -> float:
    # Schedule constants come from the config; a traced value here would be a caller bug.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a Python number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if positive else ''} number")
    return value


def noise_lambda(
    epoch,
    *,
    lambda_max: float,
    noise_start: float,
    ramp_epochs: float,
    kind: str = "linear",
) -> jax.Array:
    """Noise strength at `epoch` (int or fractional, possibly traced), as float32.

    0 strictly before `noise_start`; from then on lambda_max * f((epoch - noise_start) /
    ramp_epochs). `ramp_epochs <= 0` means no ramp: a step to lambda_max at noise_start.

    Raises:
      ValueError: if `kind` is unknown, or lambda_max / noise_start / ramp_epochs is not a
        finite Python number (lambda_max must also be non-negative).
    """
    _check_kind(kind)
    lambda_max = _check_number(lambda_max, "lambda_max", positive=True)
    noise_start = _check_number(noise_start, "noise_start")
    ramp_epochs = _check_number(ramp_epochs, "ramp_epochs")
    epoch = jnp.asarray(epoch, jnp.float32)
    started = epoch >= noise_start
    if ramp_epochs <= 0:
        shape = jnp.ones_like(epoch)
    else:
        shape = ramp(kind, (epoch - noise_start) / ramp_epochs)
    return jnp.where(started, lambda_max * shape, 0.0).astype(jnp.float32)
