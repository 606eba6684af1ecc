"""Moving tensors between ranks: ring shifts with async handles, all-gather, group helpers.

Works on NCCL (CUDA tensors) and Gloo (CPU tensors). Knows nothing about attention.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "PendingShift",
    "Ring",
    "all_gather",
    "all_to_all_into",
    "all_to_all_now",
    "backend_device_types",
    "host_group",
    "resolve_group",
    "ring_for",
]

logger = logging.getLogger("ringattn")


def resolve_group(group: object) -> dist.ProcessGroup:
    """The ProcessGroup behind ``group``: None (the world), a ProcessGroup or a 1-D DeviceMesh.

    Raises ValueError/TypeError naming ``group`` when it is unusable; needs no communication.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)"
        )
    if group is None:
        return dist.group.WORLD  # type: ignore[return-value]
    if isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"group: a DeviceMesh must be 1-D for ring attention, got a {group.ndim}-D mesh; "
                "pass mesh['dim_name'] for the sequence-parallel dimension"
            )
        return group.get_group()
    raise TypeError(
        f"group must be None, a ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}"
    )


@dataclass(frozen=True)
class SequenceMesh:
    """The ranks a sequence is sharded over, flattened row-major, and its 2-D split if any.

    ``flat`` orders all ranks as the layout does; on a 2-D mesh ``outer`` and ``inner`` are
    this rank's groups along dimensions 0 and 1 (``inner`` ranks are consecutive in ``flat``).
    """

    flat: dist.ProcessGroup
    outer: dist.ProcessGroup | None = None
    inner: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        return group_facts(self.flat)[1]

    @property
    def rank(self) -> int:
        return group_facts(self.flat)[0]

    @property
    def inner_size(self) -> int:
        return group_facts(self.inner)[1] if self.inner is not None else 1

    @property
    def outer_size(self) -> int:
        return self.size // self.inner_size


_MESHES: dict[Any, SequenceMesh] = {}


def resolve_mesh(mesh: object) -> SequenceMesh:
    """The :class:`SequenceMesh` of ``mesh``: None (the world), a ProcessGroup, or a 1-D or
    2-D DeviceMesh (a SequenceMesh is returned as it is). Raises ValueError/TypeError naming
    ``mesh``; no communication except for a 2-D mesh that does not cover the world in rank
    order (one group made, once)."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(mesh, SequenceMesh):
        return mesh
    if not isinstance(mesh, DeviceMesh) or mesh.ndim == 1:
        try:
            return SequenceMesh(resolve_group(mesh))
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("group", "mesh", 1)) from None
    if mesh.ndim != 2:
        raise ValueError(f"mesh must be 1-D or 2-D, got a {mesh.ndim}-D DeviceMesh")
    found = _MESHES.get(mesh)
    if found is None:
        ranks = mesh.mesh.flatten().tolist()
        if ranks == list(range(dist.get_world_size())):
            flat = dist.group.WORLD
        elif ranks == sorted(ranks):
            flat = dist.new_group(ranks)
        else:
            raise ValueError(
                f"mesh: a 2-D mesh's ranks must ascend in row-major order, got {mesh.mesh.tolist()}"
            )
        found = _MESHES[mesh] = SequenceMesh(flat, mesh.get_group(0), mesh.get_group(1))
    return found


# Per-group facts that never change, looked up once: PyTorch's lookups cost tens of us.
_GROUP_FACTS: dict[dist.ProcessGroup, tuple[int, int, frozenset[str]]] = {}


def group_facts(group: dist.ProcessGroup) -> tuple[int, int, frozenset[str]]:
    """``(rank, world_size, device types)`` of this process in ``group``, cached."""
    facts = _GROUP_FACTS.get(group)
    if facts is None:
        facts = (
            dist.get_rank(group),
            dist.get_world_size(group),
            frozenset(_backend_device_types(group)),
        )
        _GROUP_FACTS[group] = facts
    return facts


def backend_device_types(group: dist.ProcessGroup) -> frozenset[str]:
    """Device types whose tensors this group's backend can send and receive."""
    return group_facts(group)[2]


