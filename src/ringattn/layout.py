"""Sequence layouts across ranks, and the per-step causal plan of the ring.

``"contiguous"``: the sequence is cut into N chunks; rank r holds chunk r.
``"zigzag"``: the sequence is cut into 2N chunks; rank r holds chunks r and 2N-1-r, so every
rank has the same amount of causal work.

The plan says, for one rank and one ring step, which part of the local queries meets which
part of the arriving K/V block, and whether the causal mask applies, or that the step is
skipped. Everything here is index math; tensors are only sliced.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "LAYOUTS",
    "BlockPlan",
    "LayoutName",
    "Part",
    "chunk_ids",
    "num_chunks",
    "ring_plan",
    "shard_for_rank",
    "unshard_shards",
]

LayoutName = Literal["zigzag", "contiguous"]
LAYOUTS: tuple[str, ...] = ("zigzag", "contiguous")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(world_size: int, layout: str) -> int:
    """How many equal chunks the global sequence is cut into."""
    _check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """The global chunk indices that ``rank`` holds, in local order."""
    _check_layout(layout)
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def _check_divisible(length: int, world_size: int, layout: str, dim: int) -> int:
    chunks = num_chunks(world_size, layout)
    if length % chunks:
        raise ValueError(
            f"x.size({dim}) = {length} must be divisible by {chunks} "
            f"({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks) for layout={layout!r}"
        )
    return length // chunks


def shard_for_rank(x: Tensor, rank: int, world_size: int, *, dim: int, layout: str) -> Tensor:
    """The part of the full tensor ``x`` that ``rank`` holds (a copy for zigzag, else a view)."""
    chunk = _check_divisible(x.size(dim), world_size, layout, dim)
    pieces = [x.narrow(dim, c * chunk, chunk) for c in chunk_ids(rank, world_size, layout)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def unshard_shards(shards: list[Tensor], *, dim: int, layout: str) -> Tensor:
    """Reassemble the full tensor from every rank's shard (``shards[r]`` from rank r)."""
    world_size = len(shards)
    chunks: list[Tensor | None] = [None] * num_chunks(world_size, layout)
    for rank, shard in enumerate(shards):
        ids = chunk_ids(rank, world_size, layout)
        for cid, piece in zip(ids, shard.chunk(len(ids), dim=dim)):
            chunks[cid] = piece
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


class Part(enum.Enum):
    """A part of a local block along the sequence: all of it, or one of its two halves."""

    ALL = "all"
    FIRST_HALF = "first_half"
    SECOND_HALF = "second_half"

    def take(self, x: Tensor, dim: int = 2) -> Tensor:
        """The view of ``x`` this part selects along ``dim``."""
        if self is Part.ALL:
            return x
        half = x.size(dim) // 2
        return x.narrow(dim, 0 if self is Part.FIRST_HALF else half, half)


@dataclass(frozen=True)
class BlockPlan:
    """What one rank computes at one ring step, with the K/V block of rank ``source``."""

    source: int
    q_part: Part
    kv_part: Part
    causal: bool
    # A masked pair (documents, windows, mask functions): the object whose ``forward`` and
    # ``backward`` replace the kernel's (see ringattn.masked_kernels.MaskedBlock).
    mask: Any = None

    @property
    def work(self) -> float:
        """Work relative to a full (non-causal) local block."""
        size = (0.5 if self.q_part is not Part.ALL else 1.0) * (
            0.5 if self.kv_part is not Part.ALL else 1.0
        )
        return size * (0.5 if self.causal else 1.0)


def ring_plan(rank: int, world_size: int, *, causal: bool, layout: str) -> list[BlockPlan | None]:
    """The plan of every ring step for ``rank``; None marks a skipped step.

    At step i the rank holds the K/V block that started on rank ``(rank - i) % world_size``.
    """
    _check_layout(layout)
    plans: list[BlockPlan | None] = []
    for step in range(world_size):
        source = (rank - step) % world_size
        if not causal:
            plans.append(BlockPlan(source, Part.ALL, Part.ALL, causal=False))
        elif source == rank:
            # The diagonal: local order follows global order under both layouts.
            plans.append(BlockPlan(source, Part.ALL, Part.ALL, causal=True))
        elif layout == "contiguous":
            plans.append(BlockPlan(source, Part.ALL, Part.ALL, False) if source < rank else None)
        elif source < rank:
            # Both local query chunks come after the source's first chunk and before its second.
            plans.append(BlockPlan(source, Part.ALL, Part.FIRST_HALF, causal=False))
        else:
            # Only the second local query chunk comes after the source's chunks, and after both.
            plans.append(BlockPlan(source, Part.SECOND_HALF, Part.ALL, causal=False))
    return plans


def kv_heads_for_ulysses(heads: int, kv_heads: int, size: int) -> int:
    """K/V heads after replicating them so that ``size`` ranks can split them (GQA).

    Raises ValueError when ``heads`` itself does not split over ``size`` ranks.
    """
    if heads % size:
        raise ValueError(
            f"strategy 'ulysses' splits heads over {size} ranks: q has {heads} heads, not a "
            f"multiple of {size}; use strategy='ring' or 'allgather', or a mesh whose "
            "Ulysses dimension divides the heads"
        )
    if kv_heads % size == 0:
        return kv_heads
    # Each K/V head repeated so that the count is a multiple of size and still divides heads.
    return kv_heads * size // math.gcd(kv_heads, size)
