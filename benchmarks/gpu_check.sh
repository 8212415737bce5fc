#!/usr/bin/env bash
# The GPU checks, as one script: the CUDA paths of the jobs (AMP, channels_last) end to end with verification,
# then the GPU figures of benchmarks/speedup.py and benchmarks/cost.py. Results land in $OUT (default
# benchmarks/results/gpu) as JSON, markdown and logs.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA device and regprune's dependencies
#
# Where regprune's dependencies are missing, wheels in .whl/ are installed into /tmp/site first (a machine
# without a package index). Each stage has its own time limit so that one slow stage still leaves the others'
# results; the last lines printed are a summary of every stage's exit status.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if ! $PY -c "import torch_pruning, mlxtend" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision, torch_pruning; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'torch_pruning', torch_pruning.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

declare -A RC
stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  RC[$name]="$? in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

RUNS=$(mktemp -d)
RP="$PY -m regprune"
DEV=${DEVICE:-cuda}; GPU_FLAGS=$([ "$DEV" = cuda ] && echo "--amp --channels-last")
LIMITS=${LIMITS:-}  # e.g. "--limit-train 256 --limit-test 128" for a dry run of the script on the CPU
# 1. the jobs on CUDA: train, GReg-1 to 2x, SPM from scratch to 2x (each verifies its cut before saving)
stage jobs 150 bash -c "set -e
  $RP train --model resnet20 --data mnist5k --epochs 3 --device $DEV $GPU_FLAGS $LIMITS --no-progress --out $RUNS/base
  $RP prune --base $RUNS/base/model.safetensors --method greg1 --speedup 2 --reg-iters 600 --ft-epochs 2 --device $DEV $GPU_FLAGS $LIMITS --no-progress --out $RUNS/greg1
  $RP prune --base $RUNS/base/model.safetensors --method greg2 --speedup 2 --reg-iters 600 --ft-epochs 2 --device $DEV $GPU_FLAGS $LIMITS --no-progress --out $RUNS/greg2
  $RP scratch --model resnet20 --data mnist5k --target-macs 0.5 --search-epochs 2 --epochs 3 --device $DEV $GPU_FLAGS $LIMITS --no-progress --out $RUNS/spm
  for r in greg1 greg2 spm; do $PY -c \"import json,sys; r=json.load(open('$RUNS/'+sys.argv[1]+'/report.json')); print(sys.argv[1], 'MACs speedup', r.get('macs_speedup'), 'verification', r.get('verification'))\" \$r; done"
# 2. where SPM's nuclear-norm SVDs are cheapest (GPU, batched GPU, CPU)
[ "$DEV" = cuda ] && stage nuclear_svd 60 $PY benchmarks/nuclear_svd.py
# 3. realised speedup on the GPU: eager fp32, channels_last + AMP, CUDA graphs (SPEEDUP_ARGS="--networks resnet50")
[ "$DEV" = cuda ] && stage speedup "${SPEEDUP_LIMIT:-240}" $PY benchmarks/speedup.py --cuda --batches 1 64 256 --measure-budget-s 10 ${SPEEDUP_ARGS:-} --out-dir "$OUT"
# 4. the machinery's cost per training step on the GPU (AMP, channels_last) and GPU memory (SKIP_COST=1: not run)
[ "$DEV" = cuda ] && [ -z "${SKIP_COST:-}" ] && stage cost 120 $PY benchmarks/cost.py --cuda-only --repeats 5 --mem-repeats 1 --name cost_gpu --out-dir "$OUT"

echo "=== summary (exit status, seconds)"
for k in jobs nuclear_svd speedup cost; do echo "$k: ${RC[$k]:-not run}"; done
