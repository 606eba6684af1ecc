"""Ranks that disagree, raise or die: every rank fails with a clear error, nothing hangs."""

from __future__ import annotations

import pytest

from distributed import COLLECTIVE_TIMEOUT_S, run_ranks, run_ranks_with_faults
from fault_cases import LONE_CHANGES, run_fault, run_lone_changes

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
        ("exit_before_call", "cross-rank check"),
    ],
)
def test_a_rank_that_raises_or_dies_fails_the_others_in_bounded_time(fault, where) -> None:
    results = run_ranks_with_faults(run_fault, 3, fault, collective_timeout_s=TIMEOUT_S)
    *others, last = results
    assert "hung" not in last
    if fault == "raise_before_backward":
        assert "this rank fails before its backward" in last["error"]
    else:
        assert last["exit"] in (3, 4)
    for rank, result in enumerate(others):
        assert "ok" in result, (rank, result)  # the worker returned: teardown was clean
        exc_type, message = result["ok"]["outcome"]
        assert exc_type == "RingCommunicationError", (rank, message)
        assert where in message, message
        assert "Another rank probably raised, died" in message or "could not reach" in message
        # Within the group's timeout (plus start-up), not a hang.
        assert result["ok"]["seconds"] < 3 * TIMEOUT_S, (rank, result["ok"]["seconds"])
