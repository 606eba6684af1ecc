"""Masked attention cases (documents, windows, mask functions) run inside spawned ranks.

The reference is written here, apart from the library: the mask is built position by
position from the case's segments (documents and padding), causal flag, window and mask
function, and attention is a plain float64 softmax over it whose fully masked rows give 0.
"""

from __future__ import annotations

import math
import random

import torch

import ringattn

# Mask functions over global positions, by name (the cases travel to the ranks by name).
PREFIX = 5


def prefix_lm(b, h, q, kv):
    return (kv < PREFIX) | (kv <= q)


def odd_heads_skip(b, h, q, kv):
    return (h % 2 == 0) | ((q + kv) % 3 != 0)


def first_row_only_gap(b, h, q, kv):
    return (b == 1) | (q - kv != 1)


BLOCK_OF = torch.arange(4096) // 7  # a captured tensor, indexed as FlexAttention users do


def same_block_of_7(b, h, q, kv):
    return BLOCK_OF[q] == BLOCK_OF[kv]


MASK_MODS = {
    "prefix_lm": prefix_lm,
    "odd_heads": odd_heads_skip,
    "batch_gap": first_row_only_gap,
    "block7": same_block_of_7,
}


def _mask_mod_ref(name: str, b: int, h: int, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    if name == "prefix_lm":
        return (j < PREFIX) | (j <= i)
    if name == "odd_heads":
        return torch.full_like(i + j, h % 2 == 0, dtype=torch.bool) | ((i + j) % 3 != 0)
    if name == "block7":
        return (i // 7) == (j // 7)
    assert name == "batch_gap"
    return torch.full_like(i + j, b == 1, dtype=torch.bool) | (i - j != 1)


# --------------------------------------------------------------------------- reference


def doc_ids(segments: list[tuple[int, bool]]) -> list[int]:
    """Per position: the index of its segment, or -1 for padding."""
    ids: list[int] = []
    for idx, (n, pad) in enumerate(segments):
        ids += [-1 if pad else idx] * n
    return ids


def reference_mask(case: dict) -> torch.Tensor:
    """``[B, H, S, S]`` bool, position by position from the case."""
    b_, h_, s = case["batch"], case["heads"], case["seq"]
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    out = torch.zeros(b_, h_, s, s, dtype=torch.bool)
    for b in range(b_):
        rows = case["segments"]
        segs = rows[b] if isinstance(rows[0], list) else rows
        d = torch.tensor(doc_ids([tuple(x) for x in segs]))
        base = (d.view(-1, 1) == d.view(1, -1)) & (d.view(-1, 1) >= 0)
        if case["causal"]:
            base &= j <= i
        if case["window"] is not None:
            left, right = case["window"]
            if left >= 0:
                base &= j >= i - left
            if right >= 0:
                base &= j <= i + right
        for h in range(h_):
            m = base
            if case["mask_mod"]:
                m = m & _mask_mod_ref(case["mask_mod"], b, h, i, j)
            out[b, h] = m
    return out


def reference_attention(q, k, v, mask, scale):
    """float64 softmax attention under ``mask``; rows that see nothing give 0 (lse -inf)."""
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1)
    any_key = mask.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_key, 0.0), -1) * mask
    return p @ v, lse


# --------------------------------------------------------------------------- cases


def documents_of(case: dict) -> ringattn.Documents | None:
    kind, rows = case["docs"], case["segments"]
    if kind == "none":
        return None
    per_row = isinstance(rows[0], list)
    if kind == "lengths":
        if per_row:
            return ringattn.Documents.from_lengths([[n for n, _ in r] for r in rows])
        return ringattn.Documents.from_lengths([n for n, _ in rows])
    if kind == "cu_seqlens":
        cu = [0]
        for n, _ in rows:
            cu.append(cu[-1] + n)
        return ringattn.Documents.from_cu_seqlens(torch.tensor(cu))
    if kind == "position_ids":
        pos = torch.cat([torch.arange(n) for n, _ in rows if n])
        return ringattn.Documents.from_position_ids(pos)
    assert kind == "attention_mask"  # per row: padding and one or more documents
    masks, positions = [], []
    for r in rows:
        masks.append(torch.cat([torch.full((n,), 0 if pad else 1) for n, pad in r if n]))
        positions.append(torch.cat([torch.arange(n) for n, pad in r if n]))
    many = any(sum(1 for _, pad in r if not pad) > 1 for r in rows)
    mask = torch.stack(masks)
    if many:
        return ringattn.Documents.from_attention_mask(mask, position_ids=torch.stack(positions))
    return ringattn.Documents.from_attention_mask(mask)


