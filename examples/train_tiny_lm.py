"""Train a tiny decoder-only transformer context-parallel with ringattn.context_parallel.

The model is ordinary single-device code (it calls F.scaled_dot_product_attention); only the
training step is wrapped. Run on CPUs or GPUs:

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

import ringattn


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
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
    dtype = torch.bfloat16 if cuda else torch.float32

    torch.manual_seed(0)  # the same model and batch on every rank
    model = TinyLM(args.vocab, args.dim, args.heads, args.kv_heads, args.layers)
    model = model.to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]  # next-token labels, shifted on the full sequence
    positions = torch.arange(args.seq_len, device=device)[None]
    tokens = int((labels != -100).sum())

    for step in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        with ringattn.context_parallel(None, [ids, labels, positions], [1, 1, 1]):
            logits = model(ids, positions)
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )
            (loss_sum / tokens).backward()
        for param in model.parameters():  # each rank saw its own tokens
            dist.all_reduce(param.grad)
        opt.step()
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if rank == 0:
            print(
                f"step {step}: loss {float(total) / tokens:.4f}, "
                f"{args.seq_len / elapsed:,.0f} tokens/s on {world} ranks ({device.type})",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
