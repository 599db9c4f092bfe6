"""`train_and_evaluate(config, workdir)`: the DNQ trainer (and every ablation of it).

Stages: clean warm-up, then the noise stage (profiler at its start and once per epoch,
differential weight noise and activation drop-in with a ramped lambda), SWA over the last
epochs, BN statistics re-estimated for the averaged weights, and the PTQ evaluation of the
final model at the configured bit-widths into workdir/results.json.

A run resumes from the newest complete checkpoint in its workdir and then computes exactly
the states an uninterrupted run computes. SIGTERM/SIGINT finish the current chunk of steps,
save, and raise `Preempted` (train.py exits 0); a SIGTERM before training starts or during
the final stage kills as usual, and the rerun redoes that part. A non-finite loss or gradient
stops the run (`Diverged`) keeping the last good checkpoint, or, with `rollback_on_nan`,
restores it and continues with lambda halved (at most `MAX_ROLLBACKS` times). The testing
switch `debug_nan_step` poisons its step only while lam_scale == 1, so the replay after a
rollback runs clean.
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

from dnq_jax import batchnorm, checkpoint, evaluate, optim
from dnq_jax import config as cfg
from dnq_jax.dnq import profiler, ramps
from dnq_jax.run_setup import Run, build_run
from dnq_jax.step import KEY_SHUFFLE, TrainState, sub_key

__all__ = ["train_and_evaluate", "Preempted", "Diverged", "Run", "build_run"]


# Each rollback halves lambda; past this many the divergence is not the noise's doing.
MAX_ROLLBACKS = 4
MIN_LAM_SCALE = 0.5**MAX_ROLLBACKS


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint to resume from."""


class Diverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


