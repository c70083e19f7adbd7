"""Hooks into a training run, for code that drives `Trainer` from Python.

Subclass `Callback` and override what you need; pass instances as
`Trainer(cfg, callbacks=[...])`. Every rank calls them, after the trainer has written
its own files for the event (only rank 0 writes), so a callback may read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from resd.rundir import eval_metric, eval_metric_problem

if TYPE_CHECKING:
    from resd.training.trainer import Trainer


class Callback:
    def on_train_begin(self, trainer: Trainer) -> None:
        """When `train()` starts (a resumed run: at its checkpoint's step), after
        config.yaml is written and before the evaluation of the untrained model."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After each optimizer step; `metrics` is the row written to metrics.jsonl."""

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        """After each evaluation; `row` is the eval.jsonl row (None on ranks other than 0)."""

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """After each checkpoint is written to `path`."""

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """When the run has ended (at `steps`, or stopped early), after the final model,
        summary.json and the trackers are written and before `push_to_hub`'s upload:
        `summary` is what `train()` returns."""


HOOKS = ("on_train_begin", "on_step_end", "on_evaluate", "on_save", "on_train_end")


def checked_callbacks(callbacks: Any) -> list[Callback]:
    """The Trainer's `callbacks` as a list, each an object with every hook (a `Callback`
    subclass has them all). A class passed for an instance, a lone callback or an object
    of another library's kind failed at the first hook, after the model had loaded."""
    if isinstance(callbacks, (Callback, type)) or not hasattr(callbacks, "__iter__"):
        shown = callbacks.__name__ if isinstance(callbacks, type) else type(callbacks).__name__
        raise TypeError(f"callbacks: a list of resd.Callback objects, got {shown} (pass "
                        f"[{shown}()] or [your_callback])")  # fmt: skip
    listed = list(callbacks)
    for i, callback in enumerate(listed):
        if isinstance(callback, type):
            raise TypeError(f"callbacks: item {i} is the class {callback.__name__}, not an "
                            f"object of it: pass {callback.__name__}()")  # fmt: skip
        missing = [hook for hook in HOOKS if not callable(getattr(callback, hook, None))]
        if missing:
            raise TypeError(f"callbacks: item {i} ({type(callback).__name__}) has no "
                            f"{missing[0]}(); subclass resd.Callback and override the hooks "
                            "you need")  # fmt: skip
    return listed


EARLY_STOPPING_DEFAULTS = {"metric": "case_mean@k", "patience": 3, "min_delta": 0.0, "target": None}


def check_early_stopping(settings: dict[str, Any]) -> str | None:
    """What is wrong with an `early_stopping` mapping, or None: checked when the config is
    read, not at the first evaluation hours into the run."""
    unknown = sorted(set(settings) - set(EARLY_STOPPING_DEFAULTS))
    if unknown:
        return f"unknown key {unknown[0]!r} (known: {', '.join(EARLY_STOPPING_DEFAULTS)})"
    given = {**EARLY_STOPPING_DEFAULTS, **settings}
    metric_problem = eval_metric_problem(given["metric"])
    if metric_problem:
        return f"metric: {metric_problem}"
    patience, target = given["patience"], given["target"]
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int)
                                 or patience < 1):  # fmt: skip
        return f"patience: a number of evaluations >= 1, or null; got {patience!r}"
    for name in ("min_delta", "target"):
        value = given[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            return f"{name}: a number, got {value!r}"
    if given["min_delta"] is None or given["min_delta"] < 0:
        return f"min_delta: must be >= 0, got {given['min_delta']}"
    if patience is None and target is None:
        return "patience and target are both null: nothing would ever stop the run"
    return None


class EarlyStopping(Callback):
    """Ends the run when an evaluation metric stops improving, as transformers'
    EarlyStoppingCallback does: after `patience` evaluations in a row that beat the best
    so far by no more than `min_delta`, or as soon as the metric reaches `target`. The
    evaluation before training counts as the first. Reads the rows `Trainer.evaluate`
    writes (rank 0 decides; `Trainer.stop` takes every rank along) and keeps its count in
    the checkpoint, so a resumed run goes on counting where it stopped.

    `early_stopping: {metric: case_mean@k, patience: 3}` in a config adds one."""

    def __init__(
        self,
        metric: str = "case_mean@k",
        patience: int | None = 3,
        min_delta: float = 0.0,
        target: float | None = None,
    ) -> None:
        settings = {"metric": metric, "patience": patience, "min_delta": min_delta,
                    "target": target}  # fmt: skip
        problem = check_early_stopping(settings)
        if problem:
            raise ValueError(f"early_stopping: {problem}")
        self.metric, self.patience, self.min_delta, self.target = (
            metric, patience, float(min_delta), target
        )  # fmt: skip

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any] | None) -> None:
        if row is None:  # not rank 0
            return
        state = trainer.extra_state.setdefault("early_stopping", {"best": None, "waited": 0})
        value = eval_metric(row, self.metric, "early_stopping.metric")
        if self.target is not None and value >= self.target:
            trainer.stop(f"{self.metric} reached {value:.4g} (target {self.target:g}) "
                         f"at step {row['step']}")  # fmt: skip
            return
        if state["best"] is None or value > state["best"] + self.min_delta:
            state["best"], state["waited"] = value, 0
            return
        state["waited"] += 1
        if self.patience is not None and state["waited"] >= self.patience:
            trainer.stop(f"{self.metric} has not improved on {state['best']:.4g} "
                         f"for {state['waited']} evaluation{'s' * (state['waited'] != 1)} "
                         f"(step {row['step']})")  # fmt: skip
