"""Long-context inference: prefill into a KV cache sharded across ranks, then decode.

The reference design is Meta's "Context Parallelism for Scalable Million-Token Inference"
(arXiv 2411.01783). Every rank holds a shard of the KV cache (:class:`KVCache`); where each
token's K/V lives follows a fixed rule, so every rank knows every rank's shard length without
asking:

- A prefill of T new tokens is split as :func:`ringattn.shard` cuts it (zigzag over the new
  tokens: rank r holds chunks r and 2N-1-r of 2N), and each rank stores what it was given.
  Every rank's shard grows by T/N.
- Decode tokens go round-robin: the token at global position g is stored on rank g mod N.
  Shards therefore never differ by more than one token.

Every cached token precedes every new token, so new tokens see the whole cache without a
mask; only the new tokens among themselves are causal.

**Prefill** (:func:`prefill`, inputs are each rank's zigzag shard of the new tokens):

1. The new tokens attend causally among themselves with the training ring's forward
   (pass-KV over the new tokens' K/V, zigzag plan, one kernel call per step).
2. They attend to everything already cached, on every rank, either
   - *pass-KV*: the cache shards travel around the ring (each rank's queries meet every shard
     in turn), or
   - *pass-Q*: the queries travel around the ring instead; each rank attends every rank's
     queries to its own shard, and one all-to-all returns every partial ``(out, lse)`` to the
     rank that owns the queries.
3. Partial results merge by log-sum-exp (:func:`ringattn.merge.merge_into`).

Which of the two moves fewer bytes depends on the share of new tokens: pass-KV sends the
cache (``2 H_kv`` per cached token), pass-Q the queries and partial outputs (``2 H`` per new
token), so pass-Q wins when ``T / (T + P) < ~2 H_kv / H`` (P cached tokens). Either hides its
transfers behind the attention compute once the blocks are large enough: pass-KV when
``T >= N C H_kv e / (2 H BW)``, pass-Q when ``P >= N e C / (4 BW)`` (C: kernel FLOP/s, BW: link
bytes/s, e: bytes per element). :func:`choose_prefill_method` prices both with the
calibration's kernel throughput and link bandwidth (:mod:`ringattn.planner`) and picks the
faster, pass-KV on a tie; ``method="pass_kv" | "pass_q"`` overrides it.

**Decode** (:func:`decode`, the same ``q, k, v`` on every rank): each rank attends the new
tokens to its cache shard (grouped query heads folded into rows, so K/V are never
expanded), one all-gather moves every rank's partial ``(out, lse)``, and every rank merges
them, plus the new tokens' causal attention among themselves, into the same output. Then
each rank stores the new tokens the placement rule gives it.

**CUDA graphs.** With ``static=True`` (automatic while a CUDA graph is being captured),
decode reads the cache's lengths from device tensors, writes the new K/V with device-side
indices, and attends the used slots with a split-K kernel that takes the length on the
device (:mod:`ringattn.decode_kernels`): no host synchronisation, no shape that depends on
the cache length. Eager decode on CUDA takes the same path. A one-token step stores the
token first, so the owner's shard already holds it and the shards' partial results merge
alone. :class:`DecodeGraph`
captures one decode step and replays it, keeping the cache's host-side counters in step.
A captured step stays valid while the cache's buffers are not reallocated (reserve the
capacity up front with ``KVCache(capacity=...)``).

**Checks.** Every call checks its arguments on each rank, then one small all-gather of a
fixed-size description (shapes, dtype, the cache's identity and token count, and for decode
a checksum of q, k and v) on a host-side group lets every rank raise the same error before
any K/V moves.
"""

from __future__ import annotations

import functools
import itertools
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .checks import _Rejected, check_kv_like_q, check_scale, check_tensor, exchange_descriptions
from .decode_kernels import (
    DECODE_KERNELS,
    SLOT_BLOCK,
    DecodeKernelName,
    _fold,
    _unfold,
    cache_attention,
    resolve,
)
from .kernels import BACKENDS, Kernel, accumulation_dtype, get_kernel, select_kernel
from .layout import chunk_ids, ring_plan
from .merge import merge_into
from .ring import RingAttentionFunction, RingCall

__all__ = [
    "METHODS",
    "DecodeGraph",
    "KVCache",
    "PrefillPlan",
    "choose_prefill_method",
    "decode",
    "prefill",
]

MethodName = Literal["auto", "pass_kv", "pass_q"]
METHODS: tuple[str, ...] = ("auto", "pass_kv", "pass_q")
CheckName = Literal["inputs", "shapes", "none"]
_CHECKS: tuple[str, ...] = ("inputs", "shapes", "none")

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda")
# Geometric growth of the cache buffers, and the smallest allocation.
_GROWTH = 2.0
_MIN_SLOTS = 64


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Segment:
    """Tokens added by one call: global positions ``[start, start + count)``.

    ``kind="prefill"``: zigzag over those positions (rank r holds chunks r and 2N-1-r).
    ``kind="decode"``: position g is on rank g mod N.
    """

    kind: Literal["prefill", "decode"]
    start: int
    count: int

    def positions(self, rank: int, world: int) -> list[int]:
        """The global positions of this segment on ``rank``, in storage order."""
        if self.kind == "decode":
            first = self.start + (rank - self.start) % world
            return list(range(first, self.start + self.count, world))
        chunk = self.count // (2 * world) if world > 1 else self.count
        ids = chunk_ids(rank, world, "zigzag") if world > 1 else (0,)
        return [self.start + c * chunk + i for c in ids for i in range(chunk)]

    def length(self, rank: int, world: int) -> int:
        """How many of this segment's tokens ``rank`` stores."""
        if self.kind == "decode":
            first = (rank - self.start) % world
            return max(0, (self.count - first + world - 1) // world)
        return self.count // world


_CACHE_IDS: dict[tuple[int, ...], itertools.count] = {}


def _group_ranks(group: dist.ProcessGroup) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group))


