"""The planner's predicted speedups over one GPU, for GPU counts that may not be at hand.

    python benchmarks/planner_predictions.py --gpus 4,8 --calibration CAL.json \
        [--measured RESULTS.json] [--out benchmarks/results/NAME]

For each GPU count, length and mask (bf16, 32 query / 8 K/V heads, head dim 128,
forward+backward) it predicts every strategy, names the planner's pick, and compares the
pick's predicted time with one GPU's (the same calibration, one GPU). Where ``--measured``
holds a ``ringattn bench`` run of that GPU count, the measured speedup of ``ringattn-auto``
stands beside the prediction, which checks the prediction where it can be checked. The
causal target column applies the 0.9 x N bar wherever each GPU holds 32K tokens or more.
Writes NAME.md and NAME.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ringattn.planner import Problem, load_calibration, plan

LENGTHS = [32768 * 2**i for i in range(6)]  # 32K .. 1M


def _tokens(n: int) -> str:
    return f"{n // 1024}K"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpus", default="4,8")
    p.add_argument("--calibration", default=None)
    p.add_argument("--measured", default=None, help="a ringattn bench JSON to compare with")
    p.add_argument("--out", required=True, help="output path without extension")
    args = p.parse_args()
    cal = load_calibration(args.calibration)
    measured: dict[tuple, float] = {}
    ranks = None
    if args.measured:
        data = json.loads(Path(args.measured).read_text())
        ranks = data["meta"]["ranks"]
        for r in data["rows"]:
            if r["method"] == "ringattn-auto" and r.get("speedup"):
                measured[(r["causal"], r["seq_len"])] = r["speedup"]

    lines = [
        f"Calibration: {cal.device}. bf16, 32/8 heads x 128, batch 1, forward+backward.",
        "",
        "| GPUs | mask | tokens | per GPU | pick | predicted ms | one GPU ms | predicted "
        "speedup | measured speedup (auto) | causal target 0.9 x N |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    records = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        for causal in (True, False):
            for seq in LENGTHS:

                def problem(n: int, seq: int = seq, causal: bool = causal) -> Problem:
                    return Problem(
                        gpus=n, seq_len=seq, heads=32, kv_heads=8, head_dim=128,
                        causal=causal, gpus_per_node=max(n, 8),
                    )  # fmt: skip

                pick = plan(problem(gpus), cal)[0]
                one = plan(problem(1), cal)[0]
                speedup = one.total_ms / pick.total_ms
                got = measured.get((causal, seq)) if gpus == ranks else None
                target = ""
                if causal and seq // gpus >= 32768:
                    value = got if got is not None else speedup
                    target = f"{'met' if value >= 0.9 * gpus else 'missed'} ({0.9 * gpus:.1f}x)"
                lines.append(
                    f"| {gpus} | {'causal' if causal else 'full'} | {_tokens(seq)} | "
                    f"{_tokens(seq // gpus)} | {pick.strategy} | {pick.total_ms:.1f} | "
                    f"{one.total_ms:.1f} | {speedup:.2f}x | "
                    f"{f'{got:.2f}x' if got is not None else '-'} | {target} |"
                )
                records.append(
                    dict(
                        gpus=gpus,
                        causal=causal,
                        seq_len=seq,
                        pick=pick.strategy,
                        predicted_ms=pick.total_ms,
                        one_gpu_ms=one.total_ms,
                        predicted_speedup=speedup,
                        measured_speedup=got,
                        memory_gib=pick.memory_gib,
                    )  # fmt: skip
                )
    table = "\n".join(lines) + "\n"
    Path(f"{args.out}.md").write_text(table)
    Path(f"{args.out}.json").write_text(json.dumps(records, indent=1))
    print(table)


if __name__ == "__main__":
    main()
