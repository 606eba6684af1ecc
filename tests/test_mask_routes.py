"""context_parallel, the DTensor route and the ParallelStyle with packed documents, sliding
windows and mask functions: float64 against a dense-mask reference on one process."""

from __future__ import annotations

import functools

import pytest

from mask_route_cases import CASES, reference, run_mask_routes

from distributed import run_ranks

TOL = 1e-10


@functools.cache
def routes_on(world: int) -> list[dict]:
    return run_ranks(run_mask_routes, world)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_route_with_masks_matches_reference(world: int, name: str) -> None:
    want = reference(name)
    for rank, found in enumerate(routes_on(world)):
        got = found[name]
        assert got.keys() == want.keys()
        for field, value in got.items():
            err = float((value - want[field]).abs().max() / want[field].abs().max())
            assert err <= TOL, f"rank {rank} {field}: {err:.2e}"


def test_route_errors() -> None:
    expected = {
        "layout_and_documents": ("ValueError", "cannot be combined with documents"),
        "documents_type": ("TypeError", "documents must be a ringattn.Documents"),
        "buffer_length": ("ValueError", "must be the documents' sequence length 24"),
        "window_type": ("TypeError", "window must be a (left, right) tuple"),
        "negative_window": ("ValueError", "window sizes must be >= 0 or -1"),
        "style_layout": ("ValueError", "cannot be combined with documents"),
        "replicated_sequence": ("ValueError", "apply to a sequence sharded over the mesh"),
    }
    for found in routes_on(2):
        errors = found["errors"]
        for name, (kind, text) in expected.items():
            assert errors[name][0] == kind and text in errors[name][1], (name, errors[name])
        assert errors["buffer_kept"]
