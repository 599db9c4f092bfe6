"""SWA as an optax transform, BN re-estimation, and config validation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import resnet
from dnq_jax import batchnorm, optim
from dnq_jax import config as cfg


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


def test_bn_recalibration_is_the_average_of_batch_statistics():
    model = _BNNet()
    x = jax.random.normal(jax.random.key(0), (12, 6, 6, 3)) * 2.0 + 0.5
    variables = model.init(jax.random.key(1), x[:1])
    batches = [x[:4], x[4:8], x[8:]]
    new = batchnorm.recompute_batch_stats(model, variables, batches)
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


def _resolved(arg):
    return cfg.resolve(resnet.get_config(arg))


@pytest.mark.parametrize(
    "arg,key",
    [
        ("w_bits=1", "w_bits"),
        ("a_bits=17", "a_bits"),
        ("rho=1.5", "rho"),
        ("num_epochs=0", "num_epochs"),
        ("noise_start_epoch=400", "noise_start_epoch"),
        ("swa_start_epoch=500", "swa_start_epoch"),
        ("ramp=square", "ramp"),
        ("mask=random", "mask"),
        ("eval_bits=w4x4", "eval_bits"),
        ("method=dnq,sam=True,weight_noise=accumulate", "sam"),
        ("method=sgd,swa_lr=0.01", "swa_lr"),
    ],
)
def test_validation_names_the_key(arg, key):
    with pytest.raises(cfg.ConfigError, match=key):
        cfg.validate(_resolved(arg), num_devices=1)


def test_batch_must_divide_by_devices_and_unknown_keys_are_refused():
    with pytest.raises(cfg.ConfigError, match="batch_size"):
        cfg.validate(_resolved("batch_size=63"), num_devices=8)
    with pytest.raises(cfg.ConfigError, match="lambda_mx"):
        resnet.get_config("lambda_mx=0.5")
    with pytest.raises(cfg.ConfigError, match="method"):
        _resolved("method=noisy")
    c = resnet.get_config("smoke")
    with pytest.raises(AttributeError):
        c.lambda_mx = 0.5  # locked: a typo cannot add a key


def test_method_presets_fill_only_unset_switches():
    r = _resolved("method=sgd")
    assert (r.weight_noise, r.act_noise, r.swa, r.sam) == ("none", False, False, False)
    r = _resolved("method=dnq")
    assert (r.weight_noise, r.act_noise, r.swa) == ("differential", True, True)
    r = _resolved("method=dnq,weight_noise=naive,swa=false")
    assert (r.weight_noise, r.act_noise, r.swa) == ("naive", True, False)
    cfg.validate(r, num_devices=1)
