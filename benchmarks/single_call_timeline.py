"""Where one synchronised forward+backward call spends its time, host and GPU side by side.

``torchrun --nproc-per-node 2 benchmarks/single_call_timeline.py --seq-len 4096`` profiles
one call (after warm-up, from an idle GPU) of one GPU's cuDNN attention and of
``ringattn.ring_attention``, and prints (rank 0) a timeline in microseconds from the call's
start: when the host entered the main ranges (the call, autograd's backward, graph
replays, copies) and when the GPU was busy or idle. A short call is as fast as the later of
"the host has issued the backward" and "the GPU has finished the forward", plus the
backward's GPU time; this shows which one it waits for.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

import short_sequences  # noqa: E402

# Host ranges worth showing (prefix match on the profiler's event names).
SHOWN = (
    "call",
    "ringattn",
    "GraphedRingFunction",
    "autograd::engine::evaluate_function: GraphedRingFunctionBackward",
    "aten::_foreach_copy_",
    "aten::clone",
    "aten::copy_",
    "cudaGraphLaunch",
    "aten::_scaled_dot_product_cudnn_attention",
)


def _profile_one(step) -> list:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(8):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("call"):
            step()
        torch.cuda.synchronize()
    return list(prof.events())


def _timeline(events: list, title: str) -> str:
    start = min(e.time_range.start for e in events if e.name == "call")
    lines = [f"--- {title} (us from the call's start)"]
    gpu = sorted(
        (e.time_range.start - start, e.time_range.end - start, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    host = sorted(
        (e.time_range.start - start, e.time_range.end - start, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(SHOWN)
    )
    for t0, t1, name in host:
        lines.append(f"  host {t0:8.1f} - {t1:8.1f}  {name[:80]}")
    # GPU busy intervals (kernels and copies merged), and the gaps between them.
    busy: list[list[float]] = []
    for t0, t1, _ in gpu:
        if busy and t0 <= busy[-1][1] + 2.0:
            busy[-1][1] = max(busy[-1][1], t1)
        else:
            busy.append([t0, t1])
    for i, (t0, t1) in enumerate(busy):
        if i:
            gap = t0 - busy[i - 1][1]
            lines.append(f"  gpu  idle {busy[i - 1][1]:8.1f} - {t0:8.1f}  ({gap:.1f})")
        lines.append(f"  gpu  busy {t0:8.1f} - {t1:8.1f}  ({t1 - t0:.1f})")
    if busy:
        lines.append(f"  GPU finished at {busy[-1][1]:.1f} us")
    return "\n".join(lines)


def _steps(seq: int) -> list[tuple[str, Callable[[], None]]]:
    """One GPU's cuDNN call and ringattn's, forward+backward, on the same inputs (those of
    benchmarks/short_sequences.py)."""
    steps = short_sequences._steps(seq, "ring_attention")
    return [(f"one GPU, {seq} tokens", steps.one_gpu), (f"ringattn, {seq} tokens", steps.ring)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, nargs="*", default=[4096])
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    for seq in args.seq_len:
        for title, step in _steps(seq):
            text = _timeline(_profile_one(step), title)
            if rank == 0:
                print(text, flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
