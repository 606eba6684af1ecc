"""Greedy generation from a long prompt with a randomly initialised Llama, context-parallel.

Every rank calls ``model.generate`` with the same prompt and a ``RingCache``: the prompt is
prefilled sharded across the ranks (each runs its zigzag shard of the tokens through the
model and keeps its shard of every layer's K/V), then every decode step attends the new
token to all ranks' shards and merges the results with one small collective. Run on CPUs or
GPUs:

    torchrun --nproc-per-node=2 examples/hf_generate_long.py --prompt-len 8192 --new-tokens 16

``--attention sdpa`` runs the same model on one process with PyTorch's SDPA and transformers'
own cache, the baseline (``python examples/hf_generate_long.py --attention sdpa``): both
generate the same tokens. Prints prefill tokens/s, decode ms per token and peak memory;
``--json`` also writes them, with the generated tokens, to a file. A prompt length that
splits into 2N equal chunks is prefilled sharded; any other length runs replicated.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import time

import torch
from transformers import AutoModelForCausalLM

import ringattn.integrations.transformers as ringattn_hf
from ringattn.integrations.transformers_cache import RingCache

# The model's arguments and size, and the process set-up, are the training example's.
from hf_long_context import add_model_arguments, finish, llama_config, setup


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=16)
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on GPUs, float32 on CPUs")  # fmt: skip
    p.add_argument("--json", default=None, help="write the run's numbers to this file")
    return p.parse_args()


class ForwardTimer:
    """Wall time of every forward of ``model`` (the first is the prefill)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _before(self, *_: object) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _after(self, *_: object) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def main() -> None:
    args = parse_args()
    device, rank, world = setup(args.attention)
    ringattn = args.attention == "ringattn"
    if ringattn:
        ringattn_hf.register()
    cuda = device.type == "cuda"
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    )
    config = llama_config(args, args.prompt_len + args.new_tokens)
    torch.manual_seed(0)  # the same weights and prompt on every rank
    with device:
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=ringattn_hf.NAME if ringattn else "sdpa", dtype=dtype
        )
    model.eval()
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), device=device)
    timer = ForwardTimer(model, device)
    # transformers 5 names the argument `cache`; older releases `past_key_values`.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def options(new_tokens: int, cache: RingCache | None) -> dict:
        found = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                 "pad_token_id": None, "eos_token_id": None}  # fmt: skip
        if cache is not None:
            found[cache_arg] = cache
        return found

    # Warm-up (kernel plans, communicators, compiled merges) on a short prompt, not timed.
    with torch.no_grad(), RingCache(model) if ringattn else contextlib.nullcontext() as warm:
        model.generate(prompt[:, : 256 * world], **options(2, warm))
    timer.times.clear()
    cache = RingCache(model) if ringattn else None
    kwargs = options(args.new_tokens, cache)
    record: dict = {
        "attention": args.attention,
        "ranks": world,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    if rank == 0:
        print(f"{record['parameters'] / 1e6:,.0f}M parameters, prompt {args.prompt_len} tokens",
              flush=True)  # fmt: skip
    try:
        with torch.no_grad():
            out = model.generate(prompt, **kwargs)
        prefill_s = timer.times[0]
        decode_ms = 1e3 * sum(timer.times[1:]) / max(1, len(timer.times) - 1)
        record.update(
            tokens=out[:, args.prompt_len :].tolist(),
            prefill_s=prefill_s,
            prefill_tokens_per_s=args.batch * args.prompt_len / prefill_s,
            decode_ms_per_token=decode_ms,
        )
        if cache is not None:
            record["cache_tokens_per_rank"] = cache.layers[0].kv.lengths()
        if rank == 0:
            print(
                f"prefill {record['prefill_tokens_per_s']:,.0f} tokens/s ({prefill_s:.2f} s), "
                f"decode {decode_ms:.2f} ms per token on {world} rank(s) ({device.type}, "
                f"{args.attention}); tokens {record['tokens'][0][:8]}...",
                flush=True,
            )
    except torch.OutOfMemoryError as error:
        record["out_of_memory"] = str(error).splitlines()[0]
        if rank == 0:
            print(
                f"out of memory at {args.prompt_len} tokens: {record['out_of_memory']}", flush=True
            )
    if cuda:
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        record["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        if rank == 0:
            print(f"peak {record['peak_gib']:.1f} GiB per GPU", flush=True)
    finish(record, args.json, rank, ringattn)


if __name__ == "__main__":
    main()
