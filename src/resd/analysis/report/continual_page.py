"""The report of a `resd continual` folder: what each task's accuracy was after every
stage, what was forgotten, and each stage's own run.

A continual folder holds one run per stage, but they are not seeds of one algorithm: the
comparison page would average stage 1 (task A) with stage 2 (task B) "over runs". Its
numbers come from `continual.json`, which `resd continual` rewrites after every stage, so
a continual run still in progress gets a report of the rows done so far.
"""

from __future__ import annotations

import json
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
from resd.analysis.report.plots import plot_continual
from resd.analysis.report.runs import is_run_dir, load_run

CONTINUAL_FILE = "continual.json"
# The two matrices `resd continual` keeps: the accuracy key's (case_mean@k), and the
# per-task one beside it, each under its own names in continual.json.
MATRICES = (("accuracy", "heldout_accuracy"), ("accuracy_task", "heldout_accuracy_task"))
TASK_KEY = "task_mean@k"


def read_continual(path: Path) -> dict[str, Any]:
    """continual.json of a continual folder, or a ValueError that says what is wrong with it
    (a hand-edited or truncated file is one line of error, not a traceback)."""
    file = path / CONTINUAL_FILE
    try:
        data = json.loads(file.read_text(errors="replace"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"report: {file} is not valid JSON ({exc})") from None
    needed = ("rows", "tasks", "heldout", "accuracy", "heldout_accuracy", "metrics")
    missing = [key for key in needed if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"report: {file} has no {missing[0]!r}: not written by resd continual")
    return data


def _matrix_table(result: dict[str, Any], tasks_key: str, heldout_key: str) -> str:
    """Rows: before and after each stage; columns: the stages' tasks, then the held-out
    suites. A cell no row evaluated (a task not yet trained) is empty."""
    names = [*result["tasks"], *(f"held-out: {n}" for n in result["heldout"])]
    tasks, heldout = result.get(tasks_key) or [], result.get(heldout_key) or []
    rows = []
    for i, label in enumerate(result["rows"]):
        cells = [*(tasks[i] if i < len(tasks) else []), *(heldout[i] if i < len(heldout) else [])]
        rows.append([label, *(_number(c) for c in cells)])
    return table(["after", *names], rows)


def _metrics_table(result: dict[str, Any]) -> str:
    """Forgetting, backward transfer and each held-out suite's change, for both matrices;
    n/a where the run has not reached its last stage (or has one task)."""
    keys = [k for k in (result.get("accuracy_key", "case_mean@k"), TASK_KEY)
            if k in result["metrics"]]  # fmt: skip
    names = [("forgetting", "forgetting"), ("backward transfer", "backward_transfer")]
    rows: list[list[Any]] = []
    for label, name in names:
        values = [result["metrics"][k].get(name) for k in keys]
        rows.append([label, *("n/a" if v is None else f"{v:+.4f}" for v in values)])
    for suite in result["heldout"]:
        changes = [result["metrics"][k].get("heldout_change", {}).get(suite) for k in keys]
        rows.append([f"held-out {suite}: last row − before",
                     *("n/a" if v is None else f"{v:+.4f}" for v in changes)])  # fmt: skip
    return table(["metric", *keys], rows)


def section_accuracy(result: dict[str, Any], sink: PlotSink) -> str:
    key = result.get("accuracy_key", "case_mean@k")
    body = f"<h3>{esc(key)} (per test case)</h3>" + _matrix_table(result, *MATRICES[0])
    if result.get(MATRICES[1][0]):
        body += f"<h3>{TASK_KEY} (per task)</h3>" + _matrix_table(result, *MATRICES[1])
    body += (
        "<h3>Forgetting and transfer</h3>"
        + _metrics_table(result)
        + "<p>Forgetting: over the tasks before the last, the best accuracy a task had from "
        "the stage that trained it on, minus its final accuracy (≥ 0: lost). Backward "
        "transfer: final minus just-learnt accuracy (&lt; 0: later stages hurt it).</p>"
    )
    png = plot_continual(result)
    if png is not None:
        caption = (
            "Each task's accuracy after every stage (solid: trained tasks, from the stage "
            "that trained them or before; dashed: held-out suites, never trained on)."
        )
        body += sink.embed("continual_accuracy", png, caption)
    return section("accuracy", "1. Accuracy after each stage", body)


def section_stages(path: Path, result: dict[str, Any]) -> str:
    """One row per stage that ran: its environment, steps, the model it started from, its
    training rollouts (first and last step) and its own evaluation before and after."""
    stages = result.get("stages") or []
    if not stages:
        return section("stages", "2. Stages", not_recorded("a finished stage"))
    key = result.get("accuracy_key", "case_mean@k")
    rows = []
    for stage in stages:
        # the folder beside continual.json: the recorded `dir` is relative to where the
        # command ran, and the folder may have been moved since
        run_dir = path / Path(str(stage.get("dir", ""))).name
        metrics = load_run(run_dir).metrics if is_run_dir(run_dir) else []
        summary = stage.get("summary") or {}
        before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
        times = [t for t in (_number(m.get("time_step")) for m in metrics) if t is not None]
        rows.append([
            stage.get("name"), stage.get("env"), summary.get("steps"), stage.get("model_in"),
            _number(metrics[0].get("reward")) if metrics else None,
            _number(metrics[-1].get("reward")) if metrics else None,
            _number(before.get(key)), _number(after.get(key)),
            _mean(times) if times else None, summary.get("stopped_early") or "",
        ])  # fmt: skip
    headers = ["stage", "env", "steps", "started from", "reward, first step",
               "reward, last step", f"{key} before", f"{key} after", "s / step",
               "stopped early"]  # fmt: skip
    hint = (
        "<p>A stage's own evaluation uses its run's settings (its <code>eval_items</code>); "
        "the matrix above evaluates every row alike. For a stage's learning curves, "
        "playbook and samples, run <code>resd report</code> on its folder.</p>"
    )
    return section("stages", "2. Stages", table(headers, rows) + hint)


def continual_report(path: Path, sink: PlotSink) -> str:
    result = read_continual(path)
    meta = "".join(
        details(name, pre((path / name).read_text(errors="replace")))
        for name in ("continual-config.yaml", CONTINUAL_FILE)
        if (path / name).exists()
    )
    done = len(result["rows"]) - 1
    status = (
        f"<p>Continual run: <code>{esc(path)}</code>; {done} of {len(result['tasks'])} "
        f"stage{'s' * (len(result['tasks']) != 1)} done.</p>"
    )
    nav = [("accuracy", "accuracy"), ("stages", "stages"), ("meta", "metadata")]
    body = (
        status
        + section_accuracy(result, sink)
        + section_stages(path, result)
        + section("meta", "3. Metadata", meta)
    )
    return page(f"resd continual: {path.name}", nav, body)
