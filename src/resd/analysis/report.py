"""`resd report DIR`: one self-contained HTML report of a training run or a comparison.

Why a single static file: runs happen on remote GPU machines, and the report has to be
copied back and opened anywhere (a browser, a mail attachment, a CI artifact). So the
plots are embedded as base64 PNG data URIs, the styling is one inline <style> block, and
there is no JavaScript at all: the collapsible parts use <details>/<summary>. Every PNG
is also written to `plots/` beside the report, for slides and papers.

Model text (prompts, responses, reflections, playbook entries) is untrusted: it may
contain HTML such as `<script>`. Every piece of text goes through `esc()` (directly or
through `table()`, `pre()`, `details()`, whose text arguments are never markup) before
it reaches the page; the only raw HTML is the markup built in this module.

The module reads top to bottom:
  1. reading a run directory (everything but a config or metrics file is optional)
  2. numeric helpers: smoothing, and grouping the runs of one algorithm over seeds
  3. plots (matplotlib is imported lazily, so `import resd` stays light)
  4. HTML helpers
  5. the sections of a single-run report
  6. the comparison report
  7. `build_report` and the CLI hook
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from resd.rundir import COUNTERS as RUN_COUNTERS
from resd.rundir import EVAL_KEYS, PHASES, read_jsonl, samples_per_step
from resd.training.playbook import SECTIONS

log = logging.getLogger(__name__)

COUNTERS = ("distilled", *RUN_COUNTERS)
TRAIN_KEYS = ("reward", "score", "success_rate")
CONFIG_HIGHLIGHTS = (
    "algorithm", "model", "env", "env_args", "seed", "steps", "batch_size",
    "rollouts_per_prompt", "inner_updates", "lr", "alpha", "topk", "teacher",
    "teacher_update_rate", "max_new_tokens", "playbook_max_entries", "playbook_policy",
    "eval_samples", "eval_items",
)  # fmt: skip
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "summary.json")
N_EXAMPLES = 3  # full examples shown in section 5
N_TOKEN_SAMPLES = 3  # highest-loss samples shown in section 6
N_TOP_ENTRIES = 15  # playbook entries listed by helpful count
PLOT_DPI = 100


# ---- 1. reading a run directory ------------------------------------------------------
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


def load_run(path: str | Path) -> Run:
    path = Path(path)
    md = path / "playbook.md"
    return Run(
        path=path,
        config=_read_yaml(path / "config.yaml"),
        summary=_read_json(path / "summary.json") or {},
        metrics=read_jsonl(path / "metrics.jsonl"),
        evals=read_jsonl(path / "eval.jsonl"),
        samples=read_jsonl(path / "samples.jsonl"),
        playbook_history=read_jsonl(path / "playbook_history.jsonl"),
        playbook=_read_json(path / "playbook.json"),
        playbook_md=md.read_text(errors="replace") if md.exists() else None,
    )


# ---- 2. numeric helpers ----------------------------------------------------------------
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


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs keyed by algorithm (sorted), each group sorted by directory name."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: r.name):
        groups[run.algorithm].append(run)
    return dict(sorted(groups.items()))


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


# ---- 3. plots --------------------------------------------------------------------------
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
    """Entries per section over time (stacked area) and entries added / pruned per step."""
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
    ax.bar(steps, added, width=1.0, color="C2", label="added", linewidth=0)
    ax.bar(steps, removed, width=1.0, color="C3", label="pruned", linewidth=0)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(title="entries added (+) / pruned (−) per step", xlabel="step")
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


# ---- 4. HTML helpers -------------------------------------------------------------------
def esc(text: Any) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape("" if text is None else str(text), quote=True)


def _fmt(value: Any) -> str:
    """Numbers to 4 significant digits, integers as integers, everything else as str."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A table of plain values: every cell is formatted and escaped, none is markup."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pre(text: Any) -> str:
    return f"<pre>{esc(text)}</pre>"


def details(summary: str, body: str, *, opened: bool = False) -> str:
    """A collapsible block; `summary` is text (escaped), `body` is markup."""
    return f"<details{' open' if opened else ''}><summary>{esc(summary)}</summary>{body}</details>"


