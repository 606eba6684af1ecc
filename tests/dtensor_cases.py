"""Per-rank workers for the DTensor route and the ParallelStyle (importable by spawned ranks).

Every worker computes in float64 and compares against ``ringattn.reference.attention`` (or
the same module run on the full sequence in one process) on the full tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.overrides import _get_current_function_mode_stack

import ringattn
from ringattn.reference import attention

from cases import caught


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach() - want).abs().max() / want.abs().max())


def _full_inputs(batch: int, heads: int, kv_heads: int, seq: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, seq, 8), (batch, kv_heads, seq, 8), (batch, kv_heads, seq, 8)]
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes + [shapes[0]]]


def _reference(q, k, v, dout, causal: bool, scale: float | None) -> dict[str, torch.Tensor]:
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = attention(q, k, v, causal=causal, scale=scale)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _dtensor_errors(
    mesh: DeviceMesh, placements: list, layout: str, causal: bool, heads: tuple[int, int]
) -> dict[str, float]:
    """SDPA on DTensors inside attention_context_parallel, against the float64 reference."""
    q, k, v, dout = _full_inputs(2, heads[0], heads[1], 16, seed=len(placements) + causal)
    want = _reference(q, k, v, dout, causal, scale=0.3)
    if layout == "contiguous":
        inputs = [distribute_tensor(x, mesh, placements) for x in (q, k, v, dout)]

        def local_of(x: DTensor) -> torch.Tensor:
            return x.full_tensor()

        def expected(x: torch.Tensor) -> torch.Tensor:
            return x
    else:  # this rank's zigzag shard, seen as a sequence-sharded DTensor
        inputs = [
            DTensor.from_local(ringattn.shard(x, mesh), mesh, placements, run_check=False)
            for x in (q, k, v, dout)
        ]

        def local_of(x: DTensor) -> torch.Tensor:
            return x.to_local()

        def expected(x: torch.Tensor) -> torch.Tensor:
            return ringattn.shard(x, mesh)

    dq, dk, dv, ddout = inputs
    dq, dk, dv = (x.detach().requires_grad_() for x in (dq, dk, dv))
    with ringattn.attention_context_parallel(layout=layout):
        out = F.scaled_dot_product_attention(
            dq, dk, dv, is_causal=causal, scale=0.3, enable_gqa=heads[0] != heads[1]
        )
    assert isinstance(out, DTensor) and tuple(out.placements) == tuple(placements)
    out.backward(ddout)
    got = {"out": out, "dq": dq.grad, "dk": dk.grad, "dv": dv.grad}
    return {n: _err(local_of(x), expected(want[n])) for n, x in got.items()}


def run_dtensor_sdpa(rank: int, world: int) -> dict:
    """Forward and gradients on 1-D meshes (both layouts) and, on 4 ranks, 2-D meshes."""
    found: dict = {}
    mesh = init_device_mesh("cpu", (world,))
    for layout in ("contiguous", "zigzag"):
        for causal in (True, False):
            for heads in ((4, 4), (4, 2)):
                name = f"1d-{layout}-{'causal' if causal else 'full'}-h{heads[0]}kv{heads[1]}"
                found[name] = _dtensor_errors(mesh, [Shard(2)], layout, causal, heads)
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "seq"))
        for placements, label in (
            ([Shard(0), Shard(2)], "batch"),
            ([Shard(1), Shard(2)], "heads"),
            ([Replicate(), Shard(2)], "replicated"),
            ([Shard(2), Shard(0)], "seq-outer"),
        ):
            found[f"2d-{label}"] = _dtensor_errors(mesh2, placements, "contiguous", True, (4, 2))
    return found


def run_dtensor_errors(rank: int, world: int) -> dict:
    """Inputs the DTensor route cannot take, dispatch state after errors, and pass-through."""
    from torch.distributed.tensor import DTensor as DT

    found: dict = {}
    mesh = init_device_mesh("cpu", (world,))
    q, k, v, _ = _full_inputs(1, 4, 4, 8 * world, seed=5)
    dq, dk, dv = (distribute_tensor(x, mesh, [Shard(2)]) for x in (q, k, v))
    rq = distribute_tensor(q, mesh, [Replicate()])
    odd = distribute_tensor(torch.randn(1, 4, 3 * world, 8, dtype=torch.float64), mesh, [Shard(2)])
    partial = DTensor.from_local(q, mesh, [Partial()], run_check=False)
    sdpa = F.scaled_dot_product_attention
    cases: dict[str, Callable[[], object]] = {
        "attn_mask": lambda: sdpa(dq, dk, dv, attn_mask=torch.ones(8, 8, dtype=torch.bool)),
        "dropout": lambda: sdpa(dq, dk, dv, dropout_p=0.5),
        "plain_key": lambda: sdpa(dq, k, dv),
        "plain_query": lambda: sdpa(q, dk, dv),
        "placements": lambda: sdpa(dq, rq, dv),
        "partial": lambda: sdpa(partial, partial, partial),
        "odd_length": lambda: sdpa(odd, odd, odd),
        "body_raises": lambda: (_ for _ in ()).throw(KeyError("from the body")),
    }
    modes = list(_get_current_function_mode_stack())
    handlers = DT._op_dispatcher._custom_op_handlers
    handler_items = dict(handlers)
    for name, body in cases.items():
        layout = "zigzag" if name == "odd_length" else "contiguous"
        with_context = lambda body=body, layout=layout: _in_context(body, layout)  # noqa: E731
        found[name] = caught(with_context)
        found[f"{name}_state"] = (
            list(_get_current_function_mode_stack()) == modes
            and DT._op_dispatcher._custom_op_handlers is handlers
            and dict(handlers) == handler_items
        )
    found["bad_layout"] = caught(lambda: _in_context(lambda: None, "diagonal"))
    found["bad_mesh"] = caught(lambda: ringattn.attention_context_parallel("mesh").__enter__())
    for name in ("bad_layout", "bad_mesh"):
        found[f"{name}_state"] = list(_get_current_function_mode_stack()) == modes
    # Plain tensors inside the context, and DTensors whose sequence is whole, run as usual.
    with ringattn.attention_context_parallel():
        plain = sdpa(q, k, v, is_causal=True)
        replicated = sdpa(rq, rq, rq, is_causal=True)
    found["plain"] = _err(plain, attention(q, k, v, causal=True))
    found["replicated"] = _err(replicated.full_tensor(), attention(q, q, q, causal=True))
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "seq"))
        x2 = distribute_tensor(q, mesh2, [Replicate(), Shard(2)])
        twice = distribute_tensor(q, mesh2, [Shard(2), Shard(2)])
        found["other_mesh"] = caught(
            lambda: _in_context(lambda: sdpa(x2, x2, x2), "contiguous", mesh2["outer"])
        )
        found["sub_mesh"] = _err(
            _in_context(lambda: sdpa(x2, x2, x2), "contiguous", mesh2["seq"]).full_tensor(),
            attention(q, q, q),
        )
        found["seq_twice"] = caught(lambda: _in_context(lambda: sdpa(twice, twice, twice)))
    return found


def _in_context(body: Callable[[], object], layout: str = "contiguous", mesh=None) -> object:
    with ringattn.attention_context_parallel(mesh, layout=layout):
        return body()


class SelfAttention(nn.Module):
    """Self-attention on ``[batch, seq, dim]`` with one input, calling SDPA (causal)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a.transpose(1, 2).reshape(b, s, d)


