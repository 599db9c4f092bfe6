"""The trainer end to end on the smoke config: learning, sharding, chunking, resuming."""

import json
import shutil
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE_RUN

from configs import resnet
from dnq_jax import data, taps
from dnq_jax.dnq import init_stats, profiler
from dnq_jax.ptq import QuantSpec
from dnq_jax.train import builders, metrics
from dnq_jax.train.loop import noise_lambda, train_and_evaluate
from dnq_jax.train.state import KEY_SHUFFLE, TrainState, create_train_state, root_key, sub_key
from dnq_jax.train.step import StepSettings, make_chunk_fn, make_train_step

# The session's smoke run (conftest.py): 5 epochs of 4 steps, noise from epoch 1, SWA from
# epoch 2, a checkpoint per epoch.
RUN = SMOKE_RUN


def _config(extra=""):
    return resnet.get_config("smoke" + ("," + extra if extra else ""))


def _final_params(workdir):
    return ocp.StandardCheckpointer().restore((workdir / "final").absolute())["params"]


def _epoch_losses(workdir):
    return np.array([r["train_loss"] for r in metrics.read(workdir) if "train_loss" in r])


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))])


def test_each_sharded_step_matches_the_one_device_step():
    """The session smoke run's 20 steps (warm-up, noise, SWA); each step also runs on 8
    devices from the 1-device run's state, and the two agree to float reassociation: the
    sharded step computes the same function, noise included. The smoke run's config, so the
    1-device steps are the smoke run's programs and the 8-device ones those of
    test_eight_devices_match_one_device (loaded from the compilation cache)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    c = _config(RUN)
    r1, r8 = _pieces(c, 1), _pieces(c, 8)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, r8.state)
    state, worst = r1.state, {"loss": 0.0, "params": 0.0, "batch_stats": 0.0}
    noisy_steps = 0
    for epoch in range(c.optim.num_epochs):
        noise_on = epoch >= c.noise.start_epoch
        if noise_on:
            fresh = r1.profile(state.variables(), r1.calib)
            state = state.replace(noise_stats=profiler.ema_update(state.noise_stats, fresh))
            assert all(float(jnp.max(s)) > 0 for s in state.noise_stats.w_sigma.values())
        lam = jnp.float32(noise_lambda(c, epoch))
        noisy_steps += r1.spe if float(lam) > 0 else 0
        idx = np.asarray(
            r1.epoch_indices(jax.random.fold_in(sub_key(root_key(state), KEY_SHUFFLE), epoch))
        )
        for k in range(r1.spe):
            # A copy first: the 1-device step donates `state`.
            s8 = jax.device_put(jax.tree_util.tree_map(jnp.copy, state), shardings)
            s8, m8 = r8.chunk_fn(s8, r8.images, r8.labels, idx[k : k + 1], lam, noise_on)
            state, m1 = r1.chunk_fn(state, r1.images, r1.labels, idx[k : k + 1], lam, noise_on)
            rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
            worst["loss"] = max(worst["loss"], rel(np.asarray(m8["loss"]), np.asarray(m1["loss"])))
            for part in ("params", "batch_stats"):
                one, eight = _flat(getattr(state, part)), _flat(getattr(s8, part))
                worst[part] = max(worst[part], rel(eight, one))
    assert int(state.step) == 20 and noisy_steps >= 8  # the ramp starts at lambda 0
    # Observed: loss 2e-7, batch_stats 3e-8, params 5e-9 (at the smoke config's 0.05, one
    # ill-conditioned warm-up step reached 5e-5). A per-device BatchNorm or noise drawn per
    # device would be off by orders of magnitude more.
    assert worst["loss"] < 1e-5, worst
    assert worst["batch_stats"] < 1e-5, worst
    assert worst["params"] < 1e-5, worst


def test_step_reports_a_poisoned_new_state_as_not_finite():
    """The finiteness flag covers what the step writes, not only the loss and gradients."""
    settings = StepSettings(weight_noise="accumulate")
    run, state = _linear_step(settings, 0.1)
    run = jax.jit(run, static_argnums=2)
    new, m = run(state, 0.5, True)
    assert bool(m["finite"]) and np.all(np.isfinite(new.params["Dense_0"]["kernel"]))
    # A NaN noise statistic poisons only the accumulated sample added after the update:
    # loss and gradients stay finite, the new params do not.
    _, poisoned = _linear_step(settings, np.nan)
    new, m = run(poisoned, 0.5, True)
    assert np.isfinite(m["loss"]) and not np.all(np.isfinite(new.params["Dense_0"]["kernel"]))
    assert not bool(m["finite"])


def test_w_scale_scales_only_the_weight_perturbation():
    """noise.w_scale multiplies the weight perturbation: with weight noise alone, the step at
    lambda 0.5 and w_scale 0.5 is the step at lambda 0.25 and w_scale 1, and w_scale 0 is the
    clean step."""

    def loss(w_scale, lam, noise_on=True):
        settings = StepSettings(weight_noise="differential", w_scale=w_scale)
        run, state = _linear_step(settings, 0.3, step=1)
        return float(run(state, lam, noise_on)[1]["loss"])

    assert loss(0.5, 0.5) == pytest.approx(loss(1.0, 0.25), rel=1e-6)
    assert loss(0.0, 0.5) == pytest.approx(loss(1.0, 0.5, noise_on=False), rel=1e-6)
    assert loss(1.0, 0.5) != pytest.approx(loss(1.0, 0.5, noise_on=False), rel=1e-4)


def test_noise_dist_reaches_the_step_from_the_config():
    """noise.dist=uniform is carried from the config into the step and changes the weight
    perturbation the forward pass sees (the samples' law itself: test_authors_recipe.py)."""
    c = resnet.get_config("smoke,noise.dist=uniform")
    assert StepSettings.from_config(c, "fashion_mnist").dist == "uniform"
    assert StepSettings.from_config(resnet.get_config("smoke"), "fashion_mnist").dist == "gaussian"

    def loss(dist, noise_on=True):
        run, state = _linear_step(StepSettings(weight_noise="differential", dist=dist), 0.3, 1)
        return float(run(state, 0.5, noise_on)[1]["loss"])

    clean = loss("gaussian", noise_on=False)
    assert loss("uniform", noise_on=False) == clean
    assert len({clean, loss("gaussian"), loss("uniform")}) == 3


def test_profiler_images_follow_noise_n_calib_and_default_to_the_evaluations():
    ds = builders.load_dataset(_config())
    default = builders.profiler_images(_config(), ds)
    c = _config()
    want = np.asarray(
        data.normalize(data.calibration_subset(ds, c.quant.n_calib, 0), ds.mean, ds.std)
    )
    np.testing.assert_array_equal(default, want)
    own = builders.profiler_images(_config("noise.n_calib=5"), ds)
    assert own.shape[0] == 5 and default.shape[0] == c.quant.n_calib != 5


def test_smoke_trains_and_writes_results(smoke_run):
    wd, results = smoke_run
    on_disk = json.loads((wd / "results.json").read_text())
    for key in ("fp32", "w8a8", "w4a4"):
        assert 0.0 <= on_disk[key] <= 100.0
        assert on_disk[key] == pytest.approx(results[key])
    assert on_disk["settings"]["n_calib"] == 16
    assert on_disk["swa_snapshots"] == 3  # epochs 2, 3, 4 of 0..4
    losses = _epoch_losses(wd)
    assert len(losses) == 5 and losses[-1] < losses[0]
    rows = [r for r in metrics.read(wd) if "lambda" in r]
    assert [r["lambda"] for r in rows][:2] == [0.0, 0.0] and rows[-1]["lambda"] == 1.0
    assert (
        rows[-1]["w_sigma"] > 0 and rows[-1]["a_sigma"] > 0
    )  # the profiler ran and fed the statistics


def test_the_swa_models_bn_statistics_come_from_batches_augmented_as_in_training(smoke_run):
    # The smoke data is trained with 2-pixel crops: the final statistics are those of the SWA
    # weights over such batches (the loop's key), not over the unaugmented images.
    from dnq_jax.train import optim, workdir

    wd, _ = smoke_run
    c = workdir.read_config(str(wd))
    ds = builders.load_dataset(c)
    s = StepSettings.from_config(c, ds.name, 0, ds.image_shape[0])
    assert s.pad == 2
    final = ocp.StandardCheckpointer().restore((wd / "final").absolute())
    last = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    saved = ocp.StandardCheckpointer().restore(
        (wd / "checkpoints" / str(last) / "default").absolute()
    )
    root = jax.random.wrap_key_data(saved["rng"])
    key = jax.random.fold_in(sub_key(root, KEY_SHUFFLE), c.optim.num_epochs)
    model = builders.create_model(c, ds.num_classes)

    def stats(pad):
        batches = optim.bn_batches(ds, c.optim.batch_size, key, pad=pad, flip=s.flip)
        return optim.recompute_batch_stats(model, final, batches)["batch_stats"]

    flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(t)])
    np.testing.assert_allclose(flat(final["batch_stats"]), flat(stats(s.pad)), rtol=1e-5, atol=1e-6)
    assert np.abs(flat(final["batch_stats"]) - flat(stats(0))).max() > 1e-3


