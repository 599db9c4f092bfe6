#!/usr/bin/env bash
# Every GPU check of this project in one run, for a machine with one GPU (not yet timed on
# one; expect several minutes, most of them XLA compiles):
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
#
# 1. benchmarks/train_speed.py for ResNet-20 at batch 128 fp32 and at batch 512 bf16, each
#    with the scanned-epoch timing (--epoch), the second also with the no-noise,
#    weight-noise-only and drop-in-only steps (--breakdown); then benchmarks/ptq_speed.py
#    (QDrop of ResNet-20 per block, with the projected full 20,000-iteration run); then
#    benchmarks/input_speed.py: ResNet-18/50 steps at 224 (batch 128 bf16) against the host
#    pipeline's images per second, hence the host cores one GPU needs;
# 2. the noise, profiler, quantizer and trainer tests on the GPU backend (tests whose
#    premise is CPU-only, such as 8 host devices, skip themselves).
# The speed figures come first: they are what a short loan of a GPU is for.
# Wheels missing from the machine (ml_collections, tensorboardX) are installed from .whl/
# if that folder exists. Everything printed is also written to OUT_DIR/gpu_checks.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
mkdir -p "$out"
log="$out/gpu_checks.log"
py="${PYTHON:-python3}"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --target /tmp/dnq_site .whl/*.whl
  export PYTHONPATH="/tmp/dnq_site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
{
  "$py" -c "import jax; print('devices:', jax.devices(), 'jax', jax.__version__)"
  "$py" benchmarks/train_speed.py --steps 50 --compile-repeats 1 --epoch
  "$py" benchmarks/train_speed.py --dtype bfloat16 --batch 512 --steps 50 --compile-repeats 1 \
    --epoch --breakdown
  "$py" benchmarks/ptq_speed.py --methods qdrop --iters 2000
  "$py" benchmarks/input_speed.py --sources 500x375 --workers 0,8 --dtype bfloat16 \
    --step-batch 128 --steps 20
  DNQ_TEST_JAX_CACHE=/tmp/dnq_gpu_cache "$py" -m pytest -q -p no:cacheprovider \
    tests/test_dnq_noise.py tests/test_profiler.py tests/test_quant.py tests/test_train.py \
    2>&1 | tail -n 25
} 2>&1 | tee "$log"
