"""The ``ringattn`` command line: ``demo``, ``bench``, ``plan`` and ``calibrate`` (argument
parsing, progress and tables; the work itself lives in the sibling modules)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..kernels import BACKENDS
from ..layout import LAYOUTS
from . import plan as plan_commands
from .demo import DemoResult, default_config, result_record, run_demo


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


def _tokens(text: str) -> tuple[int, ...]:
    """``"4K,8K,131072"`` -> ``(4096, 8192, 131072)``."""
    return tuple(plan_commands.token_count(item) for item in text.split(",") if item.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from .bench import METHODS, MODES, STRATEGY_METHODS

    p = sub.add_parser(
        "bench",
        help="time one GPU, PyTorch's context_parallel and ringattn side by side",
        description="Run every method on the same local ranks and inputs (NCCL on GPUs, Gloo "
        "on the CPU): one-device SDPA on the full sequence, PyTorch's context_parallel "
        "(allgather and alltoall rotation) and ringattn (zigzag and contiguous layouts). "
        "Writes JSON, a markdown table and a plot of speedup over one GPU.",
    )
    p.add_argument(
        "--suite",
        choices=["gpu", "quick", "cpu"],
        help="preset (default: gpu with CUDA, else cpu); the options below narrow it",
    )
    p.add_argument("--seq-lens", type=_tokens, help="comma list, e.g. 4K,8K,32K")
    p.add_argument("--long-seq-lens", type=_tokens, help="extra causal cuDNN fwd+bwd lengths")
    p.add_argument("--backends", type=_names, help="comma list of cudnn, flash, efficient, cpu")
    p.add_argument("--kv-heads", type=_tokens, help="comma list, e.g. 32,8")
    p.add_argument("--mask", choices=["both", "causal", "full"], default=None)
    p.add_argument("--modes", type=_names, help=f"comma list of {', '.join(MODES)}")
    p.add_argument(
        "--methods",
        type=_names,
        help=f"comma list of {', '.join(METHODS)}, ringattn-zigzag-graphs, ringattn-zigzag-eager, "
        + ", ".join(f"ringattn-{name}" for name in STRATEGY_METHODS),
    )
    p.add_argument("--ranks", type=int, help="local ranks (default: all GPUs, or 2 on the CPU)")
    p.add_argument("--samples", type=int, help="timed samples per row (median reported)")
    p.add_argument("--warmup", type=int, help="untimed iterations first")
    p.add_argument("--out", default="benchmarks/results", help="output directory")
    p.add_argument("--name", help="file name stem (default: bench-<device>-<suite>)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in the named results and add (or replace) these",
    )


def _bench_plan(args: argparse.Namespace, suite: str) -> Any:
    from .bench import cpu_plan, gpu_plan, quick_plan

    if suite == "gpu":
        kwargs: dict[str, Any] = {}
        for key in ("seq_lens", "backends", "kv_heads", "modes", "long_seq_lens"):
            if getattr(args, key) is not None:
                kwargs[key] = getattr(args, key)
        if args.mask is not None:
            kwargs["causal"] = {"both": (True, False), "causal": (True,), "full": (False,)}[
                args.mask
            ]
        plan = gpu_plan(**kwargs)
    else:
        plan = quick_plan() if suite == "quick" else cpu_plan()
    if args.methods is not None:
        plan = replace(plan, methods=args.methods)
    if args.samples is not None:
        plan = replace(plan, samples=args.samples)
    if args.warmup is not None:
        plan = replace(plan, warmup=args.warmup)
    return plan


def _print_bench_table(records: list[dict[str, Any]]) -> None:
    from .bench_report import markdown_table

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(records))
        return
    table = Table(title="ringattn bench")
    for title in ("case", "method", "ms", "TFLOP/s/GPU", "vs one GPU", "vs torch CP", "MiB"):
        table.add_column(title, justify="left" if title in ("case", "method") else "right")
    for r in records:
        case = (
            f"{r['backend']} {'causal' if r['causal'] else 'full'} {r['heads']}/{r['kv_heads']}"
            f" {r['mode']} {r['seq_len'] // 1024}K"
        )
        if r["ms"] is None:
            table.add_row(case, r["method"], f"error: {str(r['error'])[:48]}", "", "", "", "")
            continue
        tflops = r["tflops_per_device"]
        table.add_row(
            case,
            r["method"],
            f"{r['ms']:.3f}",
            f"{tflops:.0f}" if tflops >= 10 else f"{tflops:.2f}",
            f"{r['speedup']:.2f}x" if r["speedup"] else "-",
            f"{r['vs_torch_cp']:.2f}x" if r["vs_torch_cp"] else "-",
            f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-",
        )
    Console(width=140).print(table)


_ROW_KEY = ("backend", "causal", "heads", "kv_heads", "head_dim", "mode", "seq_len", "method")


def _previous_results(out_dir: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    path = os.path.join(out_dir, f"{name}.json")
    if not os.path.exists(path):
        return [], {}
    with open(path) as f:
        data = json.load(f)
    return data["rows"], data.get("meta", {})


def _merge_rows(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` without the rows ``new`` measures again, then ``new``."""
    fresh = {tuple(r[k] for k in _ROW_KEY) for r in new}
    return [r for r in kept if tuple(r[k] for k in _ROW_KEY) not in fresh] + list(new)


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import fill_ratios, run_bench
    from .bench_report import write_results

    cuda = torch.cuda.is_available()
    suite = args.suite or ("gpu" if cuda else "cpu")
    device_type = "cpu" if suite == "cpu" else "cuda"
    if device_type == "cuda" and not cuda:
        print("ringattn bench: this suite needs CUDA GPUs; use --suite cpu", file=sys.stderr)
        return 2
    ranks = args.ranks or (torch.cuda.device_count() if device_type == "cuda" else 2)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        ranks = int(os.environ["WORLD_SIZE"])  # launched by torchrun
    plan = _bench_plan(args, suite)
    device_name = torch.cuda.get_device_name(0) if device_type == "cuda" else "CPU"
    name = args.name or f"bench-{device_type}-{suite}"
    meta = {
        "title": f"{ranks}x {device_name}, suite {suite}",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "ranks": ranks,
        "device": device_name,
        "timing": f"median of {plan.samples} samples after {plan.warmup} warm-up iterations; "
        f"each sample >= {plan.min_sample_ms:g} ms of back-to-back iterations; slowest rank",
        "command": " ".join(["ringattn", "bench", *sys.argv[2:]]),
    }
    kept, kept_meta = _previous_results(args.out, name) if args.append else ([], {})
    if kept_meta.get("command"):
        meta["command"] = f"{kept_meta['command']}; then {meta['command']}"
    records: list[dict[str, Any]] = []
    progress = _progress()
    task: list[int] = []

    def on_event(kind: str, *payload: Any) -> None:
        if kind == "start":
            if progress is not None:
                task.append(progress.add_task("bench", total=payload[0]))
            else:
                print(f"ringattn bench: {payload[0]} measurements", flush=True)
        elif kind == "running":
            if progress is not None and task:
                progress.update(task[0], description=payload[0][:40])
            else:
                print(f"... {payload[0]}", flush=True)
        elif kind == "advance" and progress is not None and task:
            progress.advance(task[0])
        elif kind == "row":
            records.append(payload[0])
            # Partial results survive a crash.
            partial = fill_ratios(_merge_rows(kept, [dict(r) for r in records]), ranks)
            write_results(partial, meta, args.out, name)

    if os.environ.get("RANK", "0") == "0":
        print(f"ringattn bench: {ranks} ranks on {device_name}, {len(plan.cases)} cases")
    if progress is not None:
        with progress:
            rows = run_bench(plan, ranks, device_type, on_event)
    else:
        rows = run_bench(plan, ranks, device_type, on_event)
    if not rows:
        return 0  # a torchrun rank other than 0
    # Ratios over the merged rows: an appended method may be compared with a kept one-gpu row.
    paths = write_results(fill_ratios(_merge_rows(kept, rows), ranks), meta, args.out, name)
    _print_bench_table(rows)
    print("wrote " + ", ".join(paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ringattn", description="Exact ring attention for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _bench_parser(sub)
    plan_commands.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "bench":
        return _run_bench(args)
    if args.command == "plan":
        return plan_commands.run_plan(args)
    if args.command == "calibrate":
        return plan_commands.run_calibrate(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
