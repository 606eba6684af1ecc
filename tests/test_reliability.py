"""Ranks that disagree, raise or die: every rank fails with a clear error, nothing hangs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ringattn.reference import attention

from distributed import COLLECTIVE_TIMEOUT_S, run_ranks, run_ranks_with_faults
from fault_cases import (
    LONE_CHANGES,
    run_determinism,
    run_fault,
    run_lone_changes,
    run_repeated_calls,
)
from judge import errors, verdict

FIELD = {
    "length": "q.shape[2] (local queries)",
    "dtype": "dtype",
    "heads": "q.shape[1] (heads)",
    "kv_heads": "k.shape[1] (K/V heads)",
    "layout": "layout",
    "causal": "causal",
    "backend": "backend",
}


@pytest.mark.parametrize("entry", ["ring_attention", "allgather", "ulysses"])
def test_a_lone_change_after_agreed_calls_raises_on_every_rank(entry: str) -> None:
    """The default check mode compares every call: nothing waits for the group's timeout."""
    results = run_ranks(run_lone_changes, 3, entry)
    for rank, found in enumerate(results):
        assert set(found) == set(LONE_CHANGES)
        for name, (exc_type, message, seconds) in found.items():
            assert exc_type == "ValueError", (rank, name, message)
            assert f"every rank must call with the same {FIELD[name]}" in message, message
            assert "no rank started the ring" in message
            assert seconds < COLLECTIVE_TIMEOUT_S / 4, (rank, name, seconds)


TIMEOUT_S = 6


@pytest.mark.parametrize(
    ("fault", "where"),
    [
        ("raise_before_backward", "backward stage 1 of 3"),
        ("exit_mid_backward", "backward stage 1 of 3"),
        ("exit_during_backward", "backward stage"),
        ("exit_before_call", "cross-rank check"),
        ("ulysses_exit_mid_backward", "Ulysses' all-to-all"),
    ],
)
def test_a_rank_that_raises_or_dies_fails_the_others_in_bounded_time(fault, where) -> None:
    results = run_ranks_with_faults(run_fault, 3, fault, collective_timeout_s=TIMEOUT_S)
    *others, last = results
    assert "hung" not in last
    if fault == "raise_before_backward":
        assert "this rank fails before its backward" in last["error"]
    else:
        assert last["exit"] in (3, 4, 5)
    for rank, result in enumerate(others):
        assert "ok" in result, (rank, result)  # the worker returned: teardown was clean
        exc_type, message = result["ok"]["outcome"]
        assert exc_type == "RingCommunicationError", (rank, message)
        assert where in message, message
        assert "Another rank probably raised, died" in message or "could not reach" in message
        # Within the group's timeout (plus start-up), not a hang.
        assert result["ok"]["seconds"] < 3 * TIMEOUT_S, (rank, result["ok"]["seconds"])


def test_repeated_calls_leave_memory_flat() -> None:
    """1000 forward+backward calls per entry after warm-up: resident memory stays put."""
    for rank, found in enumerate(run_ranks(run_repeated_calls, 2, 1000)):
        for name, (before, after) in found.items():
            assert after - before < 4.0, f"rank {rank} {name}: {before:.1f} -> {after:.1f} MiB"


@pytest.fixture(scope="module")
def determinism() -> dict[int, list[dict]]:
    return {world: run_ranks(run_determinism, world) for world in (2, 4)}


def test_the_same_inputs_give_bitwise_identical_results(determinism) -> None:
    # Twice in one process, and in another launch of the same world size.
    again = run_ranks(run_determinism, 2)
    for found, repeat in zip(determinism[2], again):
        for name, entry in found.items():
            assert entry["same_twice"], name
            for a, b in zip(entry["result"], repeat[name]["result"]):
                assert torch.equal(a, b), name
    assert all(e["same_twice"] for found in determinism[4] for e in found.values())


def test_other_world_sizes_agree_to_rounding(determinism) -> None:
    """Not bitwise: more ranks merge more partial results (docs/errors.md says so). Each
    world size's result passes tests/judge.py against float64 attention."""
    g = torch.Generator().manual_seed(11)
    full = [torch.randn(1, 4, 64, 16, generator=g) for _ in range(4)]  # as run_determinism
    for name in determinism[2][0]:
        dtype = getattr(torch, name.rsplit(".", 1)[-1])
        rounded = [x.to(dtype).double().requires_grad_() for x in full[:3]]
        want = attention(*rounded, causal=True)
        want.backward(full[3].to(dtype).double())
        same_in = [x.to(dtype, copy=True).requires_grad_() for x in full[:3]]
        same = F.scaled_dot_product_attention(*same_in, is_causal=True)
        same.backward(full[3].to(dtype))
        wants = [want.detach(), *(x.grad for x in rounded)]
        sames = [same.detach(), *(x.grad for x in same_in)]
        for world in (2, 4):
            got = determinism[world][0][name]["result"]
            for field, a, w, sd in zip(("out", "dq", "dk", "dv"), got, wants, sames):
                v = verdict(field, dtype, errors(a, w), errors(sd, w))
                assert v.ok, f"{name} on {world} ranks: {v}"
