"""CUDA-graph programs issue exactly the eager ring's transfers (CPU, single process).

``graphs.py`` keeps NCCL out of its graphs so that a rank replaying a program and a rank
running the eager ring stay in step. That holds only if a recorded program issues the same
transfers as the eager ring, in the same order, with the same shapes and dtypes, and waits
for each at the same point. Here the ring's own code runs for real on CPU tensors, with a
ring that logs its shifts instead of sending, and CUDA's capture calls are replaced by
stand-ins (what the graphs capture is checked on GPUs, where tests/test_gpu.py compares
replayed results with float64 attention).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest
import torch

from ringattn import graphs
from ringattn.checks import _plans
from ringattn.comm import Ring
from ringattn.kernels import get_kernel
from ringattn.ring import RingCall, _ring_backward, _ring_forward


def _signature(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class _LoggingRing(Ring):
    """A ring over no group: each shift and each wait is logged, nothing moves (what is
    received is zeros, so results are deterministic)."""

    def __init__(self) -> None:  # no group, no peers
        self.log: list[tuple] = []
        self.shifts = 0

    def shift(self, send, recv, *, reverse=False, what="a ring transfer"):  # type: ignore[override]
        index = self.shifts
        self.shifts += 1
        self.log.append(("shift", index, _signature(send), _signature(recv), reverse))
        for t in recv:
            t.zero_()
        log = self.log

        class _Pending:
            def wait(self) -> None:
                log.append(("wait", index))

        return _Pending()


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: capture records nothing, replay is logged."""

    replays: list[int] = []

    def __init__(self) -> None:
        self.capturing = False

    def capture_begin(self, pool: Any = None, capture_error_mode: str = "global") -> None:
        assert not self.capturing
        self.capturing = True

    def capture_end(self) -> None:
        assert self.capturing
        self.capturing = False

    def replay(self) -> None:
        _FakeGraph.replays.append(id(self))


class _FakeStream:
    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())


def _call(rank: int, world: int, causal: bool, layout: str) -> RingCall:
    return RingCall(
        ring=_LoggingRing(),
        plans=_plans(rank, world, causal, layout),
        kernel=get_kernel("cpu"),
        scale=0.125**0.5,
        next_last_plan=_plans((rank + 1) % world, world, causal, layout)[-1],
    )


def _program_log(program: graphs._Program) -> list[tuple]:
    """What a program's run issues, in the eager ring's log format."""
    ring = _LoggingRing()
    program.ring = ring
    program.run()
    return ring.log


CASES = [
    (world, rank, causal, layout)
    for world in (2, 3, 4)
    for rank, causal, layout in itertools.product(
        range(world), (True, False), ("zigzag", "contiguous")
    )
]


def _eager_logs(world: int, rank: int, causal: bool, layout: str) -> tuple:
    """Inputs ``(q, k, v, dout)`` and the eager ring's forward and backward logs."""
    g = torch.Generator().manual_seed(world * 10 + rank)
    q = torch.randn(1, 4, 16, 8, generator=g)
    k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in "kv")
    dout = torch.randn(q.shape, generator=g)
    eager = _call(rank, world, causal, layout)
    out, lse, aux, k_last, v_last = _ring_forward(q, k, v, eager)
    forward_log, eager.ring.log, eager.ring.shifts = eager.ring.log, [], 0
    _ring_backward(dout, q, k, v, out, lse, aux, k_last, v_last, eager)
    return (q, k, v, dout), forward_log, eager.ring.log


@pytest.mark.parametrize(("world", "rank", "causal", "layout"), CASES)
def test_programs_issue_the_eager_rings_transfers(fake_cuda, world, rank, causal, layout) -> None:
    (q, k, v, dout), forward_log, backward_log = _eager_logs(world, rank, causal, layout)
    assert len([e for e in forward_log if e[0] == "shift"]) == world - 1

    call = _call(rank, world, causal, layout)
    forward, outputs = graphs._record(call, lambda c: _ring_forward(q, k, v, c))
    assert call.ring.log == []  # neither the warm-up nor the recording moved anything
    backward, _ = graphs._record(call, lambda c: _ring_backward(dout, q, k, v, *outputs, c))
    assert call.ring.log == []
    _FakeGraph.replays.clear()
    assert _program_log(forward) == forward_log
    graphs_replayed = len(_FakeGraph.replays)
    assert graphs_replayed == len([s for s in forward.steps if isinstance(s, _FakeGraph)])
    assert graphs_replayed == 2 * (world - 1) + 1  # compute before, between and after
    assert _program_log(backward) == backward_log


