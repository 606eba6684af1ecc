"""Test cases and the per-rank workers that run them (importable by spawned ranks)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
from torch.overrides import _get_current_function_mode_stack

import ringattn
from ringattn import comm


def caught(body) -> tuple[str, str]:
    """``(exception type name, message)`` of what ``body()`` raised, or ``("no error", "")``."""
    try:
        body()
    except Exception as err:  # noqa: BLE001 - the test inspects it
        return type(err).__name__, str(err)
    return "no error", ""


DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    seed: int
    world: int
    batch: int
    heads: int
    kv_heads: int
    local_len: int
    head_dim: int
    causal: bool
    layout: str
    backend: str
    dtype: str
    scale: float | None

    @property
    def id(self) -> str:
        c = self
        return (
            f"w{c.world}-{c.dtype}-{c.backend}-{c.layout}-{'causal' if c.causal else 'full'}"
            f"-b{c.batch}h{c.heads}kv{c.kv_heads}s{c.local_len}d{c.head_dim}"
            f"{'-scale' if c.scale else ''}-{c.seed}"
        )

    def full_inputs(self) -> tuple[torch.Tensor, ...]:
        """q, k, v and the output gradient on the full sequence, in float64."""
        g = torch.Generator().manual_seed(self.seed)
        total = self.local_len * self.world
        shape_q = (self.batch, self.heads, total, self.head_dim)
        shape_kv = (self.batch, self.kv_heads, total, self.head_dim)
        return tuple(
            torch.randn(shape, generator=g, dtype=torch.float64)
            for shape in (shape_q, shape_kv, shape_kv, shape_q)
        )


def random_cases(world: int, count: int, seed: int) -> list[Case]:
    """Random small shapes covering causal/full, both layouts, GQA, batch, odd head dims."""
    rng = random.Random(seed)
    cases = []
    combos = [(c, lay) for c in (True, False) for lay in ("zigzag", "contiguous")]
    dtype_backends = [
        ("float64", "math"),
        ("float64", "cpu"),
        ("float32", "cpu"),
        ("float32", "math"),
        ("float64", "auto"),
    ]
    for i in range(count):
        causal, layout = combos[i % len(combos)]
        dtype, backend = dtype_backends[(i // len(combos)) % len(dtype_backends)]
        kv_heads = rng.choice([1, 2, 3])
        cases.append(
            Case(
                seed=seed * 1000 + i,
                world=world,
                batch=rng.choice([1, 2]),
                heads=kv_heads * rng.choice([1, 2]),
                kv_heads=kv_heads,
                local_len=2 * rng.randint(1, 6),
                head_dim=rng.choice([4, 7, 8, 13, 16, 33]),
                causal=causal,
                layout=layout,
                backend=backend,
                dtype=dtype,
                scale=rng.choice([None, 0.3]),
            )
        )
    return cases


def bf16_cases(world: int) -> list[Case]:
    return [
        Case(
            seed=90 + world * 10 + j,
            world=world,
            batch=1,
            heads=4,
            kv_heads=kv,
            local_len=32,
            head_dim=16,
            causal=causal,
            layout=layout,
            backend="cpu",
            dtype="bfloat16",
            scale=None,
        )
        for j, (causal, layout, kv) in enumerate(
            [(True, "zigzag", 2), (True, "contiguous", 4), (False, "zigzag", 1)]
        )
    ]


def run_case(case: Case, rank: int, world: int) -> dict | None:
    """Run one case on this rank; rank 0 returns the reassembled results in float64."""
    dtype = DTYPES[case.dtype]
    q, k, v, dout = (ringattn.shard(x, layout=case.layout).to(dtype) for x in case.full_inputs())
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out, lse = ringattn.ring_attention(
        q,
        k,
        v,
        causal=case.causal,
        scale=case.scale,
        layout=case.layout,
        backend=case.backend,
        return_lse=True,
    )
    out.backward(dout)
    tensors = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    full = {
        name: ringattn.unshard(t, layout=case.layout).to(torch.float64)
        for name, t in tensors.items()
    }
    shapes_ok = (
        out.shape == q.shape
        and lse.shape == q.shape[:3]
        and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    return {**full, "shapes_ok": shapes_ok, "out_dtype": str(out.dtype)} if rank == 0 else None


def run_cases(rank: int, world: int, cases: list[dict]) -> list[dict | None]:
    return [run_case(Case(**c), rank, world) for c in cases]


def case_dicts(cases: list[Case]) -> list[dict]:
    return [asdict(c) for c in cases]


# ----------------------------------------------------------------------------- errors


def _good(rank: int, world: int, length: int = 4) -> dict:
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, length, 8, generator=g)
    k = torch.randn(1, 2, length, 8, generator=g)
    return {"q": q, "k": k, "v": k.clone()}


def _scenario(name: str, rank: int, world: int) -> dict:
    """Arguments for ring_attention in the named bad-input scenario, on this rank."""
    a = _good(rank, world)
    q, k, v = a["q"], a["k"], a["v"]
    if name == "q_not_tensor":
        a["q"] = q.tolist()
    elif name == "q_3d":
        a["q"] = q[0]
    elif name == "k_dtype":
        a["k"] = k.double()
    elif name == "v_shape":
        a["v"] = v[:, :, :2]
    elif name == "head_dim":
        a["k"] = torch.randn(1, 2, 4, 6)
        a["v"] = torch.randn(1, 2, 4, 6)
    elif name == "gqa_heads":
        a["k"] = torch.randn(1, 3, 4, 8)
        a["v"] = torch.randn(1, 3, 4, 8)
    elif name == "causal_lengths":
        a["k"] = torch.randn(1, 2, 6, 8)
        a["v"] = torch.randn(1, 2, 6, 8)
        a["causal"] = True
    elif name == "zigzag_odd":
        a = _good(rank, world, length=5)
        a["layout"] = "zigzag"
    elif name == "bad_layout":
        a["layout"] = "striped"
    elif name == "bad_backend":
        a["backend"] = "triton"
    elif name == "backend_cannot":
        a["backend"] = "flash"  # CUDA-only, inputs are on the CPU
    elif name == "causal_not_bool":
        a["causal"] = "yes"
    elif name == "scale_nan":
        a["scale"] = float("nan")
    elif name == "int_dtype":
        a["q"] = torch.ones(1, 4, 4, 8, dtype=torch.int64)
    elif name == "one_rank_gqa":
        if rank == world - 1:
            a["k"] = torch.randn(1, 3, 4, 8)
            a["v"] = torch.randn(1, 3, 4, 8)
    elif name == "lengths_differ":
        if rank == world - 1:
            a = _good(rank, world, length=6)
    elif name == "causal_differs":
        a["causal"] = rank == 0
    elif name == "scale_differs":
        a["scale"] = 0.1 * (rank + 1)
    else:
        raise KeyError(name)
    return a


# scenario -> (exception raised on the rank(s) at fault, text that message must contain)
SCENARIOS: dict[str, tuple[str, str]] = {
    "q_not_tensor": ("TypeError", "q must be a torch.Tensor"),
    "q_3d": ("ValueError", "q must be 4-D"),
    "k_dtype": ("TypeError", "k.dtype must equal q.dtype"),
    "v_shape": ("ValueError", "v must match k"),
    "head_dim": ("ValueError", "k.shape[3] (head dim)"),
    "gqa_heads": ("ValueError", "multiple of k's heads"),
    "causal_lengths": ("ValueError", "causal=True needs as many local keys"),
    "zigzag_odd": ("ValueError", "q.shape[2] must be even"),
    "bad_layout": ("ValueError", "layout must be one of"),
    "bad_backend": ("ValueError", "backend must be one of"),
    "backend_cannot": ("ValueError", "flash needs CUDA tensors"),
    "causal_not_bool": ("TypeError", "causal must be a bool"),
    "scale_nan": ("ValueError", "scale must be finite"),
    "int_dtype": ("TypeError", "q must be floating point"),
    "one_rank_gqa": ("ValueError", "multiple of k's heads"),
    "lengths_differ": ("ValueError", "same q.shape[2] (local queries)"),
    "causal_differs": ("ValueError", "same causal"),
    "scale_differs": ("ValueError", "same scale"),
}


def run_error_scenarios(rank: int, world: int, names: list[str]) -> dict:
    """Each scenario's outcome on this rank, with how many ring shifts it started."""
    shifts = []
    original = comm.Ring.shift

    def counting_shift(self, send, recv, **kwargs):
        shifts.append(1)
        return original(self, send, recv, **kwargs)

    comm.Ring.shift = counting_shift  # type: ignore[method-assign]
    outcomes = {}
    for name in names:
        before = len(shifts)
        kwargs = _scenario(name, rank, world)
        try:
            ringattn.ring_attention(**kwargs)
            outcomes[name] = ("no error", "", len(shifts) - before)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcomes[name] = (type(err).__name__, str(err), len(shifts) - before)
    # The group must still work after all of that: a valid call right after.
    a = _good(rank, world)
    out = ringattn.ring_attention(a["q"], a["k"], a["v"], causal=True, layout="contiguous")
    full = ringattn.unshard(out, layout="contiguous")
    g = torch.Generator().manual_seed(7)
    q1 = torch.randn(1, 4, 4, 8, generator=g)
    k1 = torch.randn(1, 2, 4, 8, generator=g)
    # Every rank used the same q, k, v, so the full sequence is them repeated world times.
    qf, kf = q1.repeat(1, 1, world, 1), k1.repeat(1, 1, world, 1)
    ref = ringattn.reference.attention(qf.double(), kf.double(), kf.double(), causal=True)
    outcomes["after_errors_max_err"] = float((full.double() - ref).abs().max())
    outcomes["after_errors_shifts"] = len(shifts)
    comm.Ring.shift = original  # type: ignore[method-assign]
    return outcomes


