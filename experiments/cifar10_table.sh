#!/usr/bin/env bash
# The paper's table on CIFAR-10 (the JPEG q75 file, data.name=cifar10_jpeg), for a GPU: SGD
# against DNQ with the noise modelled at each target, every model PTQ-evaluated at FP32 and its
# target(s) with RTN and QDrop at the fair iteration count (5,000 per block, where QDrop has
# stopped rising on both an SGD and a DNQ model at W2A4 and W4A4: experiments/results/
# qdrop_iters.md; on ResNet-8 W2A2 needed 10,000, docs/results.md);
# PTQ=rtn,adaround,brecq,qdrop adds the paper's other two reconstruction methods.
#
#   bash experiments/cifar10_table.sh                  (one grid per model in MODELS)
#   MODELS=resnet20 SEEDS=0 bash experiments/cifar10_table.sh
#   MODELS=resnet20 SEEDS=0 ROWS="sgd dnq_w2a4 authors_w2a4" RECON_BITS=w2a4 \
#     bash experiments/cifar10_table.sh
#                                      (the first slice: SGD, DNQ and the authors' recipe at
#                                      W2A4, QDrop at W2A4 only: three reconstructions)
#   MODELS=resnet20 SEEDS=0 ROWS="sgd dnq_w2a4 lam08_w2a4" RECON_BITS=w2a4 \
#     bash experiments/cifar10_table.sh
#                                      (SGD, DNQ as is and `method=lam08`, W2A4: the bigger
#                                      model of the Fashion-MNIST study; add lambda_half_w2a4
#                                      to ROWS for its three-seed lead)
#
# Environment: MODELS (resnet20 mobilenet_v2), SEEDS (0,1,2), PRESET (fast: the paper's
# protocol scaled to 40 epochs, noise from 20, SWA over the last 10; paper: 400 epochs, noise
# from 200, SWA from 300), PTQ (rtn,qdrop), PTQ_ITERS (5000 reconstruction iterations per
# block; the paper uses 20,000), ROWS (a subset of the rows below, by name), RECON_BITS (the
# bit-widths QDrop runs at, e.g. w2a4 for the W2A4 slice: SGD then gets RTN alone at W4A4 and
# W2A2, saving two of its three reconstructions; default: every cell's own), EXTRA (more
# config pairs, e.g. optim.batch_size=128), WORKDIR_ROOT (workdirs), PYTHON. The data file
# is found as configs/resnet.py says (runtime.npz_path, else DNQ_CIFAR10_JPEG, else
# ../shared/data/ beside the repository).
#
# Rows: ResNet-20 at W4A4, W2A4 and W2A2 (sgd evaluated at all three; one dnq cell and one authors
# cell, `method=authors`: the recipe of the paper's public code, docs/protocol.md, per target;
# naive_w2a4, `method=naive`: the weight noise the authors' code applies in effect; lam08_w2a4,
# `method=lam08`: the same at their lambda_max 0.8, the authors' path row closest to both bars;
# lambda_half_w2a4, `method=dnq,noise.lambda_max=0.5`: the paper's form with the noise held at half
# strength, the lead over three seeds); MobileNetV2 at W4A4 and W2A4 (the paper reports it at W4A4).
# The grid prints each cell's wall time as it finishes ("... done (N s)") and grid.md keeps it.
# Batch 64, lr 0.015 cosine, wd 1e-3, label smoothing 0.1 (the paper's; configs/resnet.py). With the
# shared warm-ups each DNQ cell trains only the noise stage, from the SGD cell's state at the noise
# start (the same run up to there; SWA starts later).
#
# Not timed on a GPU yet; a projection, to be replaced by the first GPU run's "done (N s)" lines.
# PRESET=fast trains SGD's 40 epochs, then 20 for each dnq/naive/lam08/lambda_half cell (from SGD's
# warm-up) and 40 + 20 + 20 for the three authors cells (their schedule differs from the start): 240
# epochs for the ten ResNet-20 rows of a seed. The first slice trains 100 (SGD 40, dnq_w2a4 20,
# authors_w2a4 40). Assuming a 781-step epoch at batch 64 takes about 2 s on one H100 (an
# assumption: the one GPU step measured, benchmarks/RESULTS.md, is 3.64 ms at batch 512 bf16 on an
# H200; at batch 64 a step is bound by its launches, not its arithmetic) and DNQ 1.2x that, the
# slice trains in about 4 minutes plus its compiles (about a minute), and its three QDrop
# reconstructions at 5,000 iterations per block must take under about 4 minutes together for the
# slice to fit 9: benchmarks/ptq_speed.py, run by benchmarks/gpu_checks.sh, prints the per-block
# time to check that first. PRESET=paper is ten times the training. MobileNetV2 is several times
# slower per epoch.
#
# The grids resume like every grid (run the same command again), and unfinished cells are
# parked for another machine with `python experiments/park.py save WORKDIR NAME` (NAME is
# cifar10_<model>; ResNet-20 checkpoints are a few MB, MobileNetV2's about 30 MB). Results are
# copied to experiments/results/cifar10_<model>.{md,json,png}; then experiments/train_fit.py
# measures each finished model on the training split too (cifar10_<model>_train_fit.{md,json}).
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
MODELS=${MODELS:-resnet20 mobilenet_v2}
SEEDS=${SEEDS:-0,1,2}
PRESET=${PRESET:-fast}
PTQ=${PTQ:-rtn,qdrop}
PTQ_ITERS=${PTQ_ITERS:-5000}
WORKDIR_ROOT=${WORKDIR_ROOT:-workdirs}
case "$PRESET" in
  fast) preset=fast ;;
  paper) preset="" ;;
  *) echo "PRESET must be fast or paper, not $PRESET" >&2; exit 2 ;;
