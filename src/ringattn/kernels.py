"""Attention on one block pair: ``(out, lse)`` forward and ``(dq, dk, dv)`` backward.

Every backend takes q ``[B, H, Sq, D]`` and k, v ``[B, H_kv, Sk, D]`` with ``H % H_kv == 0``
and returns gradients for k and v with ``H_kv`` heads, so callers never see the grouped
(GQA/MQA) expansion; flash and cuDNN take grouped heads natively, the others get K/V
expanded. ``lse`` is float32 (float64 for float64 inputs), shape ``[B, H, Sq]``.
A causal block with fewer queries than keys is bottom-right aligned where the backend
supports it (query i of Sq sees keys ``j <= i + Sk - Sq``: a query chunk over the whole
prefix it may see, in one call); :func:`causal_aligns_bottom_right` says which do.
Nothing in this module knows about ranks or rings.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "BackendName",
    "Kernel",
    "causal_aligns_bottom_right",
    "get_kernel",
    "select_kernel",
]

logger = logging.getLogger("ringattn")

BackendName = Literal["auto", "flash", "efficient", "cudnn", "cpu", "math"]
BACKENDS: tuple[str, ...] = ("auto", "flash", "efficient", "cudnn", "cpu", "math")

aten = torch.ops.aten


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are accumulated in: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # Query head h reads K/V head h // groups, as in SDPA with enable_gqa=True.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_kv_grad(g: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return g
    b, h, s, d = g.shape
    return g.view(b, h // groups, groups, s, d).sum(2, dtype=accumulation_dtype(g.dtype))


@dataclass(frozen=True)
class Kernel:
    """One attention backend: how to run a block forward and backward, and what it accepts."""

    name: str
    forward_fn: Callable[[Tensor, Tensor, Tensor, bool, float], tuple[Tensor, Tensor, Any]]
    backward_fn: Callable[..., tuple[Tensor, Tensor, Tensor]]
    reason_fn: Callable[[Tensor, Tensor, Tensor, bool], str | None]
    native_gqa: bool

    def kv_grad_dtype(self, dtype: torch.dtype, groups: int) -> torch.dtype:
        """The dtype of the dK/dV this kernel's ``backward`` returns for ``dtype`` inputs."""
        if self.name == "math" or (groups > 1 and not self.native_gqa):
            return accumulation_dtype(dtype)  # computed, or summed over the group, in float32
        return dtype

    def unsupported_reason(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
        """Why this backend cannot take these inputs, or None if it can."""
        return self.reason_fn(q, k, v, causal)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor, Any]:
        """Attention of q over (k, v): ``(out [B,H,Sq,D] in q.dtype, lse [B,H,Sq], aux)``.

        ``aux`` is backend state the backward of any block with the same options accepts.
        """
        groups = q.size(1) // k.size(1)
        if not self.native_gqa:
            k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        return self.forward_fn(q, k, v, causal, scale)

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        aux: Any,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of this block given the *final* ``out`` and ``lse`` of these query rows.

        With the final (not the block's own) ``out`` and ``lse``, the block's gradients are
        exactly its share of the full attention's gradients, so blocks can simply be summed.
        """
        groups = q.size(1) // k.size(1)
        if self.native_gqa or groups == 1:
            return self.backward_fn(dout, q, k, v, out, lse, aux, causal, scale)
        dq, dk, dv = self.backward_fn(
            dout, q, _expand_kv(k, groups), _expand_kv(v, groups), out, lse, aux, causal, scale
        )
        return dq, _reduce_kv_grad(dk, groups), _reduce_kv_grad(dv, groups)


# ----------------------------------------------------------------------------- math


def _math_scores(
    q: Tensor, k: Tensor, causal: bool, scale: float, mask: Tensor | None = None
) -> tuple[Tensor, int]:
    groups = q.size(1) // k.size(1)
    ct = accumulation_dtype(q.dtype)
    qg = q.to(ct).unflatten(1, (k.size(1), groups))  # [B, Hkv, G, Sq, D]
    s = torch.matmul(qg, k.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]  # bottom-right aligned: the last query sees the last key
        causal_mask = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu_(1 + sk - sq)
        s = s.masked_fill(causal_mask, float("-inf"))
    if mask is not None:
        # An explicit mask (True = visible), broadcastable to [B, Hkv, G, Sq, Sk].
        s = s.masked_fill(~mask, float("-inf"))
    return s, groups


def _finite_or_zero(lse: Tensor) -> Tensor:
    # Rows that saw no key have lse = -inf; subtracting it would give NaN instead of 0.
    # (+inf stays: a row with an infinite score is NaN, as in softmax.)
    return lse.masked_fill(lse == float("-inf"), 0.0)


def _math_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, mask: Tensor | None = None
):
    s, groups = _math_scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _finite_or_zero(lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(s.dtype).unsqueeze(2))
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2), None


def _math_backward(dout, q, k, v, out, lse, aux, causal, scale, mask=None):
    s, groups = _math_scores(q, k, causal, scale, mask)
    ct = s.dtype
    hkv = k.size(1)
    lse_g = _finite_or_zero(lse.to(ct)).unflatten(1, (hkv, groups)).unsqueeze(-1)
    p = torch.exp(s - lse_g)
    do = dout.to(ct).unflatten(1, (hkv, groups))
    o = out.to(ct).unflatten(1, (hkv, groups))
    vf = v.to(ct).unsqueeze(2)
    dv = torch.matmul(p.transpose(-1, -2), do).sum(2)
    dp = torch.matmul(do, vf.transpose(-1, -2))
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k.to(ct).unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct).unflatten(1, (hkv, groups))).sum(2) * scale
    return dq.flatten(1, 2), dk, dv


def _math_reason(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if not q.is_floating_point():
        return f"math needs floating-point inputs, got {q.dtype}"
    return None


# ----------------------------------------------------------------------------- cpu


_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _all_finite(*xs: Tensor) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in xs)


def _cpu_forward(q, k, v, causal, scale):
    # PyTorch's fused CPU kernel returns a finite row for a query row holding NaN; blocks
    # with non-finite inputs run the plain ops instead, which propagate them as SDPA's
    # math path does. The check is one pass over the block's inputs.
    if not _all_finite(q, k, v):
        return _math_forward(q, k, v, causal, scale)
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse, None


def _cpu_backward(dout, q, k, v, out, lse, aux, causal, scale):
    if not _all_finite(q, k, v):
        grads = _math_backward(dout, q, k, v, out, lse, aux, causal, scale)
        return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale
    )


def _cpu_reason(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if q.device.type != "cpu":
        return f"cpu needs CPU tensors, got {q.device}"
    if q.dtype not in _CPU_DTYPES:
        return f"cpu supports {', '.join(map(str, _CPU_DTYPES))}, got {q.dtype}"
    if v.size(-1) != q.size(-1):
        return "cpu needs v to have the same head dim as q"
    return None


# ----------------------------------------------------------------------------- CUDA


def _cuda_reason(
    check: Callable[..., bool], label: str
) -> Callable[[Tensor, Tensor, Tensor, bool], str | None]:
    def reason(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
        if q.device.type != "cuda":
            return f"{label} needs CUDA tensors, got {q.device}"
        if k.size(1) != q.size(1):
            # PyTorch's checks want q's head count; flash and cuDNN take grouped K/V natively,
            # efficient gets it expanded. Either way, check with q's head count.
            if k.size(2) > q.size(2):
                k = _expand_kv(k, q.size(1) // k.size(1))
                v = _expand_kv(v, q.size(1) // v.size(1))
            else:
                k = q.narrow(2, 0, k.size(2))
                v = q.narrow(2, 0, v.size(2))
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, causal, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = check(params, True)
        if ok:
            return None
        why = "; ".join(str(w.message).strip() for w in caught) or "rejected by PyTorch"
        return f"{label} cannot take these inputs: {why}"

    return reason


def _flash_forward(q, k, v, causal, scale):
    out, lse, cum_q, cum_k, _, _, seed, offset, _ = aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, causal, False, scale=scale
    )
    return out, lse, (cum_q, cum_k, seed, offset)


def _flash_backward(dout, q, k, v, out, lse, aux, causal, scale):
    cum_q, cum_k, seed, offset = aux
    return aten._scaled_dot_product_flash_attention_backward(
        dout,
        q,
        k,
        v,
        out,
        lse.contiguous(),
        cum_q,
        cum_k,
        q.size(2),
        k.size(2),
        0.0,
        causal,
        seed,
        offset,
        scale=scale,
    )


# The memory-efficient kernel pads its lse rows to a multiple of this.
_EFFICIENT_LSE_ALIGN = 32


def _efficient_forward(q, k, v, causal, scale):
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, causal, scale=scale
    )
    return out, lse[:, :, : q.size(2)], (seed, offset)


def _efficient_backward(dout, q, k, v, out, lse, aux, causal, scale):
    seed, offset = aux
    # Its backward reads `out` in the memory layout its forward writes ([B, S, H, D]);
    # an output assembled in another layout (e.g. concatenated along S) gives wrong dQ/dK.
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    pad = (-lse.size(-1)) % _EFFICIENT_LSE_ALIGN
    lse = torch.nn.functional.pad(lse, (0, pad)) if pad else lse.contiguous()
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout,
        q,
        k,
        v,
        None,
        out,
        lse,
        seed,
        offset,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return dq, dk, dv


# PyTorch's cuDNN attention (torch <= 2.11) keys its graph cache on q, k and v alone, yet a
# backward graph bakes in the layouts of out, dout and the lse it was first built with.
# PyTorch's context_parallel calls it on the same q/k/v blocks with other layouts, so a
# graph it built could run on this module's tensors (NaN gradients, illegal memory access).
# A batch of one has a stride that addresses nothing: giving it a value no natural layout
# has keys this module's calls to graphs of their own. 8 elements keeps it 16-byte aligned.
_PRIVATE_BATCH_STRIDE_OFFSET = 8


def _private_key(*xs: Tensor) -> tuple[Tensor, ...]:
    """``xs`` with batch stride made private to this module where the batch is one."""
    if xs[0].size(0) != 1:
        return xs
    return tuple(
        x.as_strided(x.shape, (x.stride(0) + _PRIVATE_BATCH_STRIDE_OFFSET, *x.stride()[1:]))
        for x in xs
    )


def _cudnn_forward(q, k, v, causal, scale):
    q, k, v = _private_key(q, k, v)
    out, lse, cum_q, cum_k, _, _, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale
    )
    # Some versions return lse as [B, H, Sq, 1]; remember which for the backward.
    four_d = lse.dim() == 4
    return out, lse.reshape(lse.shape[:3]), (cum_q, cum_k, seed, offset, four_d)


def _cudnn_backward(dout, q, k, v, out, lse, aux, causal, scale):
    cum_q, cum_k, seed, offset, four_d = aux
    q, k, v = _private_key(q, k, v)
    lse = lse.contiguous()
    if four_d:
        lse = lse.unsqueeze(-1)
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout.contiguous(),
        q,
        k,
        v,
        out.contiguous(),
        lse,
        seed,
        offset,
        None,
        cum_q,
        cum_k,
        q.size(2),
        k.size(2),
        0.0,
        causal,
        scale=scale,
    )


_KERNELS: dict[str, Kernel] = {
    "math": Kernel("math", _math_forward, _math_backward, _math_reason, native_gqa=True),
    # The fused CPU kernel takes grouped heads, but sums their dK/dV in the input dtype;
    # expanding and reducing in float32 here keeps bf16 gradients as accurate as SDPA's.
    "cpu": Kernel("cpu", _cpu_forward, _cpu_backward, _cpu_reason, native_gqa=False),
    "flash": Kernel(
        "flash",
        _flash_forward,
        _flash_backward,
        _cuda_reason(torch.backends.cuda.can_use_flash_attention, "flash"),
        native_gqa=True,
    ),
    "efficient": Kernel(
        "efficient",
        _efficient_forward,
        _efficient_backward,
        _cuda_reason(torch.backends.cuda.can_use_efficient_attention, "efficient"),
        native_gqa=False,
    ),
    "cudnn": Kernel(
        "cudnn",
        _cudnn_forward,
        _cudnn_backward,
        _cuda_reason(torch.backends.cuda.can_use_cudnn_attention, "cudnn"),
        native_gqa=True,
    ),
}

# Fastest first, per device type (cuDNN ~590 vs flash ~330 TFLOP/s on Hopper).
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cudnn", "flash", "efficient", "math"),
    "cpu": ("cpu", "math"),
}


def get_kernel(name: str) -> Kernel:
    """The kernel registered under ``name`` (not ``"auto"``)."""
    return _KERNELS[name]


def select_kernel(backend: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Kernel:
    """Resolve ``backend`` (``"auto"`` included) to a kernel that takes these inputs.

    Raises ValueError naming ``backend`` when it cannot. PyTorch's checks behind this cost
    tens of microseconds, so ``ring_attention`` runs it once per call signature.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    names = _AUTO_ORDER.get(q.device.type, ("math",)) if backend == "auto" else (backend,)
    reasons = []
    for name in names:
        kernel = _KERNELS[name]
        why = kernel.unsupported_reason(q, k, v, causal)
        if why is None:
            if backend == "auto":
                logger.debug(
                    "ringattn: backend='auto' chose %r for q %s %s on %s (causal=%s)",
                    name,
                    tuple(q.shape),
                    q.dtype,
                    q.device,
                    causal,
                )
            return kernel
        reasons.append(why)
    raise ValueError(f"backend={backend!r}: " + " | ".join(reasons))


# ----------------------------------------------------------------------------- alignment

_BOTTOM_RIGHT: dict[tuple, bool] = {}


def _probe_bottom_right(kernel: Kernel, device: torch.device, dtype: torch.dtype, d: int) -> bool:
    # Tiny blocks, the same on every rank (CPU generator), forward and backward against the
    # plain ops in float32: alignment is a property of PyTorch's kernel wrappers, which
    # changed between versions, so it is measured rather than assumed.
    gen = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 2, 64, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 2, 192, d, generator=gen) for _ in range(2))
    scale = d**-0.5
    ref_out, ref_lse, _ = _math_forward(q, k, v, True, scale)
    ref_dq, ref_dk, _ = _math_backward(dout, q, k, v, ref_out, ref_lse, None, True, scale)
    try:
        qd, kd, vd, dod = (x.to(device, dtype) for x in (q, k, v, dout))
        out, lse, aux = kernel.forward(qd, kd, vd, causal=True, scale=scale)
        dq, dk, _ = kernel.backward(dod, qd, kd, vd, out, lse, aux, causal=True, scale=scale)
    except RuntimeError:
        return False

    def close(a: Tensor, b: Tensor) -> bool:
        return bool(((a.float().cpu() - b).abs().max() <= 0.05 * b.abs().max()).item())

    return close(out, ref_out) and close(dq, ref_dq) and close(dk, ref_dk)


def causal_aligns_bottom_right(kernel: Kernel, q: Tensor) -> bool:
    """Whether ``kernel`` with ``causal=True`` and ``Sq < Sk`` aligns the diagonal to the
    bottom right (query i sees keys ``j <= i + Sk - Sq``), forward and backward.

    ``math`` does by construction and PyTorch's fused CPU kernel does not (top-left). CUDA
    backends are probed once per backend, device, dtype and head dim on tiny blocks; inside
    a CUDA-graph capture, where a probe cannot run, the answer is False (callers then split
    the block into a square diagonal and a prefix, which every backend takes).
    """
    if kernel.name == "math":
        return True
    if q.device.type != "cuda":
        return False
    key = (kernel.name, q.device, q.dtype, q.size(-1))
    found = _BOTTOM_RIGHT.get(key)
    if found is None:
        if torch.cuda.is_current_stream_capturing():
            return False
        found = _BOTTOM_RIGHT[key] = _probe_bottom_right(kernel, q.device, q.dtype, q.size(-1))
        logger.debug("ringattn: %s causal bottom-right alignment: %s", kernel.name, found)
    return found
