"""The DNQ error profiler: statistics of the quantization error PTQ will make (docs/method.md).

WQE (weight quantization error): E = Q_w(W) - W per kernel, summarised per output channel
by its mean and standard deviation. AQE (activation quantization error): e = Q_a(x) - x on
each Conv/Dense input over the calibration images, summarised per call site by two scalars.
The quantizers are those of `dnq_jax.quant`, the code evaluation uses, so the noise the
trainer injects models the error that will actually be made. The statistics are a pytree
(`NoiseStats`) that lives in the train state and is smoothed by an EMA across measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from dnq_jax import quant, taps
from dnq_jax.choices import ERROR_SIGNS, W_QUANTIZERS
from dnq_jax.ptq import spec as spec_lib
from dnq_jax.ptq.calibration import assign_bits, quantize_kernel
from dnq_jax.ptq.spec import QuantSpec

PyTree = Any


@flax.struct.dataclass
class NoiseStats:
    """Error statistics of every layer; a pytree, so it is jitted, checkpointed and sharded.

    Every table is keyed by site name (`taps.Layer.name`).

    Attributes:
      w_mu, w_sigma: kernel site name (one per kernel: `graph.kernel_layers()`; each
        iteration of a scanned stack is its own kernel, its slice of the stacked one) ->
        (C_out,) float32: per-output-channel mean and standard deviation of Q_w(W) - W.
      a_mu, a_sigma: site name (every call site: `graph.layers`) -> float32 scalar: mean and
        standard deviation of Q_a(x) - x on that site's input.
      count: int32 scalar, the number of measurements folded in so far (0 = none yet).
    """

    w_mu: dict[str, jax.Array]
    w_sigma: dict[str, jax.Array]
    a_mu: dict[str, jax.Array]
    a_sigma: dict[str, jax.Array]
    count: jax.Array


def layer_bits(
    graph: taps.Graph, w_bits: int, a_bits: int, keep_ends_8bit: bool = True
) -> dict[str, tuple[int, int]]:
    """Site name -> (weight bits, input-activation bits): the evaluation's own assignment
    (`ptq.assign_bits`, first and last site at 8 bits when `keep_ends_8bit`), so the profiled
    error is the error PTQ will make.

    A kernel shared by several sites is quantized once, with the bits of its first site
    (the one `graph.kernel_layers()` and `taps.map_kernels` use).

    Raises:
      ValueError: if w_bits or a_bits is not an int in 2..16.
    """
    return assign_bits(graph, w_bits, a_bits, keep_ends_8bit)


def init_stats(graph: taps.Graph) -> NoiseStats:
    """All-zero statistics with count 0, shaped for `graph`; the first EMA update replaces them."""
    # Separate arrays for every entry: a donated train state must not hold one buffer twice.
    channels = lambda: {
        k.name: jnp.zeros((k.out_channels,), jnp.float32) for k in graph.kernel_layers()
    }
    sites = lambda: {name: jnp.zeros((), jnp.float32) for name in graph.names}
    return NoiseStats(
        w_mu=channels(),
        w_sigma=channels(),
        a_mu=sites(),
        a_sigma=sites(),
        count=jnp.zeros((), jnp.int32),
    )


def _weight_error_stats(
    kernel: jax.Array, bits: int, spec: QuantSpec, kind: str, quantizer: str, sign: float
) -> tuple[jax.Array, jax.Array]:
    w = kernel.astype(jnp.float32)
    axes = tuple(range(w.ndim - 1))
    if quantizer == "evaluation":
        # The evaluation's weight quantizer itself (per output channel, asymmetric).
        err = sign * (quantize_kernel(w, bits, spec.w_calibrator, **spec.calib_options) - w)
        return jnp.mean(err, axis=axes), jnp.std(err, axis=axes)
    # The authors' profiler: symmetric, scale max|W| / (2^(b-1) - 1), per output channel for
    # a conv and per tensor for a dense layer, whose error is summarised per tensor too.
    per_channel = kind == "conv"
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True) if per_channel else jnp.max(jnp.abs(w))
    err = sign * (quant.fake_quant_symmetric(w, absmax, bits) - w)
    if per_channel:
        return jnp.mean(err, axis=axes), jnp.std(err, axis=axes)
    ones = jnp.ones((w.shape[-1],), jnp.float32)
    return jnp.mean(err) * ones, jnp.std(err) * ones


def make_profiler(
    model,
    graph: taps.Graph,
    spec: QuantSpec | None = None,
    *,
    w_quantizer: str = "evaluation",
    error_sign: str = "paper",
    apply_kwargs: Mapping[str, Any] | None = None,
    **deprecated: Any,
) -> Callable[[PyTree, jax.Array], NoiseStats]:
    """A function measuring the WQE/AQE statistics once: fn(variables, calib_images).

    `spec` is the quantization whose error is modelled, the evaluation's `QuantSpec`: its
    bit-widths (``a_bits`` may not be None: the activation error is profiled too), its
    8-bit ends, its calibrators and their options. Its ``fold_bn`` is not read: the error
    is measured on the unfolded kernel the model trains (see the comment in `profile`).
    The fields of `QuantSpec` are still taken as keywords in place of `spec`, with a
    DeprecationWarning.

    `w_quantizer='evaluation'` (the default) models the weight error of the evaluation's own
    quantizer (asymmetric per output channel, the 8-bit ends at 8 bits); 'symmetric' that
    of the authors' profiler: symmetric with scale max|W| / (2^(b-1) - 1), per output
    channel for convs and per tensor for dense layers, every kernel at ``spec.w_bits``.
    `error_sign='paper'` measures Q(x) - x, 'authors' x - Q(x) (weights and activations),
    which flips the sign of the modelled means.

    The function is pure and jittable (wrap it in `jax.jit`); it returns one fresh
    measurement (count = 1), to be folded into the running statistics with `ema_update`.
    `apply_kwargs` are passed to `model.apply` (default `{'train': False}`: BatchNorm in
    eval mode, as the evaluation sees it).

    Raises:
      ValueError: on a weight-only spec, or a bad spec field given as a keyword.
      TypeError: without a spec.
    """
    legacy = spec_lib.split_legacy(deprecated)
    if deprecated:
        raise TypeError(f"make_profiler: unexpected keyword(s) {sorted(deprecated)}")
    spec = spec_lib.resolve(spec, legacy, "make_profiler", required=True)
    if spec.a_bits is None:
        raise ValueError("spec.a_bits: the profiler models activation error too; not None")
    if w_quantizer not in W_QUANTIZERS:
        raise ValueError(f"w_quantizer must be one of {W_QUANTIZERS}, got {w_quantizer!r}")
    if error_sign not in ERROR_SIGNS:
        raise ValueError(f"error_sign must be one of {ERROR_SIGNS}, got {error_sign!r}")
    sign = 1.0 if error_sign == "paper" else -1.0
    bits = layer_bits(graph, spec.w_bits, spec.a_bits, spec.keep_ends_8bit)
    if w_quantizer == "symmetric":  # the authors' profiler keeps no layer at 8 bits
        bits = {name: (spec.w_bits, ab) for name, (_, ab) in bits.items()}
    apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    kernels = graph.kernel_layers()

    def activation_error(name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Reduced inside the forward pass: only two scalars per site outlive the layer call.
        b = bits[name][1]
        xf = x.astype(jnp.float32)
        lo, hi = quant.calibrate(xf, b, method=spec.a_calibrator, **spec.calib_options)
        err = sign * (quant.fake_quant_asymmetric(xf, lo, hi, b) - xf)
        return jnp.mean(err), jnp.std(err)

    def profile(variables: PyTree, calib_images: jax.Array) -> NoiseStats:
        # WQE is measured on the unfolded kernel, the one the model trains and the noise is
        # added to. Per-channel quantization is scale-equivariant per output channel: folding
        # BN multiplies channel c by a_c = gamma_c / sqrt(var_c + eps), which scales its
        # range, step and error alike (a clipping search picks the same ratio), so for
        # a_c > 0 the folded kernel's error is this one times a_c. A negative a_c mirrors the
        # channel, which only changes how ties round.
        params = variables["params"]
        w_stats = {
            k.name: _weight_error_stats(
                taps.get_kernel(params, k),
                bits[k.name][0],
                spec,
                k.kind,
                w_quantizer,
                sign,
            )
            for k in kernels
        }
        store: dict[str, tuple[jax.Array, jax.Array]] = {}
        with taps.capture_inputs(store, reduce=activation_error):
            if graph.lifted:
                # Sites inside lifted transforms hand their values back through the params.
                _, state = model.apply(
                    taps.prepare(variables, graph),
                    calib_images,
                    mutable=[taps.COLLECTION],
                    **apply_kwargs,
                )
            else:
                model.apply(variables, calib_images, **apply_kwargs)
        if graph.lifted:
            taps.collect(store, state, graph)
        missing = [n for n in graph.names if n not in store]
        if missing:
            raise ValueError(
                f"calib_images: the forward pass did not reach sites {missing}; "
                "was the graph traced with the same model and apply arguments?"
            )
        return NoiseStats(
            w_mu={name: m for name, (m, _) in w_stats.items()},
            w_sigma={name: sd for name, (_, sd) in w_stats.items()},
            a_mu={name: store[name][0] for name in graph.names},
            a_sigma={name: store[name][1] for name in graph.names},
            count=jnp.ones((), jnp.int32),
        )

    return profile


def ema_update(stats: NoiseStats, new: NoiseStats, decay: float = 0.9) -> NoiseStats:
    """Folds one measurement into the running statistics: decay * old + (1 - decay) * new.

    The first measurement (stats.count == 0) replaces the zeros instead of being shrunk
    towards them. Jittable: the choice is a `jnp.where` on count, not a Python branch.

    Raises:
      ValueError: if decay is not in [0, 1), or the two stats do not have the same structure.
    """
    if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if jax.tree_util.tree_structure(stats) != jax.tree_util.tree_structure(new):
        raise ValueError("new: its layers do not match those of stats")
    first = stats.count == 0

    def fold(old: jax.Array, cur: jax.Array) -> jax.Array:
        return jnp.where(first, cur, decay * old + (1.0 - decay) * cur).astype(old.dtype)

    folded = jax.tree_util.tree_map(fold, stats, new)
    return folded.replace(count=stats.count + 1)


def stats_summary(stats: NoiseStats) -> dict[str, jax.Array]:
    """Scalar magnitudes for logging, each channel (weights) or site (activations) counted once.

    Keys: 'w_mu_abs' (mean |w_mu|), 'w_sigma' (mean w_sigma), 'a_mu_abs' (mean |a_mu|),
    'a_sigma' (mean a_sigma).
    """
    flat = lambda table: jnp.concatenate([jnp.ravel(v) for v in table.values()])
    return {
        "w_mu_abs": jnp.mean(jnp.abs(flat(stats.w_mu))),
        "w_sigma": jnp.mean(flat(stats.w_sigma)),
        "a_mu_abs": jnp.mean(jnp.abs(flat(stats.a_mu))),
        "a_sigma": jnp.mean(flat(stats.a_sigma)),
    }
