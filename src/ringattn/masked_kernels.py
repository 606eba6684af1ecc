"""Attention on one block pair under a mask: ``(out, lse)`` forward, ``(dq, dk, dv)`` backward.

The same interface as :mod:`ringattn.kernels` (the backward takes the *final* output and lse
of the query rows, so block gradients simply add up), for pairs whose
:class:`~ringattn.masks.PairMask` is ``partial``. Rows that see no key return output 0 and
lse = -inf, which the merge treats as adding nothing.

- ``math`` (any device, any dtype; the CPU path): the explicit boolean mask of the pair,
  scores filled with -inf where it is False, the softmax and its gradient written out in
  float32 (float64 for float64).
- ``flex`` (CUDA): compiled FlexAttention with a BlockMask made from the pair's tile facts
  without evaluating any mask: tiles no query row of a tile reaches are skipped, tiles every
  row sees whole run without a mask, the rest apply the key ranges (and the mask function)
  per element. FlexAttention's own backward works from its own block output and lse; the
  backward here recomputes the block forward and feeds autograd gradients for both so that
  the result is the block's share of the *full* attention's gradient:
  with ``w = exp(lse_block - lse)``, ``d out_block = w * dout`` and
  ``d lse_block = w * (rowsum(dout * out_block) - rowsum(dout * out))``.
  (The recomputation costs about one block forward in each backward. Strategies that
  compute a pair in one call -- all-gather, Ulysses -- use :meth:`MaskedBlock.attend`,
  FlexAttention's own autograd, and recompute nothing.)
"""

from __future__ import annotations

import dis
import functools
import math
import types
from typing import Any

import torch
from torch import Tensor

from .kernels import _math_backward, _math_forward, accumulation_dtype
from .masks import PairMask

__all__ = ["MASKED_KERNELS", "MaskedBlock", "flex_available", "masked_kernel_for"]

MASKED_KERNELS: tuple[str, ...] = ("math", "flex")
_TILE = 128


@functools.cache
def flex_available() -> bool:
    """Whether FlexAttention (torch >= 2.5) can be imported."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def masked_kernel_for(device: torch.device, backend: str) -> str:
    """The masked kernel partial pairs use: ``flex`` on CUDA where it exists, else ``math``."""
    if device.type == "cuda" and backend != "math" and flex_available():
        return "flex"
    return "math"


# Dynamo keeps this many compiled graphs per function before it gives up (fullgraph=True
# then raises). Every block shape, and the forward (no grad) and the backward's recompute
# (grad), is a graph of its own, and the user's own compiled flex_attention calls count
# against the same function: the default of 8 is reached by a ring and a one-GPU baseline.
_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex() -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), _RECOMPILE_LIMIT))
    # Static shapes: FlexAttention's dynamic-shape kernels are slower. The masked
    # all-gather's key count, which changes with every batch's documents, comes rounded to
    # a few sizes (ringattn.kv_exchange.padded_keys), so a run compiles one graph per size.
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def _flex_function(device: torch.device) -> Any:
    """Compiled FlexAttention on CUDA; elsewhere the eager reference implementation
    (forward only), for tests on CPU."""
    if device.type == "cuda":
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: Any, scale: float) -> tuple[Tensor, Tensor]:
    fn = _flex_function(q.device)
    if _aux_request() is not None:
        out, aux = fn(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_aux=_aux_request()
        )
        return out, aux.lse
    out, lse = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True, return_lse=True)
    return out, lse


@functools.cache
def _aux_request() -> Any:
    """``AuxRequest(lse=True)`` where this torch has it (return_lse is deprecated there)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return None
    return AuxRequest(lse=True)


def _mask5(mask: Tensor, kv_heads: int, groups: int) -> Tensor:
    """``[R, 1 or H, Sq, Sk]`` -> ``[R, 1 or Hkv, 1 or G, Sq, Sk]`` for the grouped scores."""
    if mask.size(1) == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (kv_heads, groups))


def _reads_argument(fn: Any, index: int) -> bool:
    """Whether ``fn`` may read its ``index``-th positional argument: False only for a plain
    function whose code never loads it (then its result cannot depend on it)."""
    code = getattr(fn, "__code__", None)
    if not isinstance(fn, types.FunctionType) or code is None or index >= code.co_argcount:
        return True
    name = code.co_varnames[index]
    if name in code.co_cellvars:  # captured by an inner function
        return True
    for ins in dis.get_instructions(fn):
        if ins.opname.startswith(("LOAD_FAST", "LOAD_DEREF", "LOAD_CLOSURE", "DELETE_FAST")):
            value = ins.argval
            if value == name or (isinstance(value, tuple) and name in value):
                return True
    return False


