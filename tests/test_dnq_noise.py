"""DNQ noise transforms and ramps, on a model defined only in this file."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from dnq_jax import taps
from dnq_jax.dnq import noise, ramps
from dnq_jax.dnq.profiler import NoiseStats
from dnq_jax.train import state as state_lib


class TwinConv(nn.Module):
    """Two convs with kernels of one shape, so their noise can be compared element by element."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3, 3), name="c1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), name="c2")(x))
        return nn.Dense(3, name="fc")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def setup():
    model = TwinConv()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
    # Shapes from eval_shape, values from numpy: Flax's initialisers would cost compiles here.
    shapes = jax.eval_shape(model.init, jax.random.key(1), x)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes
    )
    graph = taps.trace(model, variables, x)
    kernels = graph.kernel_layers()
    # Clearly nonzero, channel-dependent means, so a biased sample cannot pass for unbiased.
    w_mu = {k.name: 0.2 + 0.1 * jnp.arange(k.out_channels, dtype=jnp.float32) for k in kernels}
    # Sigma differs per channel and per kernel, so a sigma applied to the wrong channel or
    # kernel shows in the per-channel spreads the tests check.
    w_sigma = {
        k.name: 0.2 + 0.05 * jnp.arange(k.out_channels, dtype=jnp.float32)[::-1] + 0.1 * i
        for i, k in enumerate(kernels)
    }
    stats = NoiseStats(
        w_mu=w_mu,
        w_sigma=w_sigma,
        a_mu={n: jnp.float32(v) for n, v in zip(graph.names, (0.1, -0.2, 0.3))},
        a_sigma={n: jnp.float32(v) for n, v in zip(graph.names, (0.5, 0.7, 0.9))},
        count=jnp.ones((), jnp.int32),
    )
    return model, x, variables, graph, stats


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _kernels(params, graph):
    return [np.asarray(taps.get_kernel(params, k)) for k in graph.kernel_layers()]


def test_step_keys_fold_in_the_step_and_never_repeat():
    key = jax.random.key(7)
    data = jax.random.key_data
    for t in (0, 1, 5):
        k_t, k_prev = noise.step_keys(key, t)
        n_t, n_prev = noise.step_keys(key, t + 1)
        np.testing.assert_array_equal(data(k_t), data(jax.random.fold_in(key, t)))
        np.testing.assert_array_equal(data(n_prev), data(k_t))
        assert not np.array_equal(data(n_t), data(n_prev))
        assert not np.array_equal(data(k_t), data(k_prev))
    # Traced steps give the same keys as Python ints.
    traced = jax.jit(lambda t: jax.tree_util.tree_map(data, noise.step_keys(key, t)))(3)
    np.testing.assert_array_equal(traced[1], data(noise.step_keys(key, 2)[0]))


def test_train_step_draws_from_keys_folded_from_the_step():
    """The step's keys are fold_in(fold_in(root, purpose), t) and weight noise's k_{t-1}."""
    root = jax.random.key(11)
    data = jax.random.key_data
    w_key = state_lib.sub_key(root, state_lib.KEY_WEIGHT_NOISE)
    for t in (0, 1, 7):
        k_t, k_prev = jax.jit(lambda t: noise.step_keys(w_key, t))(t)
        np.testing.assert_array_equal(data(k_t), data(jax.random.fold_in(w_key, t)))
        prev = jax.random.fold_in(w_key, np.uint32(t - 1 + 2**32) if t == 0 else t - 1)
        np.testing.assert_array_equal(data(k_prev), data(prev))


