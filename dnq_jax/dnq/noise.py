"""DNQ noise: differential weight noise and stochastic activation drop-in (DESIGN section 3).

Everything is a pure function of explicit PRNG keys. Keys are derived, never chained: the
step key is fold_in(noise_key, step), and a step makes one draw for all its kernels and one
for all its layer inputs, each layer taking a disjoint piece. So the sample a step drew can be
regenerated later from the step number alone (which lets the differential form subtract the
previous step's sample without storing it), and no two layers or steps share random numbers.
One draw per step rather than one per layer also keeps the compiled step small: every PRNG
call is a separate computation for XLA to compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dnq_jax import taps
from dnq_jax.dnq.profiler import NoiseStats

PyTree = Any

WEIGHT_MODES = ("differential", "naive", "accumulate")
MASKS = ("uniform", "salience")


def step_keys(noise_key: jax.Array, step) -> tuple[jax.Array, jax.Array]:
    """(k_t, k_{t-1}) = (fold_in(noise_key, step), fold_in(noise_key, step - 1)).

    `step` may be traced. Step 0's "previous" key folds in -1 taken modulo 2^32, a value no
    real step reaches, so it is still distinct from every k_t.
    """
    step = jnp.asarray(step, jnp.int32)
    prev = (step - 1).astype(jnp.uint32)
    return jax.random.fold_in(noise_key, step.astype(jnp.uint32)), jax.random.fold_in(
        noise_key, prev
    )


def _flat_draw(draw: Callable, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    # XLA:CPU compiles threefry for an N-d shape several times slower than for the flat one
    # (seconds per draw for 4-d conv tensors); with partitionable threefry, the default, the
    # flat draw reshaped holds the very same values, and the reshape is free.
    return draw(key, (math.prod(shape),), dtype).reshape(shape)


def _kernel_stats(graph: taps.Graph, stats: NoiseStats) -> dict[tuple[str, ...], int]:
    """Kernel path -> index into stats.w_mu, after checking the stats fit the graph."""
    kernels = graph.kernel_layers()
    if len(stats.w_mu) != len(kernels) or len(stats.w_sigma) != len(kernels):
        raise ValueError(
            f"stats has {len(stats.w_mu)} weight entries but the graph has {len(kernels)} kernels"
        )
    for i, layer in enumerate(kernels):
        for name, value in (("w_mu", stats.w_mu[i]), ("w_sigma", stats.w_sigma[i])):
            if jnp.shape(value) != (layer.out_channels,):
                raise ValueError(
                    f"stats.{name}[{i}] has shape {jnp.shape(value)}, but kernel "
                    f"{layer.name!r} has {layer.out_channels} output channels"
                )
    return {layer.path: i for i, layer in enumerate(kernels)}


def per_key(fn: Callable, keys: jax.Array, *args: jax.Array) -> jax.Array:
    """stack([fn(keys[i], args[0][i], ...) for i]): one vmapped call for threefry keys.

    Vmapped threefry draws equal the separate ones, and one batched PRNG computation
    compiles faster than several. Vmapped `rbg`/`unsafe_rbg` draws do not equal the separate
    ones (JAX batches their bit generator into a single draw), so for those it loops.
    """
    if str(jax.random.key_impl(keys)) == "threefry2x32":
        return jax.vmap(fn)(keys, *args)
    return jnp.stack([fn(keys[i], *(a[i] for a in args)) for i in range(keys.shape[0])])


def _once(lam, fn: Callable[[], jax.Array], shape: tuple[int, ...]) -> jax.Array:
    """fn() (float32 of `shape`), computed into its own buffer on XLA:CPU; zeros if lam == 0.

    XLA:CPU fuses an elementwise producer into each of its consumers, so the inverse-CDF
    code of a draw that feeds every layer was compiled once per layer (about 180
    instructions each time) and the step compiled ~1.6x larger. A conditional's result is
    always materialized, so there the draw sits in one: compiled once, skipped when
    lam == 0, where the noise it feeds is zero anyway. GPU/TPU keep the fused form, which
    never writes the draw to memory. Both give the same perturbed values (to float
    rounding) for finite statistics; at lam == 0 they differ in d/d(lam), which training
    does not use, and where `fn` itself turns non-finite statistics into NaN (the uniform
    drop-in), the CPU form returns zeros instead. Statistics applied outside `fn` (the
    weight noise's sigma and mu) reach the result on both backends alike.
    """
    if jax.default_backend() != "cpu":
        return fn()
    zeros = lambda: jnp.zeros(shape, jnp.float32)
    return jax.lax.cond(jnp.asarray(lam, jnp.float32) != 0, fn, zeros)


def _kernel_shapes(graph: taps.Graph) -> list[tuple[int, ...]]:
    return [layer.kernel_shape for layer in graph.kernel_layers()]


def _site_shapes(graph: taps.Graph) -> list[tuple[int, ...]]:
    """Per-example input shapes of the sites, graph.layers order."""
    return [tuple(layer.input_shape[1:]) for layer in graph.layers]


def _offsets(shapes: list[tuple[int, ...]]) -> np.ndarray:
    """Where each shape's elements start in a flat concatenation of them; [-1] is the total."""
    return np.cumsum([0] + [math.prod(s) for s in shapes])


def _cut(a: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """The pieces of `a`'s last axis laid out by `shapes`, each reshaped to a.shape[:-1] + shape."""
    o = _offsets(shapes)
    return [a[..., o[i] : o[i + 1]].reshape(a.shape[:-1] + s) for i, s in enumerate(shapes)]


def _spread(values, shapes: list[tuple[int, ...]]) -> jax.Array:
    """values[i] broadcast over shapes[i] (trailing axes), flat and concatenated."""
    return jnp.concatenate(
        [jnp.broadcast_to(jnp.asarray(v, jnp.float32), s).ravel() for v, s in zip(values, shapes)]
    )


def _flat_normals(keys: jax.Array, graph: taps.Graph) -> jax.Array:
    """z(k) for each key in the 1-d array `keys`: rows of N(0, 1) over all kernels' elements.

    Kernel i (graph.kernel_layers() order) owns elements [o_i, o_i + n_i) of a row; disjoint
    pieces of one draw, hence independent. Each row equals jax.random.normal(k, (total,)).
    """
    total = int(_offsets(_kernel_shapes(graph))[-1])
    return per_key(lambda k: jax.random.normal(k, (total,), jnp.float32), keys)


def _scaled(z: jax.Array, mu, sigma) -> jax.Array:
    """mu + sigma * z for one kernel's piece z: mu, sigma per output channel (last axis)."""
    return jnp.asarray(mu, jnp.float32) + jnp.asarray(sigma, jnp.float32) * z


def weight_noise(
    params: PyTree,
    graph: taps.Graph,
    stats: NoiseStats,
    key_t: jax.Array,
    key_prev: jax.Array,
    lam,
    *,
    mode: str = "differential",
) -> PyTree:
    """The params the forward pass sees at this step: kernels perturbed, the rest untouched.

    D(k) holds one sample per kernel: kernel i (graph.kernel_layers() order) gets
    mu_i + sigma_i * z_i, z_i its piece of one flat N(0, 1) draw from k over all kernels
    (`kernel_samples`). Then
      differential: W + lam * (D(k_t) - D(k_prev));  naive: W + lam * D(k_t);
      accumulate: params unchanged (the trainer adds `weight_sample` after the update).
    differential is computed as W + lam * sigma_i * (z_i(k_t) - z_i(k_prev)), where mu_i
    cancels: equal to the formula above up to float rounding.
    The noise does not depend on params, so the Jacobian w.r.t. params is the identity and
    the gradient taken at the noisy point lands on the latent weights unchanged.

    Raises:
      ValueError: on an unknown `mode` or stats that do not fit the graph.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode must be one of {WEIGHT_MODES}, got {mode!r}")
    index = _kernel_stats(graph, stats)
    if mode == "accumulate":
        return params
    lam = jnp.asarray(lam, jnp.float32)
    differential = mode == "differential"
    keys = jnp.stack([key_t, key_prev] if differential else [key_t])

    def normals() -> jax.Array:
        z = _flat_normals(keys, graph)
        # z(k_prev) is the very draw the previous step made from its k_t (the same threefry
        # values), so the two steps' perturbations telescope up to float rounding.
        return z[0] - z[1] if differential else z[0]

    # D(k_t) - D(k_prev) = sigma * (z(k_t) - z(k_prev)): the mean cancels, so the flat
    # array holds the difference of the normals alone, and each kernel scales its piece by
    # its own channels' sigma (and adds mu, in naive mode) where it adds it to W. Spreading
    # mu and sigma over one flat array instead built two concatenations of every kernel's
    # broadcast, about a tenth more work for XLA:CPU to compile.
    shapes = _kernel_shapes(graph)
    pieces = _cut(_once(lam, normals, (int(_offsets(shapes)[-1]),)), shapes)

    def perturb(layer: taps.Layer, w: jax.Array) -> jax.Array:
        i = index[layer.path]
        z = pieces[i]
        sigma = jnp.asarray(stats.w_sigma[i], jnp.float32)
        d = sigma * z if differential else _scaled(z, stats.w_mu[i], sigma)
        return w + (lam * d).astype(w.dtype)

    return taps.map_kernels(params, graph.kernel_layers(), perturb)


def kernel_samples(graph: taps.Graph, stats: NoiseStats, key: jax.Array) -> list[jax.Array]:
    """D(key): float32 samples of N(mu_i, sigma_i^2) per output channel, one per kernel.

    In graph.kernel_layers() order; what `weight_noise` adds (times lam) at the step whose
    key is `key`.

    Raises:
      ValueError: on stats that do not fit the graph.
    """
    _kernel_stats(graph, stats)
    pieces = _cut(_flat_normals(jnp.stack([key]), graph)[0], _kernel_shapes(graph))
    return [_scaled(z, m, sd) for z, m, sd in zip(pieces, stats.w_mu, stats.w_sigma)]


def weight_sample(
    params: PyTree, graph: taps.Graph, stats: NoiseStats, key_t: jax.Array, lam
) -> PyTree:
    """A params-shaped pytree holding lam * D(k_t) on each kernel and zeros elsewhere.

    The `accumulate` ablation adds it to the params after the optimizer update, so the noise
    and its mean mu_w pile up in the stored weights. Uses the same draw as `weight_noise`,
    so it equals what `naive` mode would add.

    Raises:
      ValueError: on stats that do not fit the graph.
    """
    index = _kernel_stats(graph, stats)
    lam = jnp.asarray(lam, jnp.float32)
    samples = kernel_samples(graph, stats, key_t)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

    def sample(layer: taps.Layer, w: jax.Array) -> jax.Array:
        return (lam * samples[index[layer.path]]).astype(w.dtype)

    return taps.map_kernels(zeros, graph.kernel_layers(), sample)


def _check_dropin_args(rho, mask: str, tau) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    # rho and tau are static settings; a traced value cannot be checked and is let through.
    if isinstance(rho, (int, float, np.number)) and not 0.0 <= float(rho) <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if isinstance(tau, (int, float, np.number)) and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number, got {tau}")


def _mask_probability(x: jax.Array, rho, mask: str, tau) -> jax.Array:
    """Drop-in probability: the scalar rho, or per channel (last axis) for `salience`."""
    rho = jnp.asarray(rho, jnp.float32)
    if mask == "uniform":
        return rho
    c = x.shape[-1]
    score = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 1)))
    p = rho * c * jax.nn.softmax(score / tau)
    # rho * C * softmax averages to exactly rho over channels, but a channel whose softmax
    # share exceeds 1 / (rho C) would need a probability above 1. Clipping caps it at 1 and
    # does not hand the excess to other channels, so with a very peaked softmax (small tau,
    # one dominant channel) the mean rate falls below rho.
    return jax.lax.stop_gradient(jnp.clip(p, 0.0, 1.0))


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
) -> jax.Array:
    """x + M * eps with M ~ Bernoulli(p) and eps ~ N(lam mu, (lam sigma)^2), elementwise.

    p is `rho` (`uniform`) or, for `salience`, p_c = clip(rho * C * softmax(mean|x|_c / tau),
    0, 1) per channel c of the last axis (no gradient flows through p). The result has x's
    dtype; lam == 0 returns x exactly.

    Raises:
      ValueError: on an unknown `mask`, rho outside [0, 1] or a non-positive tau.
    """
    _check_dropin_args(rho, mask, tau)
    bits = _flat_draw(jax.random.bits, key, x.shape, jnp.uint32)
    eps = _dropin_noise(bits, lam, mu, sigma, _mask_probability(x, rho, mask, tau))
    # Drawing in float32 keeps bf16 inputs from a coarse uniform grid; only the finished
    # noise is cast, so the add and everything after it stay in x's dtype.
    return x + eps.astype(x.dtype)


def _dropin_noise(bits: jax.Array, lam, mu, sigma, p) -> jax.Array:
    """M * eps (float32) from 32 random bits per element; see `activation_dropin`."""
    # This runs on every layer input at every step, so one uniform per element serves both
    # the mask and the Gaussian: half the random bits of a Bernoulli plus a normal draw.
    # u = (k + 1/2) 2^-23 with k uniform on the 23-bit integers is the midpoint grid of
    # [0, 1): never 0 or 1, and symmetric about 1/2. M = (u < p); given M, u is uniform on
    # [0, p) (to the grid's resolution), hence v = u / p is uniform on [0, 1) whichever
    # elements were masked, and Phi^-1(v) is N(0, 1): eps = lam (mu + sigma Phi^-1(v)) has
    # the asked law on the masked elements. Phi^-1(v) = sqrt(2) erfinv(2v - 1), through
    # XLA's native erf_inv (the op jax.random.normal uses), which compiles to less work
    # than the polynomial ndtri. Clipping v only guards rounding at 1 and a zero p (nothing
    # masked, v discarded), so no NaN reaches any gradient.
    u = ((bits >> 9).astype(jnp.float32) + 0.5) * (2.0**-23)
    keep = u < p
    v = jnp.clip(u / jnp.maximum(p, 2.0**-23), 2.0**-24, 1.0 - 2.0**-24)
    z = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * v - 1.0)
    lam = jnp.asarray(lam, jnp.float32)
    eps = lam * (jnp.asarray(mu, jnp.float32) + jnp.asarray(sigma, jnp.float32) * z)
    return jnp.where(keep, eps, 0.0)


def _check_batch(batch) -> None:
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def _site_draw(key: jax.Array, graph: taps.Graph, batch: int) -> jax.Array:
    _check_batch(batch)
    total = int(_offsets(_site_shapes(graph))[-1])
    return _flat_draw(jax.random.bits, key, (int(batch), total), jnp.uint32)


def site_bits(key: jax.Array, graph: taps.Graph, batch: int) -> dict[str, jax.Array]:
    """Site name -> uint32 random bits shaped like that site's input at batch size `batch`.

    One draw of shape (batch, S), S the summed per-example input size of all sites in
    graph.layers order; site i takes columns [o_i, o_i + s_i), reshaped. The batch axis comes
    first, so under a batch-sharded jit every device draws the rows of its own examples.

    Raises:
      ValueError: if `batch` is not a positive int.
    """
    pieces = _cut(_site_draw(key, graph, batch), _site_shapes(graph))
    return dict(zip(graph.names, pieces))


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
) -> Callable[[str, jax.Array], jax.Array]:
    """fn(site name, x) -> drop-in of x, for `taps.map_inputs`.

    Site i (its index in graph.layers) uses its piece of `site_bits(key, graph, batch)` and
    stats.a_mu[i], stats.a_sigma[i]; the draw is made here, once for all sites, so every
    input must be a batch of `batch` examples along its first axis, each shaped as when the
    graph was traced (a layer fed a reshaped batch, e.g. (batch * tokens, features), must
    have been traced that way too).

    Raises:
      ValueError: on bad rho/mask/tau/batch, or stats whose a_mu does not have one entry per
        site; the returned fn raises it for a site name the graph does not know or an input
        of another shape.
    """
    _check_dropin_args(rho, mask, tau)
    n = len(graph.layers)
    if jnp.shape(stats.a_mu) != (n,) or jnp.shape(stats.a_sigma) != (n,):
        raise ValueError(
            f"stats.a_mu / a_sigma must have shape ({n},) for {n} sites, got "
            f"{jnp.shape(stats.a_mu)} / {jnp.shape(stats.a_sigma)}"
        )
    _check_batch(batch)
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    if mask == "uniform":
        # p does not depend on x, so the noise of every site is one elementwise computation
        # over the whole draw (per-column mu and sigma) and each site only adds its piece:
        # one copy of the inverse-CDF code for XLA to compile instead of one per site.
        shapes = _site_shapes(graph)
        mu, sigma = _spread(stats.a_mu, shapes), _spread(stats.a_sigma, shapes)
        draw = lambda: _dropin_noise(
            _site_draw(key, graph, batch), lam, mu, sigma, jnp.float32(rho)
        )
        pieces = _cut(_once(lam, draw, (batch, int(_offsets(shapes)[-1]))), shapes)
    else:
        pieces = _cut(_site_draw(key, graph, batch), _site_shapes(graph))

    def fn(name: str, x: jax.Array) -> jax.Array:
        if name not in index:
            raise ValueError(f"name: site {name!r} is not in the graph {graph.names}")
        i = index[name]
        want = pieces[i].shape
        if x.shape != want:
            raise ValueError(
                f"site {name!r} got an input of shape {x.shape}, but the noise was drawn for "
                f"{want} (batch {batch}, the graph's traced shape "
                f"{graph.layers[i].input_shape}); trace the graph with inputs shaped like "
                "the training batch"
            )
        if mask == "uniform":
            noise = pieces[i]
        else:
            p = _mask_probability(x, rho, mask, tau)
            noise = _dropin_noise(pieces[i], lam, stats.a_mu[i], stats.a_sigma[i], p)
        return x + noise.astype(x.dtype)

    return fn
