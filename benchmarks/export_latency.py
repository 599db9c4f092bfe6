"""onnxruntime latency of an exported quantized model next to the float model's.

For a zoo model (default the demo's ResNet-8 on 28x28x1 Fashion-MNIST-shaped inputs), writes
the float32 graph (BatchNorm folded, the same translation without Q/DQ) and the RTN QDQ graphs
at each bit-width, then times one batch (default 256) in onnxruntime, best of `--repeats`.
Latency does not depend on the weights' values, so a fresh model serves unless `--workdir`
names a run whose final variables to use. Prints one row per graph (size, best and median ms,
ratio to float).

    python benchmarks/export_latency.py                        # ResNet-8, W8A8 W4A4 W2A4
    python benchmarks/export_latency.py --model resnet20 --image 32,32,3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import dnq_jax.ptq
from dnq_jax import models
from dnq_jax.ptq import QuantSpec, export_onnx, fold
from dnq_jax.ptq.export import onnx_model


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time(path: Path, images: np.ndarray, threads: int, repeats: int) -> list[float]:
    sess = _session(path, threads)
    sess.run(None, {"images": images})  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"images": images})
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _float_graph(model, variables, calib, path: Path) -> None:
    folded, pairs = fold.fold_batchnorm(model, variables, calib[:2], train=False)
    fn = lambda x: fold.apply_folded(model, folded, pairs, x, train=False)
    graph, _ = export_onnx.to_graph(fn, tuple(calib.shape[1:]), lambda kernel: None)
    path.write_bytes(onnx_model(graph, "float32, BatchNorm folded").SerializeToString())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet8")
    p.add_argument("--image", default="28,28,1", help="input shape without the batch axis")
    p.add_argument("--bits", default="w8a8,w4a4,w2a4")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="a run whose final variables to export")
    args = p.parse_args()
    image = tuple(int(s) for s in args.image.split(","))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, *image)).astype(np.float32)
    if args.workdir:
        from dnq_jax.train.evaluate import load_run

        _, model, variables, _ = load_run(args.workdir)
    else:
        model = models.create(args.model, num_classes=10)
        variables = model.init(jax.random.key(0), images[:1], train=False)
    calib = images[:64]
    out = Path(tempfile.mkdtemp(prefix="latency_"))
    rows = [("float32", out / "float.onnx")]
    _float_graph(model, variables, calib, rows[0][1])
    for name in args.bits.split(","):
        w, a = (int(s) for s in name.strip().lower().lstrip("w").split("a"))
        qm = dnq_jax.ptq.quantize(model, variables, calib, QuantSpec(w_bits=w, a_bits=a))
        rows.append((name, out / f"{name}.onnx"))
        qm.export(rows[-1][1], format="onnx")
    print(f"{args.model} {image}, batch {args.batch}, {args.threads} onnxruntime threads, ")
    print(f"best and median of {args.repeats} runs")
    print("| graph | file | best ms | median ms | best / float |")
    print("|---|---|---|---|---|")
    base = None
    for name, path in rows:
        times = _time(path, images, args.threads, args.repeats)
        best = min(times)
        base = base or best
        size = f"{path.stat().st_size / 1000:.1f} kB"
        median = statistics.median(times)
        print(f"| {name} | {size} | {best:.1f} | {median:.1f} | {best / base:.2f} |")


if __name__ == "__main__":
    main()
