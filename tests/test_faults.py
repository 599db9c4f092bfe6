"""Faults a training run must survive without losing work, and bad input it must refuse.

Real signals and exits need a real process, so those tests run `train.py` / `evaluate.py` as
subprocesses (training on one of the tests' 8 host devices, sharing their compilation cache);
the rest run in-process. Every resumed run is compared bit-exactly with one uninterrupted run
of the same training settings: the session's smoke run (conftest.py).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SMOKE_RUN

from configs import resnet
from dnq_jax.errors import ConfigError
from dnq_jax.train import builders, checkpoint, metrics
from dnq_jax.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parent.parent
# The session smoke run's training settings (conftest.py): 5 epochs of 4 steps, warm-up, then
# noise from epoch 1, SWA from epoch 2; a checkpoint per epoch at steps 4, 8, ..., 20, all
# kept. That run, trained in-process once per session, is the uninterrupted reference every
# fault run here is compared with, and the run the evaluate.py tests read. The runs here end
# with FP32 alone (evaluation keys may differ on a resume); REFERENCE measures W8A8 as well.
SMOKE = "smoke," + SMOKE_RUN + ",eval.bits="
REFERENCE = SMOKE + ",eval.bits=w8a8"


def _env() -> dict:
    # The suite's XLA level (tests/conftest.py) reaches the children: every run compiles the
    # same step programs (the NaN run's poison goes in between them), so runs compare bit
    # for bit at any optimization level.
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    # The same host devices as the tests' process, so the children's programs are the ones
    # the in-process smoke run compiled (the device count is part of a program's cache key);
    # they train on one of them (runtime.num_devices=1).
    env["JAX_NUM_CPU_DEVICES"] = str(jax.config.jax_num_cpu_devices)
    # Children compile the same small functions again and again: cache all of them.
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _train_cmd(workdir, config=SMOKE, *flags, nan_step: int | None = None) -> list[str]:
    """The train.py command; with `nan_step`, tests/nan_train.py poisons that step."""
    script = ["train.py"] if nan_step is None else ["tests/nan_train.py", str(nan_step)]
    return [
        sys.executable,
        *script,
        f"--config=configs/resnet.py:{config}",
        f"--workdir={workdir}",
        *flags,
    ]


def _start(cmd) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    """(stdout, stderr) of `proc`; a hung run is killed, so it fails instead of lingering."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args} hung; output so far:\n{out}\n{err}") from None


