"""DNQ noise: differential weight noise and stochastic activation drop-in (docs/method.md).

Read top-down:

- `step_keys(noise_key, t)`: the keys of step t and of step t - 1, both folded from the step
  number (never a chained split), so step t can regenerate what step t - 1 drew.
- `weight_noise(params, graph, stats, k_t, k_prev, lam)`: the params the forward pass sees,
  W + lam * sigma * (z(k_t) - z(k_prev)) on every kernel (`differential`, the default).
- `activation_noise_fn(graph, stats, key, lam, batch=...)`: the drop-in x + M * eps on every
  Conv/Dense input, for `taps.map_inputs`.

Random numbers are laid out flat: z(k) = jax.random.normal(k, (total,)) covers all kernels,
kernel i (in `graph.kernel_layers()` order) owning elements [o_i, o_i + n_i); likewise one
draw of random bits of shape (batch, S) covers all layer inputs. One draw per step instead of
one per layer keeps the compiled step small: every PRNG call is a computation of its own for
XLA to compile. Statistics (`NoiseStats`) are looked up by site name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import prng, taps
from dnq_jax.choices import DISTS, MASKS, WEIGHT_MODES
from dnq_jax.dnq.profiler import NoiseStats

PyTree = Any
Shape = tuple[int, ...]


def step_keys(noise_key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(k_t, k_{t-1}) = (fold_in(noise_key, step), fold_in(noise_key, step - 1)).

    `step` may be traced. Step 0's "previous" key folds in -1 taken modulo 2^32, a value no
    real step reaches, so it is still distinct from every k_t. Both keys come from one
    batched fold_in (its rows equal the separate calls).
    """
    step = jnp.asarray(step, jnp.int32)
    steps = jnp.stack([step, step - 1]).astype(jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(noise_key, steps)
    return keys[0], keys[1]


# --- Weights -------------------------------------------------------------------------------


def weight_noise(
    params: PyTree,
    graph: taps.Graph,
    stats: NoiseStats,
    key_t: jax.Array,
    key_prev: jax.Array,
    lam,
    *,
    mode: str = "differential",
    dist: str = "gaussian",
) -> PyTree:
    """The params the forward pass sees at this step: kernels perturbed, the rest untouched.

    With D(k) = mu + sigma * z(k) per output channel (z(k) the kernel's piece of the step's
    flat normal draw, see the module docstring):
      differential: W + lam * (D(k_t) - D(k_prev)) = W + lam * sigma * (z(k_t) - z(k_prev));
      naive:        W + lam * D(k_t);
      accumulate:   params unchanged (the trainer adds `weight_sample` after the update).
    `dist='uniform'` draws z uniform with mean 0 and variance 1 instead of N(0, 1), so D has
    the same mean and variance but bounded support. The noise does not depend on params, so
    the gradient taken at the noisy point lands on the latent weights unchanged.

    Raises:
      ValueError: on an unknown `mode` or stats that do not fit the graph.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    _check_dist(dist)
    _check_weight_stats(graph, stats)
    if mode == "accumulate":
        return params
    lam = jnp.asarray(lam, jnp.float32)
    shapes = _kernel_shapes(graph)

    def normals() -> jax.Array:
        # mu cancels in D(k_t) - D(k_prev); z(k_prev) is bit for bit the draw step t - 1
        # made, so consecutive perturbations telescope.
        z = _standard(key_t, graph, dist)
        return z - _standard(key_prev, graph, dist) if mode == "differential" else z

    z = _unless_zero(lam, normals, (sum(math.prod(s) for s in shapes),))
    pieces = dict(zip(_kernel_names(graph), _cut(z, shapes)))

    def perturb(layer: taps.Layer, w: jax.Array) -> jax.Array:
        sigma = jnp.asarray(stats.w_sigma[layer.name], jnp.float32)
        d = sigma * pieces[layer.name]
        if mode == "naive":
            d = jnp.asarray(stats.w_mu[layer.name], jnp.float32) + d
        return w + (lam * d).astype(w.dtype)

    return taps.map_kernels(params, graph.kernel_layers(), perturb)


def kernel_samples(
    graph: taps.Graph, stats: NoiseStats, key: jax.Array, dist: str = "gaussian"
) -> dict[str, jax.Array]:
    """D(key) = mu + sigma * z(key): kernel site name -> float32 sample shaped like the kernel.

    What `weight_noise` adds (times lam) in `naive` mode at the step whose key is `key`.

    Raises:
      ValueError: on stats that do not fit the graph.
    """
    _check_dist(dist)
    _check_weight_stats(graph, stats)
    pieces = _cut(_standard(key, graph, dist), _kernel_shapes(graph))
    return {
        name: jnp.asarray(stats.w_mu[name], jnp.float32)
        + jnp.asarray(stats.w_sigma[name], jnp.float32) * z
        for name, z in zip(_kernel_names(graph), pieces)
    }


def weight_sample(
    params: PyTree,
    graph: taps.Graph,
    stats: NoiseStats,
    key_t: jax.Array,
    lam,
    dist: str = "gaussian",
) -> PyTree:
    """A params-shaped pytree holding lam * D(k_t) on each kernel and zeros elsewhere.

    The `accumulate` ablation adds it to the params after the optimizer update, so the noise
    and its mean mu_w pile up in the stored weights.

    Raises:
      ValueError: on stats that do not fit the graph.
    """
    lam = jnp.asarray(lam, jnp.float32)
    samples = kernel_samples(graph, stats, key_t, dist)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    sample = lambda layer, w: (lam * samples[layer.name]).astype(w.dtype)
    return taps.map_kernels(zeros, graph.kernel_layers(), sample)


def _standard(key: jax.Array, graph: taps.Graph, dist: str) -> jax.Array:
    """z(key): one flat draw of mean 0 and variance 1 over the elements of all kernels,
    N(0, 1) or uniform on [-sqrt(3), sqrt(3)]."""
    total = sum(math.prod(s) for s in _kernel_shapes(graph))
    if dist == "uniform":
        return jax.random.uniform(key, (total,), jnp.float32, -_SQRT3, _SQRT3)
    return jax.random.normal(key, (total,), jnp.float32)


_SQRT3 = math.sqrt(3.0)


def _check_dist(dist: str) -> None:
    if dist not in DISTS:
        raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")


def _kernel_names(graph: taps.Graph) -> list[str]:
    return [layer.name for layer in graph.kernel_layers()]


def _kernel_shapes(graph: taps.Graph) -> list[Shape]:
    return [layer.kernel_shape for layer in graph.kernel_layers()]


def _check_weight_stats(graph: taps.Graph, stats: NoiseStats) -> None:
    for layer in graph.kernel_layers():
        for field in ("w_mu", "w_sigma"):
            table = getattr(stats, field)
            if layer.name not in table:
                raise ValueError(
                    f"stats.{field} has no entry for kernel {layer.name!r} (it has "
                    f"{sorted(table)}); were the stats made for this graph?"
                )
            if jnp.shape(table[layer.name]) != (layer.out_channels,):
                raise ValueError(
                    f"stats.{field}[{layer.name!r}] has shape {jnp.shape(table[layer.name])}, "
                    f"but the kernel has {layer.out_channels} output channels"
                )


# --- Layer inputs --------------------------------------------------------------------------


def activation_noise_fn(
    graph: taps.Graph,
    stats: NoiseStats,
    key: jax.Array,
    lam,
    *,
    batch: int,
    rho=0.5,
    mask: str = "uniform",
    tau=1.0,
    dist: str = "gaussian",
    sites: tuple[str, ...] | None = None,
) -> Callable[[str, jax.Array], jax.Array]:
    """fn(site name, x) -> the drop-in of x (`activation_dropin`'s law), for `taps.map_inputs`.

    The site uses its piece of `site_bits(key, graph, batch)` and stats.a_mu[name],
    stats.a_sigma[name]. `sites` (default: every site) limits the drop-in to those sites:
    the others pass their input unchanged, and the draw covers only the chosen ones. The bits
    are drawn here, once for all sites, so every input must be a batch of `batch` examples,
    each shaped as when the graph was traced (trace with a training-shaped batch).

    Raises:
      ValueError: on bad rho/mask/tau/batch or stats without an entry per site; the returned
        fn raises it for a site name the graph does not know or an input of another shape.
    """
    _check_dropin_args(rho, mask, tau)
    _check_dist(dist)
    _check_batch(batch)
    names = graph.names if sites is None else tuple(sites)
    unknown = [n for n in names if n not in graph.names]
    if unknown:
        raise ValueError(f"sites: {unknown} are not in the graph {graph.names}")
    missing = [n for n in names if n not in stats.a_mu or n not in stats.a_sigma]
    if missing:
        raise ValueError(f"stats.a_mu / a_sigma have no entry for sites {missing}")
    shapes = [tuple(graph[n].input_shape[1:]) for n in names]
    total = sum(math.prod(s) for s in shapes)
    bits = lambda: prng.flat_draw(jax.random.bits, key, (int(batch), total), dtype=jnp.uint32)
    if mask == "uniform":
        # The mask rate does not depend on x, so all sites' noise is one elementwise
        # computation over the whole draw, each site adding its piece.
        mu = _spread([stats.a_mu[n] for n in names], shapes)
        sigma = _spread([stats.a_sigma[n] for n in names], shapes)
        draw = lambda: _dropin_noise(bits(), lam, mu, sigma, jnp.float32(rho), dist)
        pieces = dict(zip(names, _cut(_unless_zero(lam, draw, (batch, total)), shapes)))
    else:
        pieces = dict(zip(names, _cut(bits(), shapes)))

    def fn(name: str, x: jax.Array) -> jax.Array:
        if name not in pieces:
            if name in graph.names:  # a site left out by `sites`
                return x
            raise ValueError(f"name: site {name!r} is not in the graph {graph.names}")
        if x.shape != pieces[name].shape:
            raise ValueError(
                f"site {name!r} got an input of shape {x.shape}, but the noise was drawn for "
                f"{pieces[name].shape} (batch {batch}, the graph's traced shape "
                f"{graph[name].input_shape}); trace the graph with inputs shaped like "
                "the training batch"
            )
        noise = pieces[name]
        if mask == "salience":
            p = _mask_probability(x, rho, mask, tau)
            noise = _dropin_noise(noise, lam, stats.a_mu[name], stats.a_sigma[name], p, dist)
        return x + noise.astype(x.dtype)

    return fn


def activation_dropin(
    key: jax.Array,
    x: jax.Array,
    lam,
    mu,
    sigma,
    *,
    rho=0.5,
    mask: str = "uniform",
    tau=1.0,
    dist: str = "gaussian",
) -> jax.Array:
    """x + M * eps with M ~ Bernoulli(p) and eps ~ N(lam mu, (lam sigma)^2), elementwise.

    `dist='uniform'`: eps uniform with that mean and variance instead.

    p is `rho` (`uniform`) or, for `salience`, p_c = clip(rho * C * softmax(mean|x|_c / tau),
    0, 1) per channel c of the last axis (no gradient flows through p). The result has x's
    dtype; lam == 0 returns x exactly.

    Raises:
      ValueError: on an unknown `mask`, rho outside [0, 1] or a non-positive tau.
    """
    _check_dropin_args(rho, mask, tau)
    _check_dist(dist)
    bits = prng.flat_draw(jax.random.bits, key, x.shape, dtype=jnp.uint32)
    eps = _dropin_noise(bits, lam, mu, sigma, _mask_probability(x, rho, mask, tau), dist)
    # Drawn in float32 so bf16 inputs do not get a coarse uniform grid; only the finished
    # noise is cast.
    return x + eps.astype(x.dtype)


def site_bits(key: jax.Array, graph: taps.Graph, batch: int) -> dict[str, jax.Array]:
    """Site name -> uint32 random bits shaped like that site's input at batch size `batch`.

    One draw of shape (batch, S), S the summed per-example input size of all sites in
    graph.layers order; site i takes columns [o_i, o_i + s_i), reshaped. The batch axis comes
    first, so under a batch-sharded jit every device draws the rows of its own examples.

    Raises:
      ValueError: if `batch` is not a positive int.
    """
    _check_batch(batch)
    return dict(zip(graph.names, _cut(_site_draw(key, graph, batch), _site_shapes(graph))))


def _dropin_noise(bits: jax.Array, lam, mu, sigma, p, dist: str = "gaussian") -> jax.Array:
    """M * eps (float32) from 32 random bits per element; see `activation_dropin`.

    One uniform per element serves both the mask and the Gaussian: u = (k + 1/2) 2^-23, k
    the top 23 bits, lies on the midpoint grid of [0, 1). M = (u < p); given M, v = u / p is
    uniform on [0, 1), so Phi^-1(v) = sqrt(2) erfinv(2v - 1) is N(0, 1) on the masked
    elements (for `dist='uniform'`, sqrt(3) (2v - 1) is uniform with mean 0, variance 1).
    The clip only guards rounding at 1 and p = 0, so no NaN reaches a gradient.
    """
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0**-23)
    keep = u < p
    v = jnp.clip(u / jnp.maximum(p, 2.0**-23), 2.0**-24, 1.0 - 2.0**-24)
    if dist == "uniform":
        z = _SQRT3 * (2.0 * v - 1.0)
    else:
        z = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * v - 1.0)
    lam = jnp.asarray(lam, jnp.float32)
    eps = lam * (jnp.asarray(mu, jnp.float32) + jnp.asarray(sigma, jnp.float32) * z)
    return jnp.where(keep, eps, 0.0)


def _mask_probability(x: jax.Array, rho, mask: str, tau) -> jax.Array:
    """Drop-in probability: the scalar rho, or per channel (last axis) for `salience`."""
    rho = jnp.asarray(rho, jnp.float32)
    if mask == "uniform":
        return rho
    c = x.shape[-1]
    score = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
    # rho * C * softmax averages to rho over channels; the clip at 1 does not hand the excess
    # to other channels, so a very peaked softmax lowers the mean rate below rho.
    p = rho * c * jax.nn.softmax(score / tau)
    return jax.lax.stop_gradient(jnp.clip(p, 0.0, 1.0))


def _site_shapes(graph: taps.Graph) -> list[Shape]:
    """Per-example input shapes of the sites, graph.layers order."""
    return [tuple(layer.input_shape[1:]) for layer in graph.layers]


def _site_draw(key: jax.Array, graph: taps.Graph, batch: int) -> jax.Array:
    total = sum(math.prod(s) for s in _site_shapes(graph))
    return prng.flat_draw(jax.random.bits, key, (int(batch), total), dtype=jnp.uint32)


def _check_dropin_args(rho, mask: str, tau) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    # rho and tau are static settings; a traced value cannot be checked and is let through.
    if isinstance(rho, (int, float, np.number)) and not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if isinstance(tau, (int, float, np.number)) and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")


def _check_batch(batch) -> None:
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


# --- Layout helpers ------------------------------------------------------------------------


def _cut(a: jax.Array, shapes: list[Shape]) -> list[jax.Array]:
    """The pieces of `a`'s last axis laid out by `shapes`, each reshaped to a.shape[:-1] + shape."""
    o = np.cumsum([0] + [math.prod(s) for s in shapes])
    return [a[..., o[i] : o[i + 1]].reshape(a.shape[:-1] + s) for i, s in enumerate(shapes)]


def _spread(values, shapes: list[Shape]) -> jax.Array:
    """values[i] broadcast over shapes[i], flat and concatenated."""
    return jnp.concatenate(
        [jnp.broadcast_to(jnp.asarray(v, jnp.float32), s).ravel() for v, s in zip(values, shapes)]
    )


def _unless_zero(lam, fn: Callable[[], jax.Array], shape: Shape) -> jax.Array:
    """fn() (float32 of `shape`) where lam != 0, zeros where lam == 0, on every backend.

    On XLA:CPU, fn runs inside a conditional: XLA:CPU fuses an elementwise producer into
    every consumer, so a draw that feeds all layers would have its inverse-CDF code compiled
    once per layer, while a conditional's result is computed once into its own buffer. GPU/TPU
    keep the fused form, which never writes the draw to memory. See docs/design.md.
    """
    on = jnp.asarray(lam, jnp.float32) != 0
    return jax.lax.platform_dependent(on, cpu=_in_conditional(fn, shape), default=_fused(fn))


def _in_conditional(fn: Callable[[], jax.Array], shape: Shape) -> Callable:
    return lambda on: jax.lax.cond(on, fn, lambda: jnp.zeros(shape, jnp.float32))


def _fused(fn: Callable[[], jax.Array]) -> Callable:
    return lambda on: jnp.where(on, fn(), 0.0)
