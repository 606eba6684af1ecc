"""Masked ring attention on 2 GPUs: bf16 against float64, and a first timing beside one GPU.

torchrun --nproc-per-node 2 scripts/gpu_masks_smoke.py [--quick] (or --cpu: Gloo, float64,
tiny shapes, no timing: checks this script). JSON rows on stdout and in $OUT/masks_smoke.jsonl.

Correctness: packed documents (causal), a causal sliding window (contiguous layout), and
documents with a prefix-LM mask function (GQA), forward and dq/dk/dv of the ring against
float64 attention with the same dense mask; one-GPU FlexAttention in bf16 beside it for
scale. Timing (fwd+bwd, bf16, 32/8 heads x 128): 64K tokens of heavy-tailed packed
documents and 128K tokens with a 4K causal window, ringattn's ring against one GPU's
compiled FlexAttention with the same mask.
"""

# ruff: noqa: B023  (the timed closures run within their loop iteration)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist

import ringattn

p = argparse.ArgumentParser()
p.add_argument("--cpu", action="store_true")
p.add_argument("--quick", action="store_true", help="correctness only")
p.add_argument("--iters", type=int, default=3)
a = p.parse_args()
backend = "gloo" if a.cpu else "nccl"
dist.init_process_group(backend, timeout=datetime.timedelta(seconds=240))
rank, world = dist.get_rank(), dist.get_world_size()
if a.cpu:
    dev = torch.device("cpu")
else:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
T0 = time.time()


def emit(row: dict) -> None:
    if rank == 0:
        row["t"] = round(time.time() - T0, 1)
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "masks_smoke.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")


def heavy_tailed(s: int, seed: int, mean: int, unit: int = 1) -> list[int]:
    rnd = random.Random(seed)
    lengths = [s // 4 + 3]
    while sum(lengths) < s:
        n = max(1, int(rnd.lognormvariate(math.log(mean) - 0.5, 1.0)))
        lengths.append(min(n, s - sum(lengths)))
    rnd.shuffle(lengths)
    return lengths


def prefix_lm(b, h, q, kv):
    return (kv < 100) | (kv <= q)


def reference(q, k, v, mask):
    g = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~mask, -math.inf)
    anyk = mask.any(-1, keepdim=True)
    p_ = torch.softmax(s.masked_fill(~anyk, 0.0), -1) * mask
    return p_ @ v


def rel(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-6))


