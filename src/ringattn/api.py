"""Public functions: ``ring_attention``, ``shard``, ``unshard`` and ``set_cuda_graphs``.

Argument checking and the cross-rank agreement live in :mod:`ringattn.checks`; this module
turns a checked call into the ring's autograd function (or its CUDA-graph replay).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm, ops
from .balance import balanced_placement
from .checks import CheckMode, _call_key, checked_call, set_cross_rank_check
from .graphs import GraphedRing, GraphedRingFunction, RecordingFailed
from .layout import LAYOUTS, shard_for_rank, unshard_shards
from .mask_calls import masked_ring_attention
from .masks import Documents, MaskMod
from .ring import RingAttentionFunction, RingCall
from .symmetric import shift_fits, symmetric_ring_for, symmetric_ring_made

logger = logging.getLogger("ringattn")

__all__ = [
    "CheckMode",
    "ring_attention",
    "set_cross_rank_check",
    "set_cuda_graphs",
    "shard",
    "unshard",
]


# Masked calls plan per batch in Python; inside a compiled region they run eagerly.
_masked_eager = torch.compiler.disable(masked_ring_attention)


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: object = ...,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    layout: str = ...,
    backend: str = ...,
    return_lse: Literal[False] = ...,
    documents: Documents | None = ...,
    window: tuple[int, int] | None = ...,
    mask_mod: MaskMod | None = ...,
) -> Tensor: ...


@overload
def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: object = ...,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    layout: str = ...,
    backend: str = ...,
    return_lse: Literal[True],
    documents: Documents | None = ...,
    window: tuple[int, int] | None = ...,
    mask_mod: MaskMod | None = ...,
) -> tuple[Tensor, Tensor]: ...


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: object = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    backend: str = "auto",
    return_lse: bool = False,
    documents: Documents | None = None,
    window: tuple[int, int] | None = None,
    mask_mod: MaskMod | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Each rank passes its own shard and gets back the matching shard of
    ``softmax(q k^T * scale) v`` computed over the *whole* sequence, as if one device had
    run ordinary attention on it. Differentiable in q, k and v.

    Args:
        q: this rank's queries ``[B, H, S_local, D]``.
        k, v: this rank's keys and values ``[B, H_kv, S_local, D]``, ``H % H_kv == 0``
            (grouped-query and multi-query attention; K/V travel with their own head count).
        group: a ProcessGroup or a 1-D DeviceMesh (default: the world).
        causal: apply the causal mask over global positions.
        scale: softmax scale, default ``1 / sqrt(D)``.
        layout: how the sequence was split (see :func:`shard`): ``"zigzag"`` (balanced
            causal work; rank r holds chunks r and 2N-1-r of 2N) or ``"contiguous"``.
        backend: ``"flash"``, ``"efficient"``, ``"cudnn"`` (CUDA), ``"cpu"``, ``"math"``, or
            ``"auto"`` (the fastest that takes the inputs; logged at DEBUG on ``ringattn``).
        return_lse: also return the log-sum-exp ``[B, H, S_local]`` (float32, float64 for
            float64 inputs). It carries no gradient.
        documents: packed documents (:class:`ringattn.Documents`, built once per batch): a
            query sees only keys of its own document; padding sees and is seen by nothing.
            The shards must be those ``ringattn.shard(x, group, documents=documents)`` cut
            (the library's work-balanced layout); ``layout`` is then ignored.
        window: ``(left, right)`` sliding window (-1 = unbounded): query i sees keys j with
            ``i - left <= j <= i + right`` (FlashAttention's convention).
        mask_mod: ``fn(b, h, q_idx, kv_idx) -> bool tensor`` over global positions
            (FlexAttention's convention, called on broadcastable index tensors), for masks
            the others do not express. All masks combine with each other and ``causal``;
            rows that see no key return 0 (and lse -inf). Under masks the ring keeps its
            memory bound (two K/V blocks) but on GPUs recomputes each masked block's
            forward in the backward; :func:`ringattn.attention` with ``strategy="auto"``
            fetches the keys the mask needs and is faster where they fit.

    Returns:
        This rank's output shard ``[B, H, S_local, D]`` in q's dtype, and the lse if asked.

    Raises:
        ValueError, TypeError: bad arguments, on every rank of the group, before any K/V
            moves; also when ranks disagree on shapes, dtype or options (checked for each new
            call signature; see :func:`set_cross_rank_check`).
    """
    compiling = torch.compiler.is_compiling()
    if compiling and ops.traceable_masks(documents, window, mask_mod):
        # One opaque op in the compiled graph; its body is this function, run eagerly.
        # Documents travel as a tensor input, a window as a static argument.
        out, lse = ops.traced_call(
            "ring", q, k, v, group, causal, scale, layout, backend, "", documents, window
        )
        return (out, lse) if return_lse else out
    if documents is not None or window is not None or mask_mod is not None:
        # A mask function is Python the op cannot carry: under torch.compile the call runs
        # eagerly (a graph break; fullgraph=True raises).
        run = _masked_eager if compiling else masked_ring_attention
        return run(
            q,
            k,
            v,
            group,
            causal=causal,
            scale=scale,
            layout=layout,
            backend=backend,
            return_lse=return_lse,
            documents=documents,
            window=window,
            mask_mod=mask_mod,
        )
    group = comm.resolve_group(group)
    key = _call_key(group, q, k, v, causal, scale, layout, backend, return_lse)
    call = checked_call(group, q, k, v, causal, scale, layout, backend, return_lse, key)
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    k, v = k.contiguous(), v.contiguous()
    call = _with_transport(key, q, k, v, call)
    found = _graphed_ring(key, q, k, v, call)
    if found is not None:
        slot, programs = found
        try:
            out, lse = GraphedRingFunction.apply(q, k, v, programs, return_lse)
            return (out, lse) if return_lse else out
        except RecordingFailed as err:
            # Recording moves no data, so running this call eagerly keeps ranks in step.
            logger.warning("ringattn: this call signature runs eagerly from now on (%s)", err)
            _GRAPHED.pop(slot, None)
            _EAGER_ONLY.add(key)
    out, lse = RingAttentionFunction.apply(q, k, v, call)
    return (out, lse) if return_lse else out


