"""The interface every parallel strategy implements, and the one-process strategy.

The trainer talks to one `Parallel` object, chosen once at construction
(`resd.parallel.make_parallel`), for everything that depends on how the run is spread
over processes: which rollouts this process owns, how results are gathered, how a loss
becomes a gradient and a gradient an update, and how full weights and optimizer state
are read and written. `Parallel` itself is the single-process case: everything is local,
and every collective is the identity. The strategies for several processes (ddp, fsdp,
DeepSpeed ZeRO) override what they change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class NonFiniteGradient(ValueError):
    """The step's gradient norm is nan or inf: the update is refused before it reaches the
    weights, so the run stops with its last checkpoint intact (a ValueError: the cause is
    nearly always a setting, such as a learning rate far too high)."""


def clip_gradients(params: list[nn.Parameter], max_grad_norm: float | None) -> float:
    """Clip to `max_grad_norm` (0 or None: measure only) and return the norm before
    clipping; raise NonFiniteGradient when it is not finite (every process sees the same
    norm, so every process raises)."""
    limit = max_grad_norm or math.inf
    norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, limit)))
    check_finite_gradient(norm)
    return norm


def check_finite_gradient(norm: float) -> None:
    if not math.isfinite(norm):
        raise NonFiniteGradient(
            f"grad_norm: {norm} (the loss or its gradient is not finite); the update was not "
            "applied and the run stops with its last checkpoint as it was. A lower lr or a "
            "max_grad_norm usually helps."
        )


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective under FSDP), or `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases.add(name)
        else:
            first[id(param)] = name
    return aliases


def without_tied_copies(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A gathered state dict holds copies, so tied weights would be saved twice; keep each
    under its first name, as `save_pretrained` does for a whole model, so a checkpoint looks
    the same under every strategy."""
    aliases = tied_aliases(model)
    return {name: t for name, t in state.items() if name not in aliases}


class Parallel:
    """One process: no sharding, no collectives."""

    name = "single"
    world_size = 1
    rank = 0
    local_rank = 0
    # The policy's parameters are split over processes (fsdp, ZeRO-3): no process can
    # sample from it or save it without gathering, so sampling runs on a full copy.
    sharded = False
    # Forward and backward passes of the policy are collective calls, so every process
    # must run as many of them (padding rows where it has none of its own).
    lockstep = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, cfg: Any) -> None:
        """Refuse settings this strategy cannot run, before anything is loaded."""

    def device(self, requested: str) -> str:
        return requested

    # ---- sharing work and results ----------------------------------------------------------
    def shard(self, items: list) -> list[int]:
        """Global indices this process owns: a strided share (sizes differ by at most one)."""
        return list(range(self.rank, len(items), self.world_size))

    def gather(self, obj: Any) -> list[Any]:
        """Every process's object, in rank order (on every process)."""
        return [obj]

    def gather_indexed(self, pairs: list[tuple[int, Any]]) -> list[Any]:
        """Concatenate (global index, value) lists from all processes, ordered by index."""
        merged = [p for part in self.gather(pairs) for p in part]
        return [value for _, value in sorted(merged, key=lambda p: p[0])]

    def sum(self, value: float) -> float:
        return value

    def max(self, value: int) -> int:
        return value

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ---- the model and the optimizer step ----------------------------------------------------
    def shard_model(self, model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
        """Split `model` over processes in place (a no-op unless the strategy shards)."""
        return model

    def reshard(self, model: nn.Module | None) -> None:
        """Free gathered parameters a forward without backward left behind (fsdp)."""

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> None:
        """Hand the policy and its optimizer to an engine (DeepSpeed); a no-op otherwise."""

    def policy(self, model: nn.Module) -> nn.Module:
        """What to call for the policy's forward (an engine wrapping it, or the model)."""
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        max_grad_norm: float | None,
    ) -> float:
        """Clip and update; returns the gradient norm before clipping."""
        grad_norm = clip_gradients(params, max_grad_norm)
        optimizer.step()
        return grad_norm

    def teacher_source(self, model: nn.Module) -> Iterator[torch.Tensor] | None:
        """Full student weights for an EMA teacher copy, when the student's own
        parameters are partitioned away (ZeRO-3); None: the teacher reads the student."""
        return None

    # ---- full tensors, for sampling copies and checkpoints ---------------------------------
    def full_parameters(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every parameter, one at a time (collective when sharded:
        every process must drain the iterator)."""
        for name, param in model.named_parameters():
            yield name, full_tensor(param.detach())

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on rank 0 (None elsewhere)."""
        return model.state_dict() if self.is_main else None

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """The optimizer state keyed by parameter name, with full tensors, on rank 0.

        Names rather than positions, and full tensors rather than shards, so that any
        strategy and number of processes can load it.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.sharded)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return state if self.is_main else None

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a state from `full_optimizer_state` (every process passes the same one)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
