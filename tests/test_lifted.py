"""Taps through Flax's lifted transforms: each lifted model must be quantized, profiled and
noise-trained exactly as its plain twin (same weights; blocks called directly, the stack
unrolled, the ensemble written out member by member)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dnq_jax import ptq, taps
from dnq_jax.dnq import noise, profiler

# --- the models: each lifted one and its plain twin --------------------------------------


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        y = nn.Conv(4, (3, 3), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        return x + nn.Conv(4, (3, 3))(y)


class RematCNN(nn.Module):
    lifted: bool = True

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        block = nn.remat(Block, static_argnums=(2,)) if self.lifted else Block
        for i in range(2):
            x = block(name=f"block{i}")(x, train)
        return nn.Dense(5)(x.mean((1, 2)))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8)(nn.relu(nn.Dense(8)(x))), None


class ScanStack(nn.Module):
    lifted: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        if self.lifted:
            stack = nn.scan(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            x, _ = stack(name="stack")(x, None)
        else:
            for i in range(3):
                x, _ = MLP(name=f"layer{i}")(x, None)
        return nn.Dense(5)(x)


class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5)(x)


class Ensemble(nn.Module):
    lifted: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        if self.lifted:
            heads = nn.vmap(
                Head,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                out_axes=0,
                axis_size=3,
            )
            y = heads(name="heads")(x)
        else:
            y = jnp.stack([Head(name=f"head{i}")(x) for i in range(3)])
        return y.mean(0)


def _unstack(tree, prefix: str, n: int):
    """The plain twin's params of a stack: slice i of `tree` becomes module f'{prefix}{i}'."""
    return {f"{prefix}{i}": jax.tree_util.tree_map(lambda v, i=i: v[i], tree) for i in range(n)}


def remat_twin(v):
    return v  # the blocks keep their names; remat changes nothing in the variables


def scan_twin(v):
    params = dict(v["params"])
    params.update(_unstack(params.pop("stack"), "layer", 3))
    return {**v, "params": params}


def ensemble_twin(v):
    params = dict(v["params"])
    params.update(_unstack(params.pop("heads"), "head", 3))
    return {**v, "params": params}


def _plain_name(name: str) -> str:
    """The plain twin's site name for a lifted one: 'stack/Dense_0[1]' -> 'layer1/Dense_0'."""
    if "[" not in name:
        return name
    base, index = name[:-1].split("[")
    top, rest = base.split("/", 1)
    return f"{ {'stack': 'layer', 'heads': 'head'}[top] }{index}/{rest}".replace(" ", "")


def _randomize(variables, seed=0):
    rng = np.random.default_rng(seed)

    def leaf(path, v):
        key = path[-1].key
        if key == "var":
            return jnp.asarray(rng.uniform(0.3, 2.0, v.shape), v.dtype)
        if key == "scale":
            return jnp.asarray(rng.uniform(1.0, 3.0, v.shape), v.dtype)
        if key == "kernel":
            return jnp.asarray(rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[-2:-1])))
        return jnp.asarray(rng.normal(size=v.shape) * 0.3, v.dtype)

    return jax.tree_util.tree_map_with_path(leaf, variables)


CASES = {
    "remat": (RematCNN, remat_twin, (8, 6, 6, 3)),
    "scan": (ScanStack, scan_twin, (8, 2, 2, 2)),
    "vmap": (Ensemble, ensemble_twin, (8, 2, 2, 2)),
}


