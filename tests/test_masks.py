"""Masks (documents, windows, mask functions) on every entry point against float64 attention.

One spawn per world size runs many random cases (see ``mask_cases.py``); the plan, the
balanced layout and the masked kernels are checked in this process.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import ringattn
from mask_cases import (
    fuzz_cases,
    make_cases,
    reference_attention,
    reference_mask,
    run_mask_cases,
)
from ringattn import masked_kernels
from ringattn.balance import balanced_placement, layout_placement
from ringattn.mask_plan import ring_plans, ring_steps
from ringattn.masks import MaskSpec, PairMask

from distributed import run_ranks

WORLDS = {1: False, 2: False, 3: False, 4: True}  # world -> 2-D (2 x 2) mesh
RANDOM = {1: 12, 2: 22, 3: 18, 4: 20}  # seeded random cases per world
FUZZ = {1: 6, 2: 10, 3: 8, 4: 10}  # Hypothesis-drawn cases per world
CASES = {w: RANDOM[w] + FUZZ[w] for w in WORLDS}


def _cases(world: int) -> list[dict]:
    two_d = WORLDS[world]
    return make_cases(world, two_d, RANDOM[world], seed=world) + fuzz_cases(
        world, two_d, FUZZ[world]
    )


@pytest.fixture(scope="module")
def spawned() -> dict[int, list[list[dict]]]:
    # One spawn per world size runs every case (starting ranks is the slow part).
    return {
        world: run_ranks(run_mask_cases, world, two_d, _cases(world))
        for world, two_d in WORLDS.items()
    }


@pytest.mark.parametrize("world", list(WORLDS))
def test_masked_attention_matches_float64(spawned, world: int) -> None:
    for rank, results in enumerate(spawned[world]):
        cases = [r for r in results if "case" in r]
        assert len(cases) == CASES[world]
        bad = [(r["case"], r["bad"]) for r in cases if r["bad"]]
        assert not bad, f"world {world} rank {rank}: {len(bad)} failing, first: {bad[:2]}"


@pytest.mark.parametrize("world", list(WORLDS))
def test_bad_mask_arguments_raise_on_every_rank(spawned, world: int) -> None:
    for rank, results in enumerate(spawned[world]):
        found = results[-1]["errors_check"]
        assert found.pop("after") == "ok", (rank, found)
        for name, what in found.items():
            assert what.startswith(("ValueError", "TypeError")), (world, rank, name, what)
        assert "sum to the global sequence length" in found["lengths"]
        assert "window" in found["window"]
        assert "mask_mod raised" in found["mask_mod_raises"]
        if world > 1:
            assert "same mask" in found["differ"] or "rejected" in found["differ"], found


def test_the_cases_cover_what_they_are_for() -> None:
    cases = [c for w in WORLDS for c in _cases(w)]
    assert all(len(_cases(w)) == CASES[w] for w in WORLDS)
    assert {c["entry"] for c in cases} >= {
        "ring_attention",
        "attention:ring",
        "attention:allgather",
        "attention:ulysses",
        "attention:hybrid",
        "attention:auto",
    }
    assert {c["docs"] for c in cases} == {
        "lengths",
        "cu_seqlens",
        "position_ids",
        "attention_mask",
        "none",
    }
    assert {c["mask_mod"] for c in cases} >= {None, "prefix_lm", "odd_heads", "batch_gap", "block7"}
    assert {str(c["window"]) for c in cases} >= {"None", "(0, 0)", "(100, 100)", "(-1, 2)"}
    assert {c["causal"] for c in cases} == {True, False}
    assert any(c["kv_heads"] < c["heads"] for c in cases)


# --------------------------------------------------------------------------- one process


# The masks bench's 64K packed batch (benchmarks/masks_bench.py, docs-64K).
_BENCH_64K = [1856, 2568, 8800, 2704, 2256, 536, 4648, 744, 1856, 2064, 304, 5000, 10208]
_BENCH_64K += [3256, 2352, 16384]


def _heavy_tailed(rnd: random.Random, s: int, mean: int = 4096) -> list[int]:
    lengths = [rnd.randint(s // 8, s // 4)]
    while sum(lengths) < s:
        n = max(1, int(rnd.lognormvariate(math.log(mean) - 0.5, 1.2)))
        lengths.append(min(n, s - sum(lengths)))
    rnd.shuffle(lengths)
    return lengths


@pytest.mark.parametrize("world", [2, 4, 8])
def test_balanced_layout_is_within_five_percent(world: int) -> None:
    rnd = random.Random(world)
    for s in (65536, 262144):
        for _ in range(3):
            docs = ringattn.Documents.from_lengths(_heavy_tailed(rnd, s))
            # One layout for causal, bidirectional and windowed layers.
            assert ringattn.layout_imbalance(docs, world) <= 1.05
            assert ringattn.layout_imbalance(docs, world, causal=False) <= 1.05
            assert ringattn.layout_imbalance(docs, world, window=(4095, 0)) <= 1.05
            placement = balanced_placement(docs, world)
            assert {len(i) for i in placement.ids} == {len(placement.ids[0])}  # equal tokens
            assert sorted(c for i in placement.ids for c in i) == list(
                range(world * len(placement.ids[0]))
            )


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_layout_keeps_documents_together(world: int, monkeypatch) -> None:
    """The locality swaps lower the keys the most-fetching rank needs from others (the
    masked all-gather's traffic) against the balance alone, within the 5% balance."""
    from ringattn import balance
    from ringattn.balance import _chunk_needs
    from ringattn.kv_exchange import kv_exchange

    rnd = random.Random(100 + world)
    cases = [_heavy_tailed(rnd, 65536) for _ in range(3)] + [_BENCH_64K]
    for lengths in cases:
        docs = ringattn.Documents.from_lengths(lengths)
        spec = MaskSpec.build(docs, True, None, None, docs.seq_len)
        placement = balanced_placement(docs, world)
        with monkeypatch.context() as patch:
            patch.setattr(balance, "_localize", lambda *args: None)  # the balance alone
            balanced_placement.cache_clear()
            plain = balanced_placement(docs, world)
        balanced_placement.cache_clear()
        chunks, chunk = sum(len(i) for i in placement.ids), placement.chunk
        together = kv_exchange(spec, placement, 0).most_fetched
        apart = kv_exchange(spec, plain, 0).most_fetched
        assert together <= apart
        assert ringattn.layout_imbalance(docs, world) <= 1.05
        needs = _chunk_needs(spec, chunks, chunk)
        assert bool(needs.diagonal().all())  # a chunk's queries see some of its own keys
    # The bench's mix (the last case): on 2 ranks about a quarter of the other rank's keys
    # instead of two thirds; on 4 under half instead of two thirds.
    assert together < 0.75 * apart
    if world == 2:
        assert together < 0.3 * docs.seq_len / 2


def _computed(plan, pair_q, pair_k) -> torch.Tensor:
    """The (query, key) pairs a plan computes with a nonzero weight ``[R, Sq, Sk]``."""
    sq, sk = pair_q.numel(), pair_k.numel()
    if plan.mask is not None:
        return plan.mask.pair.dense(1, 1)[:, 0]
    if plan.causal:
        return torch.ones(sq, sk, dtype=torch.bool).tril().unsqueeze(0)
    return torch.ones(1, sq, sk, dtype=torch.bool)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_plan_computes_every_visible_pair_once_and_skips_empty_ones(world: int) -> None:
    rnd = random.Random(10 + world)
    for trial in range(12):
        s = world * rnd.choice([4, 6, 8, 12])
        style = trial % 3
        if style == 0:
            lengths = [max(1, int(rnd.expovariate(0.3))) for _ in range(s)]
            while sum(lengths) > s:
                lengths.pop()
            lengths.append(s - sum(lengths)) if sum(lengths) < s else None
            docs = ringattn.Documents.from_lengths(lengths)
        elif style == 1:
            docs = ringattn.Documents.from_lengths([s])
        else:
            docs = None
        causal = rnd.random() < 0.7
        window = rnd.choice([None, (0, 0), (2, 0), (3, 1), (s, s)])
        spec = MaskSpec.build(docs, causal, window, None, s)
        layout = rnd.choice(["zigzag", "contiguous"])
        placement = (
            balanced_placement(docs, world)
            if docs is not None
            else layout_placement(s, world, layout)
        )
        seen = torch.zeros(docs.rows if docs is not None else 1, s, s, dtype=torch.long)
        for rank in range(world):
            plans = ring_plans(spec, placement, "math", rank)
            nxt = ring_plans(spec, placement, "math", (rank + 1) % world)
            assert plans.steps == nxt.steps  # every rank runs the same number of steps
            assert plans.steps == _ring_length(spec, placement)
            assert (plans.next_last_plan is None) == (nxt.plans[-1] is None)
            qpos = placement.positions(rank)
            for step, plan in enumerate(plans.plans):
                source = (rank - step) % world
                kpos = placement.positions(source)
                pair = PairMask.build(spec, qpos, kpos)
                if plan is None:
                    assert pair.visible == 0
                    continue
                assert step == 0 or pair.visible > 0, "a non-empty plan on an empty pair"
                assert plan.source == source
                hits = _computed(plan, qpos, kpos)
                seen[:, qpos.view(-1, 1), kpos.view(1, -1)] += hits.long()
            # Steps past the truncation are empty for this rank too.
            for step in range(plans.steps, world):
                source = (rank - step) % world
                assert PairMask.build(spec, qpos, placement.positions(source)).visible == 0
        want = reference_mask(
            dict(
                batch=docs.rows if docs is not None else 1,
                heads=1,
                seq=s,
                segments=[(n, False) for n in _lengths_of(docs, s)],
                causal=causal,
                window=window,
                mask_mod=None,
            )
        )[:, 0]
        assert torch.equal(seen, want.long()), (trial, world, causal, window)


def _ring_length(spec: MaskSpec, placement) -> int:
    """The ring's length counted pair by pair: one past the last step at which some rank's
    queries see a key of the arriving block (the local step always runs)."""
    world = placement.world_size
    return 1 + max(
        step
        for r in range(world)
        for step in range(world)
        if step == 0
        or PairMask.build(
            spec, placement.positions(r), placement.positions((r - step) % world)
        ).visible
    )


def _lengths_of(docs, s: int) -> list[int]:
    if docs is None:
        return [s]
    ids = docs.doc_ids[0]
    return torch.unique_consecutive(ids, return_counts=True)[1].tolist()


def test_a_window_reaches_only_its_neighbours() -> None:
    world, s = 8, 8 * 64
    for w, reach in ((0, 0), (1, 1), (63, 1), (64, 1), (65, 2), (130, 3), (1000, 7)):
        spec = MaskSpec.build(None, True, (w, 0), None, s)
        for rank in range(world):
            plans = ring_plans(spec, layout_placement(s, world, "contiguous"), "math", rank)
            assert plans.steps == reach + 1, (w, rank, plans.steps)
        assert ring_steps(spec, layout_placement(s, world, "contiguous")) == reach + 1


def test_the_priced_ring_length_counts_keys_at_the_window_edges() -> None:
    """A neighbour's key at the very edge of a query's interval is enough for a step:
    a window of one key to the left reaches the previous rank (one step), one to the right
    the next rank (whose K/V arrive last, after ``world - 1`` steps)."""
    for world in (2, 3, 4):
        s = world * 32
        placement = layout_placement(s, world, "contiguous")
        for window, reach in (((0, 0), 0), ((1, 0), 1), ((0, 1), world - 1)):
            spec = MaskSpec.build(None, False, window, None, s)
            assert ring_plans(spec, placement, "math", 0).steps == reach + 1
            assert ring_steps(spec, placement) == reach + 1, (world, window)


def test_the_priced_ring_length_is_the_planned_one_for_batch_rows() -> None:
    """Per-row documents (each batch row its own packing) and a mask function: the ring's
    length the planner prices is the one its plans run."""
    rnd = random.Random(7)
    for world in (2, 3, 4):
        for _ in range(6):
            s = world * 2 * rnd.choice([8, 16, 24])
            rows = []
            for _ in range(3):
                cuts = sorted(rnd.sample(range(1, s), rnd.randint(0, 5)))
                rows.append([b - a for a, b in zip([0, *cuts], [*cuts, s])])
            docs = ringattn.Documents.from_lengths(rows)
            window = rnd.choice([None, (5, 0), (s // world, 3)])
            spec = MaskSpec.build(docs, True, window, lambda b, h, q, k: q >= k, s)
            placement = balanced_placement(docs, world)
            want = _ring_length(spec, placement)
            assert ring_steps(spec, placement) == want, (world, rows, window)
            assert ring_plans(spec, placement, "math", 0).steps == want


def test_merge_adds_nothing_for_rows_that_see_nothing() -> None:
    from ringattn.merge import merge_eager

    acc = torch.randn(1, 1, 3, 4)
    acc_lse = torch.tensor([[[0.5, -math.inf, 1.0]]])
    before = acc.clone()
    merge_eager(acc, acc_lse, torch.zeros(1, 1, 3, 4), torch.full((1, 1, 3), -math.inf))
    assert torch.equal(acc, before)
    assert torch.equal(acc_lse, torch.tensor([[[0.5, -math.inf, 1.0]]]))


def test_documents_constructors_agree() -> None:
    a = ringattn.Documents.from_lengths([3, 1, 4])
    b = ringattn.Documents.from_cu_seqlens([0, 3, 4, 8])
    c = ringattn.Documents.from_position_ids(torch.tensor([0, 1, 2, 0, 0, 1, 2, 3]))
    assert a == b == c and a.seq_len == 8 and a.batch_size is None
    d = ringattn.Documents.from_attention_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]]))
    assert d.batch_size == 2
    m = d.dense_mask(causal=True)
    assert not m[0, 0, :2].any() and not m[0, 0, :, :2].any() and m[0, 0, 3, 2]
    assert not m[1, 0, 3].any() and m[1, 0, 2, :3].all()
    with pytest.raises(ValueError, match="padding inside a row"):
        ringattn.Documents.from_attention_mask(torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="same sequence length"):
        ringattn.Documents.from_lengths([[2, 2], [3]])


