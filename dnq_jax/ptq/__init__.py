"""Post-training quantization: BN folding, calibration, RTN, AdaRound, BRECQ and QDrop.

qm = dnq_jax.ptq.quantize(model, variables, calib_images, w_bits=4, a_bits=4)
qm = dnq_jax.ptq.quantize(model, variables, calib_images, w_bits=2, a_bits=4, method="qdrop")
acc = dnq_jax.ptq.accuracy(qm, images, labels)
dnq_jax.ptq.export(qm, "w4a4.onnx", format="onnx")    # docs/deploy.md
"""

from dnq_jax.ptq.block_problem import Settings
from dnq_jax.ptq.blocks import Block, find_blocks
from dnq_jax.ptq.calibration import (
    activation_ranges,
    assign_bits,
    quantize_kernel,
    quantize_weights,
)
from dnq_jax.ptq.export import export
from dnq_jax.ptq.fold import apply_folded, fold_batchnorm, foldable_pairs, folded
from dnq_jax.ptq.methods import METHODS, quantize
from dnq_jax.ptq.rtn import (
    Calibrated,
    QuantizedModel,
    accuracy,
    calibrate_model,
    fp32,
    round_to_nearest,
)

__all__ = [
    "METHODS",
    "Block",
    "Calibrated",
    "Settings",
    "calibrate_model",
    "export",
    "find_blocks",
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
    "round_to_nearest",
]
