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
`swa.bn_recalibration` (read after the last epoch); everything else, the method's SWA and SAM
switches and the seed included, must be equal. A method without
noise (sgd, swa) has a warm-up like any other, so a `swa` run and a `dnq` run (both with SWA,
the same seed) share theirs. Written for one process (the grid's), on process 0. The trainer
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


def prefix_conflicts(saved: dict, c: ml_collections.ConfigDict) -> list[str]:
    """The keys that make the warm-up of config `c` differ from that of the `saved` run's
    config (a dict, as config.json holds it); [] when the donor's warm-up is `c`'s."""
    return [k for k in config_lib.resume_conflicts(saved, c) if not deferred(k)]


def _newest(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    steps = [p for p in folder.iterdir() if p.name.isdigit() and checkpoint.is_finalized(p)]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def warmup_key(saved: dict) -> str:
    """One string per warm-up: equal for two configs (dicts, as config.json holds them)
    exactly when `prefix_conflicts` finds nothing between them."""
    full = {**config_lib.flat(config_lib.base_config()), **config_lib.flat(saved)}
    free = lambda k: k.split(".", 1)[0] in config_lib.RESUME_FREE_GROUPS or deferred(k)
    return json.dumps({k: v for k, v in full.items() if not free(k)}, sort_keys=True)


def start_state(run: str | os.PathLike) -> Path | None:
    """The complete `noise_start/<step>/` folder of the run in `run`, if it has one."""
    return _newest(Path(run) / checkpoint.NOISE_START)


def newest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoints/<step>/` folder of the run in `run`, if any."""
    return _newest(Path(run) / "checkpoints")


def find_donor(runs: list[Path], c: ml_collections.ConfigDict) -> Path | None:
    """The first of `runs` (workdirs) with a kept warm-up that is `c`'s, or None."""
    for run in runs:
        try:
            saved = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if start_state(run) is not None and not prefix_conflicts(saved, c):
            return run
    return None


def begin_from(donor: Path, run: Path, c: ml_collections.ConfigDict) -> int:
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
    shutil.copytree(src, staging / "checkpoints" / str(step))
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


def begin_from_sibling(run: Path, c: ml_collections.ConfigDict) -> Path | None:
    """A run with no checkpoint begins from the kept warm-up of a run beside it (a folder
    of `run`'s parent, as a grid's cells are) that is `c`'s; returns that donor, or None."""
    if newest_checkpoint(run) is not None or not run.parent.is_dir():
        return None
    if (run / "fork.json").exists():  # a begin cut short before its checkpoint: undo it
        for name in ("fork.json", "metrics.jsonl"):
            (run / name).unlink(missing_ok=True)
    others = sorted(p for p in run.parent.iterdir() if p.is_dir() and p != run)
    donor = find_donor(others, c)
    if donor is not None:
        step = begin_from(donor, run, c)
        print(
            f"dnq_jax grid: {run.name} starts at step {step} from {donor.name}'s warm-up "
            "(the same run up to the noise stage)",
            flush=True,
        )
    return donor
