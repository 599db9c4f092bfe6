"""Hessian eigenvalue and trace on a quadratic of known spectrum, the chunked loss of a Flax
model, filter-normalised directions and loss landscapes, and their plots."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dnq_jax import diagnostics as dg
from dnq_jax.diagnostics import plots

LAMS = np.array([10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.8, 0.5, 0.3, 0.2, 0.1])


@pytest.fixture(scope="module")
def quadratic():
    """loss = 0.5 v^T A v, v the flattened pytree, A = Q diag(lams) Q^T (float64 numpy)."""
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
        "d": jnp.asarray(rng.normal(size=(2, 2, 2)), jnp.float32),
    }
    flat, unravel = ravel_pytree(params)
    dim = flat.shape[0]
    lams = np.concatenate([LAMS, np.linspace(0.05, 0.01, dim - len(LAMS))])
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = (q * lams) @ q.T
    a32 = jnp.asarray(a, jnp.float32)

    def loss_fn(p):
        v = ravel_pytree(p)[0]
        return 0.5 * v @ a32 @ v

    return params, loss_fn, a, lams, q, unravel


@pytest.mark.parametrize("loop", ["python", "fori"])
def test_top_eigenvalue_of_a_known_spectrum(quadratic, loop):
    params, loss_fn, _, lams, q, _ = quadratic
    res = dg.top_hessian_eigenvalue(loss_fn, params, jax.random.key(1), iters=40, loop=loop)
    assert abs(res.eigenvalue - lams[0]) / lams[0] < 1e-3
    assert res.history.shape == (40,)
    v = np.asarray(ravel_pytree(res.eigenvector)[0], np.float64)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
    assert abs(v @ q[:, 0]) == pytest.approx(1.0, abs=1e-3)


def test_top_eigenvalue_stops_at_tolerance(quadratic):
    params, loss_fn, _, lams, _, _ = quadratic
    res = dg.top_hessian_eigenvalue(loss_fn, params, jax.random.key(1), iters=200, tol=1e-6)
    assert len(res.history) < 200
    assert abs(res.eigenvalue - lams[0]) / lams[0] < 1e-3


def test_power_iteration_keeps_half_precision_params_in_their_dtype():
    # loss = sum(s * w^2) over a bfloat16 leaf: H = diag(2 s), top eigenvalue 2 max(s).
    scale = jnp.asarray([4.0, 1.0, 0.5], jnp.bfloat16)
    params = {"w": jnp.ones(3, jnp.bfloat16)}
    loss = lambda p: jnp.sum(scale * p["w"] ** 2).astype(jnp.float32)
    res = dg.top_hessian_eigenvalue(loss, params, jax.random.key(0), iters=30)
    assert res.eigenvector["w"].dtype == jnp.bfloat16
    assert res.eigenvalue == pytest.approx(8.0, rel=2e-2)


def test_hessian_trace_of_a_known_spectrum(quadratic):
    params, loss_fn, a, lams, _, _ = quadratic
    res = dg.hessian_trace(loss_fn, params, jax.random.key(2), samples=300)
    assert abs(res.trace - lams.sum()) < 4 * res.stderr
    # Rademacher probes: Var(v^T A v) = 2 sum_{i != j} A_ij^2.
    expected_stderr = np.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)) / 300)
    assert 0.75 < res.stderr / expected_stderr < 1.25
    # Sample i depends only on fold_in(key, i): a shorter run is a prefix of a longer one.
    short = dg.hessian_trace(loss_fn, params, jax.random.key(2), samples=5)
    np.testing.assert_allclose(short.samples, res.samples[:5], rtol=1e-6)


def test_hvp_matches_the_matrix(quadratic):
    params, loss_fn, a, _, _, unravel = quadratic
    u = np.random.default_rng(3).normal(size=a.shape[0])
    hu = dg.hvp(loss_fn, params, unravel(jnp.asarray(u, jnp.float32)))
    np.testing.assert_allclose(ravel_pytree(hu)[0], a @ u, rtol=1e-4, atol=1e-4)


def test_landscape_along_a_given_direction_is_the_quadratic(quadratic):
    params, loss_fn, a, _, _, unravel = quadratic
    p = np.asarray(ravel_pytree(params)[0], np.float64)
    d = np.random.default_rng(4).normal(size=p.shape)
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    land = dg.loss_landscape_1d(
        loss_fn, params, jax.random.key(0), alphas, direction=unravel(jnp.asarray(d, jnp.float32))
    )
    want = [0.5 * (p + t * d) @ a @ (p + t * d) for t in alphas]
    np.testing.assert_allclose(land.losses, want, rtol=1e-4)


def _check_filter_norms(params, direction, ignore_1d):
    for w, d in zip(jax.tree.leaves(params), jax.tree.leaves(direction)):
        w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
        assert d.shape == w.shape
        if w.ndim <= 1:
            np.testing.assert_array_equal(d, np.zeros_like(w) if ignore_1d else w)
            continue
        axes = tuple(range(w.ndim - 1))
        np.testing.assert_allclose(
            np.linalg.norm(d.reshape(-1, d.shape[-1]), axis=0),
            np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0),
            rtol=1e-5,
        )
        # A random direction, not the weights themselves.
        assert not np.allclose(d, w)
        assert np.all(np.abs(d).sum(axis=axes) > 0)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, depthwise conv, Dense head: defined only here."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x)
        return nn.Dense(3, name="fc")(x.mean((1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = TinyCNN()
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(10, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=10), jnp.int32)
    variables = model.init(jax.random.key(0), images)
    stats = jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])
    return model, {**variables, "batch_stats": stats}, images, labels


@pytest.mark.parametrize("ignore_1d", [True, False])
def test_filter_normalized_direction_norms(tiny, ignore_1d):
    _, variables, _, _ = tiny
    params = variables["params"]
    d = dg.filter_normalized_direction(params, jax.random.key(7), ignore_1d=ignore_1d)
    _check_filter_norms(params, d, ignore_1d)


def test_chunked_loss_equals_the_full_batch_loss(tiny):
    model, variables, images, labels = tiny
    params = variables["params"]
    logits = model.apply(variables, images, train=False)
    want = -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(10), np.asarray(labels)])
    whole = dg.make_loss_fn(model, variables, images, labels)
    chunked = dg.make_loss_fn(model, variables, images, labels, batch_size=4)
    assert len(chunked.chunks) == 3
    # Equal models share one term function, hence every compiled program built on it.
    assert dg.make_loss_fn(TinyCNN(), variables, images[:4], labels[:4]).fn is whole.fn
    assert float(whole(params)) == pytest.approx(want, rel=1e-5)
    assert float(chunked(params)) == pytest.approx(want, rel=1e-5)
    # The Hessian of the sum of chunk terms is that of the whole batch.
    v = dg.filter_normalized_direction(params, jax.random.key(8), ignore_1d=False)
    a, b = ravel_pytree(dg.hvp(whole, params, v))[0], ravel_pytree(dg.hvp(chunked, params, v))[0]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_landscapes_at_the_origin_equal_the_loss(tiny, tmp_path):
    model, variables, images, labels = tiny
    params = variables["params"]
    loss_fn = dg.make_loss_fn(model, variables, images, labels, batch_size=4)
    loss0 = float(loss_fn(params))
    key = jax.random.key(9)
    line = dg.loss_landscape_1d(loss_fn, params, key, np.linspace(-1, 1, 5))
    assert line.losses[2] == pytest.approx(loss0, rel=1e-6)
    assert np.all(np.isfinite(line.losses)) and not np.allclose(line.losses, loss0)
    _check_filter_norms(params, line.directions[0], True)
    plane = dg.loss_landscape_2d(loss_fn, params, key, [-0.5, 0.0, 0.5], [-0.5, 0.0, 0.5, 1.0])
    assert plane.losses.shape == (3, 4)
    assert plane.losses[1, 1] == pytest.approx(loss0, rel=1e-6)
    top = dg.top_hessian_eigenvalue(loss_fn, params, key, iters=4)
    files = [
        plots.landscape_1d({"tiny": line}, tmp_path / "line.png"),
        plots.landscape_2d(plane, tmp_path / "plane.png"),
        plots.eigenvalue_convergence({"tiny": top.history}, tmp_path / "power.png"),
    ]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_power_iteration_loops_agree_on_a_chunked_loss(tiny):
    model, variables, images, labels = tiny
    params = variables["params"]
    loss_fn = dg.make_loss_fn(model, variables, images, labels, batch_size=4)
    key = jax.random.key(10)
    python = dg.top_hessian_eigenvalue(loss_fn, params, key, iters=3)
    fori = dg.top_hessian_eigenvalue(loss_fn, params, key, iters=3, loop="fori")
    np.testing.assert_allclose(fori.history, python.history, rtol=1e-4)
    assert np.all(np.isfinite(python.history)) and python.history[-1] != 0.0
