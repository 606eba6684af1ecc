"""On CUDA GPUs: the fused backends in bfloat16 and float16, the ring and every strategy over
NCCL, CUDA-graph replay and the compiled Triton merge, against float64 attention.

Run with ``pytest -m gpu`` on a machine with CUDA (the NCCL tests need two GPUs; they use
up to four). Without CUDA every test here is skipped (tests/conftest.py). Every comparison
is tests/judge.py's rule: no worse than one-GPU SDPA with the same backend and dtype.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from distributed import run_ranks
from judge import verdict

pytestmark = pytest.mark.gpu


def _failures(rows: list[dict]) -> list[str]:
    """The rows' fields that fail the judge; with RINGATTN_TEST_JSON set, every verdict is
    also appended to that file (for reports)."""
    bad = []
    log = os.environ.get("RINGATTN_TEST_JSON")
    for row in rows:
        for name, (errs, sdpa_errs) in row["fields"].items():
            # lse and the merge have no SDPA counterpart: float32 lse, the merge's own dtype.
            dtype = "float32" if name == "lse" else row["dtype"]
            v = verdict(name, dtype, errs, sdpa_errs or (math.nan, math.nan))
            if log:
                with open(log, "a") as f:
                    f.write(json.dumps({"id": row["id"], **vars(v), "ok": v.ok}) + "\n")
            if not v.ok:
                bad.append(f"{row['id']}: {v}")
    return bad


def test_each_backend_block_matches_float64() -> None:
    from gpu_cases import run_kernels

    rows = run_kernels()
    assert len(rows) == 24
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


def test_triton_merge_matches_float64() -> None:
    from gpu_cases import run_triton_merge

    rows = run_triton_merge()
    assert all(r["triton"] for r in rows), "the Triton merge did not run"
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


def test_key_rows_triton_kernels_match_pytorch_ops() -> None:
    """The masked all-gather's row copies and gradient sum: the Triton kernels give exactly
    what the same calls give as PyTorch ops on CPU (a copy moves bits; the sum accumulates
    in float32 in the same order and rounds once)."""
    from gpu_cases import run_key_rows

    rows = run_key_rows()
    assert len(rows) == 9 and all(r["triton"] for r in rows), "the Triton kernels did not run"
    bad = [r for r in rows if r["max_diff"] != 0.0]
    assert not bad, bad


def test_ulysses_reorders_with_triton_match_index_put() -> None:
    """Ulysses' exchange puts the received pieces in position order (and the outgoing ones
    in the peers' order) with the Triton row copy on CUDA: identical to the scatter it
    replaces, both ways, for zigzag and contiguous pieces on 2 and 4 ranks."""
    from gpu_cases import run_head_exchange_rows

    rows = run_head_exchange_rows()
    assert len(rows) == 4 and all(r["triton"] for r in rows), "the Triton copy did not run"
    assert all(r["same"] for r in rows), rows


def _over_nccl(worker_name: str) -> list[dict]:
    """Rank 0's rows of a gpu_cases worker run on up to 4 GPUs over NCCL."""
    gpus = torch.cuda.device_count()
    if gpus < 2:
        pytest.skip(f"NCCL tests need 2 GPUs, found {gpus}")
    import gpu_cases

    return run_ranks(getattr(gpu_cases, worker_name), min(gpus, 4), backend="nccl", timeout=600)[0]


@pytest.fixture(scope="module")
def nccl_rows() -> list[dict]:
    return _over_nccl("run_nccl")


def _select(rows: list[dict], prefix: str) -> list[dict]:
    return [r for r in rows if r["id"].startswith(prefix)]


def test_ring_over_nccl_every_backend_and_dtype(nccl_rows) -> None:
    rows = _select(nccl_rows, "ring-")
    assert len(rows) == 48
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_strategies_over_nccl(nccl_rows, strategy: str) -> None:
    rows = _select(nccl_rows, f"{strategy}-")
    if strategy == "hybrid" and not rows:
        pytest.skip("the hybrid needs an even number of GPUs")
    assert len(rows) == 12
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


def test_cuda_graph_replay_matches_float64(nccl_rows) -> None:
    rows = _select(nccl_rows, "graphs-")
    assert len(rows) == 12
    assert len(_select(rows, "graphs-first-")) == 6  # rank 0 replays, the others run eagerly
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


def test_teardown_with_cuda_graphs_alive(nccl_rows) -> None:
    (row,) = _select(nccl_rows, "teardown")
    assert row["programs"] == 1
    assert row["seconds"] < 30


def test_the_ring_merged_with_the_triton_kernel(nccl_rows) -> None:
    (row,) = _select(nccl_rows, "triton-merges")
    assert row["count"] > 0


@pytest.fixture(scope="module")
def masked_rows() -> list[dict]:
    return _over_nccl("run_masked")


def test_masks_over_nccl_every_strategy(masked_rows) -> None:
    """Documents, a window, both, and a prefix-LM mask function; ring, all-gather, Ulysses,
    auto (and the hybrid on 4 GPUs), bf16 with FlexAttention, against float64."""
    rows = _select(masked_rows, "masked-")
    world = min(torch.cuda.device_count(), 4)
    assert len(rows) == 4 * (5 if world >= 4 else 4)
    bad = _failures(rows)
    assert not bad, "\n".join(bad)


def test_new_batches_of_documents_compile_once_per_key_size(masked_rows) -> None:
    """Four batches of new documents through the all-gather are exact, and FlexAttention
    compiles at most one graph per key size they bring (key counts are rounded to a few
    sizes), not one per batch: here four batches, two sizes."""
    rows = _select(masked_rows, "newdocs-")
    (row,) = [r for r in rows if r["id"] == "newdocs-graphs"]
    checked = [r for r in rows if "fields" in r]
    assert len(checked) == 4
    bad = _failures(checked)
    assert not bad, "\n".join(bad)
    assert row["sizes"] < len(checked), "the batches should share a size"
    assert row["graphs"] <= row["sizes"], f"{row['graphs']} graphs for {row['sizes']} sizes"
