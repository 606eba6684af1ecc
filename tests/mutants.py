"""Deliberate bugs in the library, and the checks each must fail (run inside spawned ranks).

Each mutant patches one piece of the library in this process (a kernel's scale or
gradients, the ring's plan, the merge, the layout, the GQA expansion, the all-gather's key
blocks, the Ulysses piece order) for the duration of a ``with mutated(name):`` block; the
caches that would keep an unmutated plan are cleared on the way in and out. Every rank of
the group applies the same mutant, so the collectives stay in step.

``run_mutations`` runs, unmutated first (the control) and then under each mutant, the same
per-rank checks the suite runs (``fuzz_cases.check_case`` and ``strategy_cases.
run_strategies``) in float32 and bfloat16, and returns every field's verdict by
tests/judge.py. tests/test_mutations.py asserts that the control passes and that every
mutant fails in every (check, dtype) cell.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any

import torch

from ringattn import checks, kernels, layout, ring, strategies
from ringattn.kernels import Kernel

from fuzz_cases import FuzzCase, check_case, verdicts
from judge import verdict
from strategy_cases import run_strategies

Patch = tuple[Any, str, Any]  # (owner, attribute, replacement)

_forward, _backward = Kernel.forward, Kernel.backward


def _scaled(factor: float) -> list[Patch]:
    """The softmax scale off by ``factor``, forward and backward."""

    def forward(self, q, k, v, *, causal, scale):
        return _forward(self, q, k, v, causal=causal, scale=scale * factor)

    def backward(self, *args, causal, scale):
        return _backward(self, *args, causal=causal, scale=scale * factor)

    return [(Kernel, "forward", forward), (Kernel, "backward", backward)]


def _grad_times(index: int, factor: float) -> list[Patch]:
    """One of dq, dk, dv (``index`` 0, 1, 2) of every block off by ``factor``."""

    def backward(self, *args, **kwargs):
        grads = list(_backward(self, *args, **kwargs))
        grads[index] = grads[index] * factor
        return tuple(grads)

    return [(Kernel, "backward", backward)]


def _causal_off_by_one() -> list[Patch]:
    """Causal blocks let each query see one key past the diagonal (plain ops on every
    backend, with the mask moved)."""
    scores = kernels._math_scores

    def shifted_scores(q, k, causal, scale):
        s, groups = scores(q, k, False, scale)
        if causal:
            mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu_(2)
            s = s.masked_fill(mask, float("-inf"))
        return s, groups

    def forward(self, q, k, v, *, causal, scale):
        if causal:
            return kernels._math_forward(q, k, v, causal, scale)
        return _forward(self, q, k, v, causal=causal, scale=scale)

    def backward(self, dout, q, k, v, out, lse, aux, *, causal, scale):
        if causal:
            grads = kernels._math_backward(dout, q, k, v, out, lse, aux, causal, scale)
            return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return _backward(self, dout, q, k, v, out, lse, aux, causal=causal, scale=scale)

    return [
        (kernels, "_math_scores", shifted_scores),
        (Kernel, "forward", forward),
        (Kernel, "backward", backward),
    ]


def _ring_step_dropped() -> list[Patch]:
    """The ring skips its last step (the K/V block arrives, nothing is computed on it)."""
    plan = checks.ring_plan

    def ring_plan(rank, world_size, *, causal, layout):
        plans = plan(rank, world_size, causal=causal, layout=layout)
        return plans[:-1] + [None] if len(plans) > 1 else plans

    return [(checks, "ring_plan", ring_plan)]


def _allgather_block_dropped() -> list[Patch]:
    """The all-gather strategy leaves out one key block: a causal query chunk's prefix, or
    the first chunk of keys for full attention."""
    blocks = strategies._query_blocks

    def query_blocks(ids, causal, chunk, bottom_right=False):
        found = blocks(ids, causal, chunk, bottom_right)
        if not causal:
            return [(-1, chunk, -1, False)]
        if bottom_right:  # the last query chunk loses its first key chunk
            qi, _, end, _ = found[-1]
            return [*found[:-1], (qi, chunk, end, True)] if end > chunk else found
        prefixes = [i for i, b in enumerate(found) if not b[3]]
        return [b for i, b in enumerate(found) if not prefixes or i != prefixes[-1]]

    return [(strategies, "_query_blocks", query_blocks)]


def _merge_skips_block() -> list[Patch]:
    """The merge adds a block's log-sum-exp but not its output."""

    def merge_into(acc_out, acc_lse, out, lse):
        acc_lse.copy_(torch.logaddexp(acc_lse, lse.to(acc_lse.dtype)))

    return [(ring, "merge_into", merge_into), (strategies, "merge_into", merge_into)]


def _zigzag_swapped() -> list[Patch]:
    """A zigzag shard holds its two chunks in the wrong order (2N-1-r first)."""
    ids = layout.chunk_ids

    def chunk_ids(rank, world_size, layout_name):
        found = ids(rank, world_size, layout_name)
        return found[::-1] if layout_name == "zigzag" else found

    return [(layout, "chunk_ids", chunk_ids)]


def _gqa_mapping() -> list[Patch]:
    """Query head h reads K/V head h % H_kv instead of h // (H / H_kv)."""

    def expand_kv(x, groups):
        return x if groups == 1 else x.repeat(1, groups, 1, 1)

    return [(kernels, "_expand_kv", expand_kv)]


