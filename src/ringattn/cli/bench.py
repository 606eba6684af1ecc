"""``ringattn bench``: one device vs PyTorch's ``context_parallel`` vs ringattn, side by side.

Every method runs in the same launch, on the same ranks, on the same inputs:

- ``one-gpu``: ``F.scaled_dot_product_attention`` on the full sequence, one device per rank
  (all ranks run it at once, each on its own device; the slowest counts);
- ``torch-cp-allgather`` / ``torch-cp-alltoall``: PyTorch's experimental
  ``context_parallel`` with either K/V rotation (load balancing on for causal attention, off
  otherwise, as it requires);
- ``ringattn-zigzag`` / ``ringattn-contiguous``: :func:`ringattn.ring_attention`;
  ``ringattn-allgather`` / ``-ulysses`` / ``-hybrid`` / ``-auto``: :func:`ringattn.attention`
  with that strategy.

Times are medians over samples; each sample times enough back-to-back iterations (device
events on CUDA) to last ``min_sample_ms``, after a barrier, and counts the slowest rank.
Peak memory per rank is the allocator's peak during the method's runs above what was
allocated before them, plus the method's local inputs.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "BenchCase",
    "BenchPlan",
    "BenchRow",
    "cpu_plan",
    "gpu_plan",
    "quick_plan",
    "run_bench",
]

METHODS: tuple[str, ...] = (
    "one-gpu",
    "torch-cp-allgather",
    "torch-cp-alltoall",
    "ringattn-zigzag",
    "ringattn-contiguous",
)
# Also available: "ringattn-zigzag-graphs" (ringattn.set_cuda_graphs(True); CUDA only),
# "ringattn-zigzag-eager" (set_cuda_graphs(False)), and
# ringattn.attention's other strategies: "ringattn-allgather", "ringattn-ulysses",
# "ringattn-hybrid" (on an N/2 x 2 mesh) and "ringattn-auto" (the planner's pick).
STRATEGY_METHODS = ("allgather", "ulysses", "hybrid", "auto")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class BenchCase:
    """One attention problem (the full sequence; every method splits it its own way)."""

    seq_len: int
    causal: bool
    backend: str
    heads: int
    kv_heads: int
    head_dim: int
    mode: str  # "fwd" or "fwd+bwd"
    batch: int = 1
    dtype: str = "bfloat16"

    @property
    def flops(self) -> float:
        """Attention FLOPs (the two matmuls forward; backward counted as 2.5x forward)."""
        forward = 4.0 * self.batch * self.heads * self.seq_len**2 * self.head_dim
        forward *= 0.5 if self.causal else 1.0
        return forward * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def label(self) -> str:
        return (
            f"{self.backend} {'causal' if self.causal else 'full'} "
            f"{self.heads}/{self.kv_heads} {self.mode} {self.seq_len // 1024}K"
        )


@dataclass
class BenchRow:
    """One method's measurement on one case."""

    case: BenchCase
    method: str
    ms: float | None = None
    tflops_per_device: float | None = None
    speedup: float | None = None  # one device's time / this method's time
    vs_torch_cp: float | None = None  # fastest PyTorch CP method's time / this method's time
    peak_mib: float | None = None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """A flat JSON-ready dict."""
        out = asdict(self)
        out.update(out.pop("case"))
        return out


@dataclass(frozen=True)
class BenchPlan:
    """What to run and how to time it."""

    cases: tuple[BenchCase, ...]
    methods: tuple[str, ...] = METHODS
    warmup: int = 2
    samples: int = 5
    min_sample_ms: float = 20.0
    # Layouts other than zigzag only up to this length (causal contiguous is the slow,
    # unbalanced layout; for full attention both do identical work).
    contiguous_max_seq: int = 32768
    seed: int = 0

    def methods_for(self, case: BenchCase) -> tuple[str, ...]:
        return tuple(
            m
            for m in self.methods
            if not (m == "ringattn-contiguous" and case.seq_len > self.contiguous_max_seq)
        )


def _grid(
    seq_lens: tuple[int, ...],
    backends: tuple[str, ...],
    kv_heads: tuple[int, ...],
    causal: tuple[bool, ...],
    modes: tuple[str, ...],
    heads: int,
    head_dim: int,
) -> list[BenchCase]:
    return [
        BenchCase(s, c, b, heads, kv, head_dim, m)
        for b in backends
        for m in modes
        for c in causal
        for kv in kv_heads
        for s in seq_lens
    ]


