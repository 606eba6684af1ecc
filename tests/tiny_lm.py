"""Training the example's tiny decoder-only transformer (RoPE from position ids, GQA, causal
SDPA) on one process or context-parallel; importable by spawned ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train_tiny_lm import ENTRIES, TinyLM, next_token_labels, parallelize, train_step  # noqa: E402

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 61, 32, 4, 2, 2


def batch(seq_len: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Input ids, next-token labels (shifted on the full sequence) and position ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    positions = torch.arange(seq_len).expand(2, seq_len).clone()
    return ids, next_token_labels(ids), positions


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def train(
    rank: int, world: int, seq_len: int, steps: int, entries: tuple[str, ...] = ENTRIES
) -> dict[str, dict]:
    """Train from a fixed init with each entry; per entry: losses per step, final parameters.

    ``entries``: ("single",) for one process on the full sequence, or entry points of the
    example. Each entry also reports whether the batch tensors were left as they were.
    """
    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    results = {}
    for entry in entries:
        torch.manual_seed(0)
        model = parallelize(TinyLM(VOCAB, DIM, HEADS, KV_HEADS, LAYERS), entry, mesh, "auto")
        # SGD keeps parameter differences proportional to gradient differences; Adam would
        # scale rounding-level gradients of near-zero entries up to full steps.
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        data = batch(seq_len)
        originals = [x.clone() for x in data]
        losses = [train_step(model, opt, entry, mesh, data) for _ in range(steps)]
        results[entry] = {
            "losses": losses,
            "params": {n: _full(p) for n, p in model.named_parameters()},
            "batch_unchanged": all(torch.equal(a, b) for a, b in zip(data, originals)),
        }
    return results
