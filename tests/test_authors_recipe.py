"""The keys of the authors' recipe (docs/protocol.md), each against a small independent
re-statement of what the authors' PyTorch code does: in-place weight noise, a symmetric
profiler, noise on ReLU outputs, a per-epoch leftover draw, cosine-to-SWA learning rate."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import resnet
from dnq_jax import taps
from dnq_jax.dnq import init_stats, noise, profiler
from dnq_jax.ptq import QuantSpec
from dnq_jax.train import config as config_lib
from dnq_jax.train import optim
from dnq_jax.train.state import KEY_WEIGHT_NOISE, TrainState, root_key, sub_key
from dnq_jax.train.step import StepSettings, make_train_step


class _Tiny(nn.Module):
    """conv -> relu -> conv (ReLU-fed) -> + skip (not ReLU-fed) -> conv -> pool -> dense."""

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.relu(nn.Conv(4, (3, 3), name="c1")(x))
        z = nn.Conv(4, (3, 3), name="c2")(y)
        z = nn.Conv(4, (1, 1), name="c3")(z + y)
        return nn.Dense(3, name="fc")(jnp.mean(z, axis=(1, 2)))


def _tiny():
    model = _Tiny()
    x = jax.random.normal(jax.random.key(3), (6, 5, 5, 2))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x, taps.trace(model, variables, x)


# --- noise.w_quantizer=symmetric and noise.error_sign=authors -----------------------------


def _authors_weight_error(w: np.ndarray, bits: int, conv: bool):
    """The authors' simulate_quantized_weights + calculate_weight_quantization_noise, in
    float64: symmetric, scale max|W| / (2^(b-1) - 1) per output channel (conv) or per
    tensor (linear), error W - Q(W), summarised per channel (conv) or per tensor (linear)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    w = w.astype(np.float64)
    axes = tuple(range(w.ndim - 1))
    absmax = np.abs(w).max(axis=axes, keepdims=True) if conv else np.abs(w).max()
    scale = absmax / qmax
    err = w - np.clip(np.round(w / scale), qmin, qmax) * scale
    if conv:
        return err.mean(axis=axes), err.std(axis=axes)
    return np.full(w.shape[-1], err.mean()), np.full(w.shape[-1], err.std())


def test_symmetric_profiler_matches_the_authors_weight_error_statistics():
    model, variables, x, graph = _tiny()
    w2a4 = QuantSpec(w_bits=2, a_bits=4)
    prof = profiler.make_profiler(model, graph, w2a4, w_quantizer="symmetric", error_sign="authors")
    stats = jax.device_get(jax.jit(prof)(variables, x))
    for layer in graph.kernel_layers():
        w = np.asarray(taps.get_kernel(variables["params"], layer))
        # Every layer at 2 bits: the authors' profiler keeps no 8-bit ends.
        mu, sd = _authors_weight_error(w, 2, conv=layer.kind == "conv")
        np.testing.assert_allclose(stats.w_mu[layer.name], mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.w_sigma[layer.name], sd, rtol=1e-5, atol=1e-7)
    # The activation error keeps its size and flips its sign against the paper's Q(x) - x.
    paper = jax.device_get(jax.jit(profiler.make_profiler(model, graph, w2a4))(variables, x))
    for name in graph.names:
        np.testing.assert_allclose(stats.a_mu[name], -paper.a_mu[name], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.a_sigma[name], paper.a_sigma[name], rtol=1e-6)
    with pytest.raises(ValueError, match="w_quantizer"):
        profiler.make_profiler(model, graph, w2a4, w_quantizer="sym")


# --- noise.act_sites=relu -------------------------------------------------------------------


def test_relu_sites_are_the_inputs_a_relu_produced_and_only_they_get_the_drop_in():
    model, variables, x, graph = _tiny()
    assert {n: graph[n].relu_input for n in graph.names} == {
        "c1": False,  # the image
        "c2": True,
        "c3": False,  # a residual sum
        "fc": False,  # pooled features
    }
    stats = init_stats(graph)
    stats = stats.replace(a_sigma={n: jnp.float32(0.5) for n in graph.names})
    sites = tuple(n for n in graph.names if graph[n].relu_input)
    fn = noise.activation_noise_fn(graph, stats, jax.random.key(1), 1.0, batch=6, sites=sites)
    inputs = {}
    with taps.capture_inputs(inputs):
        model.apply(variables, x)
    for name in graph.names:
        changed = np.mean(np.asarray(fn(name, inputs[name])) != np.asarray(inputs[name]))
        if name in sites:
            assert 0.3 < changed < 0.7  # rho = 0.5
        else:
            assert changed == 0.0
    # The default (every site) draws exactly what it drew before the `sites` argument.
    every = noise.activation_noise_fn(graph, stats, jax.random.key(1), 1.0, batch=6)
    bits = noise.site_bits(jax.random.key(1), graph, 6)
    for name in graph.names:
        want = inputs[name] + noise._dropin_noise(bits[name], 1.0, 0.0, 0.5, 0.5)
        np.testing.assert_array_equal(every(name, inputs[name]), want)


