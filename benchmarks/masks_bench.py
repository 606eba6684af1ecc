"""Masked attention across GPUs: packed documents, sliding windows and a prefix-LM mask_mod.

For each case, forward+backward of one attention layer (bf16, 32 query / 8 K/V heads x 128):

- ``one-gpu-flex``: one GPU runs the whole batch with compiled FlexAttention and the case's
  BlockMask; ``one-gpu-varlen``: variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``, documents as ``cu_seqlens``, the window as
  ``window_size``), where this torch has it. The faster of the two is "one GPU's fastest";
  speedups are over it.
- ``ringattn-<strategy>``: ringattn on all ranks with the case's masks (``documents=``,
  ``window=``, ``mask_mod=``): ``ring`` (:func:`ringattn.ring_attention`), and
  :func:`ringattn.attention` with ``auto`` (the planner's pick), ``allgather`` and
  ``ulysses``. Windows also run the ring on the contiguous layout, where K/V travel only to
  the next rank.
- ``torch-cp-flex`` (``--torch-cp``, run as its own launch: PyTorch's context parallelism and
  cuDNN plans have clashed in one process): PyTorch's experimental ``context_parallel``
  with FlexAttention and K/V all-gathered, with its per-document head-tail load balancer
  (``-balanced``) and without (``-unbalanced``).

``imbalance`` is the busiest rank's attention work over the mean, minus one, with the work of a
query the number of keys its mask lets it see, counted from the positions each rank holds.
Times are medians of ``--iters`` iterations after ``--warmup``, each timed from an idle
GPU with device events after a barrier, slowest rank; ``--back-to-back N`` also times N
iterations issued without waiting (``b2b_ms``), as a model's layers run;
``--vary-documents`` runs each ringattn row once on another batch's documents first (the
timed calls then run what a training run's later batches run; ``new_documents_s`` is that
first call's time, compiles included); ``--host`` prints each rank's
host time per call and a cProfile of the slowest host. ``--dry-run``
runs every row on CPU (Gloo) at tiny sizes, in float32, to check the script.

    torchrun --nproc-per-node 2 benchmarks/masks_bench.py --json masks.json
    torchrun --nproc-per-node 2 benchmarks/masks_bench.py --torch-cp --json masks-torchcp.json
    python benchmarks/masks_bench.py --report masks.json masks-torchcp.json --md masks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import inspect
import json
import math
import os
import random
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# case name -> (kind, sequence length): the measurement points.
GPU_CASES = ("docs-64K", "window-128K", "prefix-64K", "docs-256K", "window-512K")
DRY_CASES = ("docs-512", "window-512", "prefix-512")
STRATEGIES = ("ring", "auto", "allgather", "ulysses")


@dataclass(frozen=True)
class Case:
    """One measurement: the mask and the sizes."""

    name: str
    kind: str  # "docs", "window" or "prefix"
    seq: int
    lengths: tuple[int, ...]  # documents ("docs"); one document otherwise
    window: int  # tokens a query sees back, itself included ("window")
    prefix: int  # keys every query sees ("prefix")

    def visible_keys(self, positions: torch.Tensor) -> torch.Tensor:
        """How many keys each query position sees (its attention work)."""
        if self.kind == "docs":
            starts = torch.tensor([0, *self.lengths[:-1]]).cumsum(0)
            doc = torch.repeat_interleave(
                torch.arange(len(self.lengths)), torch.tensor(self.lengths)
            )
            return positions - starts[doc[positions]] + 1
        if self.kind == "window":
            return (positions + 1).clamp(max=self.window)
        return (positions + 1).clamp(min=self.prefix)


def gpu_rank_inputs(
    seq: int, fake_world: int = 0
) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the one-purpose GPU scripts beside this bench: NCCL set up on this rank's GPU,
    then ``(rank, world, q, k, v)``, the full sequence's bf16 inputs (32/8 heads x 128,
    batch 1, the same on every rank). ``fake_world=N`` makes this process rank 0 of N over
    PyTorch's ``fake`` backend instead (collectives move nothing): host-time measurements
    on one GPU."""
    if fake_world:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=fake_world)
    else:
        dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn((1, h, seq, 128), generator=g, device=dev, dtype=torch.bfloat16)
        for h in (32, 8, 8)
    )
    return rank, world, q, k, v


