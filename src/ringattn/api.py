"""Public functions: ``ring_attention``, ``shard``, ``unshard``, with argument checking.

Bad arguments raise ``ValueError``/``TypeError`` naming the argument, on every rank, before
the ring starts: each rank checks its own arguments, then one small all-gather of a
fixed-size description (shapes, dtype, options, and whether the rank rejected its inputs)
lets every rank see every other rank's verdict, so a problem on one rank, or shapes that
differ between ranks, raise everywhere instead of leaving the others waiting forever. For
CUDA-only (NCCL) groups the check runs on a Gloo group over the same ranks, made once.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .graphs import GraphedRing, GraphedRingFunction
from .kernels import BACKENDS, Kernel, select_kernel
from .layout import LAYOUTS, BlockPlan, ring_plan, shard_for_rank, unshard_shards
from .ring import RingAttentionFunction, RingCall

__all__ = [
    "CheckMode",
    "ring_attention",
    "set_cross_rank_check",
    "set_cuda_graphs",
    "shard",
    "unshard",
]

# Arguments a rank can reject; their index (plus one) travels in the cross-rank check.
_ARGUMENTS = ("q", "k", "v", "causal", "scale", "layout", "backend", "return_lse")
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)
_DEVICE_TYPES = ("cpu", "cuda")
_FIELDS = (
    "rejected argument",
    "q.shape[0] (batch)",
    "q.shape[1] (heads)",
    "k.shape[1] (K/V heads)",
    "q.shape[2] (local queries)",
    "k.shape[2] (local keys)",
    "q.shape[3] (head dim)",
    "v.shape[3] (value head dim)",
    "dtype",
    "device type",
    "causal",
    "layout",
    "backend",
    "scale",
)


class _Rejected(Exception):
    """A rank-local argument problem, raised later as ``exc_type`` once every rank knows."""

    def __init__(self, argument: str, exc_type: type[Exception], message: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.exc_type = exc_type
        self.message = message


def _check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise _Rejected(name, TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise _Rejected(
            name,
            ValueError,
            f"{name} must be 4-D [batch, heads, local_seq, head_dim], got shape {tuple(x.shape)}",
        )
    if not x.is_floating_point():
        raise _Rejected(name, TypeError, f"{name} must be floating point, got {x.dtype}")
    return x


def _check_arguments(
    q: object,
    k: object,
    v: object,
    group: dist.ProcessGroup,
    world_size: int,
    causal: object,
    scale: object,
    layout: object,
    backend: object,
    return_lse: object,
) -> tuple[float, Kernel]:
    """Raise ``_Rejected`` for the first bad argument; return the scale and the kernel to use."""
    q, k, v = _check_tensor("q", q), _check_tensor("k", k), _check_tensor("v", v)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise _Rejected(
                name, TypeError, f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}"
            )
        if x.device != q.device:
            raise _Rejected(
                name, ValueError, f"{name} must be on q's device {q.device}, got {x.device}"
            )
        if x.size(0) != q.size(0):
            raise _Rejected(
                name,
                ValueError,
                f"{name}.shape[0] (batch) must equal q's {q.size(0)}, got {x.size(0)}",
            )
    if v.shape[:3] != k.shape[:3]:
        raise _Rejected(
            "v",
            ValueError,
            f"v must match k in batch, heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}",
        )
    if k.size(3) != q.size(3):
        raise _Rejected(
            "k", ValueError, f"k.shape[3] (head dim) must equal q's {q.size(3)}, got {k.size(3)}"
        )
    if q.size(1) % k.size(1):
        raise _Rejected(
            "k",
            ValueError,
            f"q's heads ({q.size(1)}) must be a multiple of k's heads ({k.size(1)}) for GQA/MQA",
        )
    if not isinstance(causal, bool):
        raise _Rejected("causal", TypeError, f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise _Rejected(
            "return_lse", TypeError, f"return_lse must be a bool, got {type(return_lse).__name__}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(3))
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _Rejected(
            "scale", TypeError, f"scale must be a float or None, got {type(scale).__name__}"
        )
    elif not math.isfinite(scale):
        raise _Rejected("scale", ValueError, f"scale must be finite, got {scale}")
    if layout not in LAYOUTS:
        raise _Rejected("layout", ValueError, f"layout must be one of {LAYOUTS}, got {layout!r}")
    if backend not in BACKENDS:
        raise _Rejected(
            "backend", ValueError, f"backend must be one of {BACKENDS}, got {backend!r}"
        )
    if causal and q.size(2) != k.size(2):
        raise _Rejected(
            "k",
            ValueError,
            f"causal=True needs as many local keys as queries, got q {q.size(2)} and k {k.size(2)}",
        )
    if layout == "zigzag" and world_size > 1:
        for name, x in (("q", q), ("k", k)):
            if x.size(2) % 2:
                raise _Rejected(
                    name,
                    ValueError,
                    f"layout='zigzag' holds two equal chunks per rank, so {name}.shape[2] must be "
                    f"even, got {x.size(2)}; use ringattn.shard(..., layout='zigzag') to split",
                )
    if q.device.type not in comm.backend_device_types(group):
        raise _Rejected(
            "q",
            ValueError,
            f"q is on {q.device} but the group's backend ({dist.get_backend(group)}) cannot "
            f"send {q.device.type} tensors; use NCCL for CUDA tensors and Gloo for CPU tensors",
        )
    try:
        kernel = select_kernel(backend, q, k, v, causal)  # type: ignore[arg-type]
    except ValueError as err:
        raise _Rejected("backend", ValueError, str(err)) from None
    return float(scale), kernel


def _describe(
    q: object,
    k: object,
    v: object,
    causal: object,
    scale: float,
    layout: object,
    backend: object,
    rejected: _Rejected | None,
) -> list[int]:
    """A fixed-length integer description of this rank's call, for the cross-rank check."""
    if rejected is not None:
        return [_ARGUMENTS.index(rejected.argument) + 1] + [0] * (len(_FIELDS) - 1)
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    dtype_id = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else len(_DTYPES)
    device_id = _DEVICE_TYPES.index(q.device.type) if q.device.type in _DEVICE_TYPES else 9
    (scale_bits,) = struct.unpack("<q", struct.pack("<d", scale))
    return [
        0,
        q.size(0),
        q.size(1),
        k.size(1),
        q.size(2),
        k.size(2),
        q.size(3),
        v.size(3),
        dtype_id,
        device_id,
        int(bool(causal)),
        LAYOUTS.index(layout),
        BACKENDS.index(backend),  # type: ignore[arg-type]
        scale_bits,
    ]


