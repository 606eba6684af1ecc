"""Exchanging a call's description among the ranks of a group, in microseconds on one host.

The cross-rank check (:mod:`ringattn.checks`) needs every rank's fixed-size integer
description of its call before the ring starts. A Gloo all-gather does that anywhere but
costs 0.1-0.7 ms of host time per call (a TCP round trip and two thread hand-offs), which
is most of a short sequence's budget. When every rank of the group runs on one host, this
module does the same exchange through a small shared-memory board instead: each rank
writes its description into its own slot and reads the others' slots, ~5 us in all.

Board protocol. Rank r owns two slots (by call parity); a slot is ``[seq, n, v_1..v_n]``
as int64. To post call ``s`` a rank writes the values and ``n`` first and ``seq = s``
last, so a reader that sees ``seq == s`` sees the values of call ``s`` (x86 and other
total-store-order hosts keep stores in order; the seq is one aligned 8-byte store). A rank
reads the others' slots of parity ``s % 2`` until each shows ``seq == s``. Two parities
suffice: a rank can post call ``s + 2`` only after every rank posted ``s + 1``, which each
does only after reading all of call ``s``. A rank that never posts (it raised before the
check, died, or makes another call) makes the others raise after the group's timeout, as
the Gloo all-gather would; calls are matched by order, as collectives are.

Setting up (once per group, on its first check) uses the group itself: the ranks compare
host identities, rank 0 creates the board file in ``/dev/shm`` and passes its name, every
rank maps it and proves it sees the others' writes, and the file is unlinked (the mappings
stay). Anything unusual (ranks on several hosts, no ``/dev/shm``, a mapping that is not
shared, ``RINGATTN_SHARED_MEMORY_CHECK=0``) leaves the group on the Gloo all-gather.
"""

from __future__ import annotations

import datetime
import logging
import mmap
import os
import secrets
import socket
import struct
import tempfile
import time

import torch
import torch.distributed as dist

from . import comm

__all__ = ["exchange"]

logger = logging.getLogger("ringattn")

_SLOT_INTS = 64  # seq, n, and up to 62 values
_SLOT_BYTES = _SLOT_INTS * 8
_SPIN = 2000  # reads before the waiting rank starts sleeping between reads


class _Board:
    """One group's shared-memory board, mapped in this process."""

    def __init__(self, memory: mmap.mmap, rank: int, size: int, timeout: float) -> None:
        self.memory = memory
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self.seq = 0

    def _offset(self, rank: int, parity: int) -> int:
        return (rank * 2 + parity) * _SLOT_BYTES

    def exchange(self, mine: list[int]) -> list[list[int]]:
        self.seq += 1
        seq, n = self.seq, len(mine)
        mine_at = self._offset(self.rank, seq & 1)
        struct.pack_into(f"<q{n}q", self.memory, mine_at + 8, n, *mine)
        struct.pack_into("<q", self.memory, mine_at, seq)  # last: publishes the values
        rows: list[list[int]] = []
        for rank in range(self.size):
            if rank == self.rank:
                rows.append(list(mine))
                continue
            at = self._offset(rank, seq & 1)
            reads, deadline = 0, 0.0
            while struct.unpack_from("<q", self.memory, at)[0] != seq:
                reads += 1
                if reads > _SPIN:
                    now = time.monotonic()
                    if not deadline:
                        deadline = now + self.timeout
                    elif now > deadline:
                        raise TimeoutError(
                            f"rank {rank} did not post call {seq} within {self.timeout:.0f} s"
                        )
                    time.sleep(5e-5)
            count = struct.unpack_from("<q", self.memory, at + 8)[0]
            rows.append(list(struct.unpack_from(f"<{count}q", self.memory, at + 16)))
        return rows


# Boards by (host-side) group; None where the group uses the all-gather.
_BOARDS: dict[dist.ProcessGroup, _Board | None] = {}


def _group_timeout(group: dist.ProcessGroup) -> float:
    try:
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else 60.0
    except Exception:  # noqa: BLE001 - any backend without options: Gloo's default
        return 60.0


def _host_identity() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _set_up(group: dist.ProcessGroup) -> _Board | None:
    """Make the group's board (a collective over ``group``), or None to use the all-gather."""
    rank, size, _ = comm.group_facts(group)
    wanted = os.environ.get("RINGATTN_SHARED_MEMORY_CHECK", "1") != "0"
    facts: list[object] = [None] * size
    dist.all_gather_object(facts, (wanted, _host_identity(), os.path.isdir("/dev/shm")), group)
    if not all(f[0] and f[2] and f[1] == facts[0][1] for f in facts):  # type: ignore[index]
        return None
    name: list[object] = [None]
    fd = -1
    if rank == 0:
        try:
            fd, path = tempfile.mkstemp(prefix="ringattn-check-", dir="/dev/shm")
            os.ftruncate(fd, size * 2 * _SLOT_BYTES)
            name[0] = path
        except OSError as err:
            logger.debug("ringattn: no shared-memory board (%s)", err)
    dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
    path = name[0]
    memory: mmap.mmap | None = None
    token = secrets.randbits(62)
    if isinstance(path, str):
        try:
            if fd < 0:
                fd = os.open(path, os.O_RDWR)
            memory = mmap.mmap(fd, size * 2 * _SLOT_BYTES)
            struct.pack_into("<q", memory, rank * 2 * _SLOT_BYTES, token)
        except OSError as err:
            logger.debug("ringattn: cannot map the shared-memory board (%s)", err)
            memory = None
        finally:
            if fd >= 0:
                os.close(fd)
    tokens: list[object] = [None] * size
    dist.all_gather_object(tokens, token if memory is not None else None, group)
    seen = memory is not None and all(
        t is not None and struct.unpack_from("<q", memory, r * 2 * _SLOT_BYTES)[0] == t
        for r, t in enumerate(tokens)
    )
    verdicts: list[object] = [None] * size
    dist.all_gather_object(verdicts, seen, group)  # after this, nobody opens the file again
    if rank == 0 and isinstance(path, str):
        os.unlink(path)
    if not all(verdicts):
        if memory is not None:
            memory.close()
        return None
    assert memory is not None
    memory[:] = bytes(len(memory))  # nobody reads before the first call's seq is posted
    dist.barrier(group)
    return _Board(memory, rank, size, _group_timeout(group))


def exchange(group: dist.ProcessGroup, device: torch.device, mine: list[int]) -> list[list[int]]:
    """Every rank's ``mine`` (same length on every rank), in group-rank order.

    ``group`` is the group to check on and ``device`` the device its collectives take.
    Raises on a rank that does not answer within the group's timeout.
    """
    if group not in _BOARDS:
        board = None
        if device.type == "cpu" and len(mine) <= _SLOT_INTS - 2:
            board = _set_up(group)
        _BOARDS[group] = board
    board = _BOARDS[group]
    if board is not None:
        return board.exchange(mine)
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    return [row.tolist() for row in comm.all_gather(local, group)]
