"""Per-rank worker: a tiny Llama (GQA) with attn_implementation="ringattn" against the same
model on one process (importable by spawned ranks)."""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ringattn

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
    if family == "qwen2":
        sizes["use_sliding_window"] = False  # its default; windowed layers are asked for
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
    """What the integration refuses: packed position ids without documents, a padding mask
    given to the model, a wrong documents argument, unknown keys, output_attentions."""
    from transformers import AutoModelForCausalLM

    import ringattn.integrations.transformers as hf

    hf.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(), attn_implementation="ringattn")
    found = {}
    batch = _batch()
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -3:] = 0
    plain = hf.shard_batch(batch)
    packed = _packed(world)[0]
    cut = {k: v for k, v in hf.shard_batch(packed).items() if k != hf.DOCUMENTS_KEY}
    cases = {
        "packed_without_documents": lambda: model(**cut),
        "mask_given_to_model": lambda: model(**plain, attention_mask=ringattn.shard(mask, dim=1)),
        "documents_type": lambda: model(**plain, ringattn_documents=[[SEQ]]),
        "unknown_key": lambda: hf.shard_batch(dict(batch, pixel_values=batch["input_ids"])),
        "output_attentions": lambda: model(**plain, output_attentions=True),
    }
    for name, body in cases.items():
        found[name] = caught(body)
    return found


# Packed rows (documents per row; 1-token documents and documents longer than a rank's
# shard), as a padding-free collator makes them: position ids restart at every document
# and each document's first label is -100.
PACKED_SEQ = 48
PACKED_LENGTHS = [[1, 20, 3, 24], [30, 1, 1, 16]]


RANDOM_PACKED = 3  # random packed batches per world size


def _lengths(kind: str) -> list[list[int]]:
    """``"packed"``: the fixed mix; ``"randomN"``: random cuts of each row (seeded)."""
    if kind == "packed":
        return PACKED_LENGTHS
    rng = random.Random(int(kind.removeprefix("random")))
    rows = []
    for _ in range(rng.choice((1, 2))):
        cuts = sorted(rng.sample(range(1, PACKED_SEQ), rng.randint(1, 9)))
        rows.append([b - a for a, b in zip([0, *cuts], [*cuts, PACKED_SEQ])])
    return rows


def _packed(world: int, kind: str = "packed") -> tuple[dict, list[list[int]]]:
    lengths = _lengths(kind)
    g = torch.Generator().manual_seed(7 + world)
    ids = torch.randint(0, VOCAB, (len(lengths), PACKED_SEQ), generator=g)
    positions = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    labels = ids.clone()
    labels[positions == 0] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, lengths


IGNORE = -100


