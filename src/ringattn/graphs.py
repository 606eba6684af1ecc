"""CUDA-graph replay of the ring for one call signature (CUDA only).

For short sequences the host needs longer to issue a ring call's kernels than the GPU needs
to run them. A signature's forward, and its backward, are each recorded once as a
*program*: CUDA graphs of the compute between the ring's transfers, with the transfers
themselves left out of the graphs. Replaying a program launches each graph and issues each
transfer (an ordinary NCCL send/receive on the program's own buffers) in recorded order, so
a ring step costs the host one graph launch and one transfer launch instead of dozens of
kernel launches.

Keeping NCCL out of the graphs is what makes replay safe by default:

- nothing of the process group is captured, so ``destroy_process_group()`` never waits
  on a graph (it hangs while graphs that captured NCCL work are alive);
- a replaying rank and an eager rank issue the same transfers in the same order, so ranks
  need not decide together whether to replay;
- recording moves no data: the pass that records runs no transfer at all (its compute is
  captured, not run), and a warm-up pass before it runs the compute with the transfers
  left out, so a recording that fails costs nothing but falling back to the eager ring.

Where the group's ranks share one host, the ring's shifts go through symmetric memory
(:mod:`ringattn.symmetric`): plain copies and signal kernels, which the graphs capture
too, so a pass is a single graph launch. The same two properties hold: the protocol is
the same for a replaying and an eager rank, and no NCCL work is captured.

Every call copies its inputs into the program's buffers and its results out, so any number
of calls with one signature (the layers of a model) can be in flight between forward and
backward: nothing a caller holds lives in graph memory.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .comm import PendingShift
from .ring import RingCall, _ring_backward, _ring_forward

__all__ = ["GraphedRing", "GraphedRingFunction", "RecordingFailed"]

logger = logging.getLogger("ringattn")


class RecordingFailed(RuntimeError):
    """Recording a program failed (an operation CUDA graphs cannot capture); run eagerly."""


@dataclass(frozen=True)
class _Transfer:
    """One ring shift of the program, on buffers that the program keeps alive."""

    send: tuple[Tensor, ...]
    recv: tuple[Tensor, ...]
    reverse: bool
    what: str


@dataclass(frozen=True)
class _Wait:
    transfer: _Transfer


_Step = torch.cuda.CUDAGraph | _Transfer | _Wait


class _Program:
    """Graphs and transfers in the order they were recorded; ``run`` replays them."""

    def __init__(self, steps: list[_Step], ring: Any) -> None:
        self.steps = steps
        self.ring = ring

    def run(self) -> None:
        pending: dict[int, PendingShift] = {}
        for step in self.steps:
            if isinstance(step, _Transfer):
                pending[id(step)] = self.ring.shift(
                    step.send, step.recv, reverse=step.reverse, what=step.what
                )
            elif isinstance(step, _Wait):
                pending.pop(id(step.transfer)).wait()
            else:
                step.replay()


class _Recorder:
    """Captures compute into a new graph segment at every transfer and every wait."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()  # one pool: segments replay in order
        self.steps: list[_Step] = []
        self.graph: torch.cuda.CUDAGraph | None = None

    def begin(self) -> None:
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (data loaders pinning memory) stay free to call CUDA.
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")

    def cut(self) -> None:
        self.end()
        self.begin()

    def end(self) -> None:
        assert self.graph is not None
        graph, self.graph = self.graph, None
        with warnings.catch_warnings():
            # A segment between two transfers may hold no work; an empty graph replays as
            # a no-op.
            warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*")
            graph.capture_end()
        self.steps.append(graph)

    def abort(self) -> None:
        if self.graph is not None:
            graph, self.graph = self.graph, None
            try:
                graph.capture_end()
            except Exception:  # noqa: BLE001 - the capture already failed; its error is raised
                pass


class _RecordingRing:
    """Stands in for the :class:`Ring` while recording: a shift becomes a program step.

    A ring whose shifts CUDA graphs can capture (symmetric memory, ``capturable``) shifts
    for real while recording: its copies and signals become part of the graph, and the
    program is one graph per pass."""

    def __init__(self, recorder: _Recorder, ring: Any = None) -> None:
        self.recorder = recorder
        self.ring = ring if getattr(ring, "capturable", False) else None

    def shift(
        self,
        send: Sequence[Tensor],
        recv: Sequence[Tensor],
        *,
        reverse: bool = False,
        what: str = "a ring transfer",
    ) -> Any:
        if self.ring is not None:
            return self.ring.shift(send, recv, reverse=reverse, what=what)
        transfer = _Transfer(tuple(send), tuple(recv), reverse, what)
        self.recorder.cut()
        self.recorder.steps.append(transfer)
        return _RecordedShift(self.recorder, transfer)


@dataclass
class _RecordedShift:
    recorder: _Recorder
    transfer: _Transfer

    def wait(self) -> None:
        self.recorder.cut()
        self.recorder.steps.append(_Wait(self.transfer))


class _SilentRing:
    """Stands in for the :class:`Ring` in the warm-up pass: no transfer (buffers keep
    whatever they held; the pass's results are thrown away)."""

    def shift(self, send: Sequence[Tensor], recv: Sequence[Tensor], **_: Any) -> PendingShift:
        return PendingShift([])


