"""Post-training quantization: BN folding, calibration, RTN, AdaRound, BRECQ and QDrop.

qm = dnq_jax.ptq.quantize(model, variables, calib_images, QuantSpec(w_bits=4, a_bits=4))
qm = dnq_jax.ptq.quantize(model, variables, calib_images, QuantSpec(2, 4), method="qdrop")
acc = dnq_jax.ptq.accuracy(qm, images, labels)
dnq_jax.ptq.export(qm, "w4a4.onnx", format="onnx")    # docs/deploy.md

`Settings`, the old name of `ReconSettings`, still works, with a DeprecationWarning.
"""

import warnings
from typing import Any

from dnq_jax.ptq.block_problem import ReconSettings
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
from dnq_jax.ptq.result import Calibrated, QuantizedModel, accuracy, fp32
from dnq_jax.ptq.rtn import calibrate_model, round_to_nearest
from dnq_jax.ptq.spec import QuantSpec


def __getattr__(name: str) -> Any:
    """The deprecated alias `Settings` of `ReconSettings` (code imported it by that name)."""
    if name == "Settings":
        warnings.warn(
            "dnq_jax.ptq.Settings is deprecated: use dnq_jax.ptq.ReconSettings",
            DeprecationWarning,
            stacklevel=2,
        )
        return ReconSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "Block",
    "Calibrated",
    "QuantSpec",
    "ReconSettings",
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
