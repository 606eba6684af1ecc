"""The cross-rank description exchange on its own: shared memory and the all-gather."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def run_exchanges(rank: int, world: int) -> dict:
    from ringattn import agreement, checks

    found: dict = {}
    for name, env in (("board", "1"), ("gather", "0")):
        os.environ["RINGATTN_SHARED_MEMORY_CHECK"] = env
        group = dist.new_group(list(range(world)), backend="gloo")
        cpu = torch.device("cpu")
        rows = [agreement.exchange(group, cpu, [rank, call, 7]) for call in range(50)]
        found[f"{name}_uses_board"] = agreement._BOARDS[group] is not None
        found[f"{name}_rows_ok"] = all(
            r == [[other, call, 7] for other in range(world)] for call, r in enumerate(rows)
        )
        mine = [0, 1, 4, 2, 8 if rank == 0 else 6, 8, 16, 16, 1, 0, 1, 0, 0, 0]
        try:
            checks._agree_across_ranks(group, None, mine, None)
            found[f"{name}_mismatch"] = "no error"
        except ValueError as err:
            found[f"{name}_mismatch"] = str(err)
    return found
