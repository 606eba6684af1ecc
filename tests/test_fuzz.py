"""Fuzzing every public entry point on 1-4 ranks against float64 attention (Hypothesis)."""

from __future__ import annotations

import pytest

from distributed import run_ranks
from fuzz_cases import ENTRIES, failures, run_fuzz

EXAMPLES = 60  # per world size; every rank runs the same derandomized examples


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_fuzz_every_entry_point(world: int) -> None:
    results = run_ranks(run_fuzz, world, EXAMPLES)
    for rank, found in enumerate(results):
        assert len(found) == EXAMPLES, (rank, len(found))
        bad = failures(found)
        assert not bad, f"rank {rank}: {len(bad)} failing cases, first: {bad[:3]}"
    cases = [r["case"] for r in results[0]]
    # The search covered what it is for.
    assert {c["entry"] for c in cases} == set(ENTRIES)
    assert {c["special"] for c in cases} == {"none", "nan_q", "inf_k"}
    assert {c["dtype"] for c in cases} == {"float64", "float32", "bfloat16"}
    assert any(c["magnitude"] > 1 for c in cases)
    assert {c["causal"] for c in cases} == {True, False}