def _padded() -> dict:
    """Right padding on row 0, left padding on row 1; padding labels are -100."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2, PACKED_SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    mask[1, :7] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[1, 7] = IGNORE  # a padding token does not predict the first token
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# Models with windows shorter than the sequence: Mistral (every layer, the window passed as
# an argument) and Qwen2 with alternating windowed and full layers (config.layer_types).
WINDOWED = {
    "mistral": dict(sliding_window=8),
    "qwen2": dict(
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


def _model(family: str, implementation: str | None, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    kwargs = {"attn_implementation": implementation} if implementation else {}
    model = AutoModelForCausalLM.from_config(_config(family, **overrides), **kwargs)
    return model.to(torch.float64)


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _loss(logits: torch.Tensor, shifted: torch.Tensor, count) -> torch.Tensor:
    """Next-token loss summed over labelled tokens / ``count``, in float64 (transformers'
    own loss runs in float32, too coarse to compare float64 gradients)."""
    flat = logits.reshape(-1, logits.size(-1))
    return F.cross_entropy(flat, shifted.reshape(-1), ignore_index=IGNORE, reduction="sum") / count


def _shifted(labels: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(labels, IGNORE)
    out[:, :-1] = labels[:, 1:]
    return out


def _run_parallel(model, batch: dict, world: int, layout: str = "zigzag") -> dict:
    """Forward+backward context-parallel: the full logits, the loss and the gradients."""
    import ringattn.integrations.transformers as hf

    part = hf.shard_batch(batch, layout=layout)
    shifted, count = part.pop("shift_labels"), part.pop("num_items_in_batch")
    del part["labels"]
    out = model(**part)
    out.loss = _loss(out.logits, shifted, count)
    out.loss.backward()
    documents = part.get(hf.DOCUMENTS_KEY)
    if documents is not None:
        logits = ringattn.unshard(out.logits.detach(), dim=1, documents=documents)
    else:
        logits = ringattn.unshard(out.logits.detach(), dim=1, layout=layout)
    loss = out.loss.detach().clone()
    grads = _grads(model)
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)
    return {"logits": logits, "loss": float(loss), "grads": grads}


def run_masked_batches(rank: int, world: int) -> dict:
    """Every masked case on one process group (float64): packed rows (Llama, and Mistral
    with a window), a padded batch, and the windowed models."""
    import ringattn.integrations.transformers as hf

    hf.register()
    found = {}
    for family, overrides in (("llama", {}), ("mistral", WINDOWED["mistral"])):
        model = _model(family, "ringattn", **overrides)
        found[f"packed-{family}"] = _run_parallel(model, _packed(world)[0], world)
    for n in range(RANDOM_PACKED):
        model = _model("llama", "ringattn")
        kind = f"random{n}"
        found[f"{kind}-llama"] = _run_parallel(model, _packed(world, kind)[0], world)
    found["padded-llama"] = _run_parallel(_model("llama", "ringattn"), _padded(), world)
    for family, overrides in WINDOWED.items():
        model = _model(family, "ringattn", **overrides)
        found[f"window-{family}"] = _run_parallel(model, _batch_of(PACKED_SEQ), world)
    # Every layer windowed: the contiguous layout (K/V travel to the next rank only).
    hf.register(layout="contiguous")
    model = _model("mistral", "ringattn", **WINDOWED["mistral"])
    found["contiguous-mistral"] = _run_parallel(model, _batch_of(PACKED_SEQ), world, "contiguous")
    hf.register()
    if world == 2:
        found["errors"] = run_errors(rank, world)
    return found


def _batch_of(seq: int) -> dict:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def one_process(name: str, world: int) -> dict:
    """The one-process result a case of :func:`run_masked_batches` must give.

    Packed rows: the same model on each document alone (its own forward, labels and
    gradients; the global label count as ``num_items_in_batch``, so losses and gradients
    add up). Padded and windowed batches: the model's own attention with the full batch.
    """
    kind, family = name.split("-")
    overrides = WINDOWED.get(family, {}) if kind != "padded" else {}
    kind = "window" if kind == "contiguous" else kind
    model = _model(family, None, **overrides)
    if kind != "packed" and not kind.startswith("random"):
        batch = _padded() if kind == "padded" else _batch_of(PACKED_SEQ)
        shifted = _shifted(batch.pop("labels"))
        logits = model(**batch).logits
        loss = _loss(logits, shifted, (shifted != IGNORE).sum())
        loss.backward()
        return {"logits": logits.detach(), "loss": float(loss.detach()), "grads": _grads(model)}
    batch, lengths = _packed(world, kind)
    ids, labels = batch["input_ids"], batch["labels"]
    count = sum(sum(n - 1 for n in row) for row in lengths)
    logits = torch.zeros(*ids.shape, VOCAB, dtype=torch.float64)
    loss = 0.0
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            doc = slice(start, start + n)
            out = model(input_ids=ids[b : b + 1, doc]).logits
            doc_loss = _loss(out, _shifted(labels[b : b + 1, doc]), count)
            doc_loss.backward()  # gradients accumulate over the documents
            logits[b, doc] = out.detach()[0]
            loss += float(doc_loss.detach())
            start += n
    return {"logits": logits, "loss": loss, "grads": _grads(model)}
