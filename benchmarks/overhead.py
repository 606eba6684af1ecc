"""Host (CPU) time per call of ring attention and of its parts, on local GPUs.

``python benchmarks/overhead.py --seq-len 4K`` spawns one rank per GPU. For short
sequences the GPU work per call is small, so what the host spends issuing it decides the
speed; this prints microseconds of host time per call (no synchronisation inside the loop)
next to the GPU time per call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import ringattn  # noqa: E402
from ringattn import checks, comm  # noqa: E402
from ringattn.cli.bench import BenchCase, _method  # noqa: E402
from ringattn.cli.commands import _tokens  # noqa: E402
from ringattn.cli.launch import spawn_ranks  # noqa: E402

CALLS = 100


def _host_and_gpu(fn) -> tuple[float, float]:
    """(host us per call, GPU-inclusive ms per call) over CALLS back-to-back calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - t0) / CALLS * 1e6
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) / CALLS


def _worker(rank, world_size, device, say, case: BenchCase):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world_size,))
    group = dist.group.WORLD
    rows = []
    for name in ("one-gpu", "ringattn-zigzag"):
        for mode in ("fwd", "fwd+bwd"):
            c = BenchCase(
                case.seq_len, case.causal, case.backend, case.heads, case.kv_heads, 128, mode
            )
            with _method(name)(c, device, 0, mesh) as (step, _):
                for check in ("once", "always") if name.startswith("ringattn") else ("-",):
                    if check != "-":
                        ringattn.set_cross_rank_check(check)
                    host, gpu = _host_and_gpu(step)
                    rows.append((f"{name} {mode} check={check}", host, gpu))
    ringattn.set_cross_rank_check("once")
    profiles = _python_profiles(case, device) if rank == 0 else ""
    if rank != 0:
        _python_profiles(case, device)
    # Parts.
    k = torch.randn(1, case.kv_heads, case.seq_len // world_size, 128, device=device).bfloat16()
    bufs = [torch.empty_like(k) for _ in range(4)]
    ring = comm.ring_for(group)
    rows.append(
        (
            "Ring.shift (2 tensors) + wait",
            *_host_and_gpu(lambda: ring.shift((k, k), bufs[:2]).wait()),
        )
    )

    def batched():
        ops = [dist.P2POp(dist.isend, k, ring._next), dist.P2POp(dist.isend, k, ring._next)]
        ops += [dist.P2POp(dist.irecv, b, ring._prev) for b in bufs[2:]]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    rows.append(("batch_isend_irecv (2+2) + wait", *_host_and_gpu(batched)))
    desc = [0] * len(checks._FIELDS)
    rows.append(
        (
            "cross-rank check (host group)",
            *_host_and_gpu(lambda: checks._agree_across_ranks(group, device, desc, None)),
        )
    )
    packed = torch.cat([k, k])
    packed_in = torch.empty_like(packed)
    rows.append(
        (
            "Ring.shift (1 packed tensor) + wait",
            *_host_and_gpu(lambda: ring.shift((packed,), (packed_in,)).wait()),
        )
    )
    gathered = torch.empty((world_size, *packed.shape), device=device, dtype=packed.dtype)
    rows.append(
        (
            "all_gather_into (packed)",
            *_host_and_gpu(lambda: comm.all_gather_into(gathered, packed, group)),
        )
    )
    empty = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        empty.capture_begin()
        empty.capture_end()
    rows.append(("CUDAGraph.replay (empty)", *_host_and_gpu(empty.replay)))
    rows.append(("copy_ (K-sized)", *_host_and_gpu(lambda: bufs[0].copy_(k))))
    rows += _backward_paths(case, device)
    rows += _graph_parts(case, device)
    return rows, profiles + "\n" + _sync_report(case, device)


def _graph_parts(case: BenchCase, device: torch.device) -> list[tuple[str, float, float]]:
    """Forward+backward with every call replayed as CUDA-graph programs, and where its host
    time goes (host us per call inside each wrapped function, inclusive)."""
    from ringattn import api, graphs

    q, k, v, dout = _inputs_for(case, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        out = ringattn.ring_attention(q, k, v, causal=True, backend=case.backend)
        torch.autograd.grad(out, (q, k, v), dout)

    ringattn.set_cuda_graphs(True)
    rows = [("autograd fwd+bwd, CUDA-graph programs", *_host_and_gpu(step))]
    spent: dict[str, float] = {}
    originals = []

    def wrap(owner, name, label):
        fn = getattr(owner, name)
        raw = vars(owner).get(name, fn)
        originals.append((owner, name, raw))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)

    from ringattn import symmetric

    wrap(api, "checked_call", "  checked_call")
    wrap(api, "_call_key", "  _call_key")
    wrap(api, "_with_transport", "  _with_transport")
    wrap(api, "_graphed_ring", "  _graphed_ring")
    wrap(graphs.GraphedRingFunction, "forward", "  GraphedRingFunction.forward")
    wrap(graphs.GraphedRingFunction, "backward", "  GraphedRingFunction.backward")
    wrap(graphs.GraphedRing, "forward", "    GraphedRing.forward")
    wrap(graphs.GraphedRing, "backward", "    GraphedRing.backward")
    wrap(graphs, "_copy_all", "      _copy_all")
    wrap(graphs, "_clone_all", "    _clone_all")
    wrap(graphs._Program, "run", "      _Program.run")
    wrap(comm.Ring, "shift", "        Ring.shift")
    wrap(symmetric.SymmetricRing, "shift", "        SymmetricRing.shift")
    wrap(comm.PendingShift, "wait", "        PendingShift.wait")
    wrap(torch.cuda.CUDAGraph, "replay", "        CUDAGraph.replay")
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS):
        step()
    total = time.perf_counter() - t0
    torch.cuda.synchronize()
    for owner, name, fn in originals:
        setattr(owner, name, fn)
    rows.append(("  (instrumented fwd+bwd)", total / CALLS * 1e6, 0.0))
    rows += [(label, t / CALLS * 1e6, 0.0) for label, t in spent.items()]
    _graph_cprofile(step)
    ringattn.set_cuda_graphs("auto")
    return rows


