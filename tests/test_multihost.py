"""Several processes (`jax.distributed`) on one machine: two processes on 127.0.0.1, each
with 2 CPU devices (gloo collectives), against one process with 4 devices.

Each run is `train.py` / `evaluate.py` as a subprocess, as a user on two hosts would start it.
One fixture runs everything the result tests look at, overlapping what can overlap: the one-
and two-process trainings start together; the two-process run is SIGKILLed (one process)
after its first checkpoint and restarted, so one pair of runs checks both the result and the
resume; as soon as the one-process run is done, evaluate.py measures it with one process,
and a copy of it with two, while the two-process run goes on.

Where the time goes: process 0 and the one-process run load their compiled functions from
the tests' persistent compilation cache, but process 1 compiles everything, every time (JAX
keys a compilation by the process it runs on, and only process 0 writes the cache). Process
1's compiles are the critical path, so the runs here compile at XLA's lowest backend
optimisation level, and the smoke run is cut to what the checks need: 2 steps per epoch, the
FP32 test accuracy at the end only, PTQ measured by evaluate.py alone.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dnq_jax.errors import EXIT_CODES, ConfigError
from dnq_jax.grid import fork
from dnq_jax.train import checkpoint, metrics

# Subprocess training on two cores: run by `make test-multiprocess` (and CI), not by the
# quick `make test`.
pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
# 3 epochs of 2 steps: warm-up, then noise from epoch 1, SWA from epoch 2; a checkpoint per
# epoch at steps 2, 4, 6 (the newest 2 kept). No PTQ in training: evaluate.py measures it.
SMOKE = (
    "smoke,optim.num_epochs=3,optim.steps_per_epoch=2,eval.every_epochs=3,eval.bits=,"
    "runtime.progress=False"
)
BITS = "--bits=w8a8"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    # LLVM's optimisations cost more compile time than these few steps save (the model's
    # init compiles ~6x faster); both runs of a comparison use the same flags.
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}"
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


_PORTS: set[int] = set()


def _free_port() -> int:
    """A free port for a coordinator, never the same twice (runs overlap here)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS:
            _PORTS.add(port)
            return port