def test_bn_statistics_are_re_estimated_after_swa_or_a_noise_stage():
    # Running statistics gathered under noise (W + lambda D_t has mean W + lambda mu_w) are not
    # the clean weights': a run that ends under noise re-estimates them, SWA or not.
    from dnq_jax.train.loop import reestimates

    bn = {"params": {}, "batch_stats": {}}
    assert reestimates(_config(), 3, bn)
    assert reestimates(_config("swa.enabled=false"), 0, bn)
    assert reestimates(_config("noise.act=false,swa.enabled=false"), 0, bn)
    assert reestimates(_config("method=sgd,swa.enabled=true"), 3, bn)
    assert not reestimates(_config("method=sgd"), 0, bn)
    # A noise stage that has not begun by the last epoch: nothing to undo.
    assert not reestimates(_config("swa.enabled=false,noise.start_epoch=5"), 0, bn)
    assert not reestimates(_config("swa.enabled=false,swa.bn_recalibration=false"), 0, bn)
    assert not reestimates(_config(), 3, {"params": {}})


def test_resumed_run_matches_uninterrupted_bit_exactly(smoke_run, tmp_path):
    wd, _ = smoke_run
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    mid = steps[1]  # end of epoch 2: inside the noise stage, before SWA ends
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(wd / "checkpoints" / str(mid), resumed / "checkpoints" / str(mid))
    # FP32 alone at the end: the evaluation keys may change on a resume, and what is compared
    # is the training (final params, epoch losses), not the PTQ table.
    train_and_evaluate(_config(RUN + ",eval.bits="), str(resumed))
    a, b = _final_params(wd), _final_params(resumed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(_epoch_losses(wd)[2:], _epoch_losses(resumed))


def test_eight_devices_match_one_device(smoke_run, tmp_path):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 host devices)")
    # The session's 1-device smoke run (20 steps: 5 epochs of 4, noise from epoch 1, SWA
    # from epoch 2) again on 8 devices. Its small learning rate keeps float reassociation
    # (sharded reductions) from being amplified by ReLU/rounding flips into visible
    # differences within 20 steps: at the smoke config's 0.05 the two curves drift ~1e-3
    # apart, while every single step still agrees to float rounding
    # (test_each_sharded_step_matches_the_one_device_step).
    one_wd, _ = smoke_run
    wd = tmp_path / "dev8"
    # FP32 alone at the end: the losses and final params are compared, not the PTQ table.
    train_and_evaluate(
        _config(RUN.replace("num_devices=1", "num_devices=8") + ",eval.bits="), str(wd)
    )
    runs = {
        n: {"losses": _epoch_losses(w), "params": _final_params(w)}
        for n, w in ((1, one_wd), (8, wd))
    }
    np.testing.assert_allclose(runs[8]["losses"], runs[1]["losses"], rtol=1e-4)
    # Final (SWA) params: close in global norm; single elements drift further apart where a
    # ReLU or a rounding boundary flipped on one side only.
    a, b = _flat(runs[8]["params"]), _flat(runs[1]["params"])
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)


