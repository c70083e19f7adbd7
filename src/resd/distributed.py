"""Data parallelism over processes, for `accelerate launch` / `torchrun`.

Every rank holds its own share of the prompts and the same playbook. What must agree
across ranks is made to agree explicitly:

- results that change shared state (bullet tags, curator operations, new solutions)
  are gathered and applied on every rank in the order of the global rollout index, so
  the playbook is identical everywhere and identical to a one-process run;
- gradients are summed across ranks (the loss on each rank is already divided by the
  *global* token count), so every rank takes the same step.

Three strategies for the weights:

- `ddp`: every rank holds the full model and optimizer; gradients are summed by hand
  after the backward passes (one all-reduce per step, whatever the micro-batch count);
- `fsdp`: the policy, its teacher/reference copies, gradients and optimizer state are
  sharded over ranks with FSDP2 (`fully_shard`, one unit per decoder layer), which is
  what ZeRO-3 does;
- `deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 for the policy and its optimizer (see
  `resd.zero`); teacher copies stay whole.

Sampling never touches shards: when the policy's parameters are split, each rank
samples from a full copy in the generation dtype, refreshed one gathered tensor at a
time after every optimizer step. Forward and backward passes are collective under
fsdp and deepspeed, so every rank runs the same number of them (see `Trainer._update`).

Checkpoints hold full (unsharded) tensors under every strategy, so a run saved under
one strategy or world size resumes under any other.

Without a launcher (no WORLD_SIZE in the environment) this is a no-op.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from resd.config import ConfigError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_strategy(requested: str) -> str:
    """`auto` follows the accelerate config the run was launched with.

    `accelerate launch --config_file configs/accelerate/fsdp.yaml` exports
    ACCELERATE_USE_FSDP, a DeepSpeed config ACCELERATE_USE_DEEPSPEED.
    """
    if requested != "auto":
        return requested
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "fsdp" if _env_flag("ACCELERATE_USE_FSDP") else "ddp"


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective under FSDP), or `t` itself."""
    return t.full_tensor() if _is_dtensor(t) else t


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


class Distributed:
    def __init__(self, strategy: str = "auto", zero_stage: int | None = None) -> None:
        self.strategy = resolve_strategy(strategy)
        self.engine = None  # the DeepSpeed engine, once `prepare` made one
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
            # A process group left open at exit can abort the interpreter (gloo's threads).
            atexit.register(self.close)
        self.zero: dict[str, Any] = {}
        if self.enabled and self.strategy == "deepspeed":
            from resd import zero

            zero.import_deepspeed()  # fail now, with the install hint
            self.zero = zero.zero_options(zero_stage)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """The policy's parameters are split over ranks (fsdp, ZeRO-3): no rank can
        sample from it or save it without gathering."""
        if not self.enabled:
            return False
        return self.fsdp or self.zero.get("stage") == 3

    @property
    def lockstep(self) -> bool:
        """Forward and backward passes of the policy are collective calls, so every rank
        must run as many of them."""
        return self.fsdp or self.deepspeed

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.strategy == "fsdp"

    @property
    def deepspeed(self) -> bool:
        return self.enabled and self.strategy == "deepspeed"

    # ---- the optimizer step, whatever the strategy --------------------------------------
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float
    ) -> None:
        """Hand the policy and its optimizer to DeepSpeed (a no-op for other strategies)."""
        if self.deepspeed:
            from resd import zero

            self.engine = zero.make_engine(model, optimizer, self.zero, max_grad_norm)

    def policy(self, model: nn.Module) -> nn.Module:
        """What to call for `model`'s forward: the DeepSpeed engine if it wraps `model`
        (teacher copies and the sampling copy are never wrapped), else `model` itself."""
        if self.engine is not None and model is self.engine.module:
            return self.engine
        return model

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is None:
            loss.backward()
            return
        # DeepSpeed averages gradients over ranks; ours must be summed.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(
        self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_grad_norm: float
    ) -> float:
        """Reduce gradients over ranks, clip, update; returns the pre-clip gradient norm."""
        if self.engine is not None:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else 0.0
        self.all_reduce_gradients(params)
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
        optimizer.step()
        return grad_norm

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

    def max(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def all_reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum gradients over ranks (FSDP already reduce-scatters them in backward)."""
        if not self.enabled or self.fsdp:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ---- sharding (strategy "fsdp") ------------------------------------------------------
    def shard_model(self, model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
        """Shard `model` in place, one FSDP unit per decoder layer plus the root.

        Gradients are summed, not averaged, over ranks: each rank's loss is already
        divided by the global token count, as under `ddp`.
        """
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import FSDPModule, fully_shard

        layer_types = set(getattr(model, "_no_split_modules", None) or [])
        base = getattr(model, "get_base_model", lambda: model)()
        layer_types |= set(getattr(base, "_no_split_modules", None) or [])
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        if not layers:
            raise ConfigError(
                f"strategy: fsdp needs the model's decoder layer class (`_no_split_modules`), "
                f"which {type(model).__name__} does not declare"
            )
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard_after_forward)
        # The root (embeddings, final norm, output head) stays gathered from forward to
        # backward: the chunked loss applies the head after the forward has returned.
        fully_shard(model, reshard_after_forward=False)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        return model

    def reshard(self, model: nn.Module | None) -> None:
        """Free gathered parameters a forward left behind (the root's, which backward
        would normally release; teachers have no backward)."""
        if not self.fsdp or model is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def full_parameters(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every parameter, gathered one at a time.

        Under FSDP and ZeRO-3 each gather is a collective, so every rank must drain the
        iterator.
        """
        if self.deepspeed:
            from resd import zero

            yield from zero.full_parameters(model)
            return
        for name, param in model.named_parameters():
            yield name, full_tensor(param.detach())

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on rank 0 (None elsewhere); collective when sharded.

        Gathered tensors are copies, so tied weights (input and output embeddings) would be
        saved twice; each parameter is kept under its first name, as `save_pretrained`
        does for a whole model, and the checkpoint looks the same under every strategy.
        """
        if not self.sharded:
            return model.state_dict() if self.is_main else None
        if self.deepspeed:
            from resd import zero

            state = zero.full_state_dict(model, self.is_main)
        else:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(model, options=options)
        if not self.is_main or state is None:
            return None
        aliases = tied_aliases(model)
        return {name: t for name, t in state.items() if name not in aliases}

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        """The optimizer state keyed by parameter name, on rank 0 (None elsewhere).

        Names rather than positions, and full tensors rather than shards, so that any
        strategy and world size can load it; collective when sharded.
        """
        if self.engine is not None:
            from resd import zero

            return zero.full_optimizer_state(self.engine, model, self.is_main)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # Every rank calls in: with a process group up, the state-dict helpers communicate.
        options = StateDictOptions(full_state_dict=True, cpu_offload=self.sharded)
        state = get_optimizer_state_dict(model, optimizer, options=options)
        return state if self.is_main else None

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a state from `full_optimizer_state` (every rank passes the same one)."""
        if self.engine is not None:
            from resd import zero

            zero.load_optimizer_state(self.engine, model, state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
