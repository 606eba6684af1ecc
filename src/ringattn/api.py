"""Public functions: ``ring_attention``, ``shard``, ``unshard``, with argument checking.

Bad arguments raise ``ValueError``/``TypeError`` naming the argument, on every rank, before
the ring starts: each rank checks its own arguments, then one small all-gather of a
fixed-size description (shapes, dtype, options, and whether the rank rejected its inputs)
lets every rank see every other rank's verdict, so a problem on one rank, or shapes that
differ between ranks, raise everywhere instead of leaving the others waiting forever.
"""

from __future__ import annotations

import math
import struct
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .kernels import BACKENDS, Kernel, select_kernel
from .layout import LAYOUTS, ring_plan, shard_for_rank, unshard_shards
from .ring import RingAttentionFunction, RingCall

__all__ = ["ring_attention", "shard", "unshard"]

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


def _agree_across_ranks(
    group: dist.ProcessGroup, device: torch.device, mine: list[int], rejected: _Rejected | None
) -> None:
    """All-gather every rank's description; raise the same verdict on every rank."""
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    rows = [row.tolist() for row in comm.all_gather(local, group)]
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
            moves; also when ranks disagree on shapes, dtype or options.
    """
    group = comm.resolve_group(group)
    world_size = dist.get_world_size(group)
    rejected: _Rejected | None = None
    scale_value, kernel = 0.0, None
    try:
        scale_value, kernel = _check_arguments(
            q, k, v, group, world_size, causal, scale, layout, backend, return_lse
        )
    except _Rejected as err:
        rejected = err
    if world_size > 1:
        preferred = q.device if isinstance(q, Tensor) else None
        _agree_across_ranks(
            group,
            comm.collective_device(group, preferred),
            _describe(q, k, v, causal, scale_value, layout, backend, rejected),
            rejected,
        )
    elif rejected is not None:
        raise rejected.exc_type(f"ring_attention: {rejected.message}")

    assert kernel is not None
    rank = dist.get_rank(group)
    call = RingCall(
        ring=comm.Ring(group) if world_size > 1 else None,
        plans=tuple(ring_plan(rank, world_size, causal=causal, layout=layout)),
        kernel=kernel,
        scale=scale_value,
    )
    out, lse = RingAttentionFunction.apply(q, k.contiguous(), v.contiguous(), call)
    return (out, lse) if return_lse else out


def _check_shard_arguments(
    x: object, group: object, dim: object, layout: object
) -> tuple[dist.ProcessGroup, int]:
    pg = comm.resolve_group(group)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}), got {dim!r}")
    return pg, dim % x.dim()


def shard(x: Tensor, group: object = None, *, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor ``x`` (identical on every rank) along ``dim``.

    ``"zigzag"`` cuts ``x`` into 2N chunks and keeps chunks r and 2N-1-r (a new tensor);
    ``"contiguous"`` keeps chunk r of N (a view). ``x.size(dim)`` must divide evenly.
    Needs no communication. Differentiable.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout)
    return shard_for_rank(x, dist.get_rank(pg), dist.get_world_size(pg), dim=dim, layout=layout)


def unshard(x: Tensor, group: object = None, *, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """The full tensor on every rank, from each rank's shard ``x`` along ``dim``.

    The inverse of :func:`shard`; every rank's shard must have the same shape.
    Communicates (an all-gather) and returns a tensor without gradient history.
    """
    pg, dim = _check_shard_arguments(x, group, dim, layout)
    if layout == "zigzag" and dist.get_world_size(pg) > 1 and x.size(dim) % 2:
        raise ValueError(
            f"x.size({dim}) = {x.size(dim)} must be even: a zigzag shard holds two equal chunks"
        )
    return unshard_shards(comm.all_gather(x.detach(), pg), dim=dim, layout=layout)
