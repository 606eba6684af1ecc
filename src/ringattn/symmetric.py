"""Ring shifts through symmetric memory: copies and signals that CUDA graphs can capture.

For short sequences a ring step's NCCL send/receive costs the host 50-200 us to issue,
often more than the step's attention takes on the GPU, and NCCL work must stay out of
CUDA graphs that outlive ``destroy_process_group()``. When every rank of the group runs
on one host, PyTorch's symmetric memory maps each rank's staging buffer into the others'
address space, so a shift is plain stream work:

1. on a side stream that waits for the caller's stream: copy the tensors to send into
   this rank's staging buffer, then signal the receiving rank ("ready");
2. wait for the sending rank's "ready", copy its staging buffer into the tensors to
   receive, and signal it back ("done");
3. wait for the receiving rank's "done" (it has read this rank's buffer, which may now
   be reused); ``wait()`` makes the caller's stream wait for the side stream.

Every rank runs the same shifts in the same order (the ring's schedule), and each shift
consumes exactly the two signals it expects, so shifts never mix. Because these are
ordinary kernels and copies, a ring call recorded as a CUDA-graph program keeps its
transfers inside one graph (see :mod:`ringattn.graphs`), and an eager rank and a
replaying rank run the same protocol. Nothing of NCCL is involved, so teardown never
waits on a graph.

A rank that never reaches a shift (it raised or died) leaves its peers' signal waits
spinning until :data:`SIGNAL_TIMEOUT_MS`, when the waiting kernel traps (a CUDA error)
instead of hanging forever.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm

__all__ = [
    "CAPACITY_BYTES",
    "SymmetricRing",
    "shift_fits",
    "symmetric_ring_for",
    "symmetric_ring_made",
]

logger = logging.getLogger("ringattn")

# One staging buffer per group and device, made once and never replaced: a recorded
# program keeps the addresses of its own and its peers' buffers. Shifts larger than this
# use NCCL (K/V of 16K tokens on 4 ranks, 8 heads x 128, and their float32 dK/dV fit).
CAPACITY_BYTES = 64 << 20
# How long a signal wait spins before its kernel traps (a peer that never came).
SIGNAL_TIMEOUT_MS = 600_000
_ALIGN = 256  # bytes: every tensor starts aligned in the staging buffer
_READY, _DONE = 0, 1  # signal channels


@dataclass
class _PendingSymmetricShift:
    event: torch.cuda.Event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)


def _offsets(nbytes: Sequence[int]) -> list[int]:
    """Where each of tensors of these byte sizes starts in a staging buffer, packed and
    :data:`_ALIGN`-aligned, and (last) the bytes they take in all."""
    at, found = 0, []
    for n in nbytes:
        found.append(at)
        at += -(-n // _ALIGN) * _ALIGN
    found.append(at)
    return found


def shift_fits(nbytes: Sequence[int]) -> bool:
    """Whether one shift of tensors of these byte sizes fits the staging buffer."""
    return _offsets(nbytes)[-1] <= CAPACITY_BYTES


def _views(buffer: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of a staging buffer (``uint8``) shaped as ``like``, where a shift packs them."""
    sizes = [t.numel() * t.element_size() for t in like]
    at = _offsets(sizes)
    return [
        buffer[start : start + n].view(t.dtype).view(t.shape)
        for t, start, n in zip(like, at, sizes)
    ]


class SymmetricRing:
    """The :class:`ringattn.comm.Ring` interface over symmetric memory (CUDA, one host).

    ``capturable``: its shifts may be recorded inside a CUDA graph.
    """

    capturable = True

    def __init__(self, group: dist.ProcessGroup, device: torch.device, handle, buffer: Tensor):  # noqa: ANN001
        self.group = group
        self.rank, self.size, _ = comm.group_facts(group)
        self.device = device
        self._handle = handle
        self._mine = buffer
        self._next = (self.rank + 1) % self.size
        self._prev = (self.rank - 1) % self.size
        self._peer_buffers = {
            r: handle.get_buffer(r, (buffer.numel(),), torch.uint8)
            for r in {self._next, self._prev}
        }
        self._stream = torch.cuda.Stream(device)

    def shift(
        self,
        send: Sequence[Tensor],
        recv: Sequence[Tensor],
        *,
        reverse: bool = False,
        what: str = "a ring transfer",
    ) -> _PendingSymmetricShift:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one (the
        other way with ``reverse``), as :meth:`ringattn.comm.Ring.shift`. Every rank must
        call it, in the same order, even with nothing to send or receive."""
        to, source = (self._prev, self._next) if reverse else (self._next, self._prev)
        caller = torch.cuda.current_stream(self.device)
        stream = self._stream
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            if send:
                torch._foreach_copy_(_views(self._mine, send), list(send))
            self._handle.put_signal(to, _READY, SIGNAL_TIMEOUT_MS)
            self._handle.wait_signal(source, _READY, SIGNAL_TIMEOUT_MS)
            if recv:
                torch._foreach_copy_(list(recv), _views(self._peer_buffers[source], recv))
            self._handle.put_signal(source, _DONE, SIGNAL_TIMEOUT_MS)
            self._handle.wait_signal(to, _DONE, SIGNAL_TIMEOUT_MS)
            event = torch.cuda.Event()
            event.record(stream)
        return _PendingSymmetricShift(event)


_RINGS: dict[tuple[dist.ProcessGroup, torch.device], SymmetricRing | None] = {}


def _enabled() -> bool:
    return os.environ.get("RINGATTN_SYMMETRIC_MEMORY", "1") != "0"


def symmetric_ring_made(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether :func:`symmetric_ring_for` has run for this group and device (whatever it
    found)."""
    return (group, device) in _RINGS


def symmetric_ring_for(group: dist.ProcessGroup, device: torch.device) -> SymmetricRing | None:
    """The group's symmetric-memory ring on ``device``, or None where there is none.

    Made on the first call for the pair (every rank of the group must make that call
    together, as with any collective): the ranks check that they share one host, allocate
    and exchange their staging buffers, and agree that every rank succeeded, so the answer
    is the same on every rank. ``RINGATTN_SYMMETRIC_MEMORY=0`` on any rank turns it off for
    the group.
    """
    key = (group, device)
    if key in _RINGS:
        return _RINGS[key]
    made: SymmetricRing | None = None
    host = comm.host_group(group)
    if host is not None and device.type == "cuda":
        # Every rank takes part in both exchanges, whatever its own answer, so a rank with
        # RINGATTN_SYMMETRIC_MEMORY=0 or a failed allocation turns it off for all.
        facts: list[object] = [None] * comm.group_facts(group)[1]
        dist.all_gather_object(facts, (socket.gethostname(), _enabled()), group=host)
        if len({name for name, _ in facts}) == 1 and all(on for _, on in facts):
            try:
                import torch.distributed._symmetric_memory as symm_mem

                buffer = symm_mem.empty(CAPACITY_BYTES, dtype=torch.uint8, device=device)
                handle = symm_mem.rendezvous(buffer, group.group_name)
                made = SymmetricRing(group, device, handle, buffer)
            except Exception as err:  # noqa: BLE001 - NCCL shifts then
                logger.info("ringattn: no symmetric memory for ring shifts (%s)", err)
            ok = torch.tensor([int(made is not None)])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=host)
            if not int(ok):
                made = None
    _RINGS[key] = made
    return made