class KVCache:
    """This rank's shard of a KV cache sharded over the ranks of ``group``.

    Args:
        group: the ranks the cache is sharded over (None: the world; a ProcessGroup or a
            1-D DeviceMesh). Every rank of the group must create its caches in the same
            order: a cache's identity is its creation count on the group, and calls check
            that every rank passed the same cache.
        capacity: token slots to reserve on this rank at the first call (default: what the
            first call needs, rounded up). The buffers grow geometrically (x2) when full;
            reserve enough for the whole generation, plus the decode step's T new tokens, to
            capture decode in a CUDA graph.

    The buffers are ``[B, H_kv, capacity, D]`` for K and V, made on the first call with its
    batch, K/V heads, head dim, dtype and device; later calls must match them.
    """

    def __init__(self, group: object = None, *, capacity: int | None = None) -> None:
        if group is not None and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                "group: this process is not a member of the group the cache is made for "
                "(dist.new_group returned GroupMember.NON_GROUP_MEMBER here)"
            )
        pg = comm.resolve_group(group)
        rank = dist.get_rank(pg)
        if rank < 0:
            raise ValueError(
                f"group: this process (global rank {dist.get_rank()}) is not a member of the "
                "group the cache is made for"
            )
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1
        ):
            raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
        self.group: dist.ProcessGroup = pg
        self.rank, self.world, _ = comm.group_facts(pg)
        ranks = _group_ranks(pg)
        self.id = next(_CACHE_IDS.setdefault(ranks, itertools.count(1)))
        self._group_print = zlib.crc32(repr(ranks).encode())
        self.capacity_hint = capacity
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0  # tokens stored on this rank
        self.total = 0  # tokens stored on all ranks (the next global position)
        self.segments: list[Segment] = []
        # Device-side copies of (length, total) for the static (graph-capturable) decode.
        self._counters: Tensor | None = None
        self._counters_stale = True
        # Row r: what one decode token at global position g, g mod N == r, adds to them.
        self._step_table: Tensor | None = None

    # -- facts ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Token slots allocated on this rank (0 before the first call)."""
        return 0 if self.k is None else self.k.size(2)

    def lengths(self) -> list[int]:
        """Every rank's number of stored tokens (known locally from the placement rule)."""
        return [sum(s.length(r, self.world) for s in self.segments) for r in range(self.world)]

    def positions(self) -> Tensor:
        """The global positions of this rank's tokens, in storage order (int64, CPU)."""
        pos = [p for s in self.segments for p in s.positions(self.rank, self.world)]
        return torch.tensor(pos, dtype=torch.int64)

    def keys(self) -> Tensor | None:
        """This rank's cached keys ``[B, H_kv, length, D]`` (a view), or None before use."""
        return None if self.k is None else self.k[:, :, : self.length]

    def values(self) -> Tensor | None:
        """This rank's cached values ``[B, H_kv, length, D]`` (a view), or None before use."""
        return None if self.v is None else self.v[:, :, : self.length]

    def memory_bytes(self) -> int:
        """Bytes of this rank's K and V buffers (allocated capacity)."""
        if self.k is None or self.v is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def sync(self) -> None:
        """Read the device-side counters back into ``length`` and ``total`` (one host sync).

        Needed only after replaying a captured decode step outside :class:`DecodeGraph`;
        the placement record is extended with the decode tokens that were added.
        """
        if self._counters is None or self._counters_stale:
            return
        length, total = (int(x) for x in self._counters.tolist())
        if total > self.total:
            self._record(Segment("decode", self.total, total - self.total), length - self.length)

    def __repr__(self) -> str:
        return (
            f"KVCache(rank {self.rank} of {self.world}, {self.length} of {self.total} tokens, "
            f"capacity {self.capacity})"
        )

    # -- storage -------------------------------------------------------------------------

    def _describe_buffers(self) -> tuple[int, ...] | None:
        if self.k is None:
            return None
        b, hkv, _, d = self.k.shape
        return (b, hkv, d)

    def _reserve(self, like: Tensor, extra: int) -> None:
        """Make room for ``extra`` more tokens, allocating or growing geometrically."""
        need = self.length + extra
        if self.k is not None and need <= self.k.size(2):
            return
        b, hkv, _, d = like.shape
        if self.k is None:
            slots = max(need, self.capacity_hint or 0, _MIN_SLOTS)
        else:
            slots = max(need, int(self.k.size(2) * _GROWTH))
        # Whole blocks of 256 slots: fused kernels stay on their aligned paths, and the
        # static decode splits the capacity into equal chunks.
        slots = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
        # Zeros: the static decode reads every slot (masked), and 0 * NaN garbage is NaN.
        k = torch.zeros(b, hkv, slots, d, dtype=like.dtype, device=like.device)
        v = torch.zeros_like(k)
        if self.k is not None and self.v is not None and self.length:
            k[:, :, : self.length].copy_(self.k[:, :, : self.length])
            v[:, :, : self.length].copy_(self.v[:, :, : self.length])
        self.k, self.v = k, v
        if self._counters is None or self._counters.device != like.device:
            self._counters = torch.zeros(2, dtype=torch.int64, device=like.device)
            steps = [[int(r == self.rank), 1] for r in range(self.world)]
            self._step_table = torch.tensor(steps, dtype=torch.int64, device=like.device)
        self._counters_stale = True

    def _steps(self) -> Tensor:
        assert self._step_table is not None
        return self._step_table

    def _record(self, segment: Segment, stored: int) -> None:
        """Account for ``segment`` (``stored`` of its tokens on this rank) on the host.

        Consecutive decode calls extend one segment, so the record stays short over a
        long generation."""
        last = self.segments[-1] if self.segments else None
        if (
            segment.kind == "decode"
            and last is not None
            and last.kind == "decode"
            and last.start + last.count == segment.start
        ):
            self.segments[-1] = Segment("decode", last.start, last.count + segment.count)
        else:
            self.segments.append(segment)
        self.length += stored
        self.total += segment.count

    def _append(self, k: Tensor, v: Tensor, segment: Segment) -> None:
        """Store this rank's part of ``segment`` (``k``/``v`` hold exactly that part)."""
        n = k.size(2)
        self._reserve(k, n)
        assert self.k is not None and self.v is not None
        self.k[:, :, self.length : self.length + n].copy_(k)
        self.v[:, :, self.length : self.length + n].copy_(v)
        self._record(segment, n)
        self._counters_stale = True

    def _sync_device_counters(self) -> None:
        if self._counters is not None and self._counters_stale:
            self._counters.copy_(torch.tensor([self.length, self.total], dtype=torch.int64))
            self._counters_stale = False


