"""Indexed copies and sums of key rows, for the masked all-gather's K/V exchange and
Ulysses' reorders.

The exchange moves whole key rows of ``[B, H, S, D]`` tensors along ``S``: it selects the
keys a peer needs into the send buffer, places its own and the fetched keys in position
order, and in the backward sums each own key's gradient with the gradients that the ranks
it served send back. K and V (and their gradients) always travel together. Ulysses' head
exchange puts the pieces that arrive from every rank in position order (and the outgoing
ones in the peers' order) the same way, one tensor at a time.

On CUDA each of these is one Triton kernel for K and V together: a program copies a tile
of rows (each row ``D`` contiguous elements) through the index on either side, so the
copies run near memory bandwidth whatever the strides of the views they read and write.
PyTorch's indexed ops on dimension 2 of such views (``index_select``, ``index_copy_``,
``index_add_``, and the float32 conversions around the sum) took about 1.2-1.4 ms per
forward+backward per rank at 64K packed tokens on 4 ranks against ~0.3 ms of data to move.
The gradient sum reads every contribution of a key at once (a table of up to ``world - 1``
contributions per key) and rounds once into the output dtype, with no atomics: the result
does not depend on the order of arrival. Elsewhere, or without Triton, the same arithmetic
runs as PyTorch ops (float32 accumulation, float64 for float64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .kernels import accumulation_dtype

__all__ = ["contribution_table", "copy_rows", "runs_triton", "sum_rows"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BLOCK_ROWS = 32


@functools.cache
def _triton_kernels() -> Any:
    """The compiled-on-first-use Triton kernels ``(copy, sum)``, or None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def row_tile(rows, heads, dim, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        # This program's batch row and head (grid axis 1), its tile of rows (axis 0) and
        # the tile's element mask.
        bh = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        i = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = i < rows
        d = tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (d[None, :] < dim)
        return b, h, i, ok, d, mask

    @triton.jit
    def copy_kernel(
        dst0,
        dst1,
        src0,
        src1,
        dst_index,
        src_index,
        rows,
        heads,
        dim,
        d_b,
        d_h,
        d_s,
        s_b,
        s_h,
        s_s,
        HAS_DST_INDEX: tl.constexpr,
        HAS_SRC_INDEX: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b, h, i, ok, d, mask = row_tile(rows, heads, dim, BLOCK_S, BLOCK_D)
        si = i.to(tl.int64)
        di = i.to(tl.int64)
        if HAS_SRC_INDEX:
            si = tl.load(src_index + i, mask=ok, other=0).to(tl.int64)
        if HAS_DST_INDEX:
            di = tl.load(dst_index + i, mask=ok, other=0).to(tl.int64)
        s_off = b * s_b + h * s_h + si[:, None] * s_s + d[None, :]
        d_off = b * d_b + h * d_h + di[:, None] * d_s + d[None, :]
        if tl.program_id(2) == 0:
            x = tl.load(src0 + s_off, mask=mask)
            tl.store(dst0 + d_off, x.to(dst0.dtype.element_ty), mask=mask)
        else:
            x = tl.load(src1 + s_off, mask=mask)
            tl.store(dst1 + d_off, x.to(dst1.dtype.element_ty), mask=mask)

    @triton.jit
    def sum_kernel(
        out0,
        out1,
        src0,
        src1,
        ext0,
        ext1,
        src_index,
        table,
        rows,
        heads,
        dim,
        o_b,
        o_h,
        o_s,
        s_b,
        s_h,
        s_s,
        e_b,
        e_h,
        e_s,
        LAYERS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b, h, i, ok, d, mask = row_tile(rows, heads, dim, BLOCK_S, BLOCK_D)
        si = tl.load(src_index + i, mask=ok, other=0).to(tl.int64)
        s_off = b * s_b + h * s_h + si[:, None] * s_s + d[None, :]
        o_off = b * o_b + h * o_h + i.to(tl.int64)[:, None] * o_s + d[None, :]
        first = tl.program_id(2) == 0
        if first:
            acc = tl.load(src0 + s_off, mask=mask, other=0.0).to(tl.float32)
        else:
            acc = tl.load(src1 + s_off, mask=mask, other=0.0).to(tl.float32)
        for layer in tl.static_range(LAYERS):
            t = tl.load(table + layer * rows + i, mask=ok, other=-1).to(tl.int64)
            has = mask & (t >= 0)[:, None]
            e_off = b * e_b + h * e_h + tl.maximum(t, 0)[:, None] * e_s + d[None, :]
            if first:
                acc += tl.load(ext0 + e_off, mask=has, other=0.0).to(tl.float32)
            else:
                acc += tl.load(ext1 + e_off, mask=has, other=0.0).to(tl.float32)
        if first:
            tl.store(out0 + o_off, acc.to(out0.dtype.element_ty), mask=mask)
        else:
            tl.store(out1 + o_off, acc.to(out1.dtype.element_ty), mask=mask)

    return copy_kernel, sum_kernel


def _same_layout(group: Sequence[Tensor]) -> bool:
    a, b = group[0], group[-1]
    return a.shape == b.shape and a.stride() == b.stride() and a.stride(-1) == 1


def _use_triton(*pairs: Sequence[Tensor]) -> bool:
    return (
        all(t.device.type == "cuda" and t.dim() == 4 for p in pairs for t in p)
        and all(t.dtype in _TRITON_DTYPES for p in pairs for t in p)
        and all(_same_layout(p) for p in pairs)
        and _triton_kernels() is not None
    )


def runs_triton(*tensors: Tensor) -> bool:
    """Whether :func:`copy_rows` runs as the Triton kernel for these tensors (CUDA, 4-D,
    float32/bfloat16/float16, unit stride along ``D``, Triton importable)."""
    return _use_triton(*((t,) for t in tensors))


def _grid(rows: int, group: Sequence[Tensor]) -> tuple[int, int, int]:
    return (-(-rows // _BLOCK_ROWS), group[0].size(0) * group[0].size(1), len(group))


def _block_d(dim: int) -> int:
    return max(16, 1 << (dim - 1).bit_length())


def copy_rows(
    dst: Sequence[Tensor],
    dst_index: Tensor | None,
    src: Sequence[Tensor],
    src_index: Tensor | None,
) -> None:
    """For K and V (``dst`` and ``src`` pairs of ``[B, H, S, D]`` tensors or views; or one
    tensor each): ``dst[j][:, :, dst_index] = src[j][:, :, src_index]``, an index of None
    standing for ``arange`` over the other side's rows (int64 indices on the tensors'
    device). The Triton kernel reads only the views' strides, so a view may cover its
    storage more than once (rows of several ranks' pieces, say) as long as the rows an
    index names do not overlap."""
    rows = (
        src_index.numel()
        if src_index is not None
        else dst_index.numel()
        if dst_index is not None
        else src[0].size(2)
    )
    if rows == 0:
        return
    if _use_triton(dst, src):
        copy_kernel, _ = _triton_kernels()
        dim = src[0].size(3)
        copy_kernel[_grid(rows, src)](
            dst[0],
            dst[-1],
            src[0],
            src[-1],
            dst_index if dst_index is not None else src[0],
            src_index if src_index is not None else src[0],
            rows,
            src[0].size(1),
            dim,
            *dst[0].stride()[:3],
            *src[0].stride()[:3],
            HAS_DST_INDEX=dst_index is not None,
            HAS_SRC_INDEX=src_index is not None,
            BLOCK_S=_BLOCK_ROWS,
            BLOCK_D=_block_d(dim),
        )
        return
    for d, s in zip(dst, src):
        picked = s if src_index is None else s.index_select(2, src_index)
        if dst_index is None:
            d.copy_(picked)
        else:
            d.index_copy_(2, dst_index, picked.to(d.dtype))


def contribution_table(index: Tensor, rows: int) -> Tensor:
    """``[layers, rows]`` int64: for each row ``i``, the positions ``j`` with ``index[j] ==
    i`` (in order), one per layer, -1 where a row has fewer; ``layers`` is the most any row
    has (0 for an empty ``index``)."""
    if index.numel() == 0:
        return torch.full((0, rows), -1, dtype=torch.int64)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    sorted_rows = index[order]
    layer = torch.arange(index.numel()) - starts[sorted_rows]
    table = torch.full((int(counts.max()), rows), -1, dtype=torch.int64)
    table[layer, sorted_rows] = order
    return table


def sum_rows(
    out: Sequence[Tensor],
    src: Sequence[Tensor],
    src_index: Tensor,
    extra: Sequence[Tensor],
    table: Tensor,
) -> None:
    """For K and V: ``out[j][:, :, i] = src[j][:, :, src_index[i]] + sum over layers l of
    extra[j][:, :, table[l, i]]`` (entries -1 add nothing), accumulated in float32 (float64
    for float64) and rounded once into ``out``'s dtype. ``table`` is
    :func:`contribution_table`'s, on the tensors' device."""
    rows = src_index.numel()
    if rows == 0:
        return
    if _use_triton(out, src, extra) if table.size(0) else _use_triton(out, src):
        _, sum_kernel = _triton_kernels()
        dim = src[0].size(3)
        ext = extra if table.size(0) else src
        sum_kernel[_grid(rows, src)](
            out[0],
            out[1],
            src[0],
            src[1],
            ext[0],
            ext[1],
            src_index,
            table,
            rows,
            src[0].size(1),
            dim,
            *out[0].stride()[:3],
            *src[0].stride()[:3],
            *ext[0].stride()[:3],
            LAYERS=table.size(0),
            BLOCK_S=_BLOCK_ROWS,
            BLOCK_D=_block_d(dim),
        )
        return
    for o, s, e in zip(out, src, extra):
        acc = s.index_select(2, src_index).to(accumulation_dtype(o.dtype))
        if table.size(0):
            # A zero row after the returned ones stands for "none" (-1): no host sync.
            zero = e.new_zeros(e.shape[:2] + (1, e.size(3)))
            padded = torch.cat([e, zero], dim=2).to(acc.dtype)
            for layer in table:
                acc += padded.index_select(2, torch.where(layer >= 0, layer, e.size(2)))
        o.copy_(acc)