def not_recorded(what: str) -> str:
    return f'<p class="missing">Not recorded: {esc(what)}.</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


class PlotSink:
    """Writes each PNG to `plots/` beside the report and returns the <img> embedding it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: list[Path] = []

    def embed(self, name: str, png: bytes, caption: str) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.png"
        path.write_bytes(png)
        self.written.append(path)
        data = base64.b64encode(png).decode("ascii")
        return (
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)} (also <code>plots/{esc(path.name)}</code>)"
            "</figcaption></figure>"
        )


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left;
         vertical-align: top; }
th { background: #f0f0f0; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.6em; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; max-height: 40em; }
details { margin: 0.4em 0; }
summary { cursor: pointer; font-weight: 600; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
.missing, .empty { color: #888; font-style: italic; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap;
          word-break: break-word; border: 1px solid #ddd; padding: 0.6em;
          line-height: 1.7; }
.tok { border-radius: 2px; }
.scale { display: inline-block; width: 12em; height: 1em; vertical-align: middle;
         border: 1px solid #999; }
nav a { margin-right: 1em; }
"""


def page(title: str, nav: list[tuple[str, str]], body: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><nav>{links}</nav>"
        f"{body}</body></html>\n"
    )


# ---- 5. the sections of a single-run report -----------------------------------------------
def _eval_table(run: Run) -> str:
    before, after = run.eval_before, run.eval_after
    if not before:
        return not_recorded("evaluation (no eval.jsonl / summary.json with eval metrics)")
    headers = ["metric", f"before (step {_fmt(before.get('step', 0))})"]
    if after:
        headers += [f"after (step {_fmt(after.get('step', '?'))})", "change"]
    rows = []
    for key in EVAL_KEYS:
        b = _number(before.get(key))
        row: list[Any] = [key, b]
        if after:
            a = _number(after.get(key))
            row += [a, None if a is None or b is None else f"{a - b:+.4g}"]
        rows.append(row)
    k, items = before.get("k"), before.get("items")
    note = f"<p>k = {esc(_fmt(k))} samples per item, {esc(_fmt(items))} test items.</p>"
    return table(headers, rows) + note


