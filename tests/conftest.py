"""Test-wide setup: 8 fake CPU devices (for the sharding tests), float32 matmuls exact."""

import os


import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
