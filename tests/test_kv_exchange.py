"""The masked all-gather's K/V exchange: which keys each rank fetches (no processes needed;
the exchange itself runs in every masked all-gather case of tests/test_masks.py)."""

from __future__ import annotations

import torch

import ringattn
from ringattn.balance import balanced_placement, layout_placement
from ringattn.kv_exchange import ALIGN, kv_exchange
from ringattn.masks import MaskSpec


def _check_covers(spec: MaskSpec, placement, rank: int) -> None:
    """The rank holds every key any of its queries can see, and its own keys in place."""
    ex = kv_exchange(spec, placement, rank)
    held = ex.positions
    assert torch.equal(held, torch.sort(held).values)
    assert torch.equal(held[ex.own_slots], placement.positions(rank))
    qpos = placement.positions(rank)
    lo, hi = spec.key_interval(qpos)
    for lo_i, hi_i in zip(lo.flatten().tolist(), hi.flatten().tolist()):
        if hi_i >= lo_i:
            seen = torch.arange(lo_i, hi_i + 1)
            assert bool(torch.isin(seen, held).all())


def test_a_window_fetches_only_its_reach_from_the_previous_rank() -> None:
    seq, world, left = 8192, 4, 300
    spec = MaskSpec.build(None, True, (left, 0), None, seq)
    placement = layout_placement(seq, world, "contiguous")
    reach = -(-left // ALIGN) * ALIGN  # whole tiles
    for rank in range(world):
        ex = kv_exchange(spec, placement, rank)
        _check_covers(spec, placement, rank)
        fetched = [(src, idx.numel()) for src, idx, _ in ex.fetch]
        assert fetched == ([] if rank == 0 else [(rank - 1, reach)])
        served = [(dst, idx.numel()) for dst, idx in ex.serve]
        assert served == ([] if rank == world - 1 else [(rank + 1, reach)])


def test_documents_fetch_the_documents_of_the_rank_queries() -> None:
    lengths = [1, 700, 3, 2000, 129, 1000, 263, 4096 - 4092]
    lengths[-1] += 4096 - sum(lengths)
    docs = ringattn.Documents.from_lengths(lengths)
    spec = MaskSpec.build(docs, True, None, None, 4096)
    placement = balanced_placement(docs, 4)
    for rank in range(4):
        _check_covers(spec, placement, rank)
        ex = kv_exchange(spec, placement, rank)
        assert ex.fetched < 4096 - placement.positions(rank).numel()  # not everything


def test_ranks_that_hold_whole_documents_move_nothing() -> None:
    """Every rank knows from the placement alone that no rank fetches: none calls the
    all-to-all (a window of 0 sees only its own position)."""
    seq, world = 4096, 4
    spec = MaskSpec.build(None, False, (0, 0), None, seq)
    placement = layout_placement(seq, world, "contiguous")
    for rank in range(world):
        ex = kv_exchange(spec, placement, rank)
        _check_covers(spec, placement, rank)
        assert ex.most_fetched == 0 and ex.fetch == () and ex.serve == ()
    # One rank fetching is enough for every rank to take part.
    spec = MaskSpec.build(None, True, (1, 0), None, seq)
    assert all(kv_exchange(spec, placement, r).most_fetched == ALIGN for r in range(world))
