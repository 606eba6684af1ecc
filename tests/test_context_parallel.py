"""A model written for one device trains context-parallel through each entry point."""

from __future__ import annotations

import pytest
import torch

import ringattn

from cases import run_routing_checks
from distributed import run_ranks
from tiny_lm import train
from train_tiny_lm import ENTRIES

SEQ, STEPS = 48, 5


@pytest.fixture(scope="module")
def single() -> dict:
    return train(0, 1, SEQ, STEPS, ("single",))["single"]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def parallel(request) -> list[dict]:
    return run_ranks(train, request.param, SEQ, STEPS, ENTRIES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_tiny_lm_matches_one_process(single, parallel, entry: str) -> None:
    """Losses at every step and final parameters within 1e-5 relative, on every rank."""
    want = torch.tensor(single["losses"], dtype=torch.float64)
    assert want[-1] < want[0] - 0.1  # it did learn something
    for rank, found in enumerate(parallel):
        got = found[entry]
        assert got["batch_unchanged"], f"rank {rank}: the batch tensors were not restored"
        losses = torch.tensor(got["losses"], dtype=torch.float64)
        assert torch.all((losses - want).abs() <= 1e-5 * want.abs()), (rank, losses, want)
        assert got["params"].keys() == single["params"].keys()
        for name, p in got["params"].items():
            ref = single["params"][name]
            err = float((p - ref).abs().max() / ref.abs().max())
            assert err <= 1e-5, f"rank {rank} {name}: {err:.2e}"


def test_rejects_what_cannot_be_sharded() -> None:
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match="not initialised"):
        with ringattn.context_parallel(None, [q], [2]):
            pass


@pytest.fixture(scope="module")
def routing() -> list[dict]:
    return run_ranks(run_routing_checks, 2)


def test_unsupported_sdpa_arguments_raise_and_buffers_come_back(routing) -> None:
    expected = {
        "attn_mask": ("ValueError", "attn_mask is not supported"),
        "dropout": ("ValueError", "dropout_p must be 0.0"),
        "gqa_flag": ("ValueError", "pass enable_gqa=True"),
        "mha_weights": ("ValueError", "need_weights=True (its default)"),
        "body_raises": ("KeyError", "from the body"),
    }
    for found in routing:
        for name, (exc_type, text) in expected.items():
            assert found[name][0] == exc_type and text in found[name][1], found[name]
            assert found[f"{name}_sharded_len"] == 8  # 16 tokens over 2 ranks
            assert found[f"{name}_restored"]


def test_full_and_causal_attention_match_the_reference_under_the_default_layout(routing) -> None:
    for found in routing:
        assert found["numerics_causal=False"] <= 1e-10
        assert found["numerics_causal=True"] <= 1e-10


def test_indivisible_buffers_are_rejected_untouched_and_unshard_restores_order(routing) -> None:
    for found in routing:
        assert "must be divisible by 4" in found["odd"]
        assert found["odd_unchanged"]
        assert found["unsharded"]
