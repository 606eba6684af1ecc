"""The ``ringattn`` command line: ``ringattn demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .demo import DemoResult, default_config, result_record, run_demo
from .kernels import BACKENDS
from .layout import LAYOUTS


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run ring attention on local ranks and check it against one-process attention",
        description="Spawn local ranks (all GPUs with NCCL, else 4 CPU ranks with Gloo), run "
        "forward+backward ring attention on a long sequence, compare with one-process "
        "attention, and print a table. Exits 1 if the check fails.",
    )
    p.add_argument("--ranks", type=int, help="number of local ranks (default: all GPUs, or 4)")
    p.add_argument("--seq-len", type=int, help="total tokens across all ranks")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="K/V heads (fewer than --heads: GQA)")
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32", "float64"])
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--layout", choices=LAYOUTS)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--iters", type=int, help="timed iterations (median reported)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")


def _progress():
    try:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    return Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=False,
    )


def _print_table(result: DemoResult) -> None:
    c = result.config
    rows = [
        ("ranks", f"{c.ranks} ({c.device}, {'NCCL' if c.device == 'cuda' else 'Gloo'})"),
        ("tokens", f"{c.seq_len:,} ({c.seq_len // c.ranks:,} per rank)"),
        (
            "shape",
            f"batch {c.batch}, heads {c.heads}/{c.kv_heads} (q/kv), "
            f"head dim {c.head_dim}, {c.dtype}",
        ),
        ("attention", f"{'causal' if c.causal else 'full'}, layout {c.layout}"),
        ("backend", f"{result.backend_used} (asked: {c.backend})"),
        (
            "error",
            f"ring {result.ring_out_error:.2e}, one process {result.one_process_out_error:.2e} "
            "(output vs float64, relative RMS, sampled rows)",
        ),
        ("grad diff", f"{result.grad_difference:.2e} (ring vs one process, relative)"),
        (
            "time fwd+bwd",
            f"ring {result.ring_ms:.1f} ms, one process {result.one_process_ms:.1f} ms "
            f"({result.one_process_ms / result.ring_ms:.2f}x)",
        ),
        (
            "peak memory",
            f"ring {result.ring_peak_mib:.0f} MiB per rank, "
            f"one process {result.one_process_peak_mib:.0f} MiB",
        ),
        ("check", "PASSED" if result.passed else "FAILED"),
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        return
    table = Table(title="ringattn demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _run_demo(args: argparse.Namespace) -> int:
    cfg = default_config(
        ranks=args.ranks,
        seq_len=args.seq_len,
        batch=args.batch,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        backend=args.backend,
        layout=args.layout,
        causal=args.causal,
        iters=args.iters,
    )
    progress = _progress()
    tasks: dict[str, int] = {}

    def on_event(kind: str, name: str, total: int | None = None) -> None:
        if progress is None:
            if total is not None or name in ("inputs", "check"):
                print(f"... {name}", flush=True)
            return
        if total is not None:
            tasks[name] = progress.add_task(name, total=total)
        elif name in tasks:
            progress.advance(tasks[name])
        else:
            tasks[name] = progress.add_task(name, total=1, completed=1)

    print(f"ringattn demo: {cfg.ranks} ranks on {cfg.device}, {cfg.seq_len:,} tokens", flush=True)
    if progress is not None:
        with progress:
            result = run_demo(cfg, on_event)
    else:
        result = run_demo(cfg, on_event)
    _print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result_record(result), f, indent=2)
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ringattn", description="Exact ring attention for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
