"""The fused Triton merge computes what the PyTorch-op merge computes (Triton's interpreter).

Runs in a subprocess because the interpreter is chosen when Triton is first imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is installed with the dev extra on Linux x86-64")

SCRIPT = textwrap.dedent(
    """
    import torch
    from ringattn.merge import merge_eager, merge_triton

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        b, h, s, d = 2, 3, 37, 72  # rows not a multiple of the block, head dim not a power of 2
        # The accumulator as a strided view (the second half of a longer tensor, BSHD memory).
        base = torch.randn(b, 2 * s, h, d, generator=g).to(dtype).transpose(1, 2)
        acc_out = base[:, :, s:]
        acc_lse = (torch.randn(b, h, 2 * s, generator=g) * 30)[:, :, s:]
        out = torch.randn(b, h, s, d, generator=g).to(dtype)
        lse = torch.randn(b, h, s, generator=g) * 30 + 1e4 * (dtype == torch.float32)
        acc_lse[0, 0, :3] = float("-inf")
        lse[0, 0, :2] = float("-inf")  # rows 0-1: nothing on either side; row 2: only out
        lse[1, 1, 5] = float("-inf")  # the block adds nothing to this row
        want_out, want_lse = acc_out.double().clone(), acc_lse.double().clone()
        merge_eager(want_out, want_lse, out.double(), lse.double())
        before = base.clone()
        merge_triton(acc_out, acc_lse, out, lse)
        err = (acc_out.double() - want_out).abs().max() / want_out.abs().max()
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8
        assert err <= tol, (dtype, float(err))
        assert torch.equal(acc_lse.isinf(), want_lse.isinf())
        finite = want_lse.isfinite()
        assert torch.allclose(acc_lse[finite].double(), want_lse[finite], rtol=1e-6, atol=1e-5)
        assert not acc_out.isnan().any()
        assert torch.equal(base[:, :, :s], before[:, :, :s])  # nothing outside the view written
        worst = max(worst, float(err))
    print("ok", worst)
    """
)


def test_triton_merge_matches_eager_merge_in_float64() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
