"""Per-rank workers: context_parallel, the DTensor route and the ParallelStyle with documents,
windows and mask functions (importable by spawned ranks).

Every case runs a small attention module on a packed batch in float64 and returns the full
output, the input's gradient and the parameters' gradients, gathered over the ranks; the
test compares them with the same module on one process, attention computed from a dense
mask built here from the document lengths (independent of the library's Documents).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

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


ENTRIES = ("context_parallel", "dtensor", "style")


@dataclass(frozen=True)
class Spec:
    """One case: the entry point, the documents (lengths per row) and the masks."""

    entry: str
    causal: bool
    window: tuple[int, int] | None = None
    mask_mod: Callable | None = None
    lengths: tuple[tuple[int, ...], ...] = tuple(tuple(row) for row in LENGTHS)

    @property
    def seq(self) -> int:
        return sum(self.lengths[0])


CASES: dict[str, Spec] = {
    "context_parallel": Spec("context_parallel", True),
    "context_parallel_window": Spec("context_parallel", True, (3, 0)),
    "context_parallel_mask_mod": Spec("context_parallel", False, None, prefix_lm),
    "dtensor": Spec("dtensor", True),
    "dtensor_window_mask_mod": Spec("dtensor", False, (6, 2), prefix_lm),
    "style": Spec("style", True),
    "style_window": Spec("style", True, (4, 0)),
}


def random_specs(world: int, count: int, seed: int) -> list[Spec]:
    """Random document mixes (1-token documents, documents longer than a shard, per-row
    lengths), windows from 0 to longer than the sequence, causal or not, on every route."""
    rng = random.Random(seed)
    specs = []
    for n in range(count):
        seq = 2 * world * rng.randint(1, 5)
        rows = []
        for _ in range(rng.choice((1, 2))):
            cuts = sorted(rng.sample(range(1, seq), rng.randint(0, min(6, seq - 1))))
            rows.append(tuple(b - a for a, b in zip([0, *cuts], [*cuts, seq])))
        causal = rng.random() < 0.6
        window = None
        if rng.random() < 0.5:
            left = rng.choice((0, 1, rng.randint(0, seq), seq + 3, -1))
            right = 0 if causal else rng.choice((0, 2, rng.randint(0, seq), -1))
            window = (left, right)
        mask_mod = prefix_lm if rng.random() < 0.25 else None
        specs.append(Spec(ENTRIES[n % len(ENTRIES)], causal, window, mask_mod, tuple(rows)))
    return specs


def dense_mask(spec: Spec) -> torch.Tensor:
    """``[B, 1, S, S]``: query i sees key j (same document, causal, window, mask_mod)."""
    causal, window, mask_mod, seq = spec.causal, spec.window, spec.mask_mod, spec.seq
    rows = []
    for row in spec.lengths:
        doc = torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))
        rows.append(doc[:, None] == doc[None, :])
    mask = torch.stack(rows)[:, None]
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
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


def _inputs(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3 + spec.seq)
    x = torch.randn(len(spec.lengths), spec.seq, DIM, generator=g, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64)


def reference(spec: Spec) -> dict[str, torch.Tensor]:
    """The case on one process: the module with the dense-mask attention."""
    torch.manual_seed(0)
    module = Attention(spec.causal)
    x, dout = _inputs(spec)
    x.requires_grad_()
    mask = dense_mask(spec)
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


def _run(spec: Spec, world: int) -> dict[str, torch.Tensor]:
    entry, causal, seq = spec.entry, spec.causal, spec.seq
    torch.manual_seed(0)
    module = Attention(causal)
    lengths = [list(row) for row in spec.lengths]
    documents = ringattn.Documents.from_lengths(lengths if len(lengths) > 1 else lengths[0])
    x, dout = _inputs(spec)
    masks = {"window": spec.window, "mask_mod": spec.mask_mod}
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
                shape = (*t.shape[:2], seq, t.size(3))
                stride = (shape[1] * seq * shape[3], seq * shape[3], shape[3], 1)
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


def _relative_errors(got: dict, want: dict) -> dict[str, float]:
    return {
        k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-300))
        for k in want
    }


def run_mask_routes(rank: int, world: int, count: int, seed: int) -> dict:
    """The named cases (full results), ``count`` random ones (their relative errors
    against the reference, computed here), and the errors, on one process group."""
    found: dict = {name: _run(spec, world) for name, spec in CASES.items()}
    found["random"] = [
        (spec, _relative_errors(_run(spec, world), reference(spec)))
        for spec in random_specs(world, count, seed)
    ]
    if world == 2:
        found["errors"] = _errors(world)
    return found