def _run(cmd, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _wait_for_checkpoint(proc, workdir, timeout=240) -> int:
    """Block until a complete checkpoint exists (Orbax renames it into place when done)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        ck = Path(workdir) / "checkpoints"
        done = [s for s in _steps(workdir) if checkpoint.is_finalized(ck / str(s))]
        if done:
            return done[0]
        assert proc.poll() is None, f"run ended before any checkpoint: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint within {timeout} s: {proc.communicate()}")


def _final_params(workdir):
    return ocp.StandardCheckpointer().restore((Path(workdir) / "final").absolute())["params"]


def _assert_same_params(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _listing(path) -> list[str] | None:
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


@pytest.fixture(scope="module")
def reference(smoke_run):
    """The uninterrupted run every fault run is compared with: the session's smoke run, whose
    programs (in the compilation cache) the children load. Read it, or copy it first."""
    wd, results = smoke_run
    assert results["steps"] == 20
    return wd


@pytest.fixture(scope="module")
def runs(reference, tmp_path_factory):
    """name -> (workdir, CompletedProcess) of the runs that need no interaction, one after
    the other: the rollback run finds its programs in the compilation cache the smoke run and
    the NaN run filled (run side by side, each would compile what is not there itself)."""
    base = tmp_path_factory.mktemp("runs")
    commands = {
        "nan": _train_cmd(base / "nan", nan_step=8),
        "rollback": _train_cmd(
            base / "rollback", SMOKE + ",runtime.rollback_on_nan=True", nan_step=8
        ),
    }
    return {k: (base / k, _run(cmd)) for k, cmd in commands.items()}


def test_sigkill_at_a_random_moment_resumes_bit_exactly(reference, tmp_path):
    wd = tmp_path / "wd"
    proc = _start(_train_cmd(wd))
    _wait_for_checkpoint(proc, wd)
    delay = random.uniform(0.0, 0.4)  # anywhere in the next epochs, a save, or the final stage
    time.sleep(delay)
    proc.kill()
    _finish(proc)
    again = _run(_train_cmd(wd))
    assert again.returncode == 0, again.stderr
    assert "resumed from step" in again.stdout, f"killed {delay:.2f}s after the checkpoint"
    _assert_same_params(_final_params(reference), _final_params(wd))
    assert not [p for p in (wd / "checkpoints").iterdir() if ocp.utils.is_tmp_checkpoint(p)]


def test_sigterm_saves_exits_zero_and_the_rerun_matches(reference, tmp_path):
    wd = tmp_path / "wd"
    proc = _start(_train_cmd(wd))
    first = _wait_for_checkpoint(proc, wd)
    proc.send_signal(signal.SIGTERM)
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert "stopped by signal 15" in err and "Run the same command to resume" in err
    assert max(_steps(wd)) > first  # the current chunk was finished and saved
    assert not (wd / "final").exists()
    saved = max(_steps(wd))
    again = _run(_train_cmd(wd))
    assert again.returncode == 0, again.stderr
    assert f"resumed from step {saved}" in again.stdout
    _assert_same_params(_final_params(reference), _final_params(wd))


def test_sigint_finishes_the_chunk_saves_and_exits_zero(tmp_path):
    proc = _start(_train_cmd(tmp_path))
    first = _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = _finish(proc)
    assert proc.returncode == 0, err
    assert "stopped by signal 2" in err and "Traceback" not in err
    assert max(_steps(tmp_path)) > first


def test_torn_and_unreadable_checkpoints_are_never_restored(reference, tmp_path):
    wd = tmp_path / "wd"
    ck = wd / "checkpoints"
    ck.mkdir(parents=True)
    shutil.copy(reference / "config.json", wd)
    shutil.copytree(reference / "checkpoints" / "8", ck / "8")
    # A save killed before its rename (Orbax's temporary name), and a complete-looking
    # checkpoint whose array files are gone.
    tmp = ck / "12.orbax-checkpoint-tmp-1700000000"
    tmp.mkdir()
    (tmp / "junk").write_bytes(b"\0" * 64)
    assert ocp.utils.is_tmp_checkpoint(tmp) and not checkpoint.is_finalized(tmp)
    shutil.copytree(reference / "checkpoints" / "12", ck / "12")
    shutil.rmtree(ck / "12" / "default")
    r = _run(_train_cmd(wd))
    assert r.returncode == 0, r.stderr
    assert "incomplete checkpoint(s) moved aside" in r.stdout
    assert "12.orbax-checkpoint-tmp-1700000000 -> 12.incomplete" in r.stdout
    assert "checkpoint 12 unreadable" in r.stdout and "resumed from step 8" in r.stdout
    _assert_same_params(_final_params(reference), _final_params(wd))
    # Both moved aside, not deleted, with their contents.
    assert (ck / "12.unreadable").is_dir()
    assert (ck / "12.incomplete" / "junk").read_bytes() == b"\0" * 64
    assert _steps(wd) == [8, 12, 16, 20] and checkpoint.is_finalized(ck / "12")


def test_checkpoints_without_orbax_marker_files_are_kept_and_resumed(reference, tmp_path):
    """How Orbax versions that finalise by rename alone leave a local checkpoint (no marker
    file): the trainer keeps every one, resumes from the newest, and ends as before."""
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    for p in wd.rglob("commit_success.txt"):  # none with versions that never write it
        p.unlink()
    before = _listing(wd / "checkpoints")
    r = _run(_train_cmd(wd, REFERENCE))
    assert r.returncode == 0, r.stderr
    assert "moved aside" not in r.stdout and "unreadable" not in r.stdout
    assert "resumed from step 20" in r.stdout
    assert _listing(wd / "checkpoints") == before  # nothing removed, nothing moved
    _assert_same_params(_final_params(reference), _final_params(wd))
    got, want = (json.loads((w / "results.json").read_text()) for w in (wd, reference))
    for k in ("fp32", "w8a8", "steps", "swa_snapshots"):
        assert got[k] == want[k], k


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(runs, reference):
    wd, r = runs["nan"]
    assert r.returncode == 6, r.stderr
    msg = " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr
    for part in ("step 8 (epoch 3 of 5)", "lambda=0.5 ", "w_sigma=", "a_sigma=", "(step 8)"):
        assert part in msg, (part, msg)
    assert _steps(wd) == [4, 8] and not (wd / "final").exists()
    # The kept state is the one the clean run had at step 8: nothing after the NaN leaked in.
    kept = ocp.StandardCheckpointer().restore((wd / "checkpoints" / "8" / "default").absolute())
    clean = ocp.StandardCheckpointer().restore(
        (reference / "checkpoints" / "8" / "default").absolute()
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, kept, clean)


def test_rollback_on_nan_halves_lambda_and_finishes(runs, reference):
    wd, r = runs["rollback"]
    assert r.returncode == 0, r.stderr
    assert "Rolled back to step 8; lambda halved (lam_scale=0.5)" in r.stdout
    results = json.loads((wd / "results.json").read_text())
    assert results["steps"] == 20 and np.isfinite(results["fp32"])
    lam = {r["epoch"]: r["lambda"] for r in metrics.read(wd) if "lambda" in r}
    ref = {r["epoch"]: r["lambda"] for r in metrics.read(reference) if "lambda" in r}
    assert lam[2] == ref[2] and lam[3] == pytest.approx(ref[3] / 2) and ref[3] > 0
    saved = ocp.StandardCheckpointer().restore(wd / "checkpoints" / "20" / "default")
    assert float(saved["lam_scale"]) == 0.5
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(saved["params"]))


def test_config_is_validated_before_data_or_workdir(tmp_path, monkeypatch):
    def no_data(c):
        raise AssertionError("data loaded before the config was checked")

    monkeypatch.setattr(builders, "load_dataset", no_data)
    cases = [("noise.rho=1.5", "noise.rho"), ("swa.start_epoch=4", "swa.start_epoch")]
    n = jax.device_count()  # tests/conftest.py makes 8 host devices
    if n > 1:
        cases.append((f"optim.batch_size={4 * n + 1},runtime.num_devices={n}", "batch_size"))
    for bad, key in cases:
        with pytest.raises(ConfigError, match=key):
            train_and_evaluate(resnet.get_config(f"smoke,{bad}"), tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


def test_resuming_with_other_training_settings_is_refused(reference, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd)
    before = _listing(wd)
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        train_and_evaluate(resnet.get_config(SMOKE + ",optim.learning_rate=0.1"), wd)
    assert _listing(wd) == before


# --- Bad input through the CLIs: one paragraph, no traceback, a distinct exit status, and
# the workdir exactly as it was. The processes mostly import and fail, so they run at once.


def _cli_cases(tmp: Path, reference: Path) -> dict:
    unwritable = tmp / "a_file" / "wd"  # under a regular file: refused even for root
    (tmp / "a_file").write_text("not a folder")
    if os.geteuid() != 0:  # chmod does not stop root, so only a normal user gets this variant
        locked = tmp / "locked"
        locked.mkdir(mode=0o500)
        unwritable = locked / "wd"
    good = tmp / "good.npz"
    np.savez(good, train_jpeg=np.zeros(8, np.uint8))
    truncated = tmp / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    foreign = tmp / "foreign"
    shutil.copytree(reference, foreign, ignore=shutil.ignore_patterns("checkpoints"))
    c = json.loads((foreign / "config.json").read_text())
    c["model"]["name"] = "resnet20"  # another zoo model: the saved arrays cannot fit it
    (foreign / "config.json").write_text(json.dumps(c))
    data = f"{SMOKE},data.name=cifar10_jpeg,runtime.npz_path="
    evaluate = [sys.executable, "evaluate.py", f"--workdir={foreign}"]
    return {  # name: (command, workdir that must be left as it was, exit status, must say)
        "unknown_flag_key": (
            _train_cmd(tmp / "w1", SMOKE, "--config.nosuchkey=1"),
            tmp / "w1",
            2,
            ["nosuchkey", "unknown config key"],
        ),
        "unknown_arg_key": (
            _train_cmd(tmp / "w2", SMOKE + ",noise.lamda_max=2"),
            tmp / "w2",
            2,
            ["noise.lamda_max", "unknown config key", "Did you mean 'noise.lambda_max'"],
        ),
        "method_flag": (
            _train_cmd(tmp / "w6", SMOKE, "--config.method=sgd"),
            tmp / "w6",
            2,
            ["method: not a config key", "configs/resnet.py:method=sgd"],
        ),
        "rho_range": (
            _train_cmd(existing, SMOKE + ",noise.rho=1.5"),
            existing,
            2,
            ["noise.rho", "[0, 1]"],
        ),
        "missing_data": (
            _train_cmd(tmp / "w3", data + str(tmp / "absent.npz")),
            tmp / "w3",
            3,
            ["absent.npz", "not found", "runtime.npz_path"],
        ),
        "truncated_data": (
            _train_cmd(tmp / "w4", data + str(truncated)),
            tmp / "w4",
            3,
            ["truncated.npz", "sha256", "expected", "runtime.npz_path"],
        ),
        "unwritable": (_train_cmd(unwritable, SMOKE), unwritable, 5, ["not writable"]),
        "foreign_checkpoint": (
            evaluate,
            foreign,
            4,
            ["do not fit", "arrays where", "another model"],
        ),
        "verbose": (
            _train_cmd(tmp / "w5", SMOKE + ",noise.rho=1.5", "--verbose"),
            tmp / "w5",
            2,
            ["Traceback", "noise.rho"],
        ),
    }


@pytest.fixture(scope="module")
def cli_errors(reference, tmp_path_factory):
    """name -> (returncode, stderr, listing before, listing after) for each bad-input case."""
    cases = _cli_cases(tmp_path_factory.mktemp("cli"), reference)
    before = {k: _listing(wd) for k, (_, wd, _, _) in cases.items()}
    procs = {k: _start(cmd) for k, (cmd, _, _, _) in cases.items()}
    out = {}
    for k, proc in procs.items():
        _, err = _finish(proc)
        out[k] = (proc.returncode, err, before[k], _listing(cases[k][1]), cases[k])
    return out


@pytest.mark.parametrize(
    "case",
    [
        "unknown_flag_key",
        "unknown_arg_key",
        "method_flag",
        "rho_range",
        "missing_data",
        "truncated_data",
        "unwritable",
        "foreign_checkpoint",
        "verbose",
    ],
)
def test_bad_input_is_one_paragraph_and_leaves_the_workdir(cli_errors, case):
    code, err, before, after, (_, _, want_code, says) = cli_errors[case]
    assert code == want_code, err
    text = " ".join(err.split())
    for part in says:
        assert part in text, (part, err)
    if case != "verbose":
        assert "Traceback" not in err and "--verbose" in err
        assert len([ln for ln in err.splitlines() if ln.startswith("error (")]) == 1
    assert after == before, f"workdir changed: {before} -> {after}"


def test_an_error_passed_between_processes_keeps_its_kind_and_message():
    """What `hosts.agreed` sends another process (tests/test_multihost.py runs it for
    real): an expected error arrives as its own kind, so the exit status is the same
    everywhere; a bug as a RuntimeError naming it; a long message cut, not garbled."""
    from dnq_jax.errors import EXIT_CODES, exit_code
    from dnq_jax.train import hosts

    assert not hosts._encode(None).any()
    for sent in [PermissionError("workdir w is not writable"), ConfigError("seed: x")]:
        got = hosts._decode(hosts._encode(sent), 0)
        assert type(got) is type(sent) and exit_code(got) == EXIT_CODES[type(sent)]
        assert str(got) == f"{sent} (on process 0)"
    bug = hosts._decode(hosts._encode(KeyError("k")), 1)
    assert type(bug) is RuntimeError and str(bug) == "KeyError: 'k' (on process 1)"
    long = hosts._decode(hosts._encode(ConfigError("é" * 5000)), 0)
    assert str(long) == "é" * (hosts._MESSAGE_BYTES // 2) + " (on process 0)"


def test_evaluate_cli_on_a_finished_run(reference, tmp_path):
    """evaluate.py re-measures a finished run: the same FP32 and W8A8 top-1 as its training
    run wrote, at the run's own settings, then at the bits asked for."""
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd, ignore=shutil.ignore_patterns("checkpoints"))
    r = _run([sys.executable, "evaluate.py", f"--workdir={wd}", "--bits=w8a8,w4a4"])
    assert r.returncode == 0, r.stderr
    assert "W4A4" in r.stdout and "ptq_results.json" in r.stdout
    trained = json.loads((wd / "results.json").read_text())
    measured = json.loads((wd / "ptq_results.json").read_text())
    assert measured["fp32"] == pytest.approx(trained["fp32"], abs=1e-9)
    assert measured["w8a8"] == pytest.approx(trained["w8a8"], abs=1e-9)
    assert measured["settings"]["bits"] == ["w8a8", "w4a4"]
    assert measured["settings"]["method"] == "rtn" and 0 <= measured["w4a4"] <= 100


def test_evaluate_cli_with_a_reconstruction_method(reference, tmp_path):
    """evaluate.py --method qdrop reconstructs each block and records, per bit-width, each
    block's output error before and after, the settings and the wall time."""
    wd = tmp_path / "wd"
    shutil.copytree(reference, wd, ignore=shutil.ignore_patterns("checkpoints"))
    cmd = [sys.executable, "evaluate.py", f"--workdir={wd}", "--bits=w4a4", "--method=qdrop"]
    r = _run([*cmd, "--iters=2"])
    assert r.returncode == 0, r.stderr
    measured = json.loads((wd / "ptq_results.json").read_text())
    assert measured["settings"]["method"] == "qdrop" and measured["settings"]["iters"] == 2
    report = measured["reconstruction"]["w4a4"]
    assert report["method"] == "qdrop" and report["settings"]["drop_prob"] == 0.5
    assert [b["block"] for b in report["blocks"]][0] == "stem_conv" and report["time_s"] > 0
    assert all(b["loss_before"] >= 0 and b["loss_after"] >= 0 for b in report["blocks"])
    assert 0 <= measured["w4a4"] <= 100
