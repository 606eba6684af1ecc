#!/usr/bin/env bash
# Split-K decode: the kernels on one GPU, decode per token on 2 GPUs against one GPU
# (GPUs 0-1), then prefill on 4 GPUs against one GPU. With 4 GPUs or more the kernels run on
# GPU 3 while the 2-GPU decode runs; with fewer, first, on GPU 0.
# Usage: scripts/decode_kernels_gpu.sh [OUTPUT_DIR] [STEPS]
#   STEPS: any of kernels, decode2, prefill4, decode4 (default: kernels decode2 prefill4)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
steps="${2:-kernels decode2 prefill4}"
mkdir -p "$out"
status=0
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(),
    torch.cuda.device_count(), "GPUs")'
run2() {  # name, timeout, GPUs, bench options
    local name="$1" limit="$2" devices="$3"
    shift 3
    CUDA_VISIBLE_DEVICES="$devices" timeout "$limit" python3 -m torch.distributed.run \
        --standalone --nproc-per-node="$(tr ',' '\n' <<<"$devices" | wc -l)" \
        benchmarks/inference_bench.py "$@" --json "$out/$name.json" > "$out/$name.log" 2>&1 \
        || { status=1; tail -20 "$out/$name.log"; }
}
pids=()
if [[ " $steps " == *" kernels "* ]]; then
    CUDA_VISIBLE_DEVICES=$((gpus >= 4 ? 3 : 0)) timeout "${KERNELS_LIMIT:-150}" python3 \
        benchmarks/decode_kernels_bench.py --json "$out/kernels.json" > "$out/kernels.log" 2>&1 &
    pids+=($!)
    ((gpus >= 4)) || { wait "${pids[0]}" || status=1; pids=(); }
fi
# The flex options that ran fastest over the kernel cases (graph time), where known by now.
flex=$(python3 - "$out/kernels.json" 2>/dev/null <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
names = [n for n in rows[0]["kernels"] if n.startswith("flex")]
times = {n: sum(r["kernels"][n].get("graph_ms", 1e9) for r in rows) for n in names}
print(min(times, key=times.get).partition("@")[2] if times else "")
PY
)
echo "flex options for the decode rows: '${flex:-}'"
if [[ " $steps " == *" decode2 "* ]]; then
    run2 decode2 "${DECODE_LIMIT:-200}" 0,1 --sections correctness,decode --decode 128K,1M \
        --flex-options "${flex:-}" &
    pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p" || status=1; done
[[ -f "$out/kernels.log" ]] && tail -25 "$out/kernels.log"
[[ -f "$out/decode2.log" ]] && grep -A12 "^## Decode\|^## Correctness" "$out/decode2.log" | tail -40
if [[ " $steps " == *" prefill4 "* ]]; then
    run2 prefill4 "${PREFILL_LIMIT:-110}" 0,1,2,3 --sections prefill --prefill 128K,512K
    grep -A6 "^## Prefill" "$out/prefill4.log"
fi
if [[ " $steps " == *" decode4 "* ]]; then
    run2 decode4 "${DECODE_LIMIT:-200}" 0,1,2,3 --sections decode --decode 128K,1M \
        --decode-kernels "${DECODE4_KERNELS:-flex}"
    grep -A8 "^## Decode" "$out/decode4.log"
fi
exit $status