def _random_lengths(rnd: random.Random, s: int, style: str) -> list[int]:
    if style == "one":
        return [s]
    if style == "tiny":
        out = []
        while sum(out) < s:
            out.append(min(rnd.choice([1, 1, 2, 3]), s - sum(out)))
        return out
    if style == "long":  # one document longer than a rank's shard, and 1-token ones
        first = rnd.randint(s // 2, s - 2)
        rest = [1] * (s - first - 1) + [1]
        return [first] + rest[: s - first]
    out = []
    while sum(out) < s:
        out.append(min(max(1, int(rnd.lognormvariate(1.5, 1.0))), s - sum(out)))
    rnd.shuffle(out)
    return out


def _padded_row(rnd: random.Random, s: int) -> list[tuple[int, bool]]:
    pad = rnd.randint(0, s // 3)
    body = _random_lengths(rnd, s - pad, rnd.choice(["one", "mix"])) if s - pad else []
    segs = [(n, False) for n in body]
    return [(pad, True)] + segs if rnd.random() < 0.5 else segs + [(pad, True)]


def make_cases(world: int, two_d: bool, count: int, seed: int) -> list[dict]:
    """Random cases covering every entry point, document kind, window and mask function."""
    rnd = random.Random(seed)
    entries = ["ring_attention", "attention:ring", "attention:allgather", "attention:auto"]
    entries += ["attention:ulysses"] + (["attention:hybrid"] if two_d else [])
    doc_kinds = ["lengths", "lengths", "cu_seqlens", "position_ids", "attention_mask", "none"]
    windows = [None, None, (0, 0), (1, -1), (3, 0), (2, 5), (-1, 2), (100, 100)]
    cases = []
    for n in range(count):
        entry = entries[n % len(entries)]
        kind = doc_kinds[(n // len(entries)) % len(doc_kinds)]
        chunk = rnd.choice([1, 2, 3, 4])
        s = 2 * world * chunk if kind == "none" else world * rnd.choice([2, 3, 5, 6, 8])
        batch = rnd.choice([1, 2])
        kv_heads = rnd.choice([1, 2])
        heads = kv_heads * rnd.choice([1, 2])
        if entry in ("attention:ulysses", "attention:hybrid"):
            heads = world * kv_heads if world > 1 else heads
        style = rnd.choice(["one", "tiny", "long", "mix", "mix"])
        if kind == "none":
            segments: list = [(s, False)]
        elif kind == "attention_mask":
            segments = [_padded_row(rnd, s) for _ in range(batch)]
        elif kind == "lengths" and batch == 2 and rnd.random() < 0.5:
            segments = [[(x, False) for x in _random_lengths(rnd, s, style)] for _ in range(2)]
        else:
            segments = [(x, False) for x in _random_lengths(rnd, s, style)]
        mask_mod = rnd.choice([None, None, None, "prefix_lm", "odd_heads", "batch_gap", "block7"])
        dtype, backend = rnd.choice(
            [("float64", "math"), ("float64", "math"), ("float32", "cpu"), ("float64", "cpu")]
        )
        cases.append(
            dict(
                entry=entry,
                docs=kind,
                segments=segments,
                seq=s,
                batch=batch,
                heads=heads,
                kv_heads=kv_heads,
                dim=rnd.choice([4, 8]),
                causal=rnd.random() < 0.7,
                window=rnd.choice(windows),
                mask_mod=mask_mod,
                layout=rnd.choice(["zigzag", "contiguous"]),
                dtype=dtype,
                backend=backend,
                seed=rnd.randint(0, 2**16),
            )
        )
    return cases


TOL = {"float64": 1e-10, "float32": 2e-5}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def run_case(case: dict, mesh) -> dict:
    """One case on this rank: errors of out, lse (ring_attention), dq, dk, dv."""
    dtype = getattr(torch, case["dtype"])
    g = torch.Generator().manual_seed(case["seed"])
    b, h, hk, s, d = case["batch"], case["heads"], case["kv_heads"], case["seq"], case["dim"]
    full = [
        torch.randn(b, h, s, d, generator=g, dtype=torch.float64),
        torch.randn(b, hk, s, d, generator=g, dtype=torch.float64),
        torch.randn(b, hk, s, d, generator=g, dtype=torch.float64),
        torch.randn(b, h, s, d, generator=g, dtype=torch.float64),
    ]
    full = [x.to(dtype).double() for x in full]  # the reference sees the rounded inputs
    docs = documents_of(case)
    layout = case["layout"]

    def cut(x):
        return ringattn.shard(x, mesh, documents=docs, layout=layout)

    def glue(x):
        return ringattn.unshard(x.contiguous(), mesh, documents=docs, layout=layout)

    q, k, v = (cut(x).to(dtype).requires_grad_() for x in full[:3])
    mod = MASK_MODS[case["mask_mod"]] if case["mask_mod"] else None
    kw = dict(
        causal=case["causal"],
        layout=layout,
        backend=case["backend"],
        documents=docs,
        window=case["window"],
        mask_mod=mod,
    )
    lse = None
    if case["entry"] == "ring_attention":
        out, lse = ringattn.ring_attention(q, k, v, None, return_lse=True, **kw)
    else:
        strategy = case["entry"].split(":")[1]
        out = ringattn.attention(q, k, v, mesh, strategy=strategy, **kw)
    out.backward(cut(full[3]).to(dtype))
    scale = 1.0 / math.sqrt(d)
    fq, fk, fv = (x.clone().requires_grad_() for x in full[:3])
    mask = reference_mask(case)
    ref_out, ref_lse = reference_attention(fq, fk, fv, mask, scale)
    ref_out.backward(full[3])
    errors = {
        "out": _rel(glue(out.detach()), ref_out.detach()),
        "dq": _rel(glue(q.grad), fq.grad),
        "dk": _rel(glue(k.grad), fk.grad),
        "dv": _rel(glue(v.grad), fv.grad),
    }
    if lse is not None:
        got = glue(lse.unsqueeze(-1)).squeeze(-1).double()
        empty = torch.isinf(ref_lse)
        errors["lse_empty_rows"] = 0.0 if torch.equal(torch.isinf(got) & (got < 0), empty) else 1.0
        errors["lse"] = _rel(got.masked_fill(empty, 0), ref_lse.masked_fill(empty, 0))
    return errors


def run_mask_cases(rank: int, world: int, two_d: bool, cases: list[dict]) -> list[dict]:
    mesh = None
    if two_d:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // 2, 2))
    results = []
    for case in cases:
        try:
            errors = run_case(case, mesh)
            tol = TOL[case["dtype"]]
            bad = {k: e for k, e in errors.items() if not e <= tol}
            results.append({"case": case, "errors": errors, "bad": bad})
        except Exception as err:  # noqa: BLE001 - reported to the parent
            results.append({"case": case, "errors": {}, "bad": {"raised": repr(err)[:500]}})
    results.append({"errors_check": run_bad_inputs(rank, world)})
    return results


# --------------------------------------------------------------------------- bad input


def _raises(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    except Exception as err:  # noqa: BLE001
        return f"UNEXPECTED {type(err).__name__}: {err}"
    return "no error"


def run_bad_inputs(rank: int, world: int) -> dict:
    """Each bad mask argument must raise ValueError/TypeError on every rank, and the group
    must stay usable afterwards."""
    s = 4 * world
    q = torch.randn(1, 2, s // world, 4, dtype=torch.float64)
    good = ringattn.Documents.from_lengths([s // 2, s - s // 2])

    def call(**kw):
        return ringattn.ring_attention(q, q, q, causal=True, backend="math", **kw)

    def bad_mod(b, h, qi, kv):
        raise RuntimeError("boom")

    def float_mod(b, h, qi, kv):
        return (qi >= kv).float()

    def wrong_shape_mod(b, h, qi, kv):
        return torch.ones(3, 5, dtype=torch.bool)

    mine = ringattn.Documents.from_lengths([s - 1 - rank % 2, 1 + rank % 2]) if world > 1 else good
    found = {
        "lengths": _raises(lambda: call(documents=ringattn.Documents.from_lengths([s + 1]))),
        "window": _raises(lambda: call(window=(-2, 0))),
        "window_type": _raises(lambda: call(window=3)),
        "mask_mod_raises": _raises(lambda: call(mask_mod=bad_mod)),
        "mask_mod_float": _raises(lambda: call(mask_mod=float_mod)),
        "mask_mod_shape": _raises(lambda: call(mask_mod=wrong_shape_mod)),
        "documents_type": _raises(lambda: call(documents=[s])),
        "differ": _raises(lambda: call(documents=mine)) if world > 1 else "ValueError: n/a",
        "neg_length": _raises(lambda: ringattn.Documents.from_lengths([-1, s + 1])),
        "strategy_differ": _raises(
            lambda: ringattn.attention(
                q, q, q, strategy="allgather", backend="math", documents=mine
            )
        )
        if world > 1
        else "ValueError: n/a",
    }
    # Still usable: a good call after all those.
    out = call(documents=good)
    found["after"] = "ok" if bool(torch.isfinite(out).all()) else "bad"
    return found


# --------------------------------------------------------------------------- fuzz


def fuzz_cases(world: int, two_d: bool, examples: int) -> list[dict]:
    """Cases drawn by Hypothesis (derandomized: the same on every rank and every run).

    Hypothesis only generates here; the cases run like the others, in the same spawn, so
    the search costs no extra process start.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    entries = ["ring_attention", "attention:ring", "attention:allgather", "attention:ulysses"]
    entries += ["attention:hybrid"] if two_d else []
    found: list[dict] = []

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def search(data) -> None:
        entry = data.draw(st.sampled_from(entries))
        s = world * data.draw(st.integers(1, 10))
        kind = data.draw(st.sampled_from(["lengths", "attention_mask", "none"]))
        batch = data.draw(st.integers(1, 2))
        kv_heads = data.draw(st.integers(1, 2))
        heads = kv_heads * (world if entry in ("attention:ulysses", "attention:hybrid") else 2)
        if kind == "none":
            s = 2 * world * data.draw(st.integers(1, 4))
            segments: list = [(s, False)]
        else:
            cuts = (
                data.draw(st.lists(st.integers(1, s - 1), max_size=6, unique=True)) if s > 1 else []
            )
            bounds = [0, *sorted(cuts), s]
            lengths = [b - a for a, b in zip(bounds, bounds[1:])]
            if kind == "attention_mask":
                pad = data.draw(st.integers(0, lengths[-1] - 1)) if lengths[-1] > 1 else 0
                body = [(n, False) for n in lengths[:-1]] + [(lengths[-1] - pad, False)]
                segments = [body + [(pad, True)] for _ in range(batch)]
            else:
                segments = [(n, False) for n in lengths]
        left = data.draw(st.integers(-1, s + 1))
        right = data.draw(st.integers(-1, s + 1))
        window = data.draw(st.sampled_from([None, (left, right)]))
        found.append(
            dict(
                entry=entry,
                docs=kind,
                segments=segments,
                seq=s,
                batch=batch,
                heads=heads,
                kv_heads=kv_heads,
                dim=4,
                causal=data.draw(st.booleans()),
                window=window,
                mask_mod=data.draw(
                    st.sampled_from([None, "prefix_lm", "odd_heads", "batch_gap", "block7"])
                ),
                layout=data.draw(st.sampled_from(["zigzag", "contiguous"])),
                dtype="float64",
                backend=data.draw(st.sampled_from(["math", "cpu"])),
                seed=data.draw(st.integers(0, 2**16)),
            )
        )

    search()
    return found
