"""Per-layer quantization error of any Flax model, measured with the evaluation's quantizers.

`error_setup` runs round-to-nearest PTQ exactly as the evaluation does (`dnq_jax.ptq.quantize`:
BN folding, first and last layer at 8 bits, per-channel weight ranges, per-tensor activation
ranges calibrated on the calibration images), and keeps the full-precision variables next to
the quantized ones. On that setup:

- `weight_errors` / `weight_error_stats`: E = Q_w(W) - W per kernel.
- `activation_error_stats`: e = Q_a(x) - x on every Conv/Dense input x of the
  full-precision model (captured through `taps`), with the calibrated fixed ranges.
- `output_error_decomposition`: for each layer y = W x, the output error of the quantized
  layer y_hat = W_hat x_hat split as in the DNQ paper,
  ``y_hat - y = W (x_hat - x) + (W_hat - W) x + (W_hat - W)(x_hat - x)``
  (activation term, weight term, cross term), each as its mean squared norm relative to
  that of y. Every term is computed by calling the layer itself (`taps.intercept_layers`)
  with the quantized or full-precision input and kernel, so conv, depthwise conv and dense
  layers of any model are handled alike.

The analysis is local to each layer: x is the layer's input in the full-precision model,
not in the quantized one, so the terms say how much error each layer makes, not how much it
inherits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import ptq, quant, taps
from dnq_jax.choices import DECOMPOSITION_TERMS
from dnq_jax.diagnostics.error_stats import ErrorStats, error_stats
from dnq_jax.ptq import fold

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class ErrorSetup:
    """A model quantized as the evaluation quantizes it, with its full-precision twin.

    Attributes:
      qmodel: the `ptq.QuantizedModel` (quantized kernels, activation ranges, bit-widths,
        folded BatchNorm pairs).
      fp_variables: the full-precision variables in the same form as ``qmodel.variables``
        (BN-folded kernels and a ``'folded_bias'`` collection when `fold_bn`).
      fold_bn: whether BatchNorm was folded, i.e. whether the weight error is that of the
        folded kernel (what the evaluation quantizes) or of the stored one.
    """

    qmodel: ptq.QuantizedModel
    fp_variables: PyTree
    fold_bn: bool

    @property
    def graph(self) -> taps.Graph:
        return self.qmodel.graph

    def forward(
        self,
        variables: PyTree,
        images: jax.Array,
        intercept: contextlib.AbstractContextManager | None = None,
    ) -> jax.Array:
        """Forward of `variables` (in this setup's form) on float inputs.

        `intercept` (e.g. `taps.intercept_layers(fn)` or `taps.capture_inputs(store)`) is
        entered inside the BN-folding context, so it is the innermost interceptor: its
        `call` is the bare layer, which may be called several times, and the folded bias
        is added once to what it returns.
        """
        qm = self.qmodel
        model_vars, biases = fold.split_folded(variables)
        with fold.folded(biases, qm.bn_pairs), intercept or contextlib.nullcontext():
            return qm.model.apply(model_vars, images, **qm.apply_kwargs)


def error_setup(
    model: nn.Module,
    variables: PyTree,
    calib_images: jax.Array,
    spec: ptq.QuantSpec | None = None,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    **deprecated: Any,
) -> ErrorSetup:
    """Quantizes `model` by RTN as `dnq_jax.ptq.quantize` does with `spec` (None:
    ``QuantSpec()``, W4A4) and keeps its full-precision variables.

    ``spec.fold_bn`` (default True, the evaluation's protocol) measures the weight error of
    the BN-folded kernels, the ones PTQ actually rounds. With False the stored kernels are
    quantized, as the DNQ profiler measures them; per-channel min-max error of the folded
    kernel is that of the stored one scaled by the channel's BN scale. `apply_kwargs`
    defaults to ``{'train': False}`` (BatchNorm in eval mode); `batch_size` is the images
    per calibration pass. The fields of `QuantSpec` are still taken as keywords in place of
    `spec`, with a DeprecationWarning.
    """
    legacy = ptq.spec.split_legacy(deprecated)
    if deprecated:
        raise TypeError(f"error_setup: unexpected keyword(s) {sorted(deprecated)}")
    spec = ptq.spec.resolve(spec, legacy, "error_setup")
    apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    # The evaluation's own calibration; its folded float variables are the reference.
    cal = ptq.calibrate_model(
        model,
        variables,
        calib_images,
        spec,
        apply_kwargs=apply_kwargs,
        calib_batch_size=batch_size,
    )
    qm = ptq.round_to_nearest(cal)
    if spec.fold_bn:
        fp_vars = cal.variables
    else:
        fp_vars = {**variables, fold.FOLDED_BIAS: {}}
    return ErrorSetup(qmodel=qm, fp_variables=fp_vars, fold_bn=spec.fold_bn)


def weight_errors(setup: ErrorSetup) -> dict[str, jax.Array]:
    """``{site: Q_w(W) - W}`` for each distinct kernel, keyed by its first call site."""
    fp, q = setup.fp_variables["params"], setup.qmodel.variables["params"]
    return {
        layer.name: (
            taps.get_kernel(q, layer).astype(jnp.float32)
            - taps.get_kernel(fp, layer).astype(jnp.float32)
        )
        for layer in setup.graph.kernel_layers()
    }


def weight_error_stats(
    setup: ErrorSetup, bins: int = 64, value_range: tuple[float, float] | None = None
) -> dict[str, ErrorStats]:
    """`error_stats` of Q_w(W) - W for each distinct kernel, keyed by its first call site."""
    return {name: error_stats(e, bins, value_range) for name, e in weight_errors(setup).items()}


def _quantize_input(setup: ErrorSetup, name: str, x: jax.Array) -> jax.Array:
    """x_hat with the site's calibrated range; x itself at a site kept in float."""
    qm = setup.qmodel
    if name not in qm.act_ranges:
        return x
    lo, hi = qm.act_ranges[name]
    return quant.fake_quant_asymmetric(x, lo, hi, qm.bits_per_layer[name][1])


def _padded_batches(n: int, batch_size: int):
    """(indices, number of real images): every batch has `batch_size` rows (one compile);
    the last is filled up with repeats, which the caller drops or masks."""
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        yield np.arange(start, start + batch_size) % n, real


def activation_error_stats(
    setup: ErrorSetup,
    images: jax.Array,
    bins: int = 64,
    *,
    batch_size: int = 128,
    max_capture_bytes: int = 1 << 28,
    value_range: tuple[float, float] | None = None,
) -> dict[str, ErrorStats]:
    """`error_stats` of Q_a(x) - x on each activation-quantized site's input over `images`.

    x is the site's input in the full-precision model; Q_a uses the setup's calibrated
    per-tensor range (pass the calibration images to see the error PTQ was tuned on, or
    other images to see how it generalises). The KS distance needs the whole sample, so the
    errors of a group of sites are held at once, groups sized to `max_capture_bytes`.
    """
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("images: the image set is empty")
    batch_size = min(batch_size, n)
    sites = [s for s in setup.graph.names if s in setup.qmodel.act_ranges]
    groups: list[list[str]] = [[]]
    used = 0
    for site in sites:
        size = 4 * n * math.prod(setup.graph[site].input_shape[1:])
        if groups[-1] and used + size > max_capture_bytes:
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += size
    out: dict[str, ErrorStats] = {}
    for group in groups:
        grab = _error_grabber(setup, tuple(group))
        parts: dict[str, list[jax.Array]] = {site: [] for site in group}
        for idx, real in _padded_batches(n, batch_size):
            store = grab(setup.fp_variables, images[idx])
            for site in group:
                parts[site].append(store[site][:real].reshape(-1))
        for site in group:
            out[site] = error_stats(jnp.concatenate(parts[site]), bins, value_range)
    return out


def _error_grabber(setup: ErrorSetup, sites: tuple[str, ...]):
    def reduce(name: str, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        return (_quantize_input(setup, name, xf) - xf).reshape(x.shape[0], -1)

    @jax.jit
    def grab(variables: PyTree, batch: jax.Array) -> dict[str, jax.Array]:
        store: dict[str, jax.Array] = {}
        setup.forward(variables, batch, taps.capture_inputs(store, only=sites, reduce=reduce))
        return store

    return grab


def _per_image_sq(t: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(t.astype(jnp.float32)).reshape(t.shape[0], -1), axis=1)


def output_error_decomposition(
    setup: ErrorSetup, images: jax.Array, *, batch_size: int = 128
) -> dict[str, dict[str, float]]:
    """Per call site, the quantized layer's output error split into its three terms.

    With y = W x the layer's output without bias (bias, own or folded, cancels in every
    difference and is left out of ||y|| as in the paper's y = W x), returns for each site::

        activation: sum ||W (x_hat - x)||^2          / sum ||y||^2
        weight:     sum ||(W_hat - W) x||^2          / sum ||y||^2
        cross:      sum ||(W_hat - W)(x_hat - x)||^2 / sum ||y||^2
        total:      sum ||W_hat x_hat - W x||^2      / sum ||y||^2
        y_sq:       mean over images of ||y||^2

    sums over `images`. x is the layer's input in the full-precision model. A site kept in
    float (no activation range) has x_hat = x; a kernel shared by several sites has one
    quantized version, used at each of them.
    """
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("images: the image set is empty")
    batch_size = min(batch_size, n)
    run = _decomposition_fn(setup)
    sums: dict[str, np.ndarray] | None = None
    for idx, real in _padded_batches(n, batch_size):
        mask = jnp.asarray(np.arange(batch_size) < real, jnp.float32)
        part = run(setup.fp_variables, setup.qmodel.variables, images[idx], mask)
        part = jax.tree.map(lambda v: np.asarray(v, np.float64), part)
        sums = part if sums is None else jax.tree.map(np.add, sums, part)
    assert sums is not None
    out = {}
    for site in setup.graph.names:
        y_sq = sums[site]["y"]
        denom = max(float(y_sq), np.finfo(np.float64).tiny)
        out[site] = {term: float(sums[site][term]) / denom for term in DECOMPOSITION_TERMS}
        out[site]["y_sq"] = float(y_sq) / n
    return out


def _decomposition_fn(setup: ErrorSetup):
    @jax.jit
    def run(fp_vars: PyTree, q_vars: PyTree, batch: jax.Array, mask: jax.Array):
        fp_out: dict[str, tuple[jax.Array, jax.Array, jax.Array]] = {}
        sums: dict[str, dict[str, jax.Array]] = {}

        def outputs(name: str, x: jax.Array, call) -> tuple[jax.Array, jax.Array, jax.Array]:
            # A Flax module may run only once per intercepted call (a second call would
            # create its params again), so x, x_hat and 0 go through the layer as one stack
            # on a new leading axis: Conv and Dense treat leading axes as batch axes.
            # call(0) is the layer's bias (zero input, zero padding), so y = call(x) - call(0).
            stacked = call(jnp.stack([x, _quantize_input(setup, name, x), jnp.zeros_like(x)]))
            out = stacked.astype(jnp.float32)
            return stacked[0], out[0] - out[2], out[1] - out[2]

        def full_precision(name: str, x: jax.Array, call) -> jax.Array:
            out, y, y_a = outputs(name, x, call)
            fp_out[name] = (x, y, y_a)
            return out

        def quantized(name: str, x_ignored: jax.Array, call) -> jax.Array:
            # Fed the full-precision model's input, not the quantized model's own: the
            # decomposition is of this layer's error alone. The output returned only has to
            # have the right shape, since every later layer is fed its own input as well.
            x, y, y_a = fp_out[name]
            out, y_w, y_wa = outputs(name, x, call)
            terms = {
                "y": y,
                "activation": y_a - y,
                "weight": y_w - y,
                # Grouped as the change of the activation error's effect with the kernel, so
                # the two first-order parts cancel before the small remainder is formed.
                "cross": (y_wa - y_w) - (y_a - y),
                "total": y_wa - y,
            }
            if name not in setup.qmodel.act_ranges:
                # x_hat = x: both terms are exactly zero, not rounding noise.
                terms["activation"] = terms["cross"] = jnp.zeros_like(y)
            sums[name] = {k: jnp.sum(_per_image_sq(t) * mask) for k, t in terms.items()}
            return out

        setup.forward(fp_vars, batch, taps.intercept_layers(full_precision))
        setup.forward(q_vars, batch, taps.intercept_layers(quantized))
        return sums

    return run
