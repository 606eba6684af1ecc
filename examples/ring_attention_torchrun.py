"""Ring attention on every rank, checked against one-process attention.

Run with: torchrun --nproc-per-node=2 examples/ring_attention_torchrun.py
(NCCL when there are enough GPUs, else Gloo on the CPU.)
"""

import os

import torch
import torch.distributed as dist

import ringattn

use_cuda = torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
dist.init_process_group("nccl" if use_cuda else "gloo")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
if use_cuda:
    torch.cuda.set_device(device)
dtype = torch.bfloat16 if use_cuda else torch.float32

torch.manual_seed(0)  # every rank builds the same full tensors, then keeps its shard
q = torch.randn(1, 8, 4096, 64, device=device, dtype=dtype)
k = torch.randn(1, 2, 4096, 64, device=device, dtype=dtype)  # GQA: 8 query heads, 2 K/V heads
v = torch.randn(1, 2, 4096, 64, device=device, dtype=dtype)
q_shard, k_shard, v_shard = (ringattn.shard(x).requires_grad_() for x in (q, k, v))

out = ringattn.ring_attention(q_shard, k_shard, v_shard, causal=True)
out.float().pow(2).sum().backward()

want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
error = (ringattn.unshard(out).float() - want.float()).abs().max().item()
if dist.get_rank() == 0:
    print(f"{dist.get_world_size()} ranks, max |ring - one process| = {error:.2e}")
    print(f"dq shard {tuple(q_shard.grad.shape)}, dk shard {tuple(k_shard.grad.shape)}")
dist.destroy_process_group()
