#!/usr/bin/env bash
# Every strategy of ringattn.attention on this machine's GPUs: correctness against float64,
# the planner's calibration, the benchmark of every strategy, and the planner's predictions
# against it. Usage: scripts/strategies_h200x2.sh [OUTPUT_DIR]   (default ./gpu_results)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
mkdir -p "$out"
status=0

echo "== correctness: allgather, ulysses, hybrid x flash, efficient, cudnn (bf16)"
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    scripts/gpu_check.py --only-strategies --json "$out/strategy_check.json" \
    > "$out/strategy_check.log" 2>&1 || status=1
grep -A60 "errors vs float64" "$out/strategy_check.log" | tail -30

echo "== calibration"
timeout 300 python3 -m ringattn calibrate --out "$out/calibration.json" > "$out/calibrate.log" 2>&1 \
    || status=1
tail -6 "$out/calibrate.log"

echo "== benchmark: every strategy, forward+backward"
methods=one-gpu,ringattn-zigzag,ringattn-allgather,ringattn-ulysses,ringattn-hybrid,ringattn-auto
common=(--modes fwd+bwd --methods "$methods" --warmup 1 --out "$out" --name strategies)
timeout 400 python3 -m ringattn bench --backends cudnn --kv-heads 8,32 --mask causal \
    --seq-lens 4K,8K,32K --long-seq-lens 128K "${common[@]}" > "$out/bench.log" 2>&1 || status=1
timeout 200 python3 -m ringattn bench --backends cudnn --kv-heads 32 --mask full \
    --seq-lens 8K,32K --long-seq-lens "" "${common[@]}" --append >> "$out/bench.log" 2>&1 || status=1
timeout 200 python3 -m ringattn bench --backends flash --kv-heads 8 --mask causal \
    --seq-lens 32K --long-seq-lens "" "${common[@]}" --append >> "$out/bench.log" 2>&1 || status=1

echo "== planner against the measurements"
python3 benchmarks/planner_check.py "$out/strategies.json" --calibration "$out/calibration.json" \
    || status=1
exit $status
