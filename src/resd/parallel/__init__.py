"""How a run is spread over processes: one strategy object, chosen once at the start.

    make_parallel("auto")   # single (no launcher), ddp, fsdp or deepspeed, per the launch

| strategy | policy weights, grads, AdamW | teacher copies | forwards |
|---|---|---|---|
| `single` (`base.Parallel`) | one process | whole | local |
| `ddp` (`ddp.DDP`) | a full replica per process; gradients summed by hand | whole | local |
| `fsdp` (`fsdp.FSDP`) | 1/N per process (FSDP2) | 1/N per process | collective |
| `deepspeed` (`zero.Zero`) | ZeRO stage 1: AdamW 1/N; 2: + grads; 3: + weights | whole | collective |

Sampling never touches shards: when the policy's parameters are split, each process
samples from a full copy, refreshed one gathered tensor at a time after every optimizer
step. Checkpoints hold full tensors and name-keyed optimizer state under every strategy,
so a run saved under one strategy or number of processes resumes under any other.
"""

from __future__ import annotations

import logging
import os

from resd.parallel.base import Parallel, full_tensor, tied_aliases

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
log = logging.getLogger(__name__)


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


def make_parallel(strategy: str = "auto", zero_stage: int | None = None) -> Parallel:
    """The strategy for this process: `single` without a launcher (no WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if strategy != "auto" or zero_stage is not None:
            asked = strategy if strategy != "auto" else f"zero_stage {zero_stage}"
            log.warning("strategy: %s asked for, but no launcher (accelerate launch, torchrun) "
                        "started this process: it runs alone, unsharded", asked)  # fmt: skip
        return Parallel()
    resolved = resolve_strategy(strategy)
    if resolved == "fsdp":
        from resd.parallel.fsdp import FSDP

        return FSDP()
    if resolved == "deepspeed":
        from resd.parallel.zero import Zero

        return Zero(zero_stage)
    from resd.parallel.ddp import DDP

    return DDP()


__all__ = [
    "STRATEGIES",
    "Parallel",
    "full_tensor",
    "make_parallel",
    "resolve_strategy",
    "tied_aliases",
]
