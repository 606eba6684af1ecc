"""Hugging Face transformers: ``attn_implementation="ringattn"`` runs attention context-parallel.

    ringattn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ringattn")
    batch = ringattn.integrations.transformers.shard_batch({"input_ids": ids, "labels": ids})
    loss = model(**batch).loss  # this rank's share of the mean loss over the whole batch

``register`` adds an attention function (ring attention over the process group, on each
rank's sequence shard) and a mask function (no mask: causal masking happens in the ring) to
transformers' registries. ``shard_batch`` cuts a batch the way the ring expects: input ids,
position ids and the labels shifted for next-token loss on the full sequence, plus the
global token count so that every rank's loss is its share of the global mean.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import comm
from ..api import ring_attention, shard
from .sdpa_route import check_route_options

__all__ = ["IGNORE_INDEX", "NAME", "register", "shard_batch"]

NAME = "ringattn"
IGNORE_INDEX = -100


def _attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    group: Any,
    layout: str,
    backend: str,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    where = f"attn_implementation={NAME!r}"
    if attention_mask is not None:
        raise ValueError(
            f"{where}: attention masks other than causal are not supported (padding, "
            "packed sequences); pass unpadded sequences without an attention_mask"
        )
    if dropout:
        raise ValueError(f"{where}: attention dropout must be 0, got {dropout}")
    # Models pass the window as an argument (or keep it on the module in older releases).
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window and window < query.size(2) * comm.group_facts(comm.resolve_group(group))[1]:
        raise ValueError(
            f"{where}: sliding-window attention (window {window}) over a longer sequence is "
            "not supported; a window at least as long as the sequence is plain causal"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(f"{where}: output_attentions is not supported (no weights are formed)")
    # Inference with a RingCache: its update just handed over these K/V.
    cache_module = sys.modules.get("ringattn.integrations.transformers_cache")
    layer = cache_module.take_pending(key) if cache_module is not None else None
    if layer is not None:
        return layer.attend(query, key, value, scaling).transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    out = ring_attention(
        query, key, value, group, causal=causal, scale=scaling, layout=layout, backend=backend
    )
    return out.transpose(1, 2).contiguous(), None


def _no_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> None:
    # The ring applies the causal mask over global positions; a padding mask cannot be
    # sharded with the sequence.
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attn_implementation={NAME!r}: padded batches are not supported; pass "
            "sequences without padding (attention_mask all ones or None)"
        )
    return None


def register(group: object = None, *, layout: str = "zigzag", backend: str = "auto") -> str:
    """Register ``attn_implementation="ringattn"`` with transformers; returns the name.

    Args:
        group: the ranks the sequence is split over (None: the world; a ProcessGroup or a
            1-D DeviceMesh).
        layout: how :func:`shard_batch` split the sequence (``"zigzag"`` balances causal
            work).
        backend: the attention kernel, as for :func:`ringattn.ring_attention`.

    Calling it again replaces the registration (e.g. with another group).
    """
    check_route_options(layout, backend)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attention = functools.partial(_attention, group=group, layout=layout, backend=backend)
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


def shard_batch(
    batch: Mapping[str, Tensor], group: object = None, *, layout: str = "zigzag"
) -> dict[str, Tensor]:
    """This rank's part of a causal-LM batch, ready for ``model(**part)``.

    ``batch`` holds ``input_ids`` ``[B, S]`` and optionally ``labels`` (unshifted, as
    transformers takes them), ``position_ids`` and an all-ones ``attention_mask``. Labels are
    shifted for next-token loss on the full sequence before sharding (the token after each
    shard's last one lives on another rank), and ``num_items_in_batch`` is the global number
    of labelled tokens, so each rank's loss is its share of the global mean: sum the
    ranks' losses (and gradients) to get the one-process values.
    """
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [batch, seq] tensor")
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError("padded batches are not supported: attention_mask must be all ones")
    unknown = set(batch) - {"input_ids", "labels", "position_ids", "attention_mask"}
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {sorted(unknown)}")
    pg = comm.resolve_group(group)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    part = {
        "input_ids": shard(ids, pg, dim=1, layout=layout),
        "position_ids": shard(positions, pg, dim=1, layout=layout),
    }
    labels = batch.get("labels")
    if labels is not None:
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        local = shard(shifted, pg, dim=1, layout=layout)
        part["labels"] = local  # any tensor: transformers computes a loss when it is set
        part["shift_labels"] = local
        part["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
    return part
