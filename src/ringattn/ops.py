"""The entry points as ``torch.library`` custom ops, so they run inside ``torch.compile``.

Under ``torch.compile`` (``torch.compiler.is_compiling()``), :func:`ringattn.ring_attention`
and :func:`ringattn.attention` hand their call to :func:`traced_call` instead of running it.
That records one opaque op, ``ringattn::forward``, in the graph, with the tensors as inputs
and everything else as static arguments: the process groups by their c10d names, the options
as strings, bools and floats. Nothing of the ring's Python (argument checks, the cross-rank
agreement, plans, transfers) is traced; it all runs in the op's body, on real tensors, exactly
as in eager mode. So a model compiles with ``fullgraph=True``, and the graph's guards see only
shapes, dtypes and these constants: no recompilation from step to step.

The body runs the eager entry point (the ring's autograd function, or a strategy's) with
autograd on and keeps what it built, under a handle: a one-element int64 tensor that is the
op's third output. The backward op, ``ringattn::backward``, takes the output gradient and the
handle and runs that autograd graph's backward (the ring's own backward loop). The handle's
state is dropped when its backward has run, or when the handle tensor is freed (a forward
whose backward never comes); a forward under ``no_grad`` keeps nothing.

Fake implementations give the output shapes from the inputs' (symbolic shapes included), so
``mark_dynamic`` on the sequence length compiles one graph for every length.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .kernels import accumulation_dtype

__all__ = ["group_names", "register_entry", "traceable_masks", "traced_call"]

# name -> eager function(q, k, v, mesh, causal, scale, layout, backend, strategy, *,
# documents=None, window=None) -> (out, lse) (lse None where the entry point has none).
# Filled by api.py and strategies.py.
_ENTRIES: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {}

# handle -> (inputs, output) of a forward whose backward has not run yet.
_PENDING: dict[int, tuple[tuple[Tensor, ...], Tensor]] = {}
_HANDLES = itertools.count(1)


def register_entry(name: str, fn: Callable[..., tuple[Tensor, Tensor | None]]) -> None:
    """Make ``fn`` the eager implementation that ``traced_call(name, ...)`` runs."""
    _ENTRIES[name] = fn


def group_names(mesh: object) -> str:
    """``mesh`` as c10d group names, traceable by dynamo: ``"flat"`` or ``"flat|outer|inner"``.

    ``mesh`` is None (the world), a ProcessGroup, or a 1-D or 2-D DeviceMesh. For a 2-D mesh
    the flat name is empty; the op's body finds the flat group (see :func:`_mesh_from_names`).
    """
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is None:
        return dist.group.WORLD.group_name  # type: ignore[union-attr]
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim == 2:
            return "|" + mesh.get_group(0).group_name + "|" + mesh.get_group(1).group_name
        return mesh.get_group().group_name
    return mesh.group_name  # type: ignore[union-attr]


def _mesh_from_names(names: str) -> dist.ProcessGroup | comm.SequenceMesh:
    resolve = dist.distributed_c10d._resolve_process_group
    if "|" not in names:
        return resolve(names)
    _, outer_name, inner_name = names.split("|")
    outer, inner = resolve(outer_name), resolve(inner_name)
    for known in comm._MESHES.values():
        if known.outer is outer and known.inner is inner:
            return known
    if dist.get_world_size(outer) * dist.get_world_size(inner) == dist.get_world_size():
        # A mesh over every rank, ascending row-major (resolve_mesh's rule): the world.
        return comm.SequenceMesh(dist.group.WORLD, outer, inner)  # type: ignore[arg-type]
    raise ValueError(
        "mesh: under torch.compile a 2-D mesh over part of the world must have been used once "
        "outside torch.compile (ringattn.shard(x, mesh) does), so its flattened group exists"
    )


def _lse_like(q: Tensor) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    """Autograd on inside a custom op's body.

    PyTorch runs a custom op's implementation below the autograd dispatch key (excluded for
    the thread), so even with grad mode on, ops there would record nothing (only Python
    autograd functions would); the body builds the entry point's autograd graph, so it
    turns the key back on for the duration.
    """
    key = torch._C.DispatchKey.AutogradFunctionality
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)


def _forget(handle: int) -> None:
    _PENDING.pop(handle, None)


def traceable_masks(documents: Any, window: Any, mask_mod: Any) -> bool:
    """Whether a call's masks let it be one op in a compiled graph: no mask function,
    documents (if any) a :class:`ringattn.Documents`, a window (if any) a pair of ints (no
    masks at all qualify). Anything else runs eagerly, where the argument checks name what
    is wrong."""
    from .masks import Documents

    if mask_mod is not None or not (documents is None or isinstance(documents, Documents)):
        return False
    return window is None or (
        isinstance(window, tuple)
        and len(window) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    )


def _mask_text(documents: Any, window: Any) -> str:
    """The static part of a call's masks, as the op's string argument: ``"docs=shared"`` or
    ``"docs=rows"`` (the document ids travel as a tensor input) and ``"window=L,R"``."""
    parts = []
    if documents is not None:
        parts.append("docs=" + ("shared" if documents.batch_size is None else "rows"))
    if window is not None:
        parts.append(f"window={window[0]},{window[1]}")
    return ";".join(parts)


# The Documents rebuilt from an op's document ids, by the ids tensor (kept while it lives
# and is not modified): one rebuild per batch, not per layer.
_DOCUMENTS: dict[int, tuple[weakref.ref, int, Any]] = {}


def _mask_arguments(doc_ids: Tensor | None, masks: str) -> dict[str, Any]:
    """``documents``/``window`` keyword arguments of the entry point from the op's inputs."""
    from .masks import Documents

    found: dict[str, Any] = {}
    for part in filter(None, masks.split(";")):
        name, _, value = part.partition("=")
        if name == "window":
            left, right = value.split(",")
            found["window"] = (int(left), int(right))
        elif name == "docs" and doc_ids is not None:
            memo = _DOCUMENTS.get(id(doc_ids))
            if memo is not None and memo[0]() is doc_ids and memo[1] == doc_ids._version:
                found["documents"] = memo[2]
                continue
            if len(_DOCUMENTS) >= 64:
                _DOCUMENTS.clear()
            documents = Documents(doc_ids.detach().cpu(), shared=value == "shared")
            _DOCUMENTS[id(doc_ids)] = (weakref.ref(doc_ids), doc_ids._version, documents)
            found["documents"] = documents
    return found


