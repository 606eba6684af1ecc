"""What a batch of new documents costs the host beyond the kernels: sharding and the first
masked call (placement, key exchange, plans, BlockMask) against the same batch's second call.

``torchrun --nproc-per-node 2 benchmarks/new_batch_cost.py --seq-len 65536`` runs batches
of packed documents (masks_bench's heavy-tailed mixes, a new mix per batch) through
``ringattn.attention(strategy=...)`` forward+backward (bf16, 32/8 heads x 128). The first
``--warmup`` batches compile FlexAttention for their key sizes; for the rest it prints, per
batch, ms of: ``shard`` (q, k, v), the first call, the second call on the same batch, and
whether the first call compiled (a key size not seen before). The first call minus the
second is what a training run pays per batch for planning.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from masks_bench import gpu_rank_inputs, heavy_tailed_lengths  # noqa: E402

import ringattn  # noqa: E402


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--strategy", default="allgather")
    p.add_argument("--batches", type=int, default=14)
    p.add_argument("--warmup", type=int, default=6)
    args = p.parse_args()
    seq = args.seq_len
    rank, world, q, k, v = gpu_rank_inputs(seq)

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    rows = []
    for batch in range(args.batches):
        lengths = heavy_tailed_lengths(seq, 4096, 2 * world, seed=100 + batch)
        docs = ringattn.Documents.from_lengths(lengths)
        dist.barrier()
        t0 = now()
        local = [ringattn.shard(x, dim=2, documents=docs).requires_grad_() for x in (q, k, v)]
        t1 = now()
        times = []
        graphs = _graphs()
        for _ in range(2):
            start = now()
            out = ringattn.attention(*local, causal=True, strategy=args.strategy, documents=docs)
            out.backward(torch.ones_like(out))
            times.append((now() - start) * 1e3)
        compiled = _graphs() > graphs
        if batch >= args.warmup:
            rows.append(((t1 - t0) * 1e3, times[0], times[1], compiled, len(lengths)))
    every: list = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        print(f"{torch.cuda.get_device_name()}, {world} ranks, {seq} tokens, {args.strategy}")
        print("batch  documents  shard ms   first call ms   second call ms   compiled (per rank)")
        for i in range(len(rows)):
            cells = [every[r][i] for r in range(world)]
            print(
                f"{i:5d}  {cells[0][4]:9d}  "
                + "  ".join(f"{c[0]:6.1f}" for c in cells)
                + "  |  "
                + "  ".join(f"{c[1]:7.1f}" for c in cells)
                + "  |  "
                + "  ".join(f"{c[2]:7.1f}" for c in cells)
                + "  |  "
                + " ".join("yes" if c[3] else "no" for c in cells)
            )
        clean = [i for i in range(len(rows)) if not any(every[r][i][3] for r in range(world))]
        if clean:
            extra = [max(every[r][i][1] - every[r][i][2] for r in range(world)) for i in clean]
            shard = [max(every[r][i][0] for r in range(world)) for i in clean]
            print(
                f"batches without a compile: {len(clean)}; first call minus second, slowest "
                f"rank: median {statistics.median(extra):.1f} ms; shard median "
                f"{statistics.median(shard):.1f} ms"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
