#!/usr/bin/env bash
# Masked attention on GPUs in one call: the masked GPU tests, then the masks bench on 2 and on
# 4 local GPUs (ringattn's strategies beside one GPU's FlexAttention and variable-length flash),
# then PyTorch's context_parallel FlexAttention rows. Every step has a time limit; rows are
# written as they come (NAME.partial), so a step cut short still reports what it measured.
# Usage: scripts/masks_gpu.sh OUTPUT_DIR
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
launch() {  # launch SECONDS GPUS ARGS...
    local gpus="$2" devices
    devices=$(seq -s, 0 $((gpus - 1)))
    CUDA_VISIBLE_DEVICES="$devices" timeout "$1" python3 -m torch.distributed.run --standalone \
        --nproc-per-node="$gpus" "${@:3}" 2>&1 | grep -v -i warn | tail -40
}
echo "== masked GPU tests (every strategy, bf16 against float64)"
timeout 150 python3 -m pytest -m gpu -q tests/test_gpu.py -k masks 2>&1 | tail -15
echo "== masks bench, 2 GPUs"
launch 170 2 benchmarks/masks_bench.py --cases docs-64K window-128K docs-256K \
    --strategies auto ring allgather ulysses --iters 3 --warmup 1 --json "$out/masks-2.json"
echo "== masks bench, 4 GPUs"
launch 150 4 benchmarks/masks_bench.py --cases docs-64K window-128K docs-256K \
    --strategies auto ring allgather --iters 3 --warmup 1 --json "$out/masks-4.json"
echo "== PyTorch's context_parallel with FlexAttention, 2 GPUs"
launch 60 2 benchmarks/masks_bench.py --torch-cp --cases docs-64K window-128K --iters 3 \
    --warmup 1 --json "$out/masks-torchcp-2.json"
