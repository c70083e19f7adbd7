"""The report's figures, each returned as PNG bytes (or None when its data is missing).

matplotlib is imported in `_figure` only, when the first figure is drawn: the CLI
imports this package just to register `resd report`, which must not cost a matplotlib
import, and a missing matplotlib should surface as one error naming the `report` extra
rather than break `import resd`. The DPI is fixed so that the images do not depend on
the local matplotlib configuration.
"""

from __future__ import annotations

import io
from typing import Any

from resd.analysis.report.curves import (
    _number,
    group_curve,
    moving_average,
    phase_times,
    series,
    smoothing_window,
)
from resd.analysis.report.markup import _fmt
from resd.analysis.report.runs import TRAIN_KEYS, Run
from resd.rundir import EVAL_KEYS, PHASES
from resd.training.playbook import SECTIONS

PLOT_DPI = 100


def _figure(rows: int, cols: int, width: float, height: float):
    """A new (figure, axes[rows][cols]); matplotlib is imported only here.

    `matplotlib.figure.Figure` is used directly instead of pyplot: no global state, no
    GUI backend; `savefig(..., format="png")` renders with Agg.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "resd report needs matplotlib; install it with: pip install resd[report]"
        ) from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def _samples_axis(ax, per_step: int) -> None:
    """A second x axis on top: samples drawn = step × samples per step."""
    axis = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda n: n / per_step))
    axis.set_xlabel("samples drawn")


def plot_learning_curves(run: Run) -> bytes | None:
    """Train reward/score/success per step (raw and smoothed), the loss, and eval metrics."""
    if not run.metrics:
        return None
    panels = 3 if run.evals else 2
    fig, axes = _figure(1, panels, 5.0 * panels, 4.0)
    ax = axes[0][0]
    for i, key in enumerate(TRAIN_KEYS):
        xs, ys = series(run.metrics, key)
        if not xs:
            continue
        colour = f"C{i}"
        window = smoothing_window(len(ys))
        if window > 1:
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(xs, moving_average(ys, window), color=colour, label=f"{key} (avg {window})")
        else:
            ax.plot(xs, ys, color=colour, marker=".", label=key)
    start = len(TRAIN_KEYS) + 1  # dashed, in colours of their own: one function's part
    for i, key in enumerate(run.reward_keys, start=start):
        xs, ys = series(run.metrics, key)
        if xs:
            window = smoothing_window(len(ys))
            smooth = moving_average(ys, window) if window > 1 else ys
            label = key if window == 1 else f"{key} (avg {window})"
            ax.plot(xs, smooth, color=f"C{i % 10}", linestyle="--", label=label)
    ax.set(title="training rollouts", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    _samples_axis(ax, run.samples_per_step)

    ax = axes[0][1]
    xs, ys = series(run.metrics, "loss")
    ax.plot(xs, ys, color="C3", marker="." if len(xs) < 50 else None)
    ax.set(title="self-distillation loss", xlabel="step")
    _samples_axis(ax, run.samples_per_step)

    if run.evals:
        ax = axes[0][2]
        for i, key in enumerate(EVAL_KEYS):
            xs, ys = series(run.evals, key)
            if xs:
                ax.plot(xs, ys, color=f"C{i}", marker="o", label=key)
        k = run.evals[-1].get("k", "?")
        ax.set(title=f"evaluation (k = {_fmt(k)})", xlabel="step", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
        _samples_axis(ax, run.samples_per_step)
    return _png(fig)


def plot_step_times(run: Run) -> bytes | None:
    if not run.metrics or not any(f"time_{p}" in run.metrics[0] for p in PHASES):
        return None
    steps = [_number(m.get("step")) or i + 1 for i, m in enumerate(run.metrics)]
    fig, axes = _figure(1, 1, 10.0, 4.0)
    ax = axes[0][0]
    bottom = [0.0] * len(steps)
    for i, (phase, values) in enumerate(phase_times(run).items()):
        ax.bar(steps, values, bottom=bottom, width=1.0, color=f"C{i}", label=phase, linewidth=0)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set(title="seconds per step, by phase", xlabel="step", ylabel="seconds")
    ax.legend(fontsize=8, ncol=len(PHASES) + 1, loc="upper left")
    return _png(fig)


def _section_heading(slug: str) -> str:
    return SECTIONS.get(slug, slug)


def plot_playbook(run: Run) -> bytes | None:
    """Entries per section over time (stacked area) and, per step, entries added (with
    those rewritten stacked on them) and removed (pruned, deleted or merged away)."""
    history = run.playbook_history
    if not history:
        return None
    slugs = list(SECTIONS)
    for row in history:
        slugs += [s for s in (row.get("sections") or {}) if s not in slugs]
    steps = [_number(row.get("step")) or 0.0 for row in history]
    counts = [[(row.get("sections") or {}).get(s, 0) for row in history] for s in slugs]
    used = [i for i, c in enumerate(counts) if any(c)]

    fig, axes = _figure(1, 2, 12.0, 4.0)
    ax = axes[0][0]
    if used:
        ax.stackplot(
            steps,
            [counts[i] for i in used],
            labels=[_section_heading(slugs[i]) for i in used],
            colors=[f"C{i}" for i in used],
        )
        ax.legend(fontsize=7, loc="upper left")
    ax.set(title="playbook entries per section", xlabel="step", ylabel="entries")

    ax = axes[0][1]
    added = [len(row.get("added") or []) for row in history]
    removed = [-len(row.get("removed") or []) for row in history]
    updated = [len(row.get("updated") or []) for row in history]  # older histories: none
    ax.bar(steps, added, width=1.0, color="C2", label="added", linewidth=0)
    if any(updated):
        ax.bar(steps, updated, bottom=added, width=1.0, color="C0", label="rewritten", linewidth=0)
    ax.bar(steps, removed, width=1.0, color="C3", label="removed", linewidth=0)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(title="entries added (+) / removed (−) per step", xlabel="step")
    ax.legend(fontsize=8)
    return _png(fig)


def _rows(run: Run, source: str) -> list[dict[str, Any]]:
    return run.metrics if source == "metrics" else run.evals


def plot_comparison(
    groups: dict[str, list[Run]], keys: tuple[str, ...], *, source: str, smooth: bool
) -> bytes | None:
    """One row per metric; columns: against step, against samples drawn.

    Each algorithm is its mean over seeds with a shaded min/max band; colours are fixed
    by the algorithm's position in `groups`, so they match across figures.
    """
    keys = tuple(
        k for k in keys if any(series(_rows(r, source), k)[0] for g in groups.values() for r in g)
    )
    if not keys:
        return None
    fig, axes = _figure(len(keys), 2, 12.0, 3.4 * len(keys))
    for row, key in enumerate(keys):
        for col, axis in enumerate(("step", "samples")):
            ax = axes[row][col]
            for i, (algorithm, runs) in enumerate(groups.items()):
                band = group_curve(algorithm, runs, key, source=source, axis=axis, smooth=smooth)
                if not band.x:
                    continue
                label = f"{algorithm} (n={band.runs})"
                marker = "o" if source == "evals" else None
                ax.plot(band.x, band.mean, color=f"C{i}", marker=marker, label=label)
                if band.runs > 1:
                    ax.fill_between(band.x, band.lo, band.hi, color=f"C{i}", alpha=0.2)
            xlabel = "step" if axis == "step" else "samples drawn"
            ax.set(title=f"{key} vs {xlabel}", xlabel=xlabel)
            ax.legend(fontsize=8)
    return _png(fig)


def plot_continual(result: dict[str, Any]) -> bytes | None:
    """Each task's accuracy (and each held-out suite's, dashed) after every stage of a
    `resd continual` run; a panel per matrix it kept (per test case, per task)."""
    panels = [(key, tasks, held) for key, tasks, held in (
        (result.get("accuracy_key", "case_mean@k"), "accuracy", "heldout_accuracy"),
        ("task_mean@k", "accuracy_task", "heldout_accuracy_task"),
    ) if result.get(tasks)]  # fmt: skip
    if not panels or len(result["rows"]) < 1:
        return None
    labels = ["before", *(f"after {k}" for k in range(1, len(result["rows"])))]
    fig, axes = _figure(1, len(panels), 6.0 * len(panels), 4.0)
    for col, (key, tasks_key, held_key) in enumerate(panels):
        ax = axes[0][col]
        lines = [(name, i, tasks_key, "-") for i, name in enumerate(result["tasks"])]
        lines += [(name, i, held_key, "--") for i, name in enumerate(result["heldout"])]
        for n, (name, i, source, style) in enumerate(lines):
            matrix = result.get(source) or []
            points = [
                (r, row[i]) for r, row in enumerate(matrix) if i < len(row) and row[i] is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, color=f"C{n % 10}", linestyle=style, marker="o",
                        label=name if style == "-" else f"{name} (held out)")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels)
        ax.set(title=f"{key} after each stage", xlabel="row", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
    return _png(fig)
