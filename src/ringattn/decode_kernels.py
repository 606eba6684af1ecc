"""Attention of a few new tokens over the used part of a preallocated KV-cache buffer.

Decode attends T new query tokens (usually one) to a cache buffer ``[B, H_kv, capacity, D]``
of which only the first ``length`` slots hold tokens. ``length`` is a device tensor, so a
step never reads it on the host: the same call runs eagerly and inside a CUDA graph, with
static shapes, while the cache fills up between replays.

One query token gives a kernel little to parallelise over (``B * H_kv`` rows of work once
the grouped query heads are folded into rows), so the kernels here split the keys: each
program attends its slice of the used slots, and the slices merge by log-sum-exp.

Kernels (``cache_attention(..., kernel=NAME)``):

- ``"flex"``: FlexAttention compiled by ``torch.compile``, whose decoding template (chosen
  for short queries) packs a K/V head's query heads as rows and splits the keys across
  the GPU. A block mask whose block count is computed on the device from ``length``
  (``kv < length`` inside the last block) skips every tile past the used part, and the
  template spreads its splits over the used blocks only, whatever the capacity.
- ``"flash"``: the flash kernel's variable-length entry with ``seqused_k`` (the used
  length, on the device); batch folds into heads so the ``[B, H_kv, capacity, D]`` buffer
  is read in place.
- ``"chunked"``: the capacity cut into equal chunks seen as extra heads, each chunk
  attended by the memory-efficient kernel with an additive bias masking unused slots,
  then merged. Reads the whole capacity; kept as the fallback that needs no compiler.
- ``"plain"``: the chunked arithmetic in plain PyTorch ops (CPU, float32/float64, or a
  fused kernel that refused the inputs).

``"auto"`` takes, on CUDA with bf16/fp16, the first of :data:`AUTO_ORDER` that runs here
(each is tried once outside a capture; a capture uses only kernels that already ran), and
``"plain"`` elsewhere; for an eager call flash goes first (less host time, though it splits
the capacity, not the used part). Every kernel returns
``(out, lse)``, ``lse`` in the accumulation dtype (float32, float64 for float64), natural
log, ``-inf`` where no slot is used.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from .kernels import accumulation_dtype

__all__ = [
    "AUTO_ORDER",
    "AUTO_ORDER_EAGER",
    "DECODE_KERNELS",
    "FLEX_OPTIONS",
    "DecodeKernelName",
    "cache_attention",
    "resolve",
]

DecodeKernelName = Literal["auto", "flex", "flash", "chunked", "plain"]
DECODE_KERNELS: tuple[str, ...] = ("auto", "flex", "flash", "chunked", "plain")
# What "auto" tries on CUDA (bf16/fp16), in order, for a step that is captured (or made to
# be) and for an eager call. Measured on an H200 (torch 2.11, one token, 32/8 heads x 128,
# benchmarks/results/decode-h200x2.md): in a CUDA graph flex takes 75 us over 64K used
# slots and 0.49 ms over 512K (SDPA over exactly those slots: 68 us, 0.48 ms), flash 84 us
# and 0.58 ms with the buffer fully used, 0.25 ms over 64K used of 256K (it splits the
# capacity); called eagerly, flex's compiled call costs 0.3-0.4 ms more host time per step,
# more than flash loses on a buffer up to a few hundred K slots larger than its used part.
AUTO_ORDER: tuple[str, ...] = ("flex", "flash", "chunked")
AUTO_ORDER_EAGER: tuple[str, ...] = ("flash", "flex", "chunked")
# FlexAttention kernel options for the decode template. torch 2.11 picks one pipeline
# stage on Hopper for it; three stream K/V at ~4.4 TB/s instead of ~2.9 (same tables).
FLEX_OPTIONS: dict | None = {"num_stages": 3}

# Slot block of the cache buffers (KVCache allocates whole blocks) and the largest chunk
# the chunked kernel attends as one head.
SLOT_BLOCK = 256
_MAX_CHUNK = 4096
# FlexAttention's sparse block along the keys.
_FLEX_BLOCK = 128

# Per kernel name and device: True once it ran, False once it refused.
_WORKS: dict[tuple[str, str], bool] = {}


def _fused_dtype(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.size(3) % 8 == 0


def resolve(kernel: str, q: Tensor, eager: bool = False) -> list[str]:
    """The kernels to try for ``kernel`` on ``q``'s device and dtype, in order
    (:data:`AUTO_ORDER_EAGER` for an ``eager`` call, :data:`AUTO_ORDER` otherwise)."""
    if kernel != "auto":
        return [kernel]
    if not _fused_dtype(q):
        return ["plain"]
    device = str(q.device)
    order = AUTO_ORDER_EAGER if eager else AUTO_ORDER
    return [name for name in order if _WORKS.get((name, device), True)] + ["plain"]


def cache_attention(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    length: Tensor,
    scale: float,
    kernel: str = "auto",
    *,
    eager: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` ``[B, H, T, D]`` over the first ``length`` slots of the buffers.

    Args:
        q: the new tokens' queries; every used slot is visible to every query (no mask).
        k_buf, v_buf: ``[B, H_kv, capacity, D]``, ``H % H_kv == 0``; capacity a multiple of
            ``SLOT_BLOCK`` for the fused kernels.
        length: int64 tensor of one element on q's device: the used slots.
        scale: softmax scale.
        kernel: one of :data:`DECODE_KERNELS`.
        eager: the call is not captured nor made to be (``"auto"`` then favours host
            time: see :data:`AUTO_ORDER_EAGER`).

    Returns:
        ``(out [B, H, T, D], lse [B, H, T])``: ``out`` in q's dtype or the accumulation
        dtype (as the kernel gives it; a caller that packs it with ``lse`` promotes it in
        the same copy), ``lse`` in the accumulation dtype.
    """
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    names = resolve(kernel, q, eager)
    device = str(q.device)
    for i, name in enumerate(names):
        fn = _KERNELS[name]
        state = _WORKS.get((name, device))
        last = i == len(names) - 1
        if kernel == "auto" and not last and (state is False or (state is None and capturing)):
            continue  # a capture runs only kernels that already ran here
        try:
            result = fn(q, k_buf, v_buf, length, scale)
        except Exception as err:  # noqa: BLE001 - a probe: any failure means "not here"
            if kernel != "auto" or last or capturing:
                raise
            _WORKS[(name, device)] = False
            _note_refusal(name, err)
            continue
        _WORKS[(name, device)] = True
        return result
    raise AssertionError("unreachable: the last kernel raises")  # pragma: no cover


