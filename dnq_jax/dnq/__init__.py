"""DNQ proper: the quantization-error profiler, the noise transforms and the noise ramps.

The method is written out in docs/method.md.
"""

from dnq_jax.dnq.noise import (
    MASKS,
    WEIGHT_MODES,
    activation_dropin,
    activation_noise_fn,
    kernel_samples,
    site_bits,
    step_keys,
    weight_noise,
    weight_sample,
)
from dnq_jax.dnq.profiler import (
    NoiseStats,
    ema_update,
    init_stats,
    layer_bits,
    make_profiler,
    stats_summary,
)
from dnq_jax.dnq.ramps import RAMPS, noise_lambda, ramp

__all__ = [
    "MASKS",
    "RAMPS",
    "WEIGHT_MODES",
    "NoiseStats",
    "activation_dropin",
    "activation_noise_fn",
    "ema_update",
    "init_stats",
    "kernel_samples",
    "layer_bits",
    "make_profiler",
    "noise_lambda",
    "ramp",
    "site_bits",
    "stats_summary",
    "step_keys",
    "weight_noise",
    "weight_sample",
]