def _backend_device_types(group: dist.ProcessGroup) -> set[str]:
    backend = str(dist.get_backend(group)).lower()
    types = set()
    # Backend strings are 'nccl', 'gloo', or per-device maps such as 'cpu:gloo,cuda:nccl'.
    for entry in backend.split(","):
        device, _, name = entry.rpartition(":")
        if device:
            types.add(device)
        elif name == "gloo":
            types.add("cpu")
        elif name in ("nccl", "mpi"):
            types.add("cuda")
        else:
            types.update({"cpu", "cuda"})
    return types


def collective_device(group: dist.ProcessGroup, preferred: torch.device | None) -> torch.device:
    """A device this group's backend can run collectives on, ``preferred`` when it can."""
    types = backend_device_types(group)
    if preferred is not None and preferred.type in types:
        return preferred
    if "cuda" in types and "cpu" not in types:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Host-side groups over the same ranks as a CUDA-only group, by group; None where none could
# be made. Checks that only exchange a few integers run there, so they never wait behind
# queued GPU work.
_HOST_GROUPS: dict[dist.ProcessGroup, dist.ProcessGroup | None] = {}
_HOST_GROUP_TIMEOUT = datetime.timedelta(seconds=60)


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """A group over ``group``'s ranks that runs collectives on CPU tensors, or None.

    ``group`` itself when its backend takes CPU tensors; otherwise a Gloo group made on the
    first call (every rank of ``group`` must make that call together, which the first
    collective call on ``group`` guarantees) and reused after.
    """
    if "cpu" in backend_device_types(group):
        return group
    if group in _HOST_GROUPS:
        return _HOST_GROUPS[group]
    made: dist.ProcessGroup | None = None
    try:
        made = dist.new_group(
            dist.get_process_group_ranks(group),
            backend="gloo",
            timeout=_HOST_GROUP_TIMEOUT,
            use_local_synchronization=True,
        )
    except Exception as err:  # noqa: BLE001 - fall back to checking on the group itself
        logger.warning("ringattn: no Gloo group for host-side checks (%s); using the GPU", err)
    _HOST_GROUPS[group] = made
    return made


