"""The stream with several processes: two processes of 2 CPU devices each (gloo collectives
on 127.0.0.1), each reading its half of every batch from an image folder through a Grain
worker process, against one process of 4 devices reading everything in-process; the
two-process run is SIGKILLed (one process) in the middle of an epoch and both restarted.

Run by `make test-multiprocess` beside tests/test_multihost.py, whose helpers it uses.
"""

import json
import re
import time

import jax
import numpy as np
import pytest
from PIL import Image
from test_multihost import _final_params, _finish, _start, _steps, same_curves

pytestmark = pytest.mark.multiprocess

# 3 epochs of 4 steps of 32 (warm-up, noise from epoch 1, SWA from epoch 2), a checkpoint
# per epoch; the FP32 test accuracy at the end; no PTQ.
SMOKE = (
    "smoke,optim.num_epochs=3,eval.every_epochs=3,eval.bits=,runtime.progress=False,"
    "data.name=folder,data.image_size=16,data.augment=crop_flip,runtime.data_source=stream"
)


def _folder(root):
    """10 classes of 16x16 PNGs: a class template plus noise (learnable, like `synthetic`)."""
    rng = np.random.default_rng(0)
    templates = rng.normal(size=(10, 16, 16, 3))
    for split, n in (("train", 256), ("val", 64)):
        for i in range(n):
            label = int(rng.integers(10))
            x = 128 + 50 * templates[label] + 40 * rng.normal(size=(16, 16, 3))
            (root / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(
                root / split / f"c{label}" / f"{i:04d}.png"
            )
    return root


def _train(workdir, folder, processes: int, devices: int, workers: int):
    more = f",runtime.image_folder={folder},runtime.data_workers={workers}"
    args = ["train.py", f"--config=configs/resnet.py:{SMOKE}{more}", f"--workdir={workdir}"]
    return _start(args, processes, devices)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process x 4 devices (no worker processes) and, alongside, two processes x 2
    devices (one Grain worker each), the latter SIGKILLed (process 1) once the first
    checkpoint is written, in the next epoch, then both restarted."""
    base = tmp_path_factory.mktemp("stream_multihost")
    folder = _folder(base / "folder")
    one, two = base / "one", base / "two"
    t0 = time.time()
    one_train = _train(one, folder, 1, 4, workers=0)
    victim = _train(two, folder, 2, 2, workers=1)
    while not _steps(two):
        assert all(p.poll() is None for p in victim), [p.communicate() for p in victim]
        assert time.time() - t0 < 300, "no checkpoint within 300 s"
        time.sleep(0.02)
    killed_at = max(_steps(two))
    victim[1].kill()  # SIGKILL, in the epoch after the checkpoint
    try:
        victim[0].wait(timeout=1)
    except Exception:
        victim[0].kill()
    first = [p.communicate() for p in victim]
    resumed = _train(two, folder, 2, 2, workers=1)
    out = {"one": (one, _finish(one_train)), "two": (two, _finish(resumed))}
    out["killed_at"], out["first"] = killed_at, first
    print(f"stream multihost runs: all done at {time.time() - t0:.1f} s")
    return out


def test_two_streaming_processes_killed_and_resumed_give_the_one_process_result(runs):
    (one, _), (two, _) = runs["one"], runs["two"]
    same_curves(one, two)
    r1, r2 = (json.loads((w / "results.json").read_text()) for w in (one, two))
    assert (r2["fp32"], r2["steps"]) == (r1["fp32"], r1["steps"]) == (r1["fp32"], 12)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        _final_params(two),
        _final_params(one),
    )


def test_each_process_reads_its_half_and_says_so(runs):
    (_, outs), first = runs["two"], runs["first"]
    assert "streamed, 1 worker(s)" in first[0][0]
    assert "each of 2 process(es) reading 16 of every batch" in first[0][0]
    assert "dnq_jax:" not in first[1][0]  # process 1 prints nothing
    found = re.search(r"resumed from step (\d+)", outs[0][0])
    assert found is not None and int(found.group(1)) == runs["killed_at"] == 4
