#!/usr/bin/env bash
# From the paper's form to the authors' recipe at W2A4, one key at a time (seed 0), on the
# table's budget (experiments/common.sh), in the workdir of experiments/fair_eval.sh, whose
# dnq_w2a4_s0 cell is the first row and whose warm-up the SWA rows begin from
# (dnq_jax/grid/fork.py):
#   dnq_w2a4   the paper's form (differential, lambda 1, the evaluation's quantizer)
#   naive      the form the authors' in-place code has in effect: W + lambda D_t
#   lam08      + lambda_max 0.8 (the authors' default)
#   symmetric  + the authors' profiler: symmetric max|W| grid, every layer at 2 bits
#   leftover   + one draw per epoch left in the stored weights
#   relu       + drop-in on ReLU-fed inputs only, the authors' error sign, 256 images
#   authors    + cosine to zero at the SWA start, then 0.01 x the peak (= method=authors)
#   uniform    the paper's form with uniform samples of the same mean and variance
# Each model is evaluated at FP32 and W2A4 with RTN and QDrop at ITERS iterations per block.
#
#   bash experiments/authors_path.sh        (PYTHON, WORKDIR, SEEDS, ITERS, PTQ, NAME, CELLS)
#
# PTQ=rtn trains and RTN-evaluates only (name the results apart, NAME=authors_path_rtn, as a
# grid includes only results of its own PTQ settings); the run with QDrop then reuses every
# trained cell. Results go to experiments/results/NAME.{md,json,png}; it resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
WORKDIR=${WORKDIR:-workdirs/dnq_table_fair}
NAME=${NAME:-authors_path}
W2A4="noise.w_bits=2,noise.a_bits=4,bits=w2a4"
declare -A CELL=(
  [dnq_w2a4]="method=dnq,$W2A4"
  [naive]="method=naive,$W2A4"
  [lam08]="method=naive,noise.lambda_max=0.8,$W2A4"
  [symmetric]="method=naive,noise.lambda_max=0.8,noise.w_quantizer=symmetric,$W2A4"
  [leftover]="method=naive,noise.lambda_max=0.8,noise.w_quantizer=symmetric,noise.leftover=True,$W2A4"
  [relu]="method=naive,noise.lambda_max=0.8,noise.w_quantizer=symmetric,noise.leftover=True,noise.act_sites=relu,noise.error_sign=authors,noise.n_calib=256,$W2A4"
  [authors]="method=authors,$W2A4"
  [uniform]="method=dnq,noise.dist=uniform,$W2A4"
)
ORDER="dnq_w2a4 naive lam08 symmetric leftover relu uniform authors"
# Its first row is the fair evaluation's dnq_w2a4_s0 (restored with its warm-up).
run_fair_grid "$NAME" "$WORKDIR" CELL "$ORDER" "${CELLS:-}" --config "$TABLE_CONFIG" \
  --seeds "${SEEDS:-0}" --ptq "${PTQ:-rtn,qdrop}" --ptq-iters "${ITERS:-5000}"
