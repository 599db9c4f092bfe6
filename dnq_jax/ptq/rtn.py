"""The calibration every PTQ method starts from, and round-to-nearest (RTN).

`calibrate_model` folds BatchNorm, assigns bit-widths and calibrates per-tensor activation
ranges on the folded full-precision model, as a `QuantSpec` says; `round_to_nearest` then
fake-quantizes every Conv/Dense kernel once. The public entry point is
`dnq_jax.ptq.quantize` (methods.py), which also offers the reconstruction methods; the types
both return are in result.py.

    cal = calibrate_model(model, variables, calib_images, QuantSpec(w_bits=4, a_bits=4))
    qm = round_to_nearest(cal)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from dnq_jax import taps
from dnq_jax.ptq import calibration, fold
from dnq_jax.ptq import spec as spec_lib
from dnq_jax.ptq.result import Calibrated, QuantizedModel
from dnq_jax.ptq.spec import QuantSpec

PyTree = Any


def calibrate_model(
    model: nn.Module,
    variables: PyTree,
    calib_images: jax.Array,
    spec: QuantSpec | None = None,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    calib_batch_size: int = 128,
    **deprecated: Any,
) -> Calibrated:
    """Folds BatchNorm, assigns bits and calibrates activation ranges on the folded float
    model, as `spec` says (None: ``QuantSpec()``); the other arguments are those of
    `dnq_jax.ptq.quantize`. The fields of `QuantSpec` are still taken as keywords in place
    of `spec`, with a DeprecationWarning.

    Raises:
      ValueError: naming the argument, as `dnq_jax.ptq.quantize` documents.
    """
    legacy = spec_lib.split_legacy(deprecated)
    if deprecated:
        raise TypeError(f"calibrate_model: unexpected keyword(s) {sorted(deprecated)}")
    spec = spec_lib.resolve(spec, legacy, "calibrate_model")
    calibration.check_image_batch(calib_images, "calib_images")
    calibration.check_positive_int(calib_batch_size, "calib_batch_size")
    if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
        raise ValueError(f"apply_kwargs must be a mapping or None, got {type(apply_kwargs)}")
    apply_kwargs = dict(apply_kwargs or {})

    probe = calib_images[: min(calib_batch_size, calib_images.shape[0])]
    try:
        graph = taps.trace(model, variables, probe, **apply_kwargs)
    except ValueError as e:
        if str(e).startswith("images:"):
            raise ValueError(f"calib_images{str(e)[len('images') :]}") from e
        raise
    pairs: tuple[fold.Pair, ...] = ()
    folded_vars = variables
    if spec.fold_bn:
        folded_vars, pairs = fold.fold_batchnorm(
            model, variables, probe, graph=graph, **apply_kwargs
        )

    bits = calibration.assign_bits(graph, spec.w_bits, spec.a_bits, spec.keep_ends_8bit)
    ranges: calibration.Ranges = {}
    if spec.a_bits is not None:
        forward = lambda v, x, **kw: fold.apply_folded(model, v, pairs, x, **apply_kwargs, **kw)
        ranges = calibration.activation_ranges(
            forward,
            folded_vars,
            calib_images,
            graph,
            {name: a for name, (_, a) in bits.items()},
            method=spec.a_calibrator,
            batch_size=calib_batch_size,
            **spec.calib_options,
        )
    return Calibrated(
        model=model,
        graph=graph,
        variables=folded_vars,
        bn_pairs=pairs,
        bits_per_layer=bits,
        act_ranges=ranges,
        spec=spec,
        apply_kwargs=apply_kwargs,
        image_shape=tuple(int(n) for n in calib_images.shape[1:]),
    )


def round_to_nearest(cal: Calibrated) -> QuantizedModel:
    """RTN: every kernel rounded to nearest on its per-channel grid."""
    params = calibration.quantize_weights(
        cal.variables["params"],
        cal.graph,
        {name: w for name, (w, _) in cal.bits_per_layer.items()},
        method=cal.spec.w_calibrator,
        **cal.spec.calib_options,
    )
    return cal.quantized(params, cal.act_ranges, method="rtn")