def _pieces(c, num_devices: int) -> SimpleNamespace:
    """What the loop builds before its first epoch, on `num_devices` devices."""
    sh = builders.shardings(builders.make_mesh(num_devices))
    ds = builders.load_dataset(c)
    spe = builders.steps_per_epoch(c, ds)
    model = builders.create_model(c, ds.num_classes)
    variables = builders.init_variables(model, c, ds.image_shape)
    graph = taps.trace(model, variables, jnp.zeros((2, *ds.image_shape)), train=False)
    tx = builders.create_optimizer(c, spe)
    settings = StepSettings.from_config(c, ds.name)
    step = make_train_step(model, graph, tx, settings, jnp.asarray(ds.mean), jnp.asarray(ds.std))
    calib = data.calibration_subset(ds, c.quant.n_calib, c.quant.calib_seed)
    return SimpleNamespace(
        spe=spe,
        state=builders.put_tree(create_train_state(c.seed, variables, graph, tx), sh["state"]),
        chunk_fn=make_chunk_fn(step, scan=False, shardings=sh),
        images=builders.put(ds.train_images, sh["data"]),
        labels=builders.put(ds.train_labels.astype(np.int32), sh["data"]),
        profile=jax.jit(profiler.make_profiler(model, graph, QuantSpec(w_bits=2, a_bits=4))),
        calib=jnp.asarray(data.normalize(calib, ds.mean, ds.std)),
        epoch_indices=lambda key: data.epoch_indices(key, ds.num_train, c.optim.batch_size)[:spe],
    )


