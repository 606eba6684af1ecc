#!/usr/bin/env bash
# GPU checks, the demo, and a short benchmark on a machine with CUDA GPUs, in one call.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]   (JSON results land in OUTPUT_DIR, default ./gpu_results)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c 'import torch; print("torch", torch.__version__)'

echo "== pytest -m gpu: backends, NCCL, CUDA graphs and the Triton merge against float64"
timeout 900 python3 -m pytest -m gpu -v tests/test_gpu.py 2>&1 | tee "$out/pytest_gpu.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== correctness: kernels and ring over NCCL on $gpus GPUs (the table)"
timeout 900 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    scripts/gpu_check.py --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== integration: the example's model through each entry point vs one GPU (bf16)"
timeout 600 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    scripts/gpu_integration.py --json "$out/gpu_integration.json" 2>&1 | tee "$out/gpu_integration.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== PyTorch's context_parallel, then ringattn, in one process (cuDNN plan cache)"
timeout 300 python3 -m torch.distributed.run --standalone --nproc-per-node="$gpus" \
    scripts/gpu_cp_then_ringattn.py --json "$out/cp_then_ringattn.json" 2>&1 | tee "$out/cp_then_ringattn.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== Hugging Face: a length one GPU cannot hold, SDPA on one GPU vs ringattn on all"
if python3 -c 'import transformers' 2>/dev/null; then
    timeout 900 python3 scripts/gpu_hf_long_context.py "$out" 2>&1 | tee "$out/hf_long_context.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "transformers is not installed: skipped (pip install -e '.[hf]')"
fi

echo "== demo: default size, and 128K tokens"
timeout 600 python3 -m ringattn demo --json "$out/demo_default.json" || status=1
timeout 600 python3 -m ringattn demo --seq-len 131072 --json "$out/demo_128k.json" || status=1

echo "== benchmark: one GPU vs PyTorch context_parallel vs ringattn (quick suite)"
timeout 900 python3 -m ringattn bench --suite quick --out "$out" --name bench-quick || status=1
exit $status
