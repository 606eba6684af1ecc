"""Symmetric-memory ring shifts: which calls take them, and how a shift packs its tensors
(CPU, single process; the shifts themselves run on GPUs, where tests/test_gpu.py checks
replayed and eager results against float64, with ranks that replay beside eager ones)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ringattn import api, symmetric


def test_a_shift_packs_its_tensors_aligned_and_in_order() -> None:
    tensors = [
        torch.randn(3, 5, dtype=torch.float32),
        torch.randn(7, dtype=torch.bfloat16),
        torch.zeros(0, dtype=torch.float64),
        torch.randn(2, 2, dtype=torch.float64),
    ]
    at = symmetric._offsets([t.numel() * t.element_size() for t in tensors])
    assert at[0] == 0 and all(a % symmetric._ALIGN == 0 for a in at)
    for t, start, end in zip(tensors, at, at[1:]):
        assert end - start >= t.numel() * t.element_size()
    buffer = torch.zeros(at[-1], dtype=torch.uint8)
    views = symmetric._views(buffer, tensors)
    torch._foreach_copy_(views, tensors)
    again = symmetric._views(buffer.clone(), tensors)  # another rank reads the same layout
    assert all(torch.equal(a, b) for a, b in zip(again, tensors))
    assert [v.dtype for v in views] == [t.dtype for t in tensors]


class _Cuda:
    """Enough of a CUDA tensor for the choice of transport."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, numel: int, element_size: int = 2) -> None:
        self._numel, self._size = numel, element_size

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return self._size


def test_calls_take_symmetric_shifts_by_signature_where_they_fit(monkeypatch) -> None:
    """Every rank decides alike from what the ranks agreed on: the sizes (K/V and their
    float32 gradients must fit the staging buffer), then the group (one host, symmetric
    memory usable; symmetric_ring_for agrees on that collectively)."""
    made = []
    ring = SimpleNamespace(capturable=True)

    def ring_for(group, device):
        made.append((group, device))
        return ring if group == "one host" else None

    monkeypatch.setattr(api, "symmetric_ring_for", ring_for)
    monkeypatch.setattr(api, "_TRANSPORTED", {})
    call = api.RingCall(ring=SimpleNamespace(group="one host"), plans=(), kernel=None, scale=1.0)
    # K/V of 4K tokens on 2 ranks (8 heads x 128, bf16): 8 MiB, 16 MiB as float32 gradients.
    small = _Cuda(2048 * 8 * 128)
    # Inside a CUDA-graph capture the buffers are not set up (it allocates): NCCL for now.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert api._with_transport(("4K",), small, small, small, call) is call and made == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    found = api._with_transport(("4K",), small, small, small, call)
    assert found.ring is ring and found.plans == call.plans
    assert api._with_transport(("4K",), small, small, small, call) is found  # cached
    assert made == [("one host", torch.device("cuda", 0))]
    # 64K tokens on 2 ranks: 128 MiB of float32 gradients do not fit; NCCL shifts.
    large = _Cuda(32768 * 8 * 128)
    assert api._with_transport(("64K",), large, large, large, call) is call
    several_hosts = api.RingCall(
        ring=SimpleNamespace(group="hosts"), plans=(), kernel=None, scale=1.0
    )
    assert api._with_transport(("4K", "hosts"), small, small, small, several_hosts) is several_hosts
    cpu = SimpleNamespace(is_cuda=False)
    assert api._with_transport(("cpu",), cpu, small, small, call) is call
    single = api.RingCall(ring=None, plans=(), kernel=None, scale=1.0)
    assert api._with_transport(("one",), small, small, small, single) is single


def _agree(rank: int, world: int, disabled_on: int | None) -> bool:
    import os

    import torch.distributed as dist

    if rank == disabled_on:
        os.environ["RINGATTN_SYMMETRIC_MEMORY"] = "0"
    symmetric._RINGS.clear()
    found = symmetric.symmetric_ring_for(dist.group.WORLD, torch.device("cuda", 0))
    # Asked again: the agreed answer is kept, nothing is exchanged again.
    return (
        found is None
        and symmetric.symmetric_ring_for(dist.group.WORLD, torch.device("cuda", 0)) is None
    )


def test_ranks_agree_on_having_no_symmetric_memory() -> None:
    """A rank that turns symmetric memory off, or one that cannot allocate it (here: no
    CUDA at all), turns it off on every rank, without hanging the others in a
    rendezvous."""
    from distributed import run_ranks

    for disabled_on in (0, None):
        assert run_ranks(_agree, 2, disabled_on) == [True, True]
