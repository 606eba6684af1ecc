"""The ring algorithm, forward and backward, as a ``torch.autograd.Function``.

Forward: each rank keeps its queries; K/V blocks travel to the next rank each step, the
transfer for step i+1 posted before step i's compute, into one of two alternating buffers.
Block results are merged into float32 accumulators by their log-sum-exp.

Backward: the same ring again. Per step the block gradients are computed from the final
output and lse (nothing of the forward is recomputed beyond what the kernels themselves
do); dq accumulates locally, dk/dv accumulate into float32 buffers that travel with K/V and
reach their home rank after N steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .comm import PendingShift, Ring
from .kernels import Kernel, accumulation_dtype
from .layout import BlockPlan, Part
from .merge import merge_into

__all__ = ["RingAttentionFunction", "RingCall", "block_backward", "block_forward"]


@dataclass(frozen=True)
class RingCall:
    """Everything the ring needs besides the tensors."""

    ring: Ring | None  # None for a single rank
    plans: tuple[BlockPlan | None, ...]
    kernel: Kernel
    scale: float


class ForwardAccumulator:
    """Merged output and lse of this rank's queries over the blocks seen so far."""

    def __init__(self) -> None:
        self.out: Tensor | None = None
        self.lse: Tensor | None = None
        self.aux: Any = None

    def add(self, plan: BlockPlan, out: Tensor, lse: Tensor, aux: Any) -> None:
        if self.out is None:
            if plan.q_part is not Part.ALL:
                raise AssertionError("the first computed block must cover every query row")
            dtype = accumulation_dtype(out.dtype)
            self.out = out.to(dtype, copy=True)
            self.lse = lse.to(dtype, copy=True)
            self.aux = aux
            return
        assert self.lse is not None
        merge_into(plan.q_part.take(self.out), plan.q_part.take(self.lse), out, lse)


def block_forward(
    kernel: Kernel, plan: BlockPlan, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Any]:
    """The kernel forward on the parts of q and of the K/V block that ``plan`` names."""
    return kernel.forward(
        plan.q_part.take(q),
        plan.kv_part.take(k),
        plan.kv_part.take(v),
        causal=plan.causal,
        scale=scale,
    )


def block_backward(
    kernel: Kernel,
    plan: BlockPlan,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    aux: Any,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel backward on the parts ``plan`` names; gradients are for those parts."""
    qp, kp = plan.q_part, plan.kv_part
    return kernel.backward(
        qp.take(dout),
        qp.take(q),
        kp.take(k),
        kp.take(v),
        qp.take(out),
        qp.take(lse),
        aux,
        causal=plan.causal,
        scale=scale,
    )


def add_block_grads(
    plan: BlockPlan, grads: tuple[Tensor, Tensor, Tensor], dq: Tensor, dk: Tensor, dv: Tensor
) -> None:
    """Add one block's gradients into the accumulators, on the parts the plan names."""
    bdq, bdk, bdv = grads
    plan.q_part.take(dq).add_(bdq)
    plan.kv_part.take(dk).add_(bdk)
    plan.kv_part.take(dv).add_(bdv)


def _kv_blocks(
    k: Tensor, v: Tensor, call: RingCall
) -> Iterator[tuple[BlockPlan | None, Tensor, Tensor]]:
    """Yield each step's plan with the K/V block held then.

    The transfer of the next block is posted before each yield, so it overlaps whatever the
    caller computes on the current block, and received into one of two alternating buffers.
    """
    steps = len(call.plans)
    buffers = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(2, steps - 1))]
    k_cur, v_cur = k, v
    for step, plan in enumerate(call.plans):
        pending: PendingShift | None = None
        if step + 1 < steps:
            assert call.ring is not None
            k_next, v_next = buffers[step % 2]
            pending = call.ring.shift((k_cur, v_cur), (k_next, v_next))
        yield plan, k_cur, v_cur
        if pending is not None:
            pending.wait()
            k_cur, v_cur = k_next, v_next


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, call: RingCall) -> tuple[Tensor, Tensor, Any]:
    acc = ForwardAccumulator()
    for plan, k_cur, v_cur in _kv_blocks(k, v, call):
        if plan is not None:
            acc.add(plan, *block_forward(call.kernel, plan, q, k_cur, v_cur, call.scale))
    assert acc.out is not None and acc.lse is not None
    return acc.out.to(q.dtype), acc.lse, acc.aux


def _ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    aux: Any,
    call: RingCall,
) -> tuple[Tensor, Tensor, Tensor]:
    acc_dtype = accumulation_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc_dtype)
    # dK/dV accumulators: one being added to and sent, one being received into.
    dkv = [
        (torch.zeros_like(k, dtype=acc_dtype), torch.zeros_like(v, dtype=acc_dtype)),
        (torch.empty_like(k, dtype=acc_dtype), torch.empty_like(v, dtype=acc_dtype)),
    ]
    dkv_cur = 0
    dkv_pending: PendingShift | None = None
    for plan, k_cur, v_cur in _kv_blocks(k, v, call):
        grads = None
        if plan is not None:
            grads = block_backward(
                call.kernel, plan, dout, q, k_cur, v_cur, out, lse, aux, call.scale
            )
        if dkv_pending is not None:
            # The accumulator of the block we hold arrives from the previous rank.
            dkv_pending.wait()
            dkv_cur ^= 1
        dk_acc, dv_acc = dkv[dkv_cur]
        if plan is not None and grads is not None:
            add_block_grads(plan, grads, dq, dk_acc, dv_acc)
        if call.ring is not None:
            # Pass the accumulator on; after the last step this is its trip home.
            dkv_pending = call.ring.shift((dk_acc, dv_acc), dkv[dkv_cur ^ 1])
    if dkv_pending is not None:
        dkv_pending.wait()
        dkv_cur ^= 1
    dk, dv = dkv[dkv_cur]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttentionFunction(torch.autograd.Function):
    """Differentiable ring attention over local shards; returns ``(out, lse)``.

    ``lse`` is returned without a gradient path (it is marked non-differentiable).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, call: RingCall):  # type: ignore[override]
        out, lse, aux = _ring_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.aux = aux
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, ctx.aux, ctx.call)
        return dq, dk, dv, None
