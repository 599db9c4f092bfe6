"""`quantize`: post-training quantization of any Flax model by RTN, AdaRound, BRECQ or QDrop.

Every method starts from the same calibration (`rtn.calibrate_model`: BN folding, first and
last layer at 8 bits, per-channel weight ranges, per-tensor activation ranges) and returns
the same `QuantizedModel`, so accuracy, tables and CLIs take any of them.

    qm = ptq.quantize(model, variables, calib_images, w_bits=2, a_bits=4, method="qdrop",
                      iters=2000, progress=True)
    print(ptq.accuracy(qm, test_images, test_labels), qm.report["blocks"][0])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax

from dnq_jax.ptq import reconstruct as reconstruct_lib
from dnq_jax.ptq.block_problem import RECONSTRUCTION_METHODS, Settings
from dnq_jax.ptq.rtn import QuantizedModel, calibrate_model, round_to_nearest

PyTree = Any

METHODS = ("rtn", *RECONSTRUCTION_METHODS)


def quantize(
    model: nn.Module,
    variables: PyTree,
    calib_images: jax.Array,
    w_bits: int = 4,
    a_bits: int | None = 4,
    *,
    method: str = "rtn",
    iters: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    blocks: Iterable[Any] | None = None,
    drop_prob: float | None = None,
    recon_options: Mapping[str, Any] | None = None,
    keep_ends_8bit: bool = True,
    w_calibrator: str = "minmax",
    a_calibrator: str = "minmax",
    fold_bn: bool = True,
    quantize_activations: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
    calib_batch_size: int = 128,
    calib_options: Mapping[str, Any] | None = None,
) -> QuantizedModel:
    """Post-training quantization of any Flax Linen model with Conv/Dense layers.

    BatchNorm is folded into the conv feeding it; each Conv/Dense kernel is quantized
    asymmetric per output channel (range by `w_calibrator`); each Conv/Dense input gets an
    asymmetric per-tensor range (by `a_calibrator`) measured on `calib_images` through the
    folded full-precision model in eval mode. Then, by `method`:

    - ``'rtn'``: kernels rounded to nearest (the default; fast).
    - ``'adaround'``: per layer, learned up/down rounding reconstructing the layer's output
      (Nagel et al. 2020).
    - ``'brecq'``: per block, learned rounding and activation step sizes reconstructing the
      block's output, weighted by the Fisher diagonal (Li et al. 2021).
    - ``'qdrop'``: BRECQ with each activation quantizer's output replaced by its float input
      with probability `drop_prob` = 0.5, per element and iteration (Wei et al. 2022).

    Args:
      model: a Flax Linen model; ``model.apply(variables, images, **apply_kwargs)`` must run
        it in eval mode (BatchNorm on running averages).
      variables: its trained variables.
      calib_images: calibration images (the papers use 1024 training images for the
        reconstruction methods; the DNQ protocol 100), normalised as the model takes them.
      w_bits: weight bit-width, 2..16.
      a_bits: activation bit-width, 2..16, or None for weight-only quantization.
      method: one of `METHODS`.
      iters: reconstruction iterations per block (default 20,000, as in the papers).
      batch_size: calibration images per reconstruction iteration (default 32).
      seed: seeds the reconstruction's batches and drop masks.
      progress: a progress bar per block with iterations and reconstruction loss.
      blocks: module paths ('stage1_block0', ...) to reconstruct as blocks instead of each
        direct child of the model that holds Conv/Dense layers (BRECQ, QDrop).
      drop_prob: QDrop's drop probability (default 0.5; 0 gives BRECQ).
      recon_options: other fields of `dnq_jax.ptq.Settings` (``lr``, ``act_lr``,
        ``reg_weight``, ``warmup``, ``beta``, ``fisher``, ``learn_act``, ``chunk``).
      keep_ends_8bit: keep the first and last layer (weights and input) at 8 bits.
      w_calibrator: ``'minmax'`` or ``'mse'``.
      a_calibrator: ``'minmax'``, ``'percentile'`` or ``'mse'``.
      fold_bn: fold BatchNorm into convs before quantizing (the paper's protocol).
      quantize_activations: False for weight-only quantization.
      apply_kwargs: extra keyword arguments of ``model.apply``, e.g. ``{'train': False}``.
      calib_batch_size: images per forward pass of calibration and data capture.
      calib_options: options of `dnq_jax.quant.calibrate` (``percentile``, ``p``,
        ``num_candidates``) for both weights and activations.

    Returns:
      A `QuantizedModel`: call it on images for logits; ``.report`` says how it was made
      (for reconstruction: settings, wall time, each block's output error before/after).

    Raises:
      ValueError: naming the argument, for an unknown method, bits outside 2..16, an unknown
        calibrator, a bad iteration count or block path, an empty `calib_images`, images the
        model cannot take, or a model without Conv/Dense.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    settings = None
    recon_args = dict(iters=iters, batch_size=batch_size, blocks=blocks, drop_prob=drop_prob)
    recon_args["recon_options"] = recon_options
    if method == "rtn":
        given = sorted(k for k, v in recon_args.items() if v is not None)
        if given:
            raise ValueError(
                f"{', '.join(given)}: only the reconstruction methods {RECONSTRUCTION_METHODS} "
                "take this; method='rtn' has no iterations"
            )
    else:
        if recon_options is not None and not isinstance(recon_options, Mapping):
            raise ValueError(f"recon_options must be a mapping or None, got {type(recon_options)}")
        settings = Settings.for_method(
            method,
            iters=iters,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            drop_prob=drop_prob,
            **dict(recon_options or {}),
        )
    cal = calibrate_model(
        model,
        variables,
        calib_images,
        w_bits,
        a_bits,
        keep_ends_8bit=keep_ends_8bit,
        w_calibrator=w_calibrator,
        a_calibrator=a_calibrator,
        fold_bn=fold_bn,
        quantize_activations=quantize_activations,
        apply_kwargs=apply_kwargs,
        calib_batch_size=calib_batch_size,
        calib_options=calib_options,
    )
    rtn = round_to_nearest(cal)
    if settings is None:
        return rtn
    return reconstruct_lib.reconstruct(
        cal, rtn, calib_images, settings, blocks=blocks, calib_batch_size=calib_batch_size
    )
