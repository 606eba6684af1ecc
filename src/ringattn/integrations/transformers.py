"""Hugging Face transformers: ``attn_implementation="ringattn"`` runs attention context-parallel.

    ringattn.integrations.transformers.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ringattn")
    part = ringattn.integrations.transformers.shard_batch(batch)
    loss = model(**part).loss  # this rank's share of the mean loss over the whole batch

``register`` adds an attention function (ring attention over the process group, on each
rank's sequence shard) and a mask function (none: the ring masks over global positions) to
transformers' registries. ``shard_batch`` cuts a batch the way the ring expects: input ids,
position ids and the labels shifted for next-token loss on the full sequence, plus the
global token count so that every rank's loss is its share of the global mean.

Packed and padded batches. A batch whose ``position_ids`` restart at 0 inside a row (what
padding-free collators such as ``DataCollatorWithFlattening`` make) holds several documents
per row; a batch with an ``attention_mask`` that has zeros holds padding. For those,
``shard_batch`` builds one :class:`ringattn.Documents` for the batch, cuts every tensor with
the balanced layout the library picks for it, and puts the documents into the returned dict
under ``"ringattn_documents"``. transformers hands keyword arguments of ``model(**part)`` on
to every attention call, so each layer's ring attention sees them: a token attends only
keys of its own document, and padding attends nothing and is attended by nothing. Without
them, the attention function refuses position ids that restart (instead of attending
across documents).

Sliding windows. A layer's window comes from the ``sliding_window`` argument the model
passes (Mistral, Qwen2, Gemma) or the module's ``sliding_window`` attribute, so models that
alternate windowed and full layers (``config.layer_types``) get each layer's own. A window
of W tokens is transformers' convention: query i sees keys i - W < j <= i.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import comm
from ..api import shard
from .sdpa_route import check_route_options, route_attention

if TYPE_CHECKING:
    from .. import Documents

__all__ = ["DOCUMENTS_KEY", "IGNORE_INDEX", "NAME", "batch_documents", "register", "shard_batch"]

NAME = "ringattn"
IGNORE_INDEX = -100
# The keyword argument that carries a batch's Documents from model(**part) to attention.
DOCUMENTS_KEY = "ringattn_documents"


def _window(module: torch.nn.Module, kwargs: Mapping[str, Any]) -> int | None:
    """The layer's sliding window in tokens (None: full attention)."""
    window = kwargs.get("sliding_window")
    if window is None:
        # Older releases keep it on the module only; windowless layers of models with
        # alternating layers carry None.
        window = getattr(module, "sliding_window", None)
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(
            f"attn_implementation={NAME!r}: sliding_window must be a positive int, got {window!r}"
        )
    return window


# The position ids last found to hold no restart (they are the same tensor in every layer
# of one forward, so the check costs one small all-reduce per forward).
_checked_positions: weakref.ref | None = None


def _on_any_rank(flag: Tensor, pg: dist.ProcessGroup) -> bool:
    """Whether the boolean ``flag`` holds on some rank of ``pg`` (every rank gets the same
    answer, so all of them raise together)."""
    found = flag.to(torch.int32).reshape(1)
    if comm.group_facts(pg)[1] > 1:
        found = found.to(comm.collective_device(pg, flag.device))
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=pg)
    return bool(found)


def _refuse_restarts(positions: Any, group: Any, where: str) -> None:
    """Raise on every rank when position ids restart inside a row without documents.

    Without documents the shards hold consecutive positions of one sequence per row, so
    a 0 anywhere but at global position 0 (rank 0's first column) starts another document
    that ring attention would attend across.
    """
    global _checked_positions
    if not isinstance(positions, Tensor) or positions.dim() != 2:
        return
    if _checked_positions is not None and _checked_positions() is positions:
        return
    pg = comm.resolve_group(group)
    zeros = positions == 0
    if comm.group_facts(pg)[0] == 0:
        zeros = zeros[:, 1:]
    if _on_any_rank(zeros.any(), pg):
        raise ValueError(
            f"{where}: position_ids restart at 0 inside a row (a packed batch) but no "
            f"documents were given; pass the batch through shard_batch, whose result carries "
            f"them as {DOCUMENTS_KEY!r}, or ring attention would attend across documents"
        )
    _checked_positions = weakref.ref(positions)


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
    from .. import Documents

    documents = kwargs.get(DOCUMENTS_KEY)
    if documents is not None and not isinstance(documents, Documents):
        raise TypeError(
            f"{where}: {DOCUMENTS_KEY} must be a ringattn.Documents, got {type(documents).__name__}"
        )
    if attention_mask is not None:
        raise ValueError(
            f"{where}: the model was given an attention mask; ringattn masks over global "
            f"positions itself: pass padded and packed batches through shard_batch"
        )
    if dropout:
        raise ValueError(f"{where}: attention dropout must be 0, got {dropout}")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{where}: output_attentions is not supported (no weights are formed)")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{where}: {name} (attention logit soft-capping or sinks) is not supported"
            )
    # Inference with a RingCache: its update just handed over these K/V.
    cache_module = sys.modules.get("ringattn.integrations.transformers_cache")
    layer = cache_module.take_pending(key) if cache_module is not None else None
    if layer is not None:
        window = _window(module, kwargs)
        new = query.size(2) * (layer.kv.world if layer.owner.sharded else 1)
        if window is not None and window < layer.kv.total + new:
            raise ValueError(
                f"{where}: generation with RingCache attends the whole cache; sliding-window "
                f"layers (window {window}) shorter than the context are not supported yet"
            )
        return layer.attend(query, key, value, scaling).transpose(1, 2).contiguous(), None
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", True))
    if documents is None:
        _refuse_restarts(kwargs.get("position_ids"), group, where)
        seq_len = query.size(2) * comm.group_facts(comm.resolve_group(group))[1]
    else:
        seq_len = documents.seq_len
    mask: dict[str, Any] = {}
    window = _window(module, kwargs)
    if window is not None and window < seq_len:
        # transformers' window of W tokens: i - W < j (<= i when causal; flash attention's
        # symmetric convention otherwise).
        mask["window"] = (window - 1, 0 if causal else window - 1)
    if documents is not None:
        mask["documents"] = documents
    if "documents" not in mask:
        mask["layout"] = layout
    out = route_attention(
        query, key, value, group, causal=causal, scale=scaling, backend=backend, options=mask
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
    *,
    group: Any = None,
    **kwargs: Any,
) -> None:
    # The ring masks over global positions (causal, documents, windows); a padding mask of
    # this rank's shard cannot say which global keys are padding. Padding may sit on some
    # ranks' shards only: they agree before any raises.
    if attention_mask is None:
        return None
    if _on_any_rank((~attention_mask.bool()).any(), comm.resolve_group(group)):
        raise ValueError(
            f"attn_implementation={NAME!r}: the model was given a padding attention_mask; "
            f"pass the full batch through shard_batch, which turns padding into documents "
            f"(passed as {DOCUMENTS_KEY!r}), and leave attention_mask out"
        )
    return None


