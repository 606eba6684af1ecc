"""GPU workers for tests/test_gpu.py (importable by spawned NCCL ranks).

Every result (output, gradients, lse) is compared with float64 attention on the full
sequence, next to one-GPU SDPA's own error with the same backend and dtype on the same
inputs; the workers return the measured ``(rms, max)`` errors and the test applies
tests/judge.py. Sizes: batch 2, 8 query heads, head dim 128, 1024 tokens per rank.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn
from ringattn import api, merge
from ringattn.reference import attention

from judge import errors

SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
DTYPES = ("bfloat16", "float16")
FIELDS = ("out", "dq", "dk", "dv")
TOKENS_PER_RANK = 1024


def _inputs(seed: int, tokens: int, kv: int, dtype: str, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, 8, tokens, 128), (batch, kv, tokens, 128)]
    return [
        torch.randn(s, generator=g, device="cuda", dtype=getattr(torch, dtype))
        for s in (shapes[0], shapes[1], shapes[1], shapes[0])
    ]


def reference(full: list[torch.Tensor], causal: bool) -> dict[str, torch.Tensor]:
    """float64 attention on the (rounded) full inputs: out, lse and gradients."""
    q, k, v = (x.double().requires_grad_() for x in full[:3])
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    grads = torch.autograd.grad(out, (q, k, v), full[3].double())
    return {"out": out.detach(), "lse": lse.detach(), **dict(zip(FIELDS[1:], grads))}


def sdpa(backend: str, full: list[torch.Tensor], causal: bool) -> dict[str, torch.Tensor]:
    """One-GPU SDPA with ``backend`` in the inputs' dtype: out and gradients."""
    q, k, v = (x.detach().clone().requires_grad_() for x in full[:3])
    groups = q.size(1) // k.size(1)
    with sdpa_kernel([SDPA[backend]]):
        try:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=groups > 1)
        except RuntimeError:  # this backend's SDPA takes no grouped heads: expand them
            kk, vv = (x.repeat_interleave(groups, 1) for x in (k, v))
            out = F.scaled_dot_product_attention(q, kk, vv, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), full[3])
    return {"out": out.detach(), **dict(zip(FIELDS[1:], grads))}


def measured(got: dict, want: dict, same: dict) -> dict[str, Any]:
    """Per field: ((rms, max) of ``got``, (rms, max) of SDPA's, or None for lse)."""
    return {
        name: (errors(t, want[name]), errors(same[name], want[name]) if name in same else None)
        for name, t in got.items()
    }


def run_kernels() -> list[dict]:
    """Each backend's block forward/backward on one GPU (the ring's building block)."""
    from ringattn import kernels

    rows = []
    for i, (backend, dtype, causal, kv) in enumerate(
        itertools.product(SDPA, DTYPES, (True, False), (8, 2))
    ):
        full = _inputs(i, 512, kv, dtype)
        kern = kernels.get_kernel(backend)
        out, lse, aux = kern.forward(*full[:3], causal=causal, scale=128**-0.5)
        grads = kern.backward(full[3], *full[:3], out, lse, aux, causal=causal, scale=128**-0.5)
        got = {"out": out, "lse": lse, **dict(zip(FIELDS[1:], grads))}
        rows.append(
            {
                "id": f"kernel-{backend}-{dtype}-{'causal' if causal else 'full'}-kv{kv}",
                "dtype": dtype,
                "fields": measured(got, reference(full, causal), sdpa(backend, full, causal)),
            }
        )
    return rows


def _unshard_all(tensors: dict, mesh: object, layout: str) -> dict:
    return {name: ringattn.unshard(t, mesh, layout=layout) for name, t in tensors.items()}


