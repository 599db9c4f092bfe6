"""Test-wide setup: 8 fake CPU devices, a persistent compilation cache, and the finished
smoke run that several test modules read."""

import fcntl
import json
import os
import tempfile

# The suite is compile-bound (tiny models, few steps): XLA:CPU's backend optimization level
# 1 instead of the default compiles faster for code that runs about as fast here (level 0
# compiles faster still but runs a scanned epoch several times slower). Set before the CPU
# backend is created; the tests' subprocesses inherit it, so runs compared bit for bit are
# built alike. The library and the benchmarks run with XLA's defaults.
OPT_FLAG = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + OPT_FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Must run before the CPU backend is created; it does not affect a GPU/TPU backend.
jax.config.update("jax_num_cpu_devices", 8)

# The trainer tests build the same jitted functions several times; a disk cache turns the
# repeated XLA compiles into loads. From 0.1 s of compile time: a smoke run has a handful of
# programs that compile in 0.2-0.4 s (about 2.5 s of every run when only programs of 0.5 s
# and more are kept), while keeping the many tiny eager operations too (a threshold of 0)
# writes a hundred files a run for no gain. The suite took 611 s at 0.5 and 421 s at 0.1
# (pytest, cold cache, 2 cores).
_cache = os.environ.get(
    "DNQ_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "dnq_jax_test_cache")
)
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The smoke run's settings: 5 epochs of 4 steps (warm-up, noise from epoch 1, SWA from
# epoch 2; DNQ, noise modelled at W2A4), a checkpoint per epoch, all kept. Learning rate
# 0.01: small enough that float reassociation in a sharded run stays at rounding level over
# its 20 steps, so the same run on 8 devices can be compared with it
# (test_train.py::test_eight_devices_match_one_device).
SMOKE_RUN = (
    "optim.num_epochs=5,optim.learning_rate=0.01,runtime.keep_checkpoints=10,"
    "runtime.num_devices=1,runtime.progress=False"
)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(workdir, results) of one finished smoke run, trained once per test session, even
    when pytest-xdist runs the session in several workers: the first worker to ask trains it
    into the workers' shared temporary folder (holding a file lock) and the others read it.
    `results` is what `train_and_evaluate` returned (saved beside the run for the other
    workers). Read it, or copy it before writing: every test that asks for it sees the same
    folder."""
    from configs import resnet
    from dnq_jax.train.loop import train_and_evaluate

    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist each worker's base folder sits in one shared by all the workers.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    wd, returned = root / "smoke_run", root / "smoke_run_returned.json"
    with open(root / "smoke_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not returned.exists():
            results = train_and_evaluate(resnet.get_config("smoke," + SMOKE_RUN), str(wd))
            returned.write_text(json.dumps(results))
    return wd, json.loads(returned.read_text())
