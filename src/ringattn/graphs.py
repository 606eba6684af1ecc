"""CUDA-graph replay of the ring for one call signature (opt-in, CUDA only).

For short sequences the host needs longer to issue a ring call's kernels and transfers than
the GPU needs to run them. Captured once per call signature, a forward (and a backward) is
one graph launch plus copies in and out of the graph's own buffers.

Every call copies its inputs into the graph's input buffers and its results out of the
graph's output buffers, so any number of calls with one signature (the layers of a model)
can be in flight between forward and backward: nothing a caller holds lives in graph memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .ring import RingCall, _ring_backward, _ring_forward

__all__ = ["GraphedRing", "GraphedRingFunction"]


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm ``fn`` up on a side stream (plans, compilation, connections), then capture it.

    Returns the graph and what ``fn`` returned during capture (its tensors live in the
    graph's memory and are rewritten by every replay). The graph has not run yet.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class GraphedRing:
    """The forward and backward graphs of one call signature, captured on first use."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> None:
        self.call = call
        self.inputs = tuple(torch.empty_like(x) for x in (q, k, v))
        self.forward_graph: torch.cuda.CUDAGraph | None = None
        self.backward_graph: torch.cuda.CUDAGraph | None = None
        self.dout: Tensor | None = None

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        """``(out, lse, aux, k_last, v_last)`` in graph memory (copy what you keep)."""
        for static, x in zip(self.inputs, (q, k, v)):
            static.copy_(x)
        if self.forward_graph is None:
            self.forward_graph, self.forward_outputs = _capture(
                lambda: _ring_forward(*self.inputs, self.call)
            )
        self.forward_graph.replay()
        return self.forward_outputs

    def backward(self, dout: Tensor, saved: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``(dq, dk, dv)`` in graph memory for the call whose tensors ``saved`` holds.

        ``saved`` is ``(q, k, v, out, lse, k_last, v_last)`` of that call.
        """
        assert self.forward_graph is not None
        q, k, v, out, lse, k_last, v_last = saved
        f_out, f_lse, aux, f_k_last, f_v_last = self.forward_outputs
        if self.dout is None:
            self.dout = torch.empty_like(dout, memory_format=torch.contiguous_format)
        pairs = zip(
            (self.dout, *self.inputs, f_out, f_lse, f_k_last, f_v_last),
            (dout, q, k, v, out, lse, k_last, v_last),
        )
        for static, x in pairs:
            static.copy_(x)
        if self.backward_graph is None:
            self.backward_graph, self.backward_outputs = _capture(
                lambda: _ring_backward(
                    self.dout, *self.inputs, f_out, f_lse, aux, f_k_last, f_v_last, self.call
                )
            )
        self.backward_graph.replay()
        return self.backward_outputs


class GraphedRingFunction(torch.autograd.Function):
    """Ring attention through a :class:`GraphedRing`; returns ``(out, lse)`` as the eager one."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, graphed: GraphedRing):  # type: ignore[override]
        out, lse, _, k_last, v_last = graphed.forward(q, k, v)
        out, lse = out.clone(), lse.clone()
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse, k_last.clone(), v_last.clone())
        ctx.graphed = graphed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None):  # type: ignore[override]
        grads = ctx.graphed.backward(dout, ctx.saved_tensors)
        return (*(g.clone() for g in grads), None)
