"""`train_and_evaluate(config, workdir)`: the DNQ trainer (and every ablation of it).

Stages: clean warm-up, then the noise stage (profiler at its start and once per epoch,
differential weight noise and activation drop-in with a ramped lambda), SWA over the last
epochs, BN statistics re-estimated for the averaged weights, and the PTQ evaluation of the
final model at the configured bit-widths into workdir/results.json.

Order of the setup is a contract: the config is validated first (nothing loaded, nothing
compiled, the workdir untouched); then the workdir is probed without creating it, the data
loaded and checked against the config, and only then is the workdir created, so a run
refused for bad input leaves no trace. A run resumes from the newest complete checkpoint in
its workdir, only with the training settings it was started with, and then computes exactly
the states an uninterrupted run computes.

SIGTERM/SIGINT finish the current chunk of steps, save, and raise `Preempted`. A non-finite
loss or gradient stops the run (`Diverged`) keeping the last good checkpoint, or, with
`runtime.rollback_on_nan`, restores it and continues with lambda halved (at most
`MAX_ROLLBACKS` times).

Where the batches come from (`feed.py`, docs/data.md): on the device path each process
loads the whole (small) data set and keeps it replicated on its devices; the batch indices
come from the same key everywhere, split over 'data', so each device gathers its part of the
global batch from its own replica. On the streamed path (data that does not fit a device:
ImageNet, image folders) each process reads its part of each global batch, in the order of
the same indices, through a Grain pipeline on its own host, and the global batch is
assembled from the processes' parts; a resume restarts it at the checkpoint's step.

Several processes (`jax.distributed`, one per host): each runs this same loop on its own
devices of the one global mesh. Process 0 alone writes the workdir, logs and shows
progress; a signal seen by any process stops all of them after the same chunk, and all save
that step. An error in host work (the workdir probes and writes, the resume check, the data,
the final evaluation) is agreed (`hosts.agreed`): every process raises it and exits with the
same status. Divergence needs no agreement: the finiteness flags are global values, the same
on every process, so all stop (or roll back) at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dnq_jax import data, progress, taps
from dnq_jax.dnq import profiler, ramps
from dnq_jax.errors import Diverged, Preempted
from dnq_jax.train import builders, checkpoint, evaluate, hosts, metrics, optim
from dnq_jax.train import config as config_lib
from dnq_jax.train import feed as feed_lib
from dnq_jax.train import results as results_lib
from dnq_jax.train import step as step_lib
from dnq_jax.train import workdir as workdir_lib
from dnq_jax.train.state import KEY_SHUFFLE, TrainState, create_train_state, root_key, sub_key

# Each rollback halves lambda; past this many the divergence is not the noise's doing.
MAX_ROLLBACKS = 4


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: data.Dataset | data.Stream | None = None,
) -> dict:
    """Train per `config` in `workdir` (resuming if a checkpoint is there) and evaluate.

    Returns the results dict also written to workdir/results.json: FP32 and PTQ top-1 at
    each of `config.eval.bits`, with the settings used. `dataset`: the config's data, already
    loaded (the grid loads it once for all its runs); None loads it here.
    """
    c = config
    t_start = time.time()
    # --- Check everything before anything is written.
    config_lib.validate(c)  # before the backend starts: a bad key costs nothing
    mesh = builders.make_mesh(c.runtime.num_devices)
    config_lib.validate(c, mesh.size)
    workdir_lib.check_writable(workdir, create=False)
    with hosts.agreed():  # each process loads its own copy; a failure stops all
        ds = builders.load_dataset(c) if dataset is None else dataset
        spe = builders.steps_per_epoch(c, ds)
    wd = workdir_lib.check_writable(workdir)  # only now does the workdir appear

    # --- Model, state, and the newest checkpoint.
    sh = builders.shardings(mesh)
    model = builders.create_model(c, ds.num_classes)
    shapes = builders.variable_shapes(model, ds.image_shape)
    graph = taps.trace(model, shapes, jnp.zeros((2, *ds.image_shape)), train=False)
    tx = builders.create_optimizer(c, spe)
    mngr = checkpoint.manager(wd, c.runtime.keep_checkpoints)
    state = None
    if mngr.latest_step() is not None:
        workdir_lib.check_resume(wd, c)
        # Restored into the shapes and sharding of a fresh state, which is never computed.
        fresh = jax.eval_shape(lambda v: create_train_state(c.seed, v, graph, tx), shapes)
        state = checkpoint.restore_latest(mngr, builders.placed(fresh, sh["state"]))
    if state is None:
        variables = builders.init_variables(model, c, ds.image_shape)
        state = builders.put_tree(create_train_state(c.seed, variables, graph, tx), sh["state"])
    else:
        hosts.log(f"dnq_jax: resumed from step {int(state.step)} in {wd}")
    workdir_lib.write_config(wd, c)

    # --- Compiled functions, and where the batches come from: device-resident data or the
    # stream (feed.py); the step is the same.
    settings = step_lib.StepSettings.from_config(c, ds.name, spe, ds.image_shape[0])
    mean, std = jnp.asarray(ds.mean), jnp.asarray(ds.std)
    dtype = builders.compute_dtype(c)
    train_step = step_lib.make_train_step(model, graph, tx, settings, mean, std, dtype)
    scan = builders.scans_steps(c)
    feed = feed_lib.make_feed(c, ds, mesh, sh, spe)
    chunk_fn = step_lib.make_chunk_fn(train_step, scan=scan, shardings=sh, streamed=feed.streamed)
    chunk_steps = c.runtime.chunk_steps or (spe if scan and not feed.streamed else 1)
    calib_images = builders.put(builders.profiler_images(c, ds), sh["replicated"])
    profile = jax.jit(builders.create_profiler(c, model, graph))
    ema = jax.jit(lambda old, new: profiler.ema_update(old, new, c.noise.ema_decay))
    accuracy = evaluate.make_accuracy_fn(model, c.eval.batch_size)
    writer = metrics.MetricWriter(wd)

    # --- The epochs.
    num_epochs = c.optim.num_epochs
    stop = _StopFlag()
    last_acc = None
    method = config_lib.method_name(c)
    where = builders.device_description(mesh)
    hosts.log(f"dnq_jax: training {c.model.name} on {c.data.name} ({method}) on {where}")
    with stop.installed(), _progress(spe * num_epochs, int(state.step), c) as bar:
        epoch = int(state.step) // spe
        while epoch < num_epochs:
            t0 = time.time()
            first = int(state.step) - epoch * spe  # steps of this epoch already done
            noise_on = config_lib.uses_noise(c) and epoch >= c.noise.start_epoch
            if epoch == c.noise.start_epoch > 0 and first == 0:
                # Shared by every run of these settings whatever its noise keys (any method): a
                # grid starts such runs from here instead of training them (dnq_jax/grid/fork.py).
                checkpoint.save_noise_start(wd, int(state.step), state)
            if noise_on and first == 0:
                fresh = profile(state.variables(), calib_images)
                state = state.replace(noise_stats=ema(state.noise_stats, fresh))
            lam = noise_lambda(c, epoch) * float(state.lam_scale)
            key = jax.random.fold_in(sub_key(root_key(state), KEY_SHUFFLE), epoch)
            outs = []
            with contextlib.closing(feed.epoch(key, epoch, first, chunk_steps)) as batches:
                for steps, batch in batches:
                    state, m = chunk_fn(state, *batch, jnp.float32(lam), noise_on)
                    outs.append(m)
                    bar.update(steps)
                    if stop.agree() is not None:
                        break
            m = jax.device_get(outs)  # one host transfer per epoch (or interrupted epoch)
            m = {k: np.concatenate([np.atleast_1d(x[k]) for x in m]) for k in m[0]}
            if not m["finite"].all():
                state = _roll_back(c, mngr, state, m["finite"], lam, spe)
                epoch = int(state.step) // spe
                continue
            if stop.agreed is not None and int(state.step) % spe:
                checkpoint.save(mngr, int(state.step), state)
                raise Preempted(_stopped(stop, f"at step {int(state.step)}", mngr))
            row = {
                "epoch": epoch + 1,
                "train_loss": float(m["loss"].mean()),
                "train_acc": 100.0 * m["correct"].sum() / (len(m["correct"]) * c.optim.batch_size),
                "lambda": lam,
                "epoch_time_s": time.time() - t0,
                "lr_step": int(state.step),
            }
            summary = profiler.stats_summary(jax.device_get(state.noise_stats))
            row.update({k: float(v) for k, v in summary.items()})
            last = epoch + 1 == num_epochs
            if (epoch + 1) % c.eval.every_epochs == 0 or last:
                row["test_acc"] = last_acc = feed.test_accuracy(accuracy, state.variables())
            writer.write(int(state.step), row)
            shown = {"loss": f"{row['train_loss']:.3f}", "lam": f"{lam:.2f}"}
            if last_acc is not None:
                shown["acc"] = f"{last_acc:.1f}"
            bar.set_postfix(shown)
            if (epoch + 1) % c.runtime.ckpt_every_epochs == 0 or last or stop.agreed:
                checkpoint.save(mngr, int(state.step), state)
            if stop.agreed is not None:
                raise Preempted(_stopped(stop, f"after epoch {epoch + 1}", mngr))
            epoch += 1

    # --- SWA average, BN re-estimation, final save, PTQ evaluation.
    params, n_swa = state.params, 0
    if c.swa.enabled:
        params, n_swa = optim.swa_params(state.opt_state, state.params)
    # To the host: the rest runs on each process's own default device, identically everywhere.
    final = jax.device_get(state.variables(params))
    with hosts.agreed():
        if reestimates(c, n_swa, final):
            final = reestimate_batch_stats(model, final, ds, c, root_key(state))
    checkpoint.save_final(wd, final)
    eval_settings = evaluate.EvalSettings.from_config(c)
    bar_shown = c.runtime.progress and hosts.is_primary()
    with hosts.agreed():
        results = evaluate.evaluate_variables(model, final, ds, eval_settings, progress=bar_shown)
    results["swa_snapshots"] = n_swa
    results["steps"] = int(state.step)
    results["train_time_s"] = time.time() - t_start
    results_lib.write(wd / results_lib.TRAINED, results)
    writer.close()
    return results


def reestimates(c: ml_collections.ConfigDict, n_swa: int, variables: dict) -> bool:
    """Whether the trainer re-estimates the final BatchNorm statistics over clean forward
    passes: `swa.bn_recalibration` is on, the model has BatchNorm, and either SWA averaged
    `n_swa` > 0 snapshots (the running statistics belong to none of them) or the last epoch
    trained under noise (they were gathered on perturbed weights or activations; under the
    in-place form W + lambda D_t, whose mean is not W, that costs points)."""
    if not (c.swa.bn_recalibration and "batch_stats" in variables):
        return False
    return bool(n_swa) or noise_lambda(c, c.optim.num_epochs - 1) > 0


def reestimate_batch_stats(model, variables: dict, ds, c: ml_collections.ConfigDict, root):
    """`variables` (on the host) with the BatchNorm statistics the trainer gives the SWA
    average: one pass over the training split, noise-free, transformed as the training
    batches are (the run's crop/flip; a stream's training transform), in the order of the
    shuffle stream at an epoch number no epoch uses. `root`: the run's root key."""
    n = c.optim.num_epochs
    # On this process's default device, as the rest of the finish (the state's key is
    # replicated over the whole mesh, and every op on it would run on every device).
    root = jax.random.wrap_key_data(np.asarray(jax.random.key_data(root).addressable_data(0)))
    key = jax.random.fold_in(sub_key(root, KEY_SHUFFLE), n)
    aug = data.augment_config(ds.name, c.data.augment, ds.image_shape[0])
    batches = optim.bn_batches(ds, c.optim.batch_size, key, **aug, stream_seed=(c.seed, n))
    return jax.device_get(optim.recompute_batch_stats(model, variables, batches))


