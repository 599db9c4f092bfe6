"""Images per second of the stream's host pipeline, next to what a training step consumes.

  python benchmarks/input_speed.py                         # the RESULTS.md table
  python benchmarks/input_speed.py --workers 0,4,8 --sources 500x375 --no-steps

The pipeline is the trainer's (`dnq_jax.data.Stream.batches` on an image folder of JPEGs
made here): read, decode, random-resized crop + flip (the ImageNet recipe) at the model's
size, batch, with 0 worker processes (two threads of this process), 1 or 2; its figure
leaves out the workers' start (printed apart: once per epoch in the trainer). Sources:
64x64 JPEGs (Tiny-ImageNet) at 64, 224x224 at 224, and 500x375 (an ImageNet photo's usual
size) at 224. The step is the trainer's train step (`make_train_step`, noise off, fed a
streamed batch) of ResNet-18 and ResNet-50 in their ImageNet form at 224 on this machine's
CPU, timed after compiling. The last lines say how many host cores one step's consumption
needs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def make_jpegs(root: Path, n: int, w: int, h: int) -> None:
    """`n` JPEGs (quality 90) of smooth random content, about as compressible as photos."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noise = rng.integers(-12, 13, (h, w, 3))
        pixels = np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i:05d}.jpg", quality=90)
    (root / "val" / "c0").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h)).save(root / "val" / "c0" / "0.jpg")


def pipeline_speed(folder: Path, size: int, workers: int, batch: int) -> tuple[float, float]:
    """(images/s, seconds to the first batch) of one pass; the rate leaves out the first
    batch of each worker (their start) and counts the rest."""
    from dnq_jax import data

    stream = data.open_stream("folder", image_folder=str(folder), image_size=size, workers=workers)
    n = stream.num_train // batch * batch
    rows = np.random.default_rng(0).permutation(stream.num_train)[:n].reshape(-1, batch)
    t0 = time.perf_counter()
    it = stream.batches("train", rows, seed=(0, 0))
    next(it)
    first = time.perf_counter() - t0
    for _ in range(max(workers, 1) - 1):
        next(it)
    t1 = time.perf_counter()
    count = sum(len(labels) for _, labels in it)
    return count / (time.perf_counter() - t1), first


def cpu_per_image(folder: Path, size: int, count: int = 200) -> float:
    """CPU seconds one image of the training transform takes in this process (read, decode,
    crop, resize, flip), by the process clock: what one worker core spends, however loaded
    the machine is."""
    from dnq_jax import data

    stream = data.open_stream("folder", image_folder=str(folder), image_size=size)
    count = min(count, stream.num_train)
    examples = stream._examples("train", np.arange(count)[None, :], seed=(0, 0))
    examples[0]  # noqa: B018 (imports, first file open)
    t0 = time.process_time()
    for j in range(count):
        examples[j]  # noqa: B018
    return (time.process_time() - t0) / count


def step_speed(name: str, batch: int, steps: int, dtype: str) -> tuple[float, float]:
    """(images/s, compile s) of the trainer's step (noise off) of model `name` at 224."""
    import jax
    import jax.numpy as jnp

    from dnq_jax import models, taps
    from dnq_jax.train import optim
    from dnq_jax.train.state import create_train_state
    from dnq_jax.train.step import StepSettings, make_chunk_fn, make_train_step

    model = models.create(name, num_classes=1000, dtype=jnp.dtype(dtype))
    x = jnp.zeros((1, 224, 224, 3))
    variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(0))
    graph = taps.trace(model, variables, jnp.zeros((2, 224, 224, 3)), train=False)
    tx = optim.make_optimizer(learning_rate=0.1, total_steps=1000, steps_per_epoch=100)
    state = create_train_state(0, variables, graph, tx)
    mean, std = jnp.full(3, 0.45), jnp.full(3, 0.25)
    step = make_train_step(model, graph, tx, StepSettings(), mean, std, jnp.dtype(dtype))
    chunk = make_chunk_fn(step, scan=False, streamed=True)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (1, batch, 224, 224, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 1000, (1, batch)), jnp.int32)
    t0 = time.perf_counter()
    compiled = chunk.lower(state, images, labels, jnp.float32(0), False).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, images, labels, jnp.float32(0))  # one untimed step
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, images, labels, jnp.float32(0))
    jax.block_until_ready(m)
    return batch * steps / (time.perf_counter() - t0), compile_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="JPEGs per source size")
    p.add_argument("--batch", type=int, default=32, help="pipeline batch")
    p.add_argument("--workers", default="0,1,2", help="worker counts to time")
    p.add_argument("--sources", default="64,224,500x375", help="JPEG sizes (side or WxH)")
    p.add_argument("--models", default="resnet18_imagenet,resnet50_imagenet")
    p.add_argument("--step-batch", type=int, default=16, help="batch of the timed steps")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model")
    p.add_argument("--dtype", default="float32", help="compute dtype of the steps")
    p.add_argument("--no-steps", action="store_true", help="time the pipeline only")
    a = p.parse_args()
    print(f"{os.cpu_count()} CPU cores; batch {a.batch}; {a.images} JPEGs per source")
    print("source     -> size  workers      img/s  first batch s")
    per_core = {}
    with tempfile.TemporaryDirectory() as tmp:
        for source in a.sources.split(","):
            w, _, h = source.partition("x")
            w, h = int(w), int(h or w)
            size = 64 if max(w, h) <= 64 else 224
            folder = Path(tmp) / source
            make_jpegs(folder, a.images, w, h)
            for workers in (int(n) for n in a.workers.split(",")):
                rate, first = pipeline_speed(folder, size, workers, a.batch)
                print(f"{source:<10} -> {size:<4}  {workers:>7}  {rate:>9.1f}  {first:>13.2f}")
            per_core[source] = 1 / cpu_per_image(folder, size)
            ms = 1000 / per_core[source]
            print(f"{source:<10} -> {size:<4}  one core: {ms:.2f} CPU ms an image = "
                  f"{per_core[source]:.0f} img/s")  # fmt: skip
    if a.no_steps:
        return
    import jax

    device = jax.devices()[0]
    where = f"{device.device_kind} ({device.platform})"
    print(f"train step at 224, batch {a.step_batch}, {a.dtype}, on {where}")
    print("model                  img/s  compile s")
    consumed = {}
    for name in a.models.split(","):
        rate, compile_s = step_speed(name, a.step_batch, a.steps, a.dtype)
        consumed[name] = rate
        print(f"{name:<20} {rate:>7.1f}  {compile_s:>9.1f}")
    for name, rate in consumed.items():
        for source, core_rate in per_core.items():
            if not source.startswith("64"):
                need = rate / core_rate
                print(f"{name} on this {device.platform}: {need:.3f} core(s) of {source} JPEGs")
    print(
        "H100: no measured GPU step of ResNet-18/50 at 224 yet; host cores per GPU = its "
        "step's img/s / one core's img/s above"
    )


if __name__ == "__main__":
    main()
