"""The planner: cost model arithmetic, picks under different machines, the plan and calibrate
commands, and strategy="auto"."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ringattn.cli import main
from ringattn.planner import Calibration, Problem, load_calibration, plan

H200 = load_calibration(device_type="cuda")


def test_shipped_calibrations_load() -> None:
    assert "H200" in H200.device and {"cudnn", "flash"} <= set(H200.attention)
    cpu = load_calibration(device_type="cpu")
    assert "cpu" in cpu.attention


def test_throughput_is_interpolated_between_points_and_held_beyond() -> None:
    points = H200.attention["cudnn"]["causal"]
    (w0, r0), (w1, r1) = sorted(points)[2:4]
    assert H200.tflops("cudnn", True, w0) == pytest.approx(r0)
    middle = H200.tflops("cudnn", True, (w0 * w1) ** 0.5)
    assert min(r0, r1) <= middle <= max(r0, r1)
    assert H200.tflops("cudnn", True, 1.0) == pytest.approx(min(points)[1])
    assert H200.tflops("cudnn", True, 1e30) == pytest.approx(max(points)[1])


def test_two_gpu_ring_prediction_matches_the_arithmetic() -> None:
    """Causal 32K on 2 GPUs: a causal local block plus a half block, nothing exposed."""
    p = Problem(gpus=2, seq_len=32768, heads=32, kv_heads=8, head_dim=128, gpus_per_node=2)
    ring = next(r for r in plan(p, H200) if r.strategy == "ring")

    def ms(sq: int, sk: int, causal: bool) -> float:
        flops = 4.0 * 32 * sq * sk * 128 * (0.5 if causal else 1.0) * 3.5
        return flops / (H200.tflops("cudnn", causal, 32 * sq * sk * 128) * 1e12) * 1e3

    assert ring.compute_ms == pytest.approx(ms(16384, 16384, True) + ms(8192, 16384, False), 1e-3)
    assert ring.exposed_comm_ms == 0.0
    # The second block merges into the first: output, then dq (bfloat16 accumulators: read
    # both, write one; on half the ranks only half the queries), and dK/dV once.
    q_elements, kv_elements = 32 * 16384 * 128, 2 * 8 * 16384 * 128
    merges = (2 * q_elements * 6 * 0.75 + kv_elements * 6) / (H200.memory_gbs * 1e9) * 1e3
    assert ring.other_ms == pytest.approx(merges, 1e-3)
    assert ring.total_ms == pytest.approx(ring.compute_ms + merges, 1e-3)


def test_more_ring_steps_merge_in_float32() -> None:
    """Four ranks: three merges per pass into float32 accumulators, widened and rounded once;
    dK/dV summed over three steps."""
    p = Problem(gpus=4, seq_len=65536, heads=32, kv_heads=8, head_dim=128, gpus_per_node=4)
    ring = next(r for r in plan(p, H200) if r.strategy == "ring")
    q_elements, kv_elements = 32 * 16384 * 128, 2 * 8 * 16384 * 128
    per_element = 4 + 2 + 4
    traffic = 2 * q_elements * per_element * 3 * 0.75 + kv_elements * per_element * 3
    traffic += 2 * q_elements * 2 * (2 + 4)
    assert ring.other_ms == pytest.approx(traffic / (H200.memory_gbs * 1e9) * 1e3, 1e-3)


def test_allgather_prices_its_reorder_and_float32_gradient_sums() -> None:
    """Full attention: the gathered K/V reordered (read, write), their float32 dK/dV zeroed,
    added once, reordered for the reduce-scatter: 13 bytes moved per gathered byte."""
    p = Problem(gpus=4, seq_len=32768, heads=32, kv_heads=8, head_dim=128, causal=False)
    allgather = next(r for r in plan(p, H200) if r.strategy == "allgather")
    held = 2 * 8 * 32768 * 128 * 2
    assert allgather.other_ms == pytest.approx(13 * held / (H200.memory_gbs * 1e9) * 1e3, 1e-3)


def test_slow_point_to_point_links_move_the_pick_off_the_ring() -> None:
    slow = dataclasses.replace(H200, p2p_gbs_intra=0.5)
    p = Problem(gpus=8, seq_len=65536, heads=32, kv_heads=8, head_dim=128)
    rows = plan(p, slow)
    ring = next(r for r in rows if r.strategy == "ring")
    assert ring.exposed_comm_ms > 10 * ring.compute_ms
    assert rows[0].strategy != "ring"


def test_what_does_not_fit_goes_last() -> None:
    p = Problem(gpus=4096, seq_len=10 * 2**20, heads=64, kv_heads=8, head_dim=128)
    rows = plan(p, H200)
    allgather = next(r for r in rows if r.strategy == "allgather")
    assert not allgather.fits and rows[-1] is allgather
    assert all(r.fits for r in rows[:-1])
    # Ulysses groups that need K/V heads replicated say so.
    assert any("replicated 8->16" in r.note for r in rows)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kv_heads": 5}, "must be a multiple of kv_heads"),
        ({"seq_len": 1000}, "multiple of 2 x gpus"),
        ({"gpus": 0}, "gpus must be a positive int"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_problems_that_cannot_be_planned(changes: dict, message: str) -> None:
    p = dataclasses.replace(
        Problem(gpus=8, seq_len=65536, heads=32, kv_heads=8, head_dim=128), **changes
    )
    with pytest.raises(ValueError, match=message):
        plan(p, H200)


def test_plan_command(capsys) -> None:
    argv = ["plan", "--gpus", "64", "--gpus-per-node", "8", "--seq-len", "1M"]
    assert main([*argv, "--heads", "32", "--kv-heads", "8", "--head-dim", "128"]) == 0
    text = capsys.readouterr().out
    assert "64 GPUs (8 per node), 1,048,576 tokens" in text
    for strategy in ("ring", "allgather", "hybrid 8x8"):
        assert f"\n{strategy} " in text
    assert "\npick: " in text
    assert main(["plan", "--gpus", "2", "--seq-len", "8K", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["strategy"] for r in rows} == {"ring", "allgather", "ulysses"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "1", "--seq-len", "8K"], "--gpus must be in [2, 4096]"),
        (["--gpus", "8192", "--seq-len", "8K"], "--gpus must be in [2, 4096]"),
        (["--gpus", "8", "--seq-len", "11M"], "--seq-len must be in [1, 10485760]"),
        (["--gpus", "8", "--seq-len", "8K", "--calibration", "/nonexistent.json"], "does not"),
    ],
)
def test_plan_command_rejects(capsys, argv: list, message: str) -> None:
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().out


def test_calibrate_command_writes_what_plan_reads(tmp_path, capsys) -> None:
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--seq-lens", "128,256", "--link-mib", "1", "--out", str(out)]
    assert main(argv) == 0
    cal = load_calibration(out)
    assert isinstance(cal, Calibration) and cal.attention["cpu"]["causal"][0][1] > 0
    assert cal.p2p_gbs_intra > 0 and cal.host_us_per_call > 0
    capsys.readouterr()
    assert main(["plan", "--gpus", "4", "--seq-len", "4K", "--calibration", str(out)]) == 0
    assert "pick: " in capsys.readouterr().out