def test_previous_sample_is_regenerated_bit_exactly(setup):
    _, _, variables, graph, real_stats = setup
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
    key, t = jax.random.key(3), 11
    # mu = 0: a compiler may contract mu + sigma * z into one fused multiply-add in one
    # program and not in another (a 1-ulp difference between two programs); sigma * z + 0
    # rounds the same either way, so the naive sample compared with `weight_sample` at the
    # end is exact.
    stats = real_stats.replace(w_mu={k: jnp.zeros_like(m) for k, m in real_stats.w_mu.items()})

    def added(step, mode, stats=stats):
        # W = 0 and lam = 1 make the transform return its raw noise with no rounding.
        k_t, k_prev = noise.step_keys(key, step)
        return _kernels(noise.weight_noise(zeros, graph, stats, k_t, k_prev, 1.0, mode=mode), graph)

    d_prev, d_t = added(t - 1, "naive"), added(t, "naive")
    # differential adds sigma * (z_t - z_prev), equal to D(k_t) - D(k_prev) up to rounding
    # (and mu cancels): compared to the naive samples of steps t and t - 1, real mu or not.
    for st in (stats, real_stats):
        n_prev, n_t = added(t - 1, "naive", st), added(t, "naive", st)
        for a, b, c in zip(added(t, "differential", st), n_t, n_prev):
            assert np.abs(c).max() > 0
            # sigma * (z_t - z_prev) against sigma * z_t - sigma * z_prev: a few ulps at most.
            np.testing.assert_allclose(a, b - c, rtol=1e-6, atol=2e-6)
    # The normals the differential step subtracts are the previous step's, bit for bit.
    total = sum(int(np.prod(k.kernel_shape)) for k in graph.kernel_layers())
    k_t, k_prev = noise.step_keys(key, t)
    for k, step_t in ((k_t, t), (k_prev, t - 1)):
        alone = jax.random.normal(noise.step_keys(key, step_t)[0], (total,), jnp.float32)
        np.testing.assert_array_equal(noise._standard(k, graph, "gaussian"), alone)
    # The sample step t - 1 drew, regenerated at step t from its key alone: bit for bit.
    sample = noise.weight_sample(zeros, graph, stats, noise.step_keys(key, t - 1)[0], 1.0)
    for a, b in zip(_kernels(sample, graph), d_prev):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sample["c1"]["bias"], 0.0)
    # Different layers with equal shapes and statistics draw different noise.
    assert d_t[0].shape == d_t[1].shape
    assert abs(np.corrcoef(d_t[0].ravel(), d_t[1].ravel())[0, 1]) < 0.5


def test_differential_is_unbiased_and_naive_is_biased(setup):
    _, _, variables, graph, stats = setup
    params, lam, n_keys = variables["params"], 0.8, 1000

    @jax.jit
    def perturbations(keys):
        def one(key):
            k_t, k_prev = noise.step_keys(key, 5)
            out = {}
            for mode in ("differential", "naive"):
                new = noise.weight_noise(params, graph, stats, k_t, k_prev, lam, mode=mode)
                out[mode] = [a - b for a, b in zip(_kernel_list(new), _kernel_list(params))]
            return out

        return jax.vmap(one)(keys)

    def _kernel_list(p):
        return [taps.get_kernel(p, k) for k in graph.kernel_layers()]

    keys = jax.random.split(jax.random.key(0), n_keys)
    out = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), perturbations(keys))
    for i, layer in enumerate(graph.kernel_layers()):
        mu, sigma = np.asarray(stats.w_mu[layer.name]), np.asarray(stats.w_sigma[layer.name])
        diff = out["differential"][i].reshape(-1, mu.size)
        naive = out["naive"][i].reshape(-1, mu.size)
        n = diff.shape[0]
        se_diff = lam * sigma * np.sqrt(2.0 / n)
        se_naive = lam * sigma / np.sqrt(n)
        np.testing.assert_array_less(np.abs(diff.mean(0)), 5 * se_diff)
        np.testing.assert_array_less(np.abs(naive.mean(0) - lam * mu), 5 * se_naive)
        # The bias is far outside the tolerance, so swapping the modes would fail.
        assert np.all(lam * mu > 10 * se_diff)
        np.testing.assert_allclose(diff.std(0), lam * sigma * np.sqrt(2), rtol=5 / np.sqrt(2 * n))
        np.testing.assert_allclose(naive.std(0), lam * sigma, rtol=5 / np.sqrt(2 * n))


