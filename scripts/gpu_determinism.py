"""Run-to-run determinism of ringattn on GPUs: run with ``torchrun --nproc-per-node=<GPUs>``.

For every backend, causal and full, each strategy runs forward+backward twice on the same
inputs; the outputs and gradients are compared bit for bit, next to one-GPU SDPA doing the
same. Prints a table last and writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn

SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def grads(fn, q, k, v, dout):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    rank = dist.get_rank()
    rows = []
    for backend in SDPA:
        for causal in (True, False):
            g = torch.Generator(device=device).manual_seed(5)
            full = [
                torch.randn(1, h, 16384, 128, generator=g, device=device, dtype=torch.bfloat16)
                for h in (32, 8, 8, 32)
            ]
            local = [ringattn.shard(x) for x in full]

            def sdpa(q, k, v, backend=backend, causal=causal):
                # Expanded K/V heads: not every backend's SDPA takes grouped heads.
                k, v = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
                with sdpa_kernel([SDPA[backend]]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            methods = {"one GPU SDPA": (sdpa, full)}
            for strategy in ("ring", "allgather", "ulysses"):
                methods[strategy] = (
                    lambda q, k, v, s=strategy, backend=backend, causal=causal: ringattn.attention(
                        q, k, v, causal=causal, strategy=s, backend=backend
                    ),
                    local,
                )
            for name, (fn, inputs) in methods.items():
                first = grads(fn, *inputs)
                second = grads(fn, *inputs)
                same = [bool(torch.equal(a, b)) for a, b in zip(first, second)]
                flags = torch.tensor(same, device=device, dtype=torch.int32)
                dist.all_reduce(flags, op=dist.ReduceOp.MIN)
                rows.append(
                    {
                        "backend": backend,
                        "causal": causal,
                        "method": name,
                        "identical": dict(
                            zip(("out", "dq", "dk", "dv"), map(bool, flags.tolist()))
                        ),
                    }
                )
    dist.destroy_process_group()
    if rank != 0:
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'backend':<10} {'mask':<7} {'method':<14} bitwise identical across two runs")
    for r in rows:
        same = " ".join(f"{n}:{'yes' if v else 'NO'}" for n, v in r["identical"].items())
        print(
            f"{r['backend']:<10} {'causal' if r['causal'] else 'full':<7} {r['method']:<14} {same}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
