"""DeepSpeed ZeRO for the policy (strategy "deepspeed"), kept to what the trainer needs.

The trainer owns its loop: a step has as many micro-batches as the rollouts need, and
there is one optimizer step at its end. DeepSpeed's unmanaged gradient accumulation
fits that: `backward` only accumulates, `step` reduces over ranks, clips and updates.

What differs from the other strategies:
- forwards of the policy go through the engine (under ZeRO-3 a forward of the bare
  module computes wrong gradients), so the trainer calls `Distributed.policy(model)`;
- DeepSpeed averages gradients over ranks, while each rank's loss is already divided
  by the global token count, so the loss is multiplied by the world size;
- checkpoints hold full tensors and name-keyed optimizer state, the same layout as
  ddp/fsdp checkpoints, gathered with DeepSpeed's `safe_get_full_*` helpers.

The EMA teacher and the sampling copy stay whole on every rank (not partitioned).
Runs on CPU (gloo) as well, which is how it is tested; `pip install 'resd[deepspeed]'`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resd.config import ConfigError
from resd.parallel.base import check_finite_gradient, without_tied_copies
from resd.parallel.ddp import ProcessGroup

log = logging.getLogger(__name__)

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "strategy: deepspeed needs the deepspeed package: pip install 'resd[deepspeed]'"
        ) from exc
    return deepspeed


def zero_options(stage: int | None) -> dict[str, Any]:
    """The `zero_optimization` section: from accelerate's DeepSpeed config if there is one.

    `accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml` exports the
    stage (ACCELERATE_DEEPSPEED_ZERO_STAGE) or a DeepSpeed JSON file; the resd config's
    `zero_stage`, when set, wins.
    """
    options: dict[str, Any] = {}
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if path and path.lower() != "none" and Path(path).is_file():
        options = dict(json.loads(Path(path).read_text()).get("zero_optimization", {}))
    env_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if "stage" not in options and env_stage.isdigit():
        options["stage"] = int(env_stage)
    if stage is not None:
        options["stage"] = stage
    options.setdefault("stage", 2)
    if options["stage"] not in (1, 2, 3):
        raise ConfigError(f"zero_stage: expected 1, 2 or 3, got {options['stage']!r}")
    return options


# A build of a torch extension holds its folder's `lock` for a minute or two at most.
STALE_LOCK_S = 600


def stale_build_locks(now: float | None = None) -> list[Path]:
    """Locks in torch's extension folders that a killed build left behind. DeepSpeed loads
    its ops (on CPU, the shared-memory collective) as torch extensions, each start under a
    file lock; a process killed while it held one (SIGTERM, SIGKILL: no `finally` runs)
    leaves the file, and every later start waits for it forever, without a word."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time() if now is None else now
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]  # the default root has py311_cpu/
    return sorted(p for p in locks if now - p.stat().st_mtime > STALE_LOCK_S)


def make_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    zero: dict[str, Any],
    max_grad_norm: float | None,
):
    deepspeed = import_deepspeed()
    for lock in stale_build_locks():
        log.warning("DeepSpeed will wait forever for %s, a lock over %d minutes old: a build "
                    "killed while it held it leaves it behind. If no other run is starting, "
                    "delete it.", lock, STALE_LOCK_S // 60)  # fmt: skip
    config = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the trainer batches
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # `step()` is the accumulation boundary
        "gradient_clipping": max_grad_norm or 0.0,  # 0: DeepSpeed does not clip
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # ZeRO-3 keeps only this rank's slice


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) one at a time; a collective per ZeRO-3 parameter."""
    deepspeed = import_deepspeed()
    for name, param in model.named_parameters():
        if not is_partitioned(param):
            yield name, param.detach()
            continue
        with deepspeed.zero.GatheredParameters([param]):
            yield name, param.detach().clone()


def full_state_dict(model: nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (None elsewhere); gathered parameter by parameter."""
    state = {}
    for name, tensor in full_parameters(model):  # every rank takes part in each gather
        if is_main:
            state[name] = tensor.to("cpu", copy=True)
    if not is_main:
        return None
    persistent = set(model.state_dict())  # keys only: ZeRO-3 tensors there are empty
    for name, buffer in model.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().cpu().clone()
    return state


