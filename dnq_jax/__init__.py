"""dnq_jax: Differential Noise-driven Quantization (DNQ) in JAX/Flax.

Train a full-precision Flax model with statistically modelled quantization noise so that it
survives post-training quantization (PTQ) at low bit-widths; evaluate it with PTQ methods.
"""

__version__ = "0.1.0"