def test_shard_round_trip_with_documents() -> None:
    docs = ringattn.Documents.from_lengths([5, 11, 1, 7])
    for world in (2, 3, 4):
        placement = balanced_placement(docs, world)
        order = placement.permutation()
        assert sorted(order.tolist()) == list(range(24))
        for r in range(world):
            pos = placement.positions(r)
            assert pos.numel() == 24 // world and torch.equal(pos, pos.sort().values)


def _pair_for_kernels(seed: int):
    rnd = random.Random(seed)
    s = 40
    docs = ringattn.Documents.from_lengths([7, 1, 20, 12])
    spec = MaskSpec.build(docs, True, (9, 0), None, s)
    qpos = torch.tensor(sorted(rnd.sample(range(s), 16)))
    kpos = torch.tensor(sorted(rnd.sample(range(s), 24)))
    return spec, PairMask.build(spec, qpos, kpos)


def test_flex_block_mask_forward_matches_the_explicit_mask() -> None:
    if not masked_kernels.flex_available():
        pytest.skip("FlexAttention is not in this torch")
    spec, pair = _pair_for_kernels(0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, 16, generator=g)
    k = torch.randn(2, 2, 24, 16, generator=g)
    v = torch.randn(2, 2, 24, 16, generator=g)
    flex = masked_kernels.MaskedBlock(pair, "flex")
    math_ = masked_kernels.MaskedBlock(pair, "math")
    out_f, lse_f, _ = flex.forward(q, k, v, 0.25)
    out_m, lse_m, _ = math_.forward(q, k, v, 0.25)
    assert torch.equal(torch.isinf(lse_f), torch.isinf(lse_m))
    finite = torch.isfinite(lse_m)
    torch.testing.assert_close(lse_f[finite], lse_m[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-5)


def test_a_padded_pair_sees_what_the_pair_sees_and_nothing_past_it() -> None:
    """Keys added past a pair's own (a key count rounded up to a compiled size) are seen by
    no query: the explicit mask, the tile facts and FlexAttention's block mask (forward,
    against the unpadded pair, with the added keys random rather than zero) agree."""
    spec, pair = _pair_for_kernels(2)
    wide = pair.padded(40)
    assert wide.kpos.numel() == 40 and pair.padded(24) is pair
    dense, dense_wide = pair.dense(2, 1), wide.dense(2, 1)
    assert torch.equal(dense_wide[..., :24], dense) and not dense_wide[..., 24:].any()
    touched, full = wide.tile_facts(8)
    assert not touched[..., 3:].any() and not full[..., 3:].any()
    assert torch.equal(touched[..., :3], pair.tile_facts(8)[0])
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 16, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    out_m, lse_m, _ = masked_kernels.MaskedBlock(pair, "math").forward(
        q, k[:, :, :24], v[:, :, :24], 0.25
    )
    kernels = ["math"] + (["flex"] if masked_kernels.flex_available() else [])
    for kernel in kernels:
        out, lse, _ = masked_kernels.MaskedBlock(wide, kernel).forward(q, k, v, 0.25)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_m))
        finite = torch.isfinite(lse_m)
        torch.testing.assert_close(lse[finite], lse_m[finite], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, out_m, rtol=1e-5, atol=1e-5)


