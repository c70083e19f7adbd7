"""The numbers behind the report: plottable values, smoothing, the mean and spread of one
algorithm over its seeds, and the time spent in each phase of a step.

They live apart from the plots because the tables use them too (the timing table and
the stacked bars both come from `phase_times`), and because none of this needs
matplotlib.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from resd.analysis.report.runs import Run
from resd.rundir import PHASES


def _number(value: Any) -> float | None:
    """A plottable float, or None for missing, non-numeric and boolean values."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over rows, skipping rows where it is missing."""
    xs, ys = [], []
    for row in rows:
        x, y = _number(row.get("step")), _number(row.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def smoothing_window(n: int) -> int:
    """About 5% of the run: per-step training metrics over a batch of 8 are very noisy."""
    return max(1, n // 20)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@dataclass
class Band:
    """One algorithm's curve: the mean over its runs (seeds) and their min/max spread."""

    label: str
    x: list[float]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    runs: int


def group_curve(
    label: str,
    runs: list[Run],
    key: str,
    *,
    source: str = "metrics",
    axis: str = "step",
    smooth: bool = False,
) -> Band:
    """Mean and min/max of `key` over `runs` at every x that at least one run reached.

    source: "metrics" (per training step) or "evals" (per evaluation).
    axis:   "step", or "samples" = step × samples_per_step, the cumulative number of
            rollouts drawn, so that algorithms with different batch shapes compare at
            equal interaction budget.
    smooth: moving-average each run before aggregating (train metrics are noisy).
    Where some seeds ran longer than others, the tail aggregates the longer ones only.
    """
    values_at: dict[float, list[float]] = defaultdict(list)
    for run in runs:
        xs, ys = series(run.metrics if source == "metrics" else run.evals, key)
        if smooth:
            ys = moving_average(ys, smoothing_window(len(ys)))
        scale = run.samples_per_step if axis == "samples" else 1
        for x, y in zip(xs, ys, strict=True):
            values_at[x * scale].append(y)
    xs = sorted(values_at)
    return Band(
        label=label,
        x=xs,
        mean=[_mean(values_at[x]) for x in xs],
        lo=[min(values_at[x]) for x in xs],
        hi=[max(values_at[x]) for x in xs],
        runs=len(runs),
    )


def phase_times(run: Run) -> dict[str, list[float]]:
    """Seconds per step for each phase, plus "other" = step time − the timed phases.

    "other" is what no phase timer covers: pruning the playbook at the start of a step,
    the solution buffer, writing logs.
    """
    times = {p: [_number(m.get(f"time_{p}")) or 0.0 for m in run.metrics] for p in PHASES}
    totals = [_number(m.get("time_step")) or 0.0 for m in run.metrics]
    timed = [sum(times[p][i] for p in PHASES) for i in range(len(totals))]
    times["other"] = [max(0.0, t - s) for t, s in zip(totals, timed, strict=True)]
    return times