# ----------------------------------------------------------------------------- the selector


@dataclass(frozen=True)
class PrefillPlan:
    """How a prefill attends its new tokens to the cache, and the predictions behind it.

    Times are per rank for the cached part only (the new tokens' own causal ring is the
    same either way): kernel time, and the communication each method leaves exposed.
    """

    method: Literal["pass_kv", "pass_q"]
    new_tokens: int
    cached_tokens: int
    compute_ms: float
    pass_kv_exposed_ms: float
    pass_q_exposed_ms: float
    pass_kv_bytes: int  # sent per rank
    pass_q_bytes: int
    reason: str


def choose_prefill_method(
    *,
    new_tokens: int,
    cached_tokens: int,
    world: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    batch: int = 1,
    element_bytes: int = 2,
    calibration: object = None,
    backend: str = "cudnn",
    device_type: str = "cuda",
) -> PrefillPlan:
    """Pass-KV or pass-Q for a prefill of ``new_tokens`` over ``cached_tokens`` (global).

    Per rank and ring step, the kernel attends ``T/N`` queries to ``P/N`` cached keys
    (``4 B H (T/N) (P/N) D`` FLOPs at the calibration's throughput for a call of that size);
    pass-KV sends a cache shard (``2 B H_kv (P/N) D e`` bytes), pass-Q a query shard
    (``B H (T/N) D e``) and, after the ring, an all-to-all of the partial outputs and lse
    (float32, ``(N-1) B H (T/N) (D+1) 4`` bytes). A transfer hides behind the step it
    overlaps; what is left shows. The faster method wins, pass-KV on a tie (both hidden),
    which is the paper's rule: pass-KV once ``T >= N C H_kv e / (2 H BW)``, else pass-Q when
    it moves fewer bytes (``T/(T+P) < ~2 H_kv/H``) or hides.

    ``calibration``: a :class:`ringattn.planner.Calibration` (default: the user's, else the
    shipped one for ``device_type``).
    """
    cal = calibration if calibration is not None else _calibration(device_type)
    n = world
    t_local = new_tokens / n
    p_local = cached_tokens / n
    work = batch * heads * t_local * p_local * head_dim
    flops = 4.0 * work
    compute_ms = 0.0
    if work > 0:
        compute_ms = flops / (cal.tflops(backend, False, work) * 1e12) * 1e3  # type: ignore[attr-defined]
    step_ms = compute_ms / n
    gbs = cal.p2p_gbs_intra * 1e9  # type: ignore[attr-defined]
    coll = cal.collective_gbs_intra * 1e9  # type: ignore[attr-defined]
    lat = cal.latency_us * 1e-3  # type: ignore[attr-defined]
    kv_step = 2 * batch * kv_heads * p_local * head_dim * element_bytes
    q_step = batch * heads * t_local * head_dim * element_bytes
    a2a = (n - 1) * batch * heads * t_local * (head_dim + 1) * 4
    steps = n - 1
    kv_exposed = steps * (max(0.0, kv_step / gbs * 1e3 - step_ms) + lat) if steps else 0.0
    q_exposed = steps * (max(0.0, q_step / gbs * 1e3 - step_ms) + lat) if steps else 0.0
    if steps:
        q_exposed += a2a / coll * 1e3 + lat
    if cached_tokens == 0 or n == 1:
        method, reason = "pass_kv", "nothing to pass (no cache or one rank)"
    elif kv_exposed <= q_exposed:
        method = "pass_kv"
        reason = (
            "pass-KV hides its transfers"
            if kv_exposed <= steps * lat + 1e-12
            else f"pass-KV exposes less ({kv_exposed:.3f} vs {q_exposed:.3f} ms)"
        )
    else:
        method = "pass_q"
        reason = f"pass-Q exposes less ({q_exposed:.3f} vs {kv_exposed:.3f} ms)"
    return PrefillPlan(
        method=method,  # type: ignore[arg-type]
        new_tokens=new_tokens,
        cached_tokens=cached_tokens,
        compute_ms=compute_ms,
        pass_kv_exposed_ms=kv_exposed,
        pass_q_exposed_ms=q_exposed,
        pass_kv_bytes=int(kv_step * steps),
        pass_q_bytes=int(q_step * steps + a2a),
        reason=reason,
    )


@functools.cache
def _calibration(device_type: str) -> object:
    from .planner import load_calibration

    return load_calibration(device_type=device_type)


# ----------------------------------------------------------------------------- checks


_ARGUMENTS = (
    "q",
    "k",
    "v",
    "cache",
    "scale",
    "backend",
    "method",
    "group",
    "static",
    "check",
    "decode_kernel",
)
_FIELDS = (
    "rejected argument",
    "call",
    "q.shape[0] (batch)",
    "q.shape[1] (heads)",
    "k.shape[1] (K/V heads)",
    "q.shape[2] (tokens)",
    "q.shape[3] (head dim)",
    "dtype",
    "device type",
    "backend",
    "method",
    "scale",
    "cache (creation order on its group)",
    "cache group",
    "cached tokens",
    "static",
    "checksum of q",
    "checksum of k",
    "checksum of v",
)


def _tensor(name: str, x: object, what: str) -> Tensor:
    x = check_tensor(name, x, what)
    if x.dtype not in _DTYPES:
        raise _Rejected(
            name, TypeError, f"{name} must be float64, float32, bfloat16 or float16, got {x.dtype}"
        )
    return x