esac

cells_for() {  # the --cell arguments of one model
  local noise=method=dnq
  case "$1" in
    resnet20)
      echo "--cell sgd:method=sgd,bits=w4a4+w2a4+w2a2"
      echo "--cell dnq_w4a4:$noise,noise.w_bits=4,noise.a_bits=4,bits=w4a4"
      echo "--cell dnq_w2a4:$noise,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      echo "--cell dnq_w2a2:$noise,noise.w_bits=2,noise.a_bits=2,bits=w2a2"
      echo "--cell authors_w4a4:method=authors,noise.w_bits=4,noise.a_bits=4,bits=w4a4"
      echo "--cell authors_w2a4:method=authors,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      echo "--cell authors_w2a2:method=authors,noise.w_bits=2,noise.a_bits=2,bits=w2a2"
      echo "--cell naive_w2a4:method=naive,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      echo "--cell lam08_w2a4:method=lam08,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      echo "--cell lambda_half_w2a4:$noise,noise.lambda_max=0.5,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      ;;
    mobilenet_v2)
      echo "--cell sgd:method=sgd,bits=w4a4+w2a4"
      echo "--cell dnq_w4a4:$noise,noise.w_bits=4,noise.a_bits=4,bits=w4a4"
      echo "--cell dnq_w2a4:$noise,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      echo "--cell authors_w4a4:method=authors,noise.w_bits=4,noise.a_bits=4,bits=w4a4"
      echo "--cell authors_w2a4:method=authors,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
      ;;
    *) echo "no table for model $1 (resnet20, mobilenet_v2)" >&2; return 2 ;;
  esac
}

status=0
for model in $MODELS; do
  cells=$(cells_for "$model") || exit 2
  if [ -n "${ROWS:-}" ]; then  # keep the rows named in ROWS
    cells=$(echo "$cells" | while read -r flag spec; do
      for row in $ROWS; do if [ "${spec%%:*}" = "$row" ]; then echo "$flag $spec"; fi; done
    done)
    [ -n "$cells" ] || { echo "ROWS=$ROWS names no row of $model" >&2; exit 2; }
  fi
  if [ -n "${RECON_BITS:-}" ]; then  # reconstruction at these bit-widths only
    cells=$(echo "$cells" | while read -r flag spec; do
      echo "$flag $spec,recon_bits=${RECON_BITS//,/+}"
    done)
  fi
  config_file=configs/resnet.py
  [ "$model" = mobilenet_v2 ] && config_file=configs/mobilenet.py
  pairs="${preset:+$preset,}model.name=$model,data.name=cifar10_jpeg,runtime.progress=False"
  pairs+="${EXTRA:+,$EXTRA}"
  # shellcheck disable=SC2086  # $cells is a list of words
  grid_status=0
  run_grid "cifar10_$model" "$WORKDIR_ROOT/cifar10_$model" --config "$config_file:$pairs" \
    --seeds "$SEEDS" --ptq "$PTQ" --ptq-iters "$PTQ_ITERS" $cells \
    || grid_status=$?
  if [ "$grid_status" = 0 ]; then  # each finished model's fit of its training split
    "$PYTHON" experiments/train_fit.py --workdir "$WORKDIR_ROOT/cifar10_$model" \
      --out "experiments/results/cifar10_${model}_train_fit.md" \
      --json "experiments/results/cifar10_${model}_train_fit.json" || grid_status=$?
  fi
  [ "$grid_status" = 0 ] || status=$grid_status
done
exit $status
