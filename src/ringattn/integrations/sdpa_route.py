"""Intercepting ``F.scaled_dot_product_attention`` calls, for every integration entry point.

A ``TorchFunctionMode`` sees each SDPA call made while it is active. ``nn.MultiheadAttention``
calls SDPA from inside ``F.multi_head_attention_forward``, which is itself overridable: the
mode is inactive while it handles that function, so for the duration of that one call the
functional module's ``scaled_dot_product_attention`` is pointed at the route.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..api import ring_attention
from ..kernels import BACKENDS
from ..layout import LAYOUTS

__all__ = [
    "RingSDPA",
    "SDPACall",
    "SDPARoute",
    "TORCH_SDPA",
    "bind_sdpa_arguments",
    "check_route_options",
    "parse_sdpa_call",
]

# The functions as PyTorch defines them, whatever a route points the names at meanwhile.
TORCH_SDPA = F.scaled_dot_product_attention
_MULTIHEAD = F.multi_head_attention_forward
_MULTIHEAD_SIGNATURE = inspect.signature(_MULTIHEAD)


class SDPACall(NamedTuple):
    """The arguments of one ``F.scaled_dot_product_attention`` call, by SDPA's own names."""

    query: Any
    key: Any
    value: Any
    attn_mask: Any
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool


def bind_sdpa_arguments(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> SDPACall:
    """SDPA's arguments by name, as SDPA's own signature binds them."""
    return SDPACall(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def parse_sdpa_call(where: str, args: tuple, kwargs: dict) -> SDPACall:
    """Bind SDPA's arguments; raise ValueError for what ring attention cannot do.

    ``where`` names the entry point in messages (e.g. ``"ringattn.context_parallel"``).
    """
    call = bind_sdpa_arguments(*args, **kwargs)
    prefix = f"scaled_dot_product_attention under {where}"
    if call.attn_mask is not None:
        raise ValueError(
            f"{prefix}: attn_mask is not supported (the mask would have to be sharded); use "
            "is_causal=True or no mask"
        )
    if call.dropout_p != 0.0:
        raise ValueError(f"{prefix}: dropout_p must be 0.0, got {call.dropout_p}")
    q, k = call.query, call.key
    if not call.enable_gqa and k.dim() == 4 and q.dim() == 4 and k.size(1) != q.size(1):
        raise ValueError(
            f"{prefix}: key has {k.size(1)} heads and query {q.size(1)}; pass enable_gqa=True "
            "for grouped-query attention, as plain SDPA requires"
        )
    return call


def check_route_options(layout: object, backend: object) -> None:
    """Raise ValueError for an unknown layout or backend, before anything is set up."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


@contextlib.contextmanager
def _functional_sdpa(route: Callable[..., Any]) -> Iterator[None]:
    F.scaled_dot_product_attention = route
    try:
        yield
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


class SDPARoute(TorchFunctionMode):
    """Base mode: hands every SDPA call, also nn.MultiheadAttention's, to :meth:`sdpa`."""

    where = "ringattn"

    def sdpa(self, args: tuple, kwargs: dict) -> Any:
        """The result of ``F.scaled_dot_product_attention(*args, **kwargs)`` under the route."""
        raise NotImplementedError

    def check_multihead(self, arguments: dict[str, Any]) -> None:
        """Raise for ``F.multi_head_attention_forward`` arguments the route cannot serve."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is TORCH_SDPA:
            return self.sdpa(args, kwargs)
        if func is _MULTIHEAD:
            self.check_multihead(_MULTIHEAD_SIGNATURE.bind(*args, **kwargs).arguments)
            with _functional_sdpa(lambda *a, **kw: self.sdpa(a, kw)):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class RingSDPA(SDPARoute):
    """Runs SDPA on this rank's shards (plain tensors) as ring attention over ``group``.

    ``where`` names the entry point that pushed the mode, for error messages.
    """

    def __init__(self, group: Any, layout: str, backend: str, where: str) -> None:
        super().__init__()
        self.group = group
        self.layout = layout
        self.backend = backend
        self.where = where

    def sdpa(self, args: tuple, kwargs: dict) -> Tensor:
        call = parse_sdpa_call(self.where, args, kwargs)
        return ring_attention(
            call.query,
            call.key,
            call.value,
            self.group,
            causal=call.is_causal,
            scale=call.scale,
            layout=self.layout,
            backend=self.backend,
        )

    def check_multihead(self, arguments: dict[str, Any]) -> None:
        prefix = f"nn.MultiheadAttention under {self.where}"
        if arguments.get("need_weights", True):
            raise ValueError(
                f"{prefix}: need_weights=True (its default) forms attention weights outside "
                "SDPA, over this rank's keys only; pass need_weights=False"
            )
        if arguments.get("key_padding_mask") is not None:
            raise ValueError(
                f"{prefix}: key_padding_mask is not supported; pass sequences without padding"
            )
        if arguments.get("bias_k") is not None or arguments.get("add_zero_attn"):
            raise ValueError(
                f"{prefix}: add_bias_kv and add_zero_attn append keys to every rank's shard; "
                "they cannot run context-parallel"
            )
