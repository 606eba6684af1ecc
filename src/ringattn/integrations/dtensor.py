"""DTensor and ``parallelize_module`` integration.

``attention_context_parallel()`` makes ``F.scaled_dot_product_attention`` on DTensors that
shard the sequence dimension run as ring attention over the mesh dimension that shards it;
the result is a DTensor with the query's placements, differentiable through the ring. It
works through a ``TorchFunctionMode`` and leaves PyTorch's DTensor dispatcher untouched, so
leaving the context, also by an exception, restores the dispatch state exactly.
``documents=`` (packed documents, padding), ``window=`` and ``mask_mod=`` add masks to every
such call; with documents, the local shards are those ``ringattn.shard(x, mesh,
documents=docs)`` cuts.

``AttentionContextParallel`` is a ``ParallelStyle``: inside the forward of the module it is
applied to, SDPA on this rank's shards (plain tensors) runs as ring attention over the mesh,
and outputs come back as local tensors. It takes modules that call
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``. A window and a mask_mod are
the model's (given when the style is made); documents change with every batch, so they are
set per batch with ``with style.use_documents(docs): ...``.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ParallelStyle

from ..layout import num_chunks
from .sdpa_route import (
    TORCH_SDPA,
    Masks,
    RingSDPA,
    SDPARoute,
    bind_sdpa_arguments,
    check_route_options,
    parse_sdpa_call,
    resolve_layout,
    route_attention,
)

__all__ = ["AttentionContextParallel", "attention_context_parallel"]

_SEQ_DIM = 2  # of SDPA's [batch, heads, seq, head_dim]
_WHERE_DTENSOR = "ringattn.attention_context_parallel"
_WHERE_STYLE = "ringattn.AttentionContextParallel"


def _sequence_mesh_dim(q: DTensor, k: Any, v: Any) -> int | None:
    """The mesh dimension that shards the sequence of q, k and v (None: none does).

    Raises TypeError/ValueError for inputs ring attention cannot take, on every rank alike
    (DTensor metadata is global), before any communication.
    """
    prefix = f"scaled_dot_product_attention under {_WHERE_DTENSOR}"
    for name, x in (("key", k), ("value", v)):
        if not isinstance(x, DTensor):
            raise TypeError(
                f"{prefix}: query is a DTensor but {name} is a {type(x).__name__}; pass query, "
                "key and value as DTensors on the same mesh"
            )
        if x.device_mesh != q.device_mesh:
            raise ValueError(
                f"{prefix}: {name} is on {x.device_mesh}, query on {q.device_mesh}; "
                "they must share a mesh"
            )
        if tuple(x.placements) != tuple(q.placements):
            raise ValueError(
                f"{prefix}: {name} has placements {tuple(x.placements)}, query "
                f"{tuple(q.placements)}; they must be the same"
            )
    if q.dim() != 4:
        raise ValueError(
            f"{prefix}: query must be 4-D [batch, heads, seq, head_dim], got shape {tuple(q.shape)}"
        )
    seq_dims = []
    for mesh_dim, placement in enumerate(q.placements):
        if placement.is_partial():
            raise ValueError(
                f"{prefix}: placement {placement} on mesh dimension {mesh_dim} is a pending "
                "reduction; redistribute query, key and value first"
            )
        if not isinstance(placement, Shard):
            continue
        tensor_dim = placement.dim % 4
        if type(placement) is not Shard or tensor_dim == 3:
            raise ValueError(
                f"{prefix}: placement {placement} on mesh dimension {mesh_dim} is not supported; "
                "shard the batch (dim 0), heads (dim 1) or sequence (dim 2)"
            )
        if tensor_dim == _SEQ_DIM:
            seq_dims.append(mesh_dim)
    if len(seq_dims) > 1:
        raise ValueError(
            f"{prefix}: the sequence is sharded over mesh dimensions {seq_dims}; shard it over one"
        )
    return seq_dims[0] if seq_dims else None


def _check_mesh(mesh: DeviceMesh | None, q: DTensor, ring_dim: int) -> None:
    if mesh is None or mesh == q.device_mesh:
        return
    if mesh.ndim == 1 and mesh.get_group() == q.device_mesh.get_group(ring_dim):
        return
    raise ValueError(
        f"scaled_dot_product_attention under {_WHERE_DTENSOR}: the inputs shard the sequence "
        f"over dimension {ring_dim} of {q.device_mesh}, which is not the context's mesh {mesh}"
    )


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _sdpa_on_dtensors(
    args: tuple, kwargs: dict, mesh: DeviceMesh | None, layout: str, backend: str, masks: Masks
) -> DTensor | None:
    """SDPA on DTensors; None leaves the call to PyTorch's own DTensor rules.

    A sharded sequence runs as ring attention. A whole sequence (batch or heads sharded, or
    replicated) needs no communication: SDPA runs on the local tensors, on every backend.
    """
    call = bind_sdpa_arguments(*args, **kwargs)
    q, k, v = call.query, call.key, call.value
    if not isinstance(q, DTensor):
        raise TypeError(
            f"scaled_dot_product_attention under {_WHERE_DTENSOR}: key or value is a DTensor "
            f"but query is a {type(q).__name__}; pass all three as DTensors on the same mesh"
        )
    ring_dim = _sequence_mesh_dim(q, k, v)
    if ring_dim is None and masks != Masks():
        raise ValueError(
            f"scaled_dot_product_attention under {_WHERE_DTENSOR}: documents, window and "
            f"mask_mod apply to a sequence sharded over the mesh (Shard(2)); the inputs have "
            f"placements {tuple(q.placements)}"
        )
    if ring_dim is None:
        if call.attn_mask is not None or call.dropout_p != 0.0:
            return None  # a mask or dropout may need the global view
        out = TORCH_SDPA(
            q.to_local(),
            k.to_local(),
            v.to_local(),
            is_causal=call.is_causal,
            scale=call.scale,
            enable_gqa=call.enable_gqa,
        )
    else:
        out = _ring_on_local_shards(args, kwargs, mesh, layout, backend, ring_dim, masks)
    shape = (*q.shape[:3], v.size(3))
    return DTensor.from_local(
        out,
        q.device_mesh,
        q.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_strides(shape),
    )


def _ring_on_local_shards(
    args: tuple,
    kwargs: dict,
    mesh: DeviceMesh | None,
    layout: str,
    backend: str,
    ring_dim: int,
    masks: Masks,
) -> torch.Tensor:
    call = parse_sdpa_call(_WHERE_DTENSOR, args, kwargs)
    q, k, v = call.query, call.key, call.value
    _check_mesh(mesh, q, ring_dim)
    ring_size = q.device_mesh.size(ring_dim)
    chunks = num_chunks(ring_size, layout)
    for name, x in (("query", q), ("key", k)):
        if masks.documents is not None:
            if x.size(_SEQ_DIM) != masks.documents.seq_len:
                raise ValueError(
                    f"scaled_dot_product_attention under {_WHERE_DTENSOR}: {name} has "
                    f"{x.size(_SEQ_DIM)} positions, the documents {masks.documents.seq_len}"
                )
        elif x.size(_SEQ_DIM) % chunks:
            raise ValueError(
                f"scaled_dot_product_attention under {_WHERE_DTENSOR}: {name} has "
                f"{x.size(_SEQ_DIM)} positions, which layout={layout!r} on {ring_size} ranks "
                f"cannot split evenly (needs a multiple of {chunks})"
            )
    return route_attention(
        q.to_local(),
        k.to_local(),
        v.to_local(),
        q.device_mesh.get_group(ring_dim),
        causal=call.is_causal,
        scale=call.scale,
        backend=backend,
        options=masks.ring_options(layout),
    )


class _DTensorRingSDPA(SDPARoute):
    """Runs SDPA on sequence-sharded DTensors as ring attention; everything else unchanged."""

    where = _WHERE_DTENSOR

    def __init__(self, mesh: DeviceMesh | None, layout: str, backend: str, masks: Masks) -> None:
        super().__init__()
        self.mesh = mesh
        self.layout = layout
        self.backend = backend
        self.masks = masks

    def sdpa(self, args: tuple, kwargs: dict) -> Any:
        if any(isinstance(x, DTensor) for x in (*args[:3], *kwargs.values())):
            out = _sdpa_on_dtensors(args, kwargs, self.mesh, self.layout, self.backend, self.masks)
            if out is not None:
                return out
        return TORCH_SDPA(*args, **kwargs)


@contextlib.contextmanager
def attention_context_parallel(
    mesh: DeviceMesh | None = None,
    *,
    layout: str | None = None,
    backend: str = "auto",
    documents: Any = None,
    window: tuple[int, int] | None = None,
    mask_mod: Callable[..., Any] | None = None,
) -> Iterator[None]:
    """Run SDPA on DTensors that shard the sequence as ring attention, inside the context.

    ``F.scaled_dot_product_attention(q, k, v, is_causal=..., scale=..., enable_gqa=...)``
    with q, k and v DTensors ``[B, H, S, D]`` of equal placements, one of which is
    ``Shard(2)``, returns attention over the whole sequence as a DTensor with q's
    placements, forward and backward, on every backend. Other mesh dimensions may shard
    the batch (``Shard(0)``) or heads (``Shard(1)``), or replicate. SDPA on plain tensors
    and on DTensors with an unsharded sequence runs as usual.

    Args:
        mesh: the mesh to run on (None: the inputs' own). Either the inputs' mesh or the
            1-D mesh of the dimension that shards their sequence; inputs on another raise.
        layout: how the DTensor's sequence maps to positions. ``"contiguous"`` (the
            default): it is in order, as ``distribute_tensor(x, mesh, [Shard(2)])`` makes
            it. ``"zigzag"``: each rank's local shard is :func:`ringattn.shard` of the
            sequence (balanced causal work), e.g.
            ``DTensor.from_local(ringattn.shard(x, mesh), mesh, [Shard(2)])``. Not with
            ``documents``.
        backend: the attention backend, as for :func:`ringattn.ring_attention`.
        documents: a :class:`ringattn.Documents` (packed documents, padding): attention
            stays within documents, and each rank's local shard is
            ``ringattn.shard(x, mesh, documents=documents)``, e.g.
            ``DTensor.from_local(ringattn.shard(x, mesh, documents=docs), mesh, [Shard(2)],
            shape=x.shape, stride=x.stride())``.
        window: ``(left, right)`` sliding window (-1 = unbounded), for every call.
        mask_mod: ``fn(b, h, q_idx, kv_idx) -> bool`` over global positions, for every call.

    Raises:
        ValueError, TypeError: an unknown layout or backend, or a mesh that is not a
            DeviceMesh, at entry; inside, SDPA calls ring attention cannot run (masks,
            dropout, mixed placements, a sequence the layout cannot split), before any
            communication.
    """
    masks = Masks.checked(documents, window, mask_mod, _WHERE_DTENSOR)
    layout = resolve_layout(layout, "contiguous", documents, _WHERE_DTENSOR)
    check_route_options(layout, backend)
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be None or a DeviceMesh, got {type(mesh).__name__}")
    with _DTensorRingSDPA(mesh, layout, backend, masks):
        yield


def _local_input(name: str, x: Any, mesh: DeviceMesh) -> Any:
    if not isinstance(x, DTensor):
        return x
    if x.device_mesh != mesh:
        raise ValueError(
            f"{_WHERE_STYLE}: input {name} is a DTensor on {x.device_mesh}, the module was "
            f"parallelized over {mesh}"
        )
    if not any(isinstance(p, Shard) for p in x.placements):
        raise ValueError(
            f"{_WHERE_STYLE}: input {name} has placements {tuple(x.placements)}; pass this "
            "rank's sequence shard (a plain tensor or a DTensor sharded on the sequence)"
        )
    return x.to_local()


def _local_outputs(output: Any) -> Any:
    if isinstance(output, DTensor):
        return output.to_local()
    if isinstance(output, tuple):
        return tuple(_local_outputs(x) for x in output)
    return output


def _multihead_arguments(module: nn.MultiheadAttention, args: tuple, kwargs: dict):
    """nn.MultiheadAttention's arguments with need_weights=False unless given.

    Its default need_weights=True would form attention weights outside SDPA, over this
    rank's keys only; an explicit True is refused by the route.
    """
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.arguments.setdefault("need_weights", False)
    return bound.args, bound.kwargs


class _ModuleRoute:
    """Forward hooks that route one module's SDPA calls to the ring while it runs."""

    def __init__(self, mesh: DeviceMesh, style: AttentionContextParallel) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.style = style
        # One entry per forward in progress; None until its mode is pushed, so that a
        # pre-hook that raised leaves nothing for the always-called exit hook to pop.
        self.active: list[RingSDPA | None] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.active.append(None)
        args = tuple(_local_input(str(i), x, self.mesh) for i, x in enumerate(args))
        kwargs = {name: _local_input(name, x, self.mesh) for name, x in kwargs.items()}
        if isinstance(module, nn.MultiheadAttention):
            args, kwargs = _multihead_arguments(module, args, kwargs)
        style = self.style
        mode = RingSDPA(self.group, style.layout, style.backend, _WHERE_STYLE, style.masks())
        mode.__enter__()
        self.active[-1] = mode
        return args, kwargs

    def exit(self, module: nn.Module, args: tuple, output: Any) -> Any:
        mode = self.active.pop() if self.active else None
        if mode is not None:
            mode.__exit__(None, None, None)
        return _local_outputs(output)