def _setup(case):
    cls, twin, shape = CASES[case]
    x = jax.random.normal(jax.random.key(0), shape)
    lifted = cls(lifted=True)
    variables = _randomize(lifted.init(jax.random.key(1), x))
    return lifted, variables, cls(lifted=False), twin(variables), x


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_lifted_model_computes_what_its_plain_twin_computes(case):
    lifted, v, plain, pv, x = _setup(case)
    _close(lifted.apply(v, x), plain.apply(pv, x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_trace_unrolls_lifted_layers_like_the_plain_twin(case):
    lifted, v, plain, pv, x = _setup(case)
    g, pg = taps.trace(lifted, v, x), taps.trace(plain, pv, x)
    assert [_plain_name(n) for n in g.names] == list(pg.names)
    for layer, twin in zip(g.layers, pg.layers):
        assert layer.kernel_shape == twin.kernel_shape
        assert layer.input_shape == twin.input_shape
        _close(taps.get_kernel(v["params"], layer), taps.get_kernel(pv["params"], twin), 0)
    assert [(_plain_name(s), p) for s, p in g.bn_pairs] == list(pg.bn_pairs)


@pytest.mark.parametrize("bits", [(4, 4), (2, 4)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ptq_of_lifted_model_equals_ptq_of_plain_twin(case, bits):
    lifted, v, plain, pv, x = _setup(case)
    spec = ptq.QuantSpec(w_bits=bits[0], a_bits=bits[1])
    qm = ptq.quantize(lifted, v, x, spec)
    pq = ptq.quantize(plain, pv, x, spec)
    assert {_plain_name(n): b for n, b in qm.bits_per_layer.items()} == pq.bits_per_layer
    assert [(_plain_name(s), p) for s, p in qm.bn_pairs] == list(pq.bn_pairs)
    for name, (lo, hi) in qm.act_ranges.items():
        _close(jnp.stack([lo, hi]), jnp.stack(pq.act_ranges[_plain_name(name)]))
    out, ref = qm(x), pq(x)
    assert float(jnp.max(jnp.abs(ref - plain.apply(pv, x)))) > 1e-3  # it does quantize
    _close(out, ref)


@pytest.mark.parametrize("case", sorted(CASES))
def test_profiler_statistics_equal_per_layer(case):
    lifted, v, plain, pv, x = _setup(case)
    g, pg = taps.trace(lifted, v, x), taps.trace(plain, pv, x)
    spec = ptq.QuantSpec(w_bits=4, a_bits=4)
    stats = jax.jit(profiler.make_profiler(lifted, g, spec, apply_kwargs={}))(v, x)
    want = jax.jit(profiler.make_profiler(plain, pg, spec, apply_kwargs={}))(pv, x)
    assert len(stats.w_mu) == len(want.w_mu) == len(pg.kernel_layers())
    # Site names differ between the twins (a stack's slices vs separate modules); the
    # statistics must agree layer by layer in call order.
    in_order = lambda table, layers: [table[layer.name] for layer in layers]
    for field in ("w_mu", "w_sigma"):
        got = in_order(getattr(stats, field), g.kernel_layers())
        ref = in_order(getattr(want, field), pg.kernel_layers())
        for a, b in zip(got, ref, strict=True):
            _close(a, b)
    for field in ("a_mu", "a_sigma"):
        got = in_order(getattr(stats, field), g.layers)
        ref = in_order(getattr(want, field), pg.layers)
        _close(jnp.stack(got), jnp.stack(ref))


def _dnq_grads(model, variables, x, y, key, prepare: bool):
    """One DNQ step's loss, gradients and new BN statistics, built from the public noise
    API as the trainer builds its step: profiled statistics, differential weight noise and
    drop-in, the gradient taken at the noisy point."""
    has_bn = "batch_stats" in variables
    eval_kw = {"train": False} if has_bn else {}
    graph = taps.trace(model, variables, x, **eval_kw)
    prof = profiler.make_profiler(model, graph, ptq.QuantSpec(2, 4), apply_kwargs=eval_kw)
    stats = jax.jit(prof)(variables, x)
    k_t, k_prev = noise.step_keys(key, 3)

    def loss_fn(params):
        p = noise.weight_noise(params, graph, stats, k_t, k_prev, 0.5)
        fn = noise.activation_noise_fn(graph, stats, jax.random.fold_in(key, 9), 0.5, batch=8)
        v = {**variables, "params": p}
        if prepare:
            v = taps.prepare(v, graph)
        with taps.map_inputs(fn):
            logits, upd = model.apply(
                v, x, mutable=["batch_stats"], **({"train": True} if has_bn else {})
            )
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return loss, upd

    (loss, upd), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    return loss, grads, upd


def test_one_dnq_step_of_the_remat_cnn_equals_its_plain_twin():
    lifted, v, plain, pv, x = _setup("remat")
    y = jnp.arange(8) % 5
    key = jax.random.key(7)
    loss, grads, upd = _dnq_grads(lifted, v, x, y, key, prepare=False)
    want_loss, want_grads, want_upd = _dnq_grads(plain, pv, x, y, key, prepare=False)
    _close(loss, want_loss)
    jax.tree_util.tree_map(_close, grads, want_grads)
    jax.tree_util.tree_map(_close, upd, want_upd)


def test_one_dnq_step_of_the_scanned_stack_equals_its_plain_twin():
    lifted, v, plain, pv, x = _setup("scan")
    y = jnp.arange(8) % 5
    key = jax.random.key(7)
    loss, grads, _ = _dnq_grads(lifted, v, x, y, key, prepare=True)
    want_loss, want_grads, _ = _dnq_grads(plain, pv, x, y, key, prepare=False)
    _close(loss, want_loss)
    _close(grads["stack"]["Dense_0"]["kernel"][1], want_grads["layer1"]["Dense_0"]["kernel"])


# --- what the taps refuse, and how -------------------------------------------------------


class CondNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8)(x)
        return nn.cond(True, lambda m, x: m(x), lambda m, x: m(x), nn.Dense(8), x)


class JitMLP(nn.Module):
    """nn.jit traces the first block only and reuses that trace for the equal second one."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x, _ = nn.jit(MLP)(name=f"block{i}")(x, None)
        return x


class SharedScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(MLP, variable_broadcast="params", split_rngs={"params": False}, length=2)
        x, _ = stack(name="rnn")(x, None)
        return x


@pytest.mark.parametrize(
    "model, words",
    [
        (CondNet(), ["'Dense_1'", "nn.cond"]),
        (SharedScan(), ["'rnn/Dense_1'", "nn.scan", "shared"]),
        (JitMLP(), ["'block0/Dense_1'", "nn.jit", "reuses"]),
    ],
)
def test_unsupported_transform_is_refused_when_traced_with_a_clear_error(model, words):
    x = jnp.ones((2, 8))
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(taps.LiftedTransformError) as e:
        taps.trace(model, variables, x)
    for word in words:
        assert word in str(e.value)


def test_stacked_site_without_index_asks_for_prepare():
    lifted, v, *_, x = _setup("scan")
    with pytest.raises(ValueError, match="taps.prepare"), taps.map_inputs(lambda n, u: u):
        lifted.apply(v, x)


def test_capture_in_a_lifted_body_without_mutable_params_says_how():
    lifted, v, *_, x = _setup("remat")
    with pytest.raises(ValueError, match="mutable"), taps.capture_inputs({}):
        lifted.apply(v, x)


def test_map_kernels_maps_each_slice_of_a_stack_on_its_own():
    lifted, v, plain, pv, x = _setup("scan")
    g, pg = taps.trace(lifted, v, x), taps.trace(plain, pv, x)
    fn = lambda layer, w: w * (1.0 + layer.index)
    out = taps.map_kernels(v["params"], g.layers, fn)
    want = taps.map_kernels(pv["params"], pg.layers, fn)
    _close(lifted.apply({**v, "params": out}, x), plain.apply({**pv, "params": want}, x))
