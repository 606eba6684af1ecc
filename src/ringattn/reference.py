"""References: naive attention, and the whole ring simulated in one process.

``attention`` is plain softmax attention on the full sequence in any dtype (pass float64 for
a tight reference); autograd gives its gradients. It shares nothing with the library: it is
the independent reference the tests compare against. ``simulate_ring`` runs every rank's
ring work in one process with the same block plans, kernels and merge as the distributed
ring, forward and backward, so the ring's arithmetic can be checked without processes; it
shares those pieces with the library, so it is not an independent reference.
Not used by the library's hot path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .kernels import accumulation_dtype, get_kernel, select_kernel
from .layout import ring_plan, shard_for_rank, unshard_shards
from .ring import ForwardAccumulator, block_backward, block_forward

__all__ = ["attention", "simulate_ring"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Naive attention ``softmax(q k^T * scale) v`` over the full sequence.

    Args:
        q: ``[B, H, S_q, D]``.
        k, v: ``[B, H_kv, S_k, D]`` with ``H % H_kv == 0`` (query head h reads K/V head
            ``h // (H // H_kv)``).
        causal: query i sees keys ``j <= i`` (top-left aligned).
        scale: defaults to ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S_q]``.

    Computes in q's dtype (float64 in, float64 out) and is differentiable by autograd.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return (out, lse) if return_lse else out


class _SimulatedRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, world_size, causal, scale, layout, backend):  # type: ignore[override]
        kernel = get_kernel(backend)
        shards = [
            [shard_for_rank(x, r, world_size, dim=2, layout=layout) for r in range(world_size)]
            for x in (q, k, v)
        ]
        plans = [ring_plan(r, world_size, causal=causal, layout=layout) for r in range(world_size)]
        outs, lses, auxes = [], [], []
        for rank in range(world_size):
            acc = ForwardAccumulator(sum(p is not None for p in plans[rank]))
            qs = shards[0][rank]
            for plan in plans[rank]:
                if plan is not None:
                    ks, vs = shards[1][plan.source], shards[2][plan.source]
                    acc.add(plan, *block_forward(kernel, plan, qs, ks, vs, scale))
            out, lse, aux = acc.result(q.dtype)
            outs.append(out)
            lses.append(lse)
            auxes.append(aux)
        ctx.save_for_backward(q, k, v)
        ctx.setup = (world_size, layout, kernel, scale, shards, plans, outs, lses, auxes)
        lse = unshard_shards(lses, dim=2, layout=layout)
        ctx.mark_non_differentiable(lse)
        return unshard_shards(outs, dim=2, layout=layout), lse

    @staticmethod
    def backward(ctx: Any, dout: Tensor, _dlse: Tensor | None):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        world_size, layout, kernel, scale, shards, plans, outs, lses, auxes = ctx.setup
        acc_dtype = accumulation_dtype(q.dtype)
        douts = [
            shard_for_rank(dout, r, world_size, dim=2, layout=layout) for r in range(world_size)
        ]
        dqs = [torch.zeros_like(s, dtype=acc_dtype) for s in shards[0]]
        dks = [torch.zeros_like(s, dtype=acc_dtype) for s in shards[1]]
        dvs = [torch.zeros_like(s, dtype=acc_dtype) for s in shards[2]]
        for rank in range(world_size):
            for plan in plans[rank]:
                if plan is None:
                    continue
                src = plan.source
                grads = block_backward(
                    kernel,
                    plan,
                    douts[rank].contiguous(),
                    shards[0][rank],
                    shards[1][src],
                    shards[2][src],
                    outs[rank],
                    lses[rank],
                    auxes[rank],
                    scale,
                )
                for part, acc, grad in zip(
                    (plan.q_part, plan.kv_part, plan.kv_part),
                    (dqs[rank], dks[src], dvs[src]),
                    grads,
                ):
                    part.take(acc).add_(grad)
        return (
            unshard_shards(dqs, dim=2, layout=layout).to(q.dtype),
            unshard_shards(dks, dim=2, layout=layout).to(k.dtype),
            unshard_shards(dvs, dim=2, layout=layout).to(v.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def simulate_ring(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    world_size: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    backend: str = "math",
) -> tuple[Tensor, Tensor]:
    """Every rank's ring work done in one process, on full (unsharded) tensors.

    Splits q, k, v by ``layout`` over ``world_size`` simulated ranks, runs each rank's block
    plan with the named kernel and the stable merge, and returns the reassembled
    ``(out, lse)`` in natural sequence order. Differentiable in q, k and v; the backward
    runs the ring backward's block gradients, accumulated per source rank.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    name = select_kernel(backend, q, k, v, causal).name
    return _SimulatedRing.apply(q, k, v, world_size, causal, scale, layout, name)
