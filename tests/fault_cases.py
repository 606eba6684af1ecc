"""Per-rank workers for ranks that disagree, raise or die (importable by spawned ranks)."""

from __future__ import annotations

import os
import time

import torch

import ringattn


def _inputs(length: int = 8, heads: int = 6, kv_heads: int = 3, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, length, 16, generator=g, dtype=dtype)
    k = torch.randn(1, kv_heads, length, 16, generator=g, dtype=dtype)
    return q, k, k.clone()


# name -> the keyword changes one rank (the last) makes after calls every rank agreed on
LONE_CHANGES = {
    "length": {"length": 12},
    "dtype": {"dtype": torch.float64},
    "heads": {"heads": 3},
    "kv_heads": {"kv_heads": 6},
    "layout": {"layout": "contiguous"},
    "causal": {"causal": False},
    "backend": {"backend": "math"},
}


def run_lone_changes(rank: int, world: int, entry: str) -> dict:
    """Agreed calls first; then, per change, the last rank alone calls differently.

    ``entry``: "ring_attention", or a strategy of ringattn.attention. Every rank records
    what it raised; a hang would fail the test at the group's timeout.
    """
    found = {}
    for name, change in LONE_CHANGES.items():
        base = {"causal": True, "layout": "zigzag", "backend": "cpu"}
        mine = dict(base, **change) if rank == world - 1 else base
        sizes = {
            key: mine.pop(key) for key in ("length", "dtype", "heads", "kv_heads") if key in mine
        }
        q, k, v = _inputs(**sizes)
        agreed = _inputs()

        def call(q, k, v, **kwargs):
            if entry == "ring_attention":
                return ringattn.ring_attention(q, k, v, **kwargs)
            return ringattn.attention(q, k, v, strategy=entry, **kwargs)

        for _ in range(2):
            call(*agreed, **base)
        start = time.monotonic()
        try:
            call(q, k, v, **mine)
            found[name] = ("no error", "", 0.0)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            found[name] = (type(err).__name__, str(err), time.monotonic() - start)
        # The group still works afterwards.
        call(*agreed, **base)
    return found


def run_fault(rank: int, world: int, fault: str) -> dict:
    """The last rank fails at one point of a forward+backward; the others carry on.

    ``fault``: "raise_before_backward" (the last rank raises after the forward),
    "exit_before_call" (it dies before calling), "exit_mid_backward" (it dies between its
    forward and backward), "exit_during_backward" (it dies inside its backward ring, after
    its first stage); "ulysses_exit_mid_backward" is the third through Ulysses' all-to-alls.
    """
    q, k, v = (x.requires_grad_() for x in _inputs())
    if fault.startswith("ulysses_"):
        fault = fault.removeprefix("ulysses_")

        def entry(q, k, v, causal):
            return ringattn.attention(q, k, v, causal=causal, strategy="ulysses")
    else:
        entry = ringattn.ring_attention
    entry(q.detach(), k.detach(), v.detach(), causal=True)  # agreed once
    last = rank == world - 1
    if last and fault == "exit_during_backward":
        # Die when the backward posts its second transfer: stage 1 has run, stage 2 has not.
        from ringattn import comm

        original, posted = comm.Ring.shift, []

        def dying_shift(self, send, recv, **kwargs):
            if "backward" in kwargs.get("what", ""):
                posted.append(1)
                if len(posted) == 2:
                    os._exit(5)
            return original(self, send, recv, **kwargs)

        comm.Ring.shift = dying_shift  # type: ignore[method-assign]
    if last and fault == "exit_before_call":
        os._exit(3)
    start = time.monotonic()
    try:
        out = entry(q, k, v, causal=True)
        if last and fault == "raise_before_backward":
            raise RuntimeError("this rank fails before its backward")
        if last and fault == "exit_mid_backward":
            os._exit(4)
        out.sum().backward()
        return {"outcome": ("no error", ""), "seconds": time.monotonic() - start}
    except Exception as err:  # noqa: BLE001 - the test inspects it
        if last:
            raise  # the failing rank's own error
        return {"outcome": (type(err).__name__, str(err)), "seconds": time.monotonic() - start}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_repeated_calls(rank: int, world: int, calls: int) -> dict:
    """Resident memory after warm-up and after ``calls`` forward+backward calls per entry."""
    import gc

    q, k, v = (x.requires_grad_() for x in _inputs(length=16))
    entries = {
        "ring_attention": lambda: ringattn.ring_attention(q, k, v, causal=True),
        "allgather": lambda: ringattn.attention(q, k, v, causal=True, strategy="allgather"),
        "ulysses": lambda: ringattn.attention(q, k, v, causal=True, strategy="ulysses"),
    }
    found = {}
    for name, call in entries.items():
        for _ in range(50):
            call().sum().backward()
        gc.collect()
        before = _rss_mib()
        for _ in range(calls):
            call().sum().backward()
        gc.collect()
        found[name] = (before, _rss_mib())
    return found


def run_determinism(rank: int, world: int) -> dict:
    """Outputs and gradients of every strategy and CPU backend, twice, on this rank."""
    found = {}
    g = torch.Generator().manual_seed(11)
    full = [torch.randn(1, 4, 64, 16, generator=g) for _ in range(4)]  # any world up to 4
    for backend, dtype in (
        ("cpu", torch.float32),
        ("math", torch.float32),
        ("cpu", torch.bfloat16),
    ):
        for strategy in ("ring", "allgather", "ulysses"):
            runs = []
            for _ in range(2):
                local = [ringattn.shard(x).to(dtype).requires_grad_() for x in full[:3]]
                out = ringattn.attention(*local, causal=True, strategy=strategy, backend=backend)
                out.backward(ringattn.shard(full[3]).to(dtype))
                runs.append([ringattn.unshard(t) for t in (out, *(x.grad for x in local))])
            found[f"{strategy}-{backend}-{dtype}"] = {
                "same_twice": all(torch.equal(a, b) for a, b in zip(*runs)),
                "result": runs[0],
            }
    return found
