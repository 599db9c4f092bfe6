"""Test-wide setup: 8 fake CPU devices, and a persistent compilation cache."""

import os
import tempfile

import jax

# Must run before the CPU backend is created; it does not affect a GPU/TPU backend.
jax.config.update("jax_num_cpu_devices", 8)

# The trainer tests build the same jitted functions several times; a disk cache turns the
# repeated XLA compiles into loads.
_cache = os.environ.get(
    "DNQ_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "dnq_jax_test_cache")
)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