# The call each signature runs with: its shifts on symmetric memory where that applies
# (see _with_transport), else the checked call as it is.
_TRANSPORTED: dict[tuple, RingCall] = {}


def _with_transport(key: tuple | None, q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> RingCall:
    """``call`` with its shifts on symmetric memory where they fit (CUDA, one host).

    The choice depends only on what every rank agreed on (the call's shapes and dtype, and
    the group's ranks sharing a host), so every rank makes it alike; that matters because
    symmetric-memory shifts and NCCL ones do not pair with each other.
    """
    if call.ring is None or not q.is_cuda or key is None:
        return call
    found = _TRANSPORTED.get(key)
    if found is not None:
        return found
    if torch.cuda.is_current_stream_capturing() and not symmetric_ring_made(
        call.ring.group, q.device
    ):
        return call  # setting the buffers up allocates and synchronises: not under capture
    found = call
    # The largest shift: K and V, or their gradients accumulated in float32 (or float64).
    wide = max(k.element_size(), 4)
    if shift_fits([k.numel() * wide, v.numel() * wide]):
        ring = symmetric_ring_for(call.ring.group, q.device)
        if ring is not None:
            found = dataclasses.replace(call, ring=ring)
    if len(_TRANSPORTED) >= 256:
        _TRANSPORTED.clear()
    _TRANSPORTED[key] = found
    return found


# Asked on every call: the raw queries cost the host about a microsecond each, where
# torch.cuda's wrappers (which build Stream objects) cost tens.
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_capturing = getattr(
    torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing
)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _current_stream_handle(device_index: int) -> int:
    """The current stream of ``device_index`` as its raw ``cudaStream_t``."""
    if _raw_stream is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


def _graphed_ring(
    key: tuple | None, q: Tensor, k: Tensor, v: Tensor, call: RingCall
) -> tuple[tuple, GraphedRing] | None:
    """``(slot, programs)`` for this call, or None where it runs eagerly."""
    if not _cuda_graphs or key is None or call.ring is None or not q.is_cuda:
        return None
    if q.device.index != _current_device():
        return None  # recording happens on the current device's streams
    if _capturing():
        return None  # inside someone else's capture, which records the eager ring
    # Programs own their buffers, so calls on two streams (overlapped micro-batches) must
    # not share one; a call's backward runs on its forward's stream.
    slot = (key, _current_stream_handle(q.device.index))
    graphed = _GRAPHED.get(slot)
    if graphed is not None:
        return slot, graphed
    ranks = call.ring.size
    captured_shifts = getattr(call.ring, "capturable", False)
    if key in _EAGER_ONLY or (
        _cuda_graphs == "auto" and not _graph_now(key, q, k, ranks, captured_shifts)
    ):
        return None
    if len(_GRAPHED) >= _GRAPHED_LIMIT:
        # Callers never hold program memory (results are copied out), so the oldest
        # signature's programs can go; a pending backward keeps its own alive.
        del _GRAPHED[next(iter(_GRAPHED))]
    graphed = _GRAPHED[slot] = GraphedRing(q, k, v, call)
    return slot, graphed


def _ring_entry(q, k, v, group, causal, scale, layout, backend, strategy, **masks):  # noqa: ANN001
    return ring_attention(
        q,
        k,
        v,
        group,
        causal=causal,
        scale=scale,
        layout=layout,
        backend=backend,
        return_lse=True,
        **masks,
    )


ops.register_entry("ring", _ring_entry)

# "auto" by default. The programs keep NCCL out of their graphs (see graphs.py), so they
# are safe to keep alive through destroy_process_group() and need no agreement between
# ranks on when to record.
_cuda_graphs: bool | str = "auto"
_GRAPHED: dict[tuple, GraphedRing] = {}
_GRAPHED_LIMIT = 8
_EAGER_ONLY: set[tuple] = set()
# "auto": a signature is recorded on its third call (the first ones build kernel plans),
# and only while one ring step's attention is small, where issuing the work costs the host
# more than the GPU takes to run it. The measure is B*H*S_q*S_k*D of a full-shard step per
# rank of the ring: replay saves host time on every step (as many as ranks) and costs
# copies in and out once per call. Measured on 2 and 4 H100s (32/8 heads x 128, causal,
# forward+backward). With NCCL shifts between the graphs, replay wins at 4K tokens on 2
# ranks (1.7e10 / 2) and at 8K-16K on 4 (up to 6.9e10 / 4), and on 2 ranks at 8K
# (6.9e10 / 2) the copies cost more than it saves. With symmetric-memory shifts inside
# the graphs (one launch per pass) it also wins at 8K on 2 ranks.
_AUTO_GRAPH_WORK_PER_RANK = 1.8e10
_AUTO_GRAPH_WORK_PER_RANK_CAPTURED_SHIFTS = 4.0e10
_AUTO_GRAPH_CALLS = 3
_SEEN: dict[tuple, int] = {}


def _graph_now(key: tuple, q: Tensor, k: Tensor, ranks: int, captured_shifts: bool) -> bool:
    """Whether the automatic mode records this signature now (see
    ``_AUTO_GRAPH_WORK_PER_RANK``)."""
    work = q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3)
    per_rank = (
        _AUTO_GRAPH_WORK_PER_RANK_CAPTURED_SHIFTS if captured_shifts else _AUTO_GRAPH_WORK_PER_RANK
    )
    if work > per_rank * ranks:
        return False  # long steps
    seen = _SEEN.get(key, 0) + 1
    if len(_SEEN) >= 1024:
        _SEEN.clear()
    _SEEN[key] = seen
    return seen >= _AUTO_GRAPH_CALLS


