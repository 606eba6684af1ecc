"""Training the example's tiny decoder-only transformer (RoPE from position ids, GQA, causal
SDPA) on one process or context-parallel; importable by spawned ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_tiny_lm import TinyLM as ExampleLM  # noqa: E402

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 61, 32, 4, 2, 2
IGNORE = -100


def tiny_model() -> ExampleLM:
    return ExampleLM(VOCAB, DIM, HEADS, KV_HEADS, LAYERS)


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
    model = tiny_model()
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
