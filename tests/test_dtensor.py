"""attention_context_parallel (DTensor SDPA) and AttentionContextParallel (ParallelStyle)."""

from __future__ import annotations

import functools

import pytest

from distributed import run_ranks
from dtensor_cases import STYLE_CASES, run_dtensor_errors, run_dtensor_sdpa, run_style_checks

# float64 throughout: the ring and the reference differ only by summation order.
TOL = 1e-10


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def dtensor_sdpa(request) -> list[dict]:
    return run_ranks(run_dtensor_sdpa, request.param)


def test_dtensor_sdpa_matches_reference(dtensor_sdpa) -> None:
    names = set(dtensor_sdpa[0])
    assert len([n for n in names if n.startswith("1d-")]) == 8
    if len(dtensor_sdpa) == 4:
        assert {"2d-batch", "2d-heads", "2d-replicated", "2d-seq-outer"} <= names
    for rank, found in enumerate(dtensor_sdpa):
        for name, errors in found.items():
            assert set(errors) == {"out", "dq", "dk", "dv"}
            for field, err in errors.items():
                assert err <= TOL, f"rank {rank} {name} {field}: {err:.2e}"


@functools.cache
def errors_on(world: int) -> list[dict]:
    return run_ranks(run_dtensor_errors, world)


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def dtensor_errors(request) -> list[dict]:
    return errors_on(request.param)


DTENSOR_ERRORS = {
    "attn_mask": ("ValueError", "attn_mask is not supported"),
    "dropout": ("ValueError", "dropout_p must be 0.0"),
    "plain_key": ("TypeError", "query is a DTensor but key is a Tensor"),
    "plain_query": ("TypeError", "but query is a Tensor"),
    "placements": ("ValueError", "key has placements (Replicate(),)"),
    "partial": ("ValueError", "pending reduction"),
    "odd_length": ("ValueError", "needs a multiple of"),
    "body_raises": ("KeyError", "from the body"),
    "bad_layout": ("ValueError", "layout must be one of"),
    "bad_mesh": ("TypeError", "mesh must be None or a DeviceMesh"),
}


def test_dtensor_errors_raise_on_every_rank_and_leave_dispatch_as_it_was(dtensor_errors) -> None:
    for rank, found in enumerate(dtensor_errors):
        for name, (exc_type, text) in DTENSOR_ERRORS.items():
            assert found[name][0] == exc_type and text in found[name][1], (rank, found[name])
        for name in DTENSOR_ERRORS:
            assert found[f"{name}_state"], f"rank {rank}: dispatch state changed by {name}"


def test_plain_and_unsharded_sdpa_run_as_usual_inside(dtensor_errors) -> None:
    for found in dtensor_errors:
        assert found["plain"] <= TOL and found["replicated"] <= TOL


def test_mesh_argument_on_a_2d_mesh() -> None:
    for found in errors_on(4):
        assert found["other_mesh"][0] == "ValueError"
        assert "not the context's mesh" in found["other_mesh"][1]
        assert found["sub_mesh"] <= TOL
        assert found["seq_twice"][0] == "ValueError"
        assert "sharded over mesh dimensions [0, 1]" in found["seq_twice"][1]


@pytest.fixture(scope="module")
def style() -> list[dict]:
    return run_ranks(run_style_checks, 2)


@pytest.mark.parametrize("name", [*STYLE_CASES, "dtensor_inputs", "checkpointed"])
def test_parallel_style_matches_one_process(style, name: str) -> None:
    for rank, found in enumerate(style):
        errors = found[name]
        assert any(n.startswith("d_") and "weight" in n for n in errors)  # parameters checked
        for field, err in errors.items():
            assert err <= TOL, f"rank {rank} {name} {field}: {err:.2e}"


STYLE_ERRORS = {
    "key_padding_mask": ("ValueError", "key_padding_mask is not supported"),
    "need_weights": ("ValueError", "pass need_weights=False"),
    "need_weights_positional": ("ValueError", "pass need_weights=False"),
    "attn_mask": ("ValueError", "attn_mask is not supported"),
    "replicated_input": ("ValueError", "pass this rank's sequence shard"),
    "twice": ("ValueError", "parallelized already"),
    "bias_kv": ("ValueError", "add_bias_kv or add_zero_attn"),
    "mesh_2d": ("ValueError", "device_mesh must be 1-D"),
    "bad_layout": ("ValueError", "layout must be one of"),
}


def test_parallel_style_errors_and_clean_state(style) -> None:
    for rank, found in enumerate(style):
        for name, (exc_type, text) in STYLE_ERRORS.items():
            assert found[name][0] == exc_type and text in found[name][1], (rank, found[name])
            assert found[f"{name}_state"], f"rank {rank}: routing left on after {name}"
        assert found["after_errors"] <= TOL
        assert found["inference"] <= TOL
        assert found["outside"] <= TOL
