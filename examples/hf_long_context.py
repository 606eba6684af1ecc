"""Fine-tune step of a randomly initialised Llama on a long sequence, context-parallel.

One line switches a Hugging Face model to ring attention (``attn_implementation="ringattn"``
after ``ringattn.integrations.transformers.register()``); ``shard_batch`` gives each rank its
part of the batch. Run on CPUs or GPUs:

    torchrun --nproc-per-node=2 examples/hf_long_context.py --seq-len 8192 --steps 3

Prints the loss (the one-process value) and tokens/s per step.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import ringattn.integrations.transformers as ringattn_hf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    ringattn_hf.register()
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(0)  # the same weights and batch on every rank
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="ringattn", dtype=torch.bfloat16 if cuda else torch.float32
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=device)
    part = ringattn_hf.shard_batch({"input_ids": ids, "labels": ids})

    for step in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss = model(**part).loss  # this rank's share of the global mean
        loss.backward()
        for param in model.parameters():  # every rank saw its own tokens
            dist.all_reduce(param.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if rank == 0:
            print(
                f"step {step}: loss {float(total):.4f}, {args.seq_len / elapsed:,.0f} tokens/s "
                f"on {world} ranks ({device.type})",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