def test_differential_perturbations_telescope(setup):
    _, _, variables, graph, stats = setup
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])
    key, lam, steps = jax.random.key(9), 0.7, 20

    @jax.jit
    def perturbation(t, lam):
        k_t, k_prev = noise.step_keys(key, t)
        return noise.weight_noise(zeros, graph, stats, k_t, k_prev, lam)

    total = None
    for t in range(1, steps + 1):
        p = _kernels(perturbation(t, lam), graph)
        total = p if total is None else [a + b for a, b in zip(total, p)]
    d_last = _kernels(
        noise.weight_sample(zeros, graph, stats, noise.step_keys(key, steps)[0], 1.0), graph
    )
    d_first = _kernels(
        noise.weight_sample(zeros, graph, stats, noise.step_keys(key, 0)[0], 1.0), graph
    )
    for tot, a, b in zip(total, d_last, d_first):
        np.testing.assert_allclose(tot, lam * (a - b), rtol=1e-5, atol=1e-5)


def test_weight_noise_gradient_is_identity_and_accumulate_is_a_no_op(setup):
    _, _, variables, graph, stats = setup
    params = variables["params"]
    k_t, k_prev = noise.step_keys(jax.random.key(1), 4)
    weights = jax.tree_util.tree_map(
        lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params
    )

    def loss(p):
        new = noise.weight_noise(p, graph, stats, k_t, k_prev, 0.5)
        return sum(
            jnp.sum(a * w)
            for a, w in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(weights))
        )

    grads = jax.jit(jax.grad(loss))(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, grads, weights)
    same = noise.weight_noise(params, graph, stats, k_t, k_prev, 0.5, mode="accumulate")
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)


def _dropin_sample(rho, lam, mu, sigma, shape=(2000, 200), key=5):
    x = jnp.zeros(shape, jnp.float32)
    out = noise.activation_dropin(jax.random.key(key), x, lam, mu, sigma, rho=rho)
    return np.asarray(out, np.float64).ravel()


@pytest.mark.parametrize("rho", [0.3, 0.5])
def test_dropin_distribution_from_one_uniform(rho):
    lam, mu, sigma = 0.8, 0.5, 2.0
    out = _dropin_sample(rho, lam, mu, sigma)
    n = out.size
    masked = out[out != 0]
    m = masked.size
    assert abs(m / n - rho) < 5 * np.sqrt(rho * (1 - rho) / n)
    assert abs(masked.mean() - lam * mu) < 5 * lam * sigma / np.sqrt(m)
    assert abs(masked.std() - lam * sigma) < 5 * lam * sigma / np.sqrt(2 * m)
    z = (masked - lam * mu) / (lam * sigma)
    # Excess kurtosis of a normal sample has standard error sqrt(24 / m); KS at alpha 1e-4.
    assert abs(sps.kurtosis(z)) < 5 * np.sqrt(24 / m)
    assert abs(sps.skew(z)) < 5 * np.sqrt(6 / m)
    ks = sps.kstest(z, "norm").statistic
    assert ks < np.sqrt(np.log(2 / 1e-4) / 2) / np.sqrt(m)


def test_dropin_edge_rates_and_identity():
    x = _normal((64, 16), 2)
    key = jax.random.key(3)
    np.testing.assert_array_equal(noise.activation_dropin(key, x, 1.0, 0.5, 1.0, rho=0.0), x)
    everywhere = noise.activation_dropin(key, x, 1.0, 0.5, 1.0, rho=1.0)
    assert np.all(np.asarray(everywhere) != np.asarray(x))
    run = jax.jit(lambda lam: noise.activation_dropin(key, x, lam, 0.5, 1.0))
    np.testing.assert_array_equal(run(0.0), x)
    assert not np.array_equal(run(1.0), x)


