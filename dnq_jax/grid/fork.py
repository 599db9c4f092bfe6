"""Start a run from another run's shared warm-up: the state at the noise stage's start.

Before epoch `noise.start_epoch` a run reads none of its `noise.*` keys (the profiler, the
noise, the ramp and lambda all start there), so two runs whose configs differ only in those
keys compute the same states, bit for bit, up to that epoch. The trainer keeps its state at
that step in `noise_start/` (`checkpoint.save_noise_start`); a run that has not started yet
can begin from another's: its first checkpoint is a copy of the donor's `noise_start/<step>/`,
its metrics the donor's rows up to that step, and from there the trainer's own resume (the
same bit-exact rule as after an interruption) takes it on. In the paper's protocol the warm-up
is half of the run, so a grid of noise settings trains it once per seed.

Which keys may differ (`prefix_conflicts`): those of the groups a run may change on resume
(`config.RESUME_FREE_GROUPS`), every `noise.*` key except `noise.start_epoch`, and
`swa.bn_recalibration` (read after the last epoch), and `swa.enabled` where SWA's first
snapshot comes no earlier than the noise stage (`swa.start_epoch >= noise.start_epoch`, the
learning rate not annealed to the SWA start): before it SWA only adds its own optimizer state,
which stays at its start (`_swa_state_added_or_dropped` writes it in, or takes it out, when
the donor's switch differs). Everything else, SAM and the seed included, must be equal. A
method without noise (sgd, swa) has a warm-up like any other, so the `sgd` run of a seed is
the warm-up of its `dnq` runs. Written for one process (the grid's), on process 0. The trainer
knows nothing of this: it only keeps `noise_start/`; the grid (`run.py`) and
`dnq_jax/grid/park.py` use what is here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_collections

from dnq_jax.train import checkpoint, metrics
from dnq_jax.train import config as config_lib


def deferred(key: str) -> bool:
    """Whether the run reads `key` ('group.key') only from the noise stage's start on (the
    BN re-estimation after SWA only once the epochs are over)."""
    return (key.startswith("noise.") and key != "noise.start_epoch") or key == (
        "swa.bn_recalibration"
    )


def _full(cfg) -> dict:
    """Every key of a config (a ConfigDict, or a dict as config.json holds it), flat, with
    the defaults of keys an older config.json lacks."""
    return {**config_lib.flat(config_lib.base_config()), **config_lib.flat(cfg)}


def _swa_after_warmup(flat: dict) -> bool:
    """Whether SWA (were it on) would change nothing before the noise stage of the config
    `flat` (`config_lib.flat` of it): its first snapshot at or after the noise start, and a
    learning rate that does not depend on where SWA starts."""
    return (
        flat["swa.start_epoch"] >= flat["noise.start_epoch"]
        and flat["optim.schedule"] != "cosine_to_swa"
    )


def prefix_conflicts(saved: dict, c: ml_collections.ConfigDict) -> list[str]:
    """The keys that make the warm-up of config `c` differ from that of the `saved` run's
    config (a dict, as config.json holds it); [] when the donor's warm-up is `c`'s."""
    keys = [k for k in config_lib.resume_conflicts(saved, c) if not deferred(k)]
    if "swa.enabled" in keys and _swa_after_warmup(_full(saved)) and _swa_after_warmup(_full(c)):
        keys.remove("swa.enabled")
    return keys


def _newest(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    steps = [p for p in folder.iterdir() if p.name.isdigit() and checkpoint.is_finalized(p)]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def warmup_key(saved: dict) -> str:
    """One string per warm-up: equal for two configs (dicts, as config.json holds them)
    exactly when `prefix_conflicts` finds nothing between them."""
    full = _full(saved)
    free = lambda k: k.split(".", 1)[0] in config_lib.RESUME_FREE_GROUPS or deferred(k)
    if _swa_after_warmup(full):
        full.pop("swa.enabled")
    return json.dumps({k: v for k, v in full.items() if not free(k)}, sort_keys=True)


def start_state(run: str | os.PathLike) -> Path | None:
    """The complete `noise_start/<step>/` folder of the run in `run`, if it has one."""
    return _newest(Path(run) / checkpoint.NOISE_START)


def newest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoints/<step>/` folder of the run in `run`, if any."""
    return _newest(Path(run) / "checkpoints")


def _swa_enabled(saved: dict) -> bool:
    return _full(saved)["swa.enabled"]


def find_donor(runs: list[Path], c: ml_collections.ConfigDict) -> Path | None:
    """The first of `runs` (workdirs) with a kept warm-up that is `c`'s, or None; one with
    `c`'s SWA switch first (its state is copied as it is, not converted)."""
    found = []
    for run in runs:
        try:
            saved = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if start_state(run) is not None and not prefix_conflicts(saved, c):
            found.append((_swa_enabled(saved) != c.swa.enabled, run))
    return min(found, key=lambda f: f[0])[1] if found else None


