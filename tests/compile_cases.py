"""Every entry point inside ``torch.compile(fullgraph=True)``, run by spawned Gloo ranks.

One spawn runs all cases (compiling is slow on small machines). Each case reports, per rank:
the largest difference to the same call in eager mode and to the float64 reference, how many
graphs dynamo made, and the graph breaks it saw. Inductor compiles the ring's own cases; the
entry points and the tiny LM use ``aot_eager`` (dynamo and AOTAutograd as with inductor,
without generating kernels), which is what decides graph breaks, recompilation and the
custom ops' autograd, and keeps float64 exact. (The tiny LM under inductor,
``context_parallel_inductor``, differs from eager by ~2e-4 in loss after 3 SGD steps: its
rotary embedding runs in float32; the difference was not traced further.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _full_inputs(seq: int, seed: int, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    shapes = ((1, heads, seq, dim), (1, kv_heads, seq, dim), (1, kv_heads, seq, dim))
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    dout = torch.randn(shapes[0], generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(q, k, v, dout, causal: bool):
    import ringattn

    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = ringattn.reference.attention(q, k, v, causal=causal)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _breaks() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _summary(worst_eager: float, worst_ref: float, graphs_before: int) -> dict:
    """A case's result: largest differences to eager mode and to float64, graphs, breaks."""
    return {
        "eager": worst_eager,
        "reference": worst_ref,
        "graphs": _graphs() - graphs_before,
        "breaks": _breaks(),
    }


def _attention_case(fn, mesh, seqs: list[int], backend: str, dynamic: bool, causal: bool):
    """Compile ``fn(q, k, v)`` once; call it on several inputs; compare with eager and float64."""
    import ringattn

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    before = _graphs()
    worst_eager, worst_ref = 0.0, 0.0
    for i, seq in enumerate(seqs):
        q, k, v, dout = _full_inputs(seq, seed=10 + i)
        ref = _reference(q, k, v, dout, causal)
        shards = [ringattn.shard(x, mesh) for x in (q, k, v, dout)]
        results = []
        for run in (compiled, fn):
            leaves = [x.clone().requires_grad_() for x in shards[:3]]
            if dynamic and run is compiled:
                for x in leaves:
                    torch._dynamo.mark_dynamic(x, 2)
            out = run(*leaves)
            out.backward(shards[3])
            results.append([out.detach(), *(x.grad for x in leaves)])
        mine = [ringattn.shard(x, mesh) for x in ref]
        for a, b, r in zip(*results, mine):
            worst_eager = max(worst_eager, float((a - b).abs().max()))
            worst_ref = max(worst_ref, float((a - r).abs().max()))
    return _summary(worst_eager, worst_ref, before)


def _tiny_lm_case(entry: str, mesh, backend: str, steps: int = 3):
    """The example's tiny LM, compiled, against the same model trained eagerly."""
    import tiny_lm
    from train_tiny_lm import TinyLM, parallelize, train_step

    torch.manual_seed(0)
    losses = {}
    params = {}
    before = _graphs()
    for mode in ("compiled", "eager", "single"):
        torch.manual_seed(0)
        model = TinyLM(tiny_lm.VOCAB, tiny_lm.DIM, tiny_lm.HEADS, tiny_lm.KV_HEADS, 1).double()
        model = parallelize(model, entry if mode != "single" else "single", mesh, "auto")
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        data = tiny_lm.batch(16)
        # A compiled module keeps the model's parameters; train_step calls it as the model.
        run = torch.compile(model, fullgraph=True, backend=backend) if mode == "compiled" else model
        run_entry = entry if mode != "single" else "single"
        losses[mode] = [train_step(run, opt, run_entry, mesh, data) for _ in range(steps)]
        params[mode] = [p.detach().clone() for p in model.parameters()]
    return {
        "eager": max(abs(a - b) for a, b in zip(losses["compiled"], losses["eager"])),
        # Relative: the model's rotary embedding runs in float32 (as test_context_parallel).
        "reference": max(abs(a - b) / abs(b) for a, b in zip(losses["compiled"], losses["single"])),
        "params_eager": max(
            float((a - b).abs().max()) for a, b in zip(params["compiled"], params["eager"])
        ),
        "graphs": _graphs() - before,
        "breaks": _breaks(),
        "losses": losses,
    }


