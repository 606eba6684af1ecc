"""The ``ringattn plan`` and ``ringattn calibrate`` commands (argument parsing and output)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from ..planner import Calibration, Problem, default_calibration_path, load_calibration, plan

__all__ = ["add_parsers", "run_calibrate", "run_plan", "token_count"]

_MAX_GPUS, _MAX_TOKENS = 4096, 10 * 1024 * 1024


def token_count(text: str) -> int:
    """``"1M"`` -> 1048576, ``"128K"`` -> 131072, ``"5000"`` -> 5000."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024**2}.get(text[-1:], 1)
    try:
        return int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}") from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict each strategy's time and memory per attention layer on a cluster",
        description="Predict forward+backward time per attention layer (compute, exposed "
        "communication, other) and memory per GPU for every strategy, from the calibration "
        f"file (default {default_calibration_path()}, else the one shipped for 2x H200). "
        f"Up to {_MAX_GPUS} GPUs and {_MAX_TOKENS // 2**20}M tokens.",
    )
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-len", type=token_count, required=True, help="tokens, e.g. 1M or 131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backend", default="cudnn", help="calibrated backend (default cudnn)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--calibration", metavar="PATH", help="calibration JSON to use")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")

    c = sub.add_parser(
        "calibrate",
        help="measure the planner's constants on this machine",
        description="Measure attention throughput per backend, link bandwidths between the "
        "local ranks, memory bandwidth and host time, and write the planner's calibration.",
    )
    c.add_argument("--ranks", type=int, help="local ranks (default: all GPUs, or 2 CPU ranks)")
    c.add_argument("--backends", default=None, help="default: cudnn,flash on CUDA, cpu on CPU")
    c.add_argument("--seq-lens", default=None, help="default: 1K..64K on CUDA, 256..2K on CPU")
    c.add_argument("--link-mib", type=int, default=None, help="message size for the links")
    c.add_argument("--inter-node-gbs", type=float, default=50.0, help="assumed, per GPU")
    c.add_argument("--out", default=None, help=f"default: {default_calibration_path()}")


def _check_problem(args: argparse.Namespace) -> str | None:
    if not 2 <= args.gpus <= _MAX_GPUS:
        return f"--gpus must be in [2, {_MAX_GPUS}], got {args.gpus}"
    if not 1 <= args.seq_len <= _MAX_TOKENS:
        return f"--seq-len must be in [1, {_MAX_TOKENS}], got {args.seq_len}"
    return None


def run_plan(args: argparse.Namespace) -> int:
    problem_error = _check_problem(args)
    if problem_error:
        print(f"ringattn plan: {problem_error}")
        return 2
    problem = Problem(
        gpus=args.gpus,
        seq_len=args.seq_len,
        heads=args.heads,
        kv_heads=args.kv_heads or args.heads,
        head_dim=args.head_dim,
        causal=args.causal,
        batch=args.batch,
        gpus_per_node=args.gpus_per_node,
        backend=args.backend,
        dtype=args.dtype,
    )
    try:
        cal = load_calibration(args.calibration)
        rows = plan(problem, cal)
    except ValueError as err:
        print(f"ringattn plan: {err}")
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    _print_plan(problem, cal, rows)
    return 0


def _print_plan(problem: Problem, cal: Calibration, rows: list[Any]) -> None:
    p = problem
    print(
        f"{p.gpus} GPUs ({p.gpus_per_node} per node), {p.seq_len:,} tokens "
        f"({p.seq_len // p.gpus:,} per GPU), {p.heads}/{p.kv_heads} heads x {p.head_dim}, "
        f"batch {p.batch}, {'causal' if p.causal else 'full'}, {p.backend} {p.dtype}"
    )
    print(f"calibration: {cal.device}; forward+backward per attention layer\n")
    header = ("strategy", "total ms", "compute", "exposed comm", "other", "GiB/GPU", "")
    table = [header]
    for r in rows:
        fits = "" if r.fits else f"exceeds {cal.memory_gib:g} GiB"
        table.append(
            (
                r.strategy,
                f"{r.total_ms:,.2f}",
                f"{r.compute_ms:,.2f}",
                f"{r.exposed_comm_ms:,.2f}",
                f"{r.other_ms:,.2f}",
                f"{r.memory_gib:,.2f}",
                ", ".join(x for x in (fits, r.note) if x),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = (
            c.ljust(w) if j in (0, 6) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))
        )
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths[:-1]))
    best = rows[0]
    print(f"\npick: {best.strategy} ({best.total_ms:,.2f} ms)")


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .calibrate import calibrate_worker
    from .launch import launched_by_torchrun, run_under_torchrun, spawn_ranks

    cuda = torch.cuda.is_available()
    device_type = "cuda" if cuda else "cpu"
    backends = tuple(
        (args.backends or ("cudnn,flash" if cuda else "cpu")).replace(" ", "").split(",")
    )
    default_lens = "1K,2K,4K,8K,16K,32K,64K" if cuda else "256,512,1K,2K"
    seq_lens = tuple(token_count(x) for x in (args.seq_lens or default_lens).split(","))
    link_mib = args.link_mib or (256 if cuda else 16)
    worker_args = (backends, seq_lens, link_mib, args.inter_node_gbs)

    def on_event(kind: str, *payload: Any) -> None:
        if kind == "running":
            print(f"... {payload[0]}", flush=True)

    if launched_by_torchrun():
        result = run_under_torchrun(calibrate_worker, device_type, *worker_args, on_event=on_event)
        if result is None:
            return 0
    else:
        ranks = args.ranks or (torch.cuda.device_count() if cuda else 2)
        result = spawn_ranks(calibrate_worker, ranks, device_type, *worker_args, on_event=on_event)
    cal = Calibration(**result)
    out = args.out or default_calibration_path()
    cal.save(out)
    print(json.dumps({k: v for k, v in result.items() if k != "attention"}, indent=1))
    for backend, curves in cal.attention.items():
        for mask, points in curves.items():
            print(f"{backend} {mask}: " + ", ".join(f"{r:.3g}" for _, r in points) + " TFLOP/s")
    print(f"wrote {out}")
    return 0