# ----------------------------------------------------------------------------- check modes


def run_check_modes(rank: int, world: int) -> dict:
    """How often each mode runs the cross-rank check, and what a lone change gives."""
    from ringattn import checks

    calls = []
    original = checks._agree_across_ranks

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    checks._agree_across_ranks = counting
    found: dict = {}
    try:
        g = torch.Generator().manual_seed(3)
        q, k = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
        ringattn.set_cross_rank_check("once")
        for _ in range(3):
            ringattn.ring_attention(q, k, k, causal=True)
        found["once_repeated"] = len(calls)
        # Every rank changes shape together: one more check, and a correct result.
        q2, k2 = q.repeat(1, 1, 2, 1), k.repeat(1, 1, 2, 1)
        out = ringattn.ring_attention(q2, k2, k2, causal=True)
        found["once_all_changed"] = len(calls)
        full = ringattn.unshard(out)
        qf = ringattn.unshard(q2)
        kf = ringattn.unshard(k2)
        ref = ringattn.reference.attention(qf.double(), kf.double(), kf.double(), causal=True)
        found["once_result_err"] = float((full.double() - ref).abs().max())
        ringattn.set_cross_rank_check("always")
        before = len(calls)
        ringattn.ring_attention(q, k, k, causal=True)
        ringattn.ring_attention(q, k, k, causal=True)
        found["always_calls"] = len(calls) - before
        # After agreed calls, one rank alone passes another length: every rank raises.
        lone = q2 if rank == world - 1 else q
        lone_k = k2 if rank == world - 1 else k
        try:
            ringattn.ring_attention(lone, lone_k, lone_k, causal=True)
            found["always_lone_change"] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test inspects it
            found["always_lone_change"] = (type(err).__name__, str(err))
        # CUDA graphs apply to CUDA tensors only: CPU calls run the eager ring, unchanged.
        ringattn.set_cross_rank_check("once")
        eager = ringattn.ring_attention(q, k, k, causal=True)
        ringattn.set_cuda_graphs(True)
        try:
            found["graphs_cpu_equal"] = torch.equal(
                ringattn.ring_attention(q, k, k, causal=True), eager
            )
        finally:
            ringattn.set_cuda_graphs("auto")
        ringattn.set_cross_rank_check("never")
        before = len(calls)
        ringattn.ring_attention(q2, k2, k2, causal=True)
        found["never_calls"] = len(calls) - before
    finally:
        ringattn.set_cross_rank_check("always")
        checks._agree_across_ranks = original
    return found


