#!/usr/bin/env bash
# Inference with a sharded KV cache on this machine's GPUs: correctness against float64,
# prefill, second turns (pass-KV vs pass-Q), decode per token, and the Hugging Face example
# (prefill + greedy generation) against one GPU, at 128K and at a prompt one GPU cannot hold.
# Usage: scripts/inference_h200x2.sh [OUTPUT_DIR] [STEPS]
#   STEPS: any of bench, hf, hfbig (default: all three); BENCH_ARGS: extra bench options.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
steps="${2:-bench hf hfbig}"
mkdir -p "$out"
status=0
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
    transformers.__version__, torch.cuda.get_device_name())'

if [[ " $steps " == *" bench "* ]]; then
    echo "== one attention layer: correctness, prefill, second turn, decode"
    # shellcheck disable=SC2086
    timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
        benchmarks/inference_bench.py ${BENCH_ARGS:-} --json "$out/inference.json" \
        > "$out/inference.log" 2>&1 || status=1
    grep -v "^prefill {\|^second turn {\|^decode {\|^correctness {" "$out/inference.log" | tail -60
fi

hf() {  # name, then the example's options: 2 GPUs with ringattn, then one GPU with SDPA
    local name="$1"
    shift
    timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
        examples/hf_generate_long.py "$@" --json "$out/$name-ringattn.json" \
        > "$out/$name-ringattn.log" 2>&1 || status=1
    tail -3 "$out/$name-ringattn.log"
    timeout 150 python3 examples/hf_generate_long.py --attention sdpa "$@" \
        --json "$out/$name-sdpa.json" > "$out/$name-sdpa.log" 2>&1
    tail -3 "$out/$name-sdpa.log"
}

if [[ " $steps " == *" hfbig "* ]]; then
    echo "== Hugging Face: a 2.3B Llama (64/8 heads x 128, hidden 8192, 2 layers), 768K prompt"
    hf hf-768k --prompt-len 786432 --new-tokens 8 --hidden 8192 --intermediate 28672 \
        --layers 2 --heads 64 --kv-heads 8 --vocab 32000
fi
if [[ " $steps " == *" hf "* ]]; then
    echo "== Hugging Face: a 1.1B Llama (32/8 heads x 128, 4 layers), 128K prompt"
    hf hf-128k --prompt-len 131072 --new-tokens 32 --hidden 4096 --intermediate 14336 \
        --layers 4 --heads 32 --kv-heads 8 --vocab 32000
    python3 - "$out" <<'PY' || status=1
import json, sys
ring, one = (json.load(open(f"{sys.argv[1]}/hf-128k-{n}.json")) for n in ("ringattn", "sdpa"))
print("greedy tokens equal to one GPU:", ring.get("tokens") == one.get("tokens"))
PY
fi
exit $status