def gpu_plan(
    seq_lens: tuple[int, ...] = (4096, 8192, 32768, 65536, 131072),
    backends: tuple[str, ...] = ("cudnn", "flash"),
    kv_heads: tuple[int, ...] = (32, 8),
    causal: tuple[bool, ...] = (True, False),
    modes: tuple[str, ...] = MODES,
    long_seq_lens: tuple[int, ...] = (262144,),
) -> BenchPlan:
    """The full GPU suite: bf16, batch 1, 32 heads, head dim 128.

    ``long_seq_lens`` add causal cuDNN forward+backward rows at those lengths.
    """
    cases = _grid(seq_lens, backends, kv_heads, causal, modes, heads=32, head_dim=128)
    if "cudnn" in backends and True in causal and "fwd+bwd" in modes:
        cases += _grid(long_seq_lens, ("cudnn",), kv_heads, (True,), ("fwd+bwd",), 32, 128)
    return BenchPlan(tuple(cases))


def quick_plan() -> BenchPlan:
    """A few GPU rows that cover the targets: causal cuDNN, MHA and GQA, short to 32K."""
    return BenchPlan(
        tuple(_grid((4096, 8192, 32768), ("cudnn",), (32, 8), (True,), MODES, 32, 128)),
        samples=5,
    )


def cpu_plan() -> BenchPlan:
    """Small sizes that run on CPU ranks with Gloo in a minute."""
    cases = _grid((1024, 2048), ("cpu",), (8, 2), (True, False), MODES, heads=8, head_dim=64)
    cases = [replace(c, dtype="float32") for c in cases]
    return BenchPlan(tuple(cases), warmup=1, samples=3, min_sample_ms=0.0)


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(step: Callable[[], None], reps: int, device: torch.device) -> float:
    """Milliseconds per iteration of ``reps`` back-to-back runs."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) * 1e3 / reps


def _measure(step: Callable[[], None], plan: BenchPlan, device: torch.device, group: Any) -> float:
    """Median ms per iteration, the slowest rank counted per sample."""
    for _ in range(plan.warmup):
        step()
    _sync(device)
    dist.barrier(group)
    estimate = _time_once(step, 1, device)
    reps = max(1, min(50, math.ceil(plan.min_sample_ms / max(estimate, 1e-3))))
    # Every rank must run the same number of iterations.
    reps_t = torch.tensor([reps], dtype=torch.int64, device=device)
    dist.all_reduce(reps_t, op=dist.ReduceOp.MAX, group=group)
    reps = int(reps_t.item())
    samples = []
    for _ in range(plan.samples):
        _sync(device)
        dist.barrier(group)
        samples.append(_time_once(step, reps, device))
    times = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(times.tolist())


class _Memory:
    """The allocator's peak above the starting point (CUDA only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mib: float | None = None

    def __enter__(self) -> _Memory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.start
            self.peak_mib = peak / 2**20


# ----------------------------------------------------------------------------- methods


def _sdpa_backends(backend: str) -> list:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
        "cpu": [SDPBackend.FLASH_ATTENTION],
    }[backend]


