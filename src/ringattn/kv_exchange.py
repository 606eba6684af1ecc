"""Fetching only the keys a rank's queries can see, for masked attention in one kernel call.

Under a mask, the keys a query may see lie in its key interval (its document, its window,
causality; a mask function only removes keys from it). The all-gather strategy under a mask
therefore does not gather everything: :func:`kv_exchange` marks, for every rank, the global
positions inside some interval of its queries, rounded out to whole tiles of
:data:`ALIGN` positions (so the fetched keys keep the tile grid of the sequence), and lists
for every pair of ranks the source's local indices the destination needs. One all-to-all
moves them key-major (a key's K and V side by side, each peer's keys one contiguous piece
whatever the batch and head counts), so one kernel selects all of K straight into the send
buffer and one lays all fetched K out, however many peers (V alike). The destination lays
its own keys and the fetched ones out in position order, the order the pair's mask is built
for, followed by zero keys that round the count up to one of a few sizes
(:func:`padded_keys`): the count changes with every batch's documents, and the compiled
kernel then keeps one graph per size. A batch whose ranks fetch nothing (every document within one
rank) moves nothing: every rank knows it from the placement. A causal window of W reaches
only W positions into the previous shard, so K/V travel ``W`` positions, not ``S``; packed
documents fetch the documents a rank's queries are in.

The backward returns the fetched keys' gradients to their owners, which add them to the
gradients of their own queries: each own key's gradient and every gradient sent back for it
summed in float32 and rounded once (a table lists each key's returned gradients, so the sum
does not depend on their order). The selections, placements and the sum are indexed row
copies (:mod:`ringattn.key_rows`: one Triton kernel each for K and V together on CUDA).

Every rank computes the whole exchange from the mask and the placement alone (both agreed
across ranks by the argument checks), so the sends and receives match without a handshake.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .balance import Placement
from .key_rows import contribution_table, copy_rows, sum_rows
from .masks import MaskSpec

__all__ = ["ALIGN", "KVExchange", "fetch_kv", "kv_exchange", "padded_keys"]

# Fetched positions are rounded out to whole tiles of this many positions (FlexAttention's
# block size), so a window's halo does not shift the shard's keys off the tile grid.
ALIGN = 128


@dataclass(frozen=True)
class KVExchange:
    """What one rank fetches and serves under a mask (cached per mask and placement)."""

    positions: Tensor  # sorted global positions of this rank's keys: its own and the fetched
    own_slots: Tensor  # where its own keys sit among them ([S_local], ascending)
    fetch: tuple[tuple[int, Tensor, Tensor], ...]  # (source, source's local indices, slots)
    serve: tuple[tuple[int, Tensor], ...]  # (destination, this rank's local indices it needs)
    most_fetched: int  # the most keys any rank of the group fetches (the same on every rank)
    world_size: int
    # The same, as the all-to-all moves them: every piece's indices in rank order, and the
    # keys per rank (the pieces' sizes).
    fetch_slots: Tensor  # the slots of ``fetch``'s pieces, one after the other
    fetch_counts: tuple[int, ...]  # keys fetched from each rank
    serve_index: Tensor  # the local indices of ``serve``'s pieces, one after the other
    serve_counts: tuple[int, ...]  # keys served to each rank
    # For each own key, where its gradients from the ranks it served arrive in the returned
    # buffer (``serve_index``'s order), one per layer, -1 where fewer (key_rows.sum_rows).
    serve_table: Tensor
    # Device copies of the index tensors above, made on first use (kept with the exchange).
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device, x: Tensor) -> Tensor:
        """``x`` (one of this exchange's index tensors) on ``device``, copied there once."""
        key = (id(x), device)
        found = self._on_device.get(key)
        if found is None:
            found = self._on_device[key] = x.to(device)
        return found

    @property
    def fetched(self) -> int:
        """Keys this rank receives from others."""
        return sum(int(idx.numel()) for _, idx, _ in self.fetch)


def _needed(spec: MaskSpec, qpos: Tensor) -> Tensor:
    """Bool ``[S]``: the global positions some query at ``qpos`` may see, tile-aligned."""
    s = spec.seq_len
    lo, hi = spec.key_interval(qpos)
    lo, hi = lo.flatten(), hi.flatten()
    some = hi >= lo
    diff = torch.zeros(s + 1, dtype=torch.int64)
    diff.index_add_(0, lo[some], torch.ones_like(lo[some]))
    diff.index_add_(0, hi[some] + 1, -torch.ones_like(hi[some]))
    need = diff.cumsum(0)[:s] > 0
    tiles = -(-s // ALIGN)
    padded = torch.zeros(tiles * ALIGN, dtype=torch.bool)
    padded[:s] = need
    return padded.view(tiles, ALIGN).any(-1).repeat_interleave(ALIGN)[:s]


_CACHE: OrderedDict[tuple, KVExchange] = OrderedDict()
_CACHE_LIMIT = 16


def kv_exchange(spec: MaskSpec, placement: Placement, rank: int) -> KVExchange:
    """The exchange of ``rank`` under ``spec`` on ``placement`` (cached)."""
    key = (spec.key, placement, rank)
    found = _CACHE.get(key)
    if found is not None:
        _CACHE.move_to_end(key)
        return found
    world = placement.world_size
    positions = [placement.positions(r) for r in range(world)]
    needs = [_needed(spec, positions[r]) for r in range(world)]
    most = max(int(needs[r].sum()) - int(needs[r][positions[r]].sum()) for r in range(world))
    fetch_idx = [
        torch.nonzero(needs[rank][positions[s]]).flatten() if s != rank else None
        for s in range(world)
    ]
    own = positions[rank]
    every = torch.cat([own, *(positions[s][i] for s, i in enumerate(fetch_idx) if i is not None)])
    order = torch.argsort(every)
    slot_of = torch.empty_like(order)
    slot_of[order] = torch.arange(order.numel())
    own_slots = slot_of[: own.numel()]
    fetch, start = [], own.numel()
    for s, idx in enumerate(fetch_idx):
        if idx is None or idx.numel() == 0:
            continue
        fetch.append((s, idx, slot_of[start : start + idx.numel()]))
        start += idx.numel()
    serve = []
    for d in range(world):
        if d == rank:
            continue
        idx = torch.nonzero(needs[d][own]).flatten()
        if idx.numel():
            serve.append((d, idx))
    fetch_counts, serve_counts = [0] * world, [0] * world
    for src, idx, _ in fetch:
        fetch_counts[src] = int(idx.numel())
    for dst, idx in serve:
        serve_counts[dst] = int(idx.numel())
    empty = torch.zeros(0, dtype=torch.int64)
    serve_index = torch.cat([empty, *(idx for _, idx in serve)])
    found = KVExchange(
        every[order],
        own_slots,
        tuple(fetch),
        tuple(serve),
        most,
        world,
        torch.cat([empty, *(slots for _, _, slots in fetch)]),
        tuple(fetch_counts),
        serve_index,
        tuple(serve_counts),
        contribution_table(serve_index, own.numel()),
    )
    _CACHE[key] = found
    if len(_CACHE) > _CACHE_LIMIT:
        _CACHE.popitem(last=False)
    return found


# Key counts are rounded up to this many sizes per doubling (at most 1/4 more keys).
_SIZES_PER_DOUBLING = 4


def padded_keys(keys: int, seq_len: int) -> int:
    """``keys`` rounded up to one of a few sizes (four per doubling, multiples of
    :data:`ALIGN`, at most ``seq_len``): the key count the masked all-gather's kernel sees.

    A new batch's documents change how many keys a rank fetches; FlexAttention compiles
    static shapes, and one graph per size keeps its static kernels without a compile per
    batch. The added keys are zeros no query sees."""
    if keys >= seq_len:
        return keys
    step = max(ALIGN, (1 << max(keys.bit_length() - 1, 0)) // _SIZES_PER_DOUBLING)
    step = -(-step // ALIGN) * ALIGN
    return min(-(-keys // step) * step, seq_len)


def _wire(x: Tensor, n: int) -> Tensor:
    """An empty ``[n, 2, B, H, D]`` buffer for ``n`` keys of ``x``'s K and V, key-major: each
    peer's keys are one contiguous piece of it, whatever B and H are."""
    b, h, _, d = x.shape
    return x.new_empty((n, 2, b, h, d))


def _as_keys(buf: Tensor, which: int) -> Tensor:
    """``buf``'s K (0) or V (1) as a ``[B, H, n, D]`` view (strided: no copy)."""
    return buf[:, which].permute(1, 2, 0, 3)


def _start_exchange(
    k: Tensor,
    v: Tensor,
    send_at: Tensor,
    send_counts: tuple[int, ...],
    recv_counts: tuple[int, ...],
    group: dist.ProcessGroup,
    what: str,
) -> tuple[comm.PendingShift, Tensor]:
    """Post the all-to-all that sends K and V at ``send_at`` (positions along dim 2, the
    destinations' pieces in rank order, ``send_counts`` keys each) and receives
    ``recv_counts`` keys from each rank; returns it (``wait()`` before reading) and the
    ``[n, 2, B, H, D]`` buffer the received keys land in, in rank order. K and V are selected
    straight into the send buffer: one kernel each, however many peers."""
    b, h, _, d = k.shape
    per_key = 2 * b * h * d
    sent = _wire(k, sum(send_counts))
    copy_rows((_as_keys(sent, 0), _as_keys(sent, 1)), None, (k, v), send_at)
    received = _wire(k, sum(recv_counts))
    pending = comm.all_to_all_into(
        received.view(-1),
        sent.view(-1),
        [n * per_key for n in recv_counts],
        [n * per_key for n in send_counts],
        group,
        what,
    )
    return pending, received


class _FetchKV(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, k: Tensor, v: Tensor, ex: KVExchange, group: dist.ProcessGroup, keys: int
    ):
        dev = k.device
        b, h, _, d = k.shape
        n = ex.positions.numel()
        k_ext, v_ext = k.new_empty((b, h, keys, d)), v.new_empty((b, h, keys, d))
        if keys > n:  # the padding no query sees: zeros, so a tile it shares stays finite
            k_ext[:, :, n:].zero_()
            v_ext[:, :, n:].zero_()
        own = ex.on(dev, ex.own_slots)
        pending = None
        if ex.most_fetched:  # some rank of the group fetches: every rank takes part
            what = "fetching the keys this rank's queries see"
            serve_at = ex.on(dev, ex.serve_index)
            counts = (ex.serve_counts, ex.fetch_counts)
            pending, received = _start_exchange(k, v, serve_at, *counts, group, what)
        # The own keys are laid out while the transfer runs.
        copy_rows((k_ext, v_ext), own, (k, v), None)
        if pending is not None:
            pending.wait()
            if received.size(0):
                slots = ex.on(dev, ex.fetch_slots)
                fetched = (_as_keys(received, 0), _as_keys(received, 1))
                copy_rows((k_ext, v_ext), slots, fetched, None)
        ctx.ex, ctx.group, ctx.dtype = ex, group, k.dtype
        return k_ext, v_ext

    @staticmethod
    def backward(ctx: Any, dk_ext: Tensor, dv_ext: Tensor):  # type: ignore[override]
        ex, group = ctx.ex, ctx.group
        dev = dk_ext.device
        own = ex.on(dev, ex.own_slots)
        b, h, _, d = dk_ext.shape
        dk, dv = (g.new_empty((b, h, own.numel(), d), dtype=ctx.dtype) for g in (dk_ext, dv_ext))
        received = dk_ext.new_empty((0, 2, b, h, d))
        if ex.most_fetched:
            # The fetched keys' gradients go back to their sources (from the slots they
            # filled).
            what = "returning the fetched keys' gradients"
            slots = ex.on(dev, ex.fetch_slots)
            counts = (ex.fetch_counts, ex.serve_counts)
            pending, received = _start_exchange(dk_ext, dv_ext, slots, *counts, group, what)
            pending.wait()
        # Each own key's gradient plus those returned for it (a key served to several ranks
        # comes back once from each), summed wide and rounded once.
        table = ex.on(dev, ex.serve_table)
        if not received.size(0):
            table = table[:0]
        returned = (_as_keys(received, 0), _as_keys(received, 1))
        sum_rows((dk, dv), (dk_ext, dv_ext), own, returned, table)
        return dk, dv, None, None, None


def fetch_kv(
    k: Tensor, v: Tensor, ex: KVExchange, group: dist.ProcessGroup, keys: int = 0
) -> tuple[Tensor, Tensor]:
    """This rank's keys and values together with the fetched ones, in position order
    (``ex.positions``), followed by zero keys up to ``keys`` when that is more;
    differentiable (the backward returns the fetched keys' gradients)."""
    return _FetchKV.apply(k, v, ex, group, max(keys, ex.positions.numel()))