def test_salience_mask_follows_channel_magnitude():
    c, rho, tau = 8, 0.5, 1.0
    scale = 0.15 * jnp.arange(1, c + 1, dtype=jnp.float32)
    x = _normal((20000, c), 4) * scale
    out = noise.activation_dropin(
        jax.random.key(6), x, 1.0, 0.5, 1.0, rho=rho, mask="salience", tau=tau
    )
    rate = np.mean(np.asarray(out) != np.asarray(x), axis=0)
    score = np.mean(np.abs(np.asarray(x, np.float64)), axis=0) / tau
    soft = np.exp(score - score.max())
    expected = np.clip(rho * c * soft / soft.sum(), 0, 1)
    assert expected.max() < 1  # no clipping here: the mean rate must be rho
    np.testing.assert_array_less(
        np.abs(rate - expected), 5 * np.sqrt(expected * (1 - expected) / x.shape[0]) + 1e-9
    )
    assert abs(rate.mean() - rho) < 5 * np.sqrt(rho * (1 - rho) / x.size)
    assert np.all(np.diff(rate) > 0)
    # A very peaked softmax clips the top channel at 1 and loses the excess rate.
    peaked = noise.activation_dropin(
        jax.random.key(6), x, 1.0, 0.5, 1.0, rho=rho, mask="salience", tau=0.01
    )
    peaked_rate = np.mean(np.asarray(peaked) != np.asarray(x), axis=0)
    assert peaked_rate[-1] == 1.0 and peaked_rate.mean() < rho - 0.1


@pytest.mark.parametrize("mask", ["uniform", "salience"])
def test_dropin_under_jit_and_grad_keeps_dtype(mask):
    key = jax.random.key(8)
    x, w = _normal((4, 5, 5, 6), 1), _normal((4, 5, 5, 6), 2)

    def loss(x, lam):
        return jnp.sum(noise.activation_dropin(key, x, lam, 0.2, 0.5, mask=mask) * w)

    gx, glam = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, 0.7)
    np.testing.assert_array_equal(gx, w)
    assert np.isfinite(glam) and glam != 0
    xb = x.astype(jnp.bfloat16)
    out = jax.jit(lambda x: noise.activation_dropin(key, x, 1.0, 0.2, 0.5, mask=mask))(xb)
    assert out.dtype == jnp.bfloat16 and not np.array_equal(out, xb)


def _salience_p(h, rho, tau):
    score = np.mean(np.abs(np.asarray(h, np.float64)), axis=(0, 1, 2)) / tau
    soft = np.exp(score - score.max())
    return np.clip(rho * h.shape[-1] * soft / soft.sum(), 0, 1)


