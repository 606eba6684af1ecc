"""Pieces that need no process group: layouts, plans, merge, kernels, the ring simulation."""

from __future__ import annotations

import itertools

import pytest
import torch

from ringattn import kernels, reference
from ringattn.layout import Part, chunk_ids, ring_plan, shard_for_rank, unshard_shards
from ringattn.merge import merge_into


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_shard_unshard_roundtrip_and_positions(world: int, layout: str) -> None:
    chunks = 2 * world if layout == "zigzag" else world
    x = torch.arange(chunks * 3).view(1, 1, -1, 1)
    shards = [shard_for_rank(x, r, world, dim=2, layout=layout) for r in range(world)]
    assert torch.equal(unshard_shards(shards, dim=2, layout=layout), x)
    for r, s in enumerate(shards):
        want = torch.cat([torch.arange(c * 3, c * 3 + 3) for c in chunk_ids(r, world, layout)])
        assert torch.equal(s.flatten(), want)


def test_shard_rejects_uneven_length() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_for_rank(torch.zeros(1, 1, 12, 1), 0, 4, dim=2, layout="zigzag")


def _attended_pairs(world: int, causal: bool, layout: str, length: int = 4) -> torch.Tensor:
    """How often each (query, key) position pair is computed by the plans of all ranks."""
    total = length * world
    pos = torch.arange(total)
    count = torch.zeros(total, total, dtype=torch.int64)
    for rank in range(world):
        q_pos = shard_for_rank(pos, rank, world, dim=0, layout=layout)
        for plan in ring_plan(rank, world, causal=causal, layout=layout):
            if plan is None:
                continue
            k_pos = shard_for_rank(pos, plan.source, world, dim=0, layout=layout)
            qp, kp = plan.q_part.take(q_pos, 0), plan.kv_part.take(k_pos, 0)
            allowed = torch.ones(len(qp), len(kp), dtype=torch.bool)
            if plan.causal:
                allowed = allowed.tril()
            for i, j in zip(*allowed.nonzero(as_tuple=True)):
                count[qp[i], kp[j]] += 1
    return count


@pytest.mark.parametrize(
    "world,causal,layout",
    list(itertools.product([1, 2, 3, 4, 6], [True, False], ["zigzag", "contiguous"])),
)
def test_plans_cover_every_allowed_pair_exactly_once(world, causal, layout) -> None:
    count = _attended_pairs(world, causal, layout)
    n = count.size(0)
    want = torch.ones(n, n, dtype=torch.int64)
    if causal:
        want = want.tril()
    assert torch.equal(count, want)


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_work_is_balanced(world: int) -> None:
    work = [
        sum(p.work for p in ring_plan(r, world, causal=True, layout="zigzag") if p)
        for r in range(world)
    ]
    assert max(work) == min(work)
    contiguous = [
        sum(p.work for p in ring_plan(r, world, causal=True, layout="contiguous") if p)
        for r in range(world)
    ]
    assert max(contiguous) >= 1.5 * sum(contiguous) / world  # the imbalance zigzag removes


def test_every_zigzag_step_after_the_first_is_half_a_block() -> None:
    for rank in range(4):
        plans = ring_plan(rank, 4, causal=True, layout="zigzag")
        assert plans[0].causal and plans[0].q_part is Part.ALL
        assert all(p.work == 0.5 and not p.causal for p in plans[1:])


def test_merge_is_stable_at_large_lse_and_empty_rows() -> None:
    acc_out = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    acc_lse = torch.tensor([1e4, float("-inf"), float("-inf")])
    out = torch.tensor([[5.0, 6.0], [7.0, 8.0], [0.0, 0.0]])
    lse = torch.tensor([1e4 + 0.5, 20.0, float("-inf")])
    merge_into(acc_out, acc_lse, out, lse)
    w = torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    want0 = (1 - w) * torch.tensor([1.0, 2.0]).double() + w * torch.tensor([5.0, 6.0]).double()
    assert torch.allclose(acc_out[0].double(), want0, rtol=1e-6)
    assert acc_lse[0].item() == pytest.approx(
        1e4 + 0.5 + float(torch.log1p(torch.exp(torch.tensor(-0.5)))), rel=1e-7
    )
    assert torch.equal(acc_out[1], torch.tensor([7.0, 8.0])) and acc_lse[1].item() == 20.0
    assert torch.equal(acc_out[2], torch.tensor([3.0, 3.0])) and acc_lse[2].item() == float("-inf")
    assert not torch.isnan(acc_out).any() and not torch.isnan(acc_lse).any()


def test_merge_equals_attention_over_the_union() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) * 40  # large logits
    k = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64) * 40
    v = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64)
    want_out, want_lse = reference.attention(q, k, v, return_lse=True)
    math = kernels.get_kernel("math")
    acc_out, acc_lse, _ = math.forward(q, k[:, :, :4], v[:, :, :4], causal=False, scale=0.5)
    acc_out = acc_out.clone()
    out2, lse2, _ = math.forward(q, k[:, :, 4:], v[:, :, 4:], causal=False, scale=0.5)
    merge_into(acc_out, acc_lse, out2, lse2)
    assert relative_error(acc_out, want_out) < 1e-12
    assert relative_error(acc_lse, want_lse) < 1e-12
    assert want_lse.abs().max() > 1e3


@pytest.mark.parametrize("backend", ["math", "cpu"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 3])
def test_kernel_forward_backward_match_reference(backend, causal, groups) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3 * groups, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 3 * groups, 6, 5, generator=g, dtype=torch.float64)
    kernel = kernels.get_kernel(backend)
    out, lse, aux = kernel.forward(q, k, v, causal=causal, scale=0.7)
    grads = kernel.backward(dout, q, k, v, out, lse, aux, causal=causal, scale=0.7)
    want_out, want_lse = reference.attention(q, k, v, causal=causal, scale=0.7, return_lse=True)
    want_grads = torch.autograd.grad(want_out, (q, k, v), dout)
    assert relative_error(out, want_out) < 1e-12
    assert relative_error(lse, want_lse) < 1e-12
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-12


def test_auto_picks_the_cpu_kernel_and_logs_it(caplog) -> None:
    q = torch.randn(1, 2, 4, 8)
    with caplog.at_level("DEBUG", logger="ringattn"):
        assert kernels.select_kernel("auto", q, q, q, True).name == "cpu"
    assert "chose 'cpu'" in caplog.text
    assert (
        kernels.select_kernel("auto", q.long().double(), q.double(), q.double(), True).name == "cpu"
    )
    with pytest.raises(ValueError, match="flash needs CUDA tensors"):
        kernels.select_kernel("flash", q, q, q, False)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["math", "cpu"])
def test_simulate_ring_matches_reference(world, layout, causal, backend) -> None:
    g = torch.Generator().manual_seed(world)
    q = torch.randn(2, 4, 4 * world, 7, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 4 * world, 7, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 4 * world, 7, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 4, 4 * world, 7, generator=g, dtype=torch.float64)
    out, lse = reference.simulate_ring(
        q, k, v, world, causal=causal, scale=0.4, layout=layout, backend=backend
    )
    want_out, want_lse = reference.attention(q, k, v, causal=causal, scale=0.4, return_lse=True)
    got = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    want = (want_out, want_lse, *torch.autograd.grad(want_out, (q, k, v), dout))
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-10
