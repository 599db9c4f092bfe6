"""What every PTQ method returns, and what they all start from and are measured with.

`Calibrated` is the common starting point (`rtn.calibrate_model`: BN folded, bits assigned,
activation ranges measured); every method of `dnq_jax.ptq.quantize` turns it into a
`QuantizedModel`, a jitted ``images -> logits`` function that fake-quantizes each layer input
with its stored range. `accuracy` measures it, or the float model `fp32`.

    qm = ptq.quantize(model, variables, calib_images, QuantSpec(w_bits=4, a_bits=4))
    print(accuracy(fp32(model, variables), images, labels), accuracy(qm, images, labels))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import quant, taps
from dnq_jax.ptq import calibration, fold

# By name from the module: the package's attribute `export` is this function, not the module.
from dnq_jax.ptq.export import export as _export
from dnq_jax.ptq.spec import QuantSpec

PyTree = Any


class _LogitsFn:
    """A jitted ``images -> logits`` function whose shape errors name the `images` argument."""

    def __init__(self, fn: Callable[..., jax.Array], *args: Any) -> None:
        self._jitted = jax.jit(fn)
        self._args = args
        self._seen: set[tuple] = set()

    def __call__(self, images: jax.Array) -> jax.Array:
        key = (getattr(images, "shape", None), str(getattr(images, "dtype", None)))
        if key in self._seen:
            return self._jitted(*self._args, images)
        # Only the first call per input shape is wrapped: a failure there is a failed trace,
        # i.e. inputs the model cannot take; later failures are left as they are.
        try:
            out = self._jitted(*self._args, images)
        except Exception as e:  # noqa: BLE001
            shape = getattr(images, "shape", type(images).__name__)
            raise ValueError(
                f"images: the model cannot be applied to inputs of shape {shape}: {e}"
            ) from e
        self._seen.add(key)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A fake-quantized model: call it on images to get logits (jitted, one compile per shape).

    Attributes:
      model: the Flax model, unchanged.
      variables: its variables after BN folding (``'folded_bias'`` holds the folded biases)
        with every Conv/Dense kernel fake-quantized (dequantized float values).
      graph: the model's Conv/Dense call sites (`taps.Graph`).
      act_ranges: ``{site: (lo, hi)}`` per-tensor range of each quantized layer input.
      w_bits, a_bits: the requested bit-widths (``a_bits`` None: weight-only).
      bits_per_layer: ``{site: (weight bits, input bits or None)}`` actually used.
      bn_pairs: the (conv site, BatchNorm path) pairs folded.
      apply_kwargs: extra keyword arguments of every ``model.apply`` (eval mode).
      report: how it was made: ``method``, and for the reconstruction methods their
        settings, wall time and each block's loss before and after (JSON-ready).
      image_shape: one calibration image's shape (no batch axis), the input an export
        takes; () where unknown.
    """

    model: nn.Module
    variables: PyTree
    graph: taps.Graph
    act_ranges: calibration.Ranges
    w_bits: int
    a_bits: int | None
    bits_per_layer: dict[str, tuple[int, int | None]]
    bn_pairs: tuple[fold.Pair, ...] = ()
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    report: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    image_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        forward = lambda variables, ranges, images: self.apply(variables, images, ranges)
        object.__setattr__(self, "_fn", _LogitsFn(forward, self.variables, self.act_ranges))

    def apply(
        self, variables: PyTree, images: jax.Array, act_ranges: calibration.Ranges | None = None
    ) -> jax.Array:
        """Pure fake-quant forward with the given variables (and ranges, default the stored
        ones); the building block for methods that learn weights or ranges."""
        ranges = self.act_ranges if act_ranges is None else act_ranges
        model_vars, biases = fold.split_folded(variables)

        def fake_quant_input(name: str, x: jax.Array) -> jax.Array:
            lo, hi = ranges[name]
            return quant.fake_quant_asymmetric(x, lo, hi, self.bits_per_layer[name][1])

        model_vars = taps.prepare(model_vars, self.graph)
        with fold.folded(biases, self.bn_pairs), taps.map_inputs(fake_quant_input, ranges):
            return self.model.apply(model_vars, images, **self.apply_kwargs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Logits of the fake-quantized model for a batch of images."""
        return self._fn(images)  # type: ignore[attr-defined]

    def export(self, path: Any, format: str = "stablehlo", **options: Any) -> Any:
        """Writes this model to a file to deploy: see `dnq_jax.ptq.export` (docs/deploy.md)."""
        return _export(self, path, format, **options)


@dataclasses.dataclass(frozen=True, eq=False)
class Calibrated:
    """What every PTQ method starts from: the folded float model, its bit assignment, its
    activation ranges and how weight ranges are found.

    Attributes:
      model, graph, bn_pairs, apply_kwargs: as in `QuantizedModel`.
      variables: the BN-folded float variables (``'folded_bias'`` holds folded biases).
      bits_per_layer: ``{site: (weight bits, input bits or None)}``.
      act_ranges: ``{site: (lo, hi)}`` of each quantized layer input.
      spec: the `QuantSpec` it was calibrated by (its ``w_calibrator`` and
        ``calib_options`` also choose each kernel's per-channel range, for every method).
      image_shape: one calibration image's shape (no batch axis).
    """

    model: nn.Module
    graph: taps.Graph
    variables: PyTree
    bn_pairs: tuple[fold.Pair, ...]
    bits_per_layer: dict[str, tuple[int, int | None]]
    act_ranges: calibration.Ranges
    spec: QuantSpec
    apply_kwargs: Mapping[str, Any]
    image_shape: tuple[int, ...] = ()

    def kernel_bits(self) -> dict[tuple[str, ...], int]:
        """``{kernel path: bits}`` (see `calibration.kernel_bits`)."""
        return calibration.kernel_bits(
            self.graph, {name: w for name, (w, _) in self.bits_per_layer.items()}
        )

    def quantized(self, params: PyTree, act_ranges: calibration.Ranges, **report) -> QuantizedModel:
        """The `QuantizedModel` with these (already fake-quantized) params and ranges."""
        return QuantizedModel(
            model=self.model,
            variables={**self.variables, "params": params},
            graph=self.graph,
            act_ranges=act_ranges,
            w_bits=self.spec.w_bits,
            a_bits=self.spec.a_bits,
            bits_per_layer=self.bits_per_layer,
            bn_pairs=self.bn_pairs,
            apply_kwargs=self.apply_kwargs,
            report=report,
            image_shape=self.image_shape,
        )


def fp32(
    model: nn.Module, variables: PyTree, apply_kwargs: Mapping[str, Any] | None = None
) -> Callable[[jax.Array], jax.Array]:
    """The unquantized model as a jitted ``images -> logits`` function, for `accuracy`."""
    kwargs = dict(apply_kwargs or {})
    return _LogitsFn(lambda v, x: model.apply(v, x, **kwargs), variables)


def accuracy(
    fn: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    labels: jax.Array,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy in percent of ``fn(images)`` logits against integer `labels`.

    `fn` is a `QuantizedModel`, the result of `fp32`, or any ``images -> logits`` callable.
    Runs in batches of `batch_size`; the last batch is padded with zeros to the same shape
    (one compile), and only real images are counted.
    """
    if not callable(fn):
        raise ValueError(f"fn must be a callable images -> logits, got {type(fn)}")
    calibration.check_image_batch(images, "images")
    batch_size = calibration.check_positive_int(batch_size, "batch_size")
    labels = np.asarray(labels)
    n = int(images.shape[0])
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be {n} integer class ids (one per image), got shape "
            f"{labels.shape} and dtype {labels.dtype}"
        )
    xp = np if isinstance(images, np.ndarray) else jnp
    batch_size = min(batch_size, n)
    correct = 0
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        real = int(batch.shape[0])
        if real < batch_size:
            filler = xp.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)
            batch = xp.concatenate([batch, filler])
        predicted = np.asarray(jnp.argmax(fn(batch), axis=-1))[:real]
        correct += int(np.sum(predicted == labels[start : start + real]))
    return 100.0 * correct / n