def _graph_cprofile(step) -> None:
    """Print (rank 0) where the replayed forward+backward's host time goes, by function."""
    text = _cprofile(step, CALLS, 30)
    if dist.get_rank() == 0:
        print(f"--- replayed fwd+bwd, {CALLS} calls\n" + text)


def _cprofile(fn, calls: int, top: int) -> str:
    """The ``top`` functions by own host time over ``calls`` calls of ``fn`` (every rank
    runs them; the GPU is idle and the ranks in step when it starts)."""
    import cProfile
    import io
    import pstats

    torch.cuda.synchronize()
    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue().split("\n\n", 2)[-1]


def _inputs_for(case: BenchCase, device: torch.device) -> list[torch.Tensor]:
    world = dist.get_world_size()
    shape_q = (1, case.heads, case.seq_len // world, 128)
    shape_kv = (1, case.kv_heads, case.seq_len // world, 128)
    return [
        torch.randn(s, device=device, dtype=torch.bfloat16)
        for s in (shape_q, shape_kv, shape_kv, shape_q)
    ]


def _backward_paths(case: BenchCase, device: torch.device) -> list[tuple[str, float, float]]:
    """Host time of forward+backward through autograd, with each way of sending."""
    q, k, v, dout = _inputs_for(case, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        out = ringattn.ring_attention(q, k, v, causal=True, backend=case.backend)
        torch.autograd.grad(out, (q, k, v), dout)

    rows = [("autograd fwd+bwd, coalesced send/recv", *_host_and_gpu(step))]
    original = comm.Ring._coalesces
    comm.Ring._coalesces = lambda self, device: False
    rows.append(("autograd fwd+bwd, batch_isend_irecv", *_host_and_gpu(step)))
    comm.Ring._coalesces = original
    return rows


def _sync_report(case: BenchCase, device: torch.device) -> str:
    """Where forward+backward makes the host wait for the GPU (sync debug mode)."""
    import warnings

    q, k, v, dout = _inputs_for(case, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    for _ in range(2):
        out = ringattn.ring_attention(q, k, v, causal=True, backend=case.backend)
        torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = ringattn.ring_attention(q, k, v, causal=True, backend=case.backend)
            torch.autograd.grad(out, (q, k, v), dout)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    lines = [f"{w.filename}:{w.lineno}: {str(w.message)[:300]}" for w in caught]
    return "--- synchronising calls in one forward+backward:\n" + (
        "\n".join(lines) if lines else "none"
    )


def _python_profiles(case: BenchCase, device: torch.device) -> str:
    """cProfile of forward calls and of the ring backward called directly (main thread)."""
    from ringattn import ring

    world = dist.get_world_size()
    shape_q = (1, case.heads, case.seq_len // world, 128)
    shape_kv = (1, case.kv_heads, case.seq_len // world, 128)
    q, dout = (torch.randn(shape_q, device=device, dtype=torch.bfloat16) for _ in "ab")
    k, v = (torch.randn(shape_kv, device=device, dtype=torch.bfloat16) for _ in "ab")
    captured = {}
    original = ring._ring_backward

    def capture(*args):
        captured["args"] = args
        return original(*args)

    ring._ring_backward = capture
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = ringattn.ring_attention(qg, kg, vg, causal=True, backend=case.backend)
    torch.autograd.grad(out, (qg, kg, vg), dout)
    ring._ring_backward = original
    args = captured["args"]

    def fwd():
        with torch.no_grad():
            ringattn.ring_attention(q, k, v, causal=True, backend=case.backend)

    text = []
    for name, fn, calls in (("forward", fwd, 50), ("ring backward", lambda: original(*args), 20)):
        for _ in range(3):
            fn()
        text.append(f"--- {name}, {calls} calls\n" + _cprofile(fn, calls, 14))
    return "\n".join(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=_tokens, default=(4096,))
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--backend", default="cudnn")
    args = p.parse_args()
    for seq in args.seq_len:
        case = BenchCase(seq, True, args.backend, 32, args.kv_heads, 128, "fwd+bwd")
        rows, profiles = spawn_ranks(_worker, torch.cuda.device_count(), "cuda", case)
        print(f"\n== host time per call, {case.label}")
        print(f"{'what':<44} {'host us':>9} {'GPU ms':>9}")
        for what, host, gpu in rows:
            print(f"{what:<44} {host:9.1f} {gpu:9.3f}")
        print(profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
