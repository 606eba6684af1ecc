"""Moving tensors between ranks: ring shifts with async handles, all-gather, group helpers.

Works on NCCL (CUDA tensors) and Gloo (CPU tensors). Knows nothing about attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["PendingShift", "Ring", "all_gather", "backend_device_types", "resolve_group"]


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


def backend_device_types(group: dist.ProcessGroup) -> set[str]:
    """Device types whose tensors this group's backend can send and receive."""
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


def all_gather(x: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """Every rank's ``x`` (same shape on every rank), in group-rank order."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


@dataclass
class PendingShift:
    """An in-flight ring shift; ``wait()`` makes its received tensors safe to read."""

    works: list[dist.Work]

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class Ring:
    """Send to the next rank while receiving from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        # P2POp wants global ranks.
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def shift(self, send: Sequence[Tensor], recv: Sequence[Tensor]) -> PendingShift:
        """Post sends of ``send`` to the next rank and receives into ``recv`` from the previous.

        ``recv[i]`` must have the shape and dtype of ``send[i]``. Nothing written to ``send``
        or read from ``recv`` is safe until ``wait()`` returns.
        """
        ops = [dist.P2POp(dist.isend, t, self._next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self._prev, self.group) for t in recv]
        return PendingShift(dist.batch_isend_irecv(ops))
