"""NNX models through `dnq_jax.taps_nnx`: each operation against a Linen twin with the same
weights (the same sites, shapes and BN pairs, the same profiler statistics, the same noisy
forward pass for the same keys, the same PTQ outputs), and against the NNX model itself."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dnq_jax.ptq
from dnq_jax import taps, taps_nnx
from dnq_jax.diagnostics import error_setup, make_loss_fn, weight_error_stats
from dnq_jax.diagnostics.hessian import top_hessian_eigenvalue
from dnq_jax.dnq import activation_noise_fn, make_profiler, weight_noise
from dnq_jax.ptq import QuantSpec, ReconSettings


class Block(nnx.Module):
    def __init__(self, c: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c, rngs=rngs)
        self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(x + self.bn2(self.conv2(y)))


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List([Block(8, rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((1, 2)))


class LinenBlock(nn.Module):
    c: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
        y = nn.relu(bn("bn1")(nn.Conv(self.c, (3, 3), use_bias=False, name="conv1")(x)))
        return nn.relu(x + bn("bn2")(nn.Conv(self.c, (3, 3), use_bias=False, name="conv2")(y)))


class LinenNet(nn.Module):  # the twin: the Linen names the bridge gives the NNX modules
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        for i in range(2):
            x = LinenBlock(8, name=f"blocks_{i}")(x, train)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def twins():
    """An NNX net with non-trivial BatchNorm statistics, its Linen view and the Linen twin."""
    model = Net(nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(1), (48, 12, 12, 3))
    model.train()
    model(images * 2.0 + 0.5)  # running statistics away from their initial values
    model.eval()
    view, variables = taps_nnx.as_linen(model)
    return model, view, LinenNet(), variables, images


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_view_computes_what_the_nnx_model_computes(twins):
    model, view, twin, variables, images = twins
    ref_vars = twin.init(jax.random.key(9), images[:1])
    same_layout = jax.tree_util.tree_structure(jax.tree_util.tree_map(jnp.shape, ref_vars))
    assert jax.tree_util.tree_structure(jax.tree_util.tree_map(jnp.shape, variables)) == (
        same_layout
    )
    np.testing.assert_array_equal(view.apply(variables, images), model(images))
    np.testing.assert_array_equal(twin.apply(variables, images), model(images))
    # Training mode: batch statistics, and the updated running statistics written back.
    out, new = view.apply(variables, images, train=True, mutable=["batch_stats"])
    trained = Net(nnx.Rngs(0))
    taps_nnx.update(trained, variables)
    trained.train()
    np.testing.assert_array_equal(out, trained(images))
    copy = Net(nnx.Rngs(5))
    taps_nnx.update(copy, {**variables, **new})
    for a, b in zip(jax.tree.leaves(nnx.state(copy)), jax.tree.leaves(nnx.state(trained))):
        np.testing.assert_array_equal(a, b)


def test_same_sites_shapes_and_bn_pairs(twins):
    _, view, twin, variables, images = twins
    g_nnx, g_linen = taps.trace(view, variables, images), taps.trace(twin, variables, images)
    assert g_nnx.layers == g_linen.layers
    assert g_nnx.names == ("stem", "blocks_0/conv1", "blocks_0/conv2", "blocks_1/conv1",
                           "blocks_1/conv2", "head")  # fmt: skip
    pairs = dnq_jax.ptq.fold.foldable_pairs(view, variables, images[:2], train=False)
    assert pairs == dnq_jax.ptq.fold.foldable_pairs(twin, variables, images[:2], train=False)
    assert len(pairs) == 5


def test_same_profiler_statistics_and_noisy_forward(twins):
    _, view, twin, variables, images = twins
    spec = QuantSpec(w_bits=2, a_bits=4)
    out = []
    for model in (view, twin):
        graph = taps.trace(model, variables, images)
        stats = jax.jit(make_profiler(model, graph, spec))(variables, images[:32])
        noisy = weight_noise(
            variables["params"], graph, stats, jax.random.key(3), jax.random.key(4), 1.0
        )
        drop_in = activation_noise_fn(graph, stats, jax.random.key(5), 1.0, batch=48)
        with taps.map_inputs(drop_in):
            logits, _ = model.apply(
                {**variables, "params": noisy}, images, train=True, mutable=["batch_stats"]
            )
        out.append((stats, logits))
    jax.tree.map(np.testing.assert_array_equal, out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


@pytest.mark.parametrize("bits,methods", [((4, 4), ("rtn", "qdrop")), ((2, 4), ("rtn",))])
def test_same_rtn_and_qdrop_outputs(twins, bits, methods):
    model, view, twin, variables, images = twins
    spec = QuantSpec(w_bits=bits[0], a_bits=bits[1])
    recon = ReconSettings.for_method("qdrop", iters=10, batch_size=16, seed=0)
    for method in methods:
        kw = {"recon": recon} if method == "qdrop" else {}
        q_nnx = dnq_jax.ptq.quantize(view, variables, images[:32], spec, method=method, **kw)
        q_lin = dnq_jax.ptq.quantize(twin, variables, images[:32], spec, method=method, **kw)
        assert q_nnx.bits_per_layer == q_lin.bits_per_layer
        assert q_nnx.bn_pairs == q_lin.bn_pairs
        _close(q_nnx(images), q_lin(images))
        # Quantization did something: the logits moved away from the float model's.
        assert float(jnp.abs(q_nnx(images) - model(images)).max()) > 1e-3


def test_an_nnx_models_quantized_export_reloads_to_its_logits(twins, tmp_path):
    _, view, twin, variables, images = twins
    spec = QuantSpec(w_bits=4, a_bits=4)
    q_nnx = dnq_jax.ptq.quantize(view, variables, images[:32], spec)
    exported = dnq_jax.ptq.export(q_nnx, tmp_path / "nnx.stablehlo")
    from dnq_jax.ptq.export import load

    np.testing.assert_array_equal(load(exported)(images), q_nnx(images))
    _close(q_nnx(images), dnq_jax.ptq.quantize(twin, variables, images[:32], spec)(images))


def test_same_error_statistics_and_sharpness(twins):
    _, view, twin, variables, images = twins
    labels = jnp.arange(images.shape[0]) % 10
    results = []
    for model in (view, twin):
        setup = error_setup(model, variables, images[:32], QuantSpec(w_bits=2, a_bits=4))
        stats = weight_error_stats(setup)
        loss = make_loss_fn(model, variables, images, labels)
        eig = top_hessian_eigenvalue(loss, variables["params"], jax.random.key(0), iters=3)
        results.append(({k: float(v.std) for k, v in stats.items()}, float(eig.eigenvalue)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-4)


class Scale(nnx.Module):  # a module of the user's own, with a parameter of its own
    def __init__(self, n: int):
        self.w = nnx.Param(jnp.linspace(0.5, 2.0, n))

    def __call__(self, x):
        return x * self.w


class Mixed(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.scale = Scale(16)
        self.seq = nnx.Sequential(
            nnx.Linear(16, 16, rngs=rngs), nnx.relu, nnx.Linear(16, 4, rngs=rngs)
        )

    def __call__(self, x):
        return self.seq(self.scale(self.drop(nnx.gelu(self.ln(self.l1(x))))))


def test_other_modules_run_their_own_code_under_jit():
    model = Mixed(nnx.Rngs(0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (32, 8))
    view, variables = taps_nnx.as_linen(model)
    assert variables["params"]["scale"]["w"] is model.scale.w.value
    assert taps.trace(view, variables, x).names == ("l1", "seq/layers_0", "seq/layers_2")
    apply = jax.jit(lambda v, x, train: view.apply(v, x, train=train, mutable=True)[0],
                    static_argnums=2)  # fmt: skip
    np.testing.assert_allclose(apply(variables, x, False), model(x), atol=1e-6)
    # The module's own parameter is the view's: scaling it changes the output.
    doubled = jax.tree.map(lambda a: a, variables)
    doubled["params"]["scale"]["w"] = 2 * variables["params"]["scale"]["w"]
    assert float(jnp.abs(apply(doubled, x, False) - apply(variables, x, False)).max()) > 1e-3
    # Training mode drops units (Dropout's own RNG state is a collection of its own).
    assert float(jnp.abs(apply(variables, x, True) - model(x)).max()) > 1e-3


class Stacked(nnx.Module):  # an nnx.vmap-created stack: one Linear with stacked params
    def __init__(self, rngs: nnx.Rngs):
        make = nnx.vmap(lambda r: nnx.Linear(4, 4, rngs=r), in_axes=0, out_axes=0)
        self.layers = make(nnx.Rngs(0).fork(split=3))

    def __call__(self, x):
        return nnx.scan(lambda x, layer: (layer(x), None), in_axes=(nnx.Carry, 0))(x, self.layers)[
            0
        ]


class Remat(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inner = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda m, x: m(x))(self.inner, x)


def test_refusals_name_the_module():
    with pytest.raises(taps_nnx.NNXBridgeError, match="layers.*stacked"):
        taps_nnx.as_linen(Stacked(nnx.Rngs(0)))
    with pytest.raises(taps_nnx.NNXBridgeError, match="expected an nnx.Module"):
        taps_nnx.as_linen(LinenNet())
    view, variables = taps_nnx.as_linen(Remat(nnx.Rngs(0)))
    with pytest.raises(taps_nnx.NNXBridgeError, match="lifted transform"):
        view.apply(variables, jnp.ones((2, 4)))
    net = Net(nnx.Rngs(0))
    params = {k: v for k, v in taps_nnx.as_linen(net)[1]["params"].items() if k != "head"}
    with pytest.raises(taps_nnx.NNXBridgeError, match="params/head/(bias|kernel) is missing"):
        taps_nnx.update(net, {"params": params})


class Dropped(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.lin(x))


def test_dropout_draws_advance_only_through_a_written_back_count():
    """A training call advances nnx.Dropout's RNG count; a view applied without 'rngcount'
    mutable would repeat one mask on every call, so it is refused. With it, the counts written
    back give each step a new mask, as the NNX model's own calls do."""
    model = Dropped(nnx.Rngs(0))
    view, variables = taps_nnx.as_linen(model)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(view.apply(variables, x), model.lin(x))  # evaluation: no draw
    with pytest.raises(taps_nnx.NNXBridgeError, match="drop draws random numbers.*'rngcount'"):
        view.apply(variables, x, train=True, mutable=["batch_stats"])
    first, new = view.apply(variables, x, train=True, mutable=["rngcount"])
    taps_nnx.update(model, new)
    second, _ = view.apply(taps_nnx.variables(model), x, train=True, mutable=["rngcount"])
    assert not np.array_equal(first, second)
    assert {0.0, 2.0} >= set(np.round(np.asarray(first / model.lin(x)), 5).ravel().tolist())