def _check_common(
    op: str, q: object, k: object, v: object, cache: object, scale: object, backend: object
) -> tuple[Tensor, Tensor, Tensor, KVCache, float]:
    what = "local new tokens" if op == "prefill" else "new tokens"
    q, k, v = _tensor("q", q, what), _tensor("k", k, what), _tensor("v", v, what)
    check_kv_like_q(q, k, v)
    if k.shape != v.shape:
        raise _Rejected(
            "v", ValueError, f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if k.size(0) != q.size(0) or k.size(2) != q.size(2) or k.size(3) != q.size(3):
        raise _Rejected(
            "k",
            ValueError,
            f"k must match q in batch, tokens and head dim: q {tuple(q.shape)}, k {tuple(k.shape)}",
        )
    if q.size(1) % k.size(1):
        raise _Rejected(
            "k",
            ValueError,
            f"q's heads ({q.size(1)}) must be a multiple of k's heads ({k.size(1)})",
        )
    if q.size(2) < 1:
        raise _Rejected("q", ValueError, "q must hold at least one token")
    if not isinstance(cache, KVCache):
        raise _Rejected(
            "cache", TypeError, f"cache must be a ringattn.KVCache, got {type(cache).__name__}"
        )
    if q.device.type not in comm.backend_device_types(cache.group):
        raise _Rejected(
            "q",
            ValueError,
            f"q is on {q.device} but the cache's group ({dist.get_backend(cache.group)}) cannot "
            f"send {q.device.type} tensors",
        )
    if cache.k is not None:
        b, hkv, d = cache._describe_buffers()  # type: ignore[misc]
        if (q.size(0), k.size(1), q.size(3)) != (b, hkv, d):
            raise _Rejected(
                "k",
                ValueError,
                f"the cache holds batch {b}, {hkv} K/V heads, head dim {d}; got batch "
                f"{q.size(0)}, {k.size(1)} K/V heads, head dim {q.size(3)}",
            )
        if k.dtype != cache.k.dtype:
            raise _Rejected("k", TypeError, f"the cache holds {cache.k.dtype}, got {k.dtype}")
        if k.device != cache.k.device:
            raise _Rejected("k", ValueError, f"the cache is on {cache.k.device}, got {k.device}")
    scale = check_scale(scale, q.size(3))
    if backend not in BACKENDS:
        raise _Rejected(
            "backend", ValueError, f"backend must be one of {BACKENDS}, got {backend!r}"
        )
    return q, k, v, cache, scale


def _select(backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Kernel:
    try:
        return _select_cached(backend, q, k, v, causal)
    except ValueError as err:
        raise _Rejected("backend", ValueError, str(err)) from None


def _select_cached(backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Kernel:
    # PyTorch's kernel checks cost tens of microseconds: once per signature.
    key = (backend, q.shape, k.shape, q.dtype, q.device, causal, k.stride(-1), q.stride(-1))
    found = _KERNELS.get(key)
    if found is None:
        if backend == "auto" and q.device.type == "cuda" and not causal and q.size(2) <= 256:
            # A few query rows against a long cache: flash first (its split-K decode path).
            try:
                found = select_kernel("flash", q, k, v, causal)
            except ValueError:
                found = select_kernel(backend, q, k, v, causal)
        else:
            found = select_kernel(backend, q, k, v, causal)
        if len(_KERNELS) > 512:
            _KERNELS.clear()
        _KERNELS[key] = found
    return found


_KERNELS: dict[tuple, Kernel] = {}


def _checksum(x: Tensor) -> int:
    # One float64 sum: identical inputs give identical bits on identical hardware.
    (bits,) = struct.unpack("<q", struct.pack("<d", float(x.detach().sum(dtype=torch.float64))))
    return bits


def _describe(
    op: int,
    q: Tensor | None,
    k: Tensor | None,
    method_id: int,
    backend: object,
    scale: float,
    cache: KVCache | None,
    static: bool,
    sums: tuple[int, int, int],
    rejected: _Rejected | None,
) -> list[int]:
    if rejected is not None or q is None or k is None or cache is None:
        code = _ARGUMENTS.index(rejected.argument) + 1 if rejected is not None else 1
        return [code, op] + [0] * (len(_FIELDS) - 2)
    (scale_bits,) = struct.unpack("<q", struct.pack("<d", scale))
    return [
        0,
        op,
        q.size(0),
        q.size(1),
        k.size(1),
        q.size(2),
        q.size(3),
        _DTYPES.index(q.dtype),
        _DEVICE_TYPES.index(q.device.type) if q.device.type in _DEVICE_TYPES else 9,
        BACKENDS.index(backend),  # type: ignore[arg-type]
        method_id,
        scale_bits,
        cache.id,
        cache._group_print,
        cache.total,
        int(static),
        *sums,
    ]


def _field_text(field: int, value: int) -> str:
    name = _FIELDS[field]
    if name.startswith("checksum") or name == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if name == "dtype":
        return str(_DTYPES[value])
    if name == "call":
        return ("prefill", "decode")[value - 1]
    if name == "method":
        return METHODS[value]
    if name == "backend":
        return repr(BACKENDS[value])
    return str(value)


def _agree(
    name: str, group: dist.ProcessGroup, mine: list[int], rejected: _Rejected | None
) -> None:
    """All-gather every rank's description on a host-side group; raise the same everywhere."""
    world = comm.group_facts(group)[1]
    rows = exchange_descriptions(name, group, None, mine, "moved any K/V") if world > 1 else [mine]
    if rejected is not None:
        raise rejected.exc_type(f"{name}: {rejected.message}")
    for other, row in enumerate(rows):
        if row[0]:
            raise ValueError(
                f"{name}: rank {other} rejected its `{_ARGUMENTS[row[0] - 1]}` argument (its "
                "own error says why); no rank moved any K/V"
            )
    rank = comm.group_facts(group)[0]
    for field in range(1, len(_FIELDS)):
        if len({row[field] for row in rows}) > 1:
            per_rank = ", ".join(
                f"rank {r}: {_field_text(field, row[field])}" for r, row in enumerate(rows)
            )
            hint = ""
            if _FIELDS[field].startswith("checksum"):
                hint = " (decode takes the same q, k and v on every rank)"
            elif _FIELDS[field].startswith("cache"):
                hint = " (every rank must pass its shard of the same cache)"
            raise ValueError(
                f"{name}: every rank must call with the same {_FIELDS[field]}, but {per_rank} "
                f"(this is rank {rank}){hint}; no rank moved any K/V"
            )


def _resolve(cache: object, group: object, name: str) -> tuple[dist.ProcessGroup, _Rejected | None]:
    """The group the call runs on, and a rejection if the cache does not belong to it."""
    if group is not None or not isinstance(cache, KVCache):
        pg = comm.resolve_group(group)
        if isinstance(cache, KVCache) and cache.group is not pg:
            return pg, _Rejected(
                "cache",
                ValueError,
                "the cache was made for another group than the one passed "
                f"(its ranks {list(_group_ranks(cache.group))}, the call's "
                f"{list(_group_ranks(pg))})",
            )
        return pg, None
    return cache.group, None


# ----------------------------------------------------------------------------- prefill


def prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    *,
    scale: float | None = None,
    backend: str = "auto",
    method: MethodName = "auto",
    group: object = None,
) -> Tensor:
    """Attend this rank's shard of new tokens causally to the whole cache and to each other.

    Args:
        q: this rank's queries ``[B, H, T_local, D]``, the shard :func:`ringattn.shard`
            (zigzag) cuts from the T new tokens; T must divide into 2N chunks.
        k, v: the new tokens' keys and values ``[B, H_kv, T_local, D]`` (the same shard).
        cache: this rank's :class:`KVCache`; the new K/V are stored in it.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: the attention kernel, as for :func:`ringattn.ring_attention`.
        method: ``"pass_kv"``, ``"pass_q"``, or ``"auto"`` (:func:`choose_prefill_method`).
        group: if given, the group the caller expects; the cache must have been made for it.

    Returns:
        This rank's output shard ``[B, H, T_local, D]`` in q's dtype: each new token attends
        every cached token and the new tokens up to itself.

    Raises:
        ValueError, TypeError: bad arguments, on every rank, before any K/V moves.
    """
    pg, rejected = _resolve(cache, group, "prefill")
    rank, world, _ = comm.group_facts(pg)
    scale_value, plan_method = 0.0, "pass_kv"
    kernels: tuple[Kernel, Kernel | None] | None = None
    qt = kt = vt = None
    kv_cache: KVCache | None = None
    if rejected is None:
        try:
            qt, kt, vt, kv_cache, scale_value = _check_common(
                "prefill", q, k, v, cache, scale, backend
            )
            if method not in METHODS:
                raise _Rejected(
                    "method", ValueError, f"method must be one of {METHODS}, got {method!r}"
                )
            if world > 1 and qt.size(2) % 2:
                raise _Rejected(
                    "q",
                    ValueError,
                    f"a prefill shard holds two equal zigzag chunks, so q.shape[2] must be even, "
                    f"got {qt.size(2)}; cut the new tokens with ringattn.shard",
                )
            causal_kernel = _select(backend, qt, kt, vt, True)  # type: ignore[arg-type]
            cache_kernel = None
            if kv_cache.total:
                ks = kv_cache.keys()  # None where this rank stores nothing yet
                probe = ks if ks is not None and ks.size(2) else kt
                cache_kernel = _select(backend, qt, probe, probe, False)  # type: ignore[arg-type]
            kernels = (causal_kernel, cache_kernel)
            plan_method = _prefill_method(method, qt, kt, kv_cache, world, backend)
        except _Rejected as err:
            rejected = err
    description = _describe(
        1,
        qt,
        kt,
        METHODS.index(plan_method),
        backend,
        scale_value,
        kv_cache,
        False,
        (0, 0, 0),
        rejected,
    )
    _agree("prefill", pg, description, rejected)
    assert qt is not None and kt is not None and vt is not None and kv_cache is not None
    assert kernels is not None
    with torch.no_grad():
        return _prefill(qt, kt, vt, kv_cache, scale_value, kernels, plan_method, rank, world)


def _prefill_method(
    method: str, q: Tensor, k: Tensor, cache: KVCache, world: int, backend: str
) -> str:
    if method != "auto":
        return method
    kernel_name = "cudnn" if backend == "auto" else backend
    plan = choose_prefill_method(
        new_tokens=q.size(2) * world,
        cached_tokens=cache.total,
        world=world,
        heads=q.size(1),
        kv_heads=k.size(1),
        head_dim=q.size(3),
        batch=q.size(0),
        element_bytes=q.element_size(),
        backend=kernel_name if q.device.type == "cuda" else "cpu",
        device_type=q.device.type,
    )
    return plan.method


def _prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    scale: float,
    kernels: tuple[Kernel, Kernel | None],
    method: str,
    rank: int,
    world: int,
) -> Tensor:
    causal_kernel, cache_kernel = kernels
    k, v = k.contiguous(), v.contiguous()
    call = RingCall(
        ring=comm.ring_for(cache.group) if world > 1 else None,
        plans=tuple(ring_plan(rank, world, causal=True, layout="zigzag")),
        kernel=causal_kernel,
        scale=scale,
    )
    out, lse = RingAttentionFunction.apply(q, k, v, call)
    # Buffers on every rank (also one that holds nothing yet), with room for the new tokens.
    cache._reserve(k, k.size(2))
    if cache.total and cache_kernel is not None:
        acc = out.to(accumulation_dtype(q.dtype))
        lse = lse.clone()
        lengths = cache.lengths()
        if method == "pass_q" and world > 1:
            _cached_pass_q(q, cache, lengths, cache_kernel, scale, acc, lse, rank, world)
        else:
            _cached_pass_kv(q, cache, lengths, cache_kernel, scale, acc, lse, rank, world)
        out = acc.to(q.dtype)
    segment = Segment("prefill", cache.total, q.size(2) * world)
    cache._append(k, v, segment)
    return out


def _cached_pass_kv(
    q: Tensor,
    cache: KVCache,
    lengths: list[int],
    kernel: Kernel,
    scale: float,
    acc: Tensor,
    acc_lse: Tensor,
    rank: int,
    world: int,
) -> None:
    """Every rank's cache shard travels the ring; the local queries meet each in turn."""
    kc, vc = cache.keys(), cache.values()
    assert kc is not None and vc is not None  # reserved by _prefill
    cur = (kc.contiguous(), vc.contiguous())
    ring = comm.ring_for(cache.group) if world > 1 else None
    for step in range(world):
        source = (rank - step) % world
        pending = None
        nxt: tuple[Tensor, Tensor] | None = None
        if step + 1 < world:
            assert ring is not None
            # Empty shards are not sent: every rank knows every length.
            incoming = lengths[(rank - step - 1) % world]
            send = cur if lengths[source] else ()
            if incoming:
                shape = (*kc.shape[:2], incoming, kc.size(3))
                nxt = (kc.new_empty(shape), vc.new_empty(shape))
            what = f"prefill pass-KV step {step + 1} of {world - 1} (receiving a cache shard)"
            pending = ring.shift(send, nxt or (), what=what)
        if lengths[source]:
            out, lse, _ = kernel.forward(q, cur[0], cur[1], causal=False, scale=scale)
            merge_into(acc, acc_lse, out, lse)
        if pending is not None:
            pending.wait()
        if nxt is not None:
            cur = nxt


def _cached_pass_q(
    q: Tensor,
    cache: KVCache,
    lengths: list[int],
    kernel: Kernel,
    scale: float,
    acc: Tensor,
    acc_lse: Tensor,
    rank: int,
    world: int,
) -> None:
    """Queries travel the ring; each rank attends them to its shard; an all-to-all returns
    every partial ``(out, lse)`` to the queries' owner."""
    b, h, t, d = q.shape
    dtype = acc.dtype
    # parts[j]: this rank's partial result for rank j's queries, out and lse side by side.
    parts = q.new_empty((world, b, h, t, d + 1), dtype=dtype)
    kc, vc = cache.keys(), cache.values()
    assert kc is not None and vc is not None
    ring = comm.ring_for(cache.group)
    buffers = [torch.empty_like(q) for _ in range(min(2, world - 1))]
    q_cur = q.contiguous()
    for step in range(world):
        source = (rank - step) % world
        pending = None
        if step + 1 < world:
            q_next = buffers[step % 2]
            what = f"prefill pass-Q step {step + 1} of {world - 1} (receiving queries)"
            pending = ring.shift((q_cur,), (q_next,), what=what)
        if lengths[rank]:
            out, lse, _ = kernel.forward(q_cur, kc, vc, causal=False, scale=scale)
            parts[source, ..., :d].copy_(out)
            parts[source, ..., d].copy_(lse)
        else:
            parts[source, ..., :d].zero_()
            parts[source, ..., d].fill_(float("-inf"))
        if pending is not None:
            pending.wait()
            q_cur = q_next
    back = torch.empty_like(parts)
    try:
        dist.all_to_all_single(back, parts, group=cache.group)
    except Exception as err:  # noqa: BLE001 - re-raised with where it happened
        raise comm.RingCommunicationError(
            f"prefill pass-Q: the all-to-all of partial outputs failed or timed out. "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    for j in range(world):
        if lengths[j]:
            merge_into(acc, acc_lse, back[j, ..., :d], back[j, ..., d])


# ----------------------------------------------------------------------------- decode


def decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    *,
    scale: float | None = None,
    backend: str = "auto",
    static: bool = False,
    check: CheckName = "inputs",
    group: object = None,
    decode_kernel: DecodeKernelName = "auto",
) -> Tensor:
    """Attend the next T tokens to the whole cache and causally to each other.

    Args:
        q: ``[B, H, T, D]``, the same on every rank (T >= 1, usually 1).
        k, v: their keys and values ``[B, H_kv, T, D]``, the same on every rank.
        cache: this rank's :class:`KVCache`; the new K/V are stored round-robin (the token at
            global position g on rank g mod N).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: the kernel for the cache shard (eager path), as for
            :func:`ringattn.ring_attention`; ``"auto"`` tries flash first on CUDA.
        static: attend over the whole preallocated capacity with device-side lengths, so
            the step can be captured in a CUDA graph (automatic while capturing). Needs
            room for T more tokens in the cache.
        check: ``"inputs"`` (default) compares shapes, options and a float64 checksum of q, k
            and v across ranks (one host sync); ``"shapes"`` leaves out the checksum;
            ``"none"`` skips the cross-rank check (mismatched ranks then fail at the
            process group's timeout). While capturing, the checksum is left out.
        group: if given, the group the caller expects; the cache must have been made for it.
        decode_kernel: the split-K kernel that attends the new tokens to the used part of
            the cache on the device-length path (:mod:`ringattn.decode_kernels`):
            ``"auto"`` (default: flex for static and captured steps, flash first for eager
            ones), ``"flex"``, ``"flash"``, ``"chunked"`` or ``"plain"``. That path runs
            for ``static=True`` and while capturing, and for eager decode on CUDA
            (bf16/fp16, ``backend="auto"``) when the kernel is not ``"plain"``; elsewhere
            eager decode slices the cache on the host and runs ``backend``.

    Returns:
        ``[B, H, T, D]`` in q's dtype, identical on every rank.
    """
    pg, rejected = _resolve(cache, group, "decode")
    world = comm.group_facts(pg)[1]
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    scale_value = 0.0
    qt = kt = vt = None
    kv_cache: KVCache | None = None
    kernels: tuple[Kernel | None, Kernel] | None = None
    sums = (0, 0, 0)
    static_run = bool(static) or capturing
    device_length = static_run
    if rejected is None:
        try:
            qt, kt, vt, kv_cache, scale_value = _check_common(
                "decode", q, k, v, cache, scale, backend
            )
            if not isinstance(static, bool):
                raise _Rejected(
                    "static", TypeError, f"static must be a bool, got {type(static).__name__}"
                )
            if check not in _CHECKS:
                raise _Rejected(
                    "check", ValueError, f"check must be one of {_CHECKS}, got {check!r}"
                )
            if decode_kernel not in DECODE_KERNELS:
                raise _Rejected(
                    "decode_kernel",
                    ValueError,
                    f"decode_kernel must be one of {DECODE_KERNELS}, got {decode_kernel!r}",
                )
            fused_only = decode_kernel in ("flash", "chunked")
            if fused_only and not (qt.is_cuda and qt.dtype in (torch.bfloat16, torch.float16)):
                raise _Rejected(
                    "decode_kernel",
                    ValueError,
                    f"decode_kernel={decode_kernel!r} runs on CUDA bf16/fp16 inputs; got "
                    f"{qt.dtype} on {qt.device.type} (use 'auto' or 'plain')",
                )
            device_length = static_run or (
                qt.is_cuda and backend == "auto" and resolve(decode_kernel, qt)[0] != "plain"
            )
            if device_length:
                room = kv_cache.capacity - kv_cache.length
                if kv_cache.k is None or room < qt.size(2):
                    if capturing:
                        raise _Rejected(
                            "cache",
                            ValueError,
                            f"a captured decode step needs room for {qt.size(2)} more tokens "
                            f"in the cache (capacity {kv_cache.capacity}, {kv_cache.length} "
                            "used); reserve it with KVCache(capacity=...)",
                        )
                    kv_cache._reserve(kt, qt.size(2))
                if capturing and kv_cache._counters_stale:
                    raise _Rejected(
                        "cache",
                        ValueError,
                        "the cache's device-side counters are stale: run one decode with "
                        "static=True before capturing, or use ringattn.inference.DecodeGraph",
                    )
                kernels = (None, get_kernel("math"))
            else:
                # The new tokens among themselves: a T x T block, in plain float32 ops.
                kernels = (_cache_kernel(backend, qt, kt, kv_cache), get_kernel("math"))
            if check == "inputs" and not capturing and world > 1:
                sums = (_checksum(qt), _checksum(kt), _checksum(vt))
        except _Rejected as err:
            rejected = err
    if check != "none" or rejected is not None:
        description = _describe(
            2, qt, kt, 0, backend, scale_value, kv_cache, static_run, sums, rejected
        )
        _agree("decode", pg, description, rejected)
    assert qt is not None and kt is not None and vt is not None and kv_cache is not None
    assert kernels is not None
    with torch.no_grad():
        if device_length:
            return _decode_static(
                qt,
                kt,
                vt,
                kv_cache,
                scale_value,
                kernels[1],
                decode_kernel,
                store=True,
                graph=static_run,
            )
        return _decode_eager(qt, kt, vt, kv_cache, scale_value, kernels)


def _cache_kernel(backend: str, q: Tensor, k: Tensor, cache: KVCache) -> Kernel | None:
    kc = cache.keys()
    if kc is None or kc.size(2) == 0:
        return None
    qf = _fold(q, k.size(1))
    return _select(backend, qf, kc, kc, False)


def _local_merge(outs: Tensor, lses: Tensor) -> Tensor:
    """Merge partial results stacked on dim 0 by log-sum-exp: ``(out, lse)`` of the rows.

    Rows where a part saw nothing (lse = -inf) take nothing from it; the new tokens' own
    block always sees at least one key, so the total is finite.
    """
    top = lses.max(dim=0).values
    weights = torch.exp(lses - top.unsqueeze(0))
    total = weights.sum(dim=0)
    return (outs * (weights / total.unsqueeze(0)).unsqueeze(-1)).sum(dim=0)


def _gather_partials(part: Tensor, cache: KVCache) -> Tensor:
    """Every rank's packed partial result, stacked on a new first dimension."""
    gathered = part.new_empty((cache.world, *part.shape))
    try:
        comm.all_gather_into(gathered, part, cache.group)
    except Exception as err:  # noqa: BLE001 - re-raised with where it happened
        raise comm.RingCommunicationError(
            f"decode: the all-gather of partial outputs failed or timed out. "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from err
    return gathered


def _gather_and_merge(
    q: Tensor, k: Tensor, v: Tensor, part: Tensor, cache: KVCache, scale: float, kernel: Kernel
) -> Tensor:
    """All-gather every rank's packed partial ``[B, H, T, D+1]``, add the new tokens' own
    causal block, and merge: the same result on every rank."""
    d = q.size(3)
    world = cache.world
    gathered = _gather_partials(part, cache) if world > 1 else part.unsqueeze(0)
    own_out, own_lse, _ = kernel.forward(q, k, v, causal=True, scale=scale)
    outs = torch.cat([gathered[..., :d], own_out.to(part.dtype).unsqueeze(0)])
    lses = torch.cat([gathered[..., d], own_lse.to(part.dtype).unsqueeze(0)])
    return _local_merge(outs, lses).to(q.dtype)


def _decode_eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    scale: float,
    kernels: tuple[Kernel | None, Kernel],
) -> Tensor:
    cache_kernel, own_kernel = kernels
    b, h, t, d = q.shape
    dtype = accumulation_dtype(q.dtype)
    part = q.new_empty((b, h, t, d + 1), dtype=dtype)
    kc, vc = cache.keys(), cache.values()
    if cache_kernel is not None and kc is not None and vc is not None and kc.size(2):
        out, lse, _ = cache_kernel.forward(_fold(q, k.size(1)), kc, vc, causal=False, scale=scale)
        part[..., :d].copy_(_unfold(out, h))
        part[..., d].copy_(_unfold(lse, h))
    else:
        part[..., :d].zero_()
        part[..., d].fill_(float("-inf"))
    result = _gather_and_merge(q, k, v, part, cache, scale, own_kernel)
    # Store: this rank's tokens of the round-robin placement.
    segment = Segment("decode", cache.total, t)
    first = (cache.rank - cache.total) % cache.world
    if first < t:
        cache._append(k[:, :, first :: cache.world], v[:, :, first :: cache.world], segment)
    else:
        cache._record(segment, 0)
        cache._counters_stale = True
    return result


def _decode_static(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVCache,
    scale: float,
    kernel: Kernel,
    decode_kernel: str,
    *,
    store: bool,
    graph: bool,
) -> Tensor:
    """The device-length decode: device-side lengths and indices, static shapes, no host
    sync (graph-capturable). ``store=False`` leaves the cache's contents and counters as
    they were (it may write the new K/V into unused slots). ``graph``: the step is (or is
    made to be) captured, which picks the kernel for replay rather than host time."""
    cache._sync_device_counters()  # no-op while capturing (checked fresh before)
    assert cache.k is not None and cache.v is not None and cache._counters is not None
    b, h, t, d = q.shape
    world, rank = cache.world, cache.rank
    counters = cache._counters
    if t == 1:
        # Store first, into slot `length` on every rank (scratch past the valid length where
        # the token is not this rank's): the owner's shard then holds the new token, so the
        # shards' partial results are the whole answer and no separate block is attended.
        cache.k.index_copy_(2, counters[:1], k)
        cache.v.index_copy_(2, counters[:1], v)
        after = counters + torch.index_select(cache._steps(), 0, counters[1:] % world).view(2)
        out, lse = cache_attention(
            q, cache.k, cache.v, after[:1], scale, decode_kernel, eager=not graph
        )
        result = _gather_and_merge_parts(out, lse, cache, q.dtype)
        if store:
            counters.copy_(after)
    else:
        out, lse = cache_attention(
            q, cache.k, cache.v, counters[:1], scale, decode_kernel, eager=not graph
        )
        part = torch.cat([out.to(lse.dtype), lse.unsqueeze(-1)], dim=-1)
        result = _gather_and_merge(q, k, v, part, cache, scale, kernel)
        if store:
            length, total = counters[0], counters[1]
            steps = torch.arange(t, device=q.device)
            mine = ((total + steps) % world) == rank
            # Owned tokens go to [length, length + owned) in order; the others to the slots
            # after them (inside the reserved room, past the valid length: scratch).
            owned_before = torch.cumsum(mine.long(), 0) - mine.long()
            owned = mine.long().sum()
            others_before = torch.cumsum((~mine).long(), 0) - (~mine).long()
            slots = torch.where(mine, length + owned_before, length + owned + others_before)
            cache.k.index_copy_(2, slots, k)
            cache.v.index_copy_(2, slots, v)
            counters.add_(torch.stack([owned, torch.full_like(owned, t)]))
    if store:
        # Host mirror (exact: the placement rule is known); stale under graph replay,
        # which DecodeGraph accounts for.
        segment = Segment("decode", cache.total, t)
        cache._record(segment, segment.length(rank, world))
    return result


def _gather_and_merge_parts(out: Tensor, lse: Tensor, cache: KVCache, dtype: torch.dtype) -> Tensor:
    """All-gather every rank's ``(out, lse)`` packed as ``[B, H, T, D+1]`` and merge them by
    log-sum-exp: the same result on every rank. At least one rank's lse is finite."""
    d = out.size(-1)
    if cache.world == 1:
        return out.to(dtype)
    # One copy packs both and promotes out to lse's dtype.
    part = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
    gathered = _gather_partials(part, cache)
    # Each rank's weight is exp(lse_r - lse_total): a softmax over the ranks (one kernel).
    weights = torch.softmax(gathered[..., d], dim=0)
    return (gathered[..., :d] * weights.unsqueeze(-1)).sum(dim=0).to(dtype)


class DecodeGraph:
    """One decode step captured as a CUDA graph, replayed for each new token.

    >>> step = DecodeGraph(cache, q, k, v)  # captures; the cache is not changed
    >>> out = step(q, k, v)                 # copies in, replays, stores the new K/V

    The cache must have room for the steps to come (``KVCache(capacity=...)``); a replay
    that would overflow it, or a cache whose buffers were reallocated since the capture,
    raises ValueError. Every rank of the group must capture and replay together. The
    cross-rank check runs once, at capture; replays check nothing across ranks.
    ``decode_kernel`` picks the split-K kernel (:func:`decode`); the warm-up before the
    capture compiles it where it is compiled (``"flex"``).
    """

    def __init__(
        self,
        cache: KVCache,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        scale: float | None = None,
        backend: str = "auto",
        decode_kernel: DecodeKernelName = "auto",
    ) -> None:
        if not (isinstance(q, Tensor) and q.is_cuda):
            raise ValueError("DecodeGraph needs CUDA tensors")
        self.cache = cache
        self.tokens = q.size(2)
        self.q, self.k, self.v = q.clone(), k.clone(), v.clone()
        if cache.k is None or cache.capacity - cache.length < self.tokens:
            cache._reserve(k, self.tokens)
        cache._sync_device_counters()
        comm.host_group(cache.group)  # made now: no group is created while capturing
        kernel = get_kernel("math")
        scale_value = 1.0 / math.sqrt(q.size(3)) if scale is None else float(scale)
        # Warm up on a side stream (kernels, NCCL) without storing anything.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                _decode_static(
                    self.q,
                    self.k,
                    self.v,
                    cache,
                    scale_value,
                    kernel,
                    decode_kernel,
                    store=False,
                    graph=True,
                )
        torch.cuda.current_stream().wait_stream(stream)
        saved = (cache.length, cache.total, list(cache.segments))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = decode(
                self.q,
                self.k,
                self.v,
                cache,
                scale=scale,
                backend=backend,
                static=True,
                decode_kernel=decode_kernel,
            )
        cache.length, cache.total = saved[0], saved[1]
        cache.segments = saved[2]
        self._buffers = (cache.k.data_ptr(), cache.v.data_ptr())  # type: ignore[union-attr]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        if cache.k is None or (cache.k.data_ptr(), cache.v.data_ptr()) != self._buffers:  # type: ignore[union-attr]
            raise ValueError("DecodeGraph: the cache's buffers were reallocated since the capture")
        if cache.capacity - cache.length < self.tokens:
            raise ValueError(
                f"DecodeGraph: the cache is full ({cache.length} of {cache.capacity} slots); "
                "reserve more with KVCache(capacity=...) and capture again"
            )
        cache._sync_device_counters()
        self.q.copy_(q)
        self.k.copy_(k)
        self.v.copy_(v)
        self.graph.replay()
        segment = Segment("decode", cache.total, self.tokens)
        cache._record(segment, segment.length(cache.rank, cache.world))
        return self.out.clone()
