"""Hooks into a training run, for code that drives `Trainer` from Python.

Subclass `Callback` and override what you need; pass instances as
`Trainer(cfg, callbacks=[...])`. Every rank calls them, after the trainer has written
its own files for the event (only rank 0 writes), so a callback may read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resd.training.trainer import Trainer


class Callback:
    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each optimizer step; `metrics` is the row written to metrics.jsonl."""

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        """After each evaluation; `row` is the eval.jsonl row (None on ranks other than 0)."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After each checkpoint is written to `path`."""