def register(group: object = None, *, layout: str = "zigzag", backend: str = "auto") -> str:
    """Register ``attn_implementation="ringattn"`` with transformers; returns the name.

    Args:
        group: the ranks the sequence is split over (None: the world; a ProcessGroup or a
            1-D DeviceMesh).
        layout: how :func:`shard_batch` split a batch without documents (``"zigzag"``
            balances causal work); batches with documents use the documents' layout.
        backend: the attention kernel, as for :func:`ringattn.ring_attention`.

    Calling it again replaces the registration (e.g. with another group).
    """
    check_route_options(layout, backend)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    attention = functools.partial(_attention, group=group, layout=layout, backend=backend)
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, functools.partial(_no_mask, group=group))
    return NAME


def _restarts(positions: Tensor) -> bool:
    """Whether some row's position ids restart at 0 after its first token."""
    return bool((positions[:, 1:] == 0).any())


def batch_documents(batch: Mapping[str, Tensor]) -> Documents | None:
    """The :class:`ringattn.Documents` of a batch, or None for one plain sequence per row.

    Documents start where ``position_ids`` restart at 0; zeros of ``attention_mask`` are
    padding. What :func:`shard_batch` uses; build them yourself to shard further tensors
    of the batch alike (``ringattn.shard(x, group, dim=1, documents=docs)``).
    """
    from .. import Documents

    ids = batch["input_ids"]
    positions = batch.get("position_ids")
    mask = batch.get("attention_mask")
    for name, x in (("position_ids", positions), ("attention_mask", mask)):
        if x is not None and (not isinstance(x, Tensor) or x.shape != ids.shape):
            raise ValueError(
                f"batch[{name!r}] must be a tensor of input_ids' shape {tuple(ids.shape)}, got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
    packed = positions is not None and _restarts(positions)
    padded = mask is not None and not bool(mask.bool().all())
    if padded:
        return Documents.from_attention_mask(mask, position_ids=positions if packed else None)
    if packed:
        return Documents.from_position_ids(positions)
    return None


def shard_batch(
    batch: Mapping[str, Tensor], group: object = None, *, layout: str = "zigzag"
) -> dict[str, Any]:
    """This rank's part of a causal-LM batch, ready for ``model(**part)``.

    ``batch`` holds ``input_ids`` ``[B, S]`` and optionally ``labels`` (unshifted, as
    transformers takes them), ``position_ids`` (restarting at 0 where a packed document
    starts) and ``attention_mask`` (0 = padding). Labels are shifted for next-token loss on
    the full sequence before sharding (the token after each shard's last one lives on
    another rank), and ``num_items_in_batch`` is the global number of labelled tokens, so
    each rank's loss is its share of the global mean: sum the ranks' losses (and
    gradients) to get the one-process values.

    A packed or padded batch (see :func:`batch_documents`) is cut with its documents'
    balanced layout (``layout`` is then not used), and the part carries the documents
    under ``"ringattn_documents"`` for the attention calls; the attention mask itself is
    left out. Labels are taken as given: mark padding and each document's first token with
    -100, as transformers' collators do, so that no token predicts another document's.
    """
    ids = batch["input_ids"]
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise ValueError("batch['input_ids'] must be a [batch, seq] tensor")
    unknown = set(batch) - {"input_ids", "labels", "position_ids", "attention_mask"}
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {sorted(unknown)}")
    documents = batch_documents(batch)
    pg = comm.resolve_group(group)
    cut = functools.partial(shard, group=pg, dim=1)
    if documents is not None:
        cut = functools.partial(cut, documents=documents)
    else:
        cut = functools.partial(cut, layout=layout)
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    part: dict[str, Any] = {"input_ids": cut(ids), "position_ids": cut(positions)}
    labels = batch.get("labels")
    if labels is not None:
        shifted = torch.full_like(labels, IGNORE_INDEX)
        shifted[:, :-1] = labels[:, 1:]
        local = cut(shifted)
        part["labels"] = local  # any tensor: transformers computes a loss when it is set
        part["shift_labels"] = local
        part["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
    if documents is not None:
        part[DOCUMENTS_KEY] = documents
    return part