# ----------------------------------------------------------------------------- routing


def run_routing_checks(rank: int, world: int) -> dict:
    """ringattn.context_parallel: errors, restoring on exceptions, unsharding."""
    import torch.nn.functional as F

    found: dict = {}
    ids = torch.arange(2 * 8 * world).view(2, 8 * world)
    original = ids.clone()
    q = torch.randn(1, 4, 8, 16)
    kv = torch.randn(1, 2, 8, 16)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(1, 8, 16)
    cases = {
        "attn_mask": lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8)),
        "dropout": lambda: F.scaled_dot_product_attention(q, q, q, dropout_p=0.1),
        "gqa_flag": lambda: F.scaled_dot_product_attention(q, kv, kv),
        "mha_weights": lambda: mha(x, x, x),
        "body_raises": lambda: (_ for _ in ()).throw(KeyError("from the body")),
    }
    modes = list(_get_current_function_mode_stack())
    for name, body in cases.items():
        try:
            with ringattn.context_parallel(None, [ids], [1]):
                found[f"{name}_sharded_len"] = ids.size(1)
                body()
            found[name] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test inspects it
            found[name] = (type(err).__name__, str(err))
        found[f"{name}_restored"] = torch.equal(ids, original) and (
            list(_get_current_function_mode_stack()) == modes
        )
    # Full (non-causal) and causal attention under the default (zigzag) layout, forward and
    # gradients, against float64 attention on the whole sequence.
    g = torch.Generator().manual_seed(3)
    full_q, full_k, full_v, full_dout = (
        torch.randn(1, 4, 8 * world, 16, generator=g, dtype=torch.float64) for _ in range(4)
    )
    for causal in (False, True):
        q_, k_, v_, dout_ = (x.clone() for x in (full_q, full_k, full_v, full_dout))
        with ringattn.context_parallel(None, [q_, k_, v_, dout_], [2, 2, 2, 2]):
            leaves = [x.clone().requires_grad_() for x in (q_, k_, v_)]
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
            out.backward(dout_)
            got = [out.detach(), *(x.grad for x in leaves)]
            got = ringattn.context_parallel_unshard(None, got, [2, 2, 2, 2])
        ref_leaves = [x.clone().requires_grad_() for x in (full_q, full_k, full_v)]
        ref = ringattn.reference.attention(*ref_leaves, causal=causal)
        ref.backward(full_dout)
        want = [ref.detach(), *(x.grad for x in ref_leaves)]
        found[f"numerics_causal={causal}"] = max(
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want)
        )
    # A length the layout cannot split: nothing is changed.
    odd = torch.arange(2 * 7 * world).view(2, 7 * world)
    try:
        with ringattn.context_parallel(None, [odd], [1]):
            pass
    except ValueError as err:
        found["odd"] = str(err)
    found["odd_unchanged"] = odd.size(1) == 7 * world
    # Unsharding what the context sharded gives the full tensor back, in order.
    with ringattn.context_parallel(None, [ids], [1], restore=False):
        pass
    found["unsharded"] = torch.equal(
        ringattn.context_parallel_unshard(None, [ids], [1])[0], original
    )
    return found