def _start(args: list[str], processes: int, devices: int) -> list[subprocess.Popen]:
    """`processes` processes of one command (`train.py ...` or `evaluate.py ...`),
    `devices` CPU devices each."""
    cmd = [sys.executable, *args]
    if processes > 1:
        cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        procs.append(
            subprocess.Popen(
                cmd + ([f"--process_id={i}"] if processes > 1 else []),
                cwd=ROOT,
                env=_env(devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _train(workdir, processes: int, devices: int, more: str = "") -> list[subprocess.Popen]:
    args = ["train.py", f"--config=configs/resnet.py:{SMOKE}{more}", f"--workdir={workdir}"]
    return _start(args, processes, devices)


def _evaluate(workdir, processes: int, devices: int) -> list[subprocess.Popen]:
    return _start(["evaluate.py", f"--workdir={workdir}", BITS], processes, devices)


def _finish(procs, timeout=300, codes=(0,)) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process, each of which must exit with a status in `codes`;
    all are killed if one hangs."""
    outs = []
    t0 = time.time()
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            every = "\n".join(f"{q.args}: exit {q.wait()}: {q.communicate()}" for q in procs)
            raise AssertionError(f"{p.args} hung; every process:\n{every}") from None
    for p, (out, err) in zip(procs, outs):
        assert p.returncode in codes, f"{p.args} exited {p.returncode}:\n{out}\n{err[-3000:]}"
    return outs


def _steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _final_params(workdir):
    return ocp.StandardCheckpointer().restore((Path(workdir) / "final").absolute())["params"]


def _top_level(workdir) -> list[str]:
    """The workdir's entries, with TensorBoard's host/time-stamped event file name unified."""
    names = [p.name for p in Path(workdir).iterdir()]
    return sorted("events" if n.startswith("events.out.tfevents") else n for n in names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 4 devices, and alongside it two processes x 2 devices of which one is
    SIGKILLed after the first checkpoint, then both restarted (the same commands). Once the
    one-process run has finished, evaluate.py measures it with one process and a copy of it
    with two, while the two-process run goes on."""
    base = tmp_path_factory.mktemp("multihost")
    t0 = time.time()
    one, two, copy = base / "one", base / "two", base / "one_copy"
    one_train = _train(one, 1, 4)
    victim = _train(two, 2, 2)
    evals = None

    def evaluate_one():
        shutil.copytree(one, copy)
        return _evaluate(one, 1, 4), _evaluate(copy, 2, 2)

    # Killed once the first checkpoint and the warm-up (kept just after it, at the noise
    # stage's first step) are complete: a save torn by the kill is test_fork.py's case.
    while fork.newest_checkpoint(two) is None or fork.start_state(two) is None:
        assert all(p.poll() is None for p in victim), [p.communicate() for p in victim]
        assert time.time() - t0 < 300, "no checkpoint within 300 s"
        if evals is None and one_train[0].poll() is not None:
            evals = evaluate_one()
        time.sleep(0.02)
    killed_at = max(_steps(two))
    victim[1].kill()  # SIGKILL: the survivor stops at its next collective...
    try:
        victim[0].wait(timeout=1)
    except subprocess.TimeoutExpired:
        victim[0].kill()  # ... or is killed, as a cluster's launcher would
    first = [p.communicate() for p in victim]
    t_killed = time.time() - t0
    resumed = _train(two, 2, 2)
    one_outs = _finish(one_train)
    if evals is None:
        evals = evaluate_one()
    out = {"one": (one, one_outs), "two": (two, _finish(resumed)), "copy": copy}
    out["killed_at"], out["first"] = killed_at, first
    out["eval_one"], out["eval_two"] = _finish(evals[0]), _finish(evals[1])
    print(f"multihost runs: killed at {t_killed:.1f} s, all done at {time.time() - t0:.1f} s")
    return out


def same_curves(one, two) -> tuple[list, list]:
    """Asserts that the runs in `one` and `two` logged the same 3 epochs, losses up to float
    reassociation and the same test accuracies; returns their metrics rows."""
    rows1, rows2 = metrics.read(one), metrics.read(two)
    assert [r["epoch"] for r in rows1] == [r["epoch"] for r in rows2] == [1, 2, 3]
    np.testing.assert_allclose(
        [r["train_loss"] for r in rows2], [r["train_loss"] for r in rows1], rtol=1e-5
    )
    assert [r.get("test_acc") for r in rows2] == [r.get("test_acc") for r in rows1]
    return rows1, rows2


def test_two_processes_give_the_one_process_result(runs):
    """Killed and resumed, the two-process run ends as the uninterrupted one-process run
    (losses up to float reassociation, the same accuracies)."""
    (one, _), (two, outs) = runs["one"], runs["two"]
    rows1, rows2 = same_curves(one, two)
    r1, r2 = (json.loads((w / "results.json").read_text()) for w in (one, two))
    gap = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rows1, rows2))
    print(f"1 x 4 devices vs 2 x 2 (killed, resumed): FP32 {r1['fp32']} vs {r2['fp32']}, "
          f"largest train-loss difference over the epochs {gap:.3g}")  # fmt: skip
    assert (r2["fp32"], r2["steps"]) == (r1["fp32"], r1["steps"]) == (r1["fp32"], 6)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        _final_params(two),
        _final_params(one),
    )
    assert "4 x cpu" in runs["first"][0][0]  # one mesh over both processes' devices
    # Process 0 alone logs and prints the table.
    assert "results (" in outs[0][0] and "results (" not in outs[1][0]
    assert "dnq_jax:" not in outs[1][0] and "dnq_jax:" not in runs["first"][1][0]


