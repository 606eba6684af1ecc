"""ringattn: exact attention over sequences sharded across GPUs (ring attention).

>>> out = ringattn.ring_attention(q_shard, k_shard, v_shard, causal=True)
"""

from . import reference
from .api import ring_attention, set_cross_rank_check, set_cuda_graphs, shard, unshard
from .dtensor import AttentionContextParallel, attention_context_parallel
from .kernels import BACKENDS
from .layout import LAYOUTS
from .routing import context_parallel, context_parallel_unshard

__all__ = [
    "AttentionContextParallel",
    "BACKENDS",
    "LAYOUTS",
    "attention_context_parallel",
    "context_parallel",
    "context_parallel_unshard",
    "reference",
    "ring_attention",
    "set_cross_rank_check",
    "set_cuda_graphs",
    "shard",
    "unshard",
]
__version__ = "0.1.0"