def heavy_tailed_lengths(seq: int, mean: int, unit: int, seed: int = 0) -> list[int]:
    """Document lengths summing to ``seq``: one long document (a quarter of the batch) and
    log-normal lengths of mean about ``mean``; multiples of ``unit`` (PyTorch's per-document
    balancer needs lengths divisible by 2 x ranks; ringattn takes any)."""
    rng = random.Random(seed)
    lengths = [max(unit, seq // 4 // unit * unit)]
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    while sum(lengths) < seq:
        n = max(unit, round(rng.lognormvariate(mu, sigma) / unit) * unit)
        lengths.append(min(n, seq - sum(lengths)))
    rng.shuffle(lengths)
    return lengths


def make_case(name: str, world: int, mean_doc: int, window: int) -> Case:
    kind, size = name.split("-")
    seq = int(size[:-1]) * 1024 if size.endswith("K") else int(size)
    scale = seq / 65536 if seq < 65536 else 1.0  # tiny dry-run cases keep the proportions
    if kind == "docs":
        lengths = heavy_tailed_lengths(seq, max(4, round(mean_doc * scale)), 2 * world)
        return Case(name, kind, seq, tuple(lengths), 0, 0)
    if kind == "window":
        return Case(name, kind, seq, (seq,), max(2, round(window * scale)), 0)
    return Case(name, kind, seq, (seq,), 0, seq // 4)


def _forward_backward(attend: Callable[[], torch.Tensor]) -> None:
    out = attend()
    out.backward(torch.ones_like(out))


def _gpu_spans(events: list) -> list[tuple[float, float, str]]:
    """``(start us, end us, name)`` of every kernel and copy the profiler saw, by start."""
    return sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA
    )


def _idle_gaps(spans: list[tuple[float, float, str]], least_us: float = 40.0) -> list[str]:
    """The GPU's idle gaps of at least ``least_us`` (us from the first kernel), each with the
    kernels either side: where the host kept the GPU waiting."""
    if not spans:
        return []
    first, end, last_name = spans[0]
    gaps = []
    for t0, t1, name in spans[1:]:
        if t0 - end >= least_us:
            where = f"after {last_name[:40]} / before {name[:40]}"
            gaps.append(f"{end - first:9.0f} +{t0 - end:6.0f} us  {where}")
        if t1 > end:
            end, last_name = t1, name
    return gaps


def _busy_ms(spans: list[tuple[float, float, str]]) -> float:
    """Milliseconds in which some kernel or copy ran on the GPU (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for t0, t1, _ in spans:
        if t1 > end:
            total += t1 - max(t0, end)
            end = t1
    return total / 1e3


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        cuda = not self.dry
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=600))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if cuda:
            torch.cuda.set_device(self.rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.heads, self.kv_heads, self.head_dim = (4, 2, 16) if self.dry else (32, 8, 128)
        self.rows: list[dict[str, Any]] = []
        if self.rank == 0 and args.json:
            with contextlib.suppress(FileNotFoundError):
                os.remove(args.json + ".partial")

    # -- output ---------------------------------------------------------------------------
    def emit(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        row = {"ranks": self.world, **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.args.json:
            with open(self.args.json + ".partial", "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self) -> None:
        if self.rank == 0 and self.args.json:
            device = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
            meta = {"device": device, "torch": torch.__version__, "dtype": str(self.dtype),
                    "heads": [self.heads, self.kv_heads, self.head_dim], "ranks": self.world,
                    "iters": self.args.iters, "warmup": self.args.warmup}  # fmt: skip
            with open(self.args.json, "w") as f:
                json.dump({"meta": meta, "rows": self.rows}, f, indent=1)

    # -- timing ---------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _elapsed_ms(self, step: Callable[[], None], calls: int) -> float:
        """Milliseconds of ``calls`` calls of ``step`` issued back to back (device events on
        CUDA, wall time on CPU)."""
        if self.device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(calls):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - t0) * 1e3

    def _slowest(self, ms: float, everyone: bool) -> float:
        """``ms``, or its maximum over the ranks when ``everyone``."""
        found = torch.tensor([ms], dtype=torch.float64)
        if everyone:
            found = found.to(self.device)
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return float(found)

    def _idle(self, everyone: bool) -> None:
        """Start from an idle GPU, with every rank at the same point when ``everyone``."""
        if everyone:
            dist.barrier()
        self.sync()

    def back_to_back_ms(self, step: Callable[[], None], everyone: bool) -> float:
        """Mean ms of ``--back-to-back`` iterations issued without waiting, as a model's
        layers run (the host's start-up of one call overlaps the GPU work of the one before);
        slowest rank when ``everyone``."""
        calls = self.args.back_to_back
        self._idle(everyone)
        return self._slowest(self._elapsed_ms(step, calls) / calls, everyone)

    def time_ms(self, step: Callable[[], None], everyone: bool) -> float:
        """Median ms of ``step``, each iteration from an idle GPU (slowest rank when
        ``everyone``)."""
        for _ in range(self.args.warmup):
            step()
        self.sync()
        times = []
        for _ in range(self.args.iters):
            self._idle(everyone)
            times.append(self._elapsed_ms(step, 1))
        return self._slowest(statistics.median(times), everyone)

    def profile(self, case: Case, method: str, step: Callable[[], None], everyone: bool) -> None:
        """Print the busiest GPU kernels of two iterations (rank 0), ms per iteration."""
        from torch.profiler import ProfilerActivity, profile

        if not everyone and self.rank != 0:
            return
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            self.sync()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        if everyone and self.world > 1:
            # Each rank's attention kernels and transfers: a rank that waits on its peers
            # shows it in its transfer time, the slowest rank in its kernels.
            spans = _gpu_spans(prof.events())
            mine = {"flex": 0.0, "nccl": 0.0, "busy": _busy_ms(spans) / 2}
            mine["gaps"] = _idle_gaps(spans)
            for e in rows:
                if not str(getattr(e, "device_type", "")).endswith("CUDA"):
                    continue  # the CPU-side record of a launch carries its kernel's time too
                if e.key.startswith("triton_tem_"):
                    mine["flex"] += e.self_device_time_total / 2e3
                elif e.key.startswith("ncclDevKernel"):
                    mine["nccl"] += e.self_device_time_total / 2e3
            every: list = [None] * self.world
            dist.all_gather_object(every, mine)
            if self.rank == 0:
                print(
                    "   per rank (ms per iteration): "
                    + ", ".join(
                        f"rank {r}: attention {m['flex']:.2f}, transfers {m['nccl']:.2f}, "
                        f"GPU busy {m['busy']:.2f}"
                        for r, m in enumerate(every)
                    )
                )
                for r, m in enumerate(every):
                    print(f"   rank {r}: GPU idle gaps (2 iterations):")
                    for line in m["gaps"][:20]:
                        print("     " + line)
        if self.rank == 0:
            rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
            total = sum(e.self_device_time_total for e in rows) / 2e3
            print(f"-- profile {case.name} {method}: GPU busy {total:.2f} ms per iteration")
            for e in rows[:14]:
                ms = e.self_device_time_total / 2e3
                print(f"   {ms:8.3f} ms  x{e.count // 2:<4d} {e.key[:90]}")

    def host_time(self, attend: Callable[[], torch.Tensor]) -> None:
        """Print each rank's host time (us, median of the iterations, each from an idle GPU)
        to issue the forward call and the backward, and the whole iteration's; then where
        the slowest host spends its time (cProfile, by cumulative time)."""
        import cProfile
        import io
        import pstats

        spans: list[tuple[float, float, float]] = []
        for _ in range(self.args.iters):
            self._idle(True)
            t0 = time.perf_counter()
            out = attend()
            t1 = time.perf_counter()
            out.backward(torch.ones_like(out))
            t2 = time.perf_counter()
            self.sync()
            spans.append(((t1 - t0) * 1e6, (t2 - t1) * 1e6, (time.perf_counter() - t0) * 1e6))
        mine = [statistics.median(x) for x in zip(*spans)]
        self._idle(True)
        prof = cProfile.Profile()
        # The backward on the calling thread, where the profiler sees it.
        with torch.autograd.set_multithreading_enabled(False):
            prof.enable()
            for _ in range(self.args.iters):
                _forward_backward(attend)
            prof.disable()
        self.sync()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(45)
        every: list = [None] * self.world
        dist.all_gather_object(every, (mine, buf.getvalue().split("\n\n", 2)[-1]))
        if self.rank == 0:
            for r, ((fwd, bwd, whole), _) in enumerate(every):
                print(f"   rank {r}: host us: forward {fwd:.0f}, backward issue {bwd:.0f}, "
                      f"iteration (synchronised) {whole:.0f}")  # fmt: skip
            slowest = max(range(self.world), key=lambda r: every[r][0][0] + every[r][0][1])
            print(f"   rank {slowest} cProfile, {self.args.iters} iterations:\n{every[slowest][1]}")

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    # -- inputs and masks -----------------------------------------------------------------
    def inputs(self, seq: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device=self.device).manual_seed(0)
        shapes = [(1, self.heads, seq, self.head_dim)] + [
            (1, self.kv_heads, seq, self.head_dim)
        ] * 2
        return tuple(
            torch.randn(s, generator=g, device=self.device, dtype=self.dtype) for s in shapes
        )

    def mask_mod(self, case: Case) -> Callable:
        """FlexAttention's mask function for the case, over global positions."""
        if case.kind == "docs":
            doc = torch.repeat_interleave(
                torch.arange(len(case.lengths), device=self.device),
                torch.tensor(case.lengths, device=self.device),
            )

            def documents(b, h, q, kv):
                return (doc[q] == doc[kv]) & (kv <= q)

            return documents
        if case.kind == "window":
            window = case.window

            def sliding(b, h, q, kv):
                return (kv <= q) & (q - kv < window)

            return sliding
        prefix = case.prefix

        def prefix_lm(b, h, q, kv):
            return (kv < prefix) | (kv <= q)

        return prefix_lm

    def imbalance(self, local_positions: torch.Tensor, case: Case) -> float:
        """Busiest rank's work over the mean, minus one, from the positions each rank holds."""
        work = case.visible_keys(local_positions.flatten().cpu()).sum().double().reshape(1)
        work = work.to(self.device)
        every = [torch.zeros_like(work) for _ in range(self.world)]
        dist.all_gather(every, work)
        total = torch.cat(every)
        return round(float(total.max() / total.mean()) - 1.0, 4)

    # -- one GPU --------------------------------------------------------------------------
    def flex(self, own_frame: bool = True) -> Callable:
        from torch.nn.attention.flex_attention import flex_attention

        if self.dry:
            return flex_attention
        if not own_frame:  # PyTorch's context parallelism, in a launch of its own
            return torch.compile(flex_attention, dynamic=False, fullgraph=True)

        # A function of its own: torch.compile's recompile limit counts per code object, and
        # compiling flex_attention itself would share the count with ringattn's own kernels.
        def one_flex(q, k, v, block_mask, enable_gqa):
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)

        compiled = torch.compile(one_flex, dynamic=False, fullgraph=True)
        return lambda q, k, v, block_mask, enable_gqa: compiled(q, k, v, block_mask, enable_gqa)

    def one_gpu(self, case: Case, q, k, v) -> dict[str, float]:
        """Rank 0 alone; the others wait. Returns the ms of each kernel that ran."""
        from torch.nn.attention.flex_attention import create_block_mask

        found: dict[str, float] = {}
        if self.rank == 0:
            # FlexAttention has no backward on CPU: the dry run times the forward.
            qq, kk, vv = (x.detach().requires_grad_(not self.dry) for x in (q, k, v))
            block_mask = create_block_mask(
                self.mask_mod(case),
                1,
                1,
                case.seq,
                case.seq,
                device=self.device,
                _compile=not self.dry,
            )
            flex = self.flex()

            def run_flex() -> None:
                out = flex(qq, kk, vv, block_mask=block_mask, enable_gqa=True)
                if not self.dry:
                    out.backward(torch.ones_like(out))

            found["one-gpu-flex"] = self.measure(case, "one-gpu-flex", run_flex, everyone=False)
            if case.kind != "prefix" and not self.dry:
                step = self.varlen_step(case, q, k, v)
                if step is not None:
                    found["one-gpu-varlen"] = self.measure(
                        case, "one-gpu-varlen", step, everyone=False
                    )
        dist.barrier()
        return {k: v for k, v in found.items() if v is not None}

    def varlen_step(self, case: Case, q, k, v) -> Callable[[], None] | None:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            self.emit({"case": case.name, "method": "one-gpu-varlen", "error": "no varlen_attn"})
            return None
        params = inspect.signature(varlen_attn).parameters
        if case.kind == "window" and "window_size" not in params:
            self.emit({"case": case.name, "method": "one-gpu-varlen", "error": "no window_size"})
            return None
        lengths = torch.tensor(case.lengths, device=self.device)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        longest = max(case.lengths)
        qv, kv_, vv = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [T, H, D]
        extra: dict[str, Any] = {}
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # K/V heads expanded for kernels without grouped-query attention
            rep = self.heads // self.kv_heads
            kv_, vv = (x.repeat_interleave(rep, dim=1) for x in (kv_, vv))
        if "window_size" in params:
            extra["window_size"] = (case.window - 1 if case.kind == "window" else -1, 0)
        else:
            extra["is_causal"] = True
        qv, kv_, vv = (x.requires_grad_() for x in (qv, kv_, vv))

        def run() -> None:
            out = varlen_attn(qv, kv_, vv, cu, cu, longest, longest, **extra)
            out.backward(torch.ones_like(out))

        return run

    def measure(
        self,
        case: Case,
        method: str,
        step: Callable[[], None],
        everyone: bool,
        attend: Callable[[], torch.Tensor] | None = None,
        **extra,
    ) -> float | None:
        self.reset_peak()
        try:
            ms = self.time_ms(step, everyone)
            if self.args.back_to_back:
                extra = {**extra, "b2b_ms": round(self.back_to_back_ms(step, everyone), 2)}
        except Exception as err:  # noqa: BLE001 - a failing row is reported, the rest run
            if self.args.verbose:
                traceback.print_exc()
            self.emit({"case": case.name, "method": method, "error": repr(err)[:400]})
            return None
        if self.args.profile:
            self.profile(case, method, step, everyone)
        if self.args.host and everyone and attend is not None:
            self.host_time(attend)
        self.emit(
            {
                "case": case.name,
                "method": method,
                "ms": round(ms, 2),
                "peak_GiB": self.peak_gib(),
                **extra,
            }
        )
        return ms

    # -- ringattn ---------------------------------------------------------------------------
    def ringattn_rows(self, case: Case, q, k, v) -> None:
        import ringattn

        masks: dict[str, Any] = {}
        documents = None
        if case.kind == "docs":
            documents = ringattn.Documents.from_lengths(list(case.lengths))
            masks["documents"] = documents
            causal = True
        elif case.kind == "window":
            masks["window"] = (case.window - 1, 0)
            causal = True
        else:
            masks["mask_mod"] = self.mask_mod(case)
            causal = False
        backend = "auto"
        strategies = self.args.strategies or STRATEGIES
        variants: list[tuple[str, str, str]] = [(f"ringattn-{s}", s, "zigzag") for s in strategies]
        if case.kind == "window" and "ring" in strategies:
            variants.insert(1, ("ringattn-ring-contiguous", "ring", "contiguous"))
        positions = torch.arange(case.seq, device=self.device)[None]
        earlier = None
        if self.args.vary_documents and documents is not None:
            # Another batch's documents first, as a training run brings them: the timed
            # calls then run the kernels compiled for changing shapes.
            mean = max(4, round(self.args.mean_doc * min(1.0, case.seq / 65536)))
            mix = heavy_tailed_lengths(case.seq, mean, 2 * self.world, seed=1)
            earlier = ringattn.Documents.from_lengths(mix)
        for method, strategy, layout in variants:
            cut = {"documents": documents} if documents is not None else {"layout": layout}
            local = [ringattn.shard(x, dim=2, **cut).detach().requires_grad_() for x in (q, k, v)]
            held = ringattn.shard(positions, dim=1, **cut)
            options = dict(causal=causal, backend=backend, **masks)
            if documents is None:
                options["layout"] = layout
            if strategy != "ring":
                options["strategy"] = strategy
            call = ringattn.ring_attention if strategy == "ring" else ringattn.attention
            attend = functools.partial(call, *local, **options)
            step = functools.partial(_forward_backward, attend)
            facts: dict[str, Any] = {"imbalance": self.imbalance(held, case)}
            if earlier is not None:
                other = [ringattn.shard(x, dim=2, documents=earlier).detach().requires_grad_()
                         for x in (q, k, v)]  # fmt: skip
                self._idle(True)
                t0 = time.perf_counter()
                again = {**options, "documents": earlier}
                _forward_backward(functools.partial(call, *other, **again))
                self.sync()
                # The first call on a new batch: what a run pays when that compiles again.
                seconds = self._slowest(time.perf_counter() - t0, True)
                facts["new_documents_s"] = round(seconds, 2)
                del other
            self.measure(case, method, step, True, attend=attend, **facts)
            del local, step, attend

    # -- PyTorch's context parallelism ------------------------------------------------------
    def torch_cp_rows(self, case: Case, q, k, v) -> None:
        from torch import nn
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _PerDocumentHeadTailLoadBalancer,
        )
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(self.device.type, (self.world,), mesh_dim_names=("cp",))
        flex = self.flex(own_frame=False)

        class Flex(nn.Module):
            def forward(self, q, k, v, block_mask):
                return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

        style = cp._ContextParallel(
            seq_dim=2, attention_type=cp._ContextParallel.AttentionType.FLEX
        )
        layer = parallelize_module(Flex(), mesh, style)
        positions = torch.arange(case.seq, device=self.device)[None, None, :, None]
        for name in ("balanced", "unbalanced"):
            method = f"torch-cp-flex-{name}"
            try:
                balancer = (
                    _PerDocumentHeadTailLoadBalancer([list(case.lengths)], self.world, self.device)
                    if name == "balanced"
                    else None
                )
                shards = cp._context_parallel_shard(
                    mesh, [q, k, v, positions.to(q.dtype if self.dry else torch.float32)],
                    [2, 2, 2, 2], load_balancer=balancer,
                )  # fmt: skip
                block_mask = cp._create_cp_block_mask(
                    self.mask_mod(case), 1, 1, case.seq, case.seq, mesh, load_balancer=balancer
                )
            except Exception as err:  # noqa: BLE001
                if self.args.verbose:
                    traceback.print_exc()
                self.emit({"case": case.name, "method": method, "error": repr(err)[:400]})
                continue
            local = [x.detach().requires_grad_(not self.dry) for x in shards[:3]]
            held = shards[3].flatten().round().long()
            attend = functools.partial(layer, *local, block_mask=block_mask)
            step = attend if self.dry else functools.partial(_forward_backward, attend)
            self.measure(case, method, step, everyone=True, imbalance=self.imbalance(held, case))

    # -- layouts only -----------------------------------------------------------------------
    def layout_rows(self, case: Case) -> None:
        """The work imbalance of each method's layout, without running attention (any
        device, real sizes): ringattn's, and PyTorch's with and without its balancer."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _PerDocumentHeadTailLoadBalancer,
        )

        import ringattn

        positions = torch.arange(case.seq, device=self.device)[None]
        if case.kind == "docs":
            documents = ringattn.Documents.from_lengths(list(case.lengths))
            layouts = {"ringattn": {"documents": documents}}
        else:
            layouts = {"ringattn": {"layout": "zigzag"}}
            layouts["ringattn-contiguous"] = {"layout": "contiguous"}
        for name, cut in layouts.items():
            held = ringattn.shard(positions, dim=1, **cut)
            self.emit({"case": case.name, "layout": name, "imbalance": self.imbalance(held, case)})
        mesh = init_device_mesh(self.device.type, (self.world,))
        wide = positions[:, None, :, None].double()
        for name in ("balanced", "unbalanced"):
            balancer = None
            if name == "balanced":
                balancer = _PerDocumentHeadTailLoadBalancer(
                    [list(case.lengths)], self.world, self.device
                )
            held = cp._context_parallel_shard(mesh, [wide], [2], load_balancer=balancer)[0]
            imbalance = self.imbalance(held.flatten().round().long(), case)
            self.emit({"case": case.name, "layout": f"torch-cp-{name}", "imbalance": imbalance})

    # -- driver ---------------------------------------------------------------------------
    def run(self) -> None:
        names = self.args.cases or (DRY_CASES if self.dry else GPU_CASES)
        for name in names:
            case = make_case(name, self.world, self.args.mean_doc, self.args.window)
            facts = {"kind": case.kind, "seq": case.seq, "documents": len(case.lengths)}
            facts.update(longest=max(case.lengths), window=case.window, prefix=case.prefix)
            facts["lengths"] = list(case.lengths) if case.kind == "docs" else None
            self.emit({"case": case.name, **facts})
            if self.args.imbalance_only:
                self.layout_rows(case)
                continue
            q, k, v = self.inputs(case.seq)
            if self.args.torch_cp:
                self.torch_cp_rows(case, q, k, v)
            else:
                if not self.args.skip_one_gpu:
                    self.one_gpu(case, q, k, v)
                self.ringattn_rows(case, q, k, v)
            del q, k, v
            self.save()
        dist.barrier()
        dist.destroy_process_group()


def report(paths: list[str], md: str | None) -> str:
    """Markdown tables (one per case) from the JSON files of the launches (or the
    ``.partial`` rows of a launch that did not finish)."""
    rows, meta = [], {}
    for path in paths:
        with open(path) as f:
            if path.endswith((".partial", ".jsonl")):
                rows += [json.loads(line) for line in f if line.strip()]
                continue
            data = json.load(f)
        meta = meta or data["meta"]
        rows += data["rows"]
    cases = [r for r in rows if "kind" in r]
    m = meta
    head = (
        f"{m.get('device')} x {m.get('ranks')}, torch {m.get('torch')}, {m.get('dtype')}, "
        f"heads {m.get('heads')}, fwd+bwd, median of {m.get('iters')} after {m.get('warmup')} "
        "warm-up"
    )
    seen, lines = set(), [head, ""]
    if m.get("notes"):
        lines += [f"Note: {m['notes']}.", ""]
    for c in cases:
        if c["case"] in seen:
            continue
        seen.add(c["case"])
        mine = [r for r in rows if r.get("case") == c["case"] and "method" in r]
        layouts = [r for r in rows if r.get("case") == c["case"] and "layout" in r]
        one = [r["ms"] for r in mine if r["method"].startswith("one-gpu") and "ms" in r]
        fastest = min(one) if one else None
        what = {
            "docs": f"{c['documents']} documents, longest {c['longest']}",
            "window": f"causal sliding window {c['window']}",
            "prefix": f"prefix-LM mask_mod, prefix {c['prefix']}",
        }[c["kind"]]
        lines += [
            f"### {c['case']}: {c['seq']} tokens, {what}",
            "",
            "| method | ms | speedup vs one GPU's fastest | work imbalance | peak GiB |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in mine:
            if r.get("run") not in (None, "final"):  # rows merged from another launch
                r = dict(r, method=f"{r['method']} ({r['run']} run)")
            if "ms" not in r:
                lines.append(f"| {r['method']} | error: {r.get('error', '')[:120]} | | | |")
                continue
            one_gpu = r["method"].startswith("one-gpu")
            speedup = f"{fastest / r['ms']:.2f}x" if fastest and not one_gpu else ""
            share = r.get("imbalance")
            imbalance = f"{100 * share:.1f}%" if share is not None else ""
            peak = r.get("peak_GiB") or ""
            lines.append(f"| {r['method']} | {r['ms']:.2f} | {speedup} | {imbalance} | {peak} |")
        if layouts:
            lines += ["", "| layout | work imbalance |", "| --- | ---: |"]
            lines += [f"| {r['layout']} | {100 * r['imbalance']:.1f}% |" for r in layouts]
        lines.append("")
    text = "\n".join(lines)
    if md:
        with open(md, "w") as f:
            f.write(text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="*", help=f"default: {' '.join(GPU_CASES)}")
    p.add_argument("--mean-doc", type=int, default=4096)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--strategies", nargs="*", choices=STRATEGIES, help="ringattn rows to run")
    p.add_argument("--torch-cp", action="store_true", help="PyTorch's context_parallel rows only")
    p.add_argument("--skip-one-gpu", action="store_true")
    p.add_argument(
        "--imbalance-only",
        action="store_true",
        help="only each layout's work imbalance, at the cases' real sizes (runs on CPU too)",
    )
    p.add_argument("--dry-run", action="store_true", help="CPU, Gloo, tiny sizes, float32")
    p.add_argument("--json", help="write the rows here (and NAME.partial as they come)")
    p.add_argument("--report", nargs="*", help="print Markdown tables from these JSON files")
    p.add_argument("--md", help="with --report: also write the tables here")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile", action="store_true", help="print each method's top GPU kernels")
    p.add_argument(
        "--vary-documents",
        action="store_true",
        help="run each ringattn row once on another batch's documents before timing it",
    )
    p.add_argument(
        "--host",
        action="store_true",
        help="print each rank's host time per call of ringattn's rows, and a cProfile",
    )
    p.add_argument(
        "--back-to-back",
        type=int,
        default=0,
        metavar="N",
        help="also time N iterations issued back to back (b2b_ms), as a model's layers run",
    )
    p.add_argument(
        "--recompile-limit",
        type=int,
        help="raise torch.compile's recompile limit (default: leave torch's)",
    )
    args = p.parse_args()
    if args.report:
        print(report(args.report, args.md))
        return
    if args.recompile_limit:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, args.recompile_limit)
    bench = Bench(args)
    bench.run()


if __name__ == "__main__":
    main()
