"""Build everything a training run needs from its config: `build_run(config, workdir)`.

Order matters and is the documented contract: the config is resolved and validated first
(no data loaded, nothing compiled, the workdir untouched on a bad config); then the workdir
is probed for writing without creating it, the data loaded and checked against the config,
and only then is the workdir created, so a run refused for bad input leaves no trace. Then
the model and state are built and the newest complete checkpoint (if any) restored into that
state; a run is only resumed with the training settings it was started with (the keys in
`config.RESUME_FREE` may change).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from dnq_jax import checkpoint, data, evaluate, models, optim, runtime, taps
from dnq_jax import config as cfg
from dnq_jax.dnq import profiler
from dnq_jax.metrics import MetricWriter
from dnq_jax.step import KEY_INIT, StepSettings, TrainState, make_chunk_fn, make_step, sub_key


@dataclasses.dataclass
class Run:
    """The pieces of one training run (see `build_run`)."""

    config: ml_collections.ConfigDict
    workdir: Path
    mesh: Any
    device: str
    dataset: data.Dataset
    model: Any
    graph: taps.Graph
    spe: int
    chunk_steps: int
    tx: optax.GradientTransformation
    state: TrainState
    mngr: ocp.CheckpointManager
    writer: MetricWriter
    train_images: jax.Array
    train_labels: jax.Array
    calib_images: jax.Array
    profile: Callable
    ema: Callable
    chunk_fn: Callable
    build_chunk_fn: Callable[[bool], Callable]  # poison (debug_nan_step) on/off -> chunk_fn
    epoch_indices: Callable
    test_accuracy: Callable

    def eval_settings(self) -> evaluate.EvalSettings:
        return evaluate.EvalSettings.from_config(self.config)

    def chunk_fn_for(self, state: TrainState) -> Callable:
        """The chunk function for `state`: `debug_nan_step` poisons only the first pass over
        its step (lam_scale == 1); a rolled-back run (lambda halved) replays it clean."""
        if self.config.debug_nan_step < 0 or float(state.lam_scale) == 1.0:
            return self.chunk_fn
        return self.build_chunk_fn(False)

    def clean_batches(self) -> Iterator[jax.Array]:
        """Unaugmented normalised training batches of batch_size, one pass (BN re-estimation)."""
        ds, c = self.dataset, self.config
        n = (ds.num_train // c.batch_size) * c.batch_size
        for a in range(0, n, c.batch_size):
            yield data.normalize(
                jnp.asarray(ds.train_images[a : a + c.batch_size]), ds.mean, ds.std
            )


def check_workdir(workdir: str | os.PathLike, create: bool = True) -> Path:
    """Prove `workdir` can be written (creating it only if `create`), or raise PermissionError.

    With `create=False` nothing is left behind: an existing folder gets a probe file that is
    removed again; for a missing one, a probe folder is made and removed in its nearest
    existing parent. So a run that fails later (bad data, say) leaves the workdir as it was.
    """
    path = Path(workdir)
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise PermissionError(f"{parent} is a file, not a folder")
        if parent == path:
            probe = path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".dnq_write_test_", dir=parent))
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = e.strerror if e.strerror else str(e)
        raise PermissionError(
            f"workdir {path} is not writable: cannot write in {parent} ({why}). Choose a "
            "--workdir you can write to; checkpoints, metrics and results go there."
        ) from None
    return path


def _check_resume_config(wd: Path, c: ml_collections.ConfigDict) -> None:
    """Refuse to continue a run with settings that change its training (a silent mix)."""
    path = wd / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no readable record of the old settings: nothing to compare with
    changed = cfg.resume_conflicts(saved, c)
    if changed:
        listed = ", ".join(f"{k}={saved.get(k)!r} -> {c.get(k)!r}" for k in changed)
        raise cfg.ConfigError(
            f"{changed[0]}: {wd} holds a run with other settings ({listed}); resuming it "
            "would mix two runs. Use a fresh --workdir, or the settings in its config.json."
        )


def _metric_writer(wd: Path) -> MetricWriter:
    _end_torn_line(wd / "metrics.jsonl")
    return MetricWriter(wd)


def _end_torn_line(path: Path) -> None:
    """A run killed mid-write may leave metrics.jsonl without its final newline; end that
    line so the next row is not glued onto it (readers skip the torn line alone)."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def load_dataset(c: ml_collections.ConfigDict) -> data.Dataset:
    """The config's dataset; a DataError says which config keys chose the files."""
    try:
        return _load(c)
    except data.DataError as e:
        raise data.DataError(
            f"dataset={c.dataset}: {e}. The files come from the config keys npz_path, "
            "data_dir and tfds_data_dir: point them at a good copy."
        ) from e


def _load(c: ml_collections.ConfigDict) -> data.Dataset:
    return data.load(
        c.dataset,
        data_dir=c.data_dir or None,
        npz_path=c.npz_path or None,
        tfds_data_dir=c.tfds_data_dir or None,
        limit_train=c.limit_train or None,
        limit_test=c.limit_test or None,
    )


def create_model(c: ml_collections.ConfigDict, num_classes: int):
    kwargs = {"width": c.width} if c.model == "mobilenet_v2" else {}
    dtype = jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32
    return models.create(c.model, num_classes=num_classes, dtype=dtype, **kwargs)


