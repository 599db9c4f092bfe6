"""SWA as an optax transform, BN re-estimation, and config validation."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import resnet
from dnq_jax import data
from dnq_jax.errors import ConfigError
from dnq_jax.train import config as cfg
from dnq_jax.train import optim


def test_swa_equals_the_mean_of_the_end_of_epoch_snapshots():
    spe, start, epochs = 3, 2, 6
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), optim.swa(start, spe))
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    snapshots = []
    for t in range(spe * epochs):
        g = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        if (t + 1) % spe == 0 and (t + 1) // spe - 1 >= start:
            snapshots.append(np.asarray(params["w"], np.float64))
    avg, n = optim.swa_params(state, params)
    assert n == epochs - start == len(snapshots)
    np.testing.assert_allclose(avg["w"], np.mean(snapshots, axis=0), rtol=1e-6)


def test_swa_before_its_start_returns_the_params():
    tx = optax.chain(optax.sgd(0.1), optim.swa(5, 2))
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    updates, state = tx.update({"w": jnp.ones(2)}, state, params)
    avg, n = optim.swa_params(state, params)
    assert n == 0 and avg is params


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(2, name="head")(nn.relu(x).mean((1, 2)))


def test_bn_batches_mix_a_class_sorted_training_set():
    # 64 images stored class by class, the classes far apart: the data's variance is mostly
    # between the classes.
    rng = np.random.default_rng(0)
    stored = rng.integers(20, 24, size=(64, 6, 6, 3)).astype(np.uint8)
    stored[32:] += 180
    zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
    ds = types.SimpleNamespace(train_images=stored, num_train=64, mean=zero, std=one)
    x = stored.astype(np.float32) / 255.0  # normalised with mean 0, std 1
    batches = list(optim.bn_batches(ds, 8, jax.random.key(2)))
    seen = np.concatenate([np.asarray(b) for b in batches])
    assert seen.shape == x.shape
    back = np.rint(seen * 255).astype(np.uint8)  # each stored image once, in another order
    np.testing.assert_array_equal(np.unique(back, axis=0), np.unique(stored, axis=0))
    assert len(np.unique(back, axis=0)) == 64
    model = _InputBN()
    variables = model.init(jax.random.key(1), x[:1])
    var = lambda bs: np.asarray(
        optim.recompute_batch_stats(model, variables, bs)["batch_stats"]["bn"]["var"]
    )
    whole = x.var((0, 1, 2), dtype=np.float64)  # the data's own variance, per channel
    np.testing.assert_allclose(var(batches), whole, rtol=0.3)
    # Batches in the stored order (what the re-estimation used) see one class each.
    assert (var([x[a : a + 8] for a in range(0, 64, 8)]) < 0.01 * whole).all()


def test_bn_batches_are_transformed_as_the_training_batches():
    # Each yielded image is the stored one, zero-padded by `pad`, cropped back to its size at
    # some offset and perhaps mirrored: found by a numpy search over every offset and flip.
    rng = np.random.default_rng(3)
    stored = rng.integers(1, 255, size=(24, 6, 6, 2)).astype(np.uint8)  # no zero pixel
    zero, one = np.zeros(2, np.float32), np.ones(2, np.float32)
    ds = types.SimpleNamespace(train_images=stored, num_train=24, mean=zero, std=one)
    key, pad = jax.random.key(4), 2
    rows = np.sort(np.asarray(data.epoch_indices(key, 24, 8)), axis=1)
    batches = list(optim.bn_batches(ds, 8, key, pad=pad, flip=True))
    assert len(batches) == len(rows) == 3
    offsets, flips = set(), set()
    for r, b in zip(rows, batches):
        for i, got in zip(r, np.rint(np.asarray(b) * 255).astype(np.uint8)):
            padded = np.pad(stored[i], ((pad, pad), (pad, pad), (0, 0)))
            hits = [
                (dy, dx, f)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for f in (False, True)
                if np.array_equal(
                    (lambda c: c[:, ::-1] if f else c)(padded[dy : dy + 6, dx : dx + 6]), got
                )
            ]
            assert hits, "an image that is no crop of its padded original"
            offsets.add(hits[0][:2])
            flips.add(hits[0][2])
    assert len(offsets) > 3 and flips == {False, True}  # the transform is drawn, per image
    plain = list(optim.bn_batches(ds, 8, key))  # pad=0, flip=False: the stored images
    for r, b in zip(rows, plain):
        np.testing.assert_array_equal(np.rint(np.asarray(b) * 255).astype(np.uint8), stored[r])


class _InputBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.BatchNorm(use_running_average=not train, name="bn")(x).mean((1, 2))


def test_bn_recalibration_is_the_average_of_batch_statistics():
    model = _BNNet()
    x = jax.random.normal(jax.random.key(0), (12, 6, 6, 3)) * 2.0 + 0.5
    variables = model.init(jax.random.key(1), x[:1])
    batches = [x[:4], x[4:8], x[8:]]
    new = optim.recompute_batch_stats(model, variables, batches)
    k = np.asarray(variables["params"]["conv"]["kernel"], np.float64)
    means, vars_ = [], []
    for b in batches:
        b = np.pad(np.asarray(b, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        h, w = b.shape[1] - 2, b.shape[2] - 2
        y = sum(
            np.einsum("nhwc,co->nhwo", b[:, i : i + h, j : j + w], k[i, j])
            for i in range(3)
            for j in range(3)
        )
        means.append(y.mean((0, 1, 2)))
        vars_.append(y.var((0, 1, 2)))
    np.testing.assert_allclose(
        new["batch_stats"]["bn"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        new["batch_stats"]["bn"]["var"], np.mean(vars_, 0), rtol=1e-4, atol=1e-5
    )
    # params untouched; the original variables are not modified
    assert new["params"] is variables["params"]
    assert not np.allclose(variables["batch_stats"]["bn"]["var"], new["batch_stats"]["bn"]["var"])


@pytest.mark.parametrize(
    "arg,key",
    [
        ("noise.w_bits=1", "noise.w_bits"),
        ("noise.a_bits=17", "noise.a_bits"),
        ("noise.rho=1.5", "noise.rho"),
        ("optim.num_epochs=0", "optim.num_epochs"),
        ("noise.start_epoch=400", "noise.start_epoch"),
        ("swa.start_epoch=500", "swa.start_epoch"),
        ("noise.ramp=square", "noise.ramp"),
        ("noise.mask=random", "noise.mask"),
        ("eval.bits=w4x4", "eval.bits"),
        ("eval.method=nearest", "eval.method"),
        ("eval.iters=-1", "eval.iters"),
        ("runtime.loop=while", "runtime.loop"),
        ("method=dnq,optim.sam=True,noise.weight=accumulate", "optim.sam"),
        ("method=sgd,swa.lr=0.01", "swa.lr"),
    ],
)
def test_validation_names_the_key(arg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg.validate(resnet.get_config(arg), num_devices=1)


def test_batch_must_divide_by_devices_and_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="optim.batch_size"):
        cfg.validate(resnet.get_config("optim.batch_size=63"), num_devices=8)
    with pytest.raises(ConfigError, match="lambda_mx.*Did you mean 'noise.lambda_max'"):
        resnet.get_config("noise.lambda_mx=0.5")
    with pytest.raises(ConfigError, match="Did you mean 'noise.lambda_max'"):
        resnet.get_config("lambda_max=0.5")  # a bare key names its group
    with pytest.raises(ConfigError, match="method"):
        resnet.get_config("method=noisy")
    c = resnet.get_config("smoke")
    with pytest.raises(AttributeError):
        c.noise.lambda_mx = 0.5  # locked: a typo cannot add a key


def test_method_presets_are_resolved_when_the_config_is_built():
    r = resnet.get_config("method=sgd")
    assert (r.noise.weight, r.noise.act, r.swa.enabled, r.optim.sam) == (
        "none",
        False,
        False,
        False,
    )
    r = resnet.get_config("method=dnq")
    assert (r.noise.weight, r.noise.act, r.swa.enabled) == ("differential", True, True)
    # Explicit keys win over the preset, in any order of the argument.
    r = resnet.get_config("noise.weight=naive,method=dnq,swa.enabled=false")
    assert (r.noise.weight, r.noise.act, r.swa.enabled) == ("naive", True, False)
    assert cfg.method_name(r) == "custom" and cfg.method_name(resnet.get_config("")) == "dnq"
    cfg.validate(r, num_devices=1)
    # What runs is what is written: the config survives its own JSON unchanged.
    assert cfg.from_json_text(cfg.to_json(r)).to_dict() == r.to_dict()


def test_only_the_eval_and_runtime_groups_may_change_on_resume():
    saved = resnet.get_config("smoke").to_dict()
    free = resnet.get_config("smoke,eval.bits=w4a4,runtime.chunk_steps=2,runtime.npz_path=x")
    assert cfg.resume_conflicts(saved, free) == []
    # A key newer than the saved run counts at its default, the behaviour the run had.
    older = {**saved, "noise": {k: v for k, v in saved["noise"].items() if k != "w_scale"}}
    assert cfg.resume_conflicts(older, free) == []
    assert cfg.resume_conflicts(older, resnet.get_config("smoke,noise.w_scale=0.5")) == [
        "noise.w_scale"
    ]
    changed = resnet.get_config("smoke,optim.learning_rate=0.1,quant.n_calib=8,seed=1")
    assert cfg.resume_conflicts(saved, changed) == [
        "optim.learning_rate",
        "quant.n_calib",
        "seed",
    ]
