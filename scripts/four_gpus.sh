#!/usr/bin/env bash
# Everything measured on 4 local GPUs, in one call and in priority order: the masks bench
# (ringattn beside one GPU), prefill against one GPU, short sequences (8K-16K), PyTorch's
# context_parallel FlexAttention rows, then the masked GPU tests. Each step has its own time
# limit so a slow step cannot starve the ones after it. Two more steps run on request: hf1m
# (the Hugging Face example, a 2.3B model with a 1M-token prompt, prefilled and decoded on
# 4 GPUs), cpcheck (PyTorch's CP, then ringattn with cuDNN, in one process on GPUs 0-1),
# gputests (the GPU tests but the masked ones) and compiled (the tiny LM and the Hugging
# Face example, eager and under torch.compile, on GPUs 0-1).
# Usage: scripts/four_gpus.sh OUTPUT_DIR [STEPS]  (environment: *_LIMIT, SHORT_MODES, SHORT_STRATEGIES)
#   STEPS: any of masks, prefill, short, torchcp, tests, hf1m, cpcheck, gputests, compiled
#          (default: the first five, in that order)
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
    # Each CUDA-graph mode (SHORT_MODES: off, on, auto, default) and entry point
    # (SHORT_STRATEGIES: ring_attention, or a strategy of ringattn.attention) on 2 GPUs, then 4.
    for mode in ${SHORT_MODES:-off default}; do
        for strategy in ${SHORT_STRATEGIES:-ring_attention}; do
            tag="$mode${strategy/#ring_attention/}"
            echo "== short sequences, 2 GPUs, CUDA graphs: $mode, $strategy"
            CUDA_VISIBLE_DEVICES=0,1 timeout "${SHORT_LIMIT:-80}" python3 -m torch.distributed.run \
                --standalone --nproc-per-node=2 benchmarks/short_sequences.py --cuda-graphs "$mode" \
                --strategy "$strategy" --seq-lens "${SHORT_LENS_2:-2048,4096,8192,16384,32768}" \
                --label "$tag-2gpu" --json "$out/short-2-$tag.json" \
                > "$out/short-2-$tag.log" 2>&1 || { status=1; echo "-- short-2-$tag failed"; }
            grep -v -i warn "$out/short-2-$tag.log" | tail -6
            echo "== short sequences, 4 GPUs, CUDA graphs: $mode, $strategy"
            launch "${SHORT_LIMIT:-80}" "short-4-$tag" benchmarks/short_sequences.py \
                --cuda-graphs "$mode" --strategy "$strategy" \
                --seq-lens "${SHORT_LENS_4:-4096,8192,16384,32768}" --label "$tag-4gpu" \
                --json "$out/short-4-$tag.json"
        done
    done
fi
if has torchcp; then
    echo "== PyTorch's context_parallel with FlexAttention, 4 GPUs"
    launch "${TORCHCP_LIMIT:-70}" torchcp-4 benchmarks/masks_bench.py --torch-cp \
        --cases docs-64K window-128K --iters 3 --warmup 1 --json "$out/masks-torchcp-4.json"
fi
if has hf1m; then
    echo "== Hugging Face: a 2.3B Llama (64/8 heads x 128, hidden 8192, 2 layers), 1M prompt"
    # 256K tokens per rank: the MLP's activations (14 GiB each) need unfragmented memory.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
        launch "${HF_LIMIT:-400}" hf-1m examples/hf_generate_long.py --prompt-len 1048576 \
        --new-tokens 8 --hidden 8192 --intermediate 28672 --layers 2 --heads 64 --kv-heads 8 \
        --vocab 32000 \
        --json "$out/hf-1m.json"
fi
if has cpcheck; then
    echo "== PyTorch's context_parallel, then ringattn, in one process (cuDNN, GPUs 0-1)"
    CUDA_VISIBLE_DEVICES=0,1 timeout "${CP_LIMIT:-120}" python3 -m torch.distributed.run \
        --standalone --nproc-per-node=2 scripts/gpu_cp_then_ringattn.py \
        --json "$out/cp-then-ringattn.json" > "$out/cpcheck.log" 2>&1 || status=1
    tail -4 "$out/cpcheck.log"
fi
if has compiled; then
    # The tiny LM (context_parallel) and the Hugging Face example, eager then compiled, 8K.
    for example in train_tiny_lm hf_long_context; do
        for flag in "" --compile; do
            name="$example${flag:+-compiled}"
            echo "== $name, 2 GPUs"
            CUDA_VISIBLE_DEVICES=0,1 timeout "${COMPILED_LIMIT:-100}" python3 -m \
                torch.distributed.run --standalone --nproc-per-node=2 "examples/$example.py" \
                --seq-len 8192 --steps 8 $flag > "$out/$name.log" 2>&1 \
                || { status=1; echo "-- $name failed or timed out"; }
            grep "^step\|parameters" "$out/$name.log" | tail -9
        done
    done
fi
if has gputests; then
    echo "== GPU tests but the masked ones (kernels, NCCL ring, strategies, CUDA graphs)"
    timeout "${GPUTESTS_LIMIT:-240}" python3 -m pytest -m gpu -q tests/test_gpu.py -k "not masks" \
        > "$out/gputests.log" 2>&1 || status=1
    tail -15 "$out/gputests.log"
fi
if has tests; then
    echo "== masked GPU tests (every strategy, bf16 against float64)"
    timeout "${TESTS_LIMIT:-170}" python3 -m pytest -m gpu -q tests/test_gpu.py -k masks \
        > "$out/tests.log" 2>&1 || status=1
    tail -15 "$out/tests.log"
fi
exit $status