def _documents_case(mesh, entry: str):
    """Packed documents and a window inside ``torch.compile(fullgraph=True)``: a new batch's
    documents at each step (same length) reuse the one graph; exact against float64."""
    import ringattn
    from mask_cases import reference_attention, reference_mask
    from ringattn.integrations import transformers as ringattn_hf

    module = torch.nn.Module()
    module.is_causal = True

    def attend(q, k, v, documents):
        kw = dict(causal=True, documents=documents, window=(5, 0), backend="math")
        if entry == "ring":
            out = ringattn.ring_attention(q * 1.0, k, v, **kw)
        elif entry == "hf":
            # What attn_implementation="ringattn" gets for a packed batch of a model with a
            # sliding window of 6 tokens (transformers' convention: i - 6 < j <= i).
            out, _ = ringattn_hf._attention(
                module, q * 1.0, k, v, None, group=None, layout="zigzag", backend="math",
                sliding_window=6, ringattn_documents=documents,
            )  # fmt: skip
            return out.transpose(1, 2) * 1.0  # back to [B, H, S, D]
        else:
            out = ringattn.attention(q * 1.0, k, v, strategy=entry, **kw)
        return out * 1.0

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    before = _graphs()
    worst_eager, worst_ref = 0.0, 0.0
    for step, lengths in enumerate(([5, 1, 10], [16], [2, 3, 4, 7])):
        docs = ringattn.Documents.from_lengths(lengths)
        q, k, v, dout = _full_inputs(16, seed=40 + step)
        case = {
            "batch": 1,
            "heads": 4,
            "seq": 16,
            "segments": [(n, False) for n in lengths],
            "causal": True,
            "window": (5, 0),
            "mask_mod": None,
        }
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref, _ = reference_attention(*leaves, reference_mask(case), 8**-0.5)
        ref.backward(dout)
        want = [ref.detach(), *(x.grad for x in leaves)]
        shards = [ringattn.shard(x, mesh, documents=docs) for x in (q, k, v, dout)]
        results = []
        for run in (compiled, attend):
            mine = [x.clone().requires_grad_() for x in shards[:3]]
            out = run(*mine, docs)
            out.backward(shards[3])
            results.append([out.detach(), *(x.grad for x in mine)])
        for a, b, w in zip(*results, want):
            worst_eager = max(worst_eager, float((a - b).abs().max()))
            r = ringattn.shard(w, mesh, documents=docs)
            worst_ref = max(worst_ref, float((a - r).abs().max()))
    return _summary(worst_eager, worst_ref, before)


def _mask_mod_case(mesh):
    """A mask function inside ``torch.compile`` (fullgraph=False): Python the op cannot
    carry, so the call runs eagerly behind one graph break and stays exact."""
    import ringattn

    def tail3(b, h, q, kv):
        return q - kv <= 3

    def windowed(q, k, v):
        out = ringattn.ring_attention(q * 1.0, k, v, causal=True, mask_mod=tail3, backend="math")
        return out * 1.0

    q, k, v, dout = _full_inputs(16, seed=30)
    pos = torch.arange(16)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - 3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kr = leaves[1].repeat_interleave(2, dim=1)
    vr = leaves[2].repeat_interleave(2, dim=1)
    scores = (leaves[0] @ kr.transpose(-1, -2)) / 8**0.5
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vr
    ref.backward(dout)
    want = [ref.detach(), *(x.grad for x in leaves)]
    shards = [ringattn.shard(x, mesh) for x in (q, k, v, dout)]
    leaves = [x.clone().requires_grad_() for x in shards[:3]]
    before = _graphs()
    out = torch.compile(windowed, backend="aot_eager")(*leaves)
    out.backward(shards[3])
    got = [out.detach(), *(x.grad for x in leaves)]
    worst = max(float((g - ringattn.shard(w, mesh)).abs().max()) for g, w in zip(got, want))
    return {"reference": worst, "graphs": _graphs() - before, "breaks": _breaks()}


def run_compile_cases(rank: int, world: int, names: tuple[str, ...]) -> dict:
    import ringattn

    torch._dynamo.config.cache_size_limit = 64
    mesh = init_device_mesh("cpu", (world,))
    found: dict[str, dict] = {}

    def ring(q, k, v):
        return ringattn.ring_attention(q, k, v, causal=True, backend="math") * 1.0

    if "ring" in names:
        # Three steps at one length: one graph. Then lengths marked dynamic: one more graph.
        found["ring"] = _attention_case(ring, mesh, [16, 16, 16], "inductor", False, True)
        torch._dynamo.reset()
        found["ring_dynamic"] = _attention_case(ring, mesh, [16, 24, 32], "inductor", True, True)
    for strategy in ("ring", "allgather", "ulysses"):
        if f"attention_{strategy}" not in names:
            continue

        def attend(q, k, v, strategy=strategy):
            return ringattn.attention(q, k, v, mesh, causal=True, strategy=strategy) + 0.0

        torch._dynamo.reset()
        found[f"attention_{strategy}"] = _attention_case(
            attend, mesh, [16, 16], "aot_eager", False, True
        )
    if "attention_hybrid" in names:
        mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))

        def hybrid(q, k, v):
            return ringattn.attention(q, k, v, mesh2, causal=False, strategy="hybrid") + 0.0

        torch._dynamo.reset()
        found["attention_hybrid"] = _attention_case(
            hybrid, mesh2, [16, 16], "aot_eager", False, False
        )
    if "hf" in names:
        from ringattn.integrations import transformers as ringattn_hf

        module = torch.nn.Module()
        module.is_causal = True

        def hf(q, k, v):
            # What attn_implementation="ringattn" calls (register() binds these options).
            out, _ = ringattn_hf._attention(
                module, q, k, v, None, group=None, layout="zigzag", backend="auto"
            )
            return out.transpose(1, 2) + 0.0  # transformers wants [B, S, H, D] back

        torch._dynamo.reset()
        found["hf"] = _attention_case(hf, mesh, [16, 16], "aot_eager", False, True)
    for entry, backend in (
        ("context_parallel", "aot_eager"),
        ("context_parallel_inductor", "inductor"),
        ("parallel_style", "aot_eager"),
        ("attention_context_parallel", "aot_eager"),
    ):
        if entry in names:
            torch._dynamo.reset()
            found[entry] = _tiny_lm_case(entry.removesuffix("_inductor"), mesh, backend)
    for entry in ("ring", "allgather", "hf"):
        if f"documents_{entry}" in names:
            torch._dynamo.reset()
            found[f"documents_{entry}"] = _documents_case(mesh, entry)
    if "mask_mod" in names:
        torch._dynamo.reset()
        found["mask_mod"] = _mask_mod_case(mesh)
    dist.barrier()
    return found
