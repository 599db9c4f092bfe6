"""How large was each run's weight noise, against the error the evaluation's quantizer makes?

For each finished cell of a grid workdir: the run's own profiler (its `noise.*` keys) measures
the error statistics on the final weights, one weight perturbation is drawn as the forward
pass would see it at the end of the ramp (lambda_max x w_scale, the run's noise form and law),
and its std per kernel is divided by the std of the evaluation quantizer's real error on the
same kernel (`eval` bits, asymmetric per channel, ends at 8 bits). Both are measured on the
unfolded kernels (per-channel quantization is scale-equivariant per channel, so folding BN
scales both alike). Prints a table; `--json` writes the numbers.

  python experiments/noise_size.py --workdir workdirs/dnq_table_fair \
      --cells dnq_w2a4_s0,naive_s0 --bits w2a4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnq_jax import taps  # noqa: E402
from dnq_jax.dnq import noise  # noqa: E402
from dnq_jax.ptq import calibration  # noqa: E402
from dnq_jax.train import builders, evaluate  # noqa: E402
from dnq_jax.train import config as config_lib  # noqa: E402


def noise_to_error(cell: Path, w_bits: int, a_bits: int) -> dict:
    """Per-kernel std of the run's weight perturbation over the evaluation's weight error."""
    c, model, variables, ds = evaluate.load_run(str(cell))
    calib = builders.profiler_images(c, ds)
    graph = taps.trace(model, variables, jnp.zeros((2, *ds.image_shape)), train=False)
    n = c.noise
    stats = jax.jit(builders.create_profiler(c, model, graph))(variables, jnp.asarray(calib))
    params = variables["params"]
    lam = n.lambda_max * n.w_scale
    key_t, key_prev = noise.step_keys(jax.random.key(0), 1)
    mode = n.weight if n.weight in ("differential", "naive") else None
    seen = params
    if mode is not None:
        seen = noise.weight_noise(
            params, graph, stats, key_t, key_prev, lam, mode=mode, dist=n.dist
        )
    bits = calibration.assign_bits(graph, w_bits, a_bits, c.quant.keep_ends_8bit)
    rows = []
    for layer in graph.kernel_layers():
        w = np.asarray(taps.get_kernel(params, layer), np.float64)
        pert = np.asarray(taps.get_kernel(seen, layer), np.float64) - w
        q = np.asarray(
            calibration.quantize_kernel(jnp.asarray(w, jnp.float32), bits[layer.name][0])
        )
        err = q.astype(np.float64) - w
        rows.append(
            {
                "layer": layer.name,
                "w_bits": bits[layer.name][0],
                "noise_std": float(pert.std()),
                "noise_mean": float(pert.mean()),
                "error_std": float(err.std()),
                "ratio": float(pert.std() / max(err.std(), 1e-12)),
            }
        )
    low = [r["ratio"] for r in rows if r["w_bits"] == w_bits]
    return {
        "cell": cell.name,
        "method": config_lib.method_name(c),
        "lambda_max": n.lambda_max,
        "mean_ratio": float(np.mean([r["ratio"] for r in rows])),
        "mean_ratio_low_bit_layers": float(np.mean(low)) if low else None,
        "layers": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--cells", required=True, help="finished cells, comma-separated")
    p.add_argument("--bits", default="w2a4", help="the evaluation's bit-width")
    p.add_argument("--json", default="", help="write the numbers here")
    a = p.parse_args(argv)
    (wb, ab), *_ = config_lib.parse_bits(a.bits)
    out = []
    print(f"{'cell':<16} {'method':<10} {'all layers':>10} {f'{wb}-bit layers':>12}")
    for name in [s.strip() for s in a.cells.split(",") if s.strip()]:
        r = noise_to_error(Path(a.workdir) / "cells" / name, wb, ab)
        out.append(r)
        low = r["mean_ratio_low_bit_layers"]
        low_text = f"{low:>12.3f}" if low is not None else f"{'':>12}"
        print(f"{name:<16} {r['method']:<10} {r['mean_ratio']:>10.3f} {low_text}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
