"""Every rank's output, lse and gradients against naive float64 attention on the full sequence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ringattn.reference import attention

from cases import Case, bf16_cases, case_dicts, random_cases, run_cases
from distributed import run_ranks
from judge import errors, verdict

WORLDS = (1, 2, 3, 4, 8)
CASES = {w: random_cases(w, count=20, seed=w) for w in WORLDS}
BF16 = {w: bf16_cases(w) for w in (2, 4)}


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    """Run every case, one spawn of each world size, and key rank 0's results by case id."""
    found = {}
    for world in WORLDS:
        cases = CASES[world] + BF16.get(world, [])
        per_rank = run_ranks(run_cases, world, case_dicts(cases))
        for case, result in zip(cases, per_rank[0]):
            found[case.id] = result
    return found


def reference(case: Case) -> dict[str, torch.Tensor]:
    q, k, v, dout = (x.requires_grad_(x is not None) for x in case.full_inputs())
    out, lse = attention(q, k, v, causal=case.causal, scale=case.scale, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.detach())
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def one_process_sdpa(case: Case) -> dict[str, torch.Tensor]:
    """PyTorch's SDPA in the case's dtype on the same inputs: the error to match."""
    dtype = getattr(torch, case.dtype)
    q, k, v, dout = (x.to(dtype).requires_grad_() for x in case.full_inputs())
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=case.causal, scale=case.scale, enable_gqa=True
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.detach())
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


def judged(case: Case, got: dict, want: dict) -> list[str]:
    """tests/judge.py on out and the gradients; the float32 (float64) lse to 1e-5 (1e-10)."""
    same = one_process_sdpa(case)
    bad = []
    for name in ("out", "dq", "dk", "dv"):
        v = verdict(name, case.dtype, errors(got[name], want[name]), errors(same[name], want[name]))
        bad += [] if v.ok else [str(v)]
    if case.dtype != "bfloat16":  # bf16 inputs are rounded; the reference's are not
        lse_dtype = "float64" if case.dtype == "float64" else "float32"
        v = verdict("lse", lse_dtype, errors(got["lse"], want["lse"]), (math.nan, math.nan))
        bad += [] if v.ok else [str(v)]
    return bad


ALL = [c for w in WORLDS for c in CASES[w]]


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_matches_float64_reference(results, case: Case) -> None:
    got = results[case.id]
    assert got["shapes_ok"]
    assert got["out_dtype"] == str({"float64": torch.float64, "float32": torch.float32}[case.dtype])
    bad = judged(case, got, reference(case))
    assert not bad, "\n".join(bad)


BF16_ALL = [c for w in BF16 for c in BF16[w]]


@pytest.mark.parametrize("case", BF16_ALL, ids=[c.id for c in BF16_ALL])
def test_bfloat16_no_worse_than_one_process_sdpa(results, case: Case) -> None:
    bad = judged(case, results[case.id], reference(case))
    assert not bad, "\n".join(bad)
