"""``ringattn demo``: ring attention on local ranks, checked against one-process attention.

Spawns one process per rank (NCCL on GPUs, else Gloo on the CPU), runs forward+backward on a
long sequence, and rank 0 then runs the same attention in one process for comparison.
Progress events and the final measurements travel to the launching process over a queue.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .launch import spawn_ranks

__all__ = ["DemoConfig", "DemoResult", "default_config", "run_demo"]

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    ranks: int
    seq_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    backend: str
    causal: bool
    layout: str
    iters: int
    device: str  # "cuda" or "cpu"
    seed: int = 0


@dataclass(frozen=True)
class DemoResult:
    """Measurements of one demo run (rank 0's view; times are medians)."""

    config: DemoConfig
    backend_used: str
    ring_ms: float
    one_process_ms: float
    ring_peak_mib: float
    one_process_peak_mib: float
    ring_out_error: float
    one_process_out_error: float
    grad_difference: float
    passed: bool


def default_config(**overrides: Any) -> DemoConfig:
    """A size each kind of machine handles comfortably: all GPUs, else 4 CPU ranks."""
    gpus = torch.cuda.device_count()
    if gpus > 0:
        ranks = overrides.get("ranks") or gpus
        base = dict(
            ranks=ranks,
            seq_len=16384 * ranks,
            batch=1,
            heads=32,
            kv_heads=8,
            head_dim=128,
            dtype="bfloat16",
            backend="auto",
            causal=True,
            layout="zigzag",
            iters=5,
            device="cuda",
        )
    else:
        base = dict(
            ranks=4,
            seq_len=4096,
            batch=1,
            heads=8,
            kv_heads=4,
            head_dim=64,
            dtype="float32",
            backend="auto",
            causal=True,
            layout="zigzag",
            iters=3,
            device="cpu",
        )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DemoConfig(**base)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- memory


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS on Linux.
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.start = _rss_bytes("VmRSS") or 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_mib = max(0, peak - self.start) / 2**20


# ----------------------------------------------------------------------------- worker


def median_wall_ms(
    fn: Callable[[], None], iters: int, device: torch.device, warmup: int = 1
) -> float:
    """Median wall time in ms of ``fn`` over ``iters`` synchronised runs, after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sampled_reference_error(out: torch.Tensor, q, k, v, cfg: DemoConfig) -> float:
    """Relative RMS error of ``out`` on sampled query rows against float64 attention."""
    rows = torch.linspace(0, cfg.seq_len - 1, steps=min(64, cfg.seq_len)).long().to(q.device)
    q_rows = q.index_select(2, rows).double()
    groups = cfg.heads // cfg.kv_heads
    k64 = k.double().repeat_interleave(groups, 1)
    v64 = v.double().repeat_interleave(groups, 1)
    scores = torch.matmul(q_rows, k64.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
    if cfg.causal:
        keys = torch.arange(cfg.seq_len, device=q.device)
        scores = scores.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
    want = torch.matmul(torch.softmax(scores, dim=-1), v64)
    return float((out.index_select(2, rows).double() - want).norm() / want.norm())


def _worker(
    rank: int, world_size: int, device: torch.device, say: Callable[..., None], cfg: DemoConfig
) -> DemoResult | None:
    import ringattn

    say("step", "inputs")
    dtype = _DTYPES[cfg.dtype]
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    shape_q = (cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim)
    shape_kv = (cfg.batch, cfg.kv_heads, cfg.seq_len, cfg.head_dim)
    q, k, v, dout = (
        torch.randn(s, generator=g, device=device, dtype=dtype)
        for s in (shape_q, shape_kv, shape_kv, shape_q)
    )
    shards = [ringattn.shard(x, layout=cfg.layout).detach().clone() for x in (q, k, v, dout)]
    if rank != 0:
        del q, k, v, dout  # only rank 0 runs the one-process comparison
    qs, ks, vs, dos = shards
    for x in (qs, ks, vs):
        x.requires_grad_(True)

    def ring_step() -> None:
        for x in (qs, ks, vs):
            x.grad = None
        out = ringattn.ring_attention(
            qs, ks, vs, causal=cfg.causal, layout=cfg.layout, backend=cfg.backend
        )
        out.backward(dos)
        say("step", "ring")

    say("step", "ring", cfg.iters + 1)
    with _PeakMemory(device) as ring_mem:
        ring_ms = median_wall_ms(ring_step, cfg.iters, device)
    dist.barrier()
    out = ringattn.ring_attention(
        qs.detach(),
        ks.detach(),
        vs.detach(),
        causal=cfg.causal,
        layout=cfg.layout,
        backend=cfg.backend,
    )
    full = {
        "out": ringattn.unshard(out, layout=cfg.layout),
        **{
            name: ringattn.unshard(x.grad, layout=cfg.layout)
            for name, x in zip(("dq", "dk", "dv"), (qs, ks, vs))
        },
    }
    from ..kernels import select_kernel

    backend_used = select_kernel(cfg.backend, qs, ks, vs, cfg.causal).name
    if rank != 0:
        return None
    shards = qs = ks = vs = dos = None  # free them before the one-process run
    return _one_process(cfg, q, k, v, dout, full, backend_used, ring_ms, ring_mem, device, say)


def _one_process(cfg, q, k, v, dout, ring_full, backend_used, ring_ms, ring_mem, device, say):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa_backends = {
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "math": [SDPBackend.MATH],
    }.get(backend_used, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    result: dict[str, torch.Tensor] = {}

    def one_step() -> None:
        for x in (q, k, v):
            x.grad = None
        with sdpa_kernel(sdpa_backends):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=True)
        out.backward(dout)
        result["out"] = out.detach()
        say("step", "one process")

    say("step", "one process", cfg.iters + 1)
    with _PeakMemory(device) as mem:
        one_ms = median_wall_ms(one_step, cfg.iters, device)
    say("step", "check")
    ring_err = _sampled_reference_error(ring_full["out"], q.detach(), k.detach(), v.detach(), cfg)
    one_err = _sampled_reference_error(result["out"], q.detach(), k.detach(), v.detach(), cfg)
    grad_diff = max(
        float((ring_full[name].float() - x.grad.float()).abs().max() / x.grad.float().abs().max())
        for name, x in (("dq", q), ("dk", k), ("dv", v))
    )
    eps = torch.finfo(q.dtype).eps
    grad_tolerance = 1e-4 if q.dtype in (torch.float32, torch.float64) else 8 * eps
    passed = ring_err <= max(1.5 * one_err, eps) and grad_diff <= grad_tolerance
    return DemoResult(
        config=cfg,
        backend_used=backend_used,
        ring_ms=ring_ms,
        one_process_ms=one_ms,
        ring_peak_mib=ring_mem.peak_mib,
        one_process_peak_mib=mem.peak_mib,
        ring_out_error=ring_err,
        one_process_out_error=one_err,
        grad_difference=grad_diff,
        passed=passed,
    )


def run_demo(
    cfg: DemoConfig, on_event: Callable[..., None] = lambda *e: None, timeout_s: float = 1800
) -> DemoResult:
    """Run the demo on ``cfg.ranks`` local processes and return rank 0's measurements.

    ``on_event("step", name[, total])`` reports progress as it happens.
    """
    return spawn_ranks(_worker, cfg.ranks, cfg.device, cfg, on_event=on_event, timeout_s=timeout_s)


def result_record(result: DemoResult) -> dict[str, Any]:
    """A flat JSON-ready dict of a result."""
    record = asdict(result)
    record.update(record.pop("config"))
    return record