def build_block_mask(pair: PairMask, device: torch.device, batch: int = 1, heads: int = 1) -> Any:
    """FlexAttention's BlockMask for ``pair``, on ``device``.

    Without a mask function, from the pair's tile facts (no mask is evaluated). With one,
    the combined mask is evaluated on the device by FlexAttention's ``create_block_mask``, so
    that tiles the function empties are skipped and tiles it leaves whole run unmasked; over
    ``batch`` rows and ``heads`` heads only where the function (or per-row documents) can
    depend on them.
    """
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    mask_mod = _pair_mask_mod(pair, device)
    user = pair.spec.mask_mod
    if user is not None:
        rows = batch if pair.klo.size(0) > 1 or _reads_argument(user, 0) else 1
        per_head = heads if _reads_argument(user, 1) else 1
        return create_block_mask(
            mask_mod,
            rows,
            per_head,
            pair.qpos.numel(),
            pair.kpos.numel(),
            device=device,
            BLOCK_SIZE=_TILE,
            _compile=device.type == "cuda",
        )
    touched, full = pair.tile_facts(_TILE)
    partial = touched & ~full

    def blocks(bits: Tensor) -> tuple[Tensor, Tensor]:
        num = bits.sum(-1).to(torch.int32)
        idx = torch.argsort((~bits).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num.unsqueeze(1).to(device), idx.unsqueeze(1).contiguous().to(device)

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=_TILE,
        mask_mod=mask_mod,
        seq_lengths=(pair.qpos.numel(), pair.kpos.numel()),
    )


def _pair_mask_mod(pair: PairMask, device: torch.device) -> Any:
    """The pair's mask as a FlexAttention mask function over local indices: the key ranges,
    and the user's function on global positions."""
    rows = pair.klo.size(0)
    klo, khi = pair.klo.to(device), pair.khi.to(device)
    qpos, kpos = pair.qpos.to(device), pair.kpos.to(device)
    user, offset = pair.spec.mask_mod, pair.head_offset

    if rows == 1:
        klo1, khi1 = klo[0], khi[0]

        def ranges(b: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return (ki >= klo1[qi]) & (ki < khi1[qi])
    else:

        def ranges(b: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return (ki >= klo[b, qi]) & (ki < khi[b, qi])

    if user is None:

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return ranges(b, qi, ki)
    else:

        def mask_mod(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return ranges(b, qi, ki) & user(b, h + offset, qpos[qi], kpos[ki])

    return mask_mod


class MaskedBlock:
    """A partial block pair with its masked kernel and the device state it needs (the
    explicit mask or the BlockMask), built on first use and kept with the plan."""

    def __init__(self, pair: PairMask, kernel: str) -> None:
        if kernel not in MASKED_KERNELS:
            raise ValueError(f"masked kernel must be one of {MASKED_KERNELS}, got {kernel!r}")
        self.pair = pair
        self.kernel = kernel
        self._state: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"MaskedBlock({self.kernel}, {self.pair.kind}, visible={self.pair.visible})"

    def _dense(self, q: Tensor) -> Tensor:
        key = ("dense", q.device, q.size(0), q.size(1))
        mask = self._state.get(key)
        if mask is None:
            heads = q.size(1) if self.pair.spec.mask_mod is not None else 1
            mask = self._state[key] = self.pair.dense(q.size(0), heads, q.device)
        return mask

    def block_mask(self, q: Tensor) -> Any:
        """The BlockMask for queries like ``q`` (built once per device, batch and heads)."""
        key = ("flex", q.device, q.size(0), q.size(1))
        bm = self._state.get(key)
        if bm is None:
            bm = self._state[key] = build_block_mask(self.pair, q.device, q.size(0), q.size(1))
        return bm

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Any]:
        if self.kernel == "flex":
            out, lse = _flex(q, k, v, self.block_mask(q), scale)
            return out, lse, None
        groups = q.size(1) // k.size(1)
        mask = _mask5(self._dense(q), k.size(1), groups)
        return _math_forward(q, k, v, False, scale, mask=mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Differentiable FlexAttention over the whole pair (the ``flex`` kernel), for a
        strategy that computes it in one call (all-gather, Ulysses): under FlexAttention's
        own autograd its backward reads the forward's output and lse, so nothing is
        recomputed (the ring's blocks cannot do this, see the module docstring)."""
        if self.kernel != "flex":
            raise ValueError(f"attend runs the flex kernel, not {self.kernel!r}")
        fn = _flex_function(q.device)
        return fn(q, k, v, block_mask=self.block_mask(q), scale=scale, enable_gqa=True)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        aux: Any,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.kernel == "flex":
            return _flex_backward(dout, q, k, v, out, lse, self.block_mask(q), scale)
        groups = q.size(1) // k.size(1)
        mask = _mask5(self._dense(q), k.size(1), groups)
        return _math_backward(dout, q, k, v, out, lse, aux, False, scale, mask=mask)


def _flex_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bm: Any, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    with torch.enable_grad():
        qd, kd, vd = (x.detach().requires_grad_() for x in (q, k, v))
        out_b, lse_b = _flex(qd, kd, vd, bm, scale)
    ct = accumulation_dtype(q.dtype)
    lse_bf = lse_b.detach().to(ct)
    # The block's share of each row's softmax mass; rows the block does not reach get 0.
    w = torch.exp(lse_bf - lse.to(ct)).masked_fill(lse_bf == -math.inf, 0.0)
    d_f = dout.to(ct)
    delta_b = (d_f * out_b.detach().to(ct)).sum(-1)
    delta = (d_f * out.to(ct)).sum(-1)
    g_out = (d_f * w.unsqueeze(-1)).to(out_b.dtype)
    g_lse = w * (delta_b - delta)
    dq, dk, dv = torch.autograd.grad((out_b, lse_b), (qd, kd, vd), (g_out, g_lse))
    return dq, dk, dv
