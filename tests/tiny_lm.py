"""A tiny decoder-only transformer (RoPE from position ids, GQA, causal SDPA) and its training
loop, on one process or context-parallel; importable by spawned ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ringattn

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 61, 32, 4, 2, 2
IGNORE = -100


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x ``[B, H, S, D]`` at ``positions`` ``[B, S]``."""
    half = x.size(-1) // 2
    freqs = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions[:, None, :, None].float() * freqs  # [B, 1, S, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head_dim = DIM // HEADS
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        # No q/k biases (as in Llama): a key bias has no effect on attention, so its
        # gradient is rounding noise that Adam would turn into full-size steps.
        self.q = nn.Linear(DIM, DIM, bias=False)
        self.kv = nn.Linear(DIM, 2 * KV_HEADS * self.head_dim, bias=False)
        self.proj = nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, HEADS, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, KV_HEADS, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rope(q, positions), rope(k, positions)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, DIM))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, positions)
        return self.head(x)


def batch(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Input ids, next-token labels (shifted on the full sequence) and position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    positions = torch.arange(seq_len).expand(2, seq_len).clone()
    return ids, labels, positions


def train(rank: int, world: int, seq_len: int, steps: int, entry: str) -> dict:
    """Train from a fixed init; every rank returns losses per step and the final parameters.

    ``entry``: "single" (one process, full sequence) or "context_parallel".
    """
    torch.manual_seed(0)
    model = TinyLM()
    # SGD keeps parameter differences proportional to gradient differences; Adam would scale
    # rounding-level gradients of near-zero entries up to full steps.
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ids, labels, positions = batch(seq_len)
    tokens = int((labels != IGNORE).sum())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if entry == "single":
            logits = model(ids, positions)
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            )
            (loss_sum / tokens).backward()
            losses.append(float(loss_sum.detach()) / tokens)
        else:
            with ringattn.context_parallel(None, [ids, labels, positions], [1, 1, 1]):
                logits = model(ids, positions)
                loss_sum = F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                (loss_sum / tokens).backward()
            # Every rank saw its own tokens: sum the parameter gradients and the loss.
            for p in model.parameters():
                dist.all_reduce(p.grad)
            total = loss_sum.detach().clone()
            dist.all_reduce(total)
            losses.append(float(total) / tokens)
        opt.step()
    return {
        "losses": losses,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "restored": bool(ids.size(1) == seq_len and labels.size(1) == seq_len),
    }
