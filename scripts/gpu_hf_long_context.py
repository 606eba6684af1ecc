"""The Hugging Face example at a length one GPU cannot hold.

The same bf16 Llama is trained with PyTorch's SDPA on one GPU and with
``attn_implementation="ringattn"`` on every local GPU. Two short one-GPU runs measure peak
memory against length; the script then picks a length about 1.5x what one GPU holds (and
what the GPUs together hold with room to spare), shows the one-GPU run running out of memory
there and the context-parallel run training, and compares tokens/s at half that length, which
both fit. Run from the repository root after ``source scripts/gpu_env.sh``:

    python3 scripts/gpu_hf_long_context.py OUT_DIR

Writes OUT_DIR/hf-long-context.{json,md} and prints the table last.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = "examples/hf_long_context.py"
# A 1.0B-parameter Llama: head dim 128, GQA 16/4, the MLP ratio of Llama 2.
MODEL = ["--hidden", "2048", "--intermediate", "5632", "--layers", "16", "--heads", "16",
         "--kv-heads", "4", "--vocab", "32000"]  # fmt: skip
STEP = 8192  # lengths are multiples of this (zigzag shards need 2 x ranks)


def run(out: Path, attention: str, seq_len: int, gpus: int, steps: int = 3) -> dict:
    """One run of the example; its JSON record (``out_of_memory`` set if it ran out)."""
    name = out / f"hf-{attention}-{gpus}gpu-{seq_len}.json"
    cmd = [
        EXAMPLE,
        "--attention",
        attention,
        "--seq-len",
        str(seq_len),
        "--steps",
        str(steps),
        "--json",
        str(name),
        *MODEL,
    ]
    if attention == "ringattn":
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", *cmd]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))))
    proc = subprocess.run(
        [sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=240
    )
    print(proc.stdout.strip(), flush=True)
    if not name.exists():
        print(proc.stderr[-3000:], flush=True)
        raise SystemExit(f"{attention} on {gpus} GPU(s), {seq_len} tokens: exit {proc.returncode}")
    record = json.loads(name.read_text())
    record["gpus"] = gpus
    timed = [s["tokens_per_s"] for s in record["steps"][1:]] or [float("nan")]
    record["tokens_per_s"] = statistics.median(timed)  # the first step warms up
    record["peak_gib"] = max((s["peak_gib"] for s in record["steps"]), default=float("nan"))
    return record


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_results")
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    small = [run(out, "sdpa", n, 1, steps=2) for n in (STEP, 2 * STEP)]
    slope = (small[1]["peak_gib"] - small[0]["peak_gib"]) / STEP  # GiB per token
    base = small[0]["peak_gib"] - slope * STEP
    one_gpu_holds = (capacity - base) / slope
    all_hold = gpus * (0.85 * capacity - base) / slope
    seq_len = int(min(1.5 * one_gpu_holds, all_hold)) // STEP * STEP
    print(
        f"peak memory ~ {base:.1f} GiB + {slope * 2**10:.2f} MiB/token: one GPU holds "
        f"~{one_gpu_holds:,.0f} tokens; running {seq_len}",
        flush=True,
    )
    runs = [
        run(out, "sdpa", seq_len, 1),
        run(out, "ringattn", seq_len, gpus),
        run(out, "sdpa", seq_len // 2, 1),
        run(out, "ringattn", seq_len // 2, gpus),
    ]
    result = {
        "model": MODEL,
        "gpu_memory_gib": capacity,
        "memory_fit": {
            "base_gib": base,
            "mib_per_token": slope * 2**10,
            "one_gpu_holds": one_gpu_holds,
        },
        "runs": small + runs,
    }
    (out / "hf-long-context.json").write_text(json.dumps(result, indent=1))
    rows = [
        "| attention | GPUs | tokens | peak GiB per GPU | tokens/s | loss (last step) |",
        "|---|---|---|---|---|---|",
    ]
    for r in small + runs:
        if "out_of_memory" in r:
            rows.append(
                f"| {r['attention']} | {r['gpus']} | {r['seq_len']} | out of memory "
                f"({capacity:.0f} GiB) | - | - |"
            )
        else:
            rows.append(
                f"| {r['attention']} | {r['gpus']} | {r['seq_len']} | "
                f"{r['peak_gib']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['steps'][-1]['loss']:.4f} |"
            )
    table = "\n".join(rows)
    (out / "hf-long-context.md").write_text(table + "\n")
    print(table)
    fits = "out_of_memory" in runs[0] and "out_of_memory" not in runs[1]
    raise SystemExit(0 if fits else 1)


if __name__ == "__main__":
    main()
