"""Teacher weights: which parameters score the student's response in the privileged context.

- `ema`  : a slowly moving average of the student, θ_T ← (1 − r)·θ_T + r·θ after each
           optimizer step (RESD: r = 1e-4; SDPO default 0.05; SDFT 0.01). Stable
           targets, but at tiny r it is almost the base model (spec §8).
- `base` : the initial weights, frozen.
- `live` : the current student itself under no_grad; no extra memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

TEACHER_KINDS = ("ema", "base", "live")


class Teacher:
    def __init__(self, student: nn.Module, kind: str = "ema", update_rate: float = 1e-4) -> None:
        if kind not in TEACHER_KINDS:
            raise ValueError(f"teacher: expected one of {TEACHER_KINDS}, got {kind!r}")
        if not 0.0 <= update_rate <= 1.0:
            raise ValueError(f"teacher_update_rate: must be in [0, 1], got {update_rate}")
        self.kind = kind
        self.update_rate = update_rate
        self.copy: nn.Module | None = None
        if kind != "live":
            self.copy = copy.deepcopy(student)
            self.copy.requires_grad_(False)
            self.copy.eval()

    def module(self, student: nn.Module) -> nn.Module:
        return student if self.copy is None else self.copy

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Call after every optimizer step."""
        if self.kind != "ema" or self.copy is None:
            return
        for t, s in zip(self.copy.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach().to(t.dtype), self.update_rate)
