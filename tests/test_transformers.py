"""Hugging Face transformers: a tiny Llama (GQA) context-parallel matches one process."""

from __future__ import annotations

import functools

import pytest

from distributed import run_example_both_ways, run_ranks
from hf_cases import loss_and_grads, one_process, run_masked_batches

MASKED_CASES = [
    "packed-llama",
    "packed-mistral",
    "padded-llama",
    "window-mistral",
    "window-qwen2",
    "contiguous-mistral",
    "random0-llama",  # random packed mixes (hf_cases.RANDOM_PACKED)
    "random1-llama",
    "random2-llama",
]


@pytest.mark.parametrize(
    ("family", "world", "implementation"),
    [
        ("llama", 2, "ringattn"),
        ("llama", 4, "ringattn"),
        ("llama", 2, "set:ringattn"),
        ("mistral", 2, "ringattn"),
        ("qwen2", 4, "ringattn"),
    ],
)
def test_loss_and_gradients_match_one_process(family: str, world: int, implementation) -> None:
    """Against the same model on one process with its default attention, float32."""
    single = loss_and_grads(0, 1, "default", family)
    for rank, found in enumerate(run_ranks(loss_and_grads, world, implementation, family)):
        assert abs(found["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"]), rank
        assert found["grads"].keys() == single["grads"].keys()
        for name, grad in found["grads"].items():
            want = single["grads"][name]
            err = float((grad - want).abs().max() / want.abs().max())
            assert err <= 1e-5, f"rank {rank} {name}: {err:.2e}"


@functools.cache
def masked_on(world: int) -> list[dict]:
    """Every masked case, and what raises, on one spawn per world size."""
    return run_ranks(run_masked_batches, world)


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def masked_batches(request) -> tuple[int, list[dict]]:
    return request.param, masked_on(request.param)


@pytest.mark.parametrize("name", MASKED_CASES)
def test_masked_batches_match_one_process(masked_batches, name: str) -> None:
    """float64: packed rows give, for every document, the model on that document alone;
    a padded batch and windowed models (Mistral's windows, Qwen2's alternating layers)
    give the model's own attention on one process. Logits, loss and every gradient."""
    world, ranks = masked_batches
    want = one_process(name, world)
    keep = slice(None)
    if name.startswith("padded"):
        from hf_cases import _padded

        keep = _padded()["attention_mask"].bool()  # padding's logits are no one's output
    for rank, found in enumerate(ranks):
        got = found[name]
        err = float((got["logits"][keep] - want["logits"][keep]).abs().max())
        assert err <= 1e-9 * float(want["logits"].abs().max()), f"rank {rank} logits {err:.2e}"
        assert abs(got["loss"] - want["loss"]) <= 1e-10 * abs(want["loss"]), (rank, got["loss"])
        assert got["grads"].keys() == want["grads"].keys()
        for param, grad in got["grads"].items():
            ref = want["grads"][param]
            err = float((grad - ref).abs().max() / ref.abs().max())
            assert err <= 1e-9, f"rank {rank} {param}: {err:.2e}"


def test_what_cannot_run_context_parallel_raises() -> None:
    expected = {
        "packed_without_documents": ("ValueError", "position_ids restart at 0 inside a row"),
        "mask_given_to_model": ("ValueError", "pass the full batch through shard_batch"),
        "documents_type": ("TypeError", "ringattn_documents must be a ringattn.Documents"),
        "unknown_key": ("ValueError", "does not know how to shard ['pixel_values']"),
        "output_attentions": ("ValueError", "output_attentions is not supported"),
    }
    for ranks in masked_on(2):
        found = ranks["errors"]
        for name, (kind, text) in expected.items():
            assert found[name][0] == kind and text in found[name][1], (name, found[name])


def test_example_trains_like_one_process(tmp_path) -> None:
    """examples/hf_long_context.py: 3 AdamW steps on 2 ranks give the one-process losses."""
    model = ["--seq-len", "256", "--steps", "3", "--hidden", "64", "--layers", "2",
             "--heads", "4", "--kv-heads", "2", "--vocab", "100"]  # fmt: skip
    runs = run_example_both_ways("hf_long_context.py", model, tmp_path)
    losses = {name: [step["loss"] for step in run["steps"]] for name, run in runs.items()}
    assert len(losses["ringattn"]) == 3
    for got, want in zip(losses["ringattn"], losses["sdpa"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), losses
    assert losses["sdpa"][2] < losses["sdpa"][0]  # it trains
