"""Plans under a mask: which block pairs each rank computes, with which kernel, or skips.

For every rank and ring step, the pair (this rank's query positions, the arriving block's
key positions) is classified by its :class:`~ringattn.masks.PairMask`: ``empty`` pairs are
skipped (``None``), ``full`` and ``causal`` pairs run the unmasked kernel, ``partial``
pairs a masked kernel (:class:`~ringattn.masked_kernels.MaskedBlock`). The local pair (step
0) is never skipped, so every query row gets a result (output 0 and lse -inf when it sees
nothing). When every rank's remaining steps are empty, the ring stops early: K/V travel
only as far as some rank still needs them (a causal window W on the contiguous layout
reaches ``ceil(W / shard)`` neighbours).

Plans are cached by everything they depend on (the mask's description, the placement, the
kernel), so a batch's plans are made once and reused by every layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .balance import Placement
from .layout import BlockPlan, Part
from .masked_kernels import MaskedBlock
from .masks import MaskSpec, PairMask

__all__ = [
    "MaskedPlans",
    "block_plan",
    "fetched_plan",
    "ring_plans",
    "ring_steps",
    "single_plan",
]


def block_plan(pair: PairMask, source: int, kernel: str, keep_empty: bool) -> BlockPlan | None:
    """The plan of one pair: None (skipped), the unmasked kernel, or a masked block."""
    if pair.kind == "empty" and not keep_empty:
        return None
    if pair.kind == "full":
        return BlockPlan(source, Part.ALL, Part.ALL, causal=False)
    if pair.kind == "causal":
        return BlockPlan(source, Part.ALL, Part.ALL, causal=True)
    return BlockPlan(source, Part.ALL, Part.ALL, causal=False, mask=MaskedBlock(pair, kernel))


@dataclass(frozen=True)
class MaskedPlans:
    """The ring plans of one rank (truncated to the steps some rank needs), with what the
    ring needs of the next rank's plans."""

    rank: int
    plans: tuple[BlockPlan | None, ...]  # this rank's, per step
    next_last_plan: BlockPlan | None  # the next rank's last-step plan (only its part matters)

    @property
    def steps(self) -> int:
        return len(self.plans)


_CACHE: OrderedDict[tuple, MaskedPlans] = OrderedDict()
# A batch's plans are reused by every layer; a few batches' worth are kept (each holds its
# pairs' key ranges and, once used, BlockMasks on the device).
_CACHE_LIMIT = 16


def ring_plans(
    spec: MaskSpec, placement: Placement, kernel: str, rank: int, head_offset: int = 0
) -> MaskedPlans:
    """The plans of ``rank`` in a ring over ``placement``'s ranks under ``spec`` (cached).

    The ring's length comes from every rank's key intervals (:func:`ring_steps`); only this
    rank's pairs, up to that length, are built and keep their masks.
    """
    key = (spec.key, placement, kernel, rank, head_offset)
    found = _CACHE.get(key)
    if found is not None:
        _CACHE.move_to_end(key)
        return found
    world = placement.world_size
    steps = ring_steps(spec, placement)
    qpos = placement.positions(rank)
    mine: list[BlockPlan | None] = []
    for step in range(steps):
        source = (rank - step) % world
        pair = PairMask.build(spec, qpos, placement.positions(source), head_offset)
        mine.append(block_plan(pair, source, kernel, keep_empty=step == 0))
    last = steps - 1
    nxt = (rank + 1) % world
    source = (nxt - last) % world
    next_last = None
    if (
        last == 0
        or PairMask.build(spec, placement.positions(nxt), placement.positions(source)).visible
    ):
        # Only whether it runs and which part of this rank's K/V it covers (all) matter.
        next_last = BlockPlan(source, Part.ALL, Part.ALL, causal=False)
    found = MaskedPlans(rank, tuple(mine), next_last)
    _CACHE[key] = found
    if len(_CACHE) > _CACHE_LIMIT:
        _CACHE.popitem(last=False)
    return found


