"""Data parallelism over processes, for `accelerate launch` / `torchrun`.

Every rank holds the full model, its own share of the prompts and the same playbook.
What must agree across ranks is made to agree explicitly:

- results that change shared state (bullet tags, curator operations, new solutions)
  are gathered and applied on every rank in the order of the global rollout index, so
  the playbook is identical everywhere and identical to a one-process run;
- gradients are summed across ranks after each backward pass (the loss on each rank is
  already divided by the *global* token count), so every rank takes the same step.

Without a launcher (no WORLD_SIZE in the environment) this is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


class Distributed:
    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        if requested == "auto" and self.enabled and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def shard(self, items: list) -> list[int]:
        """Global indices this rank owns: a strided share, so shares differ by at most one."""
        return list(range(self.rank, len(items), self.world_size))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_indexed(self, pairs: list[tuple[int, Any]]) -> list[Any]:
        """Concatenate (global index, value) lists from all ranks, ordered by index."""
        merged = [p for part in self.gather(pairs) for p in part]
        return [value for _, value in sorted(merged, key=lambda p: p[0])]

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()
