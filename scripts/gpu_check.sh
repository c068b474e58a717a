#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and docs/cluster.md in one call, under 600 s by the steps' limits
# (a lent GPU machine has torch but no Ray; the engine needs none). Fashion-MNIST comes from DATA
# (default data/fashion-mnist: the four IDX .gz files). Each step has its own time limit, so one slow step
# does not cost the others; logs go to OUT (default .). The target first: 256 shadows stacked
# with the Triton kernels (farm.stacked_triton), then with the default layout, in the same call.
# EXPLORE=1 adds the batched-products profile and torch.compile timings.
set -u
DATA=${DATA:-data/fashion-mnist}
OUT=${OUT:-.}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; }
step batched-triton 170 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 --layout triton ${BATCHED_ARGS:-}
step step 100 $PY scripts/bench_stacked_step.py --layouts grouped triton --profile ${STEP_ARGS:-}
step batched 150 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 ${BATCHED_ARGS:-}
step packing-small-cnn 60 $PY scripts/bench_packing.py --arch small-cnn --procs 1 4 --precisions bf16 --images 30000 ${PACKING_ARGS:-}
step packing-resnet18 110 $PY scripts/bench_packing.py --precisions bf16 --images 12800 ${PACKING_ARGS:-}
if [ "${EXPLORE:-0}" = 1 ]; then
  step step-bmm 60 $PY scripts/bench_stacked_step.py --layouts bmm --precisions bf16 --kernels autotuned --profile
  step step-compiled 150 $PY scripts/bench_stacked_step.py --layouts grouped bmm --precisions bf16 --kernels autotuned --compile --profile
fi
