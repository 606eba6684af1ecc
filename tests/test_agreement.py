"""Every rank sees every rank's description, call after call, through shared memory on one
host and through the Gloo all-gather; a difference raises on every rank (3 Gloo ranks)."""

from __future__ import annotations

import pytest

from agreement_cases import run_exchanges
from distributed import run_ranks


@pytest.fixture(scope="module")
def exchanged() -> list[dict]:
    return run_ranks(run_exchanges, 3)


@pytest.mark.parametrize("path", ["board", "gather"])
def test_every_rank_sees_every_description(exchanged, path: str) -> None:
    for found in exchanged:
        assert found[f"{path}_uses_board"] == (path == "board")
        assert found[f"{path}_rows_ok"]


@pytest.mark.parametrize("path", ["board", "gather"])
def test_a_difference_raises_on_every_rank(exchanged, path: str) -> None:
    for rank, found in enumerate(exchanged):
        message = found[f"{path}_mismatch"]
        assert "every rank must call with the same q.shape[2] (local queries)" in message
        assert "rank 0: 8, rank 1: 6, rank 2: 6" in message and f"this is rank {rank}" in message
