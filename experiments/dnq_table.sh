#!/usr/bin/env bash
# SGD vs DNQ with the noise modelled at each evaluated target (W4A4, W2A4, W2A2), seeds
# 0, 1, 2, on Fashion-MNIST with ResNet-8; each model PTQ-evaluated at FP32 and its target(s)
# with RTN and with QDrop (200 iterations per block; the papers use 20,000).
#
#   bash experiments/dnq_table.sh            (PYTHON=..., WORKDIR=..., SEEDS=... to change)
#
# 16 epochs of 468 steps (batch 128, lr 0.1 cosine, wd 5e-4, label smoothing 0.1): clean for
# epochs 0-7, noise from epoch 8 with lambda ramped over 3 epochs, SWA over epochs 12-15 and
# BatchNorm re-estimated after it (the paper's proportions: half clean, SWA over the last
# quarter). The grid resumes: run the same command again to continue; cells run seed by seed,
# and the table below is rewritten after each finished cell. The results are copied to
# experiments/results/dnq_table.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORKDIR=${WORKDIR:-workdirs/dnq_table}
SEEDS=${SEEDS:-0,1,2}
CONFIG="configs/resnet.py:model.name=resnet8,data.name=fashion_mnist,optim.batch_size=128"
CONFIG+=",optim.learning_rate=0.1,optim.weight_decay=5e-4,optim.num_epochs=16"
CONFIG+=",noise.start_epoch=8,noise.ramp_epochs=3,swa.start_epoch=12"
CONFIG+=",eval.every_epochs=2,eval.batch_size=1000,runtime.ckpt_every_epochs=1"
CONFIG+=",runtime.progress=False"
ARGS=(
  --config "$CONFIG" --workdir "$WORKDIR" --seeds "$SEEDS" --ptq rtn,qdrop --ptq-iters 200
  --cell "sgd:method=sgd,bits=w4a4+w2a4+w2a2"
  --cell "dnq_w4a4:method=dnq,noise.w_bits=4,noise.a_bits=4,bits=w4a4"
  --cell "dnq_w2a4:method=dnq,noise.w_bits=2,noise.a_bits=4,bits=w2a4"
  --cell "dnq_w2a2:method=dnq,noise.w_bits=2,noise.a_bits=2,bits=w2a2"
)
echo "command: $PYTHON -m dnq_jax.train.grid ${ARGS[*]}"
echo "started: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPU cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
SECONDS=0
status=0
"$PYTHON" -m dnq_jax.train.grid "${ARGS[@]}" || status=$?
echo "wall time of this invocation: ${SECONDS} s (exit status $status)"
if [ -f "$WORKDIR/grid.md" ]; then
  mkdir -p experiments/results
  cp "$WORKDIR/grid.md" experiments/results/dnq_table.md
  cp "$WORKDIR/grid.json" experiments/results/dnq_table.json
  if [ -f "$WORKDIR/grid.png" ]; then cp "$WORKDIR/grid.png" experiments/results/dnq_table.png; fi
fi
exit $status