def test_key_counts_round_to_a_few_sizes() -> None:
    """The masked all-gather's key count is rounded up by at most a quarter (and a tile),
    to multiples of the tile, never past the sequence: few sizes over many batches."""
    from ringattn.kv_exchange import ALIGN, padded_keys

    seq = 65536
    sizes = set()
    for keys in range(1, seq + 1, 37):
        got = padded_keys(keys, seq)
        sizes.add(got)
        assert keys <= got <= min(seq, keys + keys // 4 + ALIGN)
        assert got % ALIGN == 0 or got == seq
    assert padded_keys(seq, seq) == seq
    assert len([n for n in sizes if n >= 16384]) <= 9  # 16K-64K: four sizes per doubling


def test_flex_backward_gives_the_share_of_the_full_gradient(monkeypatch) -> None:
    """The recompute-and-reweight backward of the flex path, with a differentiable float64
    stand-in for FlexAttention (its own backward does not run on CPU)."""
    spec, pair = _pair_for_kernels(1)
    dense = pair.dense(1, 1)

    def stand_in(q, k, v, block_mask, scale):
        mask = dense.unsqueeze(2)
        return reference_math(q, k, v, mask, scale)

    monkeypatch.setattr(masked_kernels, "_flex", stand_in)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 16, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 24, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 24, 8, generator=g, dtype=torch.float64)
    dout = torch.randn(1, 4, 16, 8, generator=g, dtype=torch.float64)
    # A final output and lse that include a second, made-up block of mass.
    block = masked_kernels.MaskedBlock(pair, "math")
    out_b, lse_b, _ = block.forward(q, k, v, 0.3)
    extra_lse = torch.randn(1, 4, 16, generator=g, dtype=torch.float64)
    extra_out = torch.randn(1, 4, 16, 8, generator=g, dtype=torch.float64)
    lse = torch.logaddexp(lse_b, extra_lse)
    out = torch.exp(lse_b - lse).nan_to_num(0).unsqueeze(-1) * out_b
    out = out + torch.exp(extra_lse - lse).unsqueeze(-1) * extra_out
    want = block.backward(dout, q, k, v, out, lse, None, 0.3)
    got = masked_kernels._flex_backward(dout, q, k, v, out, lse, None, 0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def reference_math(q, k, v, mask5, scale):
    groups = q.size(1) // k.size(1)
    qg = q.unflatten(1, (k.size(1), groups))
    s = (qg @ k.unsqueeze(2).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask5, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1))
    out = p @ v.unsqueeze(2)
    return out.flatten(1, 2), lse.flatten(1, 2)