def test_each_file_is_written_once(runs):
    (one, _), (two, _) = runs["one"], runs["two"]
    # TensorBoard starts an event file each time a run starts (here: started and resumed),
    # as with one process; not one per process.
    assert _top_level(one).count("events") == 1 and _top_level(two).count("events") == 2
    assert (
        sorted(set(_top_level(two)))
        == [n for n in _top_level(one) if n != "ptq_results.json"]  # one: evaluated too
        == [
            "checkpoints",
            "config.json",
            "events",
            "final",
            "metrics.jsonl",
            "noise_start",
            "results.json",
        ]
    )
    assert _steps(two) == _steps(one) == [4, 6]
    # The warm-up kept once, at the noise stage's first step, complete.
    starts = [fork.start_state(wd) for wd in (one, two)]
    assert [s.name for s in starts] == ["2", "2"]
    assert len(list((two / "noise_start").iterdir())) == 1
    assert len(metrics.read(two)) == 3  # one row per epoch, not one per process
    assert checkpoint.is_finalized(two / "final")
    assert not [p for p in (two / "checkpoints").iterdir() if ocp.utils.is_tmp_checkpoint(p)]


def test_sigkill_of_one_process_then_both_restarted_resumes(runs):
    (_, outs), killed_at = runs["two"], runs["killed_at"]
    found = re.search(r"resumed from step (\d+)", outs[0][0])
    assert found is not None, outs[0]
    assert killed_at >= 2 and int(found.group(1)) >= killed_at


def test_evaluate_with_two_processes_gives_the_one_process_table(runs):
    """evaluate.py with two processes on a copy of a finished run: the same
    ptq_results.json as one process writes for the run itself, written by process 0 (one
    new file, nothing half-written), and printed by process 0 alone."""
    one, copy = runs["one"][0], runs["copy"]
    p1, p2 = (json.loads((w / "ptq_results.json").read_text()) for w in (one, copy))
    for r in (p1, p2):
        r["settings"].pop("eval_time_s")
    assert p2 == p1 and sorted(p2) == ["fp32", "settings", "w8a8"]
    assert p2["fp32"] == json.loads((copy / "results.json").read_text())["fp32"]
    assert _top_level(copy) == _top_level(one)
    (out0, err0), (out1, err1) = runs["eval_two"]
    assert "W8A8" in out0 and "written:" in out0 and "PTQ eval" in err0
    assert "W8A8" not in out1 and "written:" not in out1 and "PTQ eval" not in err1


def test_an_error_on_process_0_stops_every_process_with_its_status(runs, tmp_path):
    """Two refusals that process 0 alone finds: an unwritable workdir (its probe) and a
    resume with other training settings (config.json, read by process 0). Each time both
    processes exit together with the error's status (not the others waiting at a barrier
    for a process that has gone), both say why, and the workdir is left as it was."""
    (tmp_path / "a_file").write_text("")
    unwritable = tmp_path / "a_file" / "wd"  # under a regular file: refused even for root
    conflict = tmp_path / "conflict"
    shutil.copytree(runs["two"][0], conflict)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in conflict.rglob("*"))
    cases = {  # name: (processes, exit status, what both must say)
        "unwritable": (_train(unwritable, 2, 2), EXIT_CODES[PermissionError], "not writable"),
        "conflict": (
            _train(conflict, 2, 2, ",optim.learning_rate=0.1"),
            EXIT_CODES[ConfigError],
            "holds a run with other settings",
        ),
    }
    procs = [p for ps, _, _ in cases.values() for p in ps]
    ended = {}
    t0 = time.time()
    while len(ended) < len(procs) and time.time() - t0 < 120:
        done = [p for p in procs if id(p) not in ended and p.poll() is not None]
        ended.update({id(p): time.time() for p in done})
        time.sleep(0.02)
    for name, (ps, code, says) in cases.items():
        outs = _finish(ps, timeout=1, codes=(code,))
        apart = abs(ended[id(ps[0])] - ended[id(ps[1])])
        assert apart < 10, f"{name}: the processes exited {apart:.1f} s apart"
        err0, err1 = (" ".join(err.split()) for _, err in outs)  # unwrapped
        assert says in err0 and says in err1 and "(on process 0)" in err1, name
        assert "Traceback" not in err0 + err1, name
    assert not unwritable.parent.is_dir()
    assert sorted((str(p), p.stat().st_mtime_ns) for p in conflict.rglob("*")) == before
