"""Benchmark results on disk: JSON, a markdown table, and a speedup plot (matplotlib)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table", "plot_speedup", "write_results"]

_COLUMNS = (
    ("backend", "backend"),
    ("causal", "mask"),
    ("heads", "q/kv heads"),
    ("mode", "pass"),
    ("seq_len", "tokens"),
    ("method", "method"),
    ("ms", "ms"),
    ("tflops_per_device", "TFLOP/s per GPU"),
    ("speedup", "vs one GPU"),
    ("vs_torch_cp", "vs PyTorch CP"),
    ("peak_mib", "peak MiB/rank"),
)


def _cell(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if key == "causal":
        return "causal" if value else "full"
    if key == "heads":
        return f"{record['heads']}/{record['kv_heads']}"
    if key == "seq_len":
        return f"{value // 1024}K" if value % 1024 == 0 else str(value)
    if key == "ms":
        return f"{value:.3f}" if value is not None else f"error: {record.get('error')}"
    if key in ("speedup", "vs_torch_cp"):
        return f"{value:.2f}x" if value is not None else "-"
    if key in ("tflops_per_device", "peak_mib"):
        return f"{value:.0f}" if value is not None else "-"
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per (case, method), in run order."""
    lines = [
        "| " + " | ".join(title for _, title in _COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    for r in records:
        lines.append("| " + " | ".join(_cell(r, key) for key, _ in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot_speedup(records: Sequence[dict[str, Any]], path: str) -> bool:
    """Speedup over one GPU against sequence length; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = sorted({(r["backend"], r["mode"]) for r in records})
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False, sharey=True
    )
    methods = sorted({r["method"] for r in records if r["method"] != "one-gpu"})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (backend, mode) in zip(axes[0], panels):
        series: dict[tuple, list[tuple[int, float]]] = {}
        for r in records:
            if (r["backend"], r["mode"]) != (backend, mode) or r["method"] == "one-gpu":
                continue
            if r.get("speedup") is None:
                continue
            key = (r["method"], r["causal"], r["kv_heads"] != r["heads"])
            series.setdefault(key, []).append((r["seq_len"], r["speedup"]))
        for (method, causal, gqa), points in sorted(series.items()):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colors[method],
                linestyle="-" if causal else "--",
                marker="o" if gqa else "s",
                label=f"{method}, {'causal' if causal else 'full'}, {'GQA' if gqa else 'MHA'}",
            )
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{backend}, {mode}")
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("speedup over one GPU")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(
    records: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: str, name: str
) -> list[str]:
    """Write ``name.json``, ``name.md`` and ``name.png`` under ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": list(records)}, f, indent=1)
    paths.append(json_path)
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(f"# ringattn bench: {meta.get('title', name)}\n\n")
        for key, value in meta.items():
            if key != "title":
                f.write(f"- {key}: {value}\n")
        f.write("\n" + markdown_table(records))
    paths.append(md_path)
    png_path = os.path.join(out_dir, f"{name}.png")
    if records and plot_speedup(records, png_path):
        paths.append(png_path)
    return paths