def noise_lambda(c: ml_collections.ConfigDict, epoch: int) -> float:
    """lambda of `epoch` by the ramp (before any rollback's scaling); 0 without noise."""
    n = c.noise
    if not config_lib.uses_noise(c) or epoch < n.start_epoch:
        return 0.0
    lam = ramps.noise_lambda(
        epoch,
        lambda_max=n.lambda_max,
        noise_start=n.start_epoch,
        ramp_epochs=n.ramp_epochs,
        kind=n.ramp,
    )
    return float(lam)


def _roll_back(
    c: ml_collections.ConfigDict,
    mngr: ocp.CheckpointManager,
    state: TrainState,
    finite: np.ndarray,
    lam: float,
    spe: int,
) -> TrainState:
    """After a non-finite step: the last checkpoint with lambda halved, or raise Diverged."""
    bad = int(state.step) - len(finite) + int(np.argmin(finite))
    msg = _divergence_message(c, mngr, state, bad, lam, spe)
    rollback = c.runtime.rollback_on_nan
    restored = checkpoint.restore_latest(mngr, state) if rollback else None
    if restored is None:
        advice = (
            " Nothing to roll back to: lower optim.learning_rate or noise.lambda_max."
            if rollback
            else " Re-run with runtime.rollback_on_nan=True (same workdir) to restore that "
            "checkpoint and continue with lambda halved, or lower optim.learning_rate or "
            "noise.lambda_max in a fresh --workdir."
        )
        raise Diverged(msg + advice)
    # Halve the scale the diverged state ran with, not the checkpoint's: a rollback to the
    # same checkpoint must keep lowering lambda, and so end.
    scale = 0.5 * min(float(state.lam_scale), float(restored.lam_scale))
    if scale < 0.5**MAX_ROLLBACKS:
        raise Diverged(
            f"{msg} Gave up after {MAX_ROLLBACKS} rollbacks, each with lambda halved: the "
            "noise is not the cause. Lower optim.learning_rate."
        )
    state = restored.replace(lam_scale=jnp.asarray(scale, restored.lam_scale.dtype))
    hosts.log(
        f"dnq_jax: {msg}\nRolled back to step {int(state.step)}; lambda halved "
        f"(lam_scale={scale:.4g})."
    )
    return state