def _train_table(run: Run) -> str:
    """Means over the first and the last 10% of steps: single steps are too noisy."""
    n = len(run.metrics)
    if not n:
        return not_recorded("training metrics (no metrics.jsonl)")
    span = max(1, n // 10)
    first, last = run.metrics[:span], run.metrics[-span:]
    rows = []
    for key in (*TRAIN_KEYS, "loss", "response_tokens", "time_step"):
        a = [v for v in (_number(m.get(key)) for m in first) if v is not None]
        b = [v for v in (_number(m.get(key)) for m in last) if v is not None]
        if a or b:
            rows.append([key, _mean(a), _mean(b)])
    headers = ["metric", f"first {span} step(s)", f"last {span} step(s)"]
    return table(headers, rows)


def _counter_table(run: Run) -> str:
    """Totals of the reflection / curation counters: how often the small model's JSON
    failed to parse is the first thing to check when a playbook stays empty."""
    rows = []
    for key in COUNTERS:
        values = [_number(m.get(key)) for m in run.metrics]
        if any(v is not None for v in values):
            rows.append([key, sum(v or 0.0 for v in values)])
    return table(["counter", "total over the run"], rows) if rows else ""


def section_summary(run: Run) -> str:
    cfg = run.config
    rows: list[list[Any]] = [[key, cfg[key]] for key in CONFIG_HIGHLIGHTS if key in cfg]
    rows += [
        ["steps run", run.steps],
        ["samples per step", run.samples_per_step],
        ["samples drawn", run.steps * run.samples_per_step],
    ]
    full = (
        details("full config.yaml", pre(yaml.safe_dump(cfg, sort_keys=False)))
        if cfg
        else not_recorded("config.yaml")
    )
    body = (
        "<h3>Configuration</h3>"
        + table(["setting", "value"], rows)
        + full
        + "<h3>Evaluation before / after</h3>"
        + _eval_table(run)
        + "<h3>Training rollouts</h3>"
        + _train_table(run)
        + _counter_table(run)
    )
    return section("summary", "1. Run summary", body)


def section_learning(run: Run, sink: PlotSink) -> str:
    png = plot_learning_curves(run)
    if png is None:
        return section("learning", "2. Learning curves", not_recorded("metrics.jsonl"))
    caption = (
        "Training rollouts per step (faint: raw; solid: moving average), the "
        "self-distillation loss, and the evaluation metrics."
    )
    body = sink.embed("learning_curves", png, caption)
    if not run.evals:
        body += not_recorded("evaluation during training (no eval.jsonl)")
    return section("learning", "2. Learning curves", body)


def section_timing(run: Run, sink: PlotSink) -> str:
    png = plot_step_times(run)
    if png is None:
        return section("timing", "3. Step time by phase", not_recorded("phase timings"))
    times = phase_times(run)
    total = sum(sum(v) for v in times.values())
    rows = [
        [phase, _mean(values), sum(values), f"{100 * sum(values) / total:.1f}%" if total else ""]
        for phase, values in times.items()
    ]
    rows.append(["step (all)", total / len(run.metrics), total, "100%" if total else ""])
    body = sink.embed("step_times", png, "Seconds per step, stacked by phase.") + table(
        ["phase", "mean s / step", "total s", "share"], rows
    )
    return section("timing", "3. Step time by phase", body)


def _top_entries(run: Run) -> str:
    entries = [e for e in (run.playbook or {}).get("entries", []) if isinstance(e, dict)]
    if not entries:
        return not_recorded("playbook entries (no playbook.json)")
    ranked = sorted(
        entries,
        key=lambda e: (-(e.get("helpful") or 0), e.get("harmful") or 0, str(e.get("id"))),
    )[:N_TOP_ENTRIES]
    rows = [
        [e.get("id"), _section_heading(str(e.get("section"))), e.get("helpful"),
         e.get("harmful"), e.get("created_step"), e.get("last_used_step"), e.get("content")]
        for e in ranked
    ]  # fmt: skip
    headers = ["id", "section", "helpful", "harmful", "created", "last used", "content"]
    title = f"<h3>Top {len(rows)} of {len(entries)} entries by helpful count</h3>"
    return title + table(headers, rows)


def _final_playbook(run: Run) -> str:
    if run.playbook_md is not None:
        text = run.playbook_md
    elif run.playbook:
        from resd.training.playbook import Playbook

        try:
            text = Playbook.from_dict(run.playbook).render()
        except (TypeError, ValueError, KeyError) as exc:
            return not_recorded(f"final playbook (playbook.json unreadable: {exc})")
    else:
        return not_recorded("final playbook (no playbook.md)")
    return "<h3>Final playbook</h3>" + details("playbook.md", pre(text), opened=True)


def section_playbook(run: Run, sink: PlotSink) -> str:
    title = "4. Playbook evolution"
    png = plot_playbook(run)
    if png is None and not run.playbook and run.playbook_md is None:
        why = f"algorithm {run.algorithm!r} keeps no playbook, or it was not logged"
        return section("playbook", title, not_recorded(f"playbook history ({why})"))
    body = (
        sink.embed("playbook", png, "Playbook entries per section; entries added / pruned.")
        if png
        else not_recorded("playbook history (no playbook_history.jsonl)")
    )
    body += _top_entries(run) + _final_playbook(run)
    return section("playbook", title, body)


def pick_examples(samples: list[dict[str, Any]], n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """An early and a late failure with a reflection (to see whether reflections get
    better), and the latest success; topped up with the latest samples."""
    reflected = [s for s in samples if s.get("reflection") and (s.get("reward") or 0) < 0.5]
    successes = [s for s in samples if (s.get("reward") or 0) >= 0.5]
    candidates = [*reflected[:1], *reflected[-1:], *successes[-1:], *reversed(samples)]
    chosen: list[dict[str, Any]] = []
    for s in candidates:
        if len(chosen) == n:
            break
        if not any(s is c for c in chosen):
            chosen.append(s)
    return sorted(chosen, key=lambda s: _number(s.get("step")) or 0)


EXAMPLE_FIELDS = (  # (key, label, shown opened)
    ("prompt", "prompt", False),
    ("response", "response", True),
    ("feedback", "environment feedback", True),
    ("reflection", "reflection (parsed)", True),
    ("reflection_reply", "reflector's raw reply", False),
    ("curation_reply", "curator's raw reply", False),
    ("teacher_prompt", "teacher prompt (privileged context)", False),
)


def _sample_title(s: dict[str, Any]) -> str:
    return (
        f"step {_fmt(s.get('step'))} · item {_fmt(s.get('item'))} · "
        f"reward {_fmt(s.get('reward'))} · score {_fmt(s.get('score'))}"
        f"{' · distilled' if s.get('distilled') else ''}"
    )


def section_examples(run: Run) -> str:
    title = "5. Examples"
    if not run.samples:
        return section("examples", title, not_recorded("samples (no samples.jsonl)"))
    blocks = []
    for i, s in enumerate(pick_examples(run.samples)):
        parts = []
        for key, label, opened in EXAMPLE_FIELDS:
            text = s.get(key)
            if text in (None, ""):
                parts.append(f'<p class="empty">{esc(label)}: (empty)</p>')
                continue
            summary = f"{label} ({len(str(text))} chars)"
            parts.append(details(summary, pre(text), opened=opened))
        blocks.append(details(_sample_title(s), "".join(parts), opened=i == 0))
    return section("examples", title, "".join(blocks))


# Colour scale of the token view, white → yellow → orange → red (like matplotlib's YlOrRd).
LOSS_COLOURS = ((255, 255, 255), (255, 237, 160), (253, 141, 60), (227, 26, 28))


def loss_colour(value: float, vmax: float) -> str:
    """The scale's colour for `value` in [0, vmax] (clipped), as #rrggbb."""
    t = value / vmax if vmax > 0 and math.isfinite(value) else 0.0
    t = min(1.0, max(0.0, t)) * (len(LOSS_COLOURS) - 1)
    i = min(int(t), len(LOSS_COLOURS) - 2)
    frac = t - i
    lo, hi = LOSS_COLOURS[i], LOSS_COLOURS[i + 1]
    r, g, b = (round(a + (c - a) * frac) for a, c in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def token_samples(samples: list[dict[str, Any]], n: int = N_TOKEN_SAMPLES) -> list[dict[str, Any]]:
    """The `n` distilled samples with the highest mean token loss, highest first."""
    usable = [
        s
        for s in samples
        if s.get("tokens") and len(s.get("token_losses") or []) == len(s["tokens"])
    ]
    return sorted(usable, key=lambda s: _mean(s["token_losses"]), reverse=True)[:n]


def _scale_max(losses: list[float]) -> float:
    """The 99th percentile of the shown losses: one outlier token must not wash out the
    colours of all others (tokens above it get the full colour)."""
    finite = sorted(v for v in losses if math.isfinite(v))
    if not finite:
        return 1.0
    top = finite[min(len(finite) - 1, int(0.99 * len(finite)))]
    return top if top > 0 else 1.0


def token_html(tokens: list[str], losses: list[float], vmax: float) -> str:
    """One <span> per token, background = its loss on the scale, the value in `title`."""
    spans = (
        f'<span class="tok" style="background:{loss_colour(loss, vmax)}" '
        f'title="loss {loss:.4f}">{esc(token)}</span>'
        for token, loss in zip(tokens, losses, strict=True)
    )
    return f'<div class="tokens">{"".join(spans)}</div>'


def section_tokens(run: Run) -> str:
    title = "6. Token-level self-distillation loss"
    chosen = token_samples(run.samples)
    if not chosen:
        return section("tokens", title, not_recorded("per-token losses of distilled samples"))
    losses = [float(v) for s in chosen for v in s["token_losses"]]
    vmax = _scale_max(losses)
    gradient = ", ".join(loss_colour(vmax * i / 4, vmax) for i in range(5))
    legend = (
        f'<p>Colour scale: 0 <span class="scale" style="background:linear-gradient(to right, '
        f'{gradient})"></span> ≥ {esc(f"{vmax:.4g}")} (hover a token for its loss). '
        "Each response is the logged sample's tokens, decoded one by one; a dark token is "
        "one where the teacher, with its privileged context, disagrees most with the "
        "student.</p>"
    )
    blocks = []
    for s in chosen:
        head = f"<h3>{esc(_sample_title(s))} · mean token loss {_mean(s['token_losses']):.4f}</h3>"
        prompt = details(f"prompt ({len(str(s.get('prompt', '')))} chars)", pre(s.get("prompt")))
        blocks.append(head + prompt + token_html(s["tokens"], s["token_losses"], vmax))
    return section("tokens", title, legend + "".join(blocks))


SINGLE_NAV = [
    ("summary", "summary"),
    ("learning", "learning curves"),
    ("timing", "step time"),
    ("playbook", "playbook"),
    ("examples", "examples"),
    ("tokens", "token losses"),
]


def run_report(run: Run, sink: PlotSink) -> str:
    body = "".join(
        [
            f"<p>Run directory: <code>{esc(run.path)}</code></p>",
            section_summary(run),
            section_learning(run, sink),
            section_timing(run, sink),
            section_playbook(run, sink),
            section_examples(run),
            section_tokens(run),
        ]
    )
    return page(f"resd report: {run.name} ({run.algorithm})", SINGLE_NAV, body)


# ---- 6. the comparison report -----------------------------------------------------------
def find_runs(path: Path) -> list[Run]:
    """The run directories directly below `path` (a comparison directory)."""
    return [load_run(p) for p in sorted(path.iterdir()) if is_run_dir(p)]


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
                 _number(before.get("case_mean@k")), _number(after.get("case_mean@k"))]
            )  # fmt: skip
    run_headers = ["run", "algorithm", "seed", "steps", "samples drawn",
                   "task_mean@k before", "task_mean@k after",
                   "case_mean@k before", "case_mean@k after"]  # fmt: skip
    group_rows = []
    for algorithm, runs in groups.items():
        cells: list[Any] = [algorithm, len(runs)]
        for key in EVAL_KEYS:
            cells.append(_spread([v for r in runs if (v := _final_eval(r, key)) is not None]))
        step_means = [_mean(phase_total) for r in runs if (phase_total := _step_times(r))]
        cells.append(_spread(step_means))
        group_rows.append(cells)
    group_headers = ["algorithm", "runs", *(f"final {k}" for k in EVAL_KEYS), "s / step"]
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
    train = plot_comparison(groups, ("reward", "score"), source="metrics", smooth=True)
    if train:
        caption = (
            "Training reward and score, each run smoothed by a moving average of ~5% of its "
            "steps; line: mean over seeds, band: min/max over seeds."
        )
        curves.append(sink.embed("compare_train", train, caption))
    else:
        curves.append(not_recorded("training metrics"))
    evals = plot_comparison(groups, EVAL_KEYS, source="evals", smooth=False)
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


# ---- 7. build_report and the CLI hook ---------------------------------------------------
def build_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run or comparison directory; returns its path.

    `path` is a run directory (it holds config.yaml, metrics.jsonl or summary.json), or
    a comparison directory whose immediate sub-directories are run directories. The
    report goes to `out` (default `<path>/report.html`), its PNGs to `plots/` beside it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"report: {path} is not a directory")
    out = Path(out) if out is not None else path / "report.html"
    sink = PlotSink(out.parent / "plots")
    if is_run_dir(path):
        text = run_report(load_run(path), sink)
    else:
        runs = find_runs(path)
        if not runs:
            raise FileNotFoundError(
                f"report: {path} is neither a run directory (no {', '.join(RUN_MARKERS)}) "
                "nor a directory of run directories"
            )
        text = comparison_report(path, runs, sink)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    try:
        out = build_report(args.path, args.out)
    except (ImportError, FileNotFoundError) as exc:
        print(f"resd: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    return 0


def add_report_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd report PATH [--out FILE]` on the CLI's sub-parsers."""
    parser = subparsers.add_parser(
        "report", help="write an HTML report of a run or a comparison directory"
    )
    parser.add_argument("path", help="a run directory, or a directory of run directories")
    parser.add_argument("--out", default=None, help="HTML file (default: PATH/report.html)")
    parser.set_defaults(fn=cmd_report)
    return parser
