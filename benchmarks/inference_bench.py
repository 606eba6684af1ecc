"""Inference with a sharded KV cache: correctness on GPUs, prefill, second turns, decode.

    torchrun --nproc-per-node=2 benchmarks/inference_bench.py --json out.json
    python benchmarks/inference_bench.py --report out.json > out.md

One attention layer, bf16, batch 1, 32 query and 8 K/V heads of 128 (GQA). Sections:

- ``correctness``: small shapes, every call (prefill with pass-KV and pass-Q, decode eager,
  static and replayed from a CUDA graph) against float64 attention, next to one-GPU SDPA's
  own error on the same rows.
- ``prefill``: the first turn (nothing cached) at each length, ``ringattn.prefill`` on all
  ranks against causal SDPA on one GPU (the fastest fused kernel PyTorch picks).
- ``second_turn``: a cache of P tokens, then T = 1%, 5%, 20% of P new tokens, pass-KV and
  pass-Q, with the selector's pick and its predictions; one GPU runs SDPA of the T queries
  over the P + T keys (causal, lower-right).
- ``decode``: ms per token at each context (the cache filled with random K/V), eager with
  each cross-rank check, and replayed from a CUDA graph, against SDPA over one GPU's cache.

Times are medians of CUDA-event samples after warm-up, the slowest rank counts; the one-GPU
baseline runs on rank 0 while the other ranks wait.
"""

# ruff: noqa: B023 - the closures are timed inside the loop iteration that defines them

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn
from ringattn.inference import DecodeGraph, Segment, choose_prefill_method
from ringattn.layout import shard_for_rank

HEADS, KV_HEADS, DIM = 32, 8, 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prefill", default="128K,512K", help="first-turn lengths")
    p.add_argument("--cached", default="128K", help="cache lengths for the second turn")
    p.add_argument("--shares", default="0.01,0.05,0.2", help="new tokens / cached tokens")
    p.add_argument("--decode", default="128K,1M", help="decode context lengths")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument(
        "--decode-kernels",
        default="flex,flash,chunked",
        help="split-K decode kernels to time (ringattn.decode_kernels)",
    )
    p.add_argument("--sections", default="correctness,prefill,second_turn,decode")
    p.add_argument(
        "--one-gpu-kernel",
        default="flash",
        help="the split-K kernel of the one-GPU CUDA-graph decode row",
    )
    p.add_argument(
        "--flex-options",
        default="",
        help="FlexAttention kernel options for the flex decode kernel, K=V/K=V",
    )
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--json", default=None)
    p.add_argument("--report", default=None, help="print the markdown of a JSON result")
    return p.parse_args()


def tokens(text: str) -> list[int]:
    out = []
    for item in filter(None, text.split(",")):
        item = item.strip().upper()
        scale = {"K": 1024, "M": 1024 * 1024}.get(item[-1], 1)
        out.append(int(float(item.rstrip("KM")) * scale))
    return out