@pytest.mark.parametrize("mask", ["uniform", "salience"])
def test_activation_noise_fn_uses_each_sites_piece_and_stats(setup, mask):
    model, x, variables, graph, stats = setup
    key, lam, batch, rho, tau = jax.random.key(4), 0.9, x.shape[0], 0.5, 2.0
    fn = noise.activation_noise_fn(graph, stats, key, lam, batch=batch, mask=mask, tau=tau)
    bits = noise.site_bits(key, graph, batch)
    # Sites in call order, each a contiguous block of columns of one (batch, S) draw.
    flat = np.concatenate([np.asarray(bits[n]).reshape(batch, -1) for n in graph.names], axis=1)
    whole = jax.random.bits(key, (flat.size,), jnp.uint32).reshape(flat.shape)
    np.testing.assert_array_equal(flat, whole)
    h = _normal((2, 6, 6, 4), 5)
    for name in graph.names[:2]:
        # The drop-in law, recomputed in float64 from the site's bits.
        u = ((np.asarray(bits[name]) >> 9).astype(np.float64) + 0.5) * 2.0**-23
        p = rho if mask == "uniform" else _salience_p(h, rho, tau)
        v = np.clip(u / p, 2.0**-24, 1 - 2.0**-24)
        eps = lam * (float(stats.a_mu[name]) + float(stats.a_sigma[name]) * sps.norm.ppf(v))
        want = np.asarray(h, np.float64) + np.where(u < p, eps, 0.0)
        np.testing.assert_allclose(fn(name, h), want, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(fn("c1", h), fn("c2", h))
    with pytest.raises(ValueError, match="name"):
        fn("nope", h)
    with pytest.raises(ValueError, match="shape"):
        fn("c1", h[:1])

    @jax.jit
    def forward(lam):
        with taps.map_inputs(noise.activation_noise_fn(graph, stats, key, lam, batch=batch)):
            return model.apply(variables, x)

    np.testing.assert_array_equal(forward(0.0), model.apply(variables, x))
    assert not np.allclose(forward(1.0), model.apply(variables, x))


def test_cpu_conditional_and_fused_paths_give_the_same_noise(setup, monkeypatch):
    """On XLA:CPU each flat draw is computed inside a conditional; other backends fuse it
    into its consumers. The same values; at lambda 0 exactly the input on both."""
    model, x, variables, graph, stats = setup
    params = variables["params"]
    k_t, k_prev = noise.step_keys(jax.random.key(5), 3)
    act_key = jax.random.key(6)

    def forward(lam):
        noisy = noise.weight_noise(params, graph, stats, k_t, k_prev, lam)
        fn = noise.activation_noise_fn(graph, stats, act_key, lam, batch=x.shape[0])
        with taps.map_inputs(fn):
            return noisy, model.apply({"params": noisy}, x)

    def run(fused: bool, lam):
        with monkeypatch.context() as patch:
            if fused:  # the GPU/TPU form, on this CPU
                patch.setattr(noise, "_in_conditional", lambda fn, shape: noise._fused(fn))
            jitted = jax.jit(lambda lam: forward(lam))  # a fresh trace for each path
            # Two conditionals (weights, drop-in) on the CPU path, none on the fused one
            # (GPU/TPU take the fused one either way).
            text = jitted.lower(lam).compile().as_text()
            want = 2 if not fused and jax.default_backend() == "cpu" else 0
            assert text.count("conditional(") == want, text.count("conditional(")
            return jax.tree_util.tree_map(np.asarray, jitted(lam))

    on_cpu, fused = run(False, 0.7), run(True, 0.7)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), on_cpu, fused
    )
    assert not np.allclose(on_cpu[1], model.apply(variables, x))
    clean = (jax.tree_util.tree_map(np.asarray, params), np.asarray(model.apply(variables, x)))
    for is_fused in (False, True):
        jax.tree_util.tree_map(np.testing.assert_array_equal, run(is_fused, 0.0), clean)
    # Non-finite statistics at lambda 0: zeros on both paths (no backend-dependent NaN).
    bad = stats.replace(a_sigma={n: jnp.float32(np.inf) for n in graph.names})
    for is_fused in (False, True):
        with monkeypatch.context() as patch:
            if is_fused:
                patch.setattr(noise, "_in_conditional", lambda fn, shape: noise._fused(fn))
            fn = noise.activation_noise_fn(graph, bad, act_key, 0.0, batch=x.shape[0])
            h = jnp.ones_like(x)
            out = jax.jit(lambda h, fn=fn: fn(graph.first, h))(h)
            np.testing.assert_array_equal(out, h)


def test_kernel_samples_are_pieces_of_one_normal_draw(setup):
    _, _, _, graph, stats = setup
    key = jax.random.key(12)
    samples = noise.kernel_samples(graph, stats, key)
    names = [layer.name for layer in graph.kernel_layers()]
    assert list(samples) == names
    z = [
        (np.asarray(samples[n], np.float64) - np.asarray(stats.w_mu[n]))
        / np.asarray(stats.w_sigma[n])
        for n in names
    ]
    for layer in graph.kernel_layers():
        d = samples[layer.name]
        assert d.shape == layer.kernel_shape and d.dtype == jnp.float32
    flat = np.concatenate([zi.ravel() for zi in z])
    want = np.asarray(jax.random.normal(key, (flat.size,), jnp.float32), np.float64)
    np.testing.assert_allclose(flat, want, rtol=1e-5, atol=1e-5)


