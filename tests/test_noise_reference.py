"""The weight noise against a per-kernel reference written as docs/method.md states it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import taps
from dnq_jax.dnq import noise, profiler


def reference_weight_noise(params, graph, stats, k_t, k_prev, lam, mode):
    """W~ = W + lam (D(k_t) - D(k_prev)) (differential) or W + lam D(k_t) (naive), kernel by
    kernel, D(k) = mu + sigma z(k) per output channel. Kernel i's z(k) is elements
    [o_i, o_i + n_i) of the normal stream of key k: one jax.random.normal per kernel."""
    out, offset = params, 0
    for layer in graph.kernel_layers():
        shape, n = layer.kernel_shape, int(np.prod(layer.kernel_shape))
        mu, sigma = stats.w_mu[layer.name], stats.w_sigma[layer.name]
        z = lambda k, o=offset, n=n, s=shape: jax.random.normal(k, (o + n,))[o:].reshape(s)
        d_t, d_prev = mu + sigma * z(k_t), mu + sigma * z(k_prev)
        delta = lam * (d_t - d_prev) if mode == "differential" else lam * d_t
        out = taps.map_kernels(out, [layer], lambda _, w, d=delta: w + d)
        offset += n
    return out


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(3, (3, 3), name="conv")(x))
        x = nn.relu(nn.Conv(5, (1, 1), name="pointwise")(x))
        return nn.Dense(4, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("mode", ["differential", "naive"])
def test_fast_path_matches_the_per_kernel_reference(mode):
    model, x = Net(), jnp.ones((2, 5, 5, 2))
    variables = model.init(jax.random.key(0), x)
    graph = taps.trace(model, variables, x)
    rng = np.random.default_rng(1)
    table = lambda: {
        k.name: jnp.asarray(rng.uniform(0.1, 0.5, k.out_channels), jnp.float32)
        for k in graph.kernel_layers()
    }
    stats = profiler.init_stats(graph).replace(w_mu=table(), w_sigma=table())
    k_t, k_prev = noise.step_keys(jax.random.key(2), 7)
    fast = jax.jit(lambda p, lam: noise.weight_noise(p, graph, stats, k_t, k_prev, lam, mode=mode))(
        variables["params"], 0.8
    )
    want = reference_weight_noise(variables["params"], graph, stats, k_t, k_prev, 0.8, mode)
    changed = 0
    for layer in graph.kernel_layers():
        got, ref = taps.get_kernel(fast, layer), taps.get_kernel(want, layer)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=layer.name)
        changed += not np.allclose(got, taps.get_kernel(variables["params"], layer))
    assert changed == len(graph.kernel_layers())
    np.testing.assert_array_equal(fast["head"]["bias"], variables["params"]["head"]["bias"])