class AttentionContextParallel(ParallelStyle):
    """A ``ParallelStyle`` that runs an attention module context-parallel over a 1-D mesh.

    While the module runs, ``F.scaled_dot_product_attention`` inside it computes ring
    attention over the mesh on this rank's sequence shard; everything else in the module is
    local and unchanged. Inputs are this rank's shards (plain tensors, or DTensors sharded
    on the mesh, which are taken as their local shards); outputs are local tensors.

    Works for modules that call ``F.scaled_dot_product_attention`` (self-attention with one
    input, or q, k, v as three) and for ``nn.MultiheadAttention``, which is kept on SDPA by
    passing ``need_weights=False`` (its default; an explicit ``need_weights=True`` raises).
    Causal attention needs ``is_causal=True`` (for ``nn.MultiheadAttention`` with the causal
    ``attn_mask`` it requires alongside); other masks, ``key_padding_mask`` and dropout raise.

    Shard the inputs with the same layout, e.g. ``ringattn.shard(x, mesh, dim=1)`` for
    ``[batch, seq, dim]`` inputs, and position ids alike. For packed documents or padding,
    shard with ``ringattn.shard(x, mesh, dim=1, documents=docs)`` and run the model inside
    ``with style.use_documents(docs):``.

    Args:
        layout: how the sequence was split (batches without documents): ``"zigzag"`` (the
            default: balanced causal work) or ``"contiguous"``.
        backend: the attention backend, as for :func:`ringattn.ring_attention`.
        window: ``(left, right)`` sliding window of every call (-1 = unbounded).
        mask_mod: ``fn(b, h, q_idx, kv_idx) -> bool`` over global positions, for every call.

    Example::

        mesh = init_device_mesh("cuda", (world_size,))
        style = AttentionContextParallel()
        parallelize_module(model, mesh, {"layers.*.attn": style})
        with style.use_documents(ringattn.Documents.from_position_ids(position_ids)):
            loss = model(x_shard).sum()
    """

    # Modules already routed: a second style on one module would route its calls twice.
    _ROUTED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def __init__(
        self,
        *,
        layout: str = "zigzag",
        backend: str = "auto",
        window: tuple[int, int] | None = None,
        mask_mod: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        check_route_options(layout, backend)
        self.layout = layout
        self.backend = backend
        self._masks = Masks.checked(None, window, mask_mod, _WHERE_STYLE)
        self._documents: Any = None

    def masks(self) -> Masks:
        """The masks of the calls made now: the style's window and mask_mod, the documents."""
        return Masks(self._documents, self._masks.window, self._masks.mask_mod)

    @contextlib.contextmanager
    def use_documents(self, documents: Any) -> Iterator[None]:
        """Attend within ``documents`` (a :class:`ringattn.Documents`) inside the context.

        Inputs are then this batch's shards cut by ``ringattn.shard(x, mesh, dim=...,
        documents=documents)``; every module the style parallelized reads them.
        """
        Masks.checked(documents, None, None, _WHERE_STYLE)
        if documents is not None and self.layout != "zigzag":
            raise ValueError(
                f"{_WHERE_STYLE}: layout={self.layout!r} cannot be combined with documents; "
                "the documents fix the layout"
            )
        previous, self._documents = self._documents, documents
        try:
            yield
        finally:
            self._documents = previous

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(device_mesh, DeviceMesh):
            raise TypeError(
                f"{_WHERE_STYLE}: device_mesh must be a DeviceMesh, got "
                f"{type(device_mesh).__name__}"
            )
        if device_mesh.ndim != 1:
            raise ValueError(
                f"{_WHERE_STYLE}: device_mesh must be 1-D, got {device_mesh.ndim}-D; pass "
                "mesh['dim_name'] for the context-parallel dimension"
            )
        if isinstance(module, nn.MultiheadAttention) and (
            module.bias_k is not None or module.add_zero_attn
        ):
            raise ValueError(
                f"{_WHERE_STYLE}: nn.MultiheadAttention with add_bias_kv or add_zero_attn "
                "appends keys to every rank's shard; it cannot run context-parallel"
            )
        if module in self._ROUTED:
            raise ValueError(f"{_WHERE_STYLE}: {type(module).__name__} is parallelized already")
        route = _ModuleRoute(device_mesh, self)
        module.register_forward_pre_hook(route.enter, with_kwargs=True)
        module.register_forward_hook(route.exit, always_call=True)
        self._ROUTED.add(module)
        return module
