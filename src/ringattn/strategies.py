"""Every way to shard attention over the sequence, behind one call: ``ringattn.attention``.

All strategies take the same local layout: the sequence split over the mesh's ranks in
row-major order (``layout="zigzag"``: 2N chunks, rank g holds chunks g and 2N-1-g), as
:func:`ringattn.shard` makes it for a 1-D or 2-D mesh.

- ``ring``: K/V blocks travel around the ranks (``ring.py``).
- ``allgather``: K/V are gathered once; each rank attends its query chunks to the prefix
  they may see in a few large kernel calls; dK/dV are reduce-scattered back.
- ``ulysses``: an all-to-all turns sequence shards into head shards (H/N heads over the
  whole sequence), attention runs locally, and a second all-to-all turns them back.
- ``hybrid``: on a 2-D mesh, Ulysses over the inner dimension and a ring over the outer one
  (as in USP). Gathered over the inner group, the chunks sorted by position form exactly
  the outer ring's shard of the same layout, so the ring runs unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm, ops
from .api import ring_attention
from .checks import _call_key, checked_call
from .comm import SequenceMesh, resolve_mesh
from .kernels import Kernel, accumulation_dtype, causal_aligns_bottom_right, select_kernel
from .key_rows import copy_rows, runs_triton
from .kv_exchange import fetch_kv, kv_exchange, padded_keys
from .layout import BlockPlan, chunk_ids, kv_heads_for_ulysses
from .mask_calls import MaskArguments, check_masked, masked_call, placement_for
from .mask_plan import density, fetched_plan, ring_steps, single_plan
from .masked_kernels import masked_kernel_for
from .masks import Documents, MaskMod, MaskSpec
from .merge import merge_into
from .planner import choose_strategy
from .ring import RingAttentionFunction, RingCall

__all__ = ["STRATEGIES", "attention"]

STRATEGIES: tuple[str, ...] = ("auto", "ring", "allgather", "ulysses", "hybrid")


# --------------------------------------------------------------------------- pieces


@functools.lru_cache(maxsize=64)
def _piece_ids(first_rank: int, ranks: int, world: int, layout: str) -> tuple[int, ...]:
    """Global chunk ids of ranks first_rank.. first_rank+ranks-1, in their local orders."""
    return tuple(
        c for r in range(first_rank, first_rank + ranks) for c in chunk_ids(r, world, layout)
    )


# --------------------------------------------------------------------------- ulysses


@functools.lru_cache(maxsize=64)
def _piece_slots(ids: tuple[int, ...], size: int, device: torch.device) -> tuple[Tensor, ...]:
    """Where a head exchange's pieces go. ``ids``: the chunk ids the group's ``size`` ranks
    hold (by rank, then in local order). Returns the position-order slot of rank r's p-th
    piece (``[size, per_rank]``) and, per slot, the rank and the piece that hold it."""
    flat = torch.tensor(ids)
    order = torch.argsort(flat)  # the (rank, piece) index of each slot
    slot = torch.empty_like(order)
    slot[order] = torch.arange(len(ids))
    per_rank = len(ids) // size
    return tuple(
        t.to(device) for t in (slot.view(size, per_rank), order // per_rank, order % per_rank)
    )


@functools.lru_cache(maxsize=64)
def _wire_rows(
    ids: tuple[int, ...], size: int, s: int, rank_rows: int, device: torch.device
) -> Tensor:
    """For each position of the group's sequence (``size`` ranks of ``s`` positions, the
    chunk ids ``ids`` by rank then local order), its row in :func:`_wire_view`: rank r's
    piece p starts at row ``r * rank_rows + p * s / per_rank`` (``rank_rows``: the rows of
    one rank's share of the wire, ``B * total / D``)."""
    _, rank, piece = _piece_slots(ids, size, device)
    per_rank = len(ids) // size
    rows = s // per_rank
    starts = rank * rank_rows + piece * rows  # per slot, in position order
    return (starts[:, None] + torch.arange(rows, device=device)).flatten()


def _wire_view(wire: Tensor, start: int, heads: int, s: int, d: int) -> Tensor:
    """The ``[n, B, total]`` wire's part for one tensor (``heads`` x ``s`` positions x ``d``
    per rank, from ``start`` of each rank's share) as one ``[B, heads, rows, D]`` view whose
    rows run through every rank's share (rank r's rows start at ``r * B * total / D``): a
    view that covers its storage more than once, read and written only through
    :func:`_wire_rows`."""
    n, b, total = wire.shape
    rows = (n - 1) * b * total // d + s
    return wire.as_strided((b, heads, rows, d), (total, s * d, d, 1), wire.storage_offset() + start)


@dataclass(frozen=True)
class _HeadExchange:
    """The all-to-all of one inner group: sequence shards <-> head shards.

    Tensors exchanged together (q, k and v; their gradients) share one all-to-all: each
    launch costs the host more than the GPU time of packing them. Per peer the wire holds
    each tensor's ``[B, H / n, S_local, D]`` (the peer's heads at this rank's positions, or
    the reverse), so one tensor of a batch of one is sent as it is. The received pieces go
    to position order (and the outgoing ones to the peers' local order) by one indexed row
    copy per tensor: on CUDA :func:`ringattn.key_rows.copy_rows` reads the wire through a
    view whose rows span every rank's piece (:func:`_wire_rows` says which row holds each
    position); elsewhere one scatter (``index_put_`` over the pieces' slots)."""

    group: dist.ProcessGroup
    size: int
    ids: tuple[int, ...]  # chunk ids of the group's ranks, in rank then local order

    def _exchange(self, send: Tensor) -> Tensor:
        recv = torch.empty_like(send)
        comm.all_to_all_now(recv, send, self.group, "Ulysses' all-to-all")
        return recv

    def to_heads(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """Each ``[B, H, S_local, D]`` -> ``[B, H / n, S_local * n, D]``, in position order."""
        n, b = self.size, xs[0].size(0)
        wire = [x.reshape(b, n, -1).transpose(0, 1) for x in xs]  # [n, B, H / n * S * D]
        recv = self._exchange(torch.cat(wire, dim=2) if len(xs) > 1 else wire[0].contiguous())
        slot = _piece_slots(self.ids, n, xs[0].device)[0]
        per_rank = slot.size(1)
        outs, start = [], 0
        for x in xs:
            _, h, s, d = x.shape
            size = h // n * s * d
            if runs_triton(x):
                out = x.new_empty((b, h // n, n * s, d))
                wire = _wire_view(recv, start, h // n, s, d)
                copy_rows((out,), None, (wire,), self._rows(recv, s, d, x.device))
            else:
                part = recv[:, :, start : start + size].view(n, b, h // n, per_rank, -1, d)
                out = x.new_empty((b, h // n, n * per_rank, s // per_rank, d))
                out[:, :, slot] = part.permute(1, 2, 0, 3, 4, 5)
                out = out.view(b, h // n, n * s, d)
            outs.append(out)
            start += size
        return tuple(outs)

    def _rows(self, wire: Tensor, s: int, d: int, device: torch.device) -> Tensor:
        """Which row of :func:`_wire_view` holds each position, for pieces of ``s`` rows per
        rank on the ``[n, B, total]`` wire."""
        return _wire_rows(self.ids, self.size, s, wire.size(1) * wire.size(2) // d, device)

    def to_sequence(self, *ys: Tensor) -> tuple[Tensor, ...]:
        """The inverse of :meth:`to_heads`."""
        n, b = self.size, ys[0].size(0)
        _, rank, piece = _piece_slots(self.ids, n, ys[0].device)
        per_rank = len(self.ids) // n
        sizes = [y.numel() // (b * n) for y in ys]
        send = ys[0].new_empty((n, b, sum(sizes)))
        start = 0
        for y, size in zip(ys, sizes):
            _, hn, s_all, d = y.shape
            if runs_triton(y):
                wire = _wire_view(send, start, hn, s_all // n, d)
                copy_rows((wire,), self._rows(send, s_all // n, d, y.device), (y,), None)
            else:
                part = send[:, :, start : start + size].view(n, b, hn, per_rank, -1, d)
                part.permute(1, 2, 0, 3, 4, 5)[:, :, rank, piece] = y.reshape(
                    b, hn, n * per_rank, -1, d
                )
            start += size
        recv = self._exchange(send)
        outs, start = [], 0
        for y, size in zip(ys, sizes):
            _, hn, s_all, d = y.shape
            part = recv[:, :, start : start + size].view(n, b, hn, s_all // n, d)
            start += size
            outs.append(part.transpose(0, 1).reshape(b, n * hn, s_all // n, d))
        return tuple(outs)


class _ToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, exchange: _HeadExchange, *xs: Tensor):  # type: ignore[override]
        ctx.exchange = exchange
        return exchange.to_heads(*xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor):  # type: ignore[override]
        return None, *ctx.exchange.to_sequence(*(g.contiguous() for g in grads))


class _ToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, exchange: _HeadExchange, y: Tensor) -> Tensor:  # type: ignore[override]
        ctx.exchange = exchange
        return exchange.to_sequence(y)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor):  # type: ignore[override]
        return None, ctx.exchange.to_heads(grad.contiguous())[0]


class _LocalAttention(torch.autograd.Function):
    """One kernel call on the whole (local) sequence, forward and backward."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, kernel: Kernel, causal: bool, scale: float
    ):  # type: ignore[override]
        out, lse, aux = kernel.forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.aux, ctx.kernel, ctx.causal, ctx.scale = aux, kernel, causal, scale
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(
            dout.contiguous(), q, k, v, out, lse, ctx.aux, causal=ctx.causal, scale=ctx.scale
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _ulysses(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sm: SequenceMesh,
    inner: dist.ProcessGroup,
    inner_size: int,
    outer: dist.ProcessGroup | None,
    causal: bool,
    scale: float | None,
    layout: str,
    backend: str,
) -> Tensor:
    """Ulysses over ``inner``, then the ring over ``outer`` (None: local attention)."""
    first = (sm.rank // inner_size) * inner_size
    exchange = _HeadExchange(inner, inner_size, _piece_ids(first, inner_size, sm.size, layout))
    kv_heads = kv_heads_for_ulysses(q.size(1), k.size(1), inner_size)
    if kv_heads != k.size(1):
        repeat = kv_heads // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = _ToHeads.apply(exchange, q, k, v)
    if outer is None:
        kernel = select_kernel(backend, qh, kh, vh, causal)
        scale_value = scale if scale is not None else q.size(-1) ** -0.5
        out = _LocalAttention.apply(qh, kh, vh, kernel, causal, scale_value)
    else:
        out = ring_attention(
            qh, kh, vh, outer, causal=causal, scale=scale, layout=layout, backend=backend
        )
    return _ToSequence.apply(exchange, out)


# --------------------------------------------------------------------------- allgather


def _query_blocks(
    ids: Sequence[int], causal: bool, chunk: int, bottom_right: bool = False
) -> list[tuple[int, int, int, bool]]:
    """(query chunk index, key start, key end, causal) per kernel call of the allgather.

    With ``bottom_right`` (the kernel aligns a causal block with fewer queries than keys to
    the bottom right) a causal query chunk takes its whole prefix in one call; otherwise it
    takes its square diagonal and, where it has one, the prefix before it (merged)."""
    if not causal:
        return [(-1, 0, -1, False)]  # every local query against every key
    if bottom_right:
        return [(i, 0, (cid + 1) * chunk, True) for i, cid in enumerate(ids)]
    blocks = []
    for i, cid in enumerate(ids):
        blocks.append((i, cid * chunk, (cid + 1) * chunk, True))  # the diagonal
        if cid:
            blocks.append((i, 0, cid * chunk, False))  # the prefix, whole
    return blocks


@functools.lru_cache(maxsize=64)
def _row_orders(
    ids: tuple[int, ...], per_rank: int, planes: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Row indices that turn gathered pieces into position order, and back.

    A gathered tensor ``[world, planes, per_rank * chunk, D]`` is seen as rows of one
    piece-plane (``chunk * D`` elements; ``planes``: everything before the sequence, e.g.
    K and V x B x H): row ``(r, x, p)`` is plane x of rank r's p-th piece. Position order is
    rows ``(x, c)`` for chunk c. One ``index_select`` with these rows does the whole reorder
    in a single pass over contiguous rows."""
    world = len(ids) // per_rank
    chunks = len(ids)
    where = {c: j for j, c in enumerate(ids)}  # chunk id -> index in rank order
    to_position = [
        (where[c] // per_rank * planes + x) * per_rank + where[c] % per_rank
        for x in range(planes)
        for c in range(chunks)
    ]
    to_rank = [
        x * chunks + ids[r * per_rank + p]
        for r in range(world)
        for x in range(planes)
        for p in range(per_rank)
    ]
    return torch.tensor(to_position, device=device), torch.tensor(to_rank, device=device)


def _gather_by_position(
    x: Tensor, group: dist.ProcessGroup, ids: tuple[int, ...], per_rank: int
) -> Tensor:
    """Every rank's ``x`` (``[..., S_local, D]``; rank r holds chunks
    ``ids[r * per_rank:(r + 1) * per_rank]``), gathered in one collective and put in
    position order: ``[..., S, D]``."""
    world = comm.group_facts(group)[1]
    *lead, s_local, d = x.shape
    gathered = x.new_empty((world, *lead, s_local, d))
    comm.all_gather_into(gathered, x.contiguous(), group)
    rows = _row_orders(ids, per_rank, gathered[0].numel() // (s_local * d), x.device)[0]
    piece = s_local // per_rank * d
    return gathered.view(-1, piece).index_select(0, rows).view(*lead, world * s_local, d)


def _scatter_by_rank(
    dx: Tensor, group: dist.ProcessGroup, ids: tuple[int, ...], per_rank: int
) -> Tensor:
    """``dx`` (``[..., S, D]`` in position order: this rank's gradients for every
    position) summed over ranks in one collective and cut to this rank's chunks, in
    ``dx``'s dtype (the reduce-scatter adds in it): ``[..., S_local, D]``."""
    world = comm.group_facts(group)[1]
    *lead, s, d = dx.shape
    s_local = s // world
    planes = dx.numel() // (s * d)
    rows = _row_orders(ids, per_rank, planes, dx.device)[1]
    send = dx.reshape(-1, s_local // per_rank * d).index_select(0, rows)
    mine = dx.new_empty((*lead, s_local, d))
    comm.reduce_scatter_into(mine, send.view(world, *lead, s_local, d), group)
    return mine


class _AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        group: dist.ProcessGroup,
        ids: tuple[int, ...],
        local_ids: tuple[int, ...],
        kernel: Kernel,
        causal: bool,
        scale: float,
    ):  # type: ignore[override]
        per_rank = len(local_ids)
        chunk = q.size(2) // per_rank
        # K and V travel together: one all-gather, one reorder.
        kv_full = _gather_by_position(torch.stack((k, v)), group, ids, per_rank)
        k_full, v_full = kv_full[0], kv_full[1]
        outs, lses, auxes = [], [], []
        bottom_right = causal and causal_aligns_bottom_right(kernel, q)
        blocks = _query_blocks(local_ids, causal, chunk, bottom_right)
        q_chunks = q.split(chunk, dim=2) if causal else (q,)
        for qi, start, end, block_causal in blocks:
            qb = q_chunks[qi] if qi >= 0 else q
            end = end if end >= 0 else k_full.size(2)
            out, lse, aux = kernel.forward(
                qb,
                k_full[:, :, start:end],
                v_full[:, :, start:end],
                causal=block_causal,
                scale=scale,
            )
            auxes.append(aux)
            if block_causal or not causal:
                outs.append(out)
                lses.append(lse)
            else:  # the prefix of the query chunk just added: merge it in
                merge_into(outs[-1], lses[-1], out, lse)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
        ctx.save_for_backward(q, kv_full, out, lse)
        ctx.meta = (group, ids, blocks, auxes, kernel, scale, chunk, k.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):  # type: ignore[override]
        q, kv_full, out, lse = ctx.saved_tensors
        group, ids, blocks, auxes, kernel, scale, chunk, dtype = ctx.meta
        k_full, v_full = kv_full[0], kv_full[1]
        dout = dout.contiguous()
        wide = accumulation_dtype(dtype)
        # dK/dV of every position, summed over this rank's calls and then over the ranks,
        # in float32: one rounding at the end, as the ring's.
        dkv = torch.zeros(kv_full.shape, dtype=wide, device=kv_full.device)
        # Every query row is in exactly one call when each chunk takes its prefix whole.
        one_call_per_row = len({qi for qi, *_ in blocks}) == len(blocks)
        dqs: list[Tensor] = []
        dq = None if one_call_per_row else torch.zeros_like(q, dtype=wide)
        for (qi, start, end, block_causal), aux in zip(blocks, auxes):
            end = end if end >= 0 else k_full.size(2)
            rows = slice(qi * chunk, (qi + 1) * chunk) if qi >= 0 else slice(None)
            dqb, dkb, dvb = kernel.backward(
                dout[:, :, rows],
                q[:, :, rows],
                k_full[:, :, start:end],
                v_full[:, :, start:end],
                out[:, :, rows],
                lse[:, :, rows],
                aux,
                causal=block_causal,
                scale=scale,
            )
            if dq is None:
                dqs.append(dqb)
            else:
                dq[:, :, rows] += dqb
            dkv[0, :, :, start:end] += dkb
            dkv[1, :, :, start:end] += dvb
        per_rank = len(ids) // comm.group_facts(group)[1]
        dk, dv = _scatter_by_rank(dkv, group, ids, per_rank).to(dtype).unbind(0)
        if dq is None:
            dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=2)
        return dq.to(q.dtype), dk, dv, *([None] * 6)


def _allgather(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sm: SequenceMesh,
    kernel: Kernel,
    causal: bool,
    scale: float,
    layout: str,
) -> Tensor:
    ids = _piece_ids(0, sm.size, sm.size, layout)
    local_ids = chunk_ids(sm.rank, sm.size, layout)
    return _AllGatherAttention.apply(
        q, k.contiguous(), v.contiguous(), sm.flat, ids, local_ids, kernel, causal, scale
    )


# --------------------------------------------------------------------------- entry


# Checked calls by signature (as ring_attention keeps them): the mesh, the strategy the
# planner chose, and the checked call.
_PLANNED: dict[tuple, tuple[SequenceMesh, str, RingCall]] = {}


def _plan_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: object,
    causal: bool,
    scale: float | None,
    strategy: str,
    layout: str,
    backend: str,
) -> tuple[SequenceMesh, str, RingCall]:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    sm = resolve_mesh(mesh)
    call = checked_call(sm.flat, q, k, v, causal, scale, layout, backend)
    if strategy == "auto":
        strategy = choose_strategy(q, k, sm, causal, call.kernel.name)
    if strategy == "hybrid" and sm.inner is None:
        raise ValueError(
            "strategy 'hybrid' needs a 2-D mesh (Ulysses over dimension 1, ring over "
            "dimension 0); got a 1-D group"
        )
    return sm, strategy, call


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: object = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    strategy: str = "auto",
    layout: str = "zigzag",
    backend: str = "auto",
    documents: Documents | None = None,
    window: tuple[int, int] | None = None,
    mask_mod: MaskMod | None = None,
) -> Tensor:
    """Exact attention over a sequence sharded across ``mesh``, by any strategy.

    Each rank passes its shard (as :func:`ringattn.shard` makes it for ``mesh``) and gets
    back the matching shard of attention over the whole sequence. Differentiable.

    Args:
        q: this rank's queries ``[B, H, S_local, D]``.
        k, v: this rank's keys and values ``[B, H_kv, S_local, D]``, ``H % H_kv == 0``.
        mesh: None (the world), a ProcessGroup, or a 1-D or 2-D DeviceMesh. On a 2-D mesh
            the sequence is split over all its ranks in row-major order.
        causal: apply the causal mask over global positions.
        scale: softmax scale, default ``1 / sqrt(D)``.
        strategy: ``"ring"``, ``"allgather"`` (gather K/V once: fewest rounds, O(S) K/V
            memory), ``"ulysses"`` (all-to-all to head shards; heads must split over the
            ranks, K/V heads are replicated where they do not), ``"hybrid"`` (2-D mesh:
            Ulysses over dimension 1, the ring over dimension 0), or ``"auto"`` (the
            planner's choice for these shapes, see :func:`ringattn.planner.plan`).
        layout: ``"zigzag"`` or ``"contiguous"``, as for :func:`ringattn.shard`.
        backend: the attention kernel, as for :func:`ringattn.ring_attention`.
        documents, window, mask_mod: masks, as for :func:`ringattn.ring_attention`, on every
            strategy (with ``documents`` the shards are those ``ringattn.shard(x, mesh,
            documents=documents)`` cuts, and ``layout`` is ignored).

    Raises:
        ValueError, TypeError: bad arguments, on every rank, before any data moves.
    """
    compiling = torch.compiler.is_compiling()
    if compiling and ops.traceable_masks(documents, window, mask_mod):
        # One opaque op in the compiled graph; its body is this function, run eagerly.
        # Documents travel as a tensor input, a window as a static argument.
        return ops.traced_call(
            "attention", q, k, v, mesh, causal, scale, layout, backend, strategy,
            documents, window,
        )[0]  # fmt: skip
    if documents is not None or window is not None or mask_mod is not None:
        # A mask function is Python the op cannot carry: under torch.compile the call runs
        # eagerly (a graph break; fullgraph=True raises).
        mask = MaskArguments(documents, window, mask_mod, causal)
        run = _masked_eager if compiling else _masked_attention
        return run(q, k, v, mesh, causal, scale, strategy, layout, backend, mask)
    key = _call_key(mesh, q, k, v, causal, scale, layout, backend, False)
    planned = _PLANNED.get((key, strategy)) if key is not None else None
    if planned is None:
        planned = _plan_call(q, k, v, mesh, causal, scale, strategy, layout, backend)
        if key is not None:
            if len(_PLANNED) >= 256:
                _PLANNED.clear()
            _PLANNED[(key, strategy)] = planned
    elif planned[1] != "ring" and planned[0].size > 1:
        # The cross-rank check of this call (ring_attention makes its own).
        checked_call(planned[0].flat, q, k, v, causal, scale, layout, backend)
    sm, strategy, call = planned
    if sm.size == 1 or strategy == "ring":
        return ring_attention(
            q, k, v, sm.flat, causal=causal, scale=scale, layout=layout, backend=backend
        )
    if strategy == "allgather":
        return _allgather(q, k, v, sm, call.kernel, causal, call.scale, layout)
    if strategy == "ulysses":
        return _ulysses(q, k, v, sm, sm.flat, sm.size, None, causal, scale, layout, backend)
    assert sm.inner is not None
    outer = sm.outer if sm.outer_size > 1 else None
    return _ulysses(q, k, v, sm, sm.inner, sm.inner_size, outer, causal, scale, layout, backend)


# --------------------------------------------------------------------------- masks


def _masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: object,
    causal: bool,
    scale: float | None,
    strategy: str,
    layout: str,
    backend: str,
    mask: MaskArguments,
) -> Tensor:
    """:func:`attention` under documents, a window or a mask function.

    Every strategy reads the same placement (the balanced one with documents, else
    ``layout``): the ring runs the masked plans; all-gather fetches the keys its queries can
    see (:mod:`ringattn.kv_exchange`) and computes them in one pair; Ulysses one pair on its
    heads over the whole sequence; the hybrid the masked ring over the outer dimension on
    the placement its inner groups gather. A pair computed in one call runs under its
    kernel's own autograd (FlexAttention on GPUs: nothing recomputed).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    sm = resolve_mesh(mesh)
    base, spec = check_masked(sm.flat, q, k, v, causal, scale, layout, backend, False, mask)
    placement = placement_for(spec, sm.size, layout)
    masked_kernel = masked_kernel_for(q.device, backend)
    if strategy == "auto" and q.size(2) % 2:
        strategy = "ring"  # the cost model prices zigzag shards (an even local length)
    if strategy == "auto":
        steps = ring_steps(spec, placement)  # the ring's plans are built only if it runs
        others = spec.seq_len - q.size(2)
        fetched = kv_exchange(spec, placement, sm.rank).most_fetched
        strategy = choose_strategy(
            q,
            k,
            sm,
            causal,
            base.kernel.name,
            density=_density(spec),
            ring_steps=steps,
            ring_recompute=masked_kernel == "flex",
            fetched_share=round(fetched / others, 2) if others else 0.0,
        )
    if strategy == "hybrid" and sm.inner is None:
        raise ValueError(
            "strategy 'hybrid' needs a 2-D mesh (Ulysses over dimension 1, ring over "
            "dimension 0); got a 1-D group"
        )
    k, v = k.contiguous(), v.contiguous()
    if sm.size == 1 or strategy == "ring":
        call = masked_call(base, spec, placement, sm.rank, q.device, backend)
        return RingAttentionFunction.apply(q, k, v, call)[0]
    if strategy == "allgather":
        # Only the keys the rank's queries can see travel, into one pair.
        exchange = kv_exchange(spec, placement, sm.rank)
        # Key counts rounded to a few sizes: a new batch's documents reuse compiled kernels.
        keys = padded_keys(exchange.positions.numel(), spec.seq_len)
        plan = fetched_plan(spec, placement, sm.rank, exchange.positions, masked_kernel, keys)
        if plan.mask is not None:
            keys = plan.mask.pair.kpos.numel()  # padded: a partial pair
        else:
            keys = exchange.positions.numel()
        k_ext, v_ext = fetch_kv(k, v, exchange, sm.flat, keys)
        return _one_pair(q, k_ext, v_ext, plan, base.kernel, base.scale)
    if strategy == "ulysses":
        inner, inner_size, outer = sm.flat, sm.size, None
    else:
        assert sm.inner is not None
        inner, inner_size = sm.inner, sm.inner_size
        outer = sm.outer if sm.outer_size > 1 else None
    first = (sm.rank // inner_size) * inner_size
    ids = tuple(c for r in range(first, first + inner_size) for c in placement.ids[r])
    exchange = _HeadExchange(inner, inner_size, ids)
    kv_heads = kv_heads_for_ulysses(q.size(1), k.size(1), inner_size)
    if kv_heads != k.size(1):
        repeat = kv_heads // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    qh, kh, vh = _ToHeads.apply(exchange, q, k, v)
    head_offset = (sm.rank - first) * (q.size(1) // inner_size)
    kernel = select_kernel(backend, qh, kh, vh, causal)
    kh, vh = kh.contiguous(), vh.contiguous()
    if outer is None:
        plan = single_plan(spec, masked_kernel, head_offset)
        out = _one_pair(qh, kh, vh, plan, kernel, base.scale)
    else:
        ring_base = RingCall(comm.ring_for(outer), (), kernel, base.scale)
        merged = placement.merged(inner_size)
        outer_rank = sm.rank // inner_size
        call = masked_call(
            ring_base, spec, merged, outer_rank, q.device, backend, head_offset=head_offset
        )
        out = RingAttentionFunction.apply(qh, kh, vh, call)[0]
    return _ToSequence.apply(exchange, out)


def _one_pair(
    q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, kernel: Kernel, scale: float
) -> Tensor:
    """One masked pair in one call: FlexAttention under its own autograd where the pair
    runs on it (its backward reads the forward's output and lse: nothing recomputed), else
    the ring's block forward and backward on its single block."""
    if plan.mask is not None and plan.mask.kernel == "flex":
        return plan.mask.attend(q, k, v, scale)
    call = RingCall(ring=None, plans=(plan,), kernel=kernel, scale=scale)
    return RingAttentionFunction.apply(q, k, v, call)[0]


# Masked calls plan per batch in Python; inside a compiled region they run eagerly.
_masked_eager = torch.compiler.disable(_masked_attention)


def _density(spec: MaskSpec) -> float:
    found = _DENSITIES.get(spec.key)
    if found is None:
        if len(_DENSITIES) >= 64:
            _DENSITIES.clear()
        found = _DENSITIES[spec.key] = round(density(spec), 3)
    return found


# A batch's mask density, priced by every layer's call (computing it walks every position).
_DENSITIES: dict[tuple, float] = {}


def _attention_entry(q, k, v, mesh, causal, scale, layout, backend, strategy, **masks):  # noqa: ANN001
    out = attention(
        q,
        k,
        v,
        mesh,
        causal=causal,
        scale=scale,
        strategy=strategy,
        layout=layout,
        backend=backend,
        **masks,
    )
    return out, None


ops.register_entry("attention", _attention_entry)
