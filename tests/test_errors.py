"""Bad input raises a clear error on every rank before any K/V moves, and nothing hangs."""

from __future__ import annotations

import pytest
import torch

import ringattn

from cases import SCENARIOS, run_check_modes, run_error_scenarios
from distributed import run_ranks

WORLD = 3


@pytest.fixture(scope="module")
def outcomes() -> list[dict]:
    return run_ranks(run_error_scenarios, WORLD, list(SCENARIOS))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_raises_on_every_rank_before_the_ring(outcomes, name: str) -> None:
    exc_type, text = SCENARIOS[name]
    for rank, per_rank in enumerate(outcomes):
        got_type, message, shifts = per_rank[name]
        assert shifts == 0, f"rank {rank} started {shifts} ring transfers"
        assert got_type in (exc_type, "ValueError"), f"rank {rank}: {got_type}: {message}"
        assert message.startswith("ring_attention:"), message
    # The rank(s) at fault name the argument and say what was expected.
    messages = [per_rank[name][1] for per_rank in outcomes]
    assert any(text in m for m in messages), messages
    faulty = [per_rank[name] for per_rank in outcomes if text in per_rank[name][1]]
    assert all(t == exc_type for t, _, _ in faulty), faulty


def test_group_still_works_after_errors(outcomes) -> None:
    for per_rank in outcomes:
        assert per_rank["after_errors_max_err"] < 1e-5
        assert per_rank["after_errors_shifts"] == WORLD - 1  # only the valid call's ring


def test_other_ranks_name_the_rank_at_fault(outcomes) -> None:
    messages = [per_rank["one_rank_gqa"][1] for per_rank in outcomes]
    assert "multiple of k's heads" in messages[-1]
    for message in messages[:-1]:
        assert f"rank {WORLD - 1} rejected its `k` argument" in message


def test_no_process_group() -> None:
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        ringattn.ring_attention(q, q, q)
    with pytest.raises(ValueError, match="not initialised"):
        ringattn.shard(q)


@pytest.fixture(scope="module")
def check_modes() -> list[dict]:
    return run_ranks(run_check_modes, 2)


def test_once_mode_checks_each_new_signature_once(check_modes) -> None:
    for found in check_modes:
        assert found["once_repeated"] == 1  # three identical calls, one check
        assert found["once_all_changed"] == 2  # every rank changed shape: checked again
        assert found["once_result_err"] < 1e-5


def test_always_mode_catches_a_lone_change_after_agreed_calls(check_modes) -> None:
    for found in check_modes:
        assert found["always_calls"] == 2
        exc_type, message = found["always_lone_change"]
        assert exc_type == "ValueError", message
        assert "same q.shape[2] (local queries)" in message


def test_never_mode_skips_the_check(check_modes) -> None:
    assert all(found["never_calls"] == 0 for found in check_modes)


def test_check_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        ringattn.set_cross_rank_check("sometimes")  # type: ignore[arg-type]


def test_cuda_graphs_leave_cpu_calls_eager(check_modes) -> None:
    assert all(found["graphs_cpu_equal"] for found in check_modes)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ringattn.set_cuda_graphs("yes")  # type: ignore[arg-type]
