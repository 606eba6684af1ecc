"""A transformers ``Cache`` whose K/V are sharded across ranks: ``model.generate`` context-parallel.

    ringattn.integrations.transformers.register()  # attn_implementation="ringattn"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ringattn")
    cache = RingCache(model)  # one ringattn.KVCache per layer
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, do_sample=False)

Every rank calls ``generate`` with the same prompt. :class:`RingCache` hooks the model's
base model: a forward whose new tokens split into 2N equal chunks (a prompt, or a second
turn's new tokens) runs sharded: each rank embeds and runs only its zigzag shard of the new
tokens, and attention is :func:`ringattn.prefill` over the layer's cache (the new tokens
attend the whole cache and each other causally). The base model then returns the hidden
state of the last new token only, from the rank that holds it, so the logits ``generate``
reads are the same on every rank. Other forwards (the one-token decode steps, or new
tokens that do not split evenly) run the same inputs on every rank, and attention is
:func:`ringattn.decode`. Either way each layer's new K/V are stored in its sharded cache.

The cache's ``update`` stores nothing itself: it hands the new K/V to the attention function
registered as ``"ringattn"``, which finds them there and attends through the cache.
Beam search, cropping and reordering the cache are not supported (they raise).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import comm
from ..api import shard
from ..inference import KVCache, decode, prefill

__all__ = ["RingCache", "RingCacheLayer"]

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as err:  # pragma: no cover - the integration needs transformers
    raise ImportError("ringattn.integrations.transformers_cache needs transformers") from err

# The layer whose update ran last, with the K/V it was given: the attention function that
# follows in the same layer takes it (checked by identity of the key tensor).
_PENDING: tuple[RingCacheLayer, Tensor] | None = None


def take_pending(key: Tensor) -> RingCacheLayer | None:
    """The cache layer that was just given ``key``, if any (and forget it)."""
    global _PENDING
    if _PENDING is not None and _PENDING[1] is key:
        layer = _PENDING[0]
        _PENDING = None
        return layer
    return None


class RingCacheLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`ringattn.KVCache` shard on this rank."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: RingCache, group: object = None, capacity: int | None = None):
        super().__init__()
        self.owner = owner
        self.kv = KVCache(group, capacity=capacity)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        global _PENDING
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _PENDING = (self, key_states)
        return key_states, value_states

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float | None) -> Tensor:
        """Attention of the new tokens over this layer's cache; stores their K/V."""
        owner = self.owner
        if owner.sharded:
            return prefill(query, key, value, self.kv, scale=scale, backend=owner.backend)
        return decode(query, key, value, self.kv, scale=scale, backend=owner.backend,
                      check=owner.check)  # fmt: skip

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.kv.total + query_length, 0

    def get_seq_length(self) -> int:
        return self.kv.total

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv = KVCache(self.kv.group, capacity=self.kv.capacity_hint)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("RingCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RingCache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("RingCache does not support beam search")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("RingCache does not support selecting batch rows")


class RingCache(Cache):
    """A transformers ``Cache`` sharded over ``group``, for ``attn_implementation="ringattn"``.

    Args:
        model: the causal LM (its config gives the number of layers; its base model gets
            the hooks that shard evenly splittable forwards).
        group: the ranks the cache is sharded over (None: the world).
        capacity: token slots per rank and layer to reserve (default: grow as needed).
        backend: the attention kernel, as for :func:`ringattn.ring_attention`.
        check: the cross-rank check of each decode step (:func:`ringattn.decode`);
            ``"shapes"`` by default, since every rank computes the same tokens.

    Every rank creates its caches in the same order. Call :meth:`close` (or use it as a
    context manager) to remove the hooks from the model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        group: object = None,
        *,
        capacity: int | None = None,
        backend: str = "auto",
        check: str = "shapes",
    ) -> None:
        config = model.config
        layers = [RingCacheLayer(self, group, capacity) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.group = comm.resolve_group(group)
        self.world = comm.group_facts(self.group)[1]
        self.backend = backend
        self.check = check
        self.sharded = False
        base = getattr(model, "base_model", model)
        self._handles = [
            base.register_forward_pre_hook(self._before, with_kwargs=True),
            base.register_forward_hook(self._after, always_call=True),
        ]
        names = inspect.signature(base.forward).parameters
        self._cache_key = "cache" if "cache" in names else "past_key_values"

    def close(self) -> None:
        """Remove the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _before(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if kwargs.get(self._cache_key) is not self:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            return None
        new = x.size(1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            if not bool(mask.all()):
                raise ValueError("RingCache: padded batches are not supported")
            kwargs["attention_mask"] = None  # all ones: nothing to mask beyond causality
        if new < 2 * self.world or new % (2 * self.world) or self.world == 1:
            return None  # the same tokens on every rank: decode
        positions = kwargs.get("position_ids")
        if positions is None:
            past = self.get_seq_length()
            positions = torch.arange(past, past + new, device=x.device).expand(x.size(0), -1)
        kwargs["position_ids"] = shard(positions, self.group, dim=positions.dim() - 1)
        if ids is not None:
            args = ()
            kwargs["input_ids"] = shard(ids, self.group, dim=1)
        else:
            kwargs["inputs_embeds"] = shard(embeds, self.group, dim=1)
        self.sharded = True
        return args, kwargs

    def _after(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if not self.sharded:
            return None
        self.sharded = False
        if output is None:  # the forward raised (this hook always runs)
            return None
        # The last new token is the last row of rank 0's shard (zigzag: chunk 2N-1).
        hidden = output.last_hidden_state[:, -1:].contiguous()
        dist.broadcast(hidden, dist.get_global_rank(self.group, 0), group=self.group)
        output.last_hidden_state = hidden
        return output