def init_variables(model, c: ml_collections.ConfigDict, image_shape) -> dict:
    key = sub_key(jax.random.key(c.seed, impl=c.prng_impl), KEY_INIT)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return jax.jit(lambda k: model.init(k, x, train=False))(key)


def build_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Run:
    """Resolve/validate the config, load data, build model/state/step, restore a checkpoint."""
    c = cfg.resolve(config)
    cfg.validate(c)  # before the backend starts: a bad key costs nothing
    try:
        mesh = runtime.make_mesh(c.num_devices)
    except ValueError as e:
        raise cfg.ConfigError(str(e)) from None
    cfg.validate(c, mesh.size)
    check_workdir(workdir, create=False)  # fail fast, before minutes of data loading
    ds = load_dataset(c)
    spe = c.steps_per_epoch or ds.num_train // c.batch_size
    if spe < 1 or spe * c.batch_size > ds.num_train:
        raise cfg.ConfigError(
            f"steps_per_epoch: {spe} steps of batch {c.batch_size} need "
            f"{spe * c.batch_size} images; {c.dataset} has {ds.num_train} training images"
        )
    if c.debug_nan_step >= spe * c.num_epochs:
        raise cfg.ConfigError(
            f"debug_nan_step: {c.debug_nan_step} is past the last step ({spe * c.num_epochs - 1})"
        )
    wd = check_workdir(workdir)  # everything checked: only now does the workdir appear
    cpu = runtime.is_cpu()
    chunk = c.chunk_steps or (1 if cpu else spe)
    sh = runtime.shardings(mesh)
    model = create_model(c, ds.num_classes)
    variables = init_variables(model, c, ds.image_shape)
    graph = taps.trace(model, variables, jnp.zeros((2, *ds.image_shape)), train=False)
    tx = optim.make_optimizer(
        learning_rate=c.learning_rate,
        total_steps=spe * c.num_epochs,
        steps_per_epoch=spe,
        momentum=c.momentum,
        nesterov=c.nesterov,
        weight_decay=c.weight_decay,
        warmup_steps=c.warmup_epochs * spe,
        swa_start_epoch=c.swa_start_epoch if c.swa else None,
        swa_lr=c.swa_lr,
        sam_rho=c.sam_rho if c.sam else None,
    )
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(variables["params"]),
        noise_stats=profiler.init_stats(graph),
        rng=jax.random.key_data(jax.random.key(c.seed, impl=c.prng_impl)),
        lam_scale=jnp.ones([], jnp.float32),
    )
    state = runtime.put_tree(state, sh["state"])
    mngr = checkpoint.manager(wd, c.keep_checkpoints)
    if mngr.latest_step() is not None:
        _check_resume_config(wd, c)
    restored = checkpoint.restore_latest(mngr, state)
    if restored is not None:
        state = restored
        print(f"dnq_jax: resumed from step {int(state.step)} in {wd}", flush=True)
    checkpoint.write_config(wd, c)

    settings = StepSettings(
        weight_noise=c.weight_noise,
        act_noise=bool(c.act_noise),
        rho=c.rho,
        mask=c.mask,
        tau=c.tau,
        label_smoothing=c.label_smoothing,
        sam=bool(c.sam),
        prng_impl=c.prng_impl,
        debug_nan_step=c.debug_nan_step,
        **data.augment_config(c.dataset),
    )
    dtype = jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32
    mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)

    @functools.cache
    def build_chunk_fn(poison: bool) -> Callable:
        s = settings if poison else dataclasses.replace(settings, debug_nan_step=-1)
        step = make_step(model, graph, tx, s, mean, std, dtype)
        return make_chunk_fn(step, unroll=cpu, shardings=sh)

    calib = data.calibration_subset(ds, c.n_calib, c.calib_seed)
    calib_images = runtime.put(np.asarray(data.normalize(calib, ds.mean, ds.std)), sh["replicated"])
    profile = jax.jit(
        profiler.make_profiler(
            model, graph, w_bits=c.w_bits, a_bits=c.a_bits, keep_ends_8bit=c.keep_ends_8bit
        )
    )
    ema = jax.jit(lambda old, new: profiler.ema_update(old, new, c.ema_decay))
    epoch_indices = jax.jit(
        lambda key: data.epoch_indices(key, ds.num_train, c.batch_size)[:spe],
        out_shardings=sh["idx"],
    )
    # Kept on device: the per-epoch evaluation then moves no images from the host.
    test_x = data.normalize(runtime.put(ds.test_images, sh["replicated"]), ds.mean, ds.std)
    fp32_eval = evaluate.make_accuracy_fn(model, c.eval_batch_size)
    return Run(
        config=c,
        workdir=wd,
        mesh=mesh,
        device=runtime.device_description(mesh),
        dataset=ds,
        model=model,
        graph=graph,
        spe=spe,
        chunk_steps=chunk,
        tx=tx,
        state=state,
        mngr=mngr,
        writer=_metric_writer(wd),
        train_images=runtime.put(ds.train_images, sh["data"]),
        train_labels=runtime.put(ds.train_labels.astype(np.int32), sh["data"]),
        calib_images=calib_images,
        profile=profile,
        ema=ema,
        chunk_fn=build_chunk_fn(True),
        build_chunk_fn=build_chunk_fn,
        epoch_indices=epoch_indices,
        test_accuracy=lambda variables: fp32_eval(variables, test_x, ds.test_labels),
    )
