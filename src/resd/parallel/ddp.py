"""Several processes, each with a full replica (strategy `ddp`), and what every
multi-process strategy shares: the process group and the collectives on results.

Every process holds its own share of the prompts and the same playbook. What must agree
across processes is made to agree explicitly: results that change shared state (bullet
tags, curator operations, new solutions) are gathered and applied on every process in
the order of the global rollout index, so the playbook is identical everywhere and
identical to a one-process run; gradients are summed across processes (each process's
loss is already divided by the *global* token or sequence count), so every process
takes the same step.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from resd.parallel.base import Parallel, clip_gradients


class ProcessGroup(Parallel):
    """The process group of a launcher (`accelerate launch`, `torchrun`): rank, world size
    and the collectives every multi-process strategy uses."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
            # A process group left open at exit can abort the interpreter (gloo's threads).
            atexit.register(self._destroy)

    def device(self, requested: str) -> str:
        if requested == "auto" and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def max(self, value: int) -> int:
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """After a run that ended well on every rank: wait for all, then take the groups down
        together, so that no rank tears its group down while another still uses it."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @staticmethod
    def _destroy() -> None:
        """At exit, whatever happened before: no barrier, since a rank that failed must not
        wait for the others."""
        if dist.is_initialized():
            dist.destroy_process_group()


class DDP(ProcessGroup):
    """A full model and optimizer per process; gradients summed by hand after the backward
    passes, one all-reduce per step whatever the number of micro-batches."""

    name = "ddp"

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        max_grad_norm: float | None,
    ) -> float:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        grad_norm = clip_gradients(params, max_grad_norm)
        optimizer.step()
        return grad_norm