def run_nccl(rank: int, world: int) -> list[dict]:
    """Over NCCL: the ring for every backend x dtype x causal x layout x GQA, the other
    strategies, and CUDA-graph replay. Rank 0 returns the measured errors."""
    from torch.distributed.device_mesh import init_device_mesh

    triton_merges = []
    fused = merge.merge_triton

    def counting(*args):
        triton_merges.append(1)
        return fused(*args)

    merge.merge_triton = counting
    rows: list[dict] = []
    tokens = TOKENS_PER_RANK * world

    def record(row_id: str, dtype: str, full, causal, backend, got, mesh, layout) -> None:
        got = _unshard_all(got, mesh, layout)
        if rank == 0:
            want, same = reference(full, causal), sdpa(backend, full, causal)
            rows.append({"id": row_id, "dtype": dtype, "fields": measured(got, want, same)})

    configs = itertools.product(SDPA, DTYPES, (True, False), ("zigzag", "contiguous"), (8, 2))
    for i, (backend, dtype, causal, layout, kv) in enumerate(configs):
        full = _inputs(100 + i, tokens, kv, dtype)
        q, k, v, dout = (ringattn.shard(x, layout=layout).detach().clone() for x in full)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        out, lse = ringattn.ring_attention(
            *leaves, causal=causal, layout=layout, backend=backend, return_lse=True
        )
        out.backward(dout)
        got = {"out": out, "lse": lse, **{n: x.grad for n, x in zip(FIELDS[1:], leaves)}}
        mask = "causal" if causal else "full"
        record(
            f"ring-{backend}-{dtype}-{mask}-{layout}-kv{kv}",
            dtype,
            full,
            causal,
            backend,
            got,
            None,
            layout,
        )

    # The other strategies (the hybrid on a (world/2) x 2 mesh), zigzag.
    strategies = ["allgather", "ulysses"] + (["hybrid"] if world % 2 == 0 else [])
    mesh2d = init_device_mesh("cuda", (world // 2, 2)) if world % 2 == 0 else None
    configs = itertools.product(strategies, SDPA, DTYPES, (True, False))
    for i, (strategy, backend, dtype, causal) in enumerate(configs):
        mesh = mesh2d if strategy == "hybrid" else None
        full = _inputs(300 + i, tokens, 2, dtype)
        q, k, v, dout = (ringattn.shard(x, mesh).detach().clone() for x in full)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        out = ringattn.attention(*leaves, mesh, causal=causal, strategy=strategy, backend=backend)
        out.backward(dout)
        got = {"out": out, **{n: x.grad for n, x in zip(FIELDS[1:], leaves)}}
        mask = "causal" if causal else "full"
        record(
            f"{strategy}-{backend}-{dtype}-{mask}",
            dtype,
            full,
            causal,
            backend,
            got,
            mesh,
            "zigzag",
        )

    # CUDA graphs: one signature called on inputs A, B, A (recorded on the first call,
    # replayed after), every forward before the backwards as in a model's layers. "first":
    # only rank 0 replays while the others run the eager ring (ranks need not agree).
    try:
        graph_configs = [
            ("cudnn", "float16", False, "contiguous", 8, "first"),
            ("flash", "float16", True, "zigzag", 2, "all"),
            ("cudnn", "bfloat16", True, "zigzag", 2, "first"),
            ("cudnn", "bfloat16", True, "zigzag", 8, "all"),
        ]
        for i, (backend, dtype, causal, layout, kv, replaying) in enumerate(graph_configs):
            ringattn.set_cuda_graphs(replaying == "all" or rank == 0)
            sets = [_inputs(500 + 2 * i + j, tokens, kv, dtype, batch=1) for j in range(2)]
            outs, leaves_per_call, douts = [], [], []
            for full in (sets[0], sets[1], sets[0]):
                q, k, v, dout = (ringattn.shard(x, layout=layout).detach().clone() for x in full)
                leaves = [x.requires_grad_() for x in (q, k, v)]
                outs.append(
                    ringattn.ring_attention(*leaves, causal=causal, layout=layout, backend=backend)
                )
                leaves_per_call.append(leaves)
                douts.append(dout)
            torch.autograd.backward(outs, douts)
            for call, (full, out, leaves) in enumerate(
                zip((sets[0], sets[1], sets[0]), outs, leaves_per_call)
            ):
                got = {"out": out, **{n: x.grad for n, x in zip(FIELDS[1:], leaves)}}
                mask = "causal" if causal else "full"
                row_id = f"graphs-{replaying}-{backend}-{dtype}-{mask}-{layout}-kv{kv}-call{call}"
                record(row_id, dtype, full, causal, backend, got, None, layout)
        # Teardown with the last programs alive: they hold no NCCL work, so it must not wait.
        programs = len(api._GRAPHED)
        start = time.perf_counter()
        dist.destroy_process_group()
        if rank == 0:
            rows.append(
                {"id": "teardown", "programs": programs, "seconds": time.perf_counter() - start}
            )
    finally:
        ringattn.set_cuda_graphs("auto")
        merge.merge_triton = fused
    if rank == 0:
        rows.append({"id": "triton-merges", "count": len(triton_merges)})
    return rows if rank == 0 else []


# Masks on GPUs (FlexAttention for partial pairs): name -> (documents' lengths, causal,
# window, mask function name), over 1024 tokens per rank. Uneven documents, one longer
# than a shard; a window that crosses shard edges; a prefix-LM mask function.
MASKED = {
    "docs": ("uneven", True, None, None),
    "window": (None, True, (300, 0), None),
    "docs-window": ("uneven", True, (200, 0), None),
    "prefix-lm": (None, False, None, "prefix_lm"),
}


def _lengths(tokens: int) -> list[int]:
    cut = [1, 7, 129, tokens // 2 + 5, 300]
    return [*cut, tokens - sum(cut)]


def _lookup(dense: torch.Tensor):
    def mask_mod(b, h, qi, kv):
        return dense[b, h, qi, kv]

    return mask_mod


def run_masked(rank: int, world: int) -> list[dict]:
    """Every strategy under documents, a window and a mask function, bf16, against float64
    with the same dense mask; one-GPU FlexAttention in bf16 is the same-dtype comparator.
    Rank 0 returns the measured errors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.attention.flex_attention import flex_attention

    from mask_cases import MASK_MODS

    tokens = TOKENS_PER_RANK * world
    strategies = ["ring", "allgather", "ulysses", "auto"] + (["hybrid"] if world >= 4 else [])
    mesh2d = init_device_mesh("cuda", (world // 2, 2)) if world >= 4 else None
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for i, (name, (docs, causal, window, mod)) in enumerate(MASKED.items()):
        lengths = _lengths(tokens) if docs else [tokens]
        case = {
            "batch": 2,
            "heads": 8,
            "seq": tokens,
            "segments": [(n, False) for n in lengths],
            "causal": causal,
            "window": window,
            "mask_mod": mod,
        }
        full = _inputs(700 + i, tokens, 2, "bfloat16")
        want, same = _masked_references(case, full, flex)
        documents = ringattn.Documents.from_lengths(lengths) if docs else None
        for strategy in strategies:
            mesh = mesh2d if strategy == "hybrid" else None
            cut = {"documents": documents} if documents is not None else {"layout": "zigzag"}
            q, k, v, dout = (ringattn.shard(x, mesh, **cut).detach().clone() for x in full)
            leaves = [x.requires_grad_() for x in (q, k, v)]
            kw = dict(causal=causal, documents=documents, window=window)
            kw["mask_mod"] = MASK_MODS[mod] if mod else None
            if strategy == "ring":
                out = ringattn.ring_attention(*leaves, **kw)
            else:
                out = ringattn.attention(*leaves, mesh, strategy=strategy, **kw)
            out.backward(dout)
            got = {"out": out, **{n: x.grad for n, x in zip(FIELDS[1:], leaves)}}
            got = {n: ringattn.unshard(t, mesh, **cut) for n, t in got.items()}
            if rank == 0:
                fields = {n: (errors(got[n], want[n]), errors(same[n], want[n])) for n in FIELDS}
                rows.append(
                    {"id": f"masked-{name}-{strategy}", "dtype": "bfloat16", "fields": fields}
                )
    rows += _new_batches(rank, world, flex)
    return rows if rank == 0 else []


def _masked_references(case: dict, full: list[torch.Tensor], flex) -> tuple[dict, dict]:  # noqa: ANN001
    """For ``full`` (q, k, v, dout) under the case's dense mask: float64 attention's out,
    dq, dk, dv (the reference) and one-GPU FlexAttention's in the inputs' dtype (the
    same-dtype comparator)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from mask_cases import reference_attention, reference_mask

    tokens = case["seq"]
    dense = reference_mask(case).cuda()
    scale = 128**-0.5
    q64, k64, v64 = (x.double().requires_grad_() for x in full[:3])
    ref_out, _ = reference_attention(q64, k64, v64, dense, scale)
    grads = torch.autograd.grad(ref_out, (q64, k64, v64), full[3].double())
    want = dict(zip(FIELDS, (ref_out, *grads)))
    block_mask = create_block_mask(_lookup(dense), 2, 8, tokens, tokens, device="cuda")
    q1, k1, v1 = (x.detach().clone().requires_grad_() for x in full[:3])
    out1 = flex(q1, k1, v1, block_mask=block_mask, scale=scale, enable_gqa=True)
    same = dict(zip(FIELDS, (out1, *torch.autograd.grad(out1, (q1, k1, v1), full[3]))))
    return want, same


def _new_documents(tokens: int) -> list[list[int]]:
    """Four document mixes of ``tokens`` tokens, as four batches of a run bring them (each
    gives the masked all-gather another key count)."""
    rnd = random.Random(5)
    mixes = []
    for i in range(4):
        cuts = sorted(rnd.sample(range(1, tokens), 2 + i))
        mixes.append([b - a for a, b in zip([0, *cuts], [*cuts, tokens])])
    return mixes


def _key_count(documents: ringattn.Documents, rank: int, world: int) -> int:
    """The key count rank ``rank``'s all-gather kernel sees for ``documents`` (rounded to a
    compiled size when its pair is partial)."""
    from ringattn.balance import balanced_placement
    from ringattn.kv_exchange import kv_exchange, padded_keys
    from ringattn.mask_plan import fetched_plan
    from ringattn.masks import MaskSpec

    spec = MaskSpec.build(documents, True, None, None)
    placement = balanced_placement(documents, world)
    keys = kv_exchange(spec, placement, rank).positions
    padded = padded_keys(keys.numel(), spec.seq_len)
    plan = fetched_plan(spec, placement, rank, keys, "flex", padded)
    return plan.mask.pair.kpos.numel() if plan.mask is not None else keys.numel()


def _new_batches(rank: int, world: int, flex) -> list[dict]:  # noqa: ANN001
    """The all-gather on four batches of new documents, each against float64; how many
    graphs FlexAttention compiled for them and how many key sizes they brought (rank 0's
    rows)."""
    from torch._dynamo.utils import counters

    tokens = TOKENS_PER_RANK * world
    rows, graphs, sizes = [], 0, set()
    for i, lengths in enumerate(_new_documents(tokens)):
        case = {"batch": 2, "heads": 8, "seq": tokens, "causal": True, "window": None,
                "segments": [(n, False) for n in lengths], "mask_mod": None}  # fmt: skip
        full = _inputs(800 + i, tokens, 2, "bfloat16")
        want, same = _masked_references(case, full, flex)
        documents = ringattn.Documents.from_lengths(lengths)
        sizes.add(_key_count(documents, rank, world))
        q, k, v, dout = (ringattn.shard(x, documents=documents).detach().clone() for x in full)
        leaves = [x.requires_grad_() for x in (q, k, v)]
        before = counters["stats"]["unique_graphs"]
        out = ringattn.attention(*leaves, strategy="allgather", causal=True, documents=documents)
        out.backward(dout)
        torch.cuda.synchronize()
        graphs += counters["stats"]["unique_graphs"] - before
        got = {"out": out, **{n: x.grad for n, x in zip(FIELDS[1:], leaves)}}
        got = {n: ringattn.unshard(t, documents=documents) for n, t in got.items()}
        if rank == 0:
            fields = {n: (errors(got[n], want[n]), errors(same[n], want[n])) for n in FIELDS}
            rows.append({"id": f"newdocs-{i}-allgather", "dtype": "bfloat16", "fields": fields})
    if rank == 0:
        rows.append({"id": "newdocs-graphs", "graphs": graphs, "sizes": len(sizes)})
    return rows


def run_triton_merge() -> list[dict]:
    """The compiled Triton merge on CUDA against the merge computed in float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in ("float32", "bfloat16", "float16"):
        b, h, s, d = 2, 3, 1000, 72  # rows not a multiple of the block, head dim not a power of 2
        acc_out = torch.randn(b, h, s, d, generator=g, device="cuda").to(getattr(torch, dtype))
        acc_lse = torch.randn(b, h, s, generator=g, device="cuda") * 30
        out = torch.randn(b, h, s, d, generator=g, device="cuda").to(getattr(torch, dtype))
        lse = torch.randn(b, h, s, generator=g, device="cuda") * 30
        want_out, want_lse = acc_out.double(), acc_lse.double()
        merge.merge_eager(want_out, want_lse, out.double(), lse.double())
        used = merge._use_triton(acc_out, acc_lse, out, lse)
        merge.merge_into(acc_out, acc_lse, out, lse)
        rows.append(
            {
                "id": f"triton-merge-{dtype}",
                "dtype": dtype,
                "triton": used,
                "fields": {
                    "out": (errors(acc_out, want_out), None),
                    "lse": (errors(acc_lse, want_lse), None),
                },
            }
        )
    return rows


def run_key_rows() -> list[dict]:
    """The Triton kernels of ringattn.key_rows against the same calls on CPU (PyTorch ops):
    rows selected into strided key-major views, placed from them, and summed with a table of
    up to three contributions per row. Returns one row per dtype and operation with the
    largest absolute difference and whether Triton ran."""
    from ringattn import key_rows

    g = torch.Generator().manual_seed(0)
    rows = []
    b, h, s, d, n = 2, 3, 1000, 72, 333  # rows not a multiple of the block, D not a power of 2
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        src = [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(2)]
        wire = torch.randn(n, 2, b, h, d, generator=g).to(dtype)
        src_index = torch.randperm(s, generator=g)[:n]
        dst_index = torch.randperm(s, generator=g)[:n]
        own_index = torch.randperm(s, generator=g)[:500]
        table = key_rows.contribution_table(torch.randint(0, 500, (n,), generator=g), 500)
        results = {}
        for dev in ("cpu", "cuda"):
            on = [x.to(dev) for x in src]
            w = wire.to(dev)
            views = [w[:, j].permute(1, 2, 0, 3) for j in range(2)]
            key_rows.copy_rows(views, None, on, src_index.to(dev))
            dst = [torch.zeros(b, h, s, d, dtype=dtype, device=dev) for _ in range(2)]
            key_rows.copy_rows(dst, dst_index.to(dev), views, None)
            out = [torch.empty(b, h, 500, d, dtype=dtype, device=dev) for _ in range(2)]
            key_rows.sum_rows(out, on, own_index.to(dev), views, table.to(dev))
            results[dev] = {"select": w, "place": dst, "sum": out}
            if dev == "cuda":
                used = key_rows._use_triton(dst, views) and key_rows._use_triton(out, on, views)
        for op in ("select", "place", "sum"):
            cpu, cuda = results["cpu"][op], results["cuda"][op]
            cpu, cuda = ([cpu], [cuda]) if isinstance(cpu, torch.Tensor) else (cpu, cuda)
            diff = max(float((a - c.cpu()).abs().max()) for a, c in zip(cpu, cuda))
            rows.append({"id": f"key-rows-{op}-{dtype}", "triton": used, "max_diff": diff})
    return rows


def run_head_exchange_rows() -> list[dict]:
    """Ulysses' reorders on CUDA (the Triton row copy through a view of the whole wire)
    against the same exchange's ``index_put_`` scatter, with the all-to-all replaced by
    handing the send buffer back: to_heads' outputs and to_sequence's send buffer must be
    identical. Zigzag and contiguous pieces, 2 and 4 ranks, a batch of 2, q/k/v head counts
    of GQA."""
    from ringattn import key_rows, strategies

    rows = []
    exchange_cls = strategies._HeadExchange
    real_exchange, real_triton = exchange_cls._exchange, strategies.runs_triton
    sent: list[torch.Tensor] = []

    def hand_back(self, send):  # noqa: ANN001, ANN202
        sent.append(send.clone())
        return send.clone()

    exchange_cls._exchange = hand_back
    g = torch.Generator(device="cuda").manual_seed(0)
    try:
        for n in (2, 4):
            for layout in ("zigzag", "contiguous"):
                ex = exchange_cls(None, n, strategies._piece_ids(0, n, n, layout))
                s = 6 * 2 * n  # positions per rank: whole pieces either way
                q = torch.randn(2, 4 * n, s, 40, generator=g, device="cuda", dtype=torch.bfloat16)
                k = torch.randn(2, n, s, 40, generator=g, device="cuda", dtype=torch.bfloat16)
                got = {}
                for mode in ("triton", "index_put"):
                    strategies.runs_triton = real_triton if mode == "triton" else (lambda *_: False)
                    sent.clear()
                    heads = ex.to_heads(q, k, k)
                    back = ex.to_sequence(*heads)
                    got[mode] = (*heads, sent[-1], *back)
                same = all(torch.equal(a, b) for a, b in zip(got["triton"], got["index_put"]))
                rows.append(
                    {
                        "id": f"head-exchange-{n}-{layout}",
                        "triton": key_rows.runs_triton(q),
                        "same": same,
                    }
                )
    finally:
        exchange_cls._exchange = real_exchange
        strategies.runs_triton = real_triton
    return rows
