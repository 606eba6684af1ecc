#!/usr/bin/env bash
# Scaling run on all local GPUs (4 or 8): correctness of every backend and strategy, the
# planner's calibration, and the benchmark of every method at the given lengths, then the
# planner against it. Usage: scripts/scaling_check.sh OUTPUT_DIR [SEQ_LENS] [LONG_SEQ_LENS]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
lens="${2:-128K}"
long="${3:-}"
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
status=0
timeout 200 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    scripts/gpu_check.py --json "$out/gpu_check.json" > "$out/gpu_check.log" 2>&1 || status=1
tail -1 "$out/gpu_check.log"
grep -E "^(ring|strat|kernel|graph)" "$out/gpu_check.log" | grep -v " yes " | head -5
timeout 120 python3 -m ringattn calibrate --seq-lens 2K,4K,8K,16K,32K,64K \
    --out "$out/calibration.json" > "$out/calibrate.log" 2>&1 || status=1
methods=one-gpu,torch-cp-allgather,torch-cp-alltoall,ringattn-zigzag,ringattn-allgather
methods=$methods,ringattn-ulysses,ringattn-hybrid,ringattn-auto
timeout 300 python3 -m ringattn bench --backends cudnn --kv-heads 8 --mask both \
    --seq-lens "$lens" --long-seq-lens "$long" --modes fwd+bwd --methods "$methods" \
    --warmup 1 --samples 3 --out "$out" --name "scaling-${gpus}gpu" > "$out/bench.log" 2>&1 \
    || status=1
grep -E "^\| cudnn" "$out/scaling-${gpus}gpu.md" | cut -c1-120
python3 benchmarks/planner_check.py "$out/scaling-${gpus}gpu.json" \
    --calibration "$out/calibration.json" | tail -12 || status=1
exit $status
