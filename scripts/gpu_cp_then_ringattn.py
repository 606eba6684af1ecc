"""PyTorch's context_parallel, then ringattn, in one process on the same shapes (cuDNN).

``torchrun --nproc-per-node=2 scripts/gpu_cp_then_ringattn.py --json out.json``

PyTorch's cuDNN attention caches backward graphs by q, k and v alone while each graph bakes
in the layouts of out, dout and the log-sum-exp it was built with (torch <= 2.11; later
releases key on them too). PyTorch's CP and the ring call it on the same q/k/v blocks, so
the ring can be handed a graph built for CP's layouts. With the ring of this repository at
its base commit, this sequence gives NaN gradients and then "an illegal memory access was
encountered" on 2x H200 (torch 2.11); it is the check for a fix. Runs CP (causal,
forward+backward, both rotate methods, GQA then MHA), then ringattn forward+backward on the
same inputs, and compares the ring's output and gradients with one GPU's.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel

import ringattn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _torch_cp(mesh, q, k, v, dout, rotate: str) -> None:
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    q, k, v, dout = (x.clone() for x in (q, k, v, dout))
    _cp_options.enable_load_balance = True
    set_rotate_method(rotate)
    buffers = [q, k, v, dout]
    with context_parallel(
        mesh, buffers=buffers, buffer_seq_dims=[2] * 4, no_restore_buffers=set(buffers)
    ):
        leaves = [x.requires_grad_() for x in (q, k, v)]
        for _ in range(2):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(
                    *leaves, is_causal=True, enable_gqa=k.size(1) != q.size(1)
                )
            torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    set_rotate_method("allgather")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    results = []
    for kv_heads in (8, 32):
        g = torch.Generator(device="cuda").manual_seed(kv_heads)
        shapes = [(1, 32, args.seq_len, 128), (1, kv_heads, args.seq_len, 128)]
        q, k, v, dout = (
            torch.randn(shapes[i], generator=g, device="cuda", dtype=torch.bfloat16)
            for i in (0, 1, 1, 0)
        )
        for rotate in ("alltoall", "allgather"):
            _torch_cp(mesh, q, k, v, dout, rotate)
        # The ring on the same shapes, in this process, after CP's cuDNN calls.
        shards = [ringattn.shard(x).contiguous() for x in (q, k, v, dout)]
        leaves = [x.clone().requires_grad_() for x in shards[:3]]
        out = ringattn.ring_attention(*leaves, causal=True, backend="cudnn")
        grads = torch.autograd.grad(out, leaves, shards[3])
        torch.cuda.synchronize()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
            ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=kv_heads != 32)
            ref_grads = torch.autograd.grad(ref, ref_in, dout)
        errors = [_rel(out, ringattn.shard(ref))]
        errors += [_rel(a, ringattn.shard(b)) for a, b in zip(grads, ref_grads)]
        results.append({"kv_heads": kv_heads, "rel_errors_out_dq_dk_dv": errors})
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    ok = all(max(r["rel_errors_out_dq_dk_dv"]) < 2e-2 for r in results)
    if dist.get_rank() == 0:
        print("cp-then-ringattn:", "PASSED" if ok else "FAILED", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seq_len": args.seq_len, "results": results, "passed": ok}, f)
    dist.destroy_process_group()
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