def _note_refusal(name: str, err: BaseException) -> None:
    import logging

    logging.getLogger("ringattn").info(
        "decode kernel %r is not usable here (%s: %s); trying the next",
        name,
        type(err).__name__,
        str(err).splitlines()[0][:200] if str(err) else "",
    )


def _fold(q: Tensor, kv_heads: int) -> Tensor:
    """``[B, H, T, D] -> [B, H_kv, G*T, D]``: a K/V head's query heads as rows."""
    b, h, t, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * t, d)


def _unfold(x: Tensor, heads: int) -> Tensor:
    b, hkv, gt = x.shape[:3]
    return x.reshape(b, heads, gt * hkv // heads, *x.shape[3:])


# ----------------------------------------------------------------------------- flex


@functools.cache
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled kernel per cache shape (capacity, new tokens) and option set: allow more
    # than dynamo's default of 8 before it falls back to the dense eager implementation.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
            break
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


@functools.cache
def _flex_lse_request() -> dict:
    """The keyword that asks FlexAttention for the lse (``return_aux`` since torch 2.9)."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        return {"return_aux": AuxRequest(lse=True)}
    except ImportError:
        return {"return_lse": True}


class _FlexMask:
    """A block mask over ``capacity`` slots whose used length lives on the device.

    One per (device, capacity, query rows): ``length`` and ``kv_num_blocks`` are buffers
    refreshed in place at each call (stream-ordered, so one mask serves every cache of that
    shape, one after another, also inside a graph), and ``mask_mod`` is one function, so the
    compiled kernel is built once per shape.
    """

    def __init__(self, device: torch.device, capacity: int, rows: int) -> None:
        from torch.nn.attention.flex_attention import BlockMask

        blocks = capacity // _FLEX_BLOCK
        self.length = torch.zeros(1, dtype=torch.int64, device=device)
        self.num_blocks = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
        indices = torch.arange(blocks, dtype=torch.int32, device=device).view(1, 1, 1, blocks)
        used = self.length

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < used[0]

        self.block_mask = BlockMask.from_kv_blocks(
            self.num_blocks,
            indices,
            BLOCK_SIZE=(_FLEX_BLOCK, _FLEX_BLOCK),
            mask_mod=mask_mod,
            seq_lengths=(rows, capacity),
        )

    def update(self, length: Tensor) -> None:
        self.length.copy_(length.view(1))
        blocks = torch.div(length.view(1) + (_FLEX_BLOCK - 1), _FLEX_BLOCK, rounding_mode="floor")
        self.num_blocks.view(1).copy_(blocks)


_FLEX_MASKS: dict[tuple[str, int, int], _FlexMask] = {}


def _flex(
    q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    capacity = k_buf.size(2)
    if capacity % _FLEX_BLOCK:
        raise RuntimeError(f"flex decode needs a capacity in blocks of {_FLEX_BLOCK}")
    key = (str(q.device), capacity, q.size(2))
    mask = _FLEX_MASKS.get(key)
    if mask is None:
        if q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("flex decode: no block mask for this shape before the capture")
        mask = _FLEX_MASKS[key] = _FlexMask(q.device, capacity, q.size(2))
    mask.update(length)
    fn = _flex_compiled() if q.is_cuda else _flex_eager()
    options = {"kernel_options": dict(FLEX_OPTIONS)} if FLEX_OPTIONS and q.is_cuda else {}
    out, aux = fn(
        q,
        k_buf,
        v_buf,
        block_mask=mask.block_mask,
        scale=scale,
        enable_gqa=q.size(1) != k_buf.size(1),
        **_flex_lse_request(),
        **options,
    )
    lse = aux.lse if hasattr(aux, "lse") else aux
    return out, lse.to(accumulation_dtype(q.dtype))


@functools.cache
def _flex_eager():
    # CPU: FlexAttention's reference implementation (dense scores; tests at tiny sizes).
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return flex_attention(*args, **kwargs)

    return run


# ----------------------------------------------------------------------------- flash


_FLASH_CONSTANTS: dict[tuple[str, int, int], tuple[Tensor, Tensor]] = {}


def _flash(
    q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    if not _fused_dtype(q):
        raise RuntimeError("flash decode needs CUDA bf16/fp16 inputs")
    b, h, t, d = q.shape
    hkv, capacity = k_buf.size(1), k_buf.size(2)
    key = (str(q.device), t, capacity)
    constants = _FLASH_CONSTANTS.get(key)
    if constants is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("flash decode: no sequence offsets for this shape before capture")
        constants = (
            torch.tensor([0, t], dtype=torch.int32, device=q.device),
            torch.tensor([0, capacity], dtype=torch.int32, device=q.device),
        )
        _FLASH_CONSTANTS[key] = constants
    # One sequence whose heads are (batch, head) pairs: a contiguous [B, H_kv, C, D] buffer
    # is a [C, B*H_kv, D] tensor with strides (D, C*D, 1), and query head b*H + i reads K/V
    # head (b*H + i) // G = b*H_kv + i // G, as grouped attention wants.
    kv = k_buf.view(b * hkv, capacity, d).transpose(0, 1)
    vv = v_buf.view(b * hkv, capacity, d).transpose(0, 1)
    qv = q.reshape(b * h, t, d).transpose(0, 1)
    if t > 1:
        qv = qv.contiguous()
    used = length.to(torch.int32)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        qv, kv, vv, constants[0], constants[1], t, capacity, 0.0, False, False,
        scale=scale, seqused_k=used,
    )  # fmt: skip
    out = out.view(t, b, h, d).permute(1, 2, 0, 3)
    lse = lse.reshape(b, h, t).to(accumulation_dtype(q.dtype))
    # An empty row's lse is +inf in flash's unsplit path: make it "saw nothing".
    lse = lse.nan_to_num(posinf=float("-inf"))
    return out, lse


# ----------------------------------------------------------------------------- chunked


def _chunk_size(capacity: int) -> int:
    """The largest multiple of the slot block dividing ``capacity``, at most _MAX_CHUNK."""
    units = capacity // SLOT_BLOCK
    best = 1
    for k in range(1, _MAX_CHUNK // SLOT_BLOCK + 1):
        if units % k == 0:
            best = k
    return best * SLOT_BLOCK if capacity % SLOT_BLOCK == 0 else capacity


def merge_parts(outs: Tensor, lses: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Merge partial results along ``dim`` (of the lse) by log-sum-exp; parts that saw
    nothing (lse = -inf) add nothing, and rows where every part saw nothing give 0, -inf."""
    top = lses.amax(dim=dim, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(lses - top)
    total = weights.sum(dim=dim, keepdim=True)
    out = (outs * weights.unsqueeze(-1)).sum(dim=dim) / total.clamp_min(1e-30).unsqueeze(
        -1
    ).squeeze(dim)
    return out, (torch.log(total) + top).squeeze(dim)


def _biased_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float):
    """``(out, lse)`` of attention with an additive bias, in plain ops (accumulation dtype)."""
    dtype = accumulation_dtype(q.dtype)
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale + bias.to(dtype)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    return torch.matmul(p, v.to(dtype)), lse


def _chunked(
    q: Tensor,
    k_buf: Tensor,
    v_buf: Tensor,
    length: Tensor,
    scale: float,
    *,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """Split-K attention over the whole capacity, the unused slots masked by a bias.

    The capacity is cut into n equal chunks seen as n times as many heads (a view of the
    buffers); the memory-efficient kernel (``fused``) or plain ops attend every chunk with
    an additive bias, and the chunks merge by log-sum-exp."""
    if fused and not _fused_dtype(q):
        raise RuntimeError("the chunked decode kernel needs CUDA bf16/fp16 inputs")
    b, h = q.shape[:2]
    kv_heads, capacity, d = k_buf.shape[1:]
    qf = _fold(q, kv_heads)
    rows = qf.size(2)
    chunk = _chunk_size(capacity)
    n = capacity // chunk
    k = k_buf.view(b, kv_heads * n, chunk, d)
    v = v_buf.view(b, kv_heads * n, chunk, d)
    qx = qf.unsqueeze(2).expand(b, kv_heads, n, rows, d).reshape(b, kv_heads * n, rows, d)
    visible = torch.arange(capacity, device=q.device) < length.view(())
    bias = torch.zeros(n, chunk, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~visible.view(n, chunk), float("-inf"))
    bias = bias.repeat(kv_heads, 1).view(1, kv_heads * n, 1, chunk).expand(b, -1, rows, -1)
    if fused:
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            qx, k, v, bias, True, 0.0, False, scale=scale
        )
    else:
        out, lse = _biased_attention(qx, k, v, bias, scale)
    dtype = accumulation_dtype(q.dtype)
    lse = lse[:, :, :rows].reshape(b, kv_heads, n, rows).to(dtype)
    out = out.reshape(b, kv_heads, n, rows, d).to(dtype)
    out, lse = merge_parts(out, lse, dim=2)
    return _unfold(out, h), _unfold(lse, h)


def _plain(
    q: Tensor, k_buf: Tensor, v_buf: Tensor, length: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    return _chunked(q, k_buf, v_buf, length, scale, fused=False)


_KERNELS = {"flex": _flex, "flash": _flash, "chunked": _chunked, "plain": _plain}