def test_ramps_match_their_formulas():
    u = np.array([-0.5, 0.0, 0.5, 1.0, 1.5])
    c = np.clip(u, 0, 1)
    want = {
        "linear": c,
        "cosine": (1 - np.cos(np.pi * c)) / 2,
        "exp": np.exp(-5 * (1 - c) ** 2),
    }
    for kind, ref in want.items():
        np.testing.assert_allclose(ramps.ramp(kind, u), ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            jax.jit(lambda u, k=kind: ramps.ramp(k, u))(u), ref, rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("kind", ramps.RAMPS)
def test_noise_lambda_schedule(kind):
    kw = dict(lambda_max=2.0, noise_start=200, ramp_epochs=80, kind=kind)
    epochs = np.array([0.0, 199.99, 200.0, 240.0, 280.0, 399.0])
    got = np.asarray(jax.jit(lambda e: ramps.noise_lambda(e, **kw))(epochs))
    f = np.asarray(ramps.ramp(kind, np.array([0.0, 0.5, 1.0, 1.0])))
    np.testing.assert_allclose(got, [0.0, 0.0, *(2.0 * f)], rtol=1e-6)
    assert ramps.noise_lambda(150, **kw) == 0.0
    np.testing.assert_allclose(ramps.noise_lambda(240, **kw), 2.0 * f[1], rtol=1e-6)
    step = dict(kw, ramp_epochs=0)
    assert ramps.noise_lambda(199.5, **step) == 0.0 and ramps.noise_lambda(200, **step) == 2.0


def test_bad_arguments_raise_value_errors(setup):
    _, _, variables, graph, stats = setup
    k_t, k_prev = noise.step_keys(jax.random.key(0), 1)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="mode"):
        noise.weight_noise(variables["params"], graph, stats, k_t, k_prev, 1.0, mode="sideways")
    with pytest.raises(ValueError, match="mask"):
        noise.activation_dropin(k_t, x, 1.0, 0.0, 1.0, mask="random")
    for rho in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rho"):
            noise.activation_dropin(k_t, x, 1.0, 0.0, 1.0, rho=rho)
        with pytest.raises(ValueError, match="rho"):
            noise.activation_noise_fn(graph, stats, k_t, 1.0, batch=2, rho=rho)
    with pytest.raises(ValueError, match="kind"):
        ramps.ramp("quadratic", 0.5)
    with pytest.raises(ValueError, match="kind"):
        ramps.noise_lambda(1.0, lambda_max=1.0, noise_start=0, ramp_epochs=1, kind="step")
    for batch in (0, 2.0):
        with pytest.raises(ValueError, match="batch"):
            noise.activation_noise_fn(graph, stats, k_t, 1.0, batch=batch)
    first = graph.kernel_layers()[0].name
    short = stats.replace(w_mu={first: stats.w_mu[first]}, w_sigma={first: stats.w_sigma[first]})
    with pytest.raises(ValueError, match="no entry for kernel"):
        noise.weight_noise(variables["params"], graph, short, k_t, k_prev, 1.0)
    # A sigma that would broadcast (a scalar, one value) is still the wrong shape.
    for bad in (jnp.float32(0.5), jnp.ones((1,), jnp.float32)):
        odd = stats.replace(w_sigma={**stats.w_sigma, first: bad})
        with pytest.raises(ValueError, match=rf"w_sigma\['{first}'\]"):
            noise.weight_noise(variables["params"], graph, odd, k_t, k_prev, 1.0)
    sites = stats.replace(a_mu={})
    with pytest.raises(ValueError, match="no entry for sites"):
        noise.activation_noise_fn(graph, sites, k_t, 1.0, batch=2)