def set_cuda_graphs(enabled: bool | Literal["auto"]) -> None:
    """Replay rings as CUDA graphs: ``"auto"`` (default), True, or False.

    Made for short sequences, where issuing a call's kernels takes the host longer than the
    GPU takes to run them. A recorded signature's later calls copy their inputs in, launch
    its graphs and copy the results out: one graph per pass where the ring shifts through
    symmetric memory (ranks on one host, K/V up to 64 MiB: see :mod:`ringattn.symmetric`),
    else one graph per stretch of compute between the ring's transfers, which stay ordinary
    NCCL calls. The programs and buffers of the 8 most recent signatures (per CUDA stream)
    are kept; this call frees them.

    - ``"auto"`` (default): CUDA tensors on 2+ ranks whose per-step attention is small
      (B*H*S_q*S_k*D of a full shard <= 4e10 per rank of the group with symmetric-memory
      shifts: 8K tokens on 2 ranks, 16K on 4, at 32 heads x 128; 1.8e10 with NCCL ones),
      from a signature's third call; never while the current stream is being captured
      (CUDA graphs or ``torch.compile(mode="reduce-overhead")`` record the eager ring
      instead). A signature whose compute CUDA graphs cannot capture runs eagerly from then
      on (logged as a warning).
    - ``True``: every CUDA call on 2+ ranks, from its first call (also for long sequences,
      where the copies cost more than replay saves, and for shapes that change from step
      to step, which record again each time).
    - ``False``: never.

    Ranks need not agree on this setting: a replaying rank issues the same transfers, in
    the same order, as an eager one.
    """
    global _cuda_graphs
    if enabled != "auto" and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or 'auto', got {enabled!r}")
    _cuda_graphs = enabled
    _GRAPHED.clear()
    _SEEN.clear()
    _EAGER_ONLY.clear()


