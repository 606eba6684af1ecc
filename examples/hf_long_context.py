"""Fine-tune step of a randomly initialised Llama on a long sequence, context-parallel.

One line switches a Hugging Face model to ring attention (``attn_implementation="ringattn"``
after ``ringattn.integrations.transformers.register()``); ``shard_batch`` gives each rank its
part of the batch. Run on CPUs or GPUs:

    torchrun --nproc-per-node=2 examples/hf_long_context.py --seq-len 8192 --steps 3

``--attention sdpa`` runs the same model on one process with PyTorch's SDPA instead, the
baseline (``python examples/hf_long_context.py --attention sdpa``). Prints the loss (the
one-process value), tokens/s and peak memory per step; ``--json`` also writes them to a file.
``--compile`` runs the model under ``torch.compile`` (its first step compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

import ringattn.integrations.transformers as ringattn_hf


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    add_model_arguments(p)
    p.add_argument("--json", default=None, help="write the run's numbers to this file")
    p.add_argument("--compile", action="store_true", help="torch.compile(model) first")
    return p.parse_args()


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The attention to use and the model's size (shared with hf_generate_long.py)."""
    p.add_argument("--attention", choices=["ringattn", "sdpa"], default="ringattn")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=None, help="default: 4 x hidden")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)


def llama_config(args: argparse.Namespace, max_positions: int) -> LlamaConfig:
    """A Llama of the size the arguments ask for."""
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max_positions,
    )


def setup(attention: str) -> tuple[torch.device, int, int]:
    """The device, rank and world size; a process group only for ring attention."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    if attention == "sdpa":
        if int(os.environ.get("WORLD_SIZE", 1)) != 1:
            raise SystemExit("--attention sdpa is the one-process baseline: run it with python")
        return device or torch.device("cpu"), 0, 1
    if cuda:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device or torch.device("cpu"), dist.get_rank(), dist.get_world_size()


def finish(record: dict, json_path: str | None, rank: int, ringattn: bool) -> None:
    """Write the run's record, leave the process group, and exit 3 if it ran out of memory."""
    if json_path and rank == 0:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)
    if ringattn:
        dist.destroy_process_group()
    if "out_of_memory" in record:
        raise SystemExit(3)


def main() -> None:
    args = parse_args()
    device, rank, world = setup(args.attention)
    ringattn = args.attention == "ringattn"
    if ringattn:
        ringattn_hf.register()
    config = llama_config(args, args.seq_len)
    cuda = device.type == "cuda"
    torch.manual_seed(0)  # the same weights and batch on every rank
    with device:  # initialise on the device: a large model is slow to initialise on the host
        model = AutoModelForCausalLM.from_config(
            config,
            attn_implementation=ringattn_hf.NAME if ringattn else "sdpa",
            dtype=torch.bfloat16 if cuda else torch.float32,
        )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if args.compile:
        # The attention function is one custom op in the graph; the first step compiles.
        model = torch.compile(model)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids}
    part = ringattn_hf.shard_batch(batch) if ringattn else batch
    record: dict = {
        "attention": args.attention,
        "ranks": world,
        "seq_len": args.seq_len,
        "compiled": args.compile,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "steps": [],
    }
    if rank == 0:
        print(f"{record['parameters'] / 1e6:,.0f}M parameters, {args.seq_len} tokens", flush=True)

    try:
        for step in range(args.steps):
            start = time.perf_counter()
            opt.zero_grad()
            loss = model(**part).loss  # with ring attention: this rank's share of the mean
            loss.backward()
            total = loss.detach().clone()
            if ringattn:
                for param in model.parameters():  # every rank saw its own tokens
                    dist.all_reduce(param.grad)
                dist.all_reduce(total)
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
            record["steps"].append(
                {"loss": float(total), "tokens_per_s": args.seq_len / elapsed, "peak_gib": peak}
            )
            if rank == 0:
                memory = f", peak {peak:.1f} GiB per GPU" if cuda else ""
                print(
                    f"step {step}: loss {float(total):.4f}, {args.seq_len / elapsed:,.0f} "
                    f"tokens/s on {world} rank(s) ({device.type}, {args.attention}){memory}",
                    flush=True,
                )
    except torch.OutOfMemoryError as error:
        record["out_of_memory"] = str(error).splitlines()[0]
        if rank == 0:
            print(f"out of memory at {args.seq_len} tokens: {record['out_of_memory']}", flush=True)
    if cuda:
        record["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    finish(record, args.json, rank, ringattn)


if __name__ == "__main__":
    main()
