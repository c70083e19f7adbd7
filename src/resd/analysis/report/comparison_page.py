"""The report of a comparison directory: a row per run and per algorithm, and the
learning curves of each algorithm as its mean over seeds with a min/max band.

The per-run sections (step times, playbook, examples, token losses) are left out: over
many runs they would bury the comparison, and the page tells the reader to run
`resd report` on a single run's directory for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resd.analysis.report.curves import _mean, _number
from resd.analysis.report.markup import (
    PlotSink,
    details,
    esc,
    not_recorded,
    page,
    pre,
    section,
    table,
)
from resd.analysis.report.plots import plot_comparison
from resd.analysis.report.runs import Run, group_runs
from resd.rundir import EVAL_KEYS, metric_keys


def _final_eval(run: Run, key: str) -> float | None:
    row = run.eval_after or run.eval_before
    return _number(row.get(key)) if row else None


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    return f"{_mean(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


def _step_times(run: Run) -> list[float]:
    return [v for v in (_number(m.get("time_step")) for m in run.metrics) if v is not None]


def comparison_tables(groups: dict[str, list[Run]]) -> str:
    run_rows = []
    for algorithm, runs in groups.items():
        for run in runs:
            before, after = run.eval_before or {}, run.eval_after or {}
            run_rows.append(
                [run.name, algorithm, run.seed, run.steps, run.steps * run.samples_per_step,
                 _number(before.get("task_mean@k")), _number(after.get("task_mean@k")),
                 _number(before.get("case_mean@k")), _number(after.get("case_mean@k")),
                 run.summary.get("stopped_early") or ""]
            )  # fmt: skip
    run_headers = ["run", "algorithm", "seed", "steps", "samples drawn",
                   "task_mean@k before", "task_mean@k after",
                   "case_mean@k before", "case_mean@k after", "stopped early"]  # fmt: skip
    # the accuracies, then each reward function's final mean where a list of them scored
    keys = metric_keys(r.eval_after or r.eval_before or {} for rs in groups.values() for r in rs)
    group_rows = []
    for algorithm, runs in groups.items():
        cells: list[Any] = [algorithm, len(runs)]
        for key in keys:
            cells.append(_spread([v for r in runs if (v := _final_eval(r, key)) is not None]))
        step_means = [_mean(phase_total) for r in runs if (phase_total := _step_times(r))]
        cells.append(_spread(step_means))
        group_rows.append(cells)
    group_headers = ["algorithm", "runs", *(f"final {k}" for k in keys), "s / step"]
    return (
        "<h3>Runs</h3>"
        + table(run_headers, run_rows)
        + "<h3>By algorithm: mean [min, max] over runs</h3>"
        + table(group_headers, group_rows)
    )


def comparison_report(path: Path, runs: list[Run], sink: PlotSink) -> str:
    groups = group_runs(runs)
    summary = section("summary", "1. Runs", comparison_tables(groups))

    curves = []
    # each reward function's mean too (`rewards/<name>`), where a list of them scored
    parts = tuple(dict.fromkeys(k for r in runs for k in r.reward_keys))
    train = plot_comparison(groups, ("reward", "score", *parts), source="metrics", smooth=True)
    if train:
        caption = (
            "Training reward and score, and each reward function's where a list of them "
            "scored; each run smoothed by a moving average of ~5% of its steps; line: mean "
            "over seeds, band: min/max over seeds."
        )
        curves.append(sink.embed("compare_train", train, caption))
    else:
        curves.append(not_recorded("training metrics"))
    evals = plot_comparison(groups, (*EVAL_KEYS, *parts), source="evals", smooth=False)
    if evals:
        caption = "Evaluation metrics; line: mean over seeds, band: min/max over seeds."
        curves.append(sink.embed("compare_eval", evals, caption))
    else:
        curves.append(not_recorded("evaluation (no eval.jsonl in any run)"))
    learning = section("learning", "2. Learning curves", "".join(curves))

    extra = path / "comparison.json"
    meta = (
        details("comparison.json", pre(extra.read_text(errors="replace")))
        if extra.exists()
        else not_recorded("comparison.json")
    )
    hint = (
        "<p>For the step times, playbook, examples and token losses of one run, run "
        "<code>resd report</code> on its directory.</p>"
    )
    nav = [("summary", "runs"), ("learning", "learning curves"), ("meta", "metadata")]
    body = (
        f"<p>Comparison directory: <code>{esc(path)}</code></p>"
        + summary
        + learning
        + section("meta", "3. Metadata", meta + hint)
    )
    return page(f"resd comparison: {path.name}", nav, body)