def _inputs(case: BenchCase, device: torch.device, seed: int) -> list[torch.Tensor]:
    """q, k, v and the output gradient on the full sequence, the same on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = _DTYPES[case.dtype]
    shape_q = (case.batch, case.heads, case.seq_len, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.seq_len, case.head_dim)
    return [
        torch.randn(s, generator=g, device=device, dtype=dtype)
        for s in (shape_q, shape_kv, shape_kv, shape_q)
    ]


def _attention_step(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    backward: bool,
) -> Callable[[], None]:
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)

        def step() -> None:
            out = attend(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)

        return step

    def forward_only() -> None:
        with torch.no_grad():
            attend(q, k, v)

    return forward_only


def _nbytes(*xs: torch.Tensor) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


@contextlib.contextmanager
def _one_gpu(case: BenchCase, device: torch.device, seed: int, mesh: Any) -> Iterator[tuple]:
    from torch.nn.attention import sdpa_kernel

    q, k, v, dout = _inputs(case, device, seed)
    gqa = case.kv_heads != case.heads

    def attend(q, k, v):
        with sdpa_kernel(_sdpa_backends(case.backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal, enable_gqa=gqa)

    yield _attention_step(attend, q, k, v, dout, case.mode == "fwd+bwd"), _nbytes(q, k, v, dout)


_STRATEGY_MESHES: dict[tuple[str, int], Any] = {}


def _strategy_mesh(device: torch.device, strategy: str) -> Any:
    """None (the world) for 1-D strategies; a 2-D mesh (N/2 x 2) for the hybrid."""
    if strategy != "hybrid":
        return None
    world = dist.get_world_size()
    key = (device.type, world)
    if key not in _STRATEGY_MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _STRATEGY_MESHES[key] = init_device_mesh(device.type, (world // 2, 2))
    return _STRATEGY_MESHES[key]


@contextlib.contextmanager
def _strategy(
    case: BenchCase, device: torch.device, seed: int, mesh: Any, strategy: str
) -> Iterator[tuple]:
    import ringattn

    mesh = _strategy_mesh(device, strategy)
    shards = [ringattn.shard(x, mesh).contiguous() for x in _inputs(case, device, seed)]
    q, k, v, dout = shards

    def attend(q, k, v):
        return ringattn.attention(
            q, k, v, mesh, causal=case.causal, strategy=strategy, backend=case.backend
        )

    yield _attention_step(attend, q, k, v, dout, case.mode == "fwd+bwd"), _nbytes(*shards)


@contextlib.contextmanager
def _ringattn(
    case: BenchCase, device: torch.device, seed: int, mesh: Any, layout: str
) -> Iterator[tuple]:
    import ringattn

    # "-graphs": always replay; "-eager": never; else the default ("auto").
    graphs: bool | str = "auto"
    if layout.endswith("-graphs"):
        graphs, layout = True, layout.removesuffix("-graphs")
    elif layout.endswith("-eager"):
        graphs, layout = False, layout.removesuffix("-eager")
    elif layout.endswith("-auto"):
        layout = layout.removesuffix("-auto")
    ringattn.set_cuda_graphs(graphs)  # type: ignore[arg-type]

    shards = [ringattn.shard(x, layout=layout).contiguous() for x in _inputs(case, device, seed)]
    q, k, v, dout = shards

    def attend(q, k, v):
        return ringattn.ring_attention(
            q, k, v, causal=case.causal, layout=layout, backend=case.backend
        )

    try:
        yield _attention_step(attend, q, k, v, dout, case.mode == "fwd+bwd"), _nbytes(*shards)
    finally:
        ringattn.set_cuda_graphs("auto")


@contextlib.contextmanager
def _torch_cp(
    case: BenchCase, device: torch.device, seed: int, mesh: Any, rotate: str
) -> Iterator[tuple]:
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method
    from torch.nn.attention import sdpa_kernel

    q, k, v, dout = _inputs(case, device, seed)
    gqa = case.kv_heads != case.heads
    saved = _cp_options.enable_load_balance
    # PyTorch's CP balances load only for causal attention and needs it off otherwise.
    _cp_options.enable_load_balance = case.causal
    set_rotate_method(rotate)
    buffers = [q, k, v, dout]
    try:
        with context_parallel(
            mesh, buffers=buffers, buffer_seq_dims=[2] * 4, no_restore_buffers=set(buffers)
        ):

            def attend(q, k, v):
                with sdpa_kernel(_sdpa_backends(case.backend)):
                    return F.scaled_dot_product_attention(
                        q, k, v, is_causal=case.causal, enable_gqa=gqa
                    )

            yield (
                _attention_step(attend, q, k, v, dout, case.mode == "fwd+bwd"),
                _nbytes(q, k, v, dout),
            )
    finally:
        _cp_options.enable_load_balance = saved
        set_rotate_method("allgather")


def _method(name: str) -> Callable[..., contextlib.AbstractContextManager]:
    if name == "one-gpu":
        return _one_gpu
    if name.removeprefix("ringattn-") in STRATEGY_METHODS:
        strategy = name.removeprefix("ringattn-")
        return lambda case, device, seed, mesh: _strategy(case, device, seed, mesh, strategy)
    if name.startswith("ringattn-"):
        layout = name.removeprefix("ringattn-")
        return lambda case, device, seed, mesh: _ringattn(case, device, seed, mesh, layout)
    if name.startswith("torch-cp-"):
        rotate = name.removeprefix("torch-cp-")
        return lambda case, device, seed, mesh: _torch_cp(case, device, seed, mesh, rotate)
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


def _run_method(
    name: str, case: BenchCase, plan: BenchPlan, device: torch.device, mesh: Any
) -> BenchRow:
    row = BenchRow(case, name)
    group = mesh.get_group()
    try:
        with _method(name)(case, device, plan.seed, mesh) as (step, input_bytes):
            with _Memory(device) as memory:
                row.ms = _measure(step, plan, device, group)
            if memory.peak_mib is not None:
                row.peak_mib = memory.peak_mib + input_bytes / 2**20
    except Exception as err:  # noqa: BLE001 - a method that cannot run is reported, not fatal
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        _sync(device)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # Every rank must agree on whether it worked before the next method's collectives.
    failed = torch.tensor([row.error is not None], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item() and row.error is None:
        row.ms, row.error = None, "failed on another rank"
    return row


def bench_worker(
    rank: int, world_size: int, device: torch.device, say: Callable[..., None], plan: BenchPlan
) -> list[dict[str, Any]]:
    """Run every case of ``plan`` on this rank; rank 0 returns the rows as dicts.

    Ratios between methods are filled in by :func:`run_bench` once every method has run.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,))
    records = []
    for case in plan.cases:
        for name in plan.methods_for(case):
            say("running", f"{case.label} {name}")
            row = _run_method(name, case, plan, device, mesh)
            records.append(row.record())
            say("advance")
            say("row", row.record())
    return records


