"""Train the example's model on GPUs through each entry point, next to one GPU.

Run with ``torchrun --nproc-per-node=<GPUs> scripts/gpu_integration.py``. For each backend it
trains the tiny decoder of ``examples/train_tiny_lm.py`` in bfloat16 for a few SGD steps:
once on one GPU with SDPA on the full sequence (the same backend), and once through each of
``context_parallel``, ``attention_context_parallel`` and ``AttentionContextParallel`` on all
GPUs. A float32 one-GPU run is the reference. An entry passes when its losses stay as close
to the float32 losses as the one-GPU bfloat16 run's do (within 2x of its largest deviation,
plus 1e-3 relative). Prints a table last and writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_tiny_lm import ENTRIES, TinyLM, next_token_labels, parallelize, train_step  # noqa: E402

SDPA = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def run(entry: str, backend: str, dtype: torch.dtype, args, mesh, device) -> dict:
    """Losses per step and tokens/s (median step time after the first) for one entry."""
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers)
    model = parallelize(model.to(device=device, dtype=dtype), entry, mesh, backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=device, generator=g)
    batch = (ids, next_token_labels(ids), torch.arange(args.seq_len, device=device)[None])
    losses, times = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if entry == "single":
            # bf16 runs use the backend by name; float32 runs (the reference) efficient or math.
            kernels = (
                [SDPA[backend]]
                if dtype != torch.float32
                else [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            )
            with sdpa_kernel(kernels):
                losses.append(train_step(model, opt, entry, None, batch))
        else:
            losses.append(train_step(model, opt, entry, mesh, batch, backend))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return {"losses": losses, "tokens_per_s": args.seq_len / step_s, "peak_mib": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backends", default="cudnn,flash")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cuda", (world,))

    reference = run("single", "cudnn", torch.float32, args, mesh, device)["losses"]
    rows = []
    for backend in args.backends.split(","):
        single = run("single", backend, torch.bfloat16, args, mesh, device)
        allowed = 2 * max(abs(a - b) for a, b in zip(single["losses"], reference))
        single_row = {"backend": backend, "entry": "one GPU", **single}
        rows.append(single_row)
        for entry in ENTRIES:
            try:
                found = run(entry, backend, torch.bfloat16, args, mesh, device)
            except Exception as err:  # noqa: BLE001 - reported in the table
                rows.append({"backend": backend, "entry": entry, "error": repr(err)[:300]})
                continue
            worst = max(abs(a - b) for a, b in zip(found["losses"], reference))
            vs_single = max(abs(a - b) / abs(b) for a, b in zip(found["losses"], single["losses"]))
            rows.append(
                {
                    "backend": backend,
                    "entry": entry,
                    **found,
                    "max_abs_dev_from_fp32": worst,
                    "allowed_dev": allowed + 1e-3 * abs(reference[0]),
                    "max_rel_diff_vs_one_gpu_bf16": vs_single,
                    "speedup": found["tokens_per_s"] / single["tokens_per_s"],
                    "passed": worst <= allowed + 1e-3 * abs(reference[0]),
                }
            )
    if rank == 0:
        print(f"\nfloat32 one-GPU losses: {[round(x, 5) for x in reference]}")
        print(
            f"{args.seq_len} tokens, dim {args.dim}, {args.heads}/{args.kv_heads} heads, "
            f"{args.layers} layers, bf16, {world} GPUs\n"
        )
        print(
            f"{'backend':8} {'entry':28} {'tokens/s':>10} {'x 1 GPU':>8} {'peak MiB':>9} "
            f"{'max |dloss| vs fp32':>20} {'allowed':>8} {'vs 1-GPU bf16':>14}  result"
        )
        failed = 0
        for r in rows:
            if "error" in r:
                failed += 1
                print(f"{r['backend']:8} {r['entry']:28} ERROR {r['error']}")
                continue
            last = "" if r["entry"] == "one GPU" else ("PASS" if r["passed"] else "FAIL")
            failed += last == "FAIL"
            print(
                f"{r['backend']:8} {r['entry']:28} {r['tokens_per_s']:10,.0f} "
                f"{r.get('speedup', 1.0):8.2f} {r['peak_mib']:9.0f} "
                f"{r.get('max_abs_dev_from_fp32', float('nan')):20.2e} "
                f"{r.get('allowed_dev', float('nan')):8.1e} "
                f"{r.get('max_rel_diff_vs_one_gpu_bf16', float('nan')):14.2e}  {last}"
            )
            print(f"{'':38}losses {[round(x, 4) for x in r['losses']]}")
        if args.json:
            Path(args.json).write_text(json.dumps({"reference": reference, "rows": rows}, indent=1))
        print(f"\n{len(rows) - failed}/{len(rows)} rows passed")
    else:
        failed = 0
    failed_t = torch.tensor(failed, device=device)
    dist.broadcast(failed_t, 0)
    dist.destroy_process_group()
    return int(failed_t.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
