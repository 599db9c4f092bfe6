"""Post-training quantization: BN folding, calibration and round-to-nearest (RTN).

qm = dnq_jax.ptq.quantize(model, variables, calib_images, w_bits=4, a_bits=4)
acc = dnq_jax.ptq.accuracy(qm, images, labels)
"""

from dnq_jax.ptq.calibration import (
    activation_ranges,
    assign_bits,
    quantize_kernel,
    quantize_weights,
)
from dnq_jax.ptq.fold import apply_folded, fold_batchnorm, foldable_pairs, folded
from dnq_jax.ptq.rtn import QuantizedModel, accuracy, fp32, quantize

__all__ = [
    "QuantizedModel",
    "accuracy",
    "activation_ranges",
    "apply_folded",
    "assign_bits",
    "fold_batchnorm",
    "foldable_pairs",
    "folded",
    "fp32",
    "quantize",
    "quantize_kernel",
    "quantize_weights",
]
