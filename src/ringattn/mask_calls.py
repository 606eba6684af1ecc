"""Masked calls: from an entry point's mask arguments to a checked, planned ring call.

:class:`MaskArguments` is what the argument checks see of ``documents``, ``window`` and
``mask_mod``: ``validate`` raises :class:`~ringattn.masks.MaskArgumentError` for a bad one
(on this rank; the checks make every rank raise), ``fingerprint`` travels in the cross-rank
check so that ranks describing different masks raise instead of computing garbage, ``key``
is what the call caches depend on. :func:`masked_ring_attention` is ``ring_attention`` with
a mask; the strategies use :func:`placement_for` and the plans of :mod:`ringattn.mask_plan`.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from . import comm
from .balance import Placement, balanced_placement, layout_placement
from .checks import checked_call
from .layout import LAYOUTS
from .mask_plan import ring_plans
from .masked_kernels import masked_kernel_for
from .masks import MaskArgumentError, MaskSpec, normalize_window
from .ring import RingAttentionFunction, RingCall

__all__ = ["MaskArguments", "masked_ring_attention", "placement_for"]


class MaskArguments:
    """The mask arguments of one call, as the argument checks and caches see them."""

    def __init__(self, documents: object, window: object, mask_mod: object, causal: object) -> None:
        self.documents = documents
        self.window = window
        self.mask_mod = mask_mod
        self.causal = causal
        self.spec: MaskSpec | None = None
        try:
            window_key: object = normalize_window(window)
        except MaskArgumentError:
            window_key = ("bad", repr(window))
        fp = getattr(documents, "fingerprint", None)
        self.key = (fp, window_key, mask_mod if callable(mask_mod) else repr(mask_mod))

    @property
    def fingerprint(self) -> int:
        if self.spec is not None:
            return self.spec.fingerprint
        return 0

    def validate(self, q: Tensor, k: Tensor, world_size: int) -> None:
        """Raise MaskArgumentError for a mask that cannot describe this call."""
        seq_len = q.size(2) * world_size
        if not isinstance(self.causal, bool):
            return  # the causal check reports it
        spec = MaskSpec.build(self.documents, self.causal, self.window, self.mask_mod, seq_len)  # type: ignore[arg-type]
        docs = spec.documents
        if docs is not None:
            if docs.seq_len != seq_len:
                raise MaskArgumentError(
                    "documents",
                    ValueError,
                    f"documents cover {docs.seq_len} tokens but the sequence has {seq_len} "
                    f"({q.size(2)} local tokens x {world_size} ranks): lengths must sum to the "
                    "global sequence length",
                )
            if docs.batch_size is not None and docs.batch_size != q.size(0):
                raise MaskArgumentError(
                    "documents",
                    ValueError,
                    f"documents describe {docs.batch_size} batch rows but q has {q.size(0)}",
                )
        spec.probe_mask_mod(q.size(0), q.size(1), q.device)
        self.spec = spec


def placement_for(spec: MaskSpec, world_size: int, layout: str) -> Placement:
    """Where the ranks' positions are: the balanced layout with documents, else ``layout``."""
    if spec.documents is not None:
        return balanced_placement(spec.documents, world_size)
    return layout_placement(spec.seq_len, world_size, layout)


def check_masked(
    group: dist.ProcessGroup,
    q: object,
    k: object,
    v: object,
    causal: object,
    scale: object,
    layout: object,
    backend: object,
    return_lse: object,
    mask: MaskArguments,
) -> tuple[RingCall, MaskSpec]:
    """The checked call (agreed across ``group``) and the validated mask description."""
    # With documents the layout is the library's; the zigzag's evenness rule does not apply.
    check_layout = "contiguous" if mask.documents is not None and layout in LAYOUTS else layout
    call = checked_call(group, q, k, v, causal, scale, check_layout, backend, return_lse, mask=mask)
    if mask.spec is None:  # a cached call: validate ran for an identical call before
        assert isinstance(q, Tensor) and isinstance(k, Tensor)
        try:
            mask.validate(q, k, comm.group_facts(group)[1])
        except MaskArgumentError as err:
            raise err.exc_type(f"ring_attention: {err.message}") from None
    assert mask.spec is not None
    return call, mask.spec


def masked_call(
    base: RingCall,
    spec: MaskSpec,
    placement: Placement,
    rank: int,
    device: Any,
    backend: str,
    head_offset: int = 0,
) -> RingCall:
    """``base`` (checked: ring, kernel, scale) with the masked plans of ``rank``."""
    plans = ring_plans(spec, placement, masked_kernel_for(device, backend), rank, head_offset)
    return RingCall(
        ring=base.ring if plans.steps > 1 else None,
        plans=plans.plans,
        kernel=base.kernel,
        scale=base.scale,
        next_last_plan=plans.next_last_plan,
    )


def masked_ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: object,
    *,
    causal: bool,
    scale: float | None,
    layout: str,
    backend: str,
    return_lse: bool,
    documents: object,
    window: object,
    mask_mod: object,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`ringattn.ring_attention` with documents, a window or a mask function."""
    pg = comm.resolve_group(group)
    mask = MaskArguments(documents, window, mask_mod, causal)
    base, spec = check_masked(pg, q, k, v, causal, scale, layout, backend, return_lse, mask)
    rank, world, _ = comm.group_facts(pg)
    placement = placement_for(spec, world, layout)
    call = masked_call(base, spec, placement, rank, q.device, backend)
    out, lse = RingAttentionFunction.apply(q, k.contiguous(), v.contiguous(), call)
    return (out, lse) if return_lse else out
