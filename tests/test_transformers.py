"""Hugging Face transformers: a tiny Llama (GQA) context-parallel matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import run_ranks
from hf_cases import loss_and_grads, run_errors


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


def test_what_cannot_run_context_parallel_raises() -> None:
    expected = {
        "sliding_window": "sliding-window attention (window 8)",
        "padding": "padded batches are not supported",
        "unknown_key": "does not know how to shard ['pixel_values']",
        "output_attentions": "output_attentions is not supported",
    }
    for found in run_ranks(run_errors, 2):
        for name, text in expected.items():
            assert found[name][0] == "ValueError" and text in found[name][1], found[name]


def test_example_trains_like_one_process(tmp_path) -> None:
    """examples/hf_long_context.py: 3 AdamW steps on 2 ranks give the one-process losses."""
    example = Path(__file__).parents[1] / "examples" / "hf_long_context.py"
    model = ["--seq-len", "256", "--steps", "3", "--hidden", "64", "--layers", "2",
             "--heads", "4", "--kv-heads", "2", "--vocab", "100"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    runs = {
        "sdpa": [sys.executable, str(example), "--attention", "sdpa"],
        "ringattn": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(example),
        ],  # fmt: skip
    }
    losses = {}
    for name, cmd in runs.items():
        out = tmp_path / f"{name}.json"
        done = subprocess.run([*cmd, *model, "--json", str(out)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        losses[name] = [step["loss"] for step in json.loads(out.read_text())["steps"]]
    assert len(losses["ringattn"]) == 3
    for got, want in zip(losses["ringattn"], losses["sdpa"], strict=True):
        assert abs(got - want) <= 1e-5 * abs(want), losses
    assert losses["sdpa"][2] < losses["sdpa"][0]  # it trains