# ---------------------------------------------------------------- correctness
dt = torch.float64 if a.cpu else torch.bfloat16
B, H, HK, D = 1, 8, 2, 64
S = 96 if a.cpu else 2048
cases = [
    (
        "documents causal",
        dict(documents=ringattn.Documents.from_lengths(heavy_tailed(S, 1, S // 8)), causal=True),
        "zigzag",
    ),
    ("window causal", dict(window=(S // 7, 0), causal=True), "contiguous"),
    (
        "documents + prefix-LM mask_mod",
        dict(
            documents=ringattn.Documents.from_lengths([S // 3, 1, S - S // 3 - 1]),
            mask_mod=prefix_lm,
        ),
        "zigzag",
    ),
]
for name, kw, layout in cases:
    for strategy in ("ring",) if not a.cpu else ("ring", "allgather"):
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            full = [
                torch.randn(B, h, S, D, generator=g, dtype=torch.float64).to(dev)
                for h in (H, HK, HK, H)
            ]
            full = [x.to(dt).double() for x in full]
            docs = kw.get("documents")
            cut = lambda x: ringattn.shard(x, None, documents=docs, layout=layout)  # noqa: E731
            glue = lambda x: ringattn.unshard(x.contiguous(), None, documents=docs, layout=layout)  # noqa: E731
            q, k, v = (cut(x).to(dt).requires_grad_() for x in full[:3])
            out = ringattn.attention(q, k, v, None, strategy=strategy, layout=layout, **kw)
            out.backward(cut(full[3]).to(dt))
            if docs is not None:
                mask = docs.dense_mask(
                    causal=kw.get("causal", False), mask_mod=kw.get("mask_mod")
                ).to(dev)
            else:
                mask = (
                    ringattn.Documents.from_lengths([S])
                    .dense_mask(causal=True, window=kw["window"])
                    .to(dev)
                )
            fq, fk, fv = (x.clone().requires_grad_() for x in full[:3])
            ref = reference(fq, fk, fv, mask)
            ref.backward(full[3])
            row = dict(kind="check", case=name, strategy=strategy, dtype=str(dt))
            row.update(
                out=rel(glue(out.detach()), ref.detach()),
                dq=rel(glue(q.grad), fq.grad),
                dk=rel(glue(k.grad), fk.grad),
                dv=rel(glue(v.grad), fv.grad),
            )
            if not a.cpu and rank == 0:
                # One GPU's SDPA in bf16 with the same (boolean) mask, for scale.
                lq, lk, lv = (x.to(dt).requires_grad_() for x in full[:3])
                lo = torch.nn.functional.scaled_dot_product_attention(
                    lq, lk, lv, attn_mask=mask, enable_gqa=True
                )
                lo.backward(full[3].to(dt))
                row.update(
                    one_gpu_sdpa_out=rel(lo.detach(), ref.detach()),
                    one_gpu_sdpa_dq=rel(lq.grad, fq.grad),
                    one_gpu_sdpa_dk=rel(lk.grad, fk.grad),
                )
            emit(row)
        except Exception as err:  # noqa: BLE001
            emit(dict(kind="check", case=name, strategy=strategy, error=repr(err)[:400]))
dist.barrier()

# ---------------------------------------------------------------- timing
if a.cpu or a.quick:
    dist.destroy_process_group()
    raise SystemExit(0)

from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

H, HK, D, dt = 32, 8, 128, torch.bfloat16
cflex = torch.compile(flex_attention, dynamic=False, fullgraph=True)


def med(fn, all_ranks: bool) -> float:
    fn()
    torch.cuda.synchronize()
    if all_ranks:
        dist.barrier()
    ts = []
    for _ in range(a.iters):
        s_, e_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s_.record()
        fn()
        e_.record()
        torch.cuda.synchronize()
        ts.append(s_.elapsed_time(e_))
    ts.sort()
    t = torch.tensor([ts[len(ts) // 2]], device=dev)
    if all_ranks:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


for label, s, window in (("docs 64K", 65536, None), ("window 4K at 128K", 131072, 4096)):
    try:
        if window is None:
            lengths = heavy_tailed(s, 0, 4096)
            docs = ringattn.Documents.from_lengths(lengths)
            kw = dict(documents=docs, causal=True)
            layout = "zigzag"
            ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(dev)

            def mod(b, h, qi, ki):
                return (ids[qi] == ids[ki]) & (ki <= qi)

            info = dict(
                docs=len(lengths),
                longest=max(lengths),
                imbalance=round(ringattn.layout_imbalance(docs, world), 4),
            )
        else:
            docs = None
            kw = dict(window=(window - 1, 0), causal=True)
            layout = "contiguous"

            def mod(b, h, qi, ki):
                return (ki <= qi) & (qi - ki < window)

            info = dict(window=window)
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, H, s, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, HK, s, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, HK, s, D, device=dev, dtype=dt, generator=g)
        t1 = None
        if rank == 0:
            bm = create_block_mask(mod, 1, 1, s, s, device=dev, _compile=True)
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))

            def one():
                o = cflex(qq, kk, vv, block_mask=bm, enable_gqa=True)
                o.backward(torch.ones_like(o))

            t1 = med(one, False)
            del qq, kk, vv, bm
        dist.barrier()
        sq, sk, sv = (
            ringattn.shard(x, None, documents=docs, layout=layout).detach().requires_grad_()
            for x in (q, k, v)
        )
        tp = time.time()
        ringattn.ring_attention(sq, sk, sv, layout=layout, **kw)  # plans (and BlockMasks)
        torch.cuda.synchronize()
        plan_s = time.time() - tp
        do = torch.ones_like(sq)

        def ring():
            o = ringattn.ring_attention(sq, sk, sv, layout=layout, **kw)
            o.backward(do)

        t2 = med(ring, True)
        emit(
            dict(
                kind="time",
                case=label,
                S=s,
                one_gpu_flex_ms=round(t1, 2) if t1 else None,
                ringattn_2gpu_ms=round(t2, 2),
                speedup=round(t1 / t2, 3) if t1 else None,
                first_call_s=round(plan_s, 2),
                **info,
            )
        )
    except Exception as err:  # noqa: BLE001
        emit(dict(kind="time", case=label, error=repr(err)[:400]))
    torch.cuda.empty_cache()
try:
    from torch._dynamo.utils import counters

    emit(dict(kind="compile", unique_graphs=counters["stats"]["unique_graphs"]))
except Exception as err:  # noqa: BLE001
    emit(dict(kind="compile", error=repr(err)[:200]))
dist.destroy_process_group()