def fill_ratios(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Add TFLOP/s per device, speedup over one device and the ratio to PyTorch's CP."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in _CASE_KEYS), []).append(r)
    for rows in groups.values():
        case = BenchCase(**{k: rows[0][k] for k in _CASE_KEYS})
        by_method = {r["method"]: r for r in rows}
        one = by_method.get("one-gpu", {}).get("ms")
        cps = [r["ms"] for n, r in by_method.items() if n.startswith("torch-cp-") and r["ms"]]
        for r in rows:
            if r["ms"] is None:
                continue
            devices = 1 if r["method"] == "one-gpu" else world_size
            r["tflops_per_device"] = case.flops / (r["ms"] * 1e-3) / devices / 1e12
            r["speedup"] = one / r["ms"] if one else None
            r["vs_torch_cp"] = min(cps) / r["ms"] if cps else None
    return records


_CASE_KEYS = tuple(f for f in BenchCase.__dataclass_fields__)


def _order(records: list[dict[str, Any]], plan: BenchPlan) -> list[dict[str, Any]]:
    """Rows in plan order: case by case, methods in ``plan.methods`` order."""
    rank = {m: i for i, m in enumerate(plan.methods)}
    cases = {tuple(asdict(c)[k] for k in _CASE_KEYS): i for i, c in enumerate(plan.cases)}
    return sorted(
        records, key=lambda r: (cases.get(tuple(r[k] for k in _CASE_KEYS), 0), rank[r["method"]])
    )


def _ignore(*event: Any) -> None:
    pass


def run_bench(
    plan: BenchPlan,
    ranks: int,
    device_type: str,
    on_event: Callable[..., None] = lambda *e: None,
    timeout_s: float = 7200,
) -> list[dict[str, Any]]:
    """Run ``plan`` on ``ranks`` local ranks (or as this torchrun rank); rank 0's rows.

    Spawned locally, PyTorch's CP methods run in processes of their own, after the others:
    PyTorch's cuDNN attention caches execution plans by shape and stride order, so plans
    one caller built for other strides can be reused by another in the same process.
    """
    from .launch import launched_by_torchrun, run_under_torchrun, spawn_ranks

    units = sum(len(plan.methods_for(c)) for c in plan.cases)
    if launched_by_torchrun() and os.environ.get("RANK") != "0":
        on_event = _ignore  # only rank 0 reports
    on_event("start", units)
    if launched_by_torchrun():
        records = run_under_torchrun(bench_worker, device_type, plan, on_event=on_event)
        world_size = int(os.environ["WORLD_SIZE"])
        return fill_ratios(records, world_size) if records else []
    records = []
    theirs = tuple(m for m in plan.methods if m.startswith("torch-cp-"))
    ours = tuple(m for m in plan.methods if m not in theirs)
    for methods in (ours, theirs):
        if methods:
            part = replace(plan, methods=methods)
            records += spawn_ranks(
                bench_worker, ranks, device_type, part, on_event=on_event, timeout_s=timeout_s
            )
    return _order(fill_ratios(records, ranks), plan)
