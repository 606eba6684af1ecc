"""Running a function on local ranks: spawned here, or in a process torchrun started.

``spawn_ranks`` starts one process per rank (NCCL on GPUs, Gloo on the CPU), sets up the
process group over TCP on localhost, and relays rank 0's progress events and result to the
caller over a queue. ``run_under_torchrun`` does the same inside a process that torchrun
started (``RANK``/``WORLD_SIZE`` set), so one worker serves both launch styles.

A worker is ``worker(rank, world_size, device, say, *args) -> result``; ``say(*event)``
reports progress (only rank 0's events reach the caller) and rank 0's return value is the
result.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["Worker", "launched_by_torchrun", "run_under_torchrun", "spawn_ranks"]

Worker = Callable[..., Any]

# Collectives that wait longer than this fail instead of hanging the run.
_TIMEOUT = datetime.timedelta(seconds=600)


def _init(
    rank: int, world_size: int, device_type: str, init_method: str, local_rank: int
) -> torch.device:
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=_TIMEOUT,
            device_id=device,
        )
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=_TIMEOUT
        )
    return device


def _entry(
    worker: Worker, rank: int, world_size: int, device_type: str, port: int, args: tuple, events
) -> None:
    try:
        device = _init(rank, world_size, device_type, f"tcp://127.0.0.1:{port}", rank)
        say = (lambda *e: events.put(("event", *e))) if rank == 0 else (lambda *e: None)
        result = worker(rank, world_size, device, say, *args)
        if rank == 0:
            events.put(("result", result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything to the launching process
        events.put(("error", rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(
    worker: Worker,
    ranks: int,
    device_type: str,
    *args: Any,
    on_event: Callable[..., None] = lambda *e: None,
    timeout_s: float = 3600,
) -> Any:
    """Run ``worker`` on ``ranks`` new local processes; return rank 0's result.

    Raises RuntimeError with the failing rank's traceback, or TimeoutError.
    """
    if device_type == "cuda" and ranks > torch.cuda.device_count():
        raise ValueError(f"ranks={ranks} but only {torch.cuda.device_count()} GPUs are visible")
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(worker, r, ranks, device_type, port, args, events))
        for r in range(ranks)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the ranks did not finish within {timeout_s:.0f}s"
                    ) from None
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a rank exited unexpectedly") from None
                continue
            if event[0] == "error":
                raise RuntimeError(f"rank {event[1]} failed:\n{event[2]}")
            if event[0] == "result":
                return event[1]
            on_event(*event[1:])
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_under_torchrun(
    worker: Worker, device_type: str, *args: Any, on_event: Callable[..., None] = lambda *e: None
) -> Any:
    """Run ``worker`` as this torchrun rank; rank 0 returns its result, others return None."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = _init(rank, world_size, device_type, "env://", local_rank)
    say = on_event if rank == 0 else (lambda *e: None)
    try:
        result = worker(rank, world_size, device, say, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None