def test_scanned_chunks_match_straight_line_and_resume_bit_exactly(smoke_run, tmp_path):
    """The GPU/TPU path forced on CPU: each epoch's 4 steps in one rolled `lax.scan`. FP32
    alone at the end: the training is compared (losses, final params), not the PTQ table."""
    scan = _config(RUN + ",runtime.loop=scan,eval.bits=")
    wd, resumed = tmp_path / "scan", tmp_path / "resumed"
    results = train_and_evaluate(scan, str(wd))
    assert results["steps"] == 20
    rows = [r for r in metrics.read(wd) if "epoch" in r]
    assert [r["lr_step"] for r in rows] == [4, 8, 12, 16, 20]  # one call per epoch
    # Against the straight-line run of the same config: the scanned body compiles to other
    # float reassociations. Observed: epoch losses 2e-5 apart (relative), final params 1.5e-4
    # in norm; a wrong key, step number or state threading would differ at order 1.
    straight, _ = smoke_run
    np.testing.assert_allclose(_epoch_losses(wd), _epoch_losses(straight), rtol=1e-4)
    a, b = _flat(_final_params(wd)), _flat(_final_params(straight))
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(wd / "checkpoints" / "8", resumed / "checkpoints" / "8")
    train_and_evaluate(scan, str(resumed))
    jax.tree_util.tree_map(np.testing.assert_array_equal, _final_params(wd), _final_params(resumed))
    np.testing.assert_array_equal(_epoch_losses(wd)[2:], _epoch_losses(resumed))


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(3)(x)


def _linear_step(settings, w_sigma, step=0):
    """A Dense model's train step under `settings`, and its state with `w_sigma` as every
    channel's weight-error std (for the noise)."""
    model = _Linear()
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 4), dtype=np.uint8))
    labels = jnp.arange(8, dtype=jnp.int32) % 3
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    graph = taps.trace(model, variables, jnp.zeros((2, 4)))
    tx = optax.sgd(0.1)
    fn = make_train_step(model, graph, tx, settings, jnp.full((4,), 0.5), jnp.full((4,), 0.25))
    stats = init_stats(graph)
    stats = stats.replace(w_sigma={"Dense_0": jnp.full((3,), w_sigma, jnp.float32)})
    state = TrainState(
        step=jnp.full([], step, jnp.int32),
        params=variables["params"],
        batch_stats={},
        opt_state=tx.init(variables["params"]),
        noise_stats=stats,
        rng=jax.random.key_data(jax.random.key(1)),
        lam_scale=jnp.ones([], jnp.float32),
    )
    run = lambda state, lam, noise_on=True: fn(
        state, images, labels, jnp.arange(8), jnp.float32(lam), noise_on
    )
    return run, state
