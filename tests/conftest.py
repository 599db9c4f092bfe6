"""Test-wide setup: 8 fake CPU devices, so sharded runs can be compared with one device."""

import jax

# Must run before the CPU backend is created; it does not affect a GPU/TPU backend.
jax.config.update("jax_num_cpu_devices", 8)
