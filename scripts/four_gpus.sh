#!/usr/bin/env bash
# Everything measured on 4 local GPUs, in one call and in priority order: the masks bench
# (ringattn beside one GPU), prefill against one GPU, short sequences (8K-16K), PyTorch's
# context_parallel FlexAttention rows, then the masked GPU tests. Each step has its own time
# limit so a slow step cannot starve the ones after it.
# Usage: scripts/four_gpus.sh OUTPUT_DIR [STEPS]
#   STEPS: any of masks, prefill, short, torchcp, tests (default: all, in that order)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
steps="${2:-masks prefill short torchcp tests}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
launch() {  # launch SECONDS LOG ARGS...
    timeout "$1" python3 -m torch.distributed.run --standalone --nproc-per-node=4 "${@:3}" \
        > "$out/$2.log" 2>&1 || { status=1; echo "-- $2 failed or timed out"; }
    grep -v -i warn "$out/$2.log" | tail -30
}
has() { [[ " $steps " == *" $1 "* ]]; }
if has masks; then
    echo "== masks bench, 4 GPUs"
    launch "${MASKS_LIMIT:-150}" masks-4 benchmarks/masks_bench.py \
        --cases docs-64K window-128K docs-256K --strategies auto allgather \
        --iters 3 --warmup 1 --json "$out/masks-4.json"
fi
if has prefill; then
    echo "== prefill, 4 GPUs"
    launch "${PREFILL_LIMIT:-110}" prefill-4 benchmarks/inference_bench.py --sections prefill \
        --prefill 128K,512K --json "$out/prefill-4.json"
fi
if has short; then
    echo "== short sequences, 4 GPUs"
    launch "${SHORT_LIMIT:-80}" short-4 benchmarks/short_sequences.py --seq-lens 8192,16384 \
        --label after-4gpu --json "$out/short-4.json"
fi
if has torchcp; then
    echo "== PyTorch's context_parallel with FlexAttention, 4 GPUs"
    launch "${TORCHCP_LIMIT:-70}" torchcp-4 benchmarks/masks_bench.py --torch-cp \
        --cases docs-64K window-128K --iters 3 --warmup 1 --json "$out/masks-torchcp-4.json"
fi
if has tests; then
    echo "== masked GPU tests (every strategy, bf16 against float64)"
    timeout "${TESTS_LIMIT:-170}" python3 -m pytest -m gpu -q tests/test_gpu.py -k masks \
        > "$out/tests.log" 2>&1 || status=1
    tail -15 "$out/tests.log"
fi
exit $status
