"""The split-K decode kernels on one GPU: one new token over the used part of a cache buffer.

    python benchmarks/decode_kernels_bench.py --json out.json
    python benchmarks/decode_kernels_bench.py --report out.json > out.md

bf16, batch 1, 32 query and 8 K/V heads of 128. For each used length L and capacity C
(the buffer ``[1, 8, C, 128]``, the first L slots used), every kernel of
:mod:`ringattn.decode_kernels` is timed eagerly and replayed from a CUDA graph (20 calls per
graph), next to SDPA over exactly the L used slots (what a kernel that reads only those
costs), with its max error against float64 attention over the L slots. ``GB/s``: the K/V
bytes of the used slots over the graph time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from ringattn import decode_kernels

HEADS, KV_HEADS, DIM = 32, 8, 128


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", default="64K:64K,512K:512K", help="used:capacity pairs")
    p.add_argument(
        "--kernels",
        default="flex,flex@num_stages=3,flex@num_stages=3/num_warps=4,"
        "flex@SPLIT_KV=64/num_stages=3,flash",
        help="kernels; flex@K=V/K=V passes FlexAttention kernel options",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--report", default=None)
    return p.parse_args()


def size(text: str) -> int:
    text = text.strip().upper()
    return int(float(text.rstrip("KM")) * {"K": 1024, "M": 1024**2}.get(text[-1], 1))


def flex_options(text: str) -> dict | None:
    """``"num_stages=3/num_warps=4"`` -> ``{"num_stages": 3, "num_warps": 4}``."""
    pairs = [item.split("=") for item in text.split("/") if item]
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in pairs} or None


def time_eager(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def time_graph(fn, iters: int, calls: int = 20) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return time_eager(graph.replay, iters) / calls


def measure(used: int, capacity: int, kernels: list[str], iters: int) -> dict:
    """One used length and capacity: SDPA over the used slots, then every kernel."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, 1, DIM, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, capacity, DIM, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    length = torch.tensor([used], dtype=torch.int64, device=dev)
    scale = DIM**-0.5
    # float64 reference over the used slots, grouped heads folded as rows.
    qf = q.double().view(1, KV_HEADS, HEADS // KV_HEADS, DIM)
    s = torch.matmul(qf, k[:, :, :used].double().transpose(-1, -2)) * scale
    want = torch.matmul(torch.softmax(s, -1), v[:, :, :used].double()).view(1, HEADS, 1, DIM)
    del s
    row: dict = {"used": used, "capacity": capacity, "kernels": {}}
    kb, vb = k[:, :, :used], v[:, :, :used]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, kb, vb, scale=scale, enable_gqa=True)

    row["sdpa_used"] = {
        "max_error": float((sdpa().double() - want).abs().max()),
        "eager_ms": time_eager(sdpa, iters),
        "graph_ms": time_graph(sdpa, iters),
    }
    print(used, capacity, "sdpa", row["sdpa_used"], flush=True)
    for name in kernels:
        # "flex@num_stages=3/num_warps=4": FlexAttention with those kernel options.
        kernel, _, options = name.partition("@")
        decode_kernels.FLEX_OPTIONS = flex_options(options) if kernel == "flex" else None

        def run(kernel: str = kernel) -> torch.Tensor:
            return decode_kernels.cache_attention(q, k, v, length, scale, kernel)[0]

        try:
            got = run()
            torch.cuda.synchronize()
            found = {
                "max_error": float((got.double() - want).abs().max()),
                "eager_ms": time_eager(run, iters),
                "graph_ms": time_graph(run, iters),
            }
        except Exception as err:  # noqa: BLE001 - recorded, the other kernels still run
            found = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        decode_kernels.FLEX_OPTIONS = None
        row["kernels"][name] = found
        print(used, capacity, name, found, flush=True)
    return row


def main() -> None:
    args = parse_args()
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)), end="")
        return
    rows = []
    for case in args.cases.split(","):
        used, capacity = (size(x) for x in case.split(":"))
        rows.append(measure(used, capacity, args.kernels.split(","), args.iters))
        torch.cuda.empty_cache()
    data = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv[1:]),
        "flash_schema": str(torch.ops.aten._flash_attention_forward.default._schema),
        "rows": rows,
    }
    print(report(data), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)


def report(data: dict) -> str:
    out = [f"# Split-K decode kernels: {data['device']}, torch {data['torch']}", "",
           "One token, bf16, 32/8 heads x 128; ms per call (CUDA graph of 20 calls / eager).",
           "", "| used | capacity | kernel | graph ms | eager ms | GB/s (graph) | max error |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip

    def name(n: int) -> str:
        return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}K"

    for r in data["rows"]:
        gb = 2 * r["used"] * KV_HEADS * DIM * 2 / 1e9
        items = [("SDPA over the used slots", r["sdpa_used"])] + list(r["kernels"].items())
        for kernel, f in items:
            if "error" in f:
                out.append(f"| {name(r['used'])} | {name(r['capacity'])} | {kernel} | "
                           f"failed: {f['error'][:80]} | | | |")  # fmt: skip
                continue
            out.append(
                f"| {name(r['used'])} | {name(r['capacity'])} | {kernel} | {f['graph_ms']:.4f} | "
                f"{f['eager_ms']:.4f} | {gb / f['graph_ms'] * 1e3:.0f} | {f['max_error']:.1e} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