def _check_shard_arguments(
    x: object, group: object, dim: object, layout: object, documents: object = None
) -> tuple[dist.ProcessGroup, int]:
    pg = comm.resolve_mesh(group).flat
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if documents is not None and not isinstance(documents, Documents):
        raise TypeError(
            f"documents must be a ringattn.Documents or None, got {type(documents).__name__}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
    return pg, dim % x.dim()


def shard(
    x: Tensor,
    group: object = None,
    *,
    dim: int = 2,
    layout: str = "zigzag",
    documents: Documents | None = None,
) -> Tensor:
    """This rank's shard of the full tensor ``x`` (identical on every rank) along ``dim``.

    ``group``: None (the world), a ProcessGroup, or a 1-D or 2-D DeviceMesh (a 2-D mesh
    splits the sequence over all its ranks in row-major order, the layout that every
    strategy of :func:`ringattn.attention` takes on it).
    ``"zigzag"`` cuts ``x`` into 2N chunks and keeps chunks r and 2N-1-r (a new tensor);
    ``"contiguous"`` keeps chunk r of N (a view). ``x.size(dim)`` must divide evenly.
    With ``documents``, the layout is the work-balanced one the library picks for that
    batch (``layout`` is ignored): equal token counts per rank, no document padded, every
    rank's attention work within a few percent of the others' (see
    :func:`ringattn.layout_imbalance`). Needs no communication. Differentiable.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout, documents)
    rank, world_size, _ = comm.group_facts(pg)
    if documents is not None:
        placement = _document_placement(x, dim, documents, world_size)
        return x.index_select(dim, placement.positions(rank).to(x.device))
    return shard_for_rank(x, rank, world_size, dim=dim, layout=layout)


def _document_placement(x: Tensor, dim: int, documents: Documents, world_size: int):
    if x.size(dim) != documents.seq_len:
        raise ValueError(
            f"x.size({dim}) = {x.size(dim)} must equal the documents' sequence length "
            f"{documents.seq_len}"
        )
    return balanced_placement(documents, world_size)


def unshard(
    x: Tensor,
    group: object = None,
    *,
    dim: int = 2,
    layout: str = "zigzag",
    documents: Documents | None = None,
) -> Tensor:
    """The full tensor on every rank, from each rank's shard ``x`` along ``dim``.

    The inverse of :func:`shard` (pass the same ``documents``); every rank's shard must
    have the same shape.
    Communicates (an all-gather) and returns a tensor without gradient history.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout, documents)
    if documents is not None:
        world_size = comm.group_facts(pg)[1]
        if x.size(dim) * world_size != documents.seq_len:
            raise ValueError(
                f"x.size({dim}) = {x.size(dim)} x {world_size} ranks must equal the documents' "
                f"sequence length {documents.seq_len}"
            )
        placement = balanced_placement(documents, world_size)
        gathered = torch.cat(comm.all_gather(x.detach(), pg), dim=dim)
        order = placement.permutation().argsort().to(x.device)
        return gathered.index_select(dim, order)
    if layout == "zigzag" and comm.group_facts(pg)[1] > 1 and x.size(dim) % 2:
        raise ValueError(
            f"x.size({dim}) = {x.size(dim)} must be even: a zigzag shard holds two equal chunks"
        )
    return unshard_shards(comm.all_gather(x.detach(), pg), dim=dim, layout=layout)
