"""KV-cache inference: prefill and decode on 1-4 Gloo ranks against float64 attention."""

from __future__ import annotations

import dataclasses

import pytest

from inference_cases import all_cases, hf_generate
from ringattn.inference import choose_prefill_method
from ringattn.planner import load_calibration

from distributed import run_example_both_ways, run_ranks

F64_TOL = 1e-12  # float64 against float64 attention, relative to outputs of size ~1
F32_TOL = 2e-6


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prefill_and_decode_match_attention(world: int) -> None:
    """Every call of multi-turn scripts (prefill, decode of 1 and several tokens, prefill
    again) against causal float64 attention over all tokens so far: GQA, MQA, batch 2,
    pass-KV, pass-Q and auto, math and cpu kernels, the static decode; then the cache's
    balance, and every error raised on every rank."""
    results = run_ranks(all_cases, world)
    for rank, found in enumerate(results):
        for name, errors in found["correctness"].items():
            tol = F32_TOL if name.startswith("float32") else F64_TOL
            assert len(errors) >= 3 and max(errors) <= tol, (rank, name, errors)
        balance = found["balance"]
        lengths = balance["lengths"]
        assert lengths[rank] == balance["length"]
        assert max(lengths) - min(lengths) <= 1, lengths  # within one token per rank
        assert sum(lengths) == balance["total"] == 2 * world + 101
    # Every position is stored exactly once, on the rank the placement rule names.
    positions = sorted(p for found in results for p in found["balance"]["positions"])
    assert positions == list(range(2 * world + 101))
    memory = {found["balance"]["memory"] for found in results}
    assert len(memory) == 1, memory  # same allocation on every rank
    if world > 1:
        _check_errors(results, world)
    if world == 2:
        single = hf_generate(0, 2, parallel=False)
        for rank, found in enumerate(results):
            hf = found["hf"]
            assert hf["first"] == single["first"], (rank, hf["first"], single["first"])
            assert hf["second"] == single["second"], (rank, hf["second"], single["second"])
            # Both turns were prefilled sharded: each rank holds half of 16 + 5 + 8 + 5 tokens.
            assert hf["lengths"] == [17, 17], hf["lengths"]
            zigzag = [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]][rank]
            assert hf["positions"][:8] == zigzag, hf["positions"]
            second_turn = [[21, 22, 27, 28], [23, 24, 25, 26]][rank]  # 8 new tokens from 21
            assert second_turn[0] in hf["positions"] and second_turn[-1] in hf["positions"]


def _check_errors(results: list[dict], world: int) -> None:
    expected = {
        "differing_q": ("ValueError", "same checksum of q"),
        "differing_shapes": ("ValueError", "same q.shape[2] (tokens)"),
        "dtype": ("TypeError", "the cache holds torch.float64, got torch.float32"),
        "kv_heads": ("ValueError", "the cache holds batch 1, 2 K/V heads"),
        "other_group": ("ValueError", "the cache was made for another group"),
        "other_cache": ("ValueError", "every rank must pass its shard of the same cache"),
        "bad_method": ("ValueError", "method must be one of"),
        "odd_prefill": ("ValueError", "q.shape[2] must be even"),
        "bad_check": ("ValueError", "check must be one of"),
        "bad_kernel": ("ValueError", "decode_kernel must be one of"),
        "flash_on_cpu": ("ValueError", "decode_kernel='flash' runs on CUDA bf16/fp16 inputs"),
    }
    for rank, found in enumerate(results):
        errors = found["errors"]
        for name, (kind, text) in expected.items():
            assert errors[name][0] == kind and text in errors[name][1], (rank, name, errors[name])
        # The rank with the bad argument names it; the others name that rank.
        if rank == 0:
            assert errors["not_a_cache"][0] == "TypeError", errors["not_a_cache"]
        else:
            assert errors["not_a_cache"] == (
                "ValueError",
                "decode: rank 0 rejected its `cache` argument (its own error says why); no rank "
                "moved any K/V",
            )
        assert errors["state"] == (4, 4 * world)  # nothing stored by the failed calls
        assert errors["after"] <= F64_TOL
        if rank:
            assert found["non_member"][0] == "ValueError", found["non_member"]
            assert "not a member" in found["non_member"][1]


