"""Which global positions each rank holds under a mask, and a work-balanced layout for
packed documents.

A :class:`Placement` cuts the sequence into equal chunks and gives each rank the same number
of them, kept in position order locally (so a rank's positions are sorted, which the mask's
key ranges rely on). The zigzag and contiguous layouts are placements; so is the balanced
layout of :func:`balanced_placement`, which is what :func:`ringattn.shard` cuts when given
documents, and what every entry point reads.

Balance without padding documents: the sequence is cut into ``N x m`` chunks (``m`` up to
16 per rank), each chunk's work -- the keys its query rows see under causal attention within
their document, summed over batch rows -- is computed from the document boundaries, and
chunks go to ranks greedily, largest work first, each to the rank with the least work that
still has room (a longest-processing-time schedule with equal cardinality). Swaps of one
chunk of the busiest rank against one chunk of another then lower the maximum while they
can. One permutation serves every batch row, so tokens per rank stay equal.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import chunk_ids, num_chunks
from .masks import Documents, MaskSpec

__all__ = [
    "Placement",
    "balanced_placement",
    "layout_imbalance",
    "layout_placement",
    "rank_work",
]

_MAX_CHUNKS_PER_RANK = 16


@dataclass(frozen=True)
class Placement:
    """Rank r holds chunks ``ids[r]`` (ascending) of ``chunk`` positions each, in that order."""

    chunk: int
    ids: tuple[tuple[int, ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.ids)

    @property
    def seq_len(self) -> int:
        return self.chunk * sum(len(i) for i in self.ids)

    def positions(self, rank: int) -> Tensor:
        """Global positions rank ``rank`` holds, in local order (ascending)."""
        return _positions(self.chunk, self.ids[rank])

    def merged(self, group_size: int) -> Placement:
        """The placement of a ring over groups of ``group_size`` consecutive ranks, each
        group holding its ranks' chunks (what a Ulysses all-to-all gathers)."""
        ids = tuple(
            tuple(sorted(c for r in range(g, g + group_size) for c in self.ids[r]))
            for g in range(0, self.world_size, group_size)
        )
        return Placement(self.chunk, ids)

    def permutation(self) -> Tensor:
        """Global positions in rank-then-local order (the shard order concatenated)."""
        return torch.cat([self.positions(r) for r in range(self.world_size)])


@functools.lru_cache(maxsize=512)
def _positions(chunk: int, ids: tuple[int, ...]) -> Tensor:
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in ids])


def layout_placement(seq_len: int, world_size: int, layout: str) -> Placement:
    """The zigzag or contiguous layout as a placement."""
    n = num_chunks(world_size, layout)
    ids = tuple(tuple(sorted(chunk_ids(r, world_size, layout))) for r in range(world_size))
    return Placement(seq_len // n, ids)


def _chunks_per_rank(local: int) -> int:
    return max(m for m in range(1, _MAX_CHUNKS_PER_RANK + 1) if local % m == 0)


def position_work(spec: MaskSpec) -> Tensor:
    """Keys each global position's query row sees, summed over batch rows ``[S]``."""
    pos = torch.arange(spec.seq_len)
    lo, hi = spec.key_interval(pos)
    return (hi - lo + 1).clamp(min=0).sum(dim=0)


def rank_work(spec: MaskSpec, placement: Placement) -> Tensor:
    """Each rank's attention work (visible keys summed over its query rows) ``[N]``, float64."""
    work = position_work(spec).double()
    return torch.stack([work[placement.positions(r)].sum() for r in range(placement.world_size)])


def layout_imbalance(
    documents: Documents,
    world_size: int,
    *,
    causal: bool = True,
    window: tuple[int, int] | None = None,
) -> float:
    """The slowest rank's attention work over the mean (1.0 = perfect balance) in the
    layout :func:`ringattn.shard` cuts for ``documents`` on ``world_size`` ranks.

    Work is the sum over a rank's query rows (and batch rows) of the keys they see under
    ``causal`` and ``window`` within their document. The layout balances causal work; pass
    other options to see how the same layout does for them.
    """
    if not isinstance(documents, Documents):
        raise TypeError(f"documents must be a ringattn.Documents, got {type(documents).__name__}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    spec = MaskSpec.build(documents, causal, window, None)
    work = rank_work(spec, balanced_placement(documents, world_size))
    mean = float(work.mean())
    return float(work.max()) / mean if mean > 0 else 1.0


@functools.lru_cache(maxsize=64)
def balanced_placement(documents: Documents, world_size: int) -> Placement:
    """The work-balanced placement of ``documents`` over ``world_size`` ranks (cached).

    Raises ValueError when the sequence does not split into equal shards.
    """
    s = documents.seq_len
    if s % world_size:
        raise ValueError(
            f"documents cover {s} tokens, which do not split evenly over {world_size} ranks "
            "(every rank holds the same number of tokens; pad the batch's end to a multiple)"
        )
    m = _chunks_per_rank(s // world_size)
    chunks = world_size * m
    chunk = s // chunks
    spec = MaskSpec.build(documents, True, None, None)
    work = position_work(spec).double().view(chunks, chunk).sum(dim=1)
    ids = _assign(work, world_size, m)
    return Placement(chunk, tuple(tuple(sorted(r)) for r in ids))


def _assign(work: Tensor, world_size: int, per_rank: int) -> list[list[int]]:
    """Greedy longest-first assignment with equal counts, then improving swaps."""
    order = sorted(range(work.numel()), key=lambda c: (-float(work[c]), c))
    load = [0.0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        r = min(
            (r for r in range(world_size) if len(owned[r]) < per_rank), key=lambda r: (load[r], r)
        )
        owned[r].append(c)
        load[r] += float(work[c])
    w = work.tolist()
    for _ in range(4 * work.numel()):
        top = max(range(world_size), key=lambda r: load[r])
        best = None
        for a_i, a in enumerate(owned[top]):
            for r in range(world_size):
                if r == top:
                    continue
                for c_i, c in enumerate(owned[r]):
                    delta = w[a] - w[c]
                    if delta <= 0:
                        continue
                    new_max = max(load[top] - delta, load[r] + delta)
                    if new_max < load[top] - 1e-9 and (best is None or new_max < best[0]):
                        best = (new_max, a_i, r, c_i, delta)
        if best is None:
            break
        _, a_i, r, c_i, delta = best
        owned[top][a_i], owned[r][c_i] = owned[r][c_i], owned[top][a_i]
        load[top] -= delta
        load[r] += delta
    return owned
