#!/usr/bin/env bash
# The ablations at W2A4 (one seed, marked so), on the budget and data of dnq_table.sh, whose
# sgd and dnq_w2a4 cells (seed 0) are the reference rows. Each cell changes one thing from
# dnq with the noise modelled at W2A4:
#   w_scale   the differential weight perturbation scaled by 1/sqrt(2), so its std equals
#             the modelled quantization error's (a fix the method allows: noise.w_scale)
#   w_scale_half  noise.w_scale=0.5: the perturbation's std sigma_w / sqrt(2), half the
#             paper's (how far does shrinking the weight noise alone buy FP32 back?)
#   lambda_half  the noise strength held at lambda = 0.5 after the ramp (noise.lambda_max)
#   swa       SWA alone, no noise            wqn  weight noise only (no SWA)
#   aqn       activation drop-in only (no SWA)
#   naive / accumulate                       the biased weight-noise forms
#   ramp_cosine / ramp_exp                   the other ramp shapes
#   calib16 / calib1024                      the profiler's calibration-set size
#             (noise.n_calib; 100 in dnq; the evaluation keeps quant.n_calib = 100)
#   bn_off    SWA's average evaluated with the BN statistics of the last step, not re-estimated
#   noise_early  the noise stage from epoch 4 instead of 8 (12 noise epochs, not 8): does a
#             longer stage let the model win back its FP32 accuracy under the noise?
# Each model is PTQ-evaluated at FP32 and W2A4 with RTN and QDrop at ITERS iterations per block.
#
#   bash experiments/dnq_ablations.sh        (PYTHON=..., CELLS="w_scale swa",
#                                             SEEDS=0,1,2 for more seeds than seed 0)
#   ITERS=200 NAME=dnq_ablations WORKDIR=workdirs/dnq_ablations bash experiments/dnq_ablations.sh
#                                            (the first measurement, QDrop at 200 iterations)
#
# ITERS defaults to 5,000, the count where QDrop has stopped rising on both the SGD and the
# DNQ model (experiments/results/qdrop_iters.md), with NAME=dnq_ablations_fair in the workdir
# of experiments/fair_table.sh (WORKDIR=workdirs/dnq_table_fair), whose dnq_w2a4_s0 warm-up
# the cells begin from and whose naive cell is this grid's naive cell. The results at 200
# iterations stay in experiments/results/dnq_ablations.*. It resumes like every grid: run the
# same command again to continue. Cells run in the order above; CELLS picks a subset. Results
# are copied to experiments/results/NAME.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
WORKDIR=${WORKDIR:-workdirs/dnq_table_fair}
NAME=${NAME:-dnq_ablations_fair}
W2A4="noise.w_bits=2,noise.a_bits=4,bits=w2a4"
declare -A CELL=(
  [w_scale]="method=dnq,noise.w_scale=0.7071,$W2A4"
  [w_scale_half]="method=dnq,noise.w_scale=0.5,$W2A4"
  [lambda_half]="method=dnq,noise.lambda_max=0.5,$W2A4"
  [swa]="method=swa,$W2A4"
  [wqn]="method=wqn,$W2A4"
  [aqn]="method=aqn,$W2A4"
  [naive]="method=naive,$W2A4"
  [accumulate]="method=accumulate,$W2A4"
  [ramp_cosine]="method=dnq,noise.ramp=cosine,$W2A4"
  [ramp_exp]="method=dnq,noise.ramp=exp,$W2A4"
  [calib16]="method=dnq,noise.n_calib=16,$W2A4"
  [calib1024]="method=dnq,noise.n_calib=1024,$W2A4"
  [noise_early]="method=dnq,noise.start_epoch=4,$W2A4"
  [bn_off]="method=dnq,swa.bn_recalibration=False,$W2A4"
)
# The cells with SWA begin from the seed's warm-up (epochs 0-7) kept by the workdir's
# dnq_w2a4 cell (dnq_jax/grid/fork.py; in a workdir without one, the first such cell trains
# it), and so do wqn and aqn (without SWA: its optimizer state is taken off); noise_early,
# whose noise starts elsewhere, trains its own.
ORDER="w_scale lambda_half swa wqn aqn naive accumulate ramp_cosine ramp_exp calib16 calib1024"
ORDER+=" bn_off noise_early w_scale_half"
run_fair_grid "$NAME" "$WORKDIR" CELL "$ORDER" "${CELLS:-}" --config "$TABLE_CONFIG" \
  --seeds "${SEEDS:-0}" --ptq rtn,qdrop --ptq-iters "${ITERS:-5000}"
