"""Per-rank workers for the KV-cache inference tests (importable by spawned ranks).

Each worker runs many scripts of prefill/decode calls on one process group and compares
every output with float64 causal attention over all tokens so far, on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import ringattn
from ringattn import decode_kernels
from ringattn.inference import decode, prefill
from ringattn.layout import shard_for_rank
from ringattn.reference import attention

from cases import caught

# (name, batch, heads, kv_heads, head_dim)
SHAPES = [("gqa-b2", 2, 4, 2, 8), ("mqa", 1, 3, 1, 5), ("mha", 1, 2, 2, 4)]


def _inputs(seed: int, total: int, batch: int, heads: int, kv_heads: int, dim: int, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, total, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, total, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, total, dim, generator=g, dtype=torch.float64)
    return q, k, v, (q.to(dtype), k.to(dtype), v.to(dtype))


def script(world: int) -> list[tuple[str, int]]:
    """Multi-turn: a prompt, decode steps (one and several tokens), a second prompt that
    attends the imbalanced cache, more decoding."""
    return [
        ("prefill", 2 * world * 3),
        ("decode", 1),
        ("decode", 3),
        ("decode", 1),
        ("prefill", 2 * world * 2),
        ("decode", 2),
        ("decode", 1),
        ("prefill", 2 * world),
    ]


def run_script(
    rank: int,
    world: int,
    steps: list[tuple[str, int]],
    *,
    seed: int,
    shape: tuple,
    dtype=torch.float64,
    backend: str = "math",
    method: str = "auto",
    static: bool = False,
    capacity: int | None = None,
    decode_kernel: str = "auto",
) -> list[float]:
    """Every call's max abs error against float64 attention (decode outputs also checked
    equal on every rank)."""
    _, batch, heads, kv_heads, dim = shape
    total = sum(t for _, t in steps)
    q, k, v, (ql, kl, vl) = _inputs(seed, total, batch, heads, kv_heads, dim, dtype)
    cache = ringattn.KVCache(capacity=capacity)
    errors = []
    start = 0
    for op, t in steps:
        end = start + t
        want = attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True)[:, :, start:]
        piece = [x[:, :, start:end] for x in (ql, kl, vl)]
        if op == "prefill":
            mine = [shard_for_rank(x, rank, world, dim=2, layout="zigzag") for x in piece]
            got = prefill(*mine, cache, backend=backend, method=method)
            want = shard_for_rank(want, rank, world, dim=2, layout="zigzag")
        else:
            got = decode(*piece, cache, backend=backend, static=static, decode_kernel=decode_kernel)
            everyone = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(everyone, got.contiguous())
            assert all(torch.equal(e, got) for e in everyone), "decode differs across ranks"
        assert got.dtype == dtype and got.shape == want.shape
        errors.append(float((got.double() - want).abs().max()))
        start = end
    assert cache.total == total
    return errors


def correctness(rank: int, world: int) -> dict:
    """Every shape, both methods and auto, math and cpu kernels, float64; one float32."""
    found = {}
    for i, shape in enumerate(SHAPES):
        for method in ("pass_kv", "pass_q", "auto"):
            for backend in ("math", "cpu"):
                # Every combination on 1-2 ranks; on 3-4 (slower to run) a cross-section.
                cross = (i == 0 and backend == "cpu") or (i == 1 and method == "pass_q")
                if world > 2 and not cross:
                    continue
                key = f"{shape[0]}-{method}-{backend}"
                found[key] = run_script(
                    rank, world, script(world), seed=10 * i + 1, shape=shape, backend=backend,
                    method=method,
                )  # fmt: skip
    found["float32-cpu"] = run_script(
        rank, world, script(world), seed=7, shape=SHAPES[0], dtype=torch.float32, backend="cpu"
    )
    # The graph-capturable decode path (device-side lengths over the whole capacity), its
    # capacity attended in chunks of 256 slots (split-K) merged by log-sum-exp.
    chunk, decode_kernels._MAX_CHUNK = decode_kernels._MAX_CHUNK, 256
    found["static-decode"] = run_script(
        rank, world, script(world), seed=8, shape=SHAPES[0], static=True, capacity=1000
    )
    decode_kernels._MAX_CHUNK = chunk
    # The same through FlexAttention (its reference implementation on CPU): the block mask
    # built on the device from the used length, capacity in blocks of 128 slots.
    found["static-decode-flex"] = run_script(
        rank, world, script(world), seed=13, shape=SHAPES[1], static=True, capacity=300,
        decode_kernel="flex",
    )  # fmt: skip
    # Decoding from an empty cache: every step is a decode (T > 1 first, as a replicated prompt).
    found["decode-only"] = run_script(
        rank, world, [("decode", 5), ("decode", 1), ("decode", 2), ("prefill", 2 * world)],
        seed=9, shape=SHAPES[0],
    )  # fmt: skip
    # A first decode token lands on rank 0 alone; the prompt after it meets a cache that the
    # other ranks do not hold any of yet.
    for method in ("pass_kv", "pass_q"):
        found[f"lonely-{method}"] = run_script(
            rank, world, [("decode", 1), ("prefill", 2 * world), ("decode", 1)], seed=12,
            shape=SHAPES[1], method=method,
        )  # fmt: skip
    return found


def balance(rank: int, world: int) -> dict:
    """Per-rank cache lengths and memory after a prompt and many decode steps."""
    cache = ringattn.KVCache()
    q, k, v, _ = _inputs(3, 2 * world + 101, 1, 2, 1, 4, torch.float64)
    prefill(*(shard_for_rank(x[:, :, : 2 * world], rank, world, dim=2, layout="zigzag")
              for x in (q, k, v)), cache)  # fmt: skip
    for i in range(2 * world, 2 * world + 101):
        decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], cache, check="shapes")
    keys = cache.keys()
    assert keys is not None
    # The stored K/V really are the tokens at the positions the cache says it holds.
    positions = cache.positions()
    assert torch.equal(keys, k[:, :, positions]), "stored keys are not those of their positions"
    return {
        "length": cache.length,
        "lengths": cache.lengths(),
        "memory": cache.memory_bytes(),
        "positions": positions.tolist(),
        "total": cache.total,
    }


def errors(rank: int, world: int) -> dict:
    """Bad calls raise on every rank; the cache is unchanged and usable afterwards."""
    q, k, v, _ = _inputs(5, 4 * world + 4, 1, 4, 2, 8, torch.float64)
    cache = ringattn.KVCache()
    other = ringattn.KVCache()
    shard = [shard_for_rank(x[:, :, : 4 * world], rank, world, dim=2, layout="zigzag")
             for x in (q, k, v)]  # fmt: skip
    prefill(*shard, cache)
    step = [x[:, :, 4 * world : 4 * world + 1] for x in (q, k, v)]
    subgroup = dist.new_group(list(range(world)))
    found = {}
    bumped = step[0] + (1e-3 if rank == world - 1 else 0.0)
    found["differing_q"] = caught(lambda: decode(bumped, step[1], step[2], cache))
    longer = [x[:, :, 4 * world : 4 * world + (2 if rank == 0 else 1)] for x in (q, k, v)]
    found["differing_shapes"] = caught(lambda: decode(*longer, cache))
    found["dtype"] = caught(lambda: decode(*(x.float() for x in step), cache))
    found["kv_heads"] = caught(lambda: decode(step[0], step[1].repeat(1, 2, 1, 1),
                                              step[2].repeat(1, 2, 1, 1), cache))  # fmt: skip
    found["not_a_cache"] = caught(lambda: decode(*step, cache if rank else object()))  # type: ignore[arg-type]
    found["other_group"] = caught(lambda: decode(*step, cache, group=subgroup))
    found["other_cache"] = caught(lambda: decode(*step, cache if rank == 0 else other))
    found["bad_method"] = caught(lambda: prefill(*shard, cache, method="pass_x"))  # type: ignore[arg-type]
    odd = [x[:, :, :3] for x in shard]
    found["odd_prefill"] = caught(lambda: prefill(*odd, cache))
    found["bad_check"] = caught(lambda: decode(*step, cache, check="sometimes"))  # type: ignore[arg-type]
    found["bad_kernel"] = caught(lambda: decode(*step, cache, decode_kernel="fast"))  # type: ignore[arg-type]
    found["flash_on_cpu"] = caught(lambda: decode(*step, cache, decode_kernel="flash"))
    found["state"] = (cache.length, cache.total)
    # Still usable, and correct, after all of that.
    out = decode(*step, cache)
    end = 4 * world + 1
    want = attention(q[:, :, :end], k[:, :, :end], v[:, :, :end], causal=True)[:, :, -1:]
    found["after"] = float((out - want).abs().max())
    return found


def non_member(rank: int, world: int) -> tuple[str, str]:
    """A cache for a group this rank is not in raises at construction, without communicating."""
    group = dist.new_group([0])
    if rank == 0:
        return ("member", "")
    return caught(lambda: ringattn.KVCache(group))


def hf_generate(rank: int, world: int, parallel: bool = True) -> dict:
    """Greedy generation with a tiny Llama: a prompt, then a second turn that continues from
    the cache with new tokens. ``parallel``: attn_implementation="ringattn" with a RingCache
    (the prompt and the second turn's new tokens prefilled sharded), else one process with
    transformers' defaults."""
    import inspect

    from transformers import AutoModelForCausalLM

    from hf_cases import _config

    torch.manual_seed(0)
    kwargs = {}
    if parallel:
        import ringattn.integrations.transformers as hf
        from ringattn.integrations.transformers_cache import RingCache

        hf.register()
        kwargs["attn_implementation"] = "ringattn"
    model = AutoModelForCausalLM.from_config(_config(), **kwargs).eval()
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 101, (2, 8 * world), generator=g)  # divides into 2N chunks
    options = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False,
               "pad_token_id": None, "eos_token_id": None}  # fmt: skip
    cache = None
    if parallel:
        cache = RingCache(model)
        name = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        options[name] = cache
    with torch.no_grad():
        first = model.generate(prompt, **options)
        # The last generated token is not cached yet: with 4N - 1 more, 4N new tokens.
        more = torch.randint(0, 101, (2, 4 * max(world, 1) - 1), generator=g)
        second = model.generate(torch.cat([first, more], dim=1), **options)
    found = {"first": first.tolist(), "second": second.tolist()}
    if cache is not None:
        found["lengths"] = cache.layers[0].kv.lengths()
        found["positions"] = cache.layers[0].kv.positions().tolist()
        cache.close()
    return found


def all_cases(rank: int, world: int) -> dict:
    """One spawn per world size runs every case (spawning is the slow part)."""
    result = {"correctness": correctness(rank, world), "balance": balance(rank, world)}
    if world > 1:
        result["errors"] = errors(rank, world)
        result["non_member"] = non_member(rank, world)
    if world == 2:
        result["hf"] = hf_generate(rank, world)
    return result