class Bench:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
            self.dtype = torch.bfloat16
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo")
            self.dtype = torch.float32
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, iters: int, warmup: int = 1, everyone: bool = True) -> float:
        """Median ms of ``fn()`` (slowest rank if ``everyone``)."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(iters):
            if everyone:
                dist.barrier()
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            samples.append((time.perf_counter() - start) * 1e3)
        ms = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=self.device)
        if everyone:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        return float(ms)

    def one_gpu(self, fn, iters: int, warmup: int = 1) -> float | None:
        """``fn`` timed on rank 0 alone (the others wait); None if it ran out of memory."""
        result = torch.tensor([0.0], dtype=torch.float64, device=self.device)
        if self.rank == 0:
            try:
                result.fill_(self.time_ms(fn, iters, warmup, everyone=False))
            except torch.OutOfMemoryError:
                result.fill_(-1.0)
            if self.cuda:
                torch.cuda.empty_cache()
        dist.broadcast(result, 0)
        return None if float(result) < 0 else float(result)

    def randn(self, *shape: int, dtype=None) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=dtype or self.dtype)


def rewind(cache: ringattn.KVCache, state: tuple[int, int, list]) -> None:
    """Forget what was stored after ``state`` (the slots are simply reused)."""
    cache.length, cache.total, cache.segments = state[0], state[1], list(state[2])
    cache._counters_stale = True


def snapshot(cache: ringattn.KVCache) -> tuple[int, int, list]:
    return cache.length, cache.total, list(cache.segments)


def errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    diff = got.double() - want
    return {"max": float(diff.abs().max()), "rms": float(diff.pow(2).mean().sqrt())}


def correctness(b: Bench, kernels: list[str]) -> dict:
    """Small shapes against float64 attention; one-GPU SDPA's own error alongside."""
    torch.manual_seed(1)
    n = b.world
    total = 2 * n * 128 + 3 + 2 * n * 32 + 4 + (3 * len(kernels) if b.cuda else 0)
    q64, k64, v64 = (b.randn(1, h, total, DIM, dtype=torch.float64)
                     for h in (HEADS, KV_HEADS, KV_HEADS))  # fmt: skip
    q, k, v = (x.to(b.dtype) for x in (q64, k64, v64))
    found: dict = {}

    def reference(start: int, end: int) -> torch.Tensor:
        return ringattn.reference.attention(
            q64[:, :, :end], k64[:, :, :end], v64[:, :, :end], causal=True
        )[:, :, start:]

    def sdpa(start: int, end: int) -> torch.Tensor:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(end - start, end)
        return F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, enable_gqa=True
        )

    for method in ("pass_kv", "pass_q"):
        cache = ringattn.KVCache(capacity=512 + 64 * len(kernels))
        rows = []
        steps = [("prefill", 2 * n * 128), ("decode", 1), ("decode", 2), ("prefill", 2 * n * 32),
                 ("decode", 1), ("static", 1), ("static", 2)]  # fmt: skip
        if b.cuda:  # every split-K kernel on the device-length path, one token and two
            steps += [(f"static-{name}", t) for name in kernels for t in (1, 2)]
        start = 0
        for op, t in steps:
            end = start + t
            piece = [x[:, :, start:end] for x in (q, k, v)]
            want = reference(start, end)
            base = sdpa(start, end)
            if op == "prefill":
                mine = [shard_for_rank(x, b.rank, n, dim=2, layout="zigzag") for x in piece]
                got = ringattn.prefill(*mine, cache, method=method)
                want = shard_for_rank(want, b.rank, n, dim=2, layout="zigzag")
                base = shard_for_rank(base, b.rank, n, dim=2, layout="zigzag")
            else:
                kernel = op.partition("-")[2] or "auto"
                got = ringattn.decode(*piece, cache, static=op != "decode", decode_kernel=kernel)
            rows.append({"call": op, "tokens": t, "ringattn": errors(got, want),
                         "one_gpu_sdpa": errors(base, want)})  # fmt: skip
            start = end
        found[method] = rows
    if b.cuda:
        # A decode step captured once and replayed, against the same steps run eagerly.
        cache = ringattn.KVCache(capacity=512)
        first = 2 * n * 128
        mine = [shard_for_rank(x[:, :, :first], b.rank, n, dim=2, layout="zigzag")
                for x in (q, k, v)]  # fmt: skip
        ringattn.prefill(*mine, cache)
        step = DecodeGraph(cache, *(x[:, :, first : first + 1] for x in (q, k, v)))
        rows = []
        for i in range(first, first + 8):
            got = step(*(x[:, :, i : i + 1] for x in (q, k, v)))
            rows.append(errors(got, reference(i, i + 1)))
        found["cuda_graph_replay"] = {
            "steps": len(rows),
            "max": max(r["max"] for r in rows),
            "rms": max(r["rms"] for r in rows),
            "cache_tokens": cache.total,
        }
    return found


