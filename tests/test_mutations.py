"""Deliberately wrong attention must fail the suite's checks; the library must pass them.

Twelve bugs (tests/mutants.py) are injected, one at a time, into the library on two Gloo
ranks, and each is run through the fuzz's per-case check and the strategy check in float32
and bfloat16, judged by tests/judge.py. Every mutant must fail in every one of those four
cells, and the unmutated library must pass all of them. One spawn, small shapes.
"""

from __future__ import annotations

import math

import pytest

from distributed import run_ranks
from mutants import DTYPES, MUTANTS, run_mutations

WORLD = 2
CELLS = [(check, dtype) for dtype in DTYPES for check in ("fuzz", "strategy")]


@pytest.fixture(scope="module")
def scores() -> list[dict]:
    return run_ranks(run_mutations, WORLD, list(MUTANTS))


def _table(per_case: dict[str, float]) -> str:
    return ", ".join(f"{case}: {s:.2f}" for case, s in per_case.items())


def test_the_unmutated_library_passes_every_check(scores) -> None:
    for rank, found in enumerate(scores):
        for cell in CELLS:
            worst = max(found["none"][cell].values())
            assert worst <= 1.0, f"rank {rank} {cell}: {_table(found['none'][cell])}"


@pytest.mark.parametrize("name", list(MUTANTS))
def test_every_mutant_is_caught_in_every_cell(scores, name: str) -> None:
    for cell in CELLS:
        # Caught when any rank's check of any case fails (score > 1; inf: it raised).
        worst = max(max(found[name][cell].values()) for found in scores)
        assert worst > 1.0, f"{name} passes {cell}: {_table(scores[0][name][cell])}"
        assert not math.isnan(worst)