def _swa_state_added_or_dropped(src: Path, saved: dict, c: ml_collections.ConfigDict, dataset):
    """The donor's state at `src` (a `noise_start/<step>/` folder) with the optimizer state
    of run config `c`: SWA's appended at its start (count = step, nothing averaged) when `c`
    has SWA and the donor had none, or SWA's taken off (it must have averaged nothing). The
    state of `c`'s own run at that step, as the fork test checks bit for bit."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dnq_jax import taps
    from dnq_jax.train import builders, optim
    from dnq_jax.train.state import create_train_state

    ds = builders.load_dataset(c) if dataset is None else dataset
    sharding = builders.shardings(builders.make_mesh(1))["state"]

    def abstract(cfg):  # the run's state as shapes, nothing computed (as the loop's resume)
        model = builders.create_model(cfg, ds.num_classes)
        shapes = builders.variable_shapes(model, ds.image_shape)
        graph = taps.trace(model, shapes, jnp.zeros((2, *ds.image_shape)), train=False)
        tx = builders.create_optimizer(cfg, builders.steps_per_epoch(cfg, ds))
        fresh = jax.eval_shape(lambda v: create_train_state(cfg.seed, v, graph, tx), shapes)
        return builders.placed(fresh, sharding)

    like_donor = abstract(config_lib.from_json_text(json.dumps(saved)))
    like_run = abstract(c)
    state = ocp.StandardCheckpointer().restore((src / "default").absolute(), like_donor)
    step = int(state.step)
    if c.swa.enabled:  # SWA's state at its start, as `optim.swa`'s init makes it
        zeros = lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), sharding)
        swa = jax.tree_util.tree_map(zeros, optim.find_swa_state(like_run.opt_state))
        opt_state = (state.opt_state, swa._replace(count=jnp.full_like(swa.count, step)))
    else:
        opt_state, swa = state.opt_state
        if int(swa.n) != 0:
            raise ValueError(f"{src}: SWA has averaged {int(swa.n)} snapshots already")
    state = state.replace(opt_state=opt_state)
    if jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(like_run):
        raise ValueError(f"{src}: the donor's state does not fit this run's with SWA changed")
    return state


def begin_from(donor: Path, run: Path, c: ml_collections.ConfigDict, dataset=None) -> int:
    """Make `run` (a workdir with no checkpoint) start from `donor`'s warm-up; returns its
    step. Writes checkpoints/<step>/, the donor's metrics rows up to it, config.json and
    fork.json (where the state came from); the trainer then resumes `run` from that step.

    A kill midway leaves no half-begun run: a new `run` is assembled in a temporary folder
    renamed into place; into an existing one the checkpoint is moved last, and a fork.json
    without a checkpoint (a begin cut short there) is undone by the next call."""
    src = start_state(donor)
    if src is None:
        raise ValueError(f"{donor} holds no complete {checkpoint.NOISE_START}/ state")
    step = int(src.name)
    if newest_checkpoint(run) is not None:
        raise ValueError(f"{run} already has a checkpoint: it resumes from its own")
    staging = run.with_name(f".{run.name}.beginning")
    shutil.rmtree(staging, ignore_errors=True)
    saved = json.loads((donor / "config.json").read_text())
    if _swa_enabled(saved) == c.swa.enabled:
        shutil.copytree(src, staging / "checkpoints" / str(step))
    else:  # the same run up to here, with another optimizer-state layout
        try:
            state = _swa_state_added_or_dropped(src, saved, c, dataset)
            checkpoint.save(checkpoint.manager(staging, 1), step, state)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    (staging / "metrics.jsonl").write_text(metrics.text_upto(donor, step))
    (staging / "config.json").write_text(config_lib.to_json(c))
    origin = {"donor": str(donor), "step": step}
    (staging / "fork.json").write_text(json.dumps(origin, indent=2) + "\n")
    if not run.exists():
        os.replace(staging, run)
        return step
    for name in ("metrics.jsonl", "config.json", "fork.json"):
        os.replace(staging / name, run / name)
    (run / "checkpoints").mkdir(exist_ok=True)
    os.replace(staging / "checkpoints" / str(step), run / "checkpoints" / str(step))
    shutil.rmtree(staging)
    return step


def begin_from_sibling(run: Path, c: ml_collections.ConfigDict, dataset=None) -> Path | None:
    """A run with no checkpoint begins from the kept warm-up of a run beside it (a folder
    of `run`'s parent, as a grid's cells are) that is `c`'s; returns that donor, or None.
    `dataset`: `c`'s data set when the caller has it loaded (used only where the donor's
    SWA switch differs)."""
    if newest_checkpoint(run) is not None or not run.parent.is_dir():
        return None
    if (run / "fork.json").exists():  # a begin cut short before its checkpoint: undo it
        for name in ("fork.json", "metrics.jsonl"):
            (run / name).unlink(missing_ok=True)
    others = sorted(p for p in run.parent.iterdir() if p.is_dir() and p != run)
    donor = find_donor(others, c)
    if donor is not None:
        try:
            step = begin_from(donor, run, c, dataset)
        except ValueError as e:  # a conversion that failed: the run trains its own warm-up
            print(f"dnq_jax grid: {run.name} trains its own warm-up ({donor.name}'s: {e})")
            return None
        print(
            f"dnq_jax grid: {run.name} starts at step {step} from {donor.name}'s warm-up "
            "(the same run up to the noise stage)",
            flush=True,
        )
    return donor