def prefill_section(b: Bench, lengths: list[int], iters: int) -> list[dict]:
    rows = []
    for s in lengths:
        torch.manual_seed(2)
        q, k, v = (b.randn(1, h, s, DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
        mine = [shard_for_rank(x, b.rank, b.world, dim=2, layout="zigzag") for x in (q, k, v)]

        def ring() -> None:
            ringattn.prefill(*mine, ringattn.KVCache(capacity=s // b.world))

        ring_ms = b.time_ms(ring, iters)
        one = b.one_gpu(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=True), iters)  # fmt: skip
        flops = 4 * HEADS * s * s * DIM / 2
        rows.append({
            "tokens": s,
            "ringattn_ms": ring_ms,
            "one_gpu_ms": one,
            "speedup": one / ring_ms if one else None,
            "ringattn_tflops_per_gpu": flops / ring_ms / 1e9 / b.world,
        })  # fmt: skip
        if b.rank == 0:
            print("prefill", rows[-1], flush=True)
    return rows


def second_turn_section(b: Bench, cached: list[int], shares: list[float], iters: int) -> list:
    rows = []
    quantum = 2 * b.world * 64
    for p in cached:
        torch.manual_seed(3)
        kv = [b.randn(1, KV_HEADS, p, DIM) for _ in range(2)]
        cache = ringattn.KVCache(capacity=p // b.world + int(max(shares) * p) // b.world + 1024)
        local = [shard_for_rank(x, b.rank, b.world, dim=2, layout="zigzag") for x in kv]
        cache._append(*local, Segment("prefill", 0, p))  # random K/V stand in for a prompt
        for share in shares:
            t = max(quantum, round(p * share / quantum) * quantum)
            q, k, v = (b.randn(1, h, t, DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
            mine = [shard_for_rank(x, b.rank, b.world, dim=2, layout="zigzag") for x in (q, k, v)]
            state = snapshot(cache)
            times = {}
            for method in ("pass_kv", "pass_q", "auto"):

                def run(method: str = method) -> None:
                    ringattn.prefill(*mine, cache, method=method)
                    rewind(cache, state)

                times[method] = b.time_ms(run, iters)
            plan = choose_prefill_method(
                new_tokens=t, cached_tokens=p, world=b.world, heads=HEADS, kv_heads=KV_HEADS,
                head_dim=DIM, element_bytes=2, device_type=b.device.type,
                backend="cudnn" if b.cuda else "cpu",
            )  # fmt: skip
            full_k = torch.cat([kv[0], k], dim=2)
            full_v = torch.cat([kv[1], v], dim=2)

            def single() -> None:
                from torch.nn.attention.bias import causal_lower_right

                F.scaled_dot_product_attention(q, full_k, full_v, attn_mask=causal_lower_right(
                    t, p + t), enable_gqa=True)  # fmt: skip

            one = b.one_gpu(single, iters)
            measured = "pass_kv" if times["pass_kv"] <= times["pass_q"] else "pass_q"
            rows.append({
                "cached": p, "new": t, "share": t / (p + t),
                "pass_kv_ms": times["pass_kv"], "pass_q_ms": times["pass_q"],
                "auto_ms": times["auto"], "one_gpu_ms": one,
                "measured_faster": measured, "selector": plan.method,
                "predicted_compute_ms": plan.compute_ms,
                "predicted_pass_kv_exposed_ms": plan.pass_kv_exposed_ms,
                "predicted_pass_q_exposed_ms": plan.pass_q_exposed_ms,
                "pass_kv_bytes": plan.pass_kv_bytes, "pass_q_bytes": plan.pass_q_bytes,
            })  # fmt: skip
            if b.rank == 0:
                print("second turn", rows[-1], flush=True)
    return rows


def decode_section(
    b: Bench, contexts: list[int], steps: int, kernels: list[str], one_gpu_kernel: str
) -> list[dict]:
    rows = []
    for s in contexts:
        torch.manual_seed(4)
        cap = s // b.world + 4 * steps + 64
        cache = ringattn.KVCache(capacity=cap)
        local = [b.randn(1, KV_HEADS, s // b.world, DIM) for _ in range(2)]
        cache._append(*local, Segment("prefill", 0, s))  # random K/V stand in for a prompt
        del local
        new = [tuple(b.randn(1, h, 1, DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
               for _ in range(steps)]  # fmt: skip
        state = snapshot(cache)
        row: dict = {"context": s}
        for check in ("none", "shapes", "inputs"):

            def loop(check: str = check) -> None:
                for x in new:
                    ringattn.decode(*x, cache, check=check)
                rewind(cache, state)

            row[f"eager_check_{check}_ms"] = b.time_ms(loop, 3) / steps
        for kernel in kernels if b.cuda else []:
            try:
                row.update(decode_kernel_times(b, cache, state, new, kernel))
            except Exception as err:  # noqa: BLE001 - recorded; the other kernels still run
                row[f"error_{kernel}"] = f"{type(err).__name__}: {str(err)[:300]}"
                rewind(cache, state)
                if b.rank == 0:
                    print("decode kernel", kernel, "failed:", row[f"error_{kernel}"], flush=True)

        def single() -> None:
            kc = torch.empty(1, KV_HEADS, s + steps, DIM, device=b.device, dtype=b.dtype)
            vc = torch.empty_like(kc)
            for i, (q, k, v) in enumerate(new):
                kc[:, :, s + i : s + i + 1].copy_(k)
                vc[:, :, s + i : s + i + 1].copy_(v)
                F.scaled_dot_product_attention(q, kc[:, :, : s + i + 1], vc[:, :, : s + i + 1],
                                               enable_gqa=True)  # fmt: skip

        # One GPU: SDPA over the whole cache (allocation included once per loop: ~free).
        ms = b.one_gpu(single, 3)
        row["one_gpu_ms"] = ms / steps if ms else None
        if b.cuda:  # a rank's step on one GPU's whole cache
            ms = b.one_gpu(one_gpu_graph(b, s, new, one_gpu_kernel), 3)
            row["one_gpu_graph_ms"] = ms / steps if ms else None
        rows.append(row)
        if b.rank == 0:
            print("decode", row, flush=True)
    return rows


def decode_kernel_times(b: Bench, cache, state, new: list, kernel: str) -> dict:
    """ms per token of one split-K kernel: eager decode (no check), and DecodeGraph."""
    steps = len(new)

    def eager() -> None:
        for x in new:
            ringattn.decode(*x, cache, check="none", decode_kernel=kernel)
        rewind(cache, state)

    found = {f"eager_{kernel}_ms": b.time_ms(eager, 3) / steps}
    graph = DecodeGraph(cache, *new[0], decode_kernel=kernel)

    def replay() -> None:
        for x in new:
            graph(*x)
        rewind(cache, state)

    found[f"graph_{kernel}_ms"] = b.time_ms(replay, 3) / steps
    return found


def one_gpu_graph(b: Bench, s: int, new: list, kernel: str):
    """One GPU, the same step as a rank's (store the token, split-K over the used cache)
    captured in a CUDA graph: what the kernel gives without sharding. The first call (the
    timer's warm-up) builds the cache and captures; every call replays ``new``."""
    from ringattn.decode_kernels import cache_attention

    made: dict = {}

    def setup() -> None:
        slots = -(-(s + len(new) + 1) // 256) * 256  # whole slot blocks, as KVCache's
        kc = torch.randn(1, KV_HEADS, slots, DIM, device=b.device, dtype=b.dtype)
        vc = torch.randn_like(kc)
        counters = torch.tensor([s], dtype=torch.int64, device=b.device)
        inputs = [x.clone() for x in new[0]]

        @torch.no_grad()
        def step() -> torch.Tensor:
            kc.index_copy_(2, counters, inputs[1])
            vc.index_copy_(2, counters, inputs[2])
            counters.add_(1)
            out = cache_attention(inputs[0], kc, vc, counters, DIM**-0.5, kernel)[0]
            return out.to(b.dtype)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        made.update(graph=graph, counters=counters, inputs=inputs, keep=(kc, vc))

    def run() -> None:
        if not made:
            setup()
        made["counters"].fill_(s)
        for x in new:
            for dst, src in zip(made["inputs"], x):
                dst.copy_(src)
            made["graph"].replay()

    return run


def report(data: dict) -> str:
    out = [f"# Inference: {data['world']} x {data['device']}, bf16, 32/8 heads x 128, batch 1", ""]

    def ms(x: float | None, digits: int = 2) -> str:
        return "OOM" if x is None else f"{x:.{digits}f}"

    if "correctness" in data:
        out += ["## Correctness (max abs error against float64; one-GPU SDPA alongside)", "",
                "| method | call | tokens | ringattn max | ringattn rms | SDPA max | SDPA rms |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for method in ("pass_kv", "pass_q"):
            for r in data["correctness"][method]:
                ring, one = r["ringattn"], r["one_gpu_sdpa"]
                out.append(
                    f"| {method} | {r['call']} | {r['tokens']} | {ring['max']:.2e} | "
                    f"{ring['rms']:.2e} | {one['max']:.2e} | {one['rms']:.2e} |"
                )
        g = data["correctness"].get("cuda_graph_replay")
        if g:
            out += ["", f"CUDA-graph replay of decode: {g['steps']} steps, max error "
                        f"{g['max']:.2e}, rms {g['rms']:.2e}."]  # fmt: skip
        out.append("")
    if "prefill" in data:
        out += ["## Prefill, first turn (forward of one attention layer)", "",
                "| tokens | one GPU ms | ringattn ms | x one GPU | TFLOP/s per GPU |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in data["prefill"]:
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            tflops = r["ringattn_tflops_per_gpu"]
            out.append(f"| {r['tokens'] // 1024}K | {ms(r['one_gpu_ms'])} | "
                       f"{r['ringattn_ms']:.2f} | {sp} | {tflops:.0f} |")  # fmt: skip
        out.append("")
    if "second_turn" in data:
        out += ["## Second turn: T new tokens over P cached", "",
                "| P | T | T/(T+P) | pass-KV ms | pass-Q ms | auto ms | one GPU ms | faster | "
                "selector | predicted exposed KV / Q ms |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in data["second_turn"]:
            out.append(
                f"| {r['cached'] // 1024}K | {r['new']} | {r['share']:.3f} | "
                f"{r['pass_kv_ms']:.2f} | {r['pass_q_ms']:.2f} | {r['auto_ms']:.2f} | "
                f"{ms(r['one_gpu_ms'])} | {r['measured_faster']} | {r['selector']} | "
                f"{r['predicted_pass_kv_exposed_ms']:.3f} / "
                f"{r['predicted_pass_q_exposed_ms']:.3f} |"
            )
        out.append("")
    if "decode" in data:
        kernels = data.get("decode_kernels", [])
        out += ["## Decode, ms per token (one attention layer, T = 1)", "",
                "Eager `decode` (default kernel) with each cross-rank check; then each split-K "
                "kernel eager (check none) and replayed from a CUDA graph (DecodeGraph). One "
                "GPU: SDPA over its whole cache (eager), and a rank's step (store, then the "
                f"{data.get('one_gpu_graph_kernel', 'flash')} kernel) over the whole cache in "
                "a CUDA graph.", ""]  # fmt: skip
        head = ["context", "one GPU SDPA", "one GPU graph", "eager none", "eager shapes",
                "eager inputs"]  # fmt: skip
        for kernel in kernels:
            head += [f"{kernel} eager", f"{kernel} graph"]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in data["decode"]:
            c = r["context"]
            name = f"{c // 2**20}M" if c >= 2**20 else f"{c // 1024}K"
            one_graph = r.get("one_gpu_graph_ms")
            cells = [name, ms(r["one_gpu_ms"], 3), ms(one_graph, 3) if one_graph else "-"]
            cells += [ms(r[f"eager_check_{c}_ms"], 3) for c in ("none", "shapes", "inputs")]
            for kernel in kernels:
                for key in (f"eager_{kernel}_ms", f"graph_{kernel}_ms"):
                    missing = "failed" if f"error_{kernel}" in r else "-"
                    cells.append(ms(r[key], 3) if key in r else missing)
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    args = parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)), end="")
        return
    b = Bench()
    if args.small:
        args.prefill, args.cached, args.decode = "2K", "2K", "4K"
        args.decode_steps, args.iters = 4, 1
    data: dict = {
        "command": " ".join(sys.argv[1:]),
        "world": b.world,
        "device": torch.cuda.get_device_name() if b.cuda else "cpu",
        "torch": torch.__version__,
        "dtype": str(b.dtype),
    }
    from ringattn import decode_kernels

    sections = args.sections.split(",")
    kernels = [k for k in args.decode_kernels.split(",") if k]
    if args.flex_options:
        pairs = [item.split("=") for item in args.flex_options.split("/") if item]
        decode_kernels.FLEX_OPTIONS = {k: int(v) for k, v in pairs}
    data["flex_options"] = decode_kernels.FLEX_OPTIONS
    if "correctness" in sections:
        data["correctness"] = correctness(b, kernels)
        if b.rank == 0:
            print("correctness", json.dumps(data["correctness"])[:2000], flush=True)
    data["decode_kernels_working"] = {
        f"{name} on {device}": ok for (name, device), ok in decode_kernels._WORKS.items()
    }
    if "prefill" in sections:
        data["prefill"] = prefill_section(b, tokens(args.prefill), args.iters)
    if "second_turn" in sections:
        shares = [float(x) for x in args.shares.split(",")]
        data["second_turn"] = second_turn_section(b, tokens(args.cached), shares, args.iters)
    if "decode" in sections:
        data["decode"] = decode_section(
            b, tokens(args.decode), args.decode_steps, kernels, args.one_gpu_kernel
        )
        data["one_gpu_graph_kernel"] = args.one_gpu_kernel
    data["decode_kernels"] = kernels
    if b.rank == 0:
        print(report(data), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