class _CapturableLoggingRing(_LoggingRing):
    """A ring whose shifts CUDA graphs capture (as symmetric memory's copies and signals)."""

    capturable = True


@pytest.mark.parametrize(("world", "rank", "causal", "layout"), CASES[::2])
def test_capturable_shifts_are_recorded_inside_one_graph(
    fake_cuda, world, rank, causal, layout
) -> None:
    """With a capturable ring, a pass is one graph holding the eager ring's shifts and
    waits, issued in the eager order while recording (captured, not run, on GPUs); its
    replay issues no transfer of its own."""
    (q, k, v, dout), forward_log, backward_log = _eager_logs(world, rank, causal, layout)
    call = _call(rank, world, causal, layout)
    call = RingCall(
        _CapturableLoggingRing(), call.plans, call.kernel, call.scale, call.next_last_plan
    )
    forward, outputs = graphs._record(call, lambda c: _ring_forward(q, k, v, c))
    assert call.ring.log == forward_log
    call.ring.log, call.ring.shifts = [], 0
    backward, _ = graphs._record(call, lambda c: _ring_backward(dout, q, k, v, *outputs, c))
    assert call.ring.log == backward_log
    for program in (forward, backward):
        assert len(program.steps) == 1 and isinstance(program.steps[0], _FakeGraph)
        assert _program_log(program) == []


class _FakeCudaTensor:
    """Enough of a CUDA tensor for the choice of programs: flags, device and sizes."""

    is_cuda = True

    def __init__(self, shape: tuple[int, ...], device_index: int = 0) -> None:
        self.shape = shape
        self.device = torch.device("cuda", device_index)

    def size(self, dim: int) -> int:
        return self.shape[dim]


def test_when_calls_replay_programs(monkeypatch) -> None:
    from types import SimpleNamespace

    from ringattn import api

    stream = {"pointer": 1, "capturing": False}
    monkeypatch.setattr(api, "_current_device", lambda: 0)
    monkeypatch.setattr(api, "_current_stream_handle", lambda index: stream["pointer"])
    monkeypatch.setattr(api, "_capturing", lambda: stream["capturing"])
    monkeypatch.setattr(api, "GraphedRing", lambda q, k, v, call: object())
    two_ranks = SimpleNamespace(ring=SimpleNamespace(size=2))
    # 4K tokens on 2 ranks at 32 heads x 128 (1.7e10 per step), and 8K (6.9e10).
    q4, k4 = _FakeCudaTensor((1, 32, 2048, 128)), _FakeCudaTensor((1, 8, 2048, 128))
    q8, k8 = _FakeCudaTensor((1, 32, 4096, 128)), _FakeCudaTensor((1, 8, 4096, 128))
    try:
        api.set_cuda_graphs("auto")
        found = [api._graphed_ring(("4K",), q4, k4, k4, two_ranks) for _ in range(4)]
        assert found[:2] == [None, None]  # recorded on the third call, then kept
        assert found[2] is not None and found[3] == found[2]
        assert all(api._graphed_ring(("8K",), q8, k8, k8, two_ranks) is None for _ in range(4))
        # Shifts captured in the graphs (symmetric memory): 8K on 2 ranks records too.
        captured = SimpleNamespace(ring=SimpleNamespace(size=2, capturable=True))
        found8 = [api._graphed_ring(("8K", "sym"), q8, k8, k8, captured) for _ in range(3)]
        assert found8[:2] == [None, None] and found8[2] is not None
        q16 = _FakeCudaTensor((1, 32, 8192, 128))  # 16K on 2 ranks: long steps, eager
        assert all(
            api._graphed_ring(("16K", "sym"), q16, q16, q16, captured) is None for _ in range(4)
        )
        four_ranks = SimpleNamespace(ring=SimpleNamespace(size=4))  # 16K on 4 ranks
        assert [api._graphed_ring(("16K",), q8, k8, k8, four_ranks) is None for _ in range(3)] == [
            True,
            True,
            False,
        ]
        stream["pointer"] = 2  # another stream gets programs of its own
        assert api._graphed_ring(("4K",), q4, k4, k4, two_ranks)[1] is not found[2][1]
        stream["capturing"] = True  # inside someone else's capture: eager, recorded or not
        assert api._graphed_ring(("4K",), q4, k4, k4, two_ranks) is None
        stream["capturing"] = False
        other_device = _FakeCudaTensor((1, 32, 2048, 128), device_index=1)
        assert api._graphed_ring(("4K",), other_device, k4, k4, two_ranks) is None
        api.set_cuda_graphs(False)
        assert api._graphed_ring(("4K",), q4, k4, k4, two_ranks) is None
        api.set_cuda_graphs(True)  # every call, from the first
        assert api._graphed_ring(("8K",), q8, k8, k8, two_ranks) is not None
    finally:
        api.set_cuda_graphs("auto")


