"""Routing ``F.scaled_dot_product_attention`` to ring attention, and sharding sequence buffers.

``context_parallel(group, buffers, seq_dims)`` shards the given tensors (input ids, labels,
position ids, ...) in place along their sequence dimension with the load-balanced layout, and
inside it every ``F.scaled_dot_product_attention`` call runs ring attention over ``group`` on
the local shards, so a model written for one device trains context-parallel unchanged. On
exit, also when the body raises, the buffers get their full contents back (``restore=True``)
and the routing is gone.

With ``documents`` (a :class:`ringattn.Documents` for the batch: packed documents, padding),
the buffers are cut with the balanced layout the library picks for those documents and every
SDPA call inside attends within documents only; ``window`` and ``mask_mod`` add a sliding
window and a mask function to every call, as for :func:`ringattn.ring_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import comm
from ..api import shard, unshard
from ..layout import num_chunks, shard_for_rank, unshard_shards
from .sdpa_route import Masks, RingSDPA, check_route_options, resolve_layout

__all__ = ["context_parallel", "context_parallel_unshard"]


def _check_buffers(
    buffers: Sequence[Tensor],
    seq_dims: Sequence[int],
    world_size: int,
    layout: str,
    documents: Any = None,
) -> list[int]:
    if len(buffers) != len(seq_dims):
        raise ValueError(
            f"seq_dims must give one dimension per buffer: {len(buffers)} buffers, "
            f"{len(seq_dims)} seq_dims"
        )
    dims = []
    chunks = num_chunks(world_size, layout)
    for i, (buf, dim) in enumerate(zip(buffers, seq_dims)):
        if not isinstance(buf, Tensor):
            raise TypeError(f"buffers[{i}] must be a torch.Tensor, got {type(buf).__name__}")
        if isinstance(buf, torch.nn.Parameter):
            raise TypeError(f"buffers[{i}] is a Parameter; shard inputs and buffers, not weights")
        if not isinstance(dim, int) or not -buf.dim() <= dim < buf.dim():
            raise ValueError(
                f"seq_dims[{i}] must be an int in [-{buf.dim()}, {buf.dim()}), got {dim!r}"
            )
        dim %= buf.dim()
        if documents is not None:
            if buf.size(dim) != documents.seq_len:
                raise ValueError(
                    f"buffers[{i}].size({dim}) = {buf.size(dim)} must be the documents' "
                    f"sequence length {documents.seq_len}"
                )
        elif buf.size(dim) % chunks:
            raise ValueError(
                f"buffers[{i}].size({dim}) = {buf.size(dim)} must be divisible by {chunks} "
                f"for layout={layout!r} on {world_size} ranks"
            )
        dims.append(dim)
    return dims


def _replace(buf: Tensor, contents: Tensor) -> None:
    with torch.no_grad():
        buf.resize_(contents.shape)
        buf.copy_(contents)


@contextlib.contextmanager
def context_parallel(
    group: object,
    buffers: Sequence[Tensor] = (),
    seq_dims: Sequence[int] = (),
    *,
    layout: str | None = None,
    backend: str = "auto",
    restore: bool = True,
    documents: Any = None,
    window: tuple[int, int] | None = None,
    mask_mod: Callable[..., Any] | None = None,
) -> Iterator[None]:
    """Shard ``buffers`` in place along ``seq_dims`` and run SDPA as ring attention inside.

    Args:
        group: a ProcessGroup or a 1-D DeviceMesh over the context-parallel ranks (None: the
            world).
        buffers: tensors with a sequence dimension, the same on every rank (input ids,
            labels, position ids, ...); each becomes this rank's shard for the duration.
        seq_dims: the sequence dimension of each buffer.
        layout: ``"zigzag"`` (the default: balanced causal work; full attention works
            too) or ``"contiguous"``. Not with ``documents``, which fix the layout.
        backend: the attention backend, as for :func:`ringattn.ring_attention`.
        restore: give the buffers their full contents back on exit.
        documents: a :class:`ringattn.Documents` for this batch (packed documents,
            padding): the buffers, whose sequence dimension must have the documents'
            length, are cut with their layout, and attention stays within documents.
        window: ``(left, right)`` sliding window of every SDPA call (-1 = unbounded).
        mask_mod: ``fn(b, h, q_idx, kv_idx) -> bool`` over global positions, for every call.

    Inside, ``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=...,
    enable_gqa=...)`` on local shards ``[B, H, S_local, D]`` returns the local shard of
    attention over the whole sequence; ``attn_mask`` and ``dropout_p`` raise ValueError.
    Labels for next-token loss must be shifted on the full sequence, before sharding.

    Raises:
        ValueError, TypeError: bad buffers or dimensions, before anything is changed.
    """
    where = "ringattn.context_parallel"
    masks = Masks.checked(documents, window, mask_mod, where)
    layout = resolve_layout(layout, "zigzag", documents, where)
    check_route_options(layout, backend)
    pg = comm.resolve_group(group)
    rank, world_size, _ = comm.group_facts(pg)
    dims = _check_buffers(buffers, seq_dims, world_size, layout, documents)
    originals = [buf.clone() if restore else None for buf in buffers]
    if documents is None:
        shards = [
            shard_for_rank(buf, rank, world_size, dim=dim, layout=layout).clone()
            for buf, dim in zip(buffers, dims)
        ]
    else:
        shards = [
            shard(buf.detach(), pg, dim=dim, documents=documents).clone()
            for buf, dim in zip(buffers, dims)
        ]
    for buf, piece in zip(buffers, shards):
        _replace(buf, piece)
    try:
        with RingSDPA(pg, layout, backend, where, masks):
            yield
    finally:
        for buf, original in zip(buffers, originals):
            if original is not None:
                _replace(buf, original)


def context_parallel_unshard(
    group: object,
    buffers: Sequence[Tensor],
    seq_dims: Sequence[int],
    *,
    layout: str | None = None,
    documents: Any = None,
) -> list[Tensor]:
    """The full tensors, in sequence order, from every rank's shards (an all-gather each).

    Pass the ``layout`` or ``documents`` that :func:`context_parallel` was given.
    """
    where = "ringattn.context_parallel_unshard"
    Masks.checked(documents, None, None, where)
    layout = resolve_layout(layout, "zigzag", documents, where)
    pg = comm.resolve_group(group)
    full = []
    for i, (buf, dim) in enumerate(zip(buffers, seq_dims, strict=True)):
        if not isinstance(buf, Tensor):
            raise TypeError(f"buffers[{i}] must be a torch.Tensor, got {type(buf).__name__}")
        dim %= buf.dim()
        if documents is not None:
            full.append(unshard(buf.detach(), pg, dim=dim, documents=documents))
        else:
            full.append(unshard_shards(comm.all_gather(buf.detach(), pg), dim=dim, layout=layout))
    return full