def all_gather(x: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """Every rank's ``x`` (same shape on every rank), in group-rank order."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


class RingCommunicationError(RuntimeError):
    """A ring transfer failed or timed out: another rank raised, died, or never called."""


@dataclass
class PendingShift:
    """An in-flight ring shift; ``wait()`` makes its received tensors safe to read.

    ``what`` says which step it is and ``peer`` which rank the transfer is with, for the
    error raised when it fails (a Gloo transfer fails after the group's timeout; NCCL's
    watchdog reports its own).
    """

    works: list[dist.Work]
    what: str = "a ring transfer"
    peer: str = "a neighbouring rank"

    def wait(self) -> None:
        try:
            for work in self.works:
                work.wait()
        except Exception as err:  # noqa: BLE001 - re-raised with where it happened
            raise _transfer_failed(self.what, self.peer, err) from err
        self.works = []


def _transfer_failed(what: str, peer: str, err: Exception) -> RingCommunicationError:
    return RingCommunicationError(
        f"ring_attention: {what}: the transfer with {peer} failed or timed out. Another "
        f"rank probably raised, died or made a different call; its own error says why. "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    )


class Ring:
    """Send to the next rank while receiving from the previous one (or the reverse), async."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size, _ = group_facts(group)
        self._next_local = (self.rank + 1) % self.size
        self._prev_local = (self.rank - 1) % self.size
        # P2POp wants global ranks.
        self._next = dist.get_global_rank(group, self._next_local)
        self._prev = dist.get_global_rank(group, self._prev_local)
        self._coalescing: dict[torch.device, bool] = {}
        self._next_name = f"rank {self._next_local} of the group (global rank {self._next})"
        self._prev_name = f"rank {self._prev_local} of the group (global rank {self._prev})"

    def shift(
        self,
        send: Sequence[Tensor],
        recv: Sequence[Tensor],
        *,
        reverse: bool = False,
        what: str = "a ring transfer",
    ) -> PendingShift:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous.

        With ``reverse=True`` the ring turns the other way: send to the previous rank, receive
        from the next. ``recv`` must match the sender's ``send`` in shapes and dtypes (either
        may be empty). Nothing written to ``send`` or read from ``recv`` is safe until
        ``wait()`` returns.
        """
        if not send and not recv:
            return PendingShift([])
        device = (send or recv)[0].device
        # The rank whose transfer this waits for: the sender when receiving.
        if recv:
            peer = self._next_name if reverse else self._prev_name
        else:
            peer = self._prev_name if reverse else self._next_name
        if self._coalesces(device):
            # What batch_isend_irecv does for NCCL, minus its per-op Python checks: the
            # group's own send/recv between start and end of one coalesced launch.
            to, source = (
                (self._prev_local, self._next_local)
                if reverse
                else (self._next_local, self._prev_local)
            )
            self.group._start_coalescing(device)
            for t in send:
                self.group.send([t], to, 0)
            for t in recv:
                self.group.recv([t], source, 0)
            return PendingShift([self.group._end_coalescing(device)], what, peer)
        to, source = (self._prev, self._next) if reverse else (self._next, self._prev)
        ops = [dist.P2POp(dist.isend, t, to, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, source, self.group) for t in recv]
        return PendingShift(dist.batch_isend_irecv(ops), what, peer)

    def _coalesces(self, device: torch.device) -> bool:
        known = self._coalescing.get(device)
        if known is None:
            try:
                backend = self.group._get_backend(device)
                known = type(self.group) is dist.ProcessGroup and bool(backend.supports_coalescing)
            except Exception:  # noqa: BLE001 - any doubt: the public API
                known = False
            self._coalescing[device] = known
        return known


def all_to_all_into(
    out: Tensor,
    x: Tensor,
    out_splits: Sequence[int],
    x_splits: Sequence[int],
    group: dist.ProcessGroup,
    what: str,
) -> PendingShift:
    """Rank r's ``x_splits[d]`` elements of the flat ``x`` (in rank order) go to rank d,
    into its ``out`` (``out_splits[r]`` from rank r): one collective, so the host pays one
    launch however many peers a rank talks to. Returns at once; ``wait()`` makes ``out``
    safe to read (``what`` names the transfer in the error raised when a peer fails).
    Every rank of ``group`` must call it."""
    work = dist.all_to_all_single(
        out, x, list(out_splits), list(x_splits), group=group, async_op=True
    )
    return PendingShift([work], what, "the other ranks of the group")


def all_to_all_now(out: Tensor, x: Tensor, group: dist.ProcessGroup, what: str) -> None:
    """Equal shares of ``x`` to every rank of ``group``, in rank order, into ``out``;
    returns when ``out`` is safe to read on the current stream. For a transfer whose result
    is needed at once: on NCCL (torch >= 2.8) a collective that is not asynchronous runs on
    the caller's stream, which spares the host the asynchronous one's event handshakes and
    its work handle. Every rank of ``group`` must call it."""
    try:
        dist.all_to_all_single(out, x, group=group)
    except Exception as err:  # noqa: BLE001 - re-raised with where it happened
        raise _transfer_failed(what, "the other ranks of the group", err) from err


_RINGS: dict[dist.ProcessGroup, Ring] = {}


def ring_for(group: dist.ProcessGroup) -> Ring:
    """The (cached) ring over ``group``'s ranks."""
    ring = _RINGS.get(group)
    if ring is None:
        ring = _RINGS[group] = Ring(group)
    return ring


# torch 2.13 renamed the tensor-to-tensor collectives; older releases have only the old names.
_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_INTO = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(out: Tensor, x: Tensor, group: dist.ProcessGroup) -> None:
    """``out`` (``[world, *x.shape]``) gets every rank's ``x``, in group-rank order."""
    # Backends want the output as x.shape with the first dimension world times longer.
    _GATHER_INTO(out.flatten(0, 1), x, group=group)


def reduce_scatter_into(out: Tensor, x: Tensor, group: dist.ProcessGroup) -> None:
    """``out`` gets the sum over ranks of ``x[rank]`` (``x`` is ``[world, *out.shape]``)."""
    _REDUCE_SCATTER_INTO(out, x.flatten(0, 1), group=group)
