"""Every rank's output, lse and gradients against naive float64 attention on the full sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ringattn.reference import attention

from cases import Case, bf16_cases, case_dicts, random_cases, run_cases
from distributed import run_ranks

WORLDS = (1, 2, 3, 4, 8)
CASES = {w: random_cases(w, count=20, seed=w) for w in WORLDS}
BF16 = {w: bf16_cases(w) for w in (2, 4)}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max().clamp_min(1e-30))


ALL = [c for w in WORLDS for c in CASES[w]]


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_matches_float64_reference(results, case: Case) -> None:
    got = results[case.id]
    assert got["shapes_ok"]
    assert got["out_dtype"] == str({"float64": torch.float64, "float32": torch.float32}[case.dtype])
    want = reference(case)
    for name in ("out", "lse", "dq", "dk", "dv"):
        err = relative_error(got[name], want[name])
        assert err < TOLERANCE[case.dtype], f"{name}: relative error {err:.2e}"


BF16_ALL = [c for w in BF16 for c in BF16[w]]


@pytest.mark.parametrize("case", BF16_ALL, ids=[c.id for c in BF16_ALL])
def test_bfloat16_no_worse_than_one_process_sdpa(results, case: Case) -> None:
    """bf16: within 1e-2 of float64, and within 1.5x of one-process SDPA's own bf16 error."""
    got = results[case.id]
    want = reference(case)
    q, k, v, dout = (x.to(torch.bfloat16).requires_grad_() for x in case.full_inputs())
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=case.causal, scale=case.scale, enable_gqa=True
    )
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.detach())
    one_process = {"out": out, "dq": dq, "dk": dk, "dv": dv}
    for name, sdpa in one_process.items():
        ring_err = relative_error(got[name], want[name])
        sdpa_err = relative_error(sdpa.double(), want[name])
        # One bf16 rounding of the result (2^-8 relative) is the floor any method pays.
        assert ring_err < 1e-2, f"{name}: {ring_err:.2e}"
        assert ring_err <= max(1.5 * sdpa_err, 2.0**-8), (
            f"{name}: ring {ring_err:.2e} vs one-process SDPA {sdpa_err:.2e}"
        )
