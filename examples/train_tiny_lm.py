"""Train a tiny decoder-only transformer context-parallel, three ways.

The model is ordinary single-device code (it calls F.scaled_dot_product_attention). Pick how
it becomes context-parallel with --entry:

- context_parallel: ``ringattn.context_parallel`` shards the batch's sequence buffers in
  place around the step and routes SDPA on the shards to ring attention.
- attention_context_parallel: the model runs on DTensors (replicated weights, inputs sharded
  along the sequence) and ``ringattn.attention_context_parallel`` runs their SDPA as ring
  attention.
- parallel_style: ``parallelize_module(model, mesh, {"blocks.*": AttentionContextParallel()})``
  routes SDPA inside every block; inputs are sharded with ``ringattn.shard``.

Run on CPUs or GPUs:

    torchrun --nproc-per-node=2 examples/train_tiny_lm.py --seq-len 4096 --steps 5

Prints the loss of every step (the same as one process would get) and tokens per second.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_module
from torch.distributed.tensor.experimental import implicit_replication
from torch.distributed.tensor.parallel import parallelize_module

import ringattn

ENTRIES = ("context_parallel", "attention_context_parallel", "parallel_style")
IGNORE = -100


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, device=x.device, dtype=torch.float32) / half))
    angles = positions[:, None, :, None].float() * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # No q/k biases (as in Llama): a key bias has no effect on attention at all.
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rope(q, positions), rope(k, positions)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(x)


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Labels for next-token loss, shifted on the full sequence (before any sharding)."""
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return labels


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def parallelize(model: nn.Module, entry: str, mesh: DeviceMesh, backend: str) -> nn.Module:
    """Set the model up once for ``entry``; "single" and "context_parallel" need nothing."""
    if entry == "attention_context_parallel":
        return distribute_module(model, mesh)  # weights become replicated DTensors
    if entry == "parallel_style":
        style = ringattn.AttentionContextParallel(backend=backend)
        return parallelize_module(model, mesh, {"blocks.*": style})
    return model


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    entry: str,
    mesh: DeviceMesh | None,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backend: str = "auto",
) -> float:
    """One optimizer step on the full batch (ids, labels, positions); returns the mean loss.

    "single" trains on one process; the other entries split the sequence over ``mesh`` and
    give every rank the same loss and update as "single" would.
    """
    ids, labels, positions = batch
    tokens = int((labels != IGNORE).sum())
    opt.zero_grad()
    if entry == "single":
        total = loss_sum(model(ids, positions), labels)
        (total / tokens).backward()
    elif entry == "context_parallel":
        with ringattn.context_parallel(mesh, [ids, labels, positions], [1, 1, 1], backend=backend):
            total = loss_sum(model(ids, positions), labels)
            (total / tokens).backward()
    elif entry == "attention_context_parallel":
        # Local shards in ringattn's balanced layout, seen as one sequence-sharded DTensor.
        ids, labels, positions = (
            DTensor.from_local(ringattn.shard(x, mesh, dim=1), mesh, [Shard(1)], run_check=False)
            for x in batch
        )
        # implicit_replication lets the model's plain constant tensors meet DTensors.
        with ringattn.attention_context_parallel(layout="zigzag", backend=backend):
            with implicit_replication():
                total = loss_sum(model(ids, positions), labels)
                (total / tokens).backward()
        total = total.full_tensor()
        # Each rank's gradients are partial sums over its tokens: reduce them before the
        # update, so that the optimizer's state holds whole gradients.
        for param in model.parameters():
            param.grad = param.grad.redistribute(placements=param.placements)
    elif entry == "parallel_style":
        ids, labels, positions = (ringattn.shard(x, mesh, dim=1) for x in batch)
        total = loss_sum(model(ids, positions), labels)
        (total / tokens).backward()
    else:
        raise ValueError(f"entry must be 'single' or one of {ENTRIES}, got {entry!r}")
    if entry in ("context_parallel", "parallel_style"):
        # Every rank saw its own tokens: sum the parameter gradients and the loss.
        for param in model.parameters():
            dist.all_reduce(param.grad)
        total = total.detach().clone()
        dist.all_reduce(total)
    opt.step()
    return float(total.detach()) / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--entry", choices=ENTRIES, default="context_parallel")
    p.add_argument("--backend", choices=ringattn.BACKENDS, default="auto")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile(model, fullgraph=True) first"
    )
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same model and batch on every rank
    model = TinyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers)
    model = parallelize(model.to(device=device, dtype=dtype), args.entry, mesh, args.backend)
    if args.compile:
        # Every entry point compiles without graph breaks; the first step compiles.
        model = torch.compile(model, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=device)
    positions = torch.arange(args.seq_len, device=device)[None]
    batch = (ids, next_token_labels(ids), positions)

    for step in range(args.steps):
        start = time.perf_counter()
        loss = train_step(model, opt, args.entry, mesh, batch, args.backend)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if rank == 0:
            print(
                f"step {step}: loss {loss:.4f}, {args.seq_len / elapsed:,.0f} tokens/s on "
                f"{world} ranks ({device.type}, {args.entry}"
                f"{', compiled' if args.compile else ''})",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
