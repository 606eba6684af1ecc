"""Where ring attention's time goes: torch.profiler over a few forward+backward iterations.

Run on GPUs with ``python benchmarks/profile_ring.py --seq-len 32K --kv-heads 8`` (spawns
one rank per GPU). Rank 0 prints, per method (one GPU, ringattn), the GPU time by kernel
class (attention, NCCL, merge/elementwise/copy), the GPU-idle time inside an iteration, and
the host (CPU) time per iteration, then the top kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ringattn.cli.bench import BenchCase, _method  # noqa: E402
from ringattn.cli.commands import _tokens  # noqa: E402
from ringattn.cli.launch import spawn_ranks  # noqa: E402

ITERS = 5


def _kernel_class(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(s in low for s in ("flash", "fmha", "cudnn", "sm90", "attention", "xmma", "cutlass")):
        return "attention"
    if "merge_kernel" in low:
        return "merge"
    if "copy" in low or "memcpy" in low or "cat" in low:
        return "copy"
    if "memset" in low or "fill" in low:
        return "fill"
    return "elementwise/other"


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _profile(method: str, case: BenchCase, device: torch.device, mesh) -> dict:
    import torch.distributed as dist

    with _method(method)(case, device, 0, mesh) as (step, _):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start.record()
            for _ in range(ITERS):
                step()
            end.record()
            torch.cuda.synchronize()
        wall_ms = start.elapsed_time(end) / ITERS
    by_class: dict[str, float] = defaultdict(float)
    by_kernel: dict[str, float] = defaultdict(float)
    intervals, compute_intervals = [], []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            us = evt.device_time
            cls = _kernel_class(evt.name)
            by_class[cls] += us / 1e3 / ITERS
            by_kernel[evt.name[:90]] += us / 1e3 / ITERS
            interval = (evt.time_range.start, evt.time_range.end)
            intervals.append(interval)
            if cls != "nccl":
                compute_intervals.append(interval)
    busy = _busy_union(intervals) / 1e3 / ITERS
    compute_busy = _busy_union(compute_intervals) / 1e3 / ITERS
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "method": method,
        "wall_ms": wall_ms,
        "gpu_busy_ms": busy,
        "compute_busy_ms": compute_busy,
        "idle_ms": wall_ms - busy,
        "by_class_ms": dict(by_class),
        "top_kernels_ms": top,
    }


def _worker(rank, world_size, device, say, case: BenchCase, methods: list[str]):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world_size,))
    return [_profile(m, case, device, mesh) for m in methods]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=_tokens, default=(32768,))
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--backend", default="cudnn")
    p.add_argument("--mode", default="fwd+bwd")
    p.add_argument("--full", action="store_true", help="non-causal attention")
    p.add_argument("--methods", default="one-gpu,ringattn-zigzag")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    results = {}
    for seq in args.seq_len:
        case = BenchCase(seq, not args.full, args.backend, 32, args.kv_heads, 128, args.mode)
        methods = args.methods.split(",")
        out = spawn_ranks(_worker, torch.cuda.device_count(), "cuda", case, methods)
        results[case.label] = out
        print(f"\n== {case.label}")
        for r in out:
            classes = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["by_class_ms"].items()))
            print(
                f"{r['method']:<22} wall {r['wall_ms']:.3f} ms/iter | GPU busy "
                f"{r['gpu_busy_ms']:.3f} (compute {r['compute_busy_ms']:.3f}) | idle "
                f"{r['idle_ms']:.3f} | {classes}"
            )
            for name, ms in r["top_kernels_ms"][:8]:
                print(f"    {ms:8.3f} ms  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
