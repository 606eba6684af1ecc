"""Where one synchronised forward+backward call of the masked all-gather spends its time.

``torchrun --nproc-per-node 2 benchmarks/masked_call_timeline.py`` profiles one call (after
warm-up, from an idle GPU) of one GPU's compiled FlexAttention on a packed batch and of
``ringattn.attention(..., strategy="allgather", documents=...)`` on the same batch, and
prints per rank a timeline in microseconds from the call's start: when the host entered
ringattn's stages (argument checks, planning, the key exchange, FlexAttention's call,
autograd's backward) and when the GPU was busy or idle. A single call waits for the host
wherever the GPU is idle before FlexAttention's forward kernel starts. ``--stages N`` instead
times each stage's host microseconds without the profiler (median of N calls), beside one
GPU's forward call.

``python benchmarks/masked_call_timeline.py --stages 15 --fake-ranks 4`` runs one rank of 4
in one process on one GPU, over a process group whose collectives move nothing (PyTorch's
``fake`` backend): the host's stages without NCCL's own launch cost, for a machine with one
GPU.
"""

from __future__ import annotations

import argparse
import functools
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
from ringattn import comm, kv_exchange, masked_kernels, strategies  # noqa: E402

# ringattn stages shown as ranges of their own (module, function name).
STAGES = (
    (strategies, "resolve_mesh"),
    (strategies, "check_masked"),
    (strategies, "placement_for"),
    (strategies, "kv_exchange"),
    (strategies, "fetched_plan"),
    (strategies, "fetch_kv"),
    (strategies, "_one_pair"),
    (kv_exchange, "_start_exchange"),
    (comm, "all_to_all_into"),
)


def _ranged(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"ra.{name}"):
            return fn(*args, **kwargs)

    return wrapper


def _instrument(wrap) -> None:
    for module, name in STAGES:
        setattr(module, name, wrap(name, getattr(module, name)))
    block = masked_kernels.MaskedBlock
    block.attend = wrap("flex_call", block.attend)
    comm.PendingShift.wait = wrap("pending.wait", comm.PendingShift.wait)
    fetch = kv_exchange._FetchKV
    fetch.forward = staticmethod(wrap("_FetchKV.forward", fetch.forward))
    fetch.backward = staticmethod(wrap("_FetchKV.backward", fetch.backward))


_HOST_US: dict[str, list[float]] = {}


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _HOST_US.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)

    return wrapper


def _host_stages(step, calls: int) -> str:
    """Median host us of each stage over ``calls`` calls, each from an idle GPU, timed
    without the profiler (perf_counter around each stage)."""
    _HOST_US.clear()
    for _ in range(calls):
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        step()
    torch.cuda.synchronize()
    return "\n".join(
        f"  {name:28s} {statistics.median(us):8.1f} us  (x{len(us) // calls})"
        for name, us in _HOST_US.items()
    )


def _profile_one(step) -> list:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(6):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        # The profiler's first launches cost it milliseconds: one call before the timed one.
        step()
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        with torch.profiler.record_function("call"):
            step()
        torch.cuda.synchronize()
    return list(prof.events())


def _depth(e) -> int:
    d = 0
    while e.cpu_parent is not None:
        e, d = e.cpu_parent, d + 1
    return d


def _timeline(events: list, title: str, host_ops: bool) -> str:
    call = next(e for e in events if e.name == "call")
    start, end = call.time_range.start, call.time_range.end
    lines = [f"--- {title} (us from the call's start)"]
    gpu = sorted(
        (e.time_range.start - start, e.time_range.end - start, e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.start >= start
    )
    shown = ("call", "ra.", "autograd::engine::evaluate_function", "CompiledFunction")
    host = sorted(
        (e.time_range.start - start, e.time_range.end - start, _depth(e), e.name)
        for e in events
        if e.device_type == torch.autograd.DeviceType.CPU
        and start <= e.time_range.start <= end
        and (
            e.name.startswith(shown)
            or (host_ops and e.time_range.end - e.time_range.start >= 8 and _depth(e) <= 4)
        )
    )
    for t0, t1, depth, name in host:
        lines.append(f"  host {t0:8.1f} - {t1:8.1f}  {'  ' * depth}{name[:90]}")
    busy: list[list] = []
    for t0, t1, name in gpu:
        if busy and t0 <= busy[-1][1] + 2.0:
            busy[-1][1] = max(busy[-1][1], t1)
        else:
            busy.append([t0, t1, name])
    for i, (t0, t1, name) in enumerate(busy):
        if i:
            gap = t0 - busy[i - 1][1]
            lines.append(f"  gpu  idle {busy[i - 1][1]:8.1f} - {t0:8.1f}  ({gap:.1f})")
        lines.append(f"  gpu  busy {t0:8.1f} - {t1:8.1f}  ({t1 - t0:.1f})  from {name[:50]}")
    if busy:
        lines.append(f"  GPU finished at {busy[-1][1]:.1f} us")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--host-ops", action="store_true", help="also every host op of 8 us or more")
    p.add_argument(
        "--fake-ranks",
        type=int,
        default=0,
        metavar="N",
        help="one rank of N in this process, collectives moving nothing (one GPU)",
    )
    p.add_argument(
        "--stages",
        type=int,
        default=0,
        metavar="N",
        help="instead of the profile: each stage's median host us over N calls, no profiler",
    )
    args = p.parse_args()
    seq = args.seq_len
    rank, world, q, k, v = gpu_rank_inputs(seq, fake_world=args.fake_ranks)
    dev = q.device
    lengths = heavy_tailed_lengths(seq, 4096, 2 * world)
    texts = []

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev)
    )

    def documents(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (ki <= qi)

    block_mask = create_block_mask(documents, 1, 1, seq, seq, device=dev)

    def one_flex(q, k, v, block_mask):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    compiled = torch.compile(one_flex, dynamic=False, fullgraph=True)
    full = [x.detach().requires_grad_() for x in (q, k, v)]

    def one_gpu() -> None:
        out = _one_gpu_forward(*full, block_mask)
        out.backward(torch.ones_like(out))

    _one_gpu_forward = compiled
    if args.stages:
        for _ in range(3):
            one_gpu()
        _one_gpu_forward = _timed("one GPU: forward call", compiled)
        texts.append("--- one GPU, compiled FlexAttention\n" + _host_stages(one_gpu, args.stages))
        _instrument(_timed)
    else:
        texts.append(_timeline(_profile_one(one_gpu), "one GPU, compiled FlexAttention", False))
        _instrument(_ranged)
    docs = ringattn.Documents.from_lengths(lengths)
    local = [ringattn.shard(x, dim=2, documents=docs).detach().requires_grad_() for x in (q, k, v)]

    def ring_forward():
        return ringattn.attention(*local, causal=True, strategy="allgather", documents=docs)

    def ring_call() -> None:
        out = ring_forward()
        out.backward(torch.ones_like(out))

    if args.stages:
        for _ in range(3):
            ring_call()
        ring_forward = _timed("ringattn: forward call", ring_forward)
        texts.append("--- ringattn all-gather\n" + _host_stages(ring_call, args.stages))
    else:
        texts.append(_timeline(_profile_one(ring_call), "ringattn all-gather", args.host_ops))
    every: list = [texts]
    if not args.fake_ranks:
        every = [None] * world
        dist.all_gather_object(every, texts)
    if rank == 0:
        for r, t in enumerate(every):
            print(f"===== rank {r}")
            print("\n".join(t), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
