# Sourced by the experiment scripts: the table's training budget and one grid invocation that
# prints its command, start and wall time, then copies the grid's tables and bars.
PYTHON=${PYTHON:-python}

# ResNet-8 on Fashion-MNIST, 16 epochs of 468 steps (batch 128, lr 0.1 cosine, wd 5e-4):
# clean for epochs 0-7, noise from epoch 8 with lambda ramped over 3 epochs, SWA over epochs
# 12-15 and BatchNorm re-estimated after it.
TABLE_CONFIG="configs/resnet.py:model.name=resnet8,data.name=fashion_mnist,optim.batch_size=128"
TABLE_CONFIG+=",optim.learning_rate=0.1,optim.weight_decay=5e-4,optim.num_epochs=16"
TABLE_CONFIG+=",noise.start_epoch=8,noise.ramp_epochs=3,swa.start_epoch=12"
TABLE_CONFIG+=",eval.every_epochs=2,eval.batch_size=1000,runtime.ckpt_every_epochs=1"
TABLE_CONFIG+=",runtime.progress=False"

# run_grid NAME WORKDIR GRID_ARGS...: runs the grid, then copies WORKDIR/grid.{md,json,png}
# to experiments/results/NAME.*; returns the grid's exit status. The committed
# experiments/results/NAME.json is included (--include): cells finished in an earlier sitting,
# whose folders may be gone (another machine, a fresh clone), are not run again, and cells
# parked under experiments/parked/NAME/ resume where they stopped.
run_grid() {
  local name=$1 workdir=$2
  shift 2
  if [ -f "experiments/results/$name.json" ]; then
    set -- "$@" --include "experiments/results/$name.json"
  fi
  # Cells an earlier sitting left unfinished resume from their parked checkpoints
  # (`$PYTHON experiments/park.py save $workdir $name` packs them; commit experiments/parked/).
  "$PYTHON" experiments/park.py restore "$workdir" "$name"
  echo "command: $PYTHON -m dnq_jax.cli.grid --workdir $workdir $*"
  echo "started: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPU cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
  SECONDS=0
  local status=0
  "$PYTHON" -m dnq_jax.cli.grid --workdir "$workdir" "$@" || status=$?
  echo "wall time of this invocation: ${SECONDS} s (exit status $status)"
  mkdir -p experiments/results
  local ext
  for ext in md json png; do
    if [ -f "$workdir/grid.$ext" ]; then cp "$workdir/grid.$ext" "experiments/results/$name.$ext"; fi
  done
  return $status
}

# run_fair_grid NAME WORKDIR CELLS_ARRAY "ORDER" "PICKED" GRID_ARGS...: the grid of the named
# cells (PICKED, a subset of ORDER, or all of ORDER when empty; each CELLS_ARRAY[name] holds
# its overrides) in the fair evaluation's workdir, after restoring the seed-0 cells that
# experiments/fair_eval.sh and experiments/authors_path.sh trained (final variables and
# warm-ups), for the cells of the same name and settings.
run_fair_grid() {
  local name=$1 workdir=$2 order=$4 picked=$5 cell parked
  local -n cells_=$3
  shift 5
  local args=("$@")
  for cell in ${picked:-$order}; do
    [ -n "${cells_[$cell]:-}" ] || { echo "unknown cell $cell; choose from: $order" >&2; return 2; }
    args+=(--cell "$cell:${cells_[$cell]}")
  done
  for parked in dnq_table_fair authors_path; do
    "$PYTHON" experiments/park.py restore "$workdir" "$parked"
  done
  run_grid "$name" "$workdir" "${args[@]}"
}
