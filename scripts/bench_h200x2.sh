#!/usr/bin/env bash
# The committed benchmark (benchmarks/results/bench-h200x2.*) on a machine with 2 GPUs.
# Usage: scripts/bench_h200x2.sh [OUTPUT_DIR]   (default benchmarks/results)
# The suite in two invocations (cuDNN, then flash; each under ten minutes on 2x H200), then
# CUDA-graph replay at short lengths.
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-benchmarks/results}"
python3 -m ringattn bench --backends cudnn --long-seq-lens 256K --warmup 1 \
    --out "$out" --name bench-h200x2
python3 -m ringattn bench --backends flash --long-seq-lens "" --warmup 1 \
    --out "$out" --name bench-h200x2 --append
python3 -m ringattn bench --seq-lens 4K,8K --backends cudnn --kv-heads 8 --mask causal \
    --long-seq-lens "" --methods one-gpu,ringattn-zigzag,ringattn-zigzag-graphs \
    --out "$out" --name bench-h200x2-graphs