def _field_text(field: int, value: int) -> str:
    name = _FIELDS[field]
    if name == "dtype":
        return str(_DTYPES[value]) if value < len(_DTYPES) else "another dtype"
    if name == "device type":
        return _DEVICE_TYPES[value] if value < len(_DEVICE_TYPES) else "another device"
    if name == "layout":
        return repr(LAYOUTS[value])
    if name == "backend":
        return repr(BACKENDS[value])
    if name == "causal":
        return str(bool(value))
    if name == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    return str(value)


CheckMode = Literal["once", "always", "never"]
_CHECK_MODES: tuple[str, ...] = ("once", "always", "never")
_check_mode: str = "always"
# Descriptions every rank of a group has agreed on (mode "once"), per group.
_AGREED: dict[dist.ProcessGroup, set[tuple[int, ...]]] = {}
_AGREED_LIMIT = 1024


def set_cross_rank_check(mode: CheckMode) -> None:
    """How often :func:`ring_attention` (and :func:`ringattn.attention`) checks that every
    rank made the same call.

    - ``"always"`` (default): every call. Each rank's own checks are cached per call
      signature (shapes, dtype, device type, causal, layout, backend, scale); what remains
      per call is one all-gather of 14 integers on a host-side (Gloo) group, so a rank that
      alone changes its call raises on every rank instead of hanging.
    - ``"once"``: only the first time a rank sees a signature on a group, which saves that
      all-gather on short, host-bound calls. When every rank changes shape together, every
      rank checks again; a rank that alone switches to a new signature after the others'
      was agreed cannot be caught before the ring: the others fail at the process group's
      timeout (:class:`ringattn.RingCommunicationError` on Gloo).
    - ``"never"``: no check; mismatched ranks fail at the process group's timeout.

    The environment variable ``RINGATTN_CROSS_RANK_CHECK`` sets the mode at import.
    Each rank's own argument checks run in every mode.
    """
    global _check_mode
    if mode not in _CHECK_MODES:
        raise ValueError(f"mode must be one of {_CHECK_MODES}, got {mode!r}")
    _check_mode = mode
    _AGREED.clear()
    _PREPARED.clear()


def _mode_from_environment() -> None:
    mode = os.environ.get("RINGATTN_CROSS_RANK_CHECK")
    if mode:
        try:
            set_cross_rank_check(mode)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(
                f"RINGATTN_CROSS_RANK_CHECK must be one of {_CHECK_MODES}, got {mode!r}"
            ) from None


