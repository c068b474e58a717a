#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call (a lent GPU machine has torch but no Ray; the engine
# needs none). Fashion-MNIST comes from DATA (default data/fashion-mnist: the four IDX .gz files).
# Each step has its own time limit, so one slow step does not cost the others; logs go to OUT (default .).
set -u
DATA=${DATA:-data/fashion-mnist}
OUT=${OUT:-.}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; }
step step 90 $PY scripts/bench_stacked_step.py ${STEP_ARGS:-}
step batched 170 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" ${BATCHED_ARGS:-}
step packing 120 $PY scripts/bench_packing.py --precisions bf16 --images 12800 ${PACKING_ARGS:-}
