"""Which host-side calls wait during ring attention forward+backward (torch.profiler, rank 0).

``python benchmarks/host_waits.py --seq-len 32K`` spawns one rank per GPU, profiles a few
forward+backward iterations through autograd, and prints the host-side events (Python ops and
CUDA runtime calls) with the most self time: a call that waits for the GPU shows up on top.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from ringattn.cli.bench import BenchCase, _method  # noqa: E402
from ringattn.cli.commands import _tokens  # noqa: E402
from ringattn.cli.launch import spawn_ranks  # noqa: E402


def _worker(rank, world_size, device, say, case: BenchCase) -> str:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world_size,))
    with _method("ringattn-zigzag")(case, device, 0, mesh) as (step, _):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=_tokens, default=(32768,))
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--backend", default="cudnn")
    args = p.parse_args()
    for seq in args.seq_len:
        case = BenchCase(seq, True, args.backend, 32, args.kv_heads, 128, "fwd+bwd")
        print(f"== {case.label}: host self time, 3 iterations")
        print(spawn_ranks(_worker, torch.cuda.device_count(), "cuda", case))
    return 0


if __name__ == "__main__":
    sys.exit(main())
