"""The ring algorithm, forward and backward, as a ``torch.autograd.Function``.

Forward: each rank keeps its queries; K/V blocks travel to the next rank each step, the
transfer for step i+1 posted before step i's compute, into one of two alternating buffers.
Block results are merged by their log-sum-exp into the first block's output, in place.

Backward: the ring turns the other way and runs the forward's steps in reverse order. It
starts on the last K/V block the forward received (kept for this), so nothing waits for a
transfer at the start; it ends on the local block, so the dK/dV arriving home travel while
the local block's gradients are computed. Block gradients come from the final output and
lse (nothing of the forward is recomputed beyond what the kernels themselves do); dQ
accumulates locally, dK/dV accumulate in messages that travel with the K/V blocks.

Precision: sums of two block results are rounded once into the input dtype, exactly as a
float32 accumulator cast at the end would be; sums of more are accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .comm import PendingShift, Ring
from .kernels import Kernel, accumulation_dtype
from .layout import BlockPlan, Part
from .merge import merge_into

if TYPE_CHECKING:
    from .symmetric import SymmetricRing

__all__ = [
    "ForwardAccumulator",
    "RingAttentionFunction",
    "RingCall",
    "block_backward",
    "block_forward",
]


@dataclass(frozen=True)
class RingCall:
    """Everything the ring needs besides the tensors."""

    ring: Ring | SymmetricRing | None  # None for a single rank
    plans: tuple[BlockPlan | None, ...]
    kernel: Kernel
    scale: float
    # With two ranks: the next rank's last-step plan, which is on this rank's K/V. Its dK/dV
    # message covers only the K/V part that plan names (none when it is skipped).
    next_last_plan: BlockPlan | None = None


class ForwardAccumulator:
    """Merged output and lse of this rank's queries over the blocks seen so far.

    ``blocks`` is how many blocks will be added. The first block's output is kept as the
    kernel returned it; with three or more blocks it is widened to float32 first, so every
    merge after the first is exact to float32 and the result is rounded once.
    """

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.out: Tensor | None = None
        self.lse: Tensor | None = None
        self.aux: Any = None

    def add(self, plan: BlockPlan, out: Tensor, lse: Tensor, aux: Any) -> None:
        if self.out is None:
            if plan.q_part is not Part.ALL:
                raise AssertionError("the first computed block must cover every query row")
            dtype = accumulation_dtype(out.dtype)
            self.out = out if self.blocks <= 2 else out.to(dtype)
            self.lse = lse if lse.dtype == dtype else lse.to(dtype)
            self.aux = aux if plan.mask is None else None
            return
        if self.aux is None and plan.mask is None:
            # The kernel's state comes from an unmasked block (masked blocks keep none).
            self.aux = aux
        assert self.lse is not None
        merge_into(plan.q_part.take(self.out), plan.q_part.take(self.lse), out, lse)

    def result(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Any]:
        """``(out in dtype, lse, aux)`` once every block has been added."""
        assert self.out is not None and self.lse is not None
        return self.out.to(dtype), self.lse, self.aux


class _PartSum:
    """The sum of ``terms`` block gradients, each covering a part of a tensor like ``like``.

    Partial terms wait until a whole one arrives and are added into it (the local block, the
    last in the backward, always covers every row), so nothing is zero-filled. Two terms are
    summed straight into the first (PyTorch adds bfloat16 in float32 and rounds once); more
    are summed in float32.
    """

    def __init__(self, like: Tensor, terms: int) -> None:
        self.like = like
        self.wide = terms > 2
        self.value: Tensor | None = None
        self.waiting: list[tuple[Part, Tensor]] = []

    def add(self, part: Part, x: Tensor) -> None:
        if self.value is not None:
            part.take(self.value).add_(x)
        elif part is Part.ALL:
            self.value = x.to(accumulation_dtype(x.dtype)) if self.wide else x
            for waiting_part, y in self.waiting:
                waiting_part.take(self.value).add_(y)
            self.waiting = []
        else:
            self.waiting.append((part, x))

    def result(self, dtype: torch.dtype) -> Tensor:
        if self.value is None:
            self.add(Part.ALL, torch.zeros_like(self.like, dtype=accumulation_dtype(dtype)))
        assert self.value is not None
        return self.value.to(dtype)


def block_forward(
    kernel: Kernel, plan: BlockPlan, q: Tensor, k: Tensor, v: Tensor, scale: float
) -> tuple[Tensor, Tensor, Any]:
    """The kernel forward on the parts of q and of the K/V block that ``plan`` names."""
    if plan.mask is not None:
        return plan.mask.forward(q, k, v, scale)
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
    if plan.mask is not None:
        return plan.mask.backward(dout, q, k, v, out, lse, aux, scale)
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


def _kv_blocks(
    k: Tensor, v: Tensor, call: RingCall
) -> Iterator[tuple[BlockPlan | None, Tensor, Tensor]]:
    """Yield each forward step's plan with the K/V block held then.

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
            what = f"forward step {step + 1} of {steps - 1} (receiving a K/V block)"
            pending = call.ring.shift((k_cur, v_cur), (k_next, v_next), what=what)
        yield plan, k_cur, v_cur
        if pending is not None:
            pending.wait()
            k_cur, v_cur = k_next, v_next


def _ring_forward(
    q: Tensor, k: Tensor, v: Tensor, call: RingCall
) -> tuple[Tensor, Tensor, Any, Tensor, Tensor]:
    """``(out, lse, aux, k_last, v_last)``: the last two are the last K/V block received."""
    acc = ForwardAccumulator(sum(plan is not None for plan in call.plans))
    k_last, v_last = k, v
    for plan, k_cur, v_cur in _kv_blocks(k, v, call):
        if plan is not None:
            acc.add(plan, *block_forward(call.kernel, plan, q, k_cur, v_cur, call.scale))
        k_last, v_last = k_cur, v_cur
    return (*acc.result(q.dtype), k_last, v_last)


