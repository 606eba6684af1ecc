"""Numerically stable online merge of partial attention results.

Two partial results ``(o1, l1)`` and ``(o2, l2)`` for the same query rows combine as
``l = logaddexp(l1, l2)`` and ``o = o1 + (o2 - o1) * sigmoid(l2 - l1)``: every exponent
is <= 0, so nothing overflows at any |lse|, and rows where both sides saw no key
(``l1 = l2 = -inf``) keep their accumulator instead of turning into NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_into"]


def merge_into(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge the block result ``(out, lse)`` into ``(acc_out, acc_lse)`` in place.

    Args:
        acc_out: accumulated output ``[..., S, D]``, float32 or float64 (may be a view).
        acc_lse: accumulated log-sum-exp ``[..., S]``, same dtype as ``acc_out``.
        out: block output ``[..., S, D]``, any floating dtype.
        lse: block log-sum-exp ``[..., S]``.
    """
    weight = torch.sigmoid(lse.to(acc_lse.dtype) - acc_lse)
    # -inf - -inf is NaN: a block that adds nothing to a row that has nothing keeps it as is.
    weight.nan_to_num_(nan=0.0)
    acc_out.lerp_(out.to(acc_out.dtype), weight.unsqueeze(-1))
    torch.logaddexp(acc_lse, lse.to(acc_lse.dtype), out=acc_lse)