@torch.library.custom_op("ringattn::forward", mutates_args=())
def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    doc_ids: Tensor | None,
    entry: str,
    mesh: str,
    causal: bool,
    scale: float | None,
    layout: str,
    backend: str,
    strategy: str,
    masks: str,
    needs_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _ENTRIES[entry]
    group = _mesh_from_names(mesh)
    handle = torch.zeros((), dtype=torch.int64)
    extra = _mask_arguments(doc_ids, masks)
    with _recording():
        inputs = tuple(x.detach().requires_grad_(needs_grad) for x in (q, k, v))
        out, lse = fn(*inputs, group, causal, scale, layout, backend, strategy, **extra)
    if lse is None:
        lse = _lse_like(q).new_empty(0)
    if needs_grad and out.requires_grad:
        number = next(_HANDLES)
        handle.fill_(number)
        _PENDING[number] = (inputs, out)
        # A forward whose backward never runs (evaluation with gradients on) must not keep
        # its graph: the state goes with the handle tensor.
        weakref.finalize(handle, _forget, number)
    # Outputs are contiguous whatever the kernel wrote, as the fake implementation says,
    # and new memory (a custom op's outputs may not alias its inputs).
    out, lse = out.detach().contiguous(), lse.detach().contiguous()
    if out.untyped_storage().data_ptr() in {x.untyped_storage().data_ptr() for x in (q, k, v)}:
        out = out.clone()
    return out, lse, handle


@_forward.register_fake
def _(q, k, v, doc_ids, entry, mesh, causal, scale, layout, backend, strategy, masks, needs_grad):
    lse = _lse_like(q) if entry == "ring" else q.new_empty(0, dtype=accumulation_dtype(q.dtype))
    return q.new_empty(q.shape), lse, torch.empty((), dtype=torch.int64)


@torch.library.custom_op("ringattn::backward", mutates_args=())
def _backward(
    dout: Tensor, handle: Tensor, q: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    number = int(handle.item())
    state = _PENDING.pop(number, None)
    if state is None:
        raise RuntimeError(
            "ringattn: this backward's forward state is gone; a compiled ring attention "
            "supports one backward per forward (retain_graph=True is not supported)"
        )
    inputs, out = state
    grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    taken = {x.untyped_storage().data_ptr() for x in (dout, q, k, v)}
    results = []
    for g, x in zip(grads, (q, k, v)):
        g = g.contiguous() if g is not None else x.new_zeros(x.shape)
        if g.untyped_storage().data_ptr() in taken:
            g = g.clone()  # a custom op's outputs may not alias its inputs (or each other)
        taken.add(g.untyped_storage().data_ptr())
        results.append(g)
    return tuple(results)  # type: ignore[return-value]


@_backward.register_fake
def _(dout, handle, q, k, v):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    # The body's autograd graph holds q, k, v and the outputs (the same memory); saving them
    # here too makes them outputs of the compiled forward, so the compiler never reuses
    # their buffers for other tensors before the backward has run.
    q, k, v = inputs[:3]
    ctx.save_for_backward(output[2], q, k, v, output[0], output[1])


def _autograd_backward(ctx: Any, dout: Tensor, _dlse: Tensor, _dhandle: Tensor):
    handle, q, k, v, _, _ = ctx.saved_tensors
    dq, dk, dv = _backward(dout.contiguous(), handle, q, k, v)
    return dq, dk, dv, *([None] * 10)


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def traced_call(
    entry: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: object,
    causal: bool,
    scale: float | None,
    layout: str,
    backend: str,
    strategy: str = "",
    documents: Any = None,
    window: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of an entry point as one custom op (what dynamo records in a graph).

    ``lse`` is empty for entry points that have none. ``documents`` (a
    :class:`ringattn.Documents`) travel as their document-id tensor, a graph input, so a new
    batch's documents of the same length compile nothing new; ``window`` is static.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out, lse, _ = _forward(
        q,
        k,
        v,
        documents.doc_ids if documents is not None else None,
        entry,
        group_names(mesh),
        causal,
        None if scale is None else float(scale),
        layout,
        backend,
        strategy,
        _mask_text(documents, window),
        needs_grad,
    )
    return out, lse
