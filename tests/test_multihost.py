"""Several processes (`jax.distributed`) on one machine: two processes on 127.0.0.1, each
with 2 CPU devices (gloo collectives), against one process with 4 devices.

Each run is `train.py` as a subprocess, as a user on two hosts would start it. The one- and
two-process runs start together; the two-process run is SIGKILLed (one process) after its
first checkpoint and restarted, so one pair of runs checks both the result and the resume.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dnq_jax.train import checkpoint, metrics

# Minutes of subprocess training on two cores: run by `make test-multiprocess` (and CI), not
# by the quick `make test`.
pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parent.parent
SMOKE = "smoke,optim.num_epochs=3,eval.bits=w8a8,runtime.progress=False"


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}"
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, processes: int, devices: int) -> list[subprocess.Popen]:
    """`processes` train.py processes of one run in `workdir`, `devices` CPU devices each."""
    cmd = [sys.executable, "train.py", f"--config=configs/resnet.py:{SMOKE}"]
    cmd.append(f"--workdir={workdir}")
    if processes > 1:
        cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    procs = []
    for i in range(processes):
        args = cmd + ([f"--process_id={i}"] if processes > 1 else [])
        procs.append(
            subprocess.Popen(
                args,
                cwd=ROOT,
                env=_env(devices),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _finish(procs, timeout=300) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process; all are killed if one hangs."""
    outs = []
    t0 = time.time()
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - t0))))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{p.args} hung: {p.communicate()}") from None
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{out}\n{err[-3000:]}"
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
    SIGKILLed after the first checkpoint, then both restarted (the same commands)."""
    base = tmp_path_factory.mktemp("multihost")
    t0 = time.time()
    one = _start(base / "one", 1, 4)
    two = base / "two"
    victim = _start(two, 2, 2)
    while not any(checkpoint.is_finalized(two / "checkpoints" / str(s)) for s in _steps(two)):
        assert all(p.poll() is None for p in victim), [p.communicate() for p in victim]
        assert time.time() - t0 < 300, "no checkpoint within 300 s"
        time.sleep(0.02)
    killed_at = max(_steps(two))
    victim[1].kill()  # SIGKILL: the survivor stops at its next collective, or is killed
    try:
        victim[0].wait(timeout=20)
    except subprocess.TimeoutExpired:
        victim[0].kill()
    first = [p.communicate() for p in victim]
    resumed = _finish(_start(two, 2, 2))
    out = {"one": (base / "one", _finish(one)), "two": (two, resumed)}
    out["killed_at"], out["first"] = killed_at, first
    print(f"multihost runs: {time.time() - t0:.1f} s")
    return out


def test_two_processes_give_the_one_process_result(runs):
    """Killed and resumed, the two-process run ends as the uninterrupted one-process run
    (losses up to float reassociation, the same accuracies)."""
    (one, _), (two, outs) = runs["one"], runs["two"]
    rows1, rows2 = metrics.read(one), metrics.read(two)
    assert [r["epoch"] for r in rows1] == [r["epoch"] for r in rows2] == [1, 2, 3]
    np.testing.assert_allclose(
        [r["train_loss"] for r in rows2], [r["train_loss"] for r in rows1], rtol=1e-5
    )
    assert [r.get("test_acc") for r in rows2] == [r.get("test_acc") for r in rows1]
    r1, r2 = (json.loads((w / "results.json").read_text()) for w in (one, two))
    assert (r2["fp32"], r2["w8a8"], r2["steps"]) == (r1["fp32"], r1["w8a8"], r1["steps"])
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
        == _top_level(one)
        == [
            "checkpoints",
            "config.json",
            "events",
            "final",
            "metrics.jsonl",
            "results.json",
        ]
    )
    assert _steps(two) == _steps(one) == [8, 12]
    assert len(metrics.read(two)) == 3  # one row per epoch, not one per process
    assert checkpoint.is_finalized(two / "final")
    assert not [p for p in (two / "checkpoints").iterdir() if ocp.utils.is_tmp_checkpoint(p)]


def test_sigkill_of_one_process_then_both_restarted_resumes(runs):
    (_, outs), killed_at = runs["two"], runs["killed_at"]
    found = re.search(r"resumed from step (\d+)", outs[0][0])
    assert found is not None, outs[0]
    assert killed_at >= 4 and int(found.group(1)) >= killed_at
