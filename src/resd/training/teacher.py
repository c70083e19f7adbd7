"""Teacher weights: which parameters score the student's response in the privileged context.

- `ema`          : a slowly moving average of the student, θ_T ← (1 − r)·θ_T + r·θ after each
                   optimizer step (RESD: r = 1e-4; SDPO default 0.05; SDFT 0.01). Stable
                   targets, but at tiny r it is almost the base model (the paper's runs used 1e-4).
- `base`         : the initial weights, frozen.
- `live`         : the current student itself under no_grad; no extra memory.
- `trust_region` : logits (1 − w)·base + w·current: a teacher that can move, but only so far.

With LoRA, no second copy of the base weights is ever made: the `base` teacher is the
student with its adapter disabled, and the `ema` teacher is a second set of adapter
tensors that is swapped in for the teacher's forward pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from resd.config import TEACHER_KINDS


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Teacher:
    def __init__(
        self,
        student: nn.Module,
        kind: str = "ema",
        update_rate: float = 1e-4,
        mix_weight: float = 0.5,
    ) -> None:
        if kind not in TEACHER_KINDS:
            raise ValueError(f"teacher: expected one of {TEACHER_KINDS}, got {kind!r}")
        if not 0.0 <= update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate: must be in [0, 1], got {update_rate}")
        if not 0.0 <= mix_weight <= 1.0:
            raise ValueError(f"trust_region_weight: must be in [0, 1], got {mix_weight}")
        self.kind = kind
        self.update_rate = update_rate
        self.mix_weight = mix_weight
        self.lora = is_peft(student)
        self.copy: nn.Module | None = None  # a full frozen model (non-LoRA ema/base/trust_region)
        self.adapter: dict[str, torch.Tensor] = {}  # the EMA adapter tensors (LoRA ema)
        if self.lora:
            if kind == "ema":
                self.adapter = {
                    n: p.detach().clone() for n, p in adapter_parameters(student).items()
                }
        elif kind != "live":
            self.copy = copy.deepcopy(student)
            self.copy.requires_grad_(False)
            self.copy.eval()

    @torch.no_grad()
    def match_student_layout(self, student: nn.Module) -> None:
        """After the student was sharded: hold the EMA adapter in the same shards, so the
        swap and the EMA update stay local copies (a no-op without LoRA or sharding)."""
        if not self.adapter:
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for n, p in adapter_parameters(student).items():
            if isinstance(p, DTensor) and not isinstance(self.adapter[n], DTensor):
                self.adapter[n] = distribute_tensor(self.adapter[n], p.device_mesh, p.placements)

    @torch.no_grad()
    def logits(
        self, student: nn.Module, forward: Callable[[nn.Module], torch.Tensor]
    ) -> torch.Tensor:
        """Run `forward(model)` with the teacher's weights and return its logits."""
        return self.mix(self.outputs(student, forward))

    @torch.no_grad()
    def outputs(
        self, student: nn.Module, forward: Callable[[nn.Module], torch.Tensor]
    ) -> list[torch.Tensor]:
        """`forward(model)` under the teacher's weights: one output, or the trust-region
        teacher's two (the base model's, the current one's), for `mix` to join.

        Apart, because where `forward` gives final hidden states (the chunked loss) they
        must be joined as logits, after the output layer: its soft cap (Gemma 2) is not
        linear, and without autocast the layer takes only its own dtype."""
        if self.kind == "trust_region":
            return [self._base_logits(student, forward), forward(student)]
        return [self._one_output(student, forward)]

    def mix(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """The teacher's logits from `outputs`' logits: (1 − w)·base + w·current in fp32
        for the trust-region teacher, the one output for any other."""
        if self.kind != "trust_region":
            (only,) = logits
            return only
        base, current = logits
        return torch.lerp(base.float(), current.float(), self.mix_weight)

    def _one_output(
        self, student: nn.Module, forward: Callable[[nn.Module], torch.Tensor]
    ) -> torch.Tensor:
        if self.kind == "live":
            return forward(student)
        if self.kind == "base":
            return self._base_logits(student, forward)
        if self.lora:
            with self._swapped_adapter(student):
                return forward(student)
        return forward(self.copy)

    def head(self, student: nn.Module) -> nn.Module:
        """The output layer that turns the teacher's hidden states into logits."""
        return (self.copy or student).get_output_embeddings()

    def _base_logits(
        self, student: nn.Module, forward: Callable[[nn.Module], torch.Tensor]
    ) -> torch.Tensor:
        if self.lora:
            with student.disable_adapter():
                return forward(student)
        return forward(self.copy)

    @contextmanager
    def _swapped_adapter(self, student: nn.Module) -> Iterator[None]:
        params = adapter_parameters(student)
        saved = {n: p.detach().clone() for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data.copy_(self.adapter[n])
            yield
        finally:
            for n, p in params.items():
                p.data.copy_(saved[n])

    @torch.no_grad()
    def update(
        self, student: nn.Module, full_weights: Iterable[torch.Tensor] | None = None
    ) -> None:
        """Call after every optimizer step. `full_weights` (in parameter order) stands in
        for the student's parameters when those are partitioned away (ZeRO-3)."""
        if self.kind != "ema":
            return
        if self.lora:
            for n, p in adapter_parameters(student).items():
                self.adapter[n].lerp_(p.detach().to(self.adapter[n].dtype), self.update_rate)
            return
        assert self.copy is not None
        sources = full_weights if full_weights is not None else student.parameters()
        for t, s in zip(self.copy.parameters(), sources, strict=True):
            t.lerp_(s.detach().to(t.dtype), self.update_rate)

    def load(self, path: Path) -> None:
        """Restore what cannot be rebuilt from the student (saved by the trainer's checkpoint).

        Call before the copy is sharded: the file holds full tensors.
        """
        if not path.exists():
            return
        if self.adapter:
            for n, t in load_file(str(path)).items():
                self.adapter[n].copy_(t)
        elif self.copy is not None:
            # Tied weights may be stored under one name or under both.
            tensors = load_file(str(path))
            result = self.copy.load_state_dict(tensors, strict=False)
            state = self.copy.state_dict()
            loaded = {state[k].data_ptr() for k in tensors if k in state}
            missing = [k for k in result.missing_keys if state[k].data_ptr() not in loaded]
            if result.unexpected_keys or missing:
                raise ValueError(
                    f"{path}: does not fit the model (missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]})"
                )
