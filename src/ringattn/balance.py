"""Which global positions each rank holds under a mask, and a work-balanced layout for
packed documents.

A :class:`Placement` cuts the sequence into equal chunks and gives each rank the same number
of them, kept in position order locally (so a rank's positions are sorted, which the mask's
key ranges rely on). The zigzag and contiguous layouts are placements; so is the balanced
layout of :func:`balanced_placement`, which is what :func:`ringattn.shard` cuts when given
documents, and what every entry point reads.

Balance without padding documents: the sequence is cut into ``N x m`` chunks (``m`` up to
16 per rank), and each chunk's work -- the keys its query rows see within their document,
summed over batch rows -- is computed from the document boundaries for three kinds of layer
(causal, bidirectional, a causal 4K window), so that one layout serves every layer of a
model. Chunks go to ranks greedily, largest first, each to the rank whose largest
(normalised) load grows least among those with room (a longest-processing-time schedule
with equal cardinality); swaps of one chunk of the costliest rank against one chunk of
another then lower the maximum while they can. One permutation serves every batch row, so
tokens per rank stay equal.

Then locality: the masked all-gather moves to each rank the keys its queries see that other
ranks hold, so a document spread over many ranks costs traffic and copies. Further swaps,
each with the rank that must fetch the most chunks, lower that most (then the total) while
every kind of layer's load stays within :data:`_LOCALITY_SLACK` of the mean (or within the
balance already reached): on 2 ranks this keeps packed documents' fetch to about a quarter
of the other rank's keys instead of two thirds, at 0.2% more imbalance.
"""

from __future__ import annotations

import functools
import math
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
# How far above the mean load the locality swaps may take a rank, for any kind of layer.
_LOCALITY_SLACK = 0.02
# At most this many locality swaps per layout (each one prices every candidate at once; a
# batch's layout stays well under a second of CPU on 16 ranks).
_LOCALITY_ROUNDS = 64
# The kinds of layer one layout is balanced for at once: causal, bidirectional, and a causal
# sliding window of 4K (as in Mistral's and Gemma's windowed layers).
_BALANCED_FOR: tuple[tuple[bool, tuple[int, int] | None], ...] = (
    (True, None),
    (False, None),
    (True, (4095, 0)),
)


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


@functools.lru_cache(maxsize=8)  # a batch's documents, reused by every layer
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
    works = torch.stack(
        [
            position_work(MaskSpec.build(documents, causal, window, None)).double()
            for causal, window in _BALANCED_FOR
        ]
    )
    needs = _chunk_needs(MaskSpec.build(documents, True, None, None), chunks, chunk)
    ids = _assign(works.view(len(_BALANCED_FOR), chunks, chunk).sum(dim=2), world_size, m, needs)
    return Placement(chunk, tuple(tuple(sorted(r)) for r in ids))


def _chunk_needs(spec: MaskSpec, chunks: int, chunk: int) -> Tensor:
    """Bool ``[chunks, chunks]``: some query of chunk i (any batch row) sees a key of chunk j."""
    s = spec.seq_len
    lo, hi = spec.key_interval(torch.arange(s))
    some = hi >= lo
    # Within each chunk first, then over rows: the same extremes, and a reduction over a
    # leading dimension of one row is slow on CPU (tens of ms at 256K positions).
    rows = lo.size(0)
    lo = torch.where(some, lo, s).view(rows, chunks, chunk).amin(dim=2).amin(dim=0)
    hi = torch.where(some, hi, -1).view(rows, chunks, chunk).amax(dim=2).amax(dim=0)
    first = torch.arange(chunks) * chunk
    return (first[None] <= hi[:, None]) & (first[None] + chunk - 1 >= lo[:, None])