def _message_parts(call: RingCall) -> tuple[Part | None, Part | None]:
    """Which part of a K/V block the outgoing and the incoming dK/dV messages cover.

    With two ranks a message carries one block's gradients, so only the part its plan
    touched travels (nothing for a skipped plan). With more, messages accumulate over
    several ranks' plans and always cover the whole block.
    """
    if len(call.plans) != 2:
        return Part.ALL, Part.ALL
    mine, theirs = call.plans[-1], call.next_last_plan
    return (
        mine.kv_part if mine is not None else None,
        theirs.kv_part if theirs is not None else None,
    )


def _ring_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    aux: Any,
    k_last: Tensor,
    v_last: Tensor,
    call: RingCall,
) -> tuple[Tensor, Tensor, Tensor]:
    plans, kernel, ring, n = call.plans, call.kernel, call.ring, len(call.plans)
    dq = _PartSum(q, sum(plan is not None for plan in plans))
    # Messages carry dK/dV accumulated over several ranks in float32, or, with two ranks, one
    # block's gradients as the kernel returned them.
    groups = q.size(1) // k.size(1)
    msg_dtype = kernel.kv_grad_dtype(k.dtype, groups) if n == 2 else accumulation_dtype(k.dtype)
    send_part, recv_part = _message_parts(call)
    recv_shape = recv_part.take(k).shape if recv_part is not None else None
    kv_buffers = [(torch.empty_like(k), torch.empty_like(v)) for _ in range(min(2, n - 2))]
    kv_cur = (k_last, v_last)
    msg_in: tuple[Tensor, ...] = ()
    msg_pending: PendingShift | None = None
    local_grads: tuple[Tensor, Tensor, Tensor] | None = None
    # Stage t runs the forward's step n-1-t, on the block of rank (rank + 1 + t) % n.
    for stage in range(n):
        plan = plans[n - 1 - stage]
        kv_pending: PendingShift | None = None
        if stage + 1 < n - 1:
            assert ring is not None
            kv_next = kv_buffers[stage % 2]
            what = f"backward stage {stage + 1} of {n} (receiving a K/V block)"
            kv_pending = ring.shift(kv_cur, kv_next, reverse=True, what=what)
        grads = None
        if plan is not None:
            grads = block_backward(kernel, plan, dout, q, *kv_cur, out, lse, aux, call.scale)
            dq.add(plan.q_part, grads[0])
        if msg_pending is not None:
            msg_pending.wait()
        if stage == n - 1:
            local_grads = grads
            break
        assert ring is not None
        msg_out = _next_message(plan, grads, msg_in, send_part, k, msg_dtype)
        msg_in = ()
        if recv_shape is not None:
            msg_in = tuple(torch.empty(recv_shape, dtype=msg_dtype, device=k.device) for _ in "kv")
        what = f"backward stage {stage + 1} of {n} (passing dK/dV on)"
        msg_pending = ring.shift(msg_out, msg_in, reverse=True, what=what)
        if kv_pending is not None:
            kv_pending.wait()
            kv_cur = kv_next
        if stage + 2 == n:
            kv_cur = (k, v)  # the last stage is the local block
    assert local_grads is not None  # the local block is never skipped
    _, dk, dv = local_grads
    if msg_in:
        assert recv_part is not None
        recv_part.take(dk).add_(msg_in[0])
        recv_part.take(dv).add_(msg_in[1])
    return dq.result(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _next_message(
    plan: BlockPlan | None,
    grads: tuple[Tensor, Tensor, Tensor] | None,
    msg_in: tuple[Tensor, ...],
    send_part: Part | None,
    like: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, ...]:
    """The dK/dV message passed on after a stage: what arrived plus this stage's gradients."""
    if send_part is None:
        return ()
    if msg_in:
        if plan is not None and grads is not None:
            plan.kv_part.take(msg_in[0]).add_(grads[1])
            plan.kv_part.take(msg_in[1]).add_(grads[2])
        return msg_in
    # The first stage: the message starts from this stage's gradients.
    if plan is None or grads is None:
        shape = send_part.take(like).shape
        return tuple(torch.zeros(shape, dtype=dtype, device=like.device) for _ in "kv")
    if plan.kv_part is send_part:
        return tuple(g.to(dtype).contiguous() for g in grads[1:])
    msg = tuple(torch.zeros_like(like, dtype=dtype) for _ in "kv")
    plan.kv_part.take(msg[0]).copy_(grads[1])
    plan.kv_part.take(msg[1]).copy_(grads[2])
    return msg


class RingAttentionFunction(torch.autograd.Function):
    """Differentiable ring attention over local shards; returns ``(out, lse)``.

    ``lse`` is returned without a gradient path (it is marked non-differentiable).
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, call: RingCall):  # type: ignore[override]
        out, lse, aux, k_last, v_last = _ring_forward(q, k, v, call)
        ctx.save_for_backward(q, k, v, out, lse, k_last, v_last)
        ctx.call = call
        ctx.aux = aux
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None):  # type: ignore[override]
        q, k, v, out, lse, k_last, v_last = ctx.saved_tensors
        dq, dk, dv = _ring_backward(
            dout.contiguous(), q, k, v, out, lse, ctx.aux, k_last, v_last, ctx.call
        )
        return dq, dk, dv, None
