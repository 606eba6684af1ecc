"""Ulysses' exchange copies on one GPU: what one rank's forward+backward spends reordering.

``python benchmarks/head_exchange_copies.py --ranks 4 --seq-len 16384`` runs, for one rank
of an N-rank Ulysses call (bf16, 32/8 heads x 128, batch 1, zigzag pieces), the four head
exchanges of a forward+backward (q, k and v to heads; the output back; its gradient to
heads; dq, dk and dv back) with the all-to-all replaced by handing the send buffer back
(no communication), once with the Triton row copy (ringattn.key_rows) and once with the
``index_put_`` scatter it replaces. It prints the GPU time per forward+backward by kernel
and the host time per forward+backward, and checks that both give identical tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from masks_bench import _gpu_spans  # noqa: E402

from ringattn import strategies  # noqa: E402
from ringattn.layout import kv_heads_for_ulysses  # noqa: E402

ITERS = 20


def _hand_back(self, send: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return send.clone()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16384)
    args = p.parse_args()
    n, dev = args.ranks, torch.device("cuda")
    strategies._HeadExchange._exchange = _hand_back
    ex = strategies._HeadExchange(None, n, strategies._piece_ids(0, n, n, "zigzag"))
    s = args.seq_len // n
    kv = kv_heads_for_ulysses(32, 8, n)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn((1, 32, s, 128), generator=g, device=dev, dtype=torch.bfloat16)
    k, v = (
        torch.randn((1, kv, s, 128), generator=g, device=dev, dtype=torch.bfloat16) for _ in "kv"
    )

    def step() -> tuple[torch.Tensor, ...]:
        qh, kh, vh = ex.to_heads(q, k, v)
        (out,) = ex.to_sequence(qh)  # the output's way back (qh stands in for it)
        (dout,) = ex.to_heads(out)
        return qh, kh, vh, dout, *ex.to_sequence(qh, kh, vh)

    print(f"{n} ranks, {args.seq_len} tokens: one rank's exchange copies per forward+backward")
    triton, results = strategies.runs_triton, {}
    for mode in ("triton", "index_put"):
        strategies.runs_triton = triton if mode == "triton" else (lambda *_: False)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ITERS):
            step()
        host_us = (time.perf_counter() - t0) / ITERS * 1e6
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(ITERS):
                step()
            torch.cuda.synchronize()
        by_name: dict[str, float] = {}
        for start, end, name in _gpu_spans(prof.events()):
            by_name[name[:80]] = by_name.get(name[:80], 0.0) + (end - start) / 1e3 / ITERS
        print(f"  {mode}: GPU {sum(by_name.values()):.3f} ms, host {host_us:.0f} us (launching)")
        for name, ms in sorted(by_name.items(), key=lambda x: -x[1]):
            if ms > 0.002:
                print(f"    {ms:.3f}  {name}")
        results[mode] = step()
    same = all(torch.equal(a, b) for a, b in zip(results["triton"], results["index_put"]))
    print(f"  identical both ways: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