def full_optimizer_state(engine, model: nn.Module, is_main: bool) -> dict[str, Any] | None:
    """AdamW state in the layout of `torch.distributed.checkpoint`'s full optimizer state
    dict (keyed by parameter name), so ddp/fsdp runs can load it and vice versa; on rank 0
    (None elsewhere), though every rank takes part in the gathers. Before the first
    update the state is empty, as torch's is (DeepSpeed raises if asked for it then)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = _optimizer_step(engine)
    state: dict[str, dict[str, torch.Tensor]] = {}
    names = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        names.append(name)
        if not step:  # no update yet: no state to save, and DeepSpeed has none to gather
            continue
        shape = param.ds_shape if is_partitioned(param) else param.shape
        entry = {"step": torch.tensor(float(step))}
        for key in OPTIMIZER_KEYS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:
                raise RuntimeError(f"deepspeed: no optimizer state {key!r} for {name}")
            entry[key] = value.reshape(shape).to("cpu", copy=True) if is_main else value
        if is_main:
            state[name] = entry
    if not is_main:
        return None
    groups = [
        {k: v for k, v in group.items() if k != "params"} | {"params": names}
        for group in engine.optimizer.param_groups[:1]
    ]
    return {"state": state, "param_groups": groups}


def _create_optimizer_state(engine) -> None:
    """Give DeepSpeed's inner AdamW its (zero) state before its first step.

    ZeRO creates the Adam moments of its flat fp32 partitions lazily, in the first
    `step()` (stages 1 and 2 only then link each parameter to its slice of them), so a
    checkpoint loaded before that has nowhere to go: a `--resume` under ZeRO-3 raised
    KeyError. Creating the moments as AdamW would (zeros, step 0), and linking them, is
    what that first step does, minus the update.
    """
    zero_optimizer = engine.optimizer
    inner = zero_optimizer.optimizer
    flats = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)  # stages 1-2
    if flats is None:
        flats = zero_optimizer.fp32_partitioned_groups_flat  # stage 3
    for flat in flats:
        if not inner.state[flat]:
            inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}  # fmt: skip
    if not getattr(zero_optimizer, "_hp_optimizer_states_linked", True):
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def load_optimizer_state(engine, model: nn.Module, saved: dict[str, Any]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    state = saved.get("state", {})
    if state and not all(isinstance(k, str) for k in state):
        raise ValueError("optimizer.pt: expected parameter-name keys (a checkpoint from resd)")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if state and set(state) != set(trainable):
        missing, extra = sorted(set(trainable) - set(state)), sorted(set(state) - set(trainable))
        raise ValueError(
            f"optimizer.pt: its parameters do not match the model's (missing {missing[:3]}, "
            f"unknown {extra[:3]}); was it saved by a run of another model or LoRA setting?"
        )
    if state:
        _create_optimizer_state(engine)
    step = 0
    for name, param in model.named_parameters():
        if name not in state:
            continue
        for key in OPTIMIZER_KEYS:
            safe_set_full_optimizer_state(param, state[name][key].to(torch.float32), key)
        step = int(float(state[name]["step"]))
    for per_param in engine.optimizer.optimizer.state.values():
        if "step" in per_param:
            per_param["step"] = torch.tensor(float(step))


def _optimizer_step(engine) -> int:
    """The AdamW step count (DeepSpeed's inner optimizer holds flat partitions)."""
    for per_param in engine.optimizer.optimizer.state.values():
        if "step" in per_param:
            return int(float(per_param["step"]))
    return 0


class Zero(ProcessGroup):
    """The policy and its AdamW in a DeepSpeed engine, ZeRO stage 1, 2 or 3."""

    name = "deepspeed"
    lockstep = True  # policy forwards and backwards go through the engine: collective

    def __init__(self, stage: int | None = None) -> None:
        import_deepspeed()  # fail before the process group exists, with the install hint
        super().__init__()
        self.options = zero_options(stage)
        self.sharded = self.options["stage"] == 3
        self.engine = None  # made by `prepare`

    def check(self, cfg: Any) -> None:
        if self.sharded and cfg.lora:
            # ZeRO-3 partitions the adapter too; the EMA adapter swap needs it whole.
            raise ConfigError("lora: not supported with ZeRO-3; use strategy=fsdp or zero_stage=2")
        if self.sharded and cfg.loss_chunk_size:
            # ZeRO-3 frees the output head when the forward returns; the chunks need it after.
            raise ConfigError("loss_chunk_size: not supported with ZeRO-3; use strategy=fsdp")

    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> None:
        self.engine = make_engine(model, optimizer, self.options, max_grad_norm)

    def policy(self, model: nn.Module) -> nn.Module:
        """The engine for the policy it wraps (teacher and sampling copies are never
        wrapped): under ZeRO-3 a forward of the bare module computes wrong gradients."""
        if self.engine is not None and model is self.engine.module:
            return self.engine
        return model

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over processes; ours must be summed.
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        max_grad_norm: float | None,
    ) -> float:
        self.engine.step()  # reduce, clip, update: the accumulation boundary
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else 0.0
        check_finite_gradient(norm)  # after the engine's update: stop before any save
        return norm

    def teacher_source(self, model: nn.Module) -> Iterator[torch.Tensor] | None:
        if not self.sharded:
            return None
        return (t for _, t in full_parameters(model))

    def full_parameters(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        yield from full_parameters(model)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if not self.sharded:
            return super().full_state_dict(model)
        state = full_state_dict(model, self.is_main)
        return without_tied_copies(model, state) if state is not None else None

    def full_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> dict[str, Any] | None:
        return full_optimizer_state(self.engine, model, self.is_main)

    def load_optimizer_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        load_optimizer_state(self.engine, model, state)
