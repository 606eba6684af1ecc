"""Numerically stable online merge of partial attention results.

Two partial results ``(o1, l1)`` and ``(o2, l2)`` for the same query rows combine as
``l = logaddexp(l1, l2)`` and ``o = o1 + (o2 - o1) * sigmoid(l2 - l1)``: every exponent
is <= 0, so nothing overflows at any |lse|, and rows where both sides saw no key
(``l1 = l2 = -inf``) keep their accumulator instead of turning into NaN.

On CUDA the merge is one Triton kernel: it reads both outputs and both lse once, computes in
float32 and writes the accumulator in place, whatever its dtype (a bfloat16 accumulator is
rounded once per merge, exactly as a float32 one cast at the end would be for two blocks).
Elsewhere, or without Triton, the same arithmetic runs as PyTorch ops.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["merge_into", "triton_available"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_kernel() -> Any:
    """The compiled-on-first-use Triton merge kernel, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def merge_kernel(
        acc_out,
        acc_lse,
        out,
        lse,
        heads,
        rows,
        dim,
        ao_b,
        ao_h,
        ao_s,
        ao_d,
        al_b,
        al_h,
        al_s,
        bo_b,
        bo_h,
        bo_s,
        bo_d,
        bl_b,
        bl_h,
        bl_s,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        bh = tl.program_id(0)
        b = bh // heads
        h = bh % heads
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        row_ok = s < rows
        la_ptr = acc_lse + b * al_b + h * al_h + s * al_s
        la = tl.load(la_ptr, mask=row_ok, other=0.0).to(tl.float32)
        lb = tl.load(lse + b * bl_b + h * bl_h + s * bl_s, mask=row_ok, other=0.0).to(tl.float32)
        diff = lb - la
        # sigmoid(diff); -inf - -inf is NaN: a block adding nothing to an empty row keeps it.
        weight = tl.where(diff != diff, 0.0, 1.0 / (1.0 + tl.exp(-diff)))
        top = tl.maximum(la, lb)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        merged = safe_top + tl.log(tl.exp(la - safe_top) + tl.exp(lb - safe_top))
        merged = tl.where(top == float("-inf"), float("-inf"), merged)
        mask = row_ok[:, None] & (d[None, :] < dim)
        ao_ptr = acc_out + b * ao_b + h * ao_h + s[:, None] * ao_s + d[None, :] * ao_d
        bo_ptr = out + b * bo_b + h * bo_h + s[:, None] * bo_s + d[None, :] * bo_d
        oa = tl.load(ao_ptr, mask=mask, other=0.0).to(tl.float32)
        ob = tl.load(bo_ptr, mask=mask, other=0.0).to(tl.float32)
        result = oa + (ob - oa) * weight[:, None]
        tl.store(ao_ptr, result.to(acc_out.dtype.element_ty), mask=mask)
        tl.store(la_ptr, merged.to(acc_lse.dtype.element_ty), mask=row_ok)

    return merge_kernel


def triton_available() -> bool:
    """Whether the fused Triton merge can run (Triton importable)."""
    return _triton_kernel() is not None


def _use_triton(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> bool:
    return (
        acc_out.device.type == "cuda"
        and acc_out.dim() == 4
        and acc_out.dtype in _TRITON_DTYPES
        and out.dtype in _TRITON_DTYPES
        and acc_lse.dtype == torch.float32
        and lse.dtype == torch.float32
        and triton_available()
    )


def merge_triton(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """The fused merge: 4-D ``[B, H, S, D]`` outputs, ``[B, H, S]`` float32 lse, any strides."""
    kernel = _triton_kernel()
    if kernel is None:
        raise RuntimeError("Triton is not installed")
    batch, heads, rows, dim = acc_out.shape
    block_d = max(16, 1 << (dim - 1).bit_length())
    block_s = max(1, min(64, 8192 // block_d))
    grid = (batch * heads, (rows + block_s - 1) // block_s)
    kernel[grid](
        acc_out,
        acc_lse,
        out,
        lse,
        heads,
        rows,
        dim,
        *acc_out.stride(),
        *acc_lse.stride(),
        *out.stride(),
        *lse.stride(),
        BLOCK_S=block_s,
        BLOCK_D=block_d,
    )


def merge_eager(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """The merge as PyTorch ops; computes in float32 (float64 for float64 accumulators)."""
    compute = torch.float64 if acc_out.dtype == torch.float64 else torch.float32
    weight = torch.sigmoid(lse.to(compute) - acc_lse.to(compute))
    # -inf - -inf is NaN: a block that adds nothing to a row that has nothing keeps it as is.
    weight.nan_to_num_(nan=0.0)
    if acc_out.dtype == compute:
        acc_out.lerp_(out.to(compute), weight.unsqueeze(-1))
    else:
        acc_out.copy_(torch.lerp(acc_out.to(compute), out.to(compute), weight.unsqueeze(-1)))
    acc_lse.copy_(torch.logaddexp(acc_lse.to(compute), lse.to(compute)))


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge the block result ``(out, lse)`` into ``(acc_out, acc_lse)`` in place.

    Args:
        acc_out: accumulated output ``[..., S, D]``, any floating dtype (may be a view); the
            arithmetic is float32 (float64 for float64), rounded once into ``acc_out``.
        acc_lse: accumulated log-sum-exp ``[..., S]``, float32 or float64 (may be a view).
        out: block output ``[..., S, D]``, any floating dtype.
        lse: block log-sum-exp ``[..., S]``.
    """
    if _use_triton(acc_out, acc_lse, out, lse):
        merge_triton(acc_out, acc_lse, out, lse)
    else:
        merge_eager(acc_out, acc_lse, out, lse)