# --- noise.dist=uniform ---------------------------------------------------------------------


def test_uniform_samples_have_the_gaussians_mean_and_variance_and_bounded_support():
    model, variables, x, graph = _tiny()
    stats = init_stats(graph)
    mu, sd = 0.02, 0.1
    fill = lambda v: {k.name: jnp.full((k.out_channels,), v) for k in graph.kernel_layers()}
    stats = stats.replace(w_mu=fill(mu), w_sigma=fill(sd))
    d = jax.jit(lambda k: noise.kernel_samples(graph, stats, k, dist="uniform"))(jax.random.key(5))
    z = np.concatenate([np.ravel(v) for v in d.values()]).astype(np.float64)
    half = math.sqrt(3) * sd
    assert z.min() >= mu - half - 1e-6 and z.max() <= mu + half + 1e-6
    assert abs(z.mean() - mu) < 4 * sd / math.sqrt(z.size)
    assert abs(z.var() / sd**2 - 1) < 0.15
    # Drop-in: the masked elements carry lam * (mu + sigma * U), U of variance 1.
    xs = jnp.zeros((64, 256))
    y = np.asarray(
        jax.jit(lambda k: noise.activation_dropin(k, xs, 0.5, 0.4, 0.2, dist="uniform"))(
            jax.random.key(2)
        ),
        np.float64,
    )
    hit = y[y != 0]
    assert 0.45 < hit.size / y.size < 0.55
    assert np.all(np.abs(hit - 0.2) <= math.sqrt(3) * 0.1 + 1e-6)
    assert abs(hit.mean() - 0.2) < 0.005 and abs(hit.std() - 0.1) < 0.005
    with pytest.raises(ValueError, match="dist"):
        noise.kernel_samples(graph, stats, jax.random.key(5), dist="laplace")


# --- noise.weight=naive with noise.leftover: in-place noise across an epoch boundary -------


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(x)


def test_leftover_reproduces_the_authors_in_place_noise_over_two_epochs():
    """The authors' code keeps ONE weight buffer S: before each forward pass it adds
    lam D_t - lam D_{t-1} to S in place, takes the gradient at S and lets SGD update S; at
    the start of an epoch it forgets D_{t-1} (the refresh), so that draw stays in S. Our step
    keeps the latent W and perturbs a copy; with `leftover` the last step of an epoch
    updates the perturbed copy. Both must see the same weights at every forward pass and
    store the same weights at every epoch's end."""
    spe, lam, lr = 3, 0.7, 0.1
    model = _Linear()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 4), dtype=np.uint8))
    labels = jnp.arange(8, dtype=jnp.int32) % 3
    mean, std = jnp.full((4,), 0.5), jnp.full((4,), 0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    graph = taps.trace(model, variables, jnp.zeros((2, 4)))
    tx = optax.sgd(lr)
    s = StepSettings(weight_noise="naive", leftover=True, steps_per_epoch=spe)
    step = jax.jit(make_train_step(model, graph, tx, s, mean, std), static_argnums=5)
    stats = init_stats(graph).replace(
        w_mu={"Dense_0": jnp.full((3,), 0.05)}, w_sigma={"Dense_0": jnp.full((3,), 0.3)}
    )
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats={},
        opt_state=tx.init(variables["params"]),
        noise_stats=stats,
        rng=jax.random.key_data(jax.random.key(1)),
        lam_scale=jnp.ones([], jnp.float32),
    )
    x = (images.astype(jnp.float32) / 255.0 - mean) / std

    def loss_at(kernel, bias):
        logits = x @ kernel + bias
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    noise_key = sub_key(root_key(state), KEY_WEIGHT_NOISE)
    loss_and_grad = jax.jit(jax.value_and_grad(loss_at, argnums=(0, 1)))
    sample = jax.jit(lambda k: noise.kernel_samples(graph, stats, k)["Dense_0"])
    p = variables["params"]["Dense_0"]
    stored = np.asarray(p["kernel"], np.float64)  # the authors' buffer S
    bias = np.asarray(p["bias"], np.float64)
    previous = np.zeros_like(stored)
    for t in range(2 * spe):
        if t % spe == 0:
            previous = np.zeros_like(stored)  # the refresh forgets the last draw
        key_t, _ = noise.step_keys(noise_key, t)
        current = lam * np.asarray(sample(key_t))
        stored = stored + current - previous
        previous = current
        seen, (g_kernel, g_bias) = loss_and_grad(
            jnp.asarray(stored, jnp.float32), jnp.asarray(bias, jnp.float32)
        )
        seen = float(seen)
        stored = stored - lr * np.asarray(g_kernel, np.float64)
        bias = bias - lr * np.asarray(g_bias, np.float64)
        state, m = step(state, images, labels, jnp.arange(8), jnp.float32(lam), True)
        assert float(m["loss"]) == pytest.approx(seen, rel=1e-5)  # the same forward pass
        ours = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
        if (t + 1) % spe == 0:  # the stored weights hold the epoch's last draw
            np.testing.assert_allclose(ours, stored, rtol=1e-5, atol=1e-6)
        else:  # the latent weights: the buffer without the current draw
            np.testing.assert_allclose(ours, stored - current, rtol=1e-5, atol=1e-6)
    # Without leftover the draws never reach the stored weights.
    plain = StepSettings(weight_noise="naive")
    assert plain.leftover is False
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make_train_step(
            model, graph, tx, StepSettings(weight_noise="naive", leftover=True), mean, std
        )