def test_a_backward_that_cannot_be_recorded_runs_eagerly_once_tried(fake_cuda, monkeypatch) -> None:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 16, 8, generator=g)
    k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in "kv")
    dout = torch.randn(q.shape, generator=g)
    eager = _call(0, 2, True, "zigzag")
    out, lse, aux, k_last, v_last = _ring_forward(q, k, v, eager)
    want = _ring_backward(dout, q, k, v, out, lse, aux, k_last, v_last, eager)
    programs = graphs.GraphedRing(q, k, v, _call(0, 2, True, "zigzag"))
    _, last = programs.forward(q, k, v)
    # What a replay leaves in program memory (the stand-in graphs replay nothing).
    for i, block in zip((1, 3, 4), (lse, k_last, v_last)):
        programs.forward_outputs[i].copy_(block)
    attempts = []

    def failing(call, fn):
        attempts.append(call)
        raise graphs.RecordingFailed("RuntimeError: not capturable")

    monkeypatch.setattr(graphs, "_record", failing)
    for _ in range(3):
        got = programs.backward(dout, (q, k, v, out), last)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(attempts) == 1


def test_a_backward_copies_in_only_what_a_later_call_overwrote(fake_cuda) -> None:
    """A backward right after its own forward finds its data in program memory and copies
    in only dout; once another call of the signature ran (forward, or a backward that
    copied its own data in), it copies its saved tensors and its last K/V block back."""
    g = torch.Generator().manual_seed(3)
    calls = [
        tuple(
            torch.randn(shape, generator=g)
            for shape in ((1, 4, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8))
        )
        for _ in range(2)
    ]
    dout = torch.randn(1, 4, 16, 8, generator=g)
    programs = graphs.GraphedRing(*calls[0], _call(0, 2, True, "zigzag"))

    def forward(i: int):
        (out, *_), last = programs.forward(*calls[i])
        # What a replay leaves in program memory (the stand-in graphs replay nothing): the
        # lse and the last K/V block stay there, only the output is copied out.
        programs.forward_outputs[1].fill_(float(i + 1))
        programs.forward_outputs[3].fill_(float(i + 1))
        return (*calls[i], out.clone()), last

    saved0, last0 = forward(0)
    kept = programs.forward_outputs
    saved1, last1 = forward(1)
    assert last0.kept is not None  # moved out (lse, k, v) before call 1 overwrote them
    assert bool((last0.kept[0] == 1).all()) and bool((last0.kept[1] == 1).all())
    assert last1.kept is None  # still in program memory
    programs.backward(dout, saved0, last0)
    assert torch.equal(programs.inputs[0], calls[0][0])  # call 0's data copied back in
    assert bool((kept[1] == 1).all()) and bool((kept[3] == 1).all())
    assert last1.kept is not None and bool((last1.kept[1] == 2).all())  # moved out first
    programs.backward(dout, saved1, last1)
    assert torch.equal(programs.inputs[0], calls[1][0])
    assert bool((kept[1] == 2).all()) and bool((kept[3] == 2).all())
    _, last2 = forward(0)
    programs.inputs[0].zero_()  # a backward that copies in would overwrite this
    programs.backward(dout, saved0, last2)
    assert bool((programs.inputs[0] == 0).all()) and torch.equal(programs.dout, dout)
