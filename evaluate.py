"""PTQ-evaluate a finished run: FP32 and each W/A bit-width on the full test split.

  python evaluate.py --workdir workdirs/r20_dnq --bits w4a4,w2a4,w2a2 --method rtn
  python evaluate.py --workdir workdirs/r20_dnq --bits w4a4 --export workdirs/r20_dnq/deploy

The same command is installed as `dnq-evaluate`. Prints a table and writes
WORKDIR/ptq_results.json ({"fp32": top1, "w4a4": top1, ..., "settings": {...}}). The model
and data come from WORKDIR/config.json. --export DIR also writes each quantized model as
StableHLO and ONNX files and checks their top-1 (docs/deploy.md).
"""

from dnq_jax.cli.train import evaluate_main

if __name__ == "__main__":
    evaluate_main()
