"""Run a function on N local Gloo ranks and collect what each rank returns."""

from __future__ import annotations

import datetime
import io
import json
import os
import queue
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that waits longer than this on a collective fails instead of hanging the suite.
COLLECTIVE_TIMEOUT_S = 60


def _entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_file: str,
    args: tuple,
    results: Any,
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    backend: str = "gloo",
) -> None:
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
        try:
            # Bytes, not tensors: shared-memory tensors would die with this process.
            buffer = io.BytesIO()
            torch.save(fn(rank, world_size, *args), buffer)
            results.put((rank, "ok", buffer.getvalue()))
        finally:
            if dist.is_initialized():  # a worker may have destroyed it (teardown checks)
                dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks (Gloo, or NCCL
    with ``backend="nccl"``: rank r on GPU r).

    Returns each rank's result in rank order; raises if a rank failed or did not finish.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, r, world_size, init_file, args, results, COLLECTIVE_TIMEOUT_S, backend),
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        collected: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, value = results.get(timeout=timeout)
                if status == "ok":
                    collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    errors.append(f"rank {rank}:\n{value}")
        except queue.Empty:
            errors.append(
                f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                f"within {timeout}s"
            )
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[r] for r in range(world_size)]


def run_ranks_with_faults(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    collective_timeout_s: float,
    timeout: float = 120,
) -> list[dict[str, Any]]:
    """Like :func:`run_ranks` for ranks that may raise or die: never raises itself.

    Returns per rank ``{"ok": result}``, ``{"error": traceback}`` or ``{"exit": exit code}``,
    with ``"seconds"``: how long after the start the rank ended (as seen from here).
    """
    import time

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(
                target=_entry,
                args=(fn, r, world_size, init_file, args, results, collective_timeout_s),
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        found: dict[int, dict[str, Any]] = {}
        while len(found) < world_size and time.monotonic() - start < timeout:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(procs):
                    if r not in found and not p.is_alive() and p.exitcode not in (0, None):
                        found[r] = {"exit": p.exitcode, "seconds": time.monotonic() - start}
                continue
            entry = {"seconds": time.monotonic() - start}
            if status == "ok":
                entry["ok"] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                entry["error"] = value
            found[rank] = entry
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [found.get(r, {"hung": True}) for r in range(world_size)]


def run_example_both_ways(example: str, args: list[str], out_dir: Path) -> dict[str, Any]:
    """Run ``examples/<example>`` with ``--attention sdpa`` on one process and with ringattn
    on 2 torchrun ranks; return each run's ``--json`` record ("sdpa", "ringattn")."""
    script = Path(__file__).parents[1] / "examples" / example
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    runs = {
        "sdpa": [sys.executable, str(script), "--attention", "sdpa"],
        "ringattn": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(script),
        ],  # fmt: skip
    }
    found = {}
    for name, cmd in runs.items():
        out = out_dir / f"{name}.json"
        done = subprocess.run([*cmd, *args, "--json", str(out)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        found[name] = json.loads(out.read_text())
    return found