def _lse_off() -> list[Patch]:
    """Every block's log-sum-exp off by log 2."""

    def forward(self, q, k, v, *, causal, scale):
        out, lse, aux = _forward(self, q, k, v, causal=causal, scale=scale)
        return out, lse + math.log(2.0), aux

    return [(Kernel, "forward", forward)]


def _pieces_unsorted() -> list[Patch]:
    """Gathered chunks (Ulysses' head exchange, the all-gather's K/V) left in rank order
    instead of sorted by position."""
    rows = strategies._row_orders

    def rank_order(ids, per_rank, planes, device):
        return rows(tuple(range(len(ids))), per_rank, planes, device)

    slots = strategies._piece_slots

    def rank_slots(ids, size, device):
        return slots(tuple(range(len(ids))), size, device)

    return [
        (strategies, "_piece_slots", rank_slots),
        (strategies, "_row_orders", rank_order),
    ]


MUTANTS: dict[str, Callable[[], list[Patch]]] = {
    "scale x1.03": lambda: _scaled(1.03),
    "causal mask off by one": _causal_off_by_one,
    "ring step dropped": _ring_step_dropped,
    "all-gather key block dropped": _allgather_block_dropped,
    "merge skips a block": _merge_skips_block,
    "dq x1.05": lambda: _grad_times(0, 1.05),
    "dk x1.05": lambda: _grad_times(1, 1.05),
    "dv x1.05": lambda: _grad_times(2, 1.05),
    "zigzag chunks swapped": _zigzag_swapped,
    "GQA head mapping": _gqa_mapping,
    "lse off by log 2": _lse_off,
    "gathered chunks unsorted": _pieces_unsorted,
}


def _clear_caches() -> None:
    checks._PREPARED.clear()
    checks._plans.cache_clear()
    strategies._PLANNED.clear()
    strategies._piece_ids.cache_clear()
    strategies._piece_slots.cache_clear()
    strategies._row_orders.cache_clear()


@contextmanager
def mutated(name: str | None) -> Iterator[None]:
    """The library with mutant ``name`` applied (None: unmutated)."""
    patches = MUTANTS[name]() if name is not None else []
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    _clear_caches()
    try:
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
        _clear_caches()


# Small cases that together reach every mutated piece: causal zigzag for the ring, the
# all-gather and Ulysses (the plan, the chunk order, the diagonal mask), full attention on
# the contiguous layout, GQA with two K/V heads (h // groups and h % groups differ).
_FUZZ_BASE = FuzzCase(
    "ring_attention", 1, 2, 2, 8, 3, "float32", "cpu", True, "zigzag", None, 1.0, "none", 0
)
FUZZ_CASES = (
    _FUZZ_BASE,
    replace(_FUZZ_BASE, entry="attention:allgather", seed=1),
    replace(_FUZZ_BASE, entry="attention:ulysses", seed=2),
    replace(_FUZZ_BASE, entry="context_parallel", causal=False, layout="contiguous", seed=3),
)
STRATEGY_CASES = tuple(
    dict(strategy=s, causal=c, heads=4, kv_heads=2, local=6, layout=lay, backend="cpu", seed=i)
    for i, (s, c, lay) in enumerate(
        [
            ("ring", True, "zigzag"),
            ("allgather", True, "zigzag"),
            ("ulysses", True, "zigzag"),
            ("ring", False, "contiguous"),
        ]
    )
)
DTYPES = ("float32", "bfloat16")


def _checks(rank: int, world: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per (check, dtype) cell, per case: the worst judge score of its fields (> 1 fails;
    inf for an exception)."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for dtype in DTYPES:
        fuzz = cells.setdefault(("fuzz", dtype), {})
        for c in FUZZ_CASES:
            c = replace(c, dtype=dtype)
            try:
                r = check_case(c, rank, world)
                score = max(v.score for v in verdicts(r))
                if not r["nan_pattern_equal"]:
                    score = math.inf
            except Exception:  # noqa: BLE001 - an exception is a failed check
                score = math.inf
            fuzz[f"{c.entry} {'causal' if c.causal else 'full'} {c.layout}"] = score
        strategy = cells.setdefault(("strategy", dtype), {})
        for c in STRATEGY_CASES:
            case_id = f"{c['strategy']} {'causal' if c['causal'] else 'full'} {c['layout']}"
            try:
                fields = run_strategies(rank, world, (world,), [{**c, "dtype": dtype, "id": 0}])[0]
                score = max(verdict(f, dtype, *e).score for f, e in fields.items())
            except Exception:  # noqa: BLE001 - an exception is a failed check
                score = math.inf
            strategy[case_id] = score
    return cells


def run_mutations(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """The control (key ``"none"``) and each named mutant: per cell, per case, the score."""
    found: dict[str, Any] = {"none": _checks(rank, world)}
    for name in names:
        with mutated(name):
            found[name] = _checks(rank, world)
    return found


def describe() -> dict[str, Any]:
    """The cases, for reports."""
    return {"fuzz": [asdict(c) for c in FUZZ_CASES], "strategy": list(STRATEGY_CASES)}