class _StopFlag:
    """Records SIGTERM/SIGINT instead of dying, so the loop can stop at a chunk boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

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


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _noise_lambda(c: ml_collections.ConfigDict, epoch: int, scale: float) -> float:
    if not cfg.uses_noise(c) or epoch < c.noise_start_epoch:
        return 0.0
    lam = ramps.noise_lambda(
        epoch,
        lambda_max=c.lambda_max,
        noise_start=c.noise_start_epoch,
        ramp_epochs=c.ramp_epochs,
        kind=c.ramp,
    )
    return float(lam) * scale


def _chunks(start: int, end: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, end)) for a in range(start, end, size)]


def _divergence_message(run: Run, state: TrainState, bad_step: int, lam: float) -> str:
    summary = {
        k: float(v) for k, v in profiler.stats_summary(jax.device_get(state.noise_stats)).items()
    }
    stats = ", ".join(f"{k}={v:.3g}" for k, v in summary.items())
    steps = run.mngr.all_steps()
    kept = (
        f"the last good checkpoint (step {max(steps)}) in {run.workdir / 'checkpoints'} is kept"
        if steps
        else "no checkpoint had been written yet"
    )
    return (
        f"non-finite loss or gradient at step {bad_step} (epoch {bad_step // run.spe + 1} of "
        f"{run.config.num_epochs}), lambda={lam:.4g} (lam_scale={float(state.lam_scale):.4g}); "
        f"noise statistics: {stats}. Training stopped there and {kept}."
    )


_ADVICE = (
    " Re-run with rollback_on_nan=True (same workdir) to restore that checkpoint and continue "
    "with lambda halved, or lower learning_rate or lambda_max in a fresh --workdir."
)


def _roll_back(run: Run, state: TrainState, finite: np.ndarray, lam: float) -> TrainState:
    """After a non-finite step: the last checkpoint with lambda halved, or raise Diverged."""
    c = run.config
    bad = int(state.step) - len(finite) + int(np.argmin(finite))
    msg = _divergence_message(run, state, bad, lam)
    restored = checkpoint.restore_latest(run.mngr, state) if c.rollback_on_nan else None
    if restored is None:
        advice = " Nothing to roll back to: lower learning_rate or lambda_max."
        raise Diverged(msg + (advice if c.rollback_on_nan else _ADVICE))
    # Halve the scale the diverged state ran with, not the checkpoint's: a rollback to the
    # same checkpoint must keep lowering lambda, and so end.
    scale = 0.5 * min(float(state.lam_scale), float(restored.lam_scale))
    if scale < MIN_LAM_SCALE:
        raise Diverged(
            f"{msg} Gave up after {MAX_ROLLBACKS} rollbacks, each with lambda halved: the "
            "noise is not the cause. Lower learning_rate."
        )
    state = restored.replace(lam_scale=jnp.asarray(scale, restored.lam_scale.dtype))
    print(
        f"dnq_jax: {msg}\nRolled back to step {int(state.step)}; lambda halved "
        f"(lam_scale={scale:.4g}).",
        flush=True,
    )
    return state


def _train_epoch(run: Run, state: TrainState, epoch: int, stop: _StopFlag, bar) -> tuple:
    """Run the steps of `epoch` still to do. Returns (state, metrics, lam, stopped)."""
    c = run.config
    first = int(state.step) - epoch * run.spe
    noise_on = cfg.uses_noise(c) and epoch >= c.noise_start_epoch
    if noise_on and first == 0:
        fresh = run.profile(state.variables(), run.calib_images)
        state = state.replace(noise_stats=run.ema(state.noise_stats, fresh))
    lam = _noise_lambda(c, epoch, float(state.lam_scale))
    key = jax.random.fold_in(
        sub_key(jax.random.wrap_key_data(state.rng, impl=c.prng_impl), KEY_SHUFFLE), epoch
    )
    idx = run.epoch_indices(key)
    chunk_fn = run.chunk_fn_for(state)
    outs = []
    for a, b in _chunks(first, run.spe, run.chunk_steps):
        state, m = chunk_fn(
            state, run.train_images, run.train_labels, idx[a:b], jnp.float32(lam), noise_on
        )
        outs.append(m)
        bar.update(b - a)
        if stop.signal is not None:
            break
    metrics = jax.device_get(outs)  # one host transfer per epoch (or per interrupted epoch)
    merged = {k: np.concatenate([np.atleast_1d(m[k]) for m in metrics]) for k in metrics[0]}
    return state, merged, lam, stop.signal is not None


def _finish(run: Run, state: TrainState) -> dict:
    """SWA average, BN re-estimation, final save, PTQ evaluation -> results dict."""
    c = run.config
    params, n_swa = (state.params, 0)
    if c.swa:
        params, n_swa = optim.swa_params(state.opt_state, state.params)
    variables = state.variables(params)
    if n_swa and c.bn_recalibration and "batch_stats" in variables:
        variables = batchnorm.recompute_batch_stats(run.model, variables, run.clean_batches())
    variables = jax.device_get(variables)
    checkpoint.save_final(run.workdir, variables)
    results = evaluate.evaluate_variables(
        run.model, variables, run.dataset, run.eval_settings(), progress=c.progress
    )
    results["swa_snapshots"] = n_swa
    results["steps"] = int(state.step)
    evaluate.write_results(run.workdir / "results.json", results)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train per `config` in `workdir` (resuming if a checkpoint is there) and evaluate.

    Returns the results dict also written to workdir/results.json: FP32 and PTQ top-1 at
    each of `config.eval_bits`, with the settings used.
    """
    run = build_run(config, workdir)
    c = run.config
    state = run.state
    total = run.spe * c.num_epochs
    stop = _StopFlag()
    t_start = time.time()
    print(f"dnq_jax: training {c.model} on {c.dataset} ({c.method}) on {run.device}", flush=True)
    with stop.installed(), _progress(total, int(state.step), c.progress) as bar:
        epoch = int(state.step) // run.spe
        while epoch < c.num_epochs:
            t0 = time.time()
            state, m, lam, stopped = _train_epoch(run, state, epoch, stop, bar)
            if not m["finite"].all():
                state = _roll_back(run, state, m["finite"], lam)
                epoch = int(state.step) // run.spe
                continue
            done = int(state.step) % run.spe == 0
            if stopped and not done:
                checkpoint.save(run.mngr, int(state.step), state)
                raise Preempted(
                    f"stopped by signal {stop.signal} at step {int(state.step)}; checkpoint "
                    f"saved in {run.workdir / 'checkpoints'}. Run the same command to resume."
                )
            row = {
                "epoch": epoch + 1,
                "train_loss": float(m["loss"].mean()),
                "train_acc": 100.0 * float(m["correct"].sum()) / (len(m["correct"]) * c.batch_size),
                "lambda": lam,
                "epoch_time_s": time.time() - t0,
                "lr_step": int(state.step),
            }
            row.update(
                {
                    k: float(v)
                    for k, v in profiler.stats_summary(jax.device_get(state.noise_stats)).items()
                }
            )
            last = epoch + 1 == c.num_epochs
            if (epoch + 1) % c.eval_every_epochs == 0 or last:
                row["test_acc"] = run.test_accuracy(state.variables())
            run.writer.write(int(state.step), row)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                lam=f"{lam:.2f}",
                acc=f"{row.get('test_acc', float('nan')):.1f}",
            )
            if (epoch + 1) % c.ckpt_every_epochs == 0 or last or stopped:
                checkpoint.save(run.mngr, int(state.step), state)
            if stopped:
                raise Preempted(
                    f"stopped by signal {stop.signal} after epoch {epoch + 1}; checkpoint saved "
                    f"in {run.workdir / 'checkpoints'}. Run the same command to resume."
                )
            epoch += 1
    results = _finish(run, state)
    results["train_time_s"] = time.time() - t_start
    run.writer.close()
    return results
