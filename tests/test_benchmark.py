"""benchmarks/train_speed.py runs end to end and prints what scripts read from it."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPT_0 = "--xla_backend_optimization_level=0"


@pytest.mark.slow
def test_train_speed_prints_every_row_and_ends_with_the_ratio():
    # A subprocess: the benchmark clears JAX's caches and turns the persistent cache off,
    # which must not reach the other tests. On CPU even where a GPU is present (the test
    # process holds the GPU's memory, and the epoch line differs there).
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "train_speed.py"),
        *("--model", "resnet8", "--num-train", "64", "--batch", "2"),
        *("--steps", "1", "--compile-repeats", "1", "--breakdown", "--epoch"),
    ]
    # The test reads what the script prints, not how fast it is: the smallest zoo model at
    # batch 2 (a 32-step epoch of 64 images), and XLA:CPU's backend optimization level 0,
    # below the suite's 1 (tests/conftest.py) and the default users run, which compiles the
    # run's programs (five steps, the profiler, the epoch's two chunks) about a third faster
    # and runs them slower.
    flags = re.sub(r"--xla_backend_optimization_level=\S*", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{flags} {OPT_0}".strip()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    number = r"\d+\.\d+"
    rows = {
        m.group(1): m
        for m in (
            re.match(r"(\S+)\s+(" + number + r")\s+\d+\s+(" + number + r")", ln) for ln in lines
        )
        if m
    }
    for name in ("plain", "dnq", "no-noise", "w-noise", "drop-in"):
        assert name in rows, out.stdout
        assert float(rows[name].group(2)) > 0 and float(rows[name].group(3)) > 0
    compile_ratio = re.search(r"^compile ratio dnq/plain: (" + number + ")$", out.stdout, re.M)
    assert compile_ratio, out.stdout
    want = float(rows["dnq"].group(3)) / float(rows["plain"].group(3))
    assert abs(float(compile_ratio.group(1)) - want) < 0.02  # from rounded times
    assert re.search(r"^profiler: .* = " + number + "% of a 32-step epoch$", out.stdout, re.M)
    assert re.search(r"^epoch \(dnq, 32 one-step calls\): ", out.stdout, re.M)
    last = re.fullmatch(r"ratio dnq/plain: (\d+\.\d\d)", lines[-1])
    assert last, lines[-1]
    want = float(rows["dnq"].group(2)) / float(rows["plain"].group(2))
    assert abs(float(last.group(1)) - want) < 0.01