def test_reference_attention_zeroes_rows_that_see_nothing() -> None:
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[[True, False, False], [False, False, False], [True, True, True]]]])
    out, lse = reference_attention(q, q, q, mask, 0.5)
    out.sum().backward()
    assert torch.equal(out[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert lse[0, 0, 1] == -math.inf and torch.isfinite(q.grad).all()


def test_the_planner_prices_masked_work() -> None:
    from ringattn.mask_plan import density
    from ringattn.planner import Problem, load_calibration, plan

    cal = load_calibration(device_type="cuda")
    base = Problem(gpus=4, seq_len=131072, heads=32, kv_heads=8, head_dim=128)
    window = MaskSpec.build(None, True, (4095, 0), None, 131072)
    share = density(window)
    assert 0.05 < share < 0.07  # 4K of 128K keys per row, against the causal half
    masked = Problem(**{**base.__dict__, "density": share, "ring_steps": 2})
    rows = {r.strategy: r for r in plan(base, cal)}
    masked_rows = {r.strategy: r for r in plan(masked, cal)}
    for name, row in rows.items():
        assert masked_rows[name].compute_ms == pytest.approx(row.compute_ms * share, rel=0.02)
    assert masked_rows["ring"].exposed_comm_ms <= rows["ring"].exposed_comm_ms
    with pytest.raises(ValueError, match="density"):
        plan(Problem(**{**base.__dict__, "density": 1.5}), cal)
    # The masked all-gather moves only the keys its queries see: its traffic scales with the
    # share fetched, and the latency alone remains when nothing moves.
    full = masked_rows["allgather"]
    for fetched in (0.0, 0.25):
        fewer = {
            r.strategy: r
            for r in plan(Problem(**{**masked.__dict__, "fetched_share": fetched}), cal)
        }
        assert fewer["allgather"].exposed_comm_ms < full.exposed_comm_ms
        assert fewer["allgather"].memory_gib < full.memory_gib
        assert fewer["ring"] == masked_rows["ring"]
    nothing = {
        r.strategy: r for r in plan(Problem(**{**masked.__dict__, "fetched_share": 0.0}), cal)
    }
    assert nothing["allgather"].exposed_comm_ms == pytest.approx(
        2 * cal.latency_us * 1e-3, abs=1e-4
    )
    with pytest.raises(ValueError, match="fetched_share"):
        plan(Problem(**{**base.__dict__, "fetched_share": -0.1}), cal)


def test_auto_prices_the_keys_packed_documents_fetch() -> None:
    """On 4 GPUs the masked all-gather of a 64K packed batch fetched under half of the other
    ranks' keys and ran 2x faster than the ring (4x H200); priced as a full all-gather it
    lost to the ring. Every rank prices the same share: the most any rank fetches."""
    from ringattn.kv_exchange import kv_exchange
    from ringattn.mask_plan import density, ring_plans
    from ringattn.planner import Problem, load_calibration, plan

    docs = ringattn.Documents.from_lengths(_BENCH_64K)
    spec = MaskSpec.build(docs, True, None, None, docs.seq_len)
    placement = balanced_placement(docs, 4)
    shares = {kv_exchange(spec, placement, r).most_fetched for r in range(4)}
    assert len(shares) == 1  # the same on every rank
    share = shares.pop() / (docs.seq_len * 3 // 4)
    assert 0.0 < share < 0.5
    steps = ring_plans(spec, placement, "flex", 0).steps
    problem = Problem(
        gpus=4,
        seq_len=docs.seq_len,
        heads=32,
        kv_heads=8,
        head_dim=128,
        gpus_per_node=4,
        density=round(density(spec), 3),
        ring_steps=steps,
        ring_recompute=True,
        fetched_share=share,
    )
    assert plan(problem, load_calibration(device_type="cuda"))[0].strategy == "allgather"
