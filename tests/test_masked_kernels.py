"""FlexAttention's BlockMask for a masked pair, built on CPU (FlexAttention's forward runs
eagerly there; its backward needs a GPU and is checked in tests/test_gpu.py)."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import flex_attention

import ringattn
from mask_cases import reference_attention
from ringattn.masked_kernels import _reads_argument, build_block_mask
from ringattn.masks import MaskSpec, PairMask


def test_reads_argument_sees_what_a_mask_function_loads() -> None:
    def prefix_lm(b, h, q, kv):
        return (kv < 5) | (kv <= q)

    def per_head(b, h, q, kv):
        return (h % 2 == 0) | (kv <= q)

    def nested(b, h, q, kv):
        return (lambda: b == 0)() | (kv <= q)

    assert not _reads_argument(prefix_lm, 0) and not _reads_argument(prefix_lm, 1)
    assert not _reads_argument(per_head, 0) and _reads_argument(per_head, 1)
    assert _reads_argument(nested, 0)  # captured by an inner function: assumed read
    assert _reads_argument(torch.nn.Identity(), 0)  # not a plain function: assumed read


def test_a_mask_function_empties_tiles_and_stays_exact() -> None:
    seq, prefix = 1024, 200

    def prefix_lm(b, h, q, kv):
        return (kv < prefix) | (kv <= q)

    docs = ringattn.Documents.from_lengths([300, 600, 124])
    spec = MaskSpec.build(docs, False, None, prefix_lm, seq)
    pos = torch.arange(seq)
    pair = PairMask.build(spec, pos, pos)
    bm = build_block_mask(pair, torch.device("cpu"), batch=2, heads=4)
    tiles = (seq // 128) ** 2
    visited = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum())
    assert bm.kv_num_blocks.shape[:2] == (1, 1)  # prefix_lm reads neither b nor h
    assert visited < tiles  # the upper-right tiles outside the prefix are skipped
    assert int(bm.full_kv_num_blocks.sum()) > 0  # and whole tiles run without the mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, seq, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm, scale=0.25)
    dense = docs.dense_mask(causal=False, mask_mod=prefix_lm, heads=1).expand(2, 4, seq, seq)
    want, _ = reference_attention(q, k, v, dense, 0.25)
    assert math.isclose(float((out - want).abs().max()), 0.0, abs_tol=1e-12)
