"""The command lines, on top of the package (nothing imports them).

- `dnq_jax.cli.train`: `train.py` / `dnq-train` and `evaluate.py` / `dnq-evaluate`
  (`--report`, `--export`);
- `dnq_jax.cli.grid`: `dnq-grid` (`python -m dnq_jax.cli.grid`), `dnq-demo` (`make demo`)
  and `experiments/park.py`;
- `dnq_jax.cli.common`: what they share (absl flags, one-paragraph errors, exit codes, the
  multi-host flags).
"""
