"""Parameters, gradients and optimizer state sharded over processes with FSDP2
(strategy `fsdp`, what ZeRO-3 does): the policy and its teacher / reference copies.

Forward and backward become collective, so every process runs the same number of them
(`lockstep`); sampling must not be, so it runs on a full copy per process, refreshed
after each optimizer step one gathered tensor at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from resd.config import ConfigError
from resd.parallel.base import without_tied_copies
from resd.parallel.ddp import ProcessGroup


class FSDP(ProcessGroup):
    name = "fsdp"
    sharded = True
    lockstep = True

    def shard_model(self, model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
        """Shard `model` in place, one FSDP unit per decoder layer plus the root.

        Gradients are summed, not averaged, over processes: each process's loss is already
        divided by the global token count, as under ddp.
        """
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # a PEFT model answers for its base model: attribute lookups fall through to it
        layer_types = set(getattr(model, "_no_split_modules", None) or [])
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
        """Free the root's gathered parameters after a forward that has no backward
        (teachers), which backward would otherwise release."""
        if model is None:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    # step: the gradients were reduce-scattered in backward; clip and update (Parallel.step)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Gathered on rank 0 (every process takes part), tied weights kept once."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return without_tied_copies(model, state) if self.is_main else None
