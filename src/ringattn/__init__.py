"""ringattn: exact attention over sequences sharded across GPUs (ring attention).

>>> out = ringattn.ring_attention(q_shard, k_shard, v_shard, causal=True)
"""

import importlib
from typing import TYPE_CHECKING, Any

from . import reference
from .api import ring_attention, set_cross_rank_check, set_cuda_graphs, shard, unshard
from .balance import layout_imbalance
from .comm import RingCommunicationError
from .inference import KVCache, decode, prefill
from .integrations.routing import context_parallel, context_parallel_unshard
from .kernels import BACKENDS
from .layout import LAYOUTS
from .masks import Documents
from .strategies import STRATEGIES, attention

__all__ = [
    "AttentionContextParallel",
    "BACKENDS",
    "Documents",
    "KVCache",
    "LAYOUTS",
    "RingCommunicationError",
    "STRATEGIES",
    "attention",
    "attention_context_parallel",
    "context_parallel",
    "context_parallel_unshard",
    "decode",
    "layout_imbalance",
    "prefill",
    "reference",
    "ring_attention",
    "set_cross_rank_check",
    "set_cuda_graphs",
    "shard",
    "unshard",
]
__version__ = "0.1.0"

_MOVED = {
    "dtensor": ".integrations.dtensor",
    "routing": ".integrations.routing",
    "sdpa_route": ".integrations.sdpa_route",
    "bench": ".cli.bench",
    "bench_report": ".cli.bench_report",
    "calibrate": ".cli.calibrate",
    "demo": ".cli.demo",
    "launch": ".cli.launch",
    "plan_cli": ".cli.plan",
}

if TYPE_CHECKING:
    from .integrations.dtensor import AttentionContextParallel, attention_context_parallel


def __getattr__(name: str) -> Any:
    # The DTensor integration imports torch.distributed.tensor (most of a second): only
    # when it is asked for.
    if name in ("AttentionContextParallel", "attention_context_parallel"):
        from .integrations import dtensor

        return getattr(dtensor, name)
    if name in _MOVED:
        # Modules that lived at the top level before the package grew subpackages.
        return importlib.import_module(_MOVED[name], __name__)
    raise AttributeError(f"module 'ringattn' has no attribute {name!r}")