def test_selector_follows_the_paper_rule() -> None:
    """pass-Q for a small share of new tokens over a long cache (GQA 32/8, 2x H200
    calibration), pass-KV for a large share; each where the model says it exposes less."""
    cal = load_calibration(device_type="cuda")
    shape = {"world": 2, "heads": 32, "kv_heads": 8, "head_dim": 128}
    cached = 128 * 1024
    picks = {}
    for share in (0.001, 0.01, 0.05, 0.2, 1.0):
        new = max(4, round(cached * share / 4) * 4)
        plan = choose_prefill_method(new_tokens=new, cached_tokens=cached, calibration=cal,
                                     **shape)  # fmt: skip
        faster = "pass_q" if plan.pass_q_exposed_ms < plan.pass_kv_exposed_ms else "pass_kv"
        assert plan.method == faster, plan
        picks[share] = plan.method
    assert picks[0.001] == "pass_q" and picks[1.0] == "pass_kv", picks
    # Bytes moved: pass-Q sends less than pass-KV exactly when T/(T+P) < ~2 H_kv / H.
    few = choose_prefill_method(new_tokens=1024, cached_tokens=cached, calibration=cal, **shape)
    assert few.pass_q_bytes < few.pass_kv_bytes
    many = choose_prefill_method(new_tokens=cached, cached_tokens=cached, calibration=cal, **shape)
    assert many.pass_q_bytes > many.pass_kv_bytes
    # An infinitely fast link hides both: pass-KV, as in the paper.
    fast = dataclasses.replace(cal, p2p_gbs_intra=1e12, collective_gbs_intra=1e12, latency_us=0.0)
    plan = choose_prefill_method(new_tokens=256, cached_tokens=cached, calibration=fast, **shape)
    assert plan.method == "pass_kv" and plan.pass_kv_exposed_ms == 0.0
    # Nothing cached, or one rank: nothing to choose.
    assert choose_prefill_method(new_tokens=256, cached_tokens=0, calibration=cal,
                                 **shape).method == "pass_kv"  # fmt: skip


def test_example_generates_like_one_process(tmp_path) -> None:
    """examples/hf_generate_long.py: greedy tokens on 2 ranks (sharded prefill, decode over
    the sharded cache) equal one process with transformers' own cache."""
    model = ["--prompt-len", "64", "--new-tokens", "5", "--hidden", "64", "--layers", "2",
             "--heads", "4", "--kv-heads", "2", "--vocab", "100", "--batch", "2"]  # fmt: skip
    found = run_example_both_ways("hf_generate_long.py", model, tmp_path)
    assert len(found["sdpa"]["tokens"][0]) == 5
    assert found["ringattn"]["tokens"] == found["sdpa"]["tokens"], found
    # The 64-token prompt was prefilled sharded (32 per rank), then 4 decode tokens stored.
    assert found["ringattn"]["cache_tokens_per_rank"] == [34, 34]


@pytest.mark.parametrize("kernel", ["plain", "flex"])
def test_decode_kernels_read_only_the_used_slots(kernel: str) -> None:
    """The split-K kernels of the device-length decode against float64 attention over the
    used slots: grouped heads, batch 2, one and three query tokens, lengths inside and at
    the end of a 128-slot block, the whole capacity, and none; the unused slots hold large
    values that would change the result if any leaked in."""
    import torch

    from ringattn.decode_kernels import cache_attention

    g = torch.Generator().manual_seed(5)
    b, h, hkv, d, capacity = 2, 6, 2, 8, 384
    k = torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, capacity, d, generator=g, dtype=torch.float64)
    for used in (1, 127, 128, 200, capacity):
        kb, vb = k.clone(), v.clone()
        kb[:, :, used:] = 50.0  # would dominate every softmax row
        vb[:, :, used:] = 1e3
        for t in (1, 3):
            q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
            length = torch.tensor([used])
            out, lse = cache_attention(q, kb, vb, length, 0.3, kernel)
            ke = k[:, :, :used].repeat_interleave(h // hkv, dim=1)
            ve = v[:, :, :used].repeat_interleave(h // hkv, dim=1)
            s = q @ ke.transpose(-1, -2) * 0.3
            want = torch.softmax(s, dim=-1) @ ve
            assert out.dtype == lse.dtype == torch.float64
            assert float((out - want).abs().max()) <= F64_TOL, (kernel, used, t)
            assert float((lse - torch.logsumexp(s, dim=-1)).abs().max()) <= F64_TOL
    # Nothing used: the rows saw nothing (lse -inf), and add nothing when merged.
    q = torch.randn(b, h, 1, d, generator=g, dtype=torch.float64)
    out, lse = cache_attention(q, k, v, torch.tensor([0]), 0.3, kernel)
    assert bool(torch.isneginf(lse).all()) and not bool(out.isnan().any())
