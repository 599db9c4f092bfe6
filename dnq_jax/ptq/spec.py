"""`QuantSpec`: what is quantized and how, in one frozen value.

The same settings decide the evaluation's PTQ (`dnq_jax.ptq.quantize`), the per-layer error
diagnostics (`dnq_jax.diagnostics.error_setup`) and the quantizer whose error DNQ models
(`dnq_jax.dnq.make_profiler`), so they travel together:

    spec = QuantSpec(w_bits=2, a_bits=4)                   # W2A4, ends at 8 bits, min-max
    qm = ptq.quantize(model, variables, calib_images, spec, method="qdrop")
    w4 = dataclasses.replace(spec, w_bits=4, a_bits=None)  # weight-only

Which calibration images, and how many, is the caller's choice (the images are an argument
of every function that takes a spec), so the calibration set size and its seed are not
settings of the spec: no function that takes one would read them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from dnq_jax import quant
from dnq_jax.choices import ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS
from dnq_jax.ptq.calibration import check_calibrator

# The options of `quant.calibrate` that a spec may set, with the range each must be in.
CALIB_OPTIONS = ("percentile", "p", "num_candidates")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Bit-widths, calibrators and protocol of a post-training quantization.

    Attributes:
      w_bits: weight bit-width, 2..16 (asymmetric, per output channel).
      a_bits: bit-width of every Conv/Dense input, 2..16 (asymmetric, per tensor), or None
        for weight-only quantization.
      keep_ends_8bit: the first and the last layer (weights and input) at 8 bits, or at the
        global width where that is higher.
      w_calibrator: how a kernel's per-channel range is found: ``'minmax'`` or ``'mse'``.
      a_calibrator: how an input's range is found: ``'minmax'``, ``'percentile'`` or ``'mse'``.
      calib_options: options of `dnq_jax.quant.calibrate` for both calibrators:
        ``percentile`` in (50, 100], ``p`` > 0, ``num_candidates`` >= 1 (None: none).
        Kept as a copy.
      fold_bn: fold BatchNorm into the conv feeding it before quantizing (the protocol).

    Raises:
      ValueError: from the constructor (and `dataclasses.replace`), naming the bad field.
    """

    w_bits: int = 4
    a_bits: int | None = 4
    keep_ends_8bit: bool = True
    w_calibrator: str = "minmax"
    a_calibrator: str = "minmax"
    calib_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    fold_bn: bool = True

    def __post_init__(self) -> None:
        # Normalised in place (numpy ints to int, a private copy of the options), so equal
        # specs compare equal and the caller's dict cannot change a spec after the fact.
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("w_bits", quant.check_bits(self.w_bits, "w_bits"))
        if self.a_bits is not None:
            set_("a_bits", quant.check_bits(self.a_bits, "a_bits"))
        for name in ("keep_ends_8bit", "fold_bn"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
            set_(name, bool(getattr(self, name)))
        check_calibrator(self.w_calibrator, WEIGHT_CALIBRATORS, "w_calibrator")
        check_calibrator(self.a_calibrator, ACTIVATION_CALIBRATORS, "a_calibrator")
        set_("calib_options", _checked_options(self.calib_options))

    @property
    def weight_only(self) -> bool:
        """True when activations stay in float (``a_bits is None``)."""
        return self.a_bits is None


def _checked_options(options: Any) -> dict[str, Any]:
    if options is None:  # what the keyword meant before the spec: no options
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"calib_options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(CALIB_OPTIONS))
    if unknown:
        raise ValueError(f"calib_options: unknown option(s) {unknown}; known: {CALIB_OPTIONS}")
    out = dict(options)
    number = lambda v: isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
    if "percentile" in out and not (number(out["percentile"]) and 50 < out["percentile"] <= 100):
        raise ValueError(
            f"calib_options['percentile'] must be in (50, 100], got {out['percentile']!r}"
        )
    if "p" in out and not (number(out["p"]) and out["p"] > 0):
        raise ValueError(f"calib_options['p'] must be a positive number, got {out['p']!r}")
    n = out.get("num_candidates", 1)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"calib_options['num_candidates'] must be a positive int, got {n!r}")
    return out


# The keywords the functions that take a spec took before it; each maps onto one field,
# except `quantize_activations=False`, the old second spelling of ``a_bits=None``.
LEGACY_KEYWORDS = (*(f.name for f in dataclasses.fields(QuantSpec)), "quantize_activations")


def resolve(
    spec: QuantSpec | None, legacy: Mapping[str, Any], where: str, required: bool = False
) -> QuantSpec:
    """The `spec` a function was given, or one made from its deprecated keywords.

    `legacy` holds the keywords of `LEGACY_KEYWORDS` the caller passed; with any, a
    DeprecationWarning names them and the spec is ``QuantSpec(**legacy)`` (with
    ``quantize_activations=False`` read as ``a_bits=None``). Without a spec or keywords the
    result is ``QuantSpec()``, unless `required`. `where` names the function in messages.

    Raises:
      TypeError: for a spec that is not a `QuantSpec` (or a missing one when `required`).
      ValueError: for keywords given next to a spec, or a bad value (naming the field).
    """
    if spec is not None and not isinstance(spec, QuantSpec):
        raise TypeError(
            f"{where}: spec must be a QuantSpec, got {type(spec).__name__} {spec!r}; "
            "the bit-widths go in it: QuantSpec(w_bits=..., a_bits=...)"
        )
    if not legacy:
        if spec is None and required:
            raise TypeError(f"{where}: missing spec, e.g. QuantSpec(w_bits=2, a_bits=4)")
        return QuantSpec() if spec is None else spec
    names = ", ".join(sorted(legacy))
    given = ", ".join(f"{k}=..." for k in sorted(legacy))
    if spec is not None:
        raise ValueError(f"{names}: given next to spec; set them in the QuantSpec instead")
    warnings.warn(
        f"{where}({given}) is deprecated: pass a dnq_jax.ptq.QuantSpec as spec",
        DeprecationWarning,
        stacklevel=3,
    )
    fields = dict(legacy)
    if not fields.pop("quantize_activations", True):
        fields["a_bits"] = None
    return QuantSpec(**fields)


def split_legacy(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Removes the `LEGACY_KEYWORDS` from `kwargs` and returns them (for `resolve`)."""
    return {k: kwargs.pop(k) for k in LEGACY_KEYWORDS if k in kwargs}