def _record(call: RingCall, fn: Callable[[RingCall], Any]) -> tuple[_Program, Any]:
    """Warm ``fn`` up on a side stream without transfers, then record it as a program.

    Returns the program and what ``fn`` returned while recording (its tensors live in the
    program's memory and are rewritten by every run). The program has not run yet.
    Raises :class:`RecordingFailed` if CUDA graphs cannot capture ``fn``'s compute.
    """
    assert call.ring is not None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    recorder = _Recorder()
    try:
        with torch.cuda.stream(side):
            # Lazily built state (kernel plans, workspaces) is made here, not while capturing.
            fn(dataclasses.replace(call, ring=_SilentRing()))
            side.synchronize()
            recorder.begin()
            outputs = fn(dataclasses.replace(call, ring=_RecordingRing(recorder, call.ring)))
            recorder.end()
    except Exception as err:
        recorder.abort()
        raise RecordingFailed(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    torch.cuda.current_stream().wait_stream(side)
    return _Program(recorder.steps, call.ring), outputs


def _copy_all(dsts: Sequence[Tensor], srcs: Sequence[Tensor]) -> None:
    """``dst.copy_(src)`` for each pair, in one multi-tensor launch per dtype where it can."""
    torch._foreach_copy_(list(dsts), list(srcs))


def _clone_all(xs: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``xs`` (new memory, contiguous), made with :func:`_copy_all`."""
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in xs]
    _copy_all(out, xs)
    return out


class _LastBlock:
    """What a call's backward needs of its forward's program memory: the last K/V block it
    received (the backward starts on it) and the lse.

    They stay in program memory until the signature's next forward overwrites them; only
    then are they copied out (``kept``: lse, k, v), so a backward that follows its own
    forward directly (the last layer, activation checkpointing) neither copies them out nor
    back in."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.kept: tuple[Tensor, ...] | None = None


class GraphedRing:
    """The forward and backward programs of one call signature, recorded on first use."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> None:
        self.call = call
        self.inputs = tuple(torch.empty_like(x) for x in (q, k, v))
        self.forward_program: _Program | None = None
        self.forward_outputs: tuple[Any, ...] = ()
        self.backward_program: _Program | None = None
        self.backward_outputs: tuple[Tensor, ...] = ()
        self.backward_eager = False  # its recording failed once: not tried again
        self.dout: Tensor | None = None
        self.generation = 0  # forward runs so far: program memory holds the latest one's
        self._last_block: weakref.ref[_LastBlock] | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[tuple[Any, ...], _LastBlock]:
        """``(out, lse, aux, k_last, v_last)`` in program memory (copy what you keep), and
        the handle of this call's last K/V block for its backward.

        Raises :class:`RecordingFailed` (before any transfer) if the first call cannot be
        recorded.
        """
        if self.forward_program is None:
            self.forward_program, self.forward_outputs = _record(
                self.call, lambda call: _ring_forward(*self.inputs, call)
            )
        self._release_memory()
        _copy_all(self.inputs, (q, k, v))
        self.forward_program.run()
        last = _LastBlock(self.generation)
        self._last_block = weakref.ref(last)
        return self.forward_outputs, last

    def _release_memory(self) -> None:
        """Program memory is about to take another call's data: the last block of the call
        it holds now is copied out first if that call's backward may still come."""
        holder = self._last_block() if self._last_block is not None else None
        if holder is not None and holder.kept is None and holder.generation == self.generation:
            _, f_lse, _, f_k_last, f_v_last = self.forward_outputs
            holder.kept = tuple(_clone_all((f_lse, f_k_last, f_v_last)))
        self.generation += 1

    def backward(
        self, dout: Tensor, saved: tuple[Tensor, ...], last: _LastBlock
    ) -> tuple[Tensor, ...]:
        """``(dq, dk, dv)`` for the call whose tensors ``saved`` (``(q, k, v, out)``) and
        ``last`` hold; program memory unless the backward could not be recorded (then the
        eager ring's own tensors).
        """
        assert self.forward_program is not None
        f_out, f_lse, aux, f_k_last, f_v_last = self.forward_outputs
        # No forward ran since this call's: program memory still holds its inputs and
        # results, so nothing needs copying back in.
        current = last.generation == self.generation
        lse, k_last, v_last = (f_lse, f_k_last, f_v_last) if current else last.kept  # type: ignore[misc]
        if self.dout is None:
            self.dout = torch.empty_like(dout, memory_format=torch.contiguous_format)
        if self.backward_program is None and not self.backward_eager:
            try:
                self.backward_program, self.backward_outputs = _record(
                    self.call,
                    lambda call: _ring_backward(
                        self.dout, *self.inputs, f_out, f_lse, aux, f_k_last, f_v_last, call
                    ),
                )
            except RecordingFailed as err:
                logger.warning("ringattn: this signature's backward runs eagerly (%s)", err)
                self.backward_eager = True
        if self.backward_program is None:
            q, k, v, out = saved
            return _ring_backward(
                dout.contiguous(), q, k, v, out, lse, aux, k_last, v_last, self.call
            )
        if current:
            _copy_all((self.dout,), (dout,))
        else:
            self._release_memory()
            _copy_all(
                (self.dout, *self.inputs, f_out, f_lse, f_k_last, f_v_last),
                (dout, *saved, lse, k_last, v_last),
            )
        self.backward_program.run()
        return self.backward_outputs


class GraphedRingFunction(torch.autograd.Function):
    """Ring attention through a :class:`GraphedRing`; returns ``(out, lse)`` as the eager one.

    With ``keep_lse`` False the lse returned is program memory, which the next call of the
    signature overwrites: for callers that drop it (the backward keeps its own, see
    :class:`_LastBlock`)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, graphed: GraphedRing, keep_lse: bool):  # type: ignore[override]
        (out, lse, _, _, _), last = graphed.forward(q, k, v)
        out = out.clone(memory_format=torch.contiguous_format)
        if keep_lse:
            lse = lse.clone(memory_format=torch.contiguous_format)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out)
            ctx.last = last
        ctx.graphed = graphed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None):  # type: ignore[override]
        grads = ctx.graphed.backward(dout, ctx.saved_tensors, ctx.last)
        return (*_clone_all(grads), None, None)
