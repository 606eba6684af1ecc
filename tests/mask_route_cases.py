"""Per-rank workers: context_parallel, the DTensor route and the ParallelStyle with documents,
windows and mask functions (importable by spawned ranks).

Every case runs a small attention module on a packed batch in float64 and returns the full
output, the input's gradient and the parameters' gradients, gathered over the ranks; the
test compares them with the same module on one process, attention computed from a dense
mask built here from the document lengths (independent of the library's Documents).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

import ringattn

from cases import caught

SEQ, DIM, HEADS, KV_HEADS = 24, 16, 4, 2
# Per row: a 1-token document, documents longer than a rank's shard, one whole row.
LENGTHS = [[1, 13, 2, 8], [24]]


def prefix_lm(b, h, q_idx, kv_idx):
    """Prefix-LM over global positions: the first 5 keys are seen by every query."""
    return (kv_idx < 5) | (kv_idx <= q_idx)


# name: (entry point, causal, window, mask_mod)
CASES: dict[str, tuple[str, bool, tuple[int, int] | None, Callable | None]] = {
    "context_parallel": ("context_parallel", True, None, None),
    "context_parallel_window": ("context_parallel", True, (3, 0), None),
    "context_parallel_mask_mod": ("context_parallel", False, None, prefix_lm),
    "dtensor": ("dtensor", True, None, None),
    "dtensor_window_mask_mod": ("dtensor", False, (6, 2), prefix_lm),
    "style": ("style", True, None, None),
    "style_window": ("style", True, (4, 0), None),
}


def dense_mask(causal: bool, window, mask_mod) -> torch.Tensor:
    """``[B, 1, S, S]``: query i sees key j (same document, causal, window, mask_mod)."""
    rows = []
    for row in LENGTHS:
        doc = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
        rows.append(doc[:, None] == doc[None, :])
    mask = torch.stack(rows)[:, None]
    i, j = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    if causal:
        mask = mask & (j <= i)
    if window is not None:
        left, right = window
        if left >= 0:
            mask = mask & (j >= i - left)
        if right >= 0:
            mask = mask & (j <= i + right)
    if mask_mod is not None:
        mask = mask & mask_mod(0, 0, i, j)
    return mask


def masked_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """float64 softmax attention under ``mask``; a query that sees no key gives 0."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return weights.nan_to_num(0.0) @ v


class Attention(nn.Module):
    """Grouped-query self-attention on ``[batch, seq, dim]`` that calls SDPA."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.head_dim = DIM // HEADS
        self.q = nn.Linear(DIM, DIM, dtype=torch.float64)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * self.head_dim, dtype=torch.float64)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, HEADS, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, KV_HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor, attend: Callable | None = None) -> torch.Tensor:
        q, k, v = self.project(x)
        if attend is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        else:
            a = attend(q, k, v)
        return a.transpose(1, 2).reshape(x.shape)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(len(LENGTHS), SEQ, DIM, generator=g, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def reference(name: str) -> dict[str, torch.Tensor]:
    """The case on one process: the module with the dense-mask attention."""
    _, causal, window, mask_mod = CASES[name]
    torch.manual_seed(0)
    module = Attention(causal)
    x, dout = _inputs()
    x.requires_grad_()
    mask = dense_mask(causal, window, mask_mod)
    out = module(x, attend=lambda q, k, v: masked_attention(q, k, v, mask))
    out.backward(dout)
    grads = {n: p.grad for n, p in module.named_parameters()}
    return {"out": out.detach(), "dx": x.grad, **grads}


def _gathered(module: nn.Module, out, dx, documents) -> dict[str, torch.Tensor]:
    found = {
        "out": ringattn.unshard(out.detach(), dim=1, documents=documents),
        "dx": ringattn.unshard(dx, dim=1, documents=documents),
    }
    for n, p in module.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        found[n] = grad
    return found


def _run(name: str, world: int) -> dict[str, torch.Tensor]:
    entry, causal, window, mask_mod = CASES[name]
    torch.manual_seed(0)
    module = Attention(causal)
    documents = ringattn.Documents.from_lengths(LENGTHS)
    x, dout = _inputs()
    masks = {"window": window, "mask_mod": mask_mod}
    if entry == "context_parallel":
        with ringattn.context_parallel(None, [x, dout], [1, 1], documents=documents, **masks):
            local = x.detach().requires_grad_()
            out = module(local)
            out.backward(dout)
        return _gathered(module, out, local.grad, documents)
    mesh = init_device_mesh("cpu", (world,))
    local = ringattn.shard(x, mesh, dim=1, documents=documents).requires_grad_()
    local_dout = ringattn.shard(dout, mesh, dim=1, documents=documents)
    if entry == "dtensor":

        def attend(q, k, v):
            def sequence_sharded(t: torch.Tensor) -> DTensor:
                shape = (*t.shape[:2], SEQ, t.size(3))
                stride = (shape[1] * SEQ * shape[3], SEQ * shape[3], shape[3], 1)
                return DTensor.from_local(t, mesh, [Shard(2)], shape=shape, stride=stride)

            q, k, v = (sequence_sharded(t) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            return out.to_local()

        with ringattn.attention_context_parallel(mesh, documents=documents, **masks):
            out = module(local, attend=attend)
    else:
        style = ringattn.AttentionContextParallel(**masks)
        module = parallelize_module(module, mesh, style)
        with style.use_documents(documents):
            out = module(local)
    out.backward(local_dout)
    return _gathered(module, out, local.grad, documents)


def _errors(world: int) -> dict[str, tuple[str, str]]:
    """What the routes refuse with documents, on every rank, before anything moves."""
    documents = ringattn.Documents.from_lengths(LENGTHS)
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(len(LENGTHS), SEQ, DIM, dtype=torch.float64)
    short = torch.randn(len(LENGTHS), SEQ - 2 * world, DIM, dtype=torch.float64)
    style = ringattn.AttentionContextParallel(layout="contiguous")
    q = DTensor.from_local(torch.randn(1, HEADS, SEQ, 4, dtype=torch.float64), mesh, [Replicate()])

    def enter(context) -> None:
        with context:
            pass

    def replicated() -> None:
        with ringattn.attention_context_parallel(mesh, documents=documents):
            F.scaled_dot_product_attention(q, q, q)

    cases = {
        "layout_and_documents": lambda: enter(
            ringattn.context_parallel(None, [x], [1], layout="zigzag", documents=documents)
        ),
        "documents_type": lambda: enter(ringattn.context_parallel(None, [x], [1], documents=[3])),
        "buffer_length": lambda: enter(
            ringattn.context_parallel(None, [short], [1], documents=documents)
        ),
        "window_type": lambda: enter(ringattn.context_parallel(None, [x], [1], window=3)),
        "negative_window": lambda: enter(ringattn.attention_context_parallel(mesh, window=(-2, 0))),
        "style_layout": lambda: enter(style.use_documents(documents)),
        "replicated_sequence": replicated,
    }
    found = {name: caught(body) for name, body in cases.items()}
    found["buffer_kept"] = bool(short.size(1) == SEQ - 2 * world)
    return found


def run_mask_routes(rank: int, world: int) -> dict:
    found: dict = {name: _run(name, world) for name in CASES}
    found["errors"] = _errors(world)
    return found
