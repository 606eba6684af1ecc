#!/usr/bin/env bash
# Inference with a sharded KV cache on this machine's GPUs: correctness against float64,
# prefill, second turns (pass-KV vs pass-Q), decode per token, and the Hugging Face example
# (prefill + greedy generation) against one GPU.
# Usage: scripts/inference_h200x2.sh [OUTPUT_DIR] [HF_PROMPT_LEN]  (default ./gpu_results 128K)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
prompt="${2:-131072}"
mkdir -p "$out"
status=0
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
    transformers.__version__, torch.cuda.get_device_name())'

echo "== one attention layer: correctness, prefill, second turn, decode"
timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    benchmarks/inference_bench.py --json "$out/inference.json" > "$out/inference.log" 2>&1 \
    || status=1
grep -v "^prefill {\|^second turn {\|^decode {\|^correctness {" "$out/inference.log" | tail -60

echo "== Hugging Face: a Llama (32/8 heads x 128, 4 layers), prompt $prompt, 32 new tokens"
model=(--prompt-len "$prompt" --new-tokens 32 --hidden 4096 --intermediate 14336 --layers 4
       --heads 32 --kv-heads 8 --vocab 32000)
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    examples/hf_generate_long.py "${model[@]}" --json "$out/hf-ringattn.json" \
    > "$out/hf-ringattn.log" 2>&1 || status=1
tail -4 "$out/hf-ringattn.log"
timeout 120 python3 examples/hf_generate_long.py --attention sdpa "${model[@]}" \
    --json "$out/hf-sdpa.json" > "$out/hf-sdpa.log" 2>&1 || status=1
tail -4 "$out/hf-sdpa.log"
python3 - "$out" <<'PY' || status=1
import json, sys
ring, one = (json.load(open(f"{sys.argv[1]}/hf-{n}.json")) for n in ("ringattn", "sdpa"))
same = ring.get("tokens") == one.get("tokens")
print("greedy tokens equal to one GPU:", same)
PY
exit $status
