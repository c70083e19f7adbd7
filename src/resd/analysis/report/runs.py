"""Reading the run directories that a report is made of.

This is plain file reading (YAML, JSON, JSON lines) and nothing heavier, so that a run
directory copied back from a GPU machine can be reported on a laptop without torch.
One of `RUN_MARKERS` makes a directory a run; every other file may be missing (a run
that was killed early, an algorithm that keeps no playbook) and then reads as empty or
None, so that each section of the report can say what was not recorded instead of
failing.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resd.rundir import read_jsonl, reward_keys, samples_per_step

log = logging.getLogger(__name__)

# A directory holding any of these is a run; one holding none may hold runs below it.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")
# The config.yaml keys the report computes with (samples per step = their product);
# every other value is only shown, as it is.
COUNT_KEYS = ("batch_size", "rollouts_per_prompt")
# The training-rollout metrics of metrics.jsonl that the learning curves and the summary
# table show.
TRAIN_KEYS = ("reward", "score", "success_rate")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError:
        log.warning("%s: not valid JSON, ignored", path)
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(errors="replace"))
    except yaml.YAMLError:
        log.warning("%s: not valid YAML, ignored", path)
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class Run:
    """Everything a run directory holds; a missing file reads as empty / None."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    playbook_history: list[dict[str, Any]]
    playbook: dict[str, Any] | None
    playbook_md: str | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", "unknown"))

    @property
    def seed(self) -> Any:
        return self.config.get("seed", "?")

    @property
    def samples_per_step(self) -> int:
        """Rollouts drawn per optimizer step: batch_size × rollouts_per_prompt.

        The x axis "samples drawn" compares algorithms at equal interaction budget.
        Missing keys fall back to TrainConfig's defaults, as the trainer would have.
        """
        return samples_per_step(self.config)

    @property
    def steps(self) -> int:
        if isinstance(self.summary.get("steps"), int):
            return self.summary["steps"]
        return int(self.metrics[-1].get("step", len(self.metrics))) if self.metrics else 0

    @property
    def reward_keys(self) -> list[str]:
        """The `rewards/<name>` columns of its training steps and evaluations, in the order
        first logged: where a list of reward functions scores the replies, each one's mean."""
        return reward_keys([*self.metrics, *self.evals])

    @property
    def eval_before(self) -> dict[str, Any] | None:
        return self.summary.get("eval_before") or (self.evals[0] if self.evals else None)

    @property
    def eval_after(self) -> dict[str, Any] | None:
        """The last evaluation; None when there was only one (that is a "before")."""
        after = self.summary.get("eval_after") or (self.evals[-1] if self.evals else None)
        before = self.eval_before
        if after is None or (before is not None and after.get("step") == before.get("step")):
            return None
        return after


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _check_counts(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """`config` if its `COUNT_KEYS` are whole numbers >= 1 (or missing), else a ValueError
    naming the file and the key, before any of the report is written: a foreign or
    hand-edited `batch_size: large` would otherwise fail in int() while a page is built,
    with a message that names neither."""
    for key in COUNT_KEYS:
        value = config.get(key)
        whole = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
        if value is not None and not (whole and value >= 1):
            raise ValueError(f"report: {path}: {key}: expected a whole number >= 1, got {value!r}")
    return config


def load_run(path: str | Path) -> Run:
    path = Path(path)
    md = path / "playbook.md"
    return Run(
        path=path,
        config=_check_counts(_read_yaml(path / "config.yaml"), path / "config.yaml"),
        summary=_read_json(path / "summary.json") or {},
        metrics=read_jsonl(path / "metrics.jsonl"),
        evals=read_jsonl(path / "eval.jsonl"),
        samples=read_jsonl(path / "samples.jsonl"),
        playbook_history=read_jsonl(path / "playbook_history.jsonl"),
        playbook=_read_json(path / "playbook.json"),
        playbook_md=md.read_text(errors="replace") if md.exists() else None,
    )


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs keyed by algorithm (sorted), each group sorted by directory name."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.name):
        groups[run.algorithm].append(run)
    return dict(sorted(groups.items()))


def find_runs(path: Path) -> list[Run]:
    """The run directories directly below `path` (a comparison directory)."""
    return [load_run(p) for p in sorted(path.iterdir()) if is_run_dir(p)]