def _assign(
    works: Tensor, world_size: int, per_rank: int, needs: Tensor | None = None
) -> list[list[int]]:
    """Chunks to ranks, ``per_rank`` each, for works ``[K, chunks]`` (K kinds of layer).

    Each kind's work is normalised to a mean rank load of 1 and a rank's cost is its largest
    load. Greedy, largest chunks first, each to the rank whose cost grows least among those
    with room; then, while it lowers the maximum cost, the best swap of one chunk of the
    costliest rank against one chunk of another (all candidate swaps priced at once); then,
    given ``needs`` (see :func:`_chunk_needs`), the locality swaps of :func:`_localize`.
    """
    kinds, chunks = works.shape
    w = works / works.sum(dim=1, keepdim=True).clamp(min=1e-30) * world_size
    load = torch.zeros(kinds, world_size, dtype=w.dtype)
    count = torch.zeros(world_size, dtype=torch.long)
    owner = torch.empty(chunks, dtype=torch.long)
    for c in torch.argsort(-w.sum(dim=0), stable=True).tolist():
        cost = (load + w[:, c : c + 1]).amax(dim=0).masked_fill(count >= per_rank, math.inf)
        r = int(torch.argmin(cost))
        owner[c] = r
        count[r] += 1
        load[:, r] += w[:, c]
    for _ in range(4 * chunks):
        cost = load.amax(dim=0)
        top = int(torch.argmax(cost))
        mine = (owner == top).nonzero().squeeze(1)
        other = (owner != top).nonzero().squeeze(1)
        if other.numel() == 0:
            break
        wa, wc = w[:, mine].unsqueeze(2), w[:, other].unsqueeze(1)  # [K, m, 1], [K, 1, C']
        new_top = (load[:, top].view(kinds, 1, 1) - wa + wc).amax(dim=0)
        new_other = (load[:, owner[other]].unsqueeze(1) - wc + wa).amax(dim=0)
        new_max = torch.maximum(new_top, new_other)
        best = int(torch.argmin(new_max))
        if float(new_max.view(-1)[best]) >= float(cost[top]) - 1e-12:
            break
        a, c = int(mine[best // other.numel()]), int(other[best % other.numel()])
        r = int(owner[c])
        load[:, top] += w[:, c] - w[:, a]
        load[:, r] += w[:, a] - w[:, c]
        owner[a], owner[c] = r, top
    if needs is not None and world_size > 1:
        limit = max(float(load.amax()), 1.0 + _LOCALITY_SLACK)
        _localize(owner, w, needs, world_size, limit)
    return [(owner == r).nonzero().squeeze(1).tolist() for r in range(world_size)]


def _localize(owner: Tensor, w: Tensor, needs: Tensor, world_size: int, limit: float) -> None:
    """Swap chunks (``owner`` in place) to lower the most chunks any rank fetches, then the
    total, keeping every rank's load of every kind (``w`` ``[K, chunks]``) within ``limit``.

    A rank fetches the chunks some chunk of its own needs and it does not hold. Each round
    prices every swap between the rank that fetches most and any other rank at once (tensors
    over other rank x its chunk x their chunk x chunks), and makes the best one; it stops
    when none helps. Every rank holds the same number of chunks, which swaps keep.
    """
    chunks = owner.numel()
    kinds = w.size(0)
    need = needs.to(torch.int16)  # small integers: half the memory traffic of float32
    eye = torch.eye(chunks, dtype=torch.int16)
    scale = chunks * world_size + 1  # the most first, then the total
    for _ in range(min(chunks, _LOCALITY_ROUNDS)):
        held = torch.argsort(owner, stable=True).view(world_size, -1)  # each rank's chunks
        own = torch.nn.functional.one_hot(owner, world_size).T.to(torch.int16)  # [N, chunks]
        count = (own.float() @ need.float()).to(torch.int16)  # a rank's chunks needing each
        fetched = ((count > 0) & (own == 0)).sum(dim=1)
        load = w @ own.T.to(w.dtype)  # [K, N]
        a = int(fetched.argmax())
        others = torch.tensor([r for r in range(world_size) if r != a])
        mine, theirs = held[a], held[others]  # [m], [N-1, m]
        # Indexed [other rank b, a's chunk x, b's chunk y, chunk]: a gives x and takes y.
        gain, loss = need[theirs].unsqueeze(1), need[mine].view(1, -1, 1, chunks)
        swap = eye[theirs].unsqueeze(1) - eye[mine].view(1, -1, 1, chunks)
        fetch_a = ((count[a] - loss + gain > 0) & (own[a] + swap == 0)).sum(-1)
        count_b = count[others].view(-1, 1, 1, chunks)
        fetch_b = (count_b + loss - gain > 0) & (own[others].view(-1, 1, 1, chunks) - swap == 0)
        fetch_b = fetch_b.sum(-1)
        move = w[:, theirs].unsqueeze(2) - w[:, mine].view(kinds, 1, -1, 1)  # [K, N-1, m, m]
        fits = ((load[:, a].view(kinds, 1, 1, 1) + move).amax(0) <= limit) & (
            (load[:, others].view(kinds, -1, 1, 1) - move).amax(0) <= limit
        )
        rest = fetched.expand(len(others), world_size).clone()
        rest[:, a] = 0
        rest[torch.arange(len(others)), others] = 0
        most = torch.maximum(torch.maximum(fetch_a, fetch_b), rest.amax(1).view(-1, 1, 1))
        score = most * scale + fetch_a + fetch_b + rest.sum(1).view(-1, 1, 1)
        now = int(fetched.max()) * scale + int(fetched.sum())
        score = score.masked_fill(~fits, now)
        best = int(score.argmin())
        if int(score.view(-1)[best]) >= now:
            return
        b, rest_index = divmod(best, mine.numel() * mine.numel())
        x, y = divmod(rest_index, mine.numel())
        owner[int(mine[x])], owner[int(theirs[b, y])] = int(others[b]), a
