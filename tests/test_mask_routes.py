"""context_parallel, the DTensor route and the ParallelStyle with packed documents, sliding
windows and mask functions: float64 against a dense-mask reference on one process."""

from __future__ import annotations

import functools

import pytest

from mask_route_cases import CASES, reference, run_mask_routes

from distributed import run_ranks

TOL = 1e-10


RANDOM = 12  # random cases per world size, in the same spawn


@functools.cache
def routes_on(world: int) -> list[dict]:
    return run_ranks(run_mask_routes, world, RANDOM, 100 + world)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_route_with_masks_matches_reference(world: int, name: str) -> None:
    want = reference(CASES[name])
    for rank, found in enumerate(routes_on(world)):
        got = found[name]
        assert got.keys() == want.keys()
        for field, value in got.items():
            err = float((value - want[field]).abs().max() / want[field].abs().max())
            assert err <= TOL, f"rank {rank} {field}: {err:.2e}"


@pytest.mark.parametrize("world", [2, 3])
def test_random_documents_and_windows_on_every_route(world: int) -> None:
    """Random document mixes, windows and mask functions through the three routes."""
    for rank, found in enumerate(routes_on(world)):
        assert len(found["random"]) == RANDOM
        for spec, errors in found["random"]:
            bad = {k: e for k, e in errors.items() if not e <= TOL}
            assert not bad, f"rank {rank} {spec}: {bad}"
    specs = [spec for spec, _ in routes_on(world)[0]["random"]]
    assert {s.entry for s in specs} == {"context_parallel", "dtensor", "style"}
    assert any(s.window is not None for s in specs) and any(s.causal for s in specs)


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
