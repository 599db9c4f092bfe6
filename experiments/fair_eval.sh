#!/usr/bin/env bash
# A fair evaluation: QDrop's top-1 against its iteration count per block (200 ... 5,000) for
# the SGD and DNQ (noise at W2A4) models of seed 0 of the table, at W2A4 and W4A4.
#
#   bash experiments/fair_eval.sh           (PYTHON=..., WORKDIR=..., ITERS=... to change)
#
# First the two models are trained on the table's budget (experiments/common.sh) in the
# table's own cell names (sgd_s0, dnq_w2a4_s0), RTN-evaluated only, so that the table re-run
# at the chosen count reuses them; then experiments/qdrop_iters.py measures the curves into
# experiments/results/qdrop_iters.{json,md,png}. Both steps resume: run it again to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
source experiments/common.sh
WORKDIR=${WORKDIR:-workdirs/dnq_table_fair}
ITERS=${ITERS:-200,500,1000,2000,5000}
"$PYTHON" experiments/park.py restore "$WORKDIR" dnq_table_fair
echo "started: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPU cores"
SECONDS=0
"$PYTHON" -m dnq_jax.cli.grid --workdir "$WORKDIR" --config "$TABLE_CONFIG" --seeds 0 \
  --ptq rtn \
  --cell "sgd:method=sgd,bits=w4a4+w2a4+w2a2" \
  --cell "dnq_w2a4:method=dnq,noise.w_bits=2,noise.a_bits=4,bits=w4a4+w2a4"
echo "trained in ${SECONDS} s"
"$PYTHON" experiments/qdrop_iters.py --workdir "$WORKDIR" --cells sgd_s0,dnq_w2a4_s0 \
  --bits w2a4,w4a4 --iters "$ITERS"
echo "wall time: ${SECONDS} s"
