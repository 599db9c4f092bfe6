"""Summary statistics of one sample of quantization error: is it Gaussian, and how wide?

DNQ models the quantization error of a layer as Gaussian noise; these statistics say how
well that holds. For a sample ``e`` (any shape, flattened): a histogram with fixed bins,
the mean and standard deviation, the Kolmogorov-Smirnov distance between the sample's
empirical CDF and the fitted Gaussian N(mean, std^2), and the excess kurtosis (0 for a
Gaussian, -1.2 for a uniform distribution, which is what rounding error alone looks like).
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr


@flax.struct.dataclass
class ErrorStats:
    """Statistics of one error sample; a pytree, so it can be returned from a jitted function.

    Attributes:
      counts: (bins,) int32 histogram counts over `edges`; values outside are not counted.
      edges: (bins + 1,) float32 bin edges (uniform; the last bin includes its right edge).
      mean: float32 scalar, sample mean.
      std: float32 scalar, sample standard deviation (population form, ddof = 0).
      ks: float32 scalar, sup |F_n(t) - Phi((t - mean) / std)|: KS distance to the fitted
        Gaussian (with parameters fitted on the same sample, so not a p-value).
      kurtosis: float32 scalar, excess kurtosis m4 / m2^2 - 3 (population moments).
      size: int32 scalar, number of values in the sample.
    """

    counts: jax.Array
    edges: jax.Array
    mean: jax.Array
    std: jax.Array
    ks: jax.Array
    kurtosis: jax.Array
    size: jax.Array

    def density(self) -> jax.Array:
        """Histogram normalised to a probability density (integrates to the in-range share)."""
        widths = jnp.diff(self.edges)
        return self.counts / (jnp.maximum(self.size, 1) * widths)

    def summary(self) -> dict[str, float]:
        """The scalar statistics as Python floats, e.g. for a JSON report."""
        return {
            "mean": float(self.mean),
            "std": float(self.std),
            "ks": float(self.ks),
            "kurtosis": float(self.kurtosis),
            "size": int(self.size),
        }


def ks_gaussian(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Kolmogorov-Smirnov distance between the sample `x` and N(mean, std^2).

    The empirical CDF jumps at each sorted value, so the supremum is taken on both sides of
    every jump: max over i of (i+1)/n - Phi(x_i) and Phi(x_i) - i/n.
    """
    xs = jnp.sort(jnp.ravel(x).astype(jnp.float32))
    n = xs.shape[0]
    # A constant sample (std 0) has no Gaussian to compare with; the floor keeps the CDF
    # finite (a step at the mean), which gives distance 1/2 rather than NaN.
    cdf = ndtr((xs - mean) / jnp.maximum(std, 1e-30))
    i = jnp.arange(n, dtype=jnp.float32)
    return jnp.maximum(jnp.max((i + 1) / n - cdf), jnp.max(cdf - i / n))


def error_stats(
    err: jax.Array, bins: int = 64, value_range: tuple[float, float] | None = None
) -> ErrorStats:
    """Histogram, mean, std, KS distance to the fitted Gaussian and excess kurtosis of `err`.

    Args:
      err: the error sample, any shape (flattened); computed in float32.
      bins: number of histogram bins (static: one compile per value).
      value_range: ``(lo, hi)`` of the histogram; default the sample's own min and max.

    Returns:
      An `ErrorStats`.

    Raises:
      ValueError: if `err` is empty or `bins` is not a positive int.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    if jnp.size(err) == 0:
        raise ValueError("err: the error sample is empty")
    if value_range is None:
        return _error_stats(err, None, None, bins)
    lo, hi = value_range
    if not lo < hi:
        raise ValueError(f"value_range must have lo < hi, got {value_range}")
    return _error_stats(err, jnp.float32(lo), jnp.float32(hi), bins)


@functools.partial(jax.jit, static_argnames="bins")
def _error_stats(
    err: jax.Array, lo: jax.Array | None, hi: jax.Array | None, bins: int
) -> ErrorStats:
    x = jnp.ravel(err).astype(jnp.float32)
    mean = jnp.mean(x)
    centred = x - mean
    m2 = jnp.mean(centred**2)
    m4 = jnp.mean(centred**4)
    std = jnp.sqrt(m2)
    if lo is None:
        lo, hi = jnp.min(x), jnp.max(x)
        # A constant sample still needs bins of positive width.
        pad = jnp.where(hi > lo, 0.0, jnp.maximum(jnp.abs(lo), 1.0) * 1e-6)
        lo, hi = lo - pad, hi + pad
    edges = jnp.linspace(lo, hi, bins + 1, dtype=jnp.float32)
    # The bin of each value is found on the edges themselves (as numpy.histogram does), so
    # the counts agree with any histogram of the same edges, boundary values included.
    idx = jnp.searchsorted(edges, x, side="right") - 1
    idx = jnp.where(x == edges[-1], bins - 1, idx)
    inside = (idx >= 0) & (idx < bins)
    counts = jnp.zeros((bins,), jnp.int32).at[jnp.where(inside, idx, 0)].add(inside)
    return ErrorStats(
        counts=counts,
        edges=edges,
        mean=mean,
        std=std,
        ks=ks_gaussian(x, mean, std),
        kurtosis=m4 / jnp.maximum(m2 * m2, jnp.finfo(jnp.float32).tiny) - 3.0,
        size=jnp.int32(x.shape[0]),
    )