# --- optim.schedule=cosine_to_swa -----------------------------------------------------------


def test_cosine_to_swa_anneals_to_zero_at_the_swa_start_then_holds_a_hundredth():
    spe, peak, swa_start, epochs = 5, 0.2, 3, 5
    tx = optim.make_optimizer(
        learning_rate=peak,
        total_steps=spe * epochs,
        steps_per_epoch=spe,
        momentum=0.0,
        swa_start_epoch=swa_start,
        schedule="cosine_to_swa",
    )
    params = {"w": jnp.zeros((2,))}
    state = tx.init(params)
    seen = []
    for _ in range(spe * epochs):
        updates, state = tx.update({"w": jnp.ones((2,))}, state, params)
        seen.append(-float(updates["w"][0]))
    boundary = swa_start * spe
    want = [0.5 * peak * (1 + math.cos(math.pi * t / boundary)) for t in range(boundary)]
    want += [0.01 * peak] * (spe * epochs - boundary)
    np.testing.assert_allclose(seen, want, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="swa_start_epoch"):
        optim.make_optimizer(
            learning_rate=0.1, total_steps=10, steps_per_epoch=5, schedule="cosine_to_swa"
        )


# --- method=authors -------------------------------------------------------------------------


def test_method_authors_sets_every_key_of_the_recipe_and_config_json_records_it():
    c = resnet.get_config("smoke,method=authors")
    saved = config_lib.flat(config_lib.from_json_text(config_lib.to_json(c)))
    for key, value in config_lib.RECIPES["authors"].items():
        assert saved[key] == value, key
    assert config_lib.method_name(c) == "authors"
    # A key set after the preset wins; then the config is no longer the recipe.
    c = resnet.get_config("smoke,method=authors,noise.lambda_max=1.0")
    assert c.noise.lambda_max == 1.0 and config_lib.method_name(c) == "naive"
    with pytest.raises(config_lib.ConfigError, match="optim.schedule"):
        config_lib.validate(resnet.get_config("smoke,method=sgd,optim.schedule=cosine_to_swa"))
    for bad in ("noise.dist=laplace", "noise.act_sites=all", "noise.w_quantizer=sym"):
        with pytest.raises(config_lib.ConfigError, match=bad.split("=")[0]):
            config_lib.validate(resnet.get_config("smoke," + bad))


@pytest.mark.parametrize(
    "preset, base, lam, other, other_name",
    [
        # naive's in-place noise at the authors' lambda 0.8; one more key of their recipe
        # makes it neither preset (the name falls back to the switches)
        ("lam08", "naive", 0.8, "method=lam08,noise.w_quantizer=symmetric", "naive"),
        # the paper's form at lambda 0.5; another weight form at 0.5 is not the preset
        ("dnq_half", "dnq", 0.5, "method=naive,noise.lambda_max=0.5", "naive"),
    ],
)
def test_a_lambda_preset_is_its_method_at_that_lambda_and_nothing_else(
    preset, base, lam, other, other_name
):
    c = resnet.get_config(f"smoke,method={preset}")
    plain = config_lib.flat(resnet.get_config(f"smoke,method={base}"))
    differ = {k: v for k, v in config_lib.flat(c).items() if plain[k] != v}
    assert differ == {"noise.lambda_max": lam}
    assert config_lib.method_name(c) == preset
    assert config_lib.method_name(resnet.get_config(f"smoke,method={base}")) == base
    # The studies' spelling of the row names it too.
    spelled = resnet.get_config(f"smoke,method={base},noise.lambda_max={lam}")
    assert config_lib.method_name(spelled) == preset
    assert config_lib.method_name(resnet.get_config(f"smoke,{other}")) == other_name


def test_method_authors_trains_end_to_end_on_the_smoke_config(tmp_path):
    from dnq_jax.train import metrics
    from dnq_jax.train.loop import train_and_evaluate

    # Noise from the first epoch (one compiled step, not a clean one too) and no PTQ at the
    # end (FP32 only): the smoke run's time is compiling, and these keys need neither.
    pairs = "method=authors,runtime.progress=False,noise.start_epoch=0,eval.bits="
    results = train_and_evaluate(resnet.get_config("smoke," + pairs), str(tmp_path))
    assert 0 <= results["fp32"] <= 100 and results["swa_snapshots"] == 2
    rows = [r for r in metrics.read(tmp_path) if "lambda" in r]
    # lambda_max 0.8 ramped over 2 epochs: the first noise epoch is 0, then 0.4, then 0.8.
    assert [round(r["lambda"], 3) for r in rows] == [0.0, 0.4, 0.8, 0.8]
    assert all(r["w_sigma"] > 0 for r in rows)  # the symmetric profiler's statistics
