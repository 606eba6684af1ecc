"""``ringattn calibrate``: measure the cost model's constants on this machine.

On each local rank (all GPUs with NCCL, else CPU ranks with Gloo):

- attention throughput: SDPA forward+backward on one device, per backend and mask, at a
  range of sequence lengths (the points the planner interpolates between);
- links: a ring send/receive (each way) and an all-gather / all-to-all between the ranks;
- device memory bandwidth (a large copy) and the host time of small ringattn calls.

Inter-node links cannot be measured on one host; they keep the values passed in (defaults:
a 400 Gb/s NIC per GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..planner import Calibration
from .demo import median_wall_ms

__all__ = ["calibrate_worker"]

_HEADS, _KV_HEADS, _HEAD_DIM = 32, 8, 128


def _timed_ms(step: Callable[[], None], device: torch.device, reps: int = 5) -> float:
    return median_wall_ms(step, reps, device, warmup=2)


def _sdpa_step(
    device: torch.device, kernels: list, causal: bool, s: int, dtype: torch.dtype
) -> Callable[[], None]:
    """One forward+backward of SDPA on a sequence of ``s`` tokens (32/8 heads, dim 128)."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, _HEADS, s, _HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(1, _KV_HEADS, s, _HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        for _ in range(2)
    )
    dout = torch.randn_like(q)

    def step() -> None:
        with sdpa_kernel(kernels):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.autograd.grad(out, (q, k, v), dout)

    return step


def _attention_points(
    device: torch.device, backend: str, causal: bool, seq_lens: list[int], dtype: torch.dtype
) -> list[list[float]]:
    from torch.nn.attention import SDPBackend

    kernels = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
        "math": [SDPBackend.MATH],
    }[backend]
    points = []
    for s in seq_lens:
        ms = _timed_ms(_sdpa_step(device, kernels, causal, s, dtype), device)
        work = float(_HEADS * s * s * _HEAD_DIM)
        flops = 4.0 * work * (0.5 if causal else 1.0) * 3.5
        points.append([work, round(flops / (ms * 1e-3) / 1e12, 3)])
    return points


def _link_gbs(device: torch.device, group: Any, mib: int) -> dict[str, float]:
    """GB/s per rank: ring send/recv each way, all-gather and all-to-all bus bandwidth."""
    from ..comm import all_gather_into, ring_for

    world = dist.get_world_size(group)
    n = mib * 2**20 // 2
    send = torch.ones(n, device=device, dtype=torch.bfloat16)
    recv = torch.empty_like(send)
    ring = ring_for(group)

    def shift() -> None:
        ring.shift([send], [recv]).wait()

    p2p = send.numel() * 2 / (_timed_ms(shift, device) * 1e-3) / 1e9
    gathered = torch.empty((world, n // world), device=device, dtype=torch.bfloat16)
    piece = send[: n // world].contiguous()

    def gather() -> None:
        all_gather_into(gathered, piece, group)

    # Bus bandwidth: (world - 1) / world of the gathered bytes cross each rank's link.
    gather_gbs = gathered.numel() * 2 * (world - 1) / world / (_timed_ms(gather, device) * 1e-3)
    a2a_out = torch.empty_like(send)

    def all_to_all() -> None:
        dist.all_to_all_single(a2a_out, send, group=group)

    a2a_gbs = send.numel() * 2 * (world - 1) / world / (_timed_ms(all_to_all, device) * 1e-3)
    return {"p2p": p2p, "allgather": gather_gbs / 1e9, "alltoall": a2a_gbs / 1e9}


def _host_us(device: torch.device, group: Any) -> tuple[float, float]:
    """Host time per call (allgather, ulysses) and per ring step, from back-to-back calls
    too small for the device to matter (the host cannot run ahead of them)."""
    import ringattn

    world = dist.get_world_size(group)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (1, world, 64 * world, 64)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def per_call_us(strategy: str, reps: int = 30) -> float:
        def step() -> None:
            out = ringattn.attention(q, k, v, group, causal=True, strategy=strategy)
            torch.autograd.grad(out, (q, k, v), out)

        for _ in range(3):
            step()
        times = []
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) / reps * 1e6)
        return statistics.median(times)

    ring = per_call_us("ring")
    others = (per_call_us("allgather") + per_call_us("ulysses")) / 2
    return others, ring / world


def calibrate_worker(
    rank: int,
    world_size: int,
    device: torch.device,
    say: Callable[..., None],
    backends: tuple[str, ...],
    seq_lens: tuple[int, ...],
    link_mib: int,
    inter_gbs: float,
) -> dict[str, Any]:
    """Measure on every rank; rank 0's calibration (as a dict) is the result."""
    group = dist.group.WORLD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention: dict[str, dict[str, list[list[float]]]] = {}
    for backend in backends:
        attention[backend] = {}
        for causal in (True, False):
            say("running", f"{backend} {'causal' if causal else 'full'} attention")
            attention[backend]["causal" if causal else "full"] = _attention_points(
                device, backend, causal, list(seq_lens), dtype
            )
            say("advance")
    say("running", "links")
    links = (
        _link_gbs(device, group, link_mib)
        if world_size > 1
        else {"p2p": inter_gbs, "allgather": inter_gbs, "alltoall": inter_gbs}
    )
    say("advance")
    big = torch.empty(link_mib * 2**20, device=device, dtype=torch.uint8)
    copy_ms = _timed_ms(lambda: big.clone(), device)
    memory_gbs = 2 * big.numel() / (copy_ms * 1e-3) / 1e9
    per_call, per_step = _host_us(device, group) if world_size > 1 else (300.0, 100.0)
    say("advance")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory / 2**30
    else:
        import os

        name = "cpu"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cal = Calibration(
        device=f"{world_size}x {name}, torch {torch.__version__}",
        attention=attention,
        p2p_gbs_intra=round(links["p2p"], 2),
        p2p_gbs_inter=inter_gbs,
        collective_gbs_intra=round(min(links["allgather"], links["alltoall"]), 2),
        collective_gbs_inter=inter_gbs,
        memory_gbs=round(memory_gbs, 1),
        latency_us=20.0 if device.type == "cuda" else 100.0,
        host_us_per_step=round(per_step, 1),
        host_us_per_call=round(per_call, 1),
        memory_gib=round(memory, 1),
        notes={
            "seq_lens": list(seq_lens),
            "heads": f"{_HEADS}/{_KV_HEADS}",
            "head_dim": _HEAD_DIM,
            "dtype": str(dtype),
            "links": {k: round(v, 2) for k, v in links.items()},
        },
    )
    from dataclasses import asdict

    return asdict(cal)
