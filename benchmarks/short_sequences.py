"""Short sequences on local GPUs: ring attention against one GPU, timed two ways.

``torchrun --nproc-per-node=2 benchmarks/short_sequences.py --json out.json`` runs causal
GQA attention (bf16, 32/8 heads x 128, cuDNN), forward+backward, at 2K-16K tokens with the
installed ringattn's defaults (or ``--cuda-graphs auto``), and prints per length:

- ``b2b``: back-to-back calls (the median of 5 samples of 30 calls, CUDA events, slowest
  rank), as in training loops where the host runs ahead;
- ``single``: each call timed alone, starting from an idle GPU (synchronise, barrier, CUDA
  events around one forward+backward; the median of 30), where the host's time to issue
  the work shows in full;
- host microseconds per call (forward+backward, from an idle GPU) and per ring step (that
  divided by the forward's and backward's steps, 2 x ranks), and of the cross-rank check
  alone;
- the same for one GPU (``F.scaled_dot_product_attention`` on the whole sequence).

It then checks the last outputs and gradients against one GPU's, and that a call whose
shapes differ between ranks raises on every rank. Uses only API that every ringattn
release has, so the same script measures an older checkout (``PYTHONPATH=old/src``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn
from ringattn import checks

HEADS, KV_HEADS, DIM = 32, 8, 128


def _barrier() -> None:
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()


def _slowest(x: float) -> float:
    t = torch.tensor([x], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time(step) -> dict[str, float]:
    for _ in range(5):
        step()
    _barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        _barrier()
        start.record()
        for _ in range(30):
            step()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 30)
    b2b = statistics.median(samples)
    single, host = [], []
    for _ in range(30):
        _barrier()
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        single.append(start.elapsed_time(end))
    return {
        "b2b_ms": _slowest(b2b),
        "single_ms": _slowest(statistics.median(single)),
        "host_us": _slowest(statistics.median(host)),
    }


def _inputs(seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((1, HEADS, seq, DIM), (1, KV_HEADS, seq, DIM), (1, KV_HEADS, seq, DIM))
    q, k, v = (torch.randn(s, generator=g, device="cuda", dtype=torch.bfloat16) for s in shapes)
    dout = torch.randn(shapes[0], generator=g, device="cuda", dtype=torch.bfloat16)
    return [q, k, v, dout]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@dataclass
class _Steps:
    """One GPU's forward+backward and ringattn's on the same inputs (``full``, and this
    rank's ``shards``); ``ring`` keeps its last output and gradients in ``last``."""

    one_gpu: Callable[[], None]
    ring: Callable[[], None]
    ring_forward: Callable[[], None]
    full: list[torch.Tensor]
    shards: list[torch.Tensor]
    last: dict[str, object]


def _steps(seq: int, strategy: str) -> _Steps:
    full = _inputs(seq, seed=seq)
    q1, k1, v1 = (x.clone().requires_grad_() for x in full[:3])

    def one_gpu() -> None:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q1, k1, v1, is_causal=True, enable_gqa=True)
        torch.autograd.grad(out, (q1, k1, v1), full[3])

    shards = [ringattn.shard(x).contiguous() for x in full]
    q, k, v = (x.clone().requires_grad_() for x in shards[:3])
    last: dict[str, object] = {}

    def call():
        if strategy == "ring_attention":
            return ringattn.ring_attention(q, k, v, causal=True, backend="cudnn")
        return ringattn.attention(q, k, v, causal=True, backend="cudnn", strategy=strategy)

    def ring() -> None:
        out = call()
        last["out"] = out.detach()
        last["grads"] = torch.autograd.grad(out, (q, k, v), shards[3])

    def ring_forward() -> None:
        with torch.no_grad():
            call()

    return _Steps(one_gpu, ring, ring_forward, full, shards, last)


