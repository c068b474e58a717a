#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and docs/cluster.md (a lent GPU machine has torch but no Ray; the
# engine needs none). Fashion-MNIST comes from DATA (default data/fashion-mnist: the four IDX .gz files).
# Each step has its own time limit, so one slow step does not cost the others; logs go to OUT (default .).
# By default the issue's target, in the same call: one training step per layout (the Triton kernels'
# gradients checked against grouped convolutions' on the same weights; the autotuned variant compiles every
# tile into Triton's cache), then 256 shadows stacked in the default layout (farm.train.stacked_triton's kernels
# on an H100/H200) against one at a time; the limits add up to 300 s, within one device call with room for
# a rerun. PART=more (a second call, limits 510 s): 256 shadows with grouped convolutions and with
# deterministic kernels, the deterministic layouts' step and the packing figures. PART=compile (210 s): the
# batched-products profile and torch.compile timings. PART=resnet (540 s): ResNet-18 on a CIFAR-shaped
# synthetic task, P processes per GPU x K models stacked per process (training, the finetune method's
# stacked twin, prediction), each setting's test accuracy, and per setting one retrain's and one finetune's
# GPU-seconds and the 512 + 512 set's GPU-hours, as ratios against P=4 packing measured in the same call
# (measured first; --budget-s ends a setting that would run past the step's limit, so the summary prints).
# PART=levers (540 s): ResNet-18 one model at a time (P=1, K=1), bf16 and fp32 x contiguous and channels_last
# x torch.compile off and on (12288 images: whole batches and predict chunks, so no partial-batch graphs).
# PART=issue (limits 420 s: one call of a 15-minute device budget, with room for a shorter rerun): the
# ResNet-18 figures first (bf16, 6400 images a process: P=1 and P=4 x K=1 and K=8 x contiguous and
# channels_last; P=4 K=1 contiguous, the ratios' baseline, first; the finetunes under bf16 as the preset
# runs them, and the 512 + 512 sizing), then the small CNN's 256-shadow no-regression check.
set -u
DATA=${DATA:-data/fashion-mnist}
OUT=${OUT:-.}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() { local name=$1 limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; }
PART=${PART:-target}
if [ "$PART" = target ]; then
  step step 150 $PY scripts/bench_stacked_step.py --layouts grouped triton --precisions bf16 --profile ${STEP_ARGS:-}
  step batched 150 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 ${BATCHED_ARGS:-}
elif [ "$PART" = more ]; then
  step batched-grouped 150 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 --layout grouped ${BATCHED_ARGS:-}
  step batched-deterministic 120 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 --gpu-kernels deterministic ${BATCHED_ARGS:-}
  step step-deterministic 60 $PY scripts/bench_stacked_step.py --layouts bmm triton --precisions bf16 --kernels deterministic --steps 5
  step packing-small-cnn 60 $PY scripts/bench_packing.py --arch small-cnn --procs 1 4 --precisions bf16 --images 30000 --budget-s 50 ${PACKING_ARGS:-}
  step packing-resnet18 120 $PY scripts/bench_packing.py --precisions bf16 --images 12800 --budget-s 105 ${PACKING_ARGS:-}
elif [ "$PART" = resnet ]; then
  step resnet-stack 540 $PY scripts/bench_packing.py --precisions bf16 --images 12800 --procs 1 4 --stack 1 4 16 --budget-s 500 ${PACKING_ARGS:-}
elif [ "$PART" = levers ]; then
  step levers 540 $PY scripts/bench_packing.py --procs 1 --stack 1 --precisions bf16 fp32 --memory-formats contiguous channels_last --compile off on --images 12288 --budget-s 500 ${PACKING_ARGS:-}
elif [ "$PART" = issue ]; then
  step resnet-issue 270 $PY scripts/bench_packing.py --precisions bf16 --images 6400 --procs 1 4 --stack 1 8 --memory-formats contiguous channels_last --budget-s 250 ${PACKING_ARGS:-}
  step batched 150 $PY scripts/bench_farm.py --only batched --dataset fashion-mnist --data "$DATA" --baseline-models 8 ${BATCHED_ARGS:-}
elif [ "$PART" = compile ]; then
  step step-bmm 60 $PY scripts/bench_stacked_step.py --layouts bmm --precisions bf16 --kernels autotuned --profile
  step step-compiled 150 $PY scripts/bench_stacked_step.py --layouts grouped bmm --precisions bf16 --kernels autotuned --compile --profile
else
  echo "gpu_check: PART must be target, more, resnet, levers, issue or compile, got $PART" >&2; exit 2
fi
