"""Per-rank worker: a tiny Llama (GQA) with attn_implementation="ringattn" against the same
model on one process (importable by spawned ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cases import caught

SEQ, VOCAB = 32, 101


def _config(family: str = "llama", **overrides):
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[family]
    sizes = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "mistral":
        sizes["sliding_window"] = 4096  # longer than the sequence: plain causal
    return cls(**{**sizes, **overrides})


def _batch() -> dict:
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def loss_and_grads(rank: int, world: int, implementation: str, family: str = "llama") -> dict:
    """One forward+backward: the loss and every parameter's gradient (summed over ranks).

    ``implementation``: "default" (the model's own attention, one process), "ringattn", or
    "set:ringattn" (built with the default, then switched with set_attn_implementation).
    """
    from transformers import AutoModelForCausalLM

    import ringattn.integrations.transformers as hf

    parallel = implementation != "default"
    if parallel:
        hf.register()
    torch.manual_seed(0)
    kwargs = {"attn_implementation": "ringattn"} if implementation == "ringattn" else {}
    model = AutoModelForCausalLM.from_config(_config(family), **kwargs)
    if implementation == "set:ringattn":
        model.set_attn_implementation("ringattn")
    batch = _batch()
    if parallel:
        batch = hf.shard_batch(batch)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    total = loss.detach().clone()
    if parallel:
        dist.all_reduce(total)
        for g in grads.values():
            dist.all_reduce(g)
    return {"loss": float(total), "grads": grads}


def run_errors(rank: int, world: int) -> dict:
    """What the integration refuses: padding, output_attentions, sliding windows."""
    from transformers import AutoModelForCausalLM

    import ringattn.integrations.transformers as hf

    hf.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="ringattn")
    found = {}
    batch = _batch()
    padded = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
    padded["attention_mask"][0, -3:] = 0
    windowed = AutoModelForCausalLM.from_config(
        _config("mistral", sliding_window=8), attn_implementation="ringattn"
    )
    cases = {
        "sliding_window": lambda: windowed(**hf.shard_batch(batch)),
        "padding": lambda: hf.shard_batch(padded),
        "unknown_key": lambda: hf.shard_batch(dict(batch, pixel_values=batch["input_ids"])),
        "output_attentions": lambda: model(**hf.shard_batch(batch), output_attentions=True),
    }
    for name, body in cases.items():
        found[name] = caught(body)
    return found