def _one_length(seq: int, world: int, strategy: str) -> dict:
    steps = _steps(seq, strategy)
    full, last = steps.full, steps.last
    one_gpu, ring, ring_forward = steps.one_gpu, steps.ring, steps.ring_forward
    base = _time(one_gpu)
    mine = _time(ring)
    fwd = _time(ring_forward)
    # Correctness of the timed calls (whatever path they took): against one GPU.
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        qr, kr, vr = (x.detach().clone().requires_grad_() for x in full[:3])
        ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), full[3])
    errors = [_rel(last["out"], ringattn.shard(ref.detach()))]
    errors += [_rel(a, ringattn.shard(b)) for a, b in zip(last["grads"], ref_grads)]
    row = {
        "tokens": seq,
        "one_gpu": base,
        "ringattn": mine,
        "ringattn_fwd": fwd,
        "b2b_speedup": base["b2b_ms"] / mine["b2b_ms"],
        "single_speedup": base["single_ms"] / mine["single_ms"],
        "host_us_per_step": mine["host_us"] / (2 * world),
        "fwd_host_us_per_step": fwd["host_us"] / world,
        "max_rel_error_vs_one_gpu": _slowest(max(errors)),
    }
    return row


def _symmetric() -> bool | None:
    """Whether ring shifts went through symmetric memory (None: this ringattn has none)."""
    try:
        from ringattn import symmetric
    except ImportError:
        return None
    return any(ring is not None for ring in symmetric._RINGS.values())


def _alignments() -> dict[str, bool] | None:
    """Which CUDA kernels align a causal block with fewer queries than keys bottom-right."""
    from ringattn import kernels

    if not hasattr(kernels, "causal_aligns_bottom_right"):
        return None
    q = torch.empty(1, 1, 1, DIM, device="cuda", dtype=torch.bfloat16)
    return {
        name: kernels.causal_aligns_bottom_right(kernels.get_kernel(name), q)
        for name in ("cudnn", "flash")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-lens", default="2048,4096,8192,16384")
    p.add_argument("--json", default=None)
    p.add_argument("--label", default="ringattn")
    p.add_argument(
        "--strategy",
        default="ring_attention",
        help="ring_attention (default), or a strategy of ringattn.attention (auto, allgather, ...)",
    )
    p.add_argument(
        "--cuda-graphs",
        choices=("default", "auto", "on", "off"),
        default="default",
        help="ringattn.set_cuda_graphs('auto', True or False) first; 'default' leaves it",
    )
    args = p.parse_args()
    if args.cuda_graphs != "default":
        ringattn.set_cuda_graphs({"auto": "auto", "on": True, "off": False}[args.cuda_graphs])
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for seq in (int(s) for s in args.seq_lens.split(",")):
        row = _one_length(seq, world, args.strategy)
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    # The cross-rank check alone (the description ring_attention compares).
    group = dist.group.WORLD
    desc = [0] * len(checks._FIELDS)
    for _ in range(20):
        checks._agree_across_ranks(group, torch.device("cuda", local), desc, None)
    _barrier()
    t0 = time.perf_counter()
    for _ in range(500):
        checks._agree_across_ranks(group, torch.device("cuda", local), desc, None)
    check_us = _slowest((time.perf_counter() - t0) / 500 * 1e6)
    # Ranks that disagree raise on every rank, and nothing hangs.
    q, k, v = (x.detach() for x in _inputs(4096, 1)[:3])
    q, k, v = (ringattn.shard(x) for x in (q, k, v))
    if rank == 1:
        q, k, v = (x[:, :, :-2] for x in (q, k, v))
    try:
        ringattn.ring_attention(q, k, v, causal=True)
        mismatch = "no error"
    except Exception as err:  # noqa: BLE001 - reported
        mismatch = f"{type(err).__name__}: {str(err)[:160]}"
    mismatches: list[object] = [None] * world
    dist.all_gather_object(mismatches, mismatch)
    result = {
        "label": args.label,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ranks": world,
        "strategy": args.strategy,
        "check_us_per_call": check_us,
        "causal_bottom_right": _alignments(),
        "symmetric_memory_shifts": _symmetric(),
        "mismatch": mismatches,
        "rows": rows,
    }
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()  # with any recorded programs alive


if __name__ == "__main__":
    main()
