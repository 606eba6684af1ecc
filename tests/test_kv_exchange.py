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


# --------------------------------------------------------------------------- key rows


def test_contribution_table_lists_every_position_of_each_row() -> None:
    from ringattn.key_rows import contribution_table

    index = torch.tensor([3, 0, 3, 5, 3, 0])
    table = contribution_table(index, 7)
    assert table.tolist() == [
        [1, -1, -1, 0, -1, 3, -1],
        [5, -1, -1, 2, -1, -1, -1],
        [-1, -1, -1, 4, -1, -1, -1],
    ]
    assert contribution_table(torch.zeros(0, dtype=torch.int64), 4).shape == (0, 4)


def test_key_rows_copy_and_sum_as_loops_over_rows() -> None:
    """copy_rows and sum_rows (PyTorch ops off CUDA; tests/test_gpu.py compares the Triton
    kernels with these) against the same copies written one row at a time, in float64."""
    from ringattn.key_rows import contribution_table, copy_rows, sum_rows

    g = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 50, 8
    for dtype in (torch.float64, torch.bfloat16):
        src = [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(2)]
        wire = torch.randn(20, 2, b, h, d, generator=g).to(dtype)  # key-major, as the exchange
        views = [wire[:, j].permute(1, 2, 0, 3) for j in range(2)]
        src_index = torch.randperm(s, generator=g)[:20]
        dst_index = torch.randperm(s, generator=g)[:20]
        # Select into strided views, place from them.
        copy_rows(views, None, src, src_index)
        for j in range(2):
            for i, si in enumerate(src_index.tolist()):
                assert torch.equal(views[j][:, :, i], src[j][:, :, si])
        dst = [torch.zeros(b, h, s, d, dtype=dtype) for _ in range(2)]
        copy_rows(dst, dst_index, views, None)
        for j in range(2):
            for i, di in enumerate(dst_index.tolist()):
                assert torch.equal(dst[j][:, :, di], views[j][:, :, i])
        # Sum: each row's own value plus every returned value listed for it, rounded once.
        rows = 30
        own_index = torch.randperm(s, generator=g)[:rows]
        served = torch.randint(0, rows, (20,), generator=g)  # keys served to several ranks
        table = contribution_table(served, rows)
        assert table.size(0) > 1
        out = [torch.empty(b, h, rows, d, dtype=dtype) for _ in range(2)]
        sum_rows(out, src, own_index, views, table)
        for j in range(2):
            want = src[j][:, :, own_index].double()
            for i, key in enumerate(served.tolist()):
                want[:, :, key] += views[j][:, :, i].double()
            assert torch.equal(out[j], want.to(dtype)), (dtype, j)
