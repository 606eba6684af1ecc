"""ringattn: exact attention over sequences sharded across GPUs (ring attention).

>>> out = ringattn.ring_attention(q_shard, k_shard, v_shard, causal=True)
"""

from typing import TYPE_CHECKING, Any

from . import reference
from .api import ring_attention, set_cross_rank_check, set_cuda_graphs, shard, unshard
from .comm import RingCommunicationError
from .inference import KVCache, decode, prefill
from .kernels import BACKENDS
from .layout import LAYOUTS
from .routing import context_parallel, context_parallel_unshard
from .strategies import STRATEGIES, attention

__all__ = [
    "AttentionContextParallel",
    "BACKENDS",
    "KVCache",
    "LAYOUTS",
    "RingCommunicationError",
    "STRATEGIES",
    "attention",
    "attention_context_parallel",
    "context_parallel",
    "context_parallel_unshard",
    "decode",
    "prefill",
    "reference",
    "ring_attention",
    "set_cross_rank_check",
    "set_cuda_graphs",
    "shard",
    "unshard",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .dtensor import AttentionContextParallel, attention_context_parallel


def __getattr__(name: str) -> Any:
    # The DTensor integration imports torch.distributed.tensor (most of a second): only
    # when it is asked for.
    if name in ("AttentionContextParallel", "attention_context_parallel"):
        from . import dtensor

        return getattr(dtensor, name)
    raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
