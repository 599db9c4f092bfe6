"""`quantize`: post-training quantization of any Flax model by RTN, AdaRound, BRECQ or QDrop.

Every method starts from the same calibration (`rtn.calibrate_model`: BN folding, first and
last layer at 8 bits, per-channel weight ranges, per-tensor activation ranges, all as a
`QuantSpec` says) and returns the same `QuantizedModel`, so accuracy, tables and CLIs take
any of them.

    qm = ptq.quantize(model, variables, calib_images, QuantSpec(w_bits=2, a_bits=4),
                      method="qdrop", recon={"iters": 2000, "progress": True})
    print(ptq.accuracy(qm, test_images, test_labels), qm.report["blocks"][0])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax

from dnq_jax.ptq import reconstruct as reconstruct_lib
from dnq_jax.ptq import spec as spec_lib
from dnq_jax.ptq.block_problem import RECONSTRUCTION_METHODS, ReconSettings
from dnq_jax.ptq.result import QuantizedModel
from dnq_jax.ptq.rtn import calibrate_model, round_to_nearest
from dnq_jax.ptq.spec import QuantSpec

PyTree = Any

METHODS = ("rtn", *RECONSTRUCTION_METHODS)
# The keywords `quantize` took before `recon`: fields of `ReconSettings`, and a mapping of
# the others. Still taken, with a DeprecationWarning.
_RECON_KEYWORDS = ("iters", "batch_size", "seed", "progress", "drop_prob", "recon_options")
_RTN_IGNORES = ("seed", "progress")


def quantize(
    model: nn.Module,
    variables: PyTree,
    calib_images: jax.Array,
    spec: QuantSpec | None = None,
    method: str = "rtn",
    recon: ReconSettings | Mapping[str, Any] | None = None,
    *,
    blocks: Iterable[Any] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    calib_batch_size: int = 128,
    **deprecated: Any,
) -> QuantizedModel:
    """Post-training quantization of any Flax Linen model with Conv/Dense layers.

    BatchNorm is folded into the conv feeding it; each Conv/Dense kernel is quantized
    asymmetric per output channel (range by ``spec.w_calibrator``); each Conv/Dense input
    gets an asymmetric per-tensor range (by ``spec.a_calibrator``) measured on
    `calib_images` through the folded full-precision model in eval mode. Then, by `method`:

    - ``'rtn'``: kernels rounded to nearest (the default; fast).
    - ``'adaround'``: per layer, learned up/down rounding reconstructing the layer's output
      (Nagel et al. 2020).
    - ``'brecq'``: per block, learned rounding and activation step sizes reconstructing the
      block's output, weighted by the Fisher diagonal (Li et al. 2021).
    - ``'qdrop'``: BRECQ with each activation quantizer's output replaced by its float input
      with probability ``drop_prob`` = 0.5, per element and iteration (Wei et al. 2022).

    Args:
      model: a Flax Linen model; ``model.apply(variables, images, **apply_kwargs)`` must run
        it in eval mode (BatchNorm on running averages).
      variables: its trained variables.
      calib_images: calibration images (the papers use 1024 training images for the
        reconstruction methods; the DNQ protocol 100), normalised as the model takes them.
      spec: the bit-widths, calibrators and protocol (`QuantSpec`; None: ``QuantSpec()``,
        W4A4). ``QuantSpec(a_bits=None)`` quantizes the weights only.
      method: one of `METHODS`.
      recon: the reconstruction methods' settings: a `ReconSettings` (its method must be
        `method`), or a mapping of its fields to override the method's defaults, e.g.
        ``{'iters': 2000, 'progress': True}`` (20,000 iterations per block and 32 images
        per iteration by default, as in the papers; QDrop's ``drop_prob`` 0.5). None: the
        defaults. Not taken by ``'rtn'`` (which ignores ``seed`` and ``progress``).
      blocks: module paths ('stage1_block0', ...) to reconstruct as blocks instead of each
        direct child of the model that holds Conv/Dense layers (BRECQ, QDrop).
      apply_kwargs: extra keyword arguments of ``model.apply``, e.g. ``{'train': False}``.
      calib_batch_size: images per forward pass of calibration and data capture.
      **deprecated: the keywords taken before `spec` and `recon` (``w_bits``, ``a_bits``,
        ``quantize_activations``, the other fields of `QuantSpec`; ``iters``,
        ``batch_size``, ``seed``, ``progress``, ``drop_prob``, ``recon_options``): still
        taken, with a DeprecationWarning, and mapped onto `spec` and `recon`.

    Returns:
      A `QuantizedModel`: call it on images for logits; ``.report`` says how it was made
      (for reconstruction: settings, wall time, each block's output error before/after).

    Raises:
      ValueError: naming the argument, for an unknown method, bad spec fields, a bad
        iteration count or block path, an empty `calib_images`, images the model cannot
        take, or a model without Conv/Dense.
    """
    spec = spec_lib.resolve(spec, spec_lib.split_legacy(deprecated), "quantize")
    recon = _legacy_recon(recon, deprecated)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    settings = _recon_settings(method, recon, blocks)
    cal = calibrate_model(
        model,
        variables,
        calib_images,
        spec,
        apply_kwargs=apply_kwargs,
        calib_batch_size=calib_batch_size,
    )
    rtn = round_to_nearest(cal)
    if settings is None:
        return rtn
    return reconstruct_lib.reconstruct(
        cal, rtn, calib_images, settings, blocks=blocks, calib_batch_size=calib_batch_size
    )


def _legacy_recon(recon: Any, deprecated: dict[str, Any]) -> Any:
    """`recon`, or the mapping the deprecated reconstruction keywords in `deprecated` make."""
    legacy = {k: deprecated.pop(k) for k in _RECON_KEYWORDS if k in deprecated}
    if deprecated:
        raise TypeError(f"quantize: unexpected keyword(s) {sorted(deprecated)}")
    if not legacy:
        return recon
    names = ", ".join(sorted(legacy))
    given = ", ".join(f"{k}=..." for k in sorted(legacy))
    if recon is not None:
        raise ValueError(f"{names}: given next to recon; set them in recon instead")
    warnings.warn(
        f"quantize({given}) is deprecated: pass recon={{...}} or a ReconSettings",
        DeprecationWarning,
        stacklevel=3,
    )
    options = legacy.pop("recon_options", None)
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"recon_options must be a mapping or None, got {type(options)}")
    return {**legacy, **dict(options or {})}


def _recon_settings(method: str, recon: Any, blocks: Any) -> ReconSettings | None:
    """The checked `ReconSettings` of `method` from `recon`; None for RTN."""
    if recon is not None and not isinstance(recon, (ReconSettings, Mapping)):
        raise ValueError(f"recon must be a ReconSettings, a mapping or None, got {type(recon)}")
    if method == "rtn":
        # seed and progress are let through: RTN has neither, and never did reject them.
        if isinstance(recon, ReconSettings):
            given = ["recon"]
        else:
            given = [k for k, v in sorted(dict(recon or {}).items()) if v is not None]
            given = [k for k in given if k not in _RTN_IGNORES]
        given += ["blocks"] if blocks is not None else []
        if given:
            raise ValueError(
                f"{', '.join(given)}: only the reconstruction methods {RECONSTRUCTION_METHODS} "
                "take this; method='rtn' has no iterations"
            )
        return None
    if isinstance(recon, ReconSettings):
        if recon.method != method:
            raise ValueError(f"recon: its method is {recon.method!r}, not method={method!r}")
        return recon
    return ReconSettings.for_method(method, **dict(recon or {}))
