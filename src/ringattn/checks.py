"""Argument checking and the cross-rank agreement for every entry point.

Bad arguments raise ``ValueError``/``TypeError`` naming the argument, on every rank, before
the ring starts: each rank checks its own arguments, then one small all-gather of a
fixed-size description (shapes, dtype, options, and whether the rank rejected its inputs)
lets every rank see every other rank's verdict, so a problem on one rank, or shapes that
differ between ranks, raise everywhere instead of leaving the others waiting forever. For
CUDA-only (NCCL) groups the check runs on a Gloo group over the same ranks, made once.

A checked call (kernel, plans, ring) is cached by everything the checks looked at, so a
repeated call goes straight to the ring; :func:`checked_call` is what the entry points use.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import agreement, comm
from .kernels import BACKENDS, Kernel, select_kernel
from .layout import LAYOUTS, BlockPlan, ring_plan
from .masks import MaskArgumentError
from .ring import RingCall

__all__ = ["CheckMode", "checked_call", "set_cross_rank_check"]

# Arguments a rank can reject; their index (plus one) travels in the cross-rank check.
_ARGUMENTS = (
    "q",
    "k",
    "v",
    "causal",
    "scale",
    "layout",
    "backend",
    "return_lse",
    "documents",
    "window",
    "mask_mod",
)
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
    "mask (documents, window, mask_mod; a digest)",
)


class _Rejected(Exception):
    """A rank-local argument problem, raised later as ``exc_type`` once every rank knows."""

    def __init__(self, argument: str, exc_type: type[Exception], message: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.exc_type = exc_type
        self.message = message


def check_tensor(name: str, x: object, seq: str = "local_seq") -> Tensor:
    """``x`` if it is a 4-D floating-point tensor ``[batch, heads, <seq>, head_dim]``, else
    ``_Rejected`` naming ``name``."""
    if not isinstance(x, Tensor):
        raise _Rejected(name, TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise _Rejected(
            name,
            ValueError,
            f"{name} must be 4-D [batch, heads, {seq}, head_dim], got shape {tuple(x.shape)}",
        )
    if not x.is_floating_point():
        raise _Rejected(name, TypeError, f"{name} must be floating point, got {x.dtype}")
    return x


def check_kv_like_q(q: Tensor, k: Tensor, v: Tensor) -> None:
    """k and v have q's dtype and device; ``_Rejected`` naming the first that does not."""
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise _Rejected(
                name, TypeError, f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}"
            )
        if x.device != q.device:
            raise _Rejected(
                name, ValueError, f"{name} must be on q's device {q.device}, got {x.device}"
            )


def check_scale(scale: object, head_dim: int) -> float:
    """The softmax scale to use (``1 / sqrt(head_dim)`` for None); ``_Rejected`` if bad."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise _Rejected(
            "scale", TypeError, f"scale must be a float or None, got {type(scale).__name__}"
        )
    if not math.isfinite(scale):
        raise _Rejected("scale", ValueError, f"scale must be finite, got {scale}")
    return float(scale)


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
    q, k, v = check_tensor("q", q), check_tensor("k", k), check_tensor("v", v)
    check_kv_like_q(q, k, v)
    for name, x in (("k", k), ("v", v)):
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
    scale = check_scale(scale, q.size(3))
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
    mask: object = None,
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
        mask.fingerprint if mask is not None else 0,  # type: ignore[attr-defined]
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
      per call is one all-gather of 15 integers on a host-side (Gloo) group, so a rank that
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


def exchange_descriptions(
    name: str,
    group: dist.ProcessGroup,
    preferred: torch.device | None,
    mine: list[int],
    action: str,
) -> list[list[int]]:
    """Every rank's description of its call, in group-rank order (any entry point's check).

    Runs on a host-side (Gloo) group over the same ranks where there is one, so it never
    waits for queued GPU work; ranks on one host exchange through shared memory
    (:mod:`ringattn.agreement`). A rank that does not arrive raises
    :class:`~ringattn.RingCommunicationError` saying that no rank ``action``.
    """
    check_group = comm.host_group(group)
    if check_group is None:
        check_group, device = group, comm.collective_device(group, preferred)
    else:
        device = torch.device("cpu")
    try:
        return agreement.exchange(check_group, device, mine)
    except Exception as err:  # noqa: BLE001 - re-raised with what it was for
        raise comm.RingCommunicationError(
            f"{name}: the cross-rank check of this call could not reach every rank "
            f"(a rank raised, died, or is making another call); no rank {action}. "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err


def _agree_across_ranks(
    group: dist.ProcessGroup,
    preferred: torch.device | None,
    mine: list[int],
    rejected: _Rejected | None,
) -> None:
    """All-gather every rank's description; raise the same verdict on every rank.

    Runs on a host-side (Gloo) group over the same ranks where there is one, so the check
    never waits for queued GPU work; ranks on one host exchange through shared memory
    (:mod:`ringattn.agreement`, a few microseconds), others by a Gloo all-gather.
    """
    rows = exchange_descriptions("ring_attention", group, preferred, mine, "started the ring")
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
    mask: object = None,
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
        mask.key if mask is not None else None,  # type: ignore[attr-defined]
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
    mask: object = None,
) -> RingCall:
    """The checked (and agreed across ``group``) call for these arguments, cached by signature.

    Raises ValueError/TypeError on every rank of ``group`` for bad arguments, as
    :func:`ring_attention` does. ``key``: the signature key if already computed.
    ``mask``: the call's mask arguments (see :class:`ringattn.mask_calls.MaskArguments`):
    checked on this rank (``validate``) and compared across ranks by their ``fingerprint``.
    """
    if key is True:
        key = _call_key(group, q, k, v, causal, scale, layout, backend, return_lse, mask)
    entry = _PREPARED.get(key) if key is not None else None  # type: ignore[arg-type]
    if entry is None:
        entry = _prepare(group, q, k, v, causal, scale, layout, backend, return_lse, mask)
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
    mask: object = None,
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
    if rejected is None and mask is not None:
        try:
            mask.validate(q, k, world_size)  # type: ignore[attr-defined]
        except MaskArgumentError as err:
            rejected = _Rejected(err.argument, err.exc_type, err.message)
    description = None
    if world_size > 1 and _check_mode != "never":
        description = _describe(q, k, v, causal, scale_value, layout, backend, rejected, mask)
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


_mode_from_environment()
