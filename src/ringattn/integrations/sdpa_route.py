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
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..api import ring_attention
from ..kernels import BACKENDS
from ..layout import LAYOUTS
from ..strategies import attention

__all__ = [
    "Masks",
    "RingSDPA",
    "SDPACall",
    "SDPARoute",
    "TORCH_SDPA",
    "bind_sdpa_arguments",
    "check_route_options",
    "parse_sdpa_call",
    "resolve_layout",
    "route_attention",
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


@dataclass(frozen=True)
class Masks:
    """The masks a route adds to every SDPA call it runs: documents, a window, a mask_mod.

    ``documents`` (a :class:`ringattn.Documents`) also fixes the layout: the shards are the
    ones ``ringattn.shard(x, group, documents=documents)`` cuts.
    """

    documents: Any = None
    window: tuple[int, int] | None = None
    mask_mod: Callable[..., Any] | None = None

    @classmethod
    def checked(cls, documents: Any, window: Any, mask_mod: Any, where: str) -> Masks:
        """The masks, after the checks that need no tensors (at a route's entry)."""
        from .. import Documents

        if documents is not None and not isinstance(documents, Documents):
            raise TypeError(
                f"{where}: documents must be a ringattn.Documents, got {type(documents).__name__}"
            )
        if window is not None:
            if (
                not isinstance(window, tuple)
                or len(window) != 2
                or any(isinstance(w, bool) or not isinstance(w, int) for w in window)
            ):
                raise TypeError(
                    f"{where}: window must be a (left, right) tuple of ints, got {window!r}"
                )
            if any(w < -1 for w in window):
                raise ValueError(
                    f"{where}: window sizes must be >= 0 or -1 (unbounded), got {window!r}"
                )
        if mask_mod is not None and not callable(mask_mod):
            raise TypeError(f"{where}: mask_mod must be callable, got {type(mask_mod).__name__}")
        return cls(documents, window, mask_mod)

    def ring_options(self, layout: str) -> dict[str, Any]:
        """Keyword arguments for :func:`ringattn.ring_attention` (the layout included)."""
        options: dict[str, Any] = {}
        if self.documents is not None:
            options["documents"] = self.documents  # its layout, not ``layout``
        else:
            options["layout"] = layout
        if self.window is not None:
            options["window"] = self.window
        if self.mask_mod is not None:
            options["mask_mod"] = self.mask_mod
        return options


def route_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Any,
    *,
    causal: bool,
    scale: float | None,
    backend: str,
    options: dict[str, Any],
) -> Tensor:
    """The attention every route runs on this rank's shards: the ring, or under a mask
    (``options`` from :meth:`Masks.ring_options` holding documents, a window or a mask_mod)
    :func:`ringattn.attention` with the planner's strategy. Masked pairs run one FlexAttention
    call on GPUs under the all-gather and Ulysses strategies, where the ring recomputes each
    block's forward in its backward; the planner prices both."""
    if any(name in options for name in ("documents", "window", "mask_mod")):
        return attention(
            q, k, v, group, causal=causal, scale=scale, strategy="auto", backend=backend, **options
        )
    return ring_attention(q, k, v, group, causal=causal, scale=scale, backend=backend, **options)


def resolve_layout(layout: str | None, default: str, documents: Any, where: str) -> str:
    """The layout a route uses: ``default`` for None; none may be named with documents."""
    if documents is not None and layout is not None:
        raise ValueError(
            f"{where}: layout={layout!r} cannot be combined with documents; the documents "
            "fix the layout (shard with ringattn.shard(x, group, documents=documents))"
        )
    return default if layout is None else layout


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

    def __init__(
        self, group: Any, layout: str, backend: str, where: str, masks: Masks | None = None
    ) -> None:
        super().__init__()
        self.group = group
        self.layout = layout
        self.backend = backend
        self.where = where
        self.masks = masks or Masks()

    def sdpa(self, args: tuple, kwargs: dict) -> Tensor:
        call = parse_sdpa_call(self.where, args, kwargs)
        return route_attention(
            call.query,
            call.key,
            call.value,
            self.group,
            causal=call.is_causal,
            scale=call.scale,
            backend=self.backend,
            options=self.masks.ring_options(self.layout),
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