def _agree_across_ranks(
    group: dist.ProcessGroup,
    preferred: torch.device | None,
    mine: list[int],
    rejected: _Rejected | None,
) -> None:
    """All-gather every rank's description; raise the same verdict on every rank.

    Runs on a host-side (Gloo) group over the same ranks where there is one, so the check
    costs a few tens of microseconds of CPU time and never waits for queued GPU work.
    """
    check_group = comm.host_group(group)
    if check_group is None:
        check_group, device = group, comm.collective_device(group, preferred)
    else:
        device = torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    try:
        rows = [row.tolist() for row in comm.all_gather(local, check_group)]
    except Exception as err:  # noqa: BLE001 - re-raised with what it was for
        raise comm.RingCommunicationError(
            "ring_attention: the cross-rank check of this call could not reach every rank "
            "(a rank raised, died, or is making another call); no rank started the ring. "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    rank = dist.get_rank(group)
    if rejected is not None:
        raise rejected.exc_type(f"ring_attention: {rejected.message}")
    for other, row in enumerate(rows):
        if row[0]:
            raise ValueError(
                f"ring_attention: rank {other} rejected its `{_ARGUMENTS[row[0] - 1]}` argument "
                f"(its own error says why); no rank started the ring"
            )
    for field in range(1, len(_FIELDS)):
        values = {row[field] for row in rows}
        if len(values) > 1:
            per_rank = ", ".join(
                f"rank {r}: {_field_text(field, row[field])}" for r, row in enumerate(rows)
            )
            raise ValueError(
                f"ring_attention: every rank must call with the same {_FIELDS[field]}, but "
                f"{per_rank} (this is rank {rank}); no rank started the ring"
            )


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

    Returns:
        This rank's output shard ``[B, H, S_local, D]`` in q's dtype, and the lse if asked.

    Raises:
        ValueError, TypeError: bad arguments, on every rank of the group, before any K/V
            moves; also when ranks disagree on shapes, dtype or options (checked for each new
            call signature; see :func:`set_cross_rank_check`).
    """
    group = comm.resolve_group(group)
    key = _call_key(group, q, k, v, causal, scale, layout, backend, return_lse)
    call = checked_call(group, q, k, v, causal, scale, layout, backend, return_lse, key)
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    k, v = k.contiguous(), v.contiguous()
    if _cuda_graphs and key is not None and call.ring is not None and q.is_cuda:
        graphed = _GRAPHED.get(key)
        if graphed is None:
            if len(_GRAPHED) >= _GRAPHED_LIMIT:
                # Callers never hold graph memory (results are copied out), so the oldest
                # signature's graphs can go; a pending backward keeps its own alive.
                del _GRAPHED[next(iter(_GRAPHED))]
            graphed = _GRAPHED[key] = GraphedRing(q, k, v, call)
        out, lse = GraphedRingFunction.apply(q, k, v, graphed)
    else:
        out, lse = RingAttentionFunction.apply(q, k, v, call)
    return (out, lse) if return_lse else out


_cuda_graphs = False
_GRAPHED: dict[tuple, GraphedRing] = {}
_GRAPHED_LIMIT = 8


def set_cuda_graphs(enabled: bool) -> None:
    """Replay each call signature's ring as CUDA graphs (experimental; CUDA, 2+ ranks).

    Made for short sequences, where issuing a call's kernels and transfers takes the host
    longer than the GPU takes to run them. The first call of a signature, forward and then
    backward, captures its graphs (every rank of the group must make it, as for any call);
    later calls copy their inputs in, launch one graph, and copy the results out. The graphs
    and their buffers of the 8 most recent signatures are kept; not for calls whose shapes
    change from step to step. Off by default. On 2x H200 this takes causal cuDNN
    forward+backward at 4K tokens (GQA 32/8) from 0.75x to 1.27x one GPU; from 8K on, the
    copies cost more than the launches save (1.57x against 1.73x without).
    """
    global _cuda_graphs
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _cuda_graphs = enabled
    _GRAPHED.clear()


# Calls already checked (and agreed across ranks), by everything the checks looked at: a
# repeated call skips straight to the ring. Cleared by set_cross_rank_check.
_PREPARED: dict[tuple, tuple[RingCall, list[int] | None]] = {}
_PREPARED_LIMIT = 256


def _call_key(
    group: dist.ProcessGroup,
    q: object,
    k: object,
    v: object,
    causal: object,
    scale: object,
    layout: object,
    backend: object,
    return_lse: object,
) -> tuple | None:
    """A hashable key of everything argument checking depends on, or None if unusual."""
    if not (
        type(q) is Tensor
        and type(k) is Tensor
        and type(v) is Tensor
        and type(causal) is bool
        and type(return_lse) is bool
        and (scale is None or type(scale) in (float, int))
        and type(layout) is str
        and type(backend) is str
    ):
        return None
    grad = torch.is_grad_enabled()
    return (
        group,
        causal,
        scale,
        layout,
        backend,
        return_lse,
        grad,
        *(
            (x.shape, x.stride(), x.dtype, x.device, x.requires_grad)
            for x in (q, k, v)  # type: ignore[union-attr]
        ),
    )


def checked_call(
    group: dist.ProcessGroup,
    q: object,
    k: object,
    v: object,
    causal: object,
    scale: object,
    layout: object,
    backend: object,
    return_lse: object = False,
    key: tuple | None | bool = True,
) -> RingCall:
    """The checked (and agreed across ``group``) call for these arguments, cached by signature.

    Raises ValueError/TypeError on every rank of ``group`` for bad arguments, as
    :func:`ring_attention` does. ``key``: the signature key if already computed.
    """
    if key is True:
        key = _call_key(group, q, k, v, causal, scale, layout, backend, return_lse)
    entry = _PREPARED.get(key) if key is not None else None  # type: ignore[arg-type]
    if entry is None:
        entry = _prepare(group, q, k, v, causal, scale, layout, backend, return_lse)
        if key is not None:
            if len(_PREPARED) >= _PREPARED_LIMIT:
                _PREPARED.clear()
            _PREPARED[key] = entry  # type: ignore[index]
    elif _check_mode == "always" and entry[1] is not None:
        # Local checks are cached; the ranks still compare this call's description.
        _agree_across_ranks(group, q.device if isinstance(q, Tensor) else None, entry[1], None)
    return entry[0]


def _prepare(
    group: dist.ProcessGroup,
    q: object,
    k: object,
    v: object,
    causal: object,
    scale: object,
    layout: object,
    backend: object,
    return_lse: object,
) -> RingCall:
    """Check the arguments on this rank and across ranks: the ring call they describe, and
    the description the ranks compared (None on a single rank or with checks off)."""
    rank, world_size, _ = comm.group_facts(group)
    rejected: _Rejected | None = None
    scale_value, kernel = 0.0, None
    try:
        scale_value, kernel = _check_arguments(
            q, k, v, group, world_size, causal, scale, layout, backend, return_lse
        )
    except _Rejected as err:
        rejected = err
    description = None
    if world_size > 1 and _check_mode != "never":
        description = _describe(q, k, v, causal, scale_value, layout, backend, rejected)
        agreed = _AGREED.setdefault(group, set())
        if rejected is not None or tuple(description) not in agreed:
            device = q.device if isinstance(q, Tensor) else None
            _agree_across_ranks(group, device, description, rejected)
            if _check_mode == "once":
                if len(agreed) >= _AGREED_LIMIT:
                    agreed.clear()
                agreed.add(tuple(description))
    elif rejected is not None:
        raise rejected.exc_type(f"ring_attention: {rejected.message}")
    assert kernel is not None
    call = RingCall(
        ring=comm.ring_for(group) if world_size > 1 else None,
        plans=_plans(rank, world_size, causal, layout),  # type: ignore[arg-type]
        kernel=kernel,
        scale=scale_value,
        next_last_plan=_plans((rank + 1) % world_size, world_size, causal, layout)[-1],  # type: ignore[arg-type]
    )
    return call, description


@functools.lru_cache(maxsize=256)
def _plans(rank: int, world_size: int, causal: bool, layout: str) -> tuple[BlockPlan | None, ...]:
    return tuple(ring_plan(rank, world_size, causal=causal, layout=layout))


def _check_shard_arguments(
    x: object, group: object, dim: object, layout: object
) -> tuple[dist.ProcessGroup, int]:
    pg = comm.resolve_mesh(group).flat
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
    return pg, dim % x.dim()


def shard(x: Tensor, group: object = None, *, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor ``x`` (identical on every rank) along ``dim``.

    ``group``: None (the world), a ProcessGroup, or a 1-D or 2-D DeviceMesh (a 2-D mesh
    splits the sequence over all its ranks in row-major order, the layout that every
    strategy of :func:`ringattn.attention` takes on it).
    ``"zigzag"`` cuts ``x`` into 2N chunks and keeps chunks r and 2N-1-r (a new tensor);
    ``"contiguous"`` keeps chunk r of N (a view). ``x.size(dim)`` must divide evenly.
    Needs no communication. Differentiable.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout)
    rank, world_size, _ = comm.group_facts(pg)
    return shard_for_rank(x, rank, world_size, dim=dim, layout=layout)


def unshard(x: Tensor, group: object = None, *, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """The full tensor on every rank, from each rank's shard ``x`` along ``dim``.

    The inverse of :func:`shard`; every rank's shard must have the same shape.
    Communicates (an all-gather) and returns a tensor without gradient history.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout)
    if layout == "zigzag" and comm.group_facts(pg)[1] > 1 and x.size(dim) % 2:
        raise ValueError(
            f"x.size({dim}) = {x.size(dim)} must be even: a zigzag shard holds two equal chunks"
        )
    return unshard_shards(comm.all_gather(x.detach(), pg), dim=dim, layout=layout)


_mode_from_environment()
