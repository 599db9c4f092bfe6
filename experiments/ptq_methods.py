"""RTN, AdaRound, BRECQ and QDrop on one trained model: top-1 at FP32, W4A4, W2A4, W2A2.

  python experiments/ptq_methods.py --workdir workdirs/r20_fmnist_sgd --iters 200 \
      --out experiments/results/ptq_methods

Loads the final variables of a finished training run, quantizes them with every method at
each bit-width (the same calibration images for all: `--n-calib` seeded training images),
and writes a markdown table (top-1 on the full test split, each method's wall time and
iteration count) and a JSON file with each block's output error before and after. Prints the
exact command, the device and the wall time. Resumes: finished (method, bits) cells found in
the JSON are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dnq_jax import data, ptq  # noqa: E402
from dnq_jax.train import evaluate as train_eval  # noqa: E402

BITS = ((4, 4), (2, 4), (2, 2))
METHODS = ("rtn", "adaround", "brecq", "qdrop")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a finished training run")
    p.add_argument("--iters", type=int, default=200, help="iterations per block")
    p.add_argument("--n-calib", type=int, default=1024)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="experiments/results/ptq_methods")
    args = p.parse_args(argv)
    t_start = time.time()
    dev = jax.devices()[0]
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    print(f"command: {command}\ndevice: {dev.platform} ({dev.device_kind}), jax {jax.__version__}")

    _, model, variables, ds = train_eval.load_run(args.workdir)
    apply_kwargs = {"train": False}
    test_x = np.asarray(data.normalize(ds.test_images, ds.mean, ds.std))
    calib = data.calibration_subset(ds, args.n_calib, 0)
    calib_x = np.asarray(data.normalize(calib, ds.mean, ds.std))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("cells", {})
    fp = ptq.accuracy(ptq.fp32(model, variables, apply_kwargs), test_x, ds.test_labels)
    results.update(fp32=fp, workdir=args.workdir, n_calib=args.n_calib, iters=args.iters)
    for method in args.methods.split(","):
        for wb, ab in BITS:
            cell = f"{method}/w{wb}a{ab}"
            if cell in results["cells"]:
                continue
            t0 = time.time()
            recon = None if method == "rtn" else {"iters": args.iters, "progress": True}
            spec = ptq.QuantSpec(w_bits=wb, a_bits=ab)
            qm = ptq.quantize(
                model,
                variables,
                calib_x,
                spec,
                method=method,
                recon=recon,
                apply_kwargs=apply_kwargs,
            )
            acc = ptq.accuracy(qm, test_x, ds.test_labels)
            results["cells"][cell] = {
                "top1": acc,
                "time_s": round(time.time() - t0, 1),
                "report": qm.report,
            }
            print(f"{cell}: {acc:.2f} ({time.time() - t0:.0f} s)", flush=True)
            path.write_text(json.dumps(results, indent=1, default=float))
    lines = [
        f"Top-1 (%) on the full test split; {args.n_calib} calibration images, "
        f"{args.iters} iterations per block (the papers: 20,000).",
        "",
        "| method | FP32 | W4A4 | W2A4 | W2A2 | wall time (s, all three) |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        cells = [results["cells"].get(f"{method}/w{wb}a{ab}") for wb, ab in BITS]
        accs = " | ".join(f"{c['top1']:.2f}" if c else "-" for c in cells)
        wall = sum(c["time_s"] for c in cells if c)
        lines.append(f"| {method} | {fp:.2f} | {accs} | {wall:.0f} |")
    lines += ["", f"command: `{command}`", f"device: {dev.platform} ({dev.device_kind})",
              f"wall time of this invocation: {time.time() - t_start:.0f} s"]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
