#!/usr/bin/env bash
# Short sequences, torch.compile and PyTorch's CP beside ringattn, on 2 local GPUs, in one call.
# Usage: scripts/short_sequences_h200x2.sh OUTPUT_DIR [OLD_SRC]
#   OLD_SRC: a checkout's src/ of an earlier ringattn, measured with the same script first.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out="${1:-gpu_results}"
old="${2:-}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
run() { timeout "$1" python3 -m torch.distributed.run --standalone --nproc-per-node=2 "${@:2}"; }

echo "== short sequences: one GPU vs ringattn, back to back and single calls"
if [ -n "$old" ]; then
    PYTHONPATH="$old" run 150 benchmarks/short_sequences.py --label before \
        --json "$out/short-before.json" 2>&1 | grep -v Warning | tail -8
fi
for graphs in off auto; do
    run 150 benchmarks/short_sequences.py --label "after-graphs-$graphs" --cuda-graphs $graphs \
        --json "$out/short-after-graphs-$graphs.json" 2>&1 | grep -v Warning | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== PyTorch's context_parallel, then ringattn, in one process (cuDNN)"
run 120 scripts/gpu_cp_then_ringattn.py --json "$out/cp-then-ringattn.json" 2>&1 | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ -n "$old" ]; then
    echo "-- the same with the earlier checkout (expected to fail)"
    PYTHONPATH="$old" run 90 scripts/gpu_cp_then_ringattn.py 2>&1 | grep -i -E "error|PASSED|FAILED" | head -3
fi

echo "== the tiny LM, eager and compiled (context_parallel, 8K tokens)"
for flag in "" "--compile"; do
    run 200 examples/train_tiny_lm.py --entry context_parallel --seq-len 8192 --steps 8 \
        --dim 1024 --heads 16 --kv-heads 4 --layers 4 $flag 2>&1 | grep "^step" \
        | tee "$out/tiny-lm${flag:+-compiled}.txt"
done
exit $status