def _divergence_message(c, mngr, state: TrainState, bad_step: int, lam: float, spe: int) -> str:
    summary = profiler.stats_summary(jax.device_get(state.noise_stats))
    stats = ", ".join(f"{k}={float(v):.3g}" for k, v in summary.items())
    steps = mngr.all_steps()
    kept = (
        f"the last good checkpoint (step {max(steps)}) in {mngr.directory} is kept"
        if steps
        else "no checkpoint had been written yet"
    )
    return (
        f"non-finite loss or gradient at step {bad_step} (epoch {bad_step // spe + 1} of "
        f"{c.optim.num_epochs}), lambda={lam:.4g} (lam_scale={float(state.lam_scale):.4g}); "
        f"noise statistics: {stats}. Training stopped there and {kept}."
    )


def _stopped(stop: _StopFlag, where: str, mngr: ocp.CheckpointManager) -> str:
    return (
        f"stopped by signal {stop.agreed} {where}; checkpoint saved in {mngr.directory}. "
        "Run the same command to resume."
    )


def _progress(total: int, initial: int, c: ml_collections.ConfigDict):
    enabled = c.runtime.progress and hosts.is_primary()
    return progress.bar(
        total, initial=initial, disable=not enabled, unit="step", desc="train", dynamic_ncols=True
    )


class _StopFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can stop at a chunk boundary.

    `signal` is what this process received; `agreed` (set by `agree`, which every process
    calls after the same chunk) is the signal any process received, so all stop together.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.agreed: int | None = None

    def agree(self) -> int | None:
        """The signal any process has received so far (the largest number), or None."""
        mine = self.signal
        if jax.process_count() > 1:
            mine = int(np.max(hosts.allgather(np.int32([mine or 0])))) or None
        self.agreed = mine
        return mine

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        handler = lambda signum, frame: setattr(self, "signal", signum)
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
