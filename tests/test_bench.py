"""``ringattn bench`` machinery on CPU ranks: timing rows, ratios, and the files it writes."""

from __future__ import annotations

import json

import pytest

from ringattn.cli.bench import BenchCase, BenchPlan, fill_ratios, run_bench
from ringattn.cli.bench_report import markdown_table, write_results
from ringattn.cli.commands import _merge_rows, _tokens

METHODS_RUN = (
    "one-gpu",
    "ringattn-zigzag",
    "ringattn-contiguous",
    "ringattn-allgather",
    "ringattn-ulysses",
    "ringattn-hybrid",
    "ringattn-auto",
)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    cases = (
        BenchCase(512, True, "cpu", 4, 2, 16, "fwd+bwd", dtype="float32"),
        BenchCase(512, False, "cpu", 4, 4, 16, "fwd", dtype="float32"),
    )
    plan = BenchPlan(
        cases,
        methods=METHODS_RUN,
        warmup=1,
        samples=2,
        min_sample_ms=0.0,
    )
    events = []
    found = run_bench(plan, 2, "cpu", on_event=lambda *e: events.append(e[0]))
    assert events.count("advance") == 14 and events[0] == "start"
    return found


def test_every_method_of_every_case_is_timed(rows) -> None:
    assert [(r["seq_len"], r["causal"], r["method"]) for r in rows] == [
        (512, causal, m) for causal in (True, False) for m in METHODS_RUN
    ]
    for r in rows:
        assert r["error"] is None and r["ms"] > 0
        assert r["speedup"] == pytest.approx(
            next(o["ms"] for o in rows if o["method"] == "one-gpu" and o["causal"] == r["causal"])
            / r["ms"]
        )
        assert r["vs_torch_cp"] is None  # not run here


def test_ratios_and_flops() -> None:
    case = BenchCase(1024, True, "cudnn", 2, 1, 8, "fwd+bwd")
    assert case.flops == 4.0 * 2 * 1024**2 * 8 * 0.5 * 3.5
    base = {k: getattr(case, k) for k in case.__dataclass_fields__}
    records = [
        {**base, "method": "one-gpu", "ms": 4.0},
        {**base, "method": "torch-cp-allgather", "ms": 3.0},
        {**base, "method": "torch-cp-alltoall", "ms": None},
        {**base, "method": "ringattn-zigzag", "ms": 2.0},
    ]
    fill_ratios(records, world_size=2)
    ring = records[-1]
    assert ring["speedup"] == 2.0 and ring["vs_torch_cp"] == 1.5
    assert ring["tflops_per_device"] == pytest.approx(case.flops / 2e-3 / 2 / 1e12)
    assert records[0]["tflops_per_device"] == pytest.approx(case.flops / 4e-3 / 1e12)


def test_results_files(rows, tmp_path) -> None:
    paths = write_results(rows, {"title": "test", "ranks": 2}, str(tmp_path), "r")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"] == rows and data["meta"]["ranks"] == 2
    table = (tmp_path / "r.md").read_text()
    assert table.count("ringattn-zigzag") == 2 and "| causal |" in table
    assert str(tmp_path / "r.md") in paths
    assert markdown_table(rows).count("\n") == len(rows) + 2


def test_cli_helpers() -> None:
    assert _tokens("4K, 8k,131072,1M") == (4096, 8192, 131072, 1 << 20)
    assert _tokens("") == ()
    a = {"backend": "cudnn", "causal": True, "heads": 32, "kv_heads": 8, "head_dim": 128}
    a.update(mode="fwd", seq_len=4096, method="one-gpu", ms=1.0)
    b = dict(a, ms=2.0)
    c = dict(a, method="ringattn-zigzag")
    assert _merge_rows([a, c], [b]) == [c, b]