class GroupedAttention(nn.Module):
    """q, k, v as three inputs ``[batch, seq, dim]``, grouped K/V heads, full attention."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, dtype=torch.float64)
        # No key bias: it has no effect on attention, so its gradient is zero.
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False, dtype=torch.float64)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, dtype=torch.float64)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, s, d = q.shape

        def heads(x: torch.Tensor, n: int) -> torch.Tensor:
            return x.view(b, s, n, self.head_dim).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            heads(self.q(q), self.heads),
            heads(self.k(k), self.kv_heads),
            heads(self.v(v), self.kv_heads),
            enable_gqa=True,
        )
        return a.transpose(1, 2).reshape(b, s, d)


def _causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)  # True: not allowed


# name -> (module factory, sequence dim of its inputs, number of inputs, call kwargs
# as functions of the local sequence length)
STYLE_CASES: dict[str, tuple[Callable[[], nn.Module], int, int, Callable[[int], dict]]] = {
    "self_attention": (lambda: SelfAttention(16, 4), 1, 1, lambda n: {}),
    "qkv_gqa": (lambda: GroupedAttention(16, 4, 2), 1, 3, lambda n: {}),
    "mha_batch_first_causal": (
        lambda: nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64),
        1,
        3,
        lambda n: {"attn_mask": _causal_mask(n), "is_causal": True, "need_weights": False},
    ),
    "mha_seq_first_default_weights": (
        lambda: nn.MultiheadAttention(16, 4, dtype=torch.float64),
        0,
        3,
        lambda n: {},
    ),
}


def _style_errors(
    rank: int, world: int, name: str, dtensor_inputs: bool = False, checkpointed: bool = False
) -> dict[str, float]:
    factory, seq_dim, n_inputs, call_kwargs = STYLE_CASES[name]
    mesh = init_device_mesh("cpu", (world,))
    seq = 8 * world
    g = torch.Generator().manual_seed(11)
    shape = (seq, 2, 16) if seq_dim == 0 else (2, seq, 16)
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_inputs)]
    dout = torch.randn(shape, generator=g, dtype=torch.float64)

    torch.manual_seed(0)
    single = factory()
    torch.manual_seed(0)
    module = parallelize_module(factory(), mesh, ringattn.AttentionContextParallel())

    full = [x.clone().requires_grad_() for x in inputs]
    want = single(*full, **call_kwargs(seq))
    want = want[0] if isinstance(want, tuple) else want
    want.backward(dout)

    def local(x: torch.Tensor) -> torch.Tensor:
        return ringattn.shard(x, mesh, dim=seq_dim)

    shards = [local(x).detach().requires_grad_() for x in inputs]
    args = shards
    if dtensor_inputs:
        args = [DTensor.from_local(x, mesh, [Shard(seq_dim)], run_check=False) for x in shards]
    if checkpointed:  # the backward recomputes the module's forward, SDPA included
        got = torch.utils.checkpoint.checkpoint(
            module, *args, use_reentrant=False, **call_kwargs(seq // world)
        )
    else:
        got = module(*args, **call_kwargs(seq // world))
    weights = None
    if isinstance(got, tuple):
        got, weights = got
    assert weights is None, "attention weights came back"
    assert type(got) is torch.Tensor, f"output is a {type(got).__name__}"
    got.backward(local(dout))
    errors = {"out": _err(got, local(want.detach()))}
    for i, (x, ref) in enumerate(zip(shards, full)):
        errors[f"d_input{i}"] = _err(x.grad, local(ref.grad))
    for pname, p in module.named_parameters():
        grad = p.grad.clone()
        torch.distributed.all_reduce(grad)  # each rank holds its tokens' share
        errors[f"d_{pname}"] = _err(grad, dict(single.named_parameters())[pname].grad)
    return errors


def run_style_checks(rank: int, world: int) -> dict:
    """AttentionContextParallel on each kind of module, then the inputs it must refuse."""
    found: dict = {}
    for name in STYLE_CASES:
        found[name] = _style_errors(rank, world, name)
    found["dtensor_inputs"] = _style_errors(rank, world, "mha_batch_first_causal", True)
    found["checkpointed"] = _style_errors(rank, world, "self_attention", checkpointed=True)

    mesh = init_device_mesh("cpu", (world,))
    modes = list(_get_current_function_mode_stack())
    torch.manual_seed(0)
    mha = parallelize_module(
        nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64),
        mesh,
        ringattn.AttentionContextParallel(),
    )
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    cases: dict[str, Callable[[], object]] = {
        "key_padding_mask": lambda: mha(x, x, x, key_padding_mask=torch.zeros(2, 8).bool()),
        "need_weights": lambda: mha(x, x, x, need_weights=True),
        "need_weights_positional": lambda: mha(x, x, x, None, True),
        "attn_mask": lambda: mha(x, x, x, attn_mask=_causal_mask(8)),
        "replicated_input": lambda: mha(
            *[DTensor.from_local(x, mesh, [Replicate()], run_check=False)] * 3
        ),
        "twice": lambda: parallelize_module(mha, mesh, ringattn.AttentionContextParallel()),
        "bias_kv": lambda: parallelize_module(
            nn.MultiheadAttention(16, 4, add_bias_kv=True),
            mesh,
            ringattn.AttentionContextParallel(),
        ),
        "mesh_2d": lambda: parallelize_module(
            SelfAttention(16, 4),
            init_device_mesh("cpu", (1, world)),
            ringattn.AttentionContextParallel(),
        ),
        "bad_layout": lambda: ringattn.AttentionContextParallel(layout="diagonal"),
    }
    for name, body in cases.items():
        found[name] = caught(body)
        found[f"{name}_state"] = list(_get_current_function_mode_stack()) == modes
    # Inference: eval mode without autograd (where nn.MultiheadAttention has a fast path
    # that bypasses SDPA) still runs the ring.
    torch.manual_seed(0)
    single = nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64).eval()
    full = torch.randn(2, 8 * world, 16, dtype=torch.float64)
    with torch.no_grad():
        want, _ = single(full, full, full, need_weights=False)
        local = ringattn.shard(full, mesh, dim=1)
        got, _ = mha.eval()(local, local, local)
    found["inference"] = _err(got, ringattn.shard(want, mesh, dim=1))
    mha.train()
    # The module still works after the errors: causal, on this rank's shard of one sequence,
    # against the unparallelized module on all of it.
    with torch.no_grad():
        want, _ = single.train()(
            full, full, full, attn_mask=_causal_mask(8 * world), is_causal=True, need_weights=False
        )
    out, _ = mha(local, local, local, attn_mask=_causal_mask(8), is_causal=True)
    found["after_errors"] = _err(out, ringattn.shard(want, mesh, dim=1))
    # SDPA outside the module is untouched: causal attention on inputs that differ between
    # ranks, which a route left on would mix across them.
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    got = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    found["outside"] = _err(got, attention(q, q, q, causal=True))
    return found
