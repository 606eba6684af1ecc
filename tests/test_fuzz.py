"""Fuzzing every public entry point on 1-4 ranks against float64 attention (Hypothesis)."""

from __future__ import annotations

import pytest

from distributed import run_ranks
from fuzz_cases import ENTRIES, EXPLICIT, failures, run_fuzz

EXAMPLES = 60  # per world size; every rank runs the same derandomized examples
WORLDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def fuzzed() -> dict[int, list[list[dict]]]:
    return {world: run_ranks(run_fuzz, world, EXAMPLES) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
def test_every_fuzz_case_matches_float64_attention(fuzzed, world: int) -> None:
    for rank, found in enumerate(fuzzed[world]):
        assert len(found) == EXAMPLES + len(EXPLICIT), (rank, len(found))
        bad = failures(found)
        assert not bad, f"rank {rank}: {len(bad)} failing cases, first: {bad[:3]}"


def test_the_search_covers_what_it_is_for(fuzzed) -> None:
    cases = [r["case"] for world in WORLDS for r in fuzzed[world][0]]
    assert {c["entry"] for c in cases} == set(ENTRIES) | {"attention:hybrid"}
    assert {c["special"] for c in cases} == {"none", "nan_q", "inf_k"}
    assert {c["dtype"] for c in cases} == {"float64", "float32", "bfloat16"}
    assert {c["layout"] for c in cases} == {"zigzag", "contiguous"}
    assert {c["causal"] for c in cases} == {True, False}
    assert any(c["magnitude"] > 1 for c in cases)
    assert any(c["chunk"] == 1 and c["layout"] == "contiguous" for c in cases)  # 1 token/rank
