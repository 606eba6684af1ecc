"""Each rank's share of the masked all-gather, timed alone on one GPU.

``python benchmarks/masked_rank_kernels.py --ranks 4`` builds, in one process, what every
rank of an N-rank masked all-gather computes for the masks bench's packed batch (64K
tokens, heavy-tailed documents, causal): its queries, its own and fetched keys rounded up
as the library rounds them, and the pair's BlockMask. It then runs each rank's
FlexAttention forward+backward alone on this GPU, with no communication, and prints per
rank the plan's facts (keys fetched and served, padded keys, visible pairs, BlockMask
tiles) and the profiled kernel time. Ranks whose kernel times agree but whose calls do
not finish together on N GPUs lose the difference outside attention (the exchange, and
waits for the slower ranks).

``--exchange`` runs each rank's whole forward+backward instead: ``fetch_kv`` with its
indexed copies and gradient sum, FlexAttention, the backward, with the all-to-all replaced
by a fill of the receive buffer (no communication), once with the exchange's Triton row
kernels (ringattn.key_rows) and once with the same copies as PyTorch ops; it prints the GPU
time outside FlexAttention by kernel and checks that both give identical gradients.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from masks_bench import _gpu_spans, make_case  # noqa: E402

from ringattn import comm, key_rows  # noqa: E402
from ringattn.kv_exchange import fetch_kv, kv_exchange, padded_keys  # noqa: E402
from ringattn.mask_calls import placement_for  # noqa: E402
from ringattn.mask_plan import fetched_plan  # noqa: E402
from ringattn.masks import Documents, MaskSpec  # noqa: E402

ITERS = 10


def _kernel_ms(step, by_name: bool = False) -> dict[str, float]:
    """GPU time per call of ``step``: FlexAttention's forward and backward kernels, the rest
    (by kernel name with ``by_name``)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            step()
        torch.cuda.synchronize()
    times = {"forward": 0.0, "backward": 0.0, "other": 0.0}
    for start, end, name in _gpu_spans(prof.events()):
        kind = name[:80] if by_name else "other"
        if "flex_attention_backward" in name:
            kind = "backward"
        elif "flex_attention" in name:
            kind = "forward"
        times[kind] = times.get(kind, 0.0) + (end - start) / 1e3 / ITERS
    return times


def _inputs(queries: int, keys: int, dev: torch.device) -> tuple[torch.Tensor, ...]:
    """Random bf16 ``q`` (32 heads x ``queries``), ``k`` and ``v`` (8 heads x ``keys``), all
    requiring gradients, and an output gradient; head dim 128, batch 1."""
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn((1, h, n, 128), generator=g, device=dev, dtype=torch.bfloat16)
        for h, n in ((32, queries), (8, keys), (8, keys))
    )
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, torch.randn_like(q)


class _Arrived:
    def wait(self) -> None:
        pass


def _no_transfer(out, x, out_splits, x_splits, group, what):  # noqa: ANN001, ANN202
    """The exchange's all-to-all without communication: the same values arrive every time."""
    out.fill_(0.01)
    return _Arrived()


def _rank_step_ms(ex, block, queries: int, keys: int, dev: torch.device) -> None:  # noqa: ANN001
    """One rank's forward+backward with the exchange's copies (no transfer), with the Triton
    row kernels and with PyTorch ops: GPU time outside FlexAttention by kernel, and whether
    the gradients agree bit for bit."""
    q, k, v, dout = _inputs(queries, queries, dev)

    def step() -> tuple[torch.Tensor, ...]:
        k_ext, v_ext = fetch_kv(k, v, ex, None, keys)
        out = block.attend(q, k_ext, v_ext, 128**-0.5)
        return torch.autograd.grad(out, (q, k, v), dout)

    triton_rows, grads = key_rows._use_triton, {}
    comm.all_to_all_into = _no_transfer  # what kv_exchange calls
    for mode in ("triton", "pytorch ops"):
        key_rows._use_triton = triton_rows if mode == "triton" else (lambda *_: False)
        ms = _kernel_ms(step, by_name=True)
        rest = {n: t for n, t in ms.items() if n not in ("forward", "backward") and t > 0.004}
        print(
            f"    {mode}: FlexAttention {ms['forward'] + ms['backward']:.3f} ms, the rest "
            f"{sum(rest.values()):.3f} ms (of which the transfer's stand-in fill "
            f"{sum(t for n, t in rest.items() if 'FillFunctor' in n):.3f})"
        )
        for name, t in sorted(rest.items(), key=lambda x: -x[1]):
            print(f"      {t:.3f}  {name}")
        grads[mode] = step()
    key_rows._use_triton = triton_rows
    same = all(torch.equal(a, b) for a, b in zip(grads["triton"], grads["pytorch ops"]))
    print(f"    gradients identical both ways: {same}", flush=True)


def _pair_kernel_ms(block, queries: int, keys: int, dev: torch.device) -> dict[str, float]:  # noqa: ANN001
    """One rank's pair (``block``, a MaskedBlock) on random bf16 inputs, 32/8 heads x 128."""
    q, k, v, dout = _inputs(queries, keys, dev)

    def step() -> None:
        out = block.attend(q, k, v, 128**-0.5)
        torch.autograd.grad(out, (q, k, v), dout)

    return _kernel_ms(step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[4, 2])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument(
        "--exchange",
        action="store_true",
        help="time each rank's whole forward+backward with the exchange's copies (no transfer)",
    )
    args = p.parse_args()
    seq, dev = args.seq_len, torch.device("cuda")
    for world in args.ranks:
        lengths = make_case(f"docs-{seq}", world, 4096, 0).lengths  # the masks bench's batch
        spec = MaskSpec.build(Documents.from_lengths(lengths), True, None, None)
        placement = placement_for(spec, world, "zigzag")
        print(f"== {world} ranks, {seq} tokens, {len(lengths)} documents")
        for rank in range(world):
            ex = kv_exchange(spec, placement, rank)
            keys = padded_keys(ex.positions.numel(), seq)
            block = fetched_plan(spec, placement, rank, ex.positions, "flex", keys).mask
            assert block is not None, "a packed batch's pair is partial"
            bm = block.block_mask(torch.empty(1, 32, 1, 1, device=dev))
            full, partial = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
            queries = placement.positions(rank).numel()
            if args.exchange:
                print(f"rank {rank}: fetched {ex.fetched} keys, served {sum(ex.serve_counts)}")
                _rank_step_ms(ex, block, queries, keys, dev)
                continue
            ms = _pair_kernel_ms(block, queries, keys, dev)
            total = sum(ms.values())
            print(
                f"rank {rank}: fetched {ex.fetched} keys, served {sum(ex.serve_counts)}, "
                f"padded keys {keys}, visible pairs {block.pair.visible}, tiles full {full} "
                f"partial {partial} | kernels forward {ms['forward']:.3f} backward "
                f"{ms['backward']:.3f} other {ms['other']:.3f} = {total:.2f} ms",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