def ring_steps(spec: MaskSpec, placement: Placement) -> int:
    """How many steps the masked ring runs (``ring_plans(...).steps``), for pricing it
    without building its pairs (cached). A rank's queries see some key of a source when
    some query's key interval overlaps one of the source's chunks: per rank, the chunks
    its intervals cover, from a difference array over chunk indices."""
    key = (spec.key, placement)
    found = _STEPS.get(key)
    if found is not None:
        return found
    world, chunk = placement.world_size, placement.chunk
    chunks = sum(len(ids) for ids in placement.ids)
    last = 0  # the local pair always runs
    for r in range(world):
        lo, hi = spec.key_interval(placement.positions(r))
        some = hi >= lo
        cover = torch.zeros(chunks + 1, dtype=torch.int64)
        cover.index_add_(0, lo[some] // chunk, torch.ones_like(lo[some]))
        cover.index_add_(0, hi[some] // chunk + 1, -torch.ones_like(hi[some]))
        covered = (cover.cumsum(0)[:chunks] > 0).tolist()
        for src in range(world):
            if any(covered[c] for c in placement.ids[src]):
                last = max(last, (r - src) % world)
    found = _STEPS[key] = last + 1
    if len(_STEPS) > _CACHE_LIMIT:
        _STEPS.popitem(last=False)
    return found


_STEPS: OrderedDict[tuple, int] = OrderedDict()


def single_plan(spec: MaskSpec, kernel: str, head_offset: int = 0) -> BlockPlan:
    """One pair: every position against every key, as Ulysses computes it on its heads
    after the all-to-all, in one kernel call (cached)."""

    def positions() -> tuple[Tensor, Tensor]:
        every = torch.arange(spec.seq_len)
        return every, every

    return _cached_pair_plan((spec.key, kernel, head_offset), spec, positions, kernel, head_offset)


_SINGLE: dict[tuple, BlockPlan] = {}


def _cached_pair_plan(
    key: tuple,
    spec: MaskSpec,
    positions: Callable[[], tuple[Tensor, Tensor]],
    kernel: str,
    head_offset: int = 0,
    keys: int = 0,
) -> BlockPlan:
    """The cached plan of one pair; ``positions()`` gives its (query, key) positions and
    runs on a cache miss only. A partial pair is padded to ``keys`` keys where that is more
    (see :meth:`PairMask.padded`)."""
    plan = _SINGLE.get(key)
    if plan is None:
        pair = PairMask.build(spec, *positions(), head_offset)
        if pair.kind == "partial":
            pair = pair.padded(keys)
        plan = block_plan(pair, 0, kernel, keep_empty=True)
        assert plan is not None
        if len(_SINGLE) >= _CACHE_LIMIT:
            _SINGLE.clear()
        _SINGLE[key] = plan
    return plan


def fetched_plan(
    spec: MaskSpec,
    placement: Placement,
    rank: int,
    key_positions: Tensor,
    kernel: str,
    keys: int = 0,
) -> BlockPlan:
    """One pair: the queries of ``rank`` against the keys it fetched (``key_positions``,
    sorted; see :mod:`ringattn.kv_exchange`), as the masked all-gather computes it (cached).
    A partial pair is padded to ``keys`` keys (:func:`ringattn.kv_exchange.padded_keys`)."""
    key = (spec.key, placement, rank, kernel, "fetched", keys)

    def positions() -> tuple[Tensor, Tensor]:
        return placement.positions(rank), key_positions

    return _cached_pair_plan(key, spec, positions, kernel, keys=keys)


def density(spec: MaskSpec) -> float:
    """Visible (query, key) pairs over those of the unmasked causal (or full) attention the
    cost model prices, for the planner."""
    from .balance import position_work

    rows = spec.documents.rows if spec.documents is not None else 1
    s = spec.seq_len
    dense = rows * (s * (s + 1) / 2 if spec.causal else s * s)
    return float(position_work(spec).sum()) / dense if dense else 1.0
