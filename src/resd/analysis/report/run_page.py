"""The report of one run: its six sections, top to bottom, and the page that holds them.

1. summary: settings, evaluation before / after, training metrics, counters
2. learning curves
3. step time by phase
4. playbook evolution
5. examples: a few full samples, with the reflections written about them
6. token-level self-distillation loss of the samples the teacher disagreed with most

Each section renders from whatever files the run has and says "Not recorded" for the
rest, so that a partial or crashed run still gets a useful report.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from resd.analysis.report.curves import _mean, _number, phase_times
from resd.analysis.report.markup import (
    PlotSink,
    _fmt,
    details,
    esc,
    not_recorded,
    page,
    pre,
    section,
    table,
)
from resd.analysis.report.plots import (
    _section_heading,
    plot_learning_curves,
    plot_playbook,
    plot_step_times,
)
from resd.analysis.report.runs import TRAIN_KEYS, Run
from resd.envs.base import SUCCESS_REWARD
from resd.rundir import COUNTERS as RUN_COUNTERS
from resd.rundir import EVAL_KEYS

# Summed over the run in the summary: how many samples were distilled, then the
# reflection / curation counters.
COUNTERS = ("distilled", *RUN_COUNTERS)
# The settings listed in the summary; the whole config.yaml follows, collapsed.
CONFIG_HIGHLIGHTS = (
    "algorithm", "model", "env", "env_args", "seed", "steps", "batch_size",
    "rollouts_per_prompt", "inner_updates", "lr", "alpha", "topk", "teacher",
    "teacher_update_rate", "max_new_tokens", "playbook_max_entries", "playbook_policy",
    "eval_samples", "eval_items",
)  # fmt: skip
N_EXAMPLES = 3  # full samples shown under "5. Examples"
N_TOKEN_SAMPLES = 3  # highest-loss samples shown under "6. Token-level ... loss"
N_TOP_ENTRIES = 15  # playbook entries listed by helpful count


def _eval_table(run: Run) -> str:
    before, after = run.eval_before, run.eval_after
    if not before:
        return not_recorded("evaluation (no eval.jsonl / summary.json with eval metrics)")
    headers = ["metric", f"before (step {_fmt(before.get('step', 0))})"]
    if after:
        headers += [f"after (step {_fmt(after.get('step', '?'))})", "change"]
    rows = []
    for key in (*EVAL_KEYS, *(k for k in run.reward_keys if k in before)):
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
    """Means over the first and the last 10% of steps: single steps are too noisy. A
    metric not logged in one of them gets a blank cell there (not "nan")."""
    n = len(run.metrics)
    if not n:
        return not_recorded("training metrics (no metrics.jsonl)")
    span = max(1, n // 10)
    first, last = run.metrics[:span], run.metrics[-span:]
    rows = []
    for key in (*TRAIN_KEYS, *run.reward_keys, "loss", "response_tokens", "time_step"):
        a = [v for v in (_number(m.get(key)) for m in first) if v is not None]
        b = [v for v in (_number(m.get(key)) for m in last) if v is not None]
        if a or b:
            rows.append([key, _mean(a) if a else None, _mean(b) if b else None])
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
    # An environment given in Python is named by the summary; config.yaml's `env` did not run.
    shown = {**cfg, "env": run.summary.get("env", cfg.get("env"))} if "env" in cfg else cfg
    rows: list[list[Any]] = [[key, shown[key]] for key in CONFIG_HIGHLIGHTS if key in shown]
    rows += [
        ["steps run", run.steps],
        ["samples per step", run.samples_per_step],
        ["samples drawn", run.steps * run.samples_per_step],
    ]
    if run.summary.get("stopped_early"):  # `Trainer.stop`: why the run is shorter than set
        rows.append(["stopped early", run.summary["stopped_early"]])
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
        why = "the playbook is empty" if run.playbook is not None else "no playbook.json"
        return not_recorded(f"playbook entries ({why})")
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
        sink.embed(
            "playbook",
            png,
            "Playbook entries per section; entries added and rewritten (+) or removed (−).",
        )
        if png
        else not_recorded("playbook history (no playbook_history.jsonl)")
    )
    body += _top_entries(run) + _final_playbook(run)
    return section("playbook", title, body)


def pick_examples(samples: list[dict[str, Any]], n: int = N_EXAMPLES) -> list[dict[str, Any]]:
    """An early and a late failure with a reflection (to see whether reflections get
    better), and the latest success; topped up with the latest samples."""
    reflected = [
        s for s in samples if s.get("reflection") and (s.get("reward") or 0) < SUCCESS_REWARD
    ]
    successes = [s for s in samples if (s.get("reward") or 0) >= SUCCESS_REWARD]
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
    """The scale's colour for `value` in [0, vmax] (clipped, infinity too), as #rrggbb;
    NaN is white."""
    t = value / vmax if vmax > 0 and not math.isnan(value) else 0.0
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


def run_sections(run: Run, sink: PlotSink) -> str:
    """A run's sections, in `SINGLE_NAV`'s order (also the learner's on a serve page)."""
    return "".join(
        [
            section_summary(run),
            section_learning(run, sink),
            section_timing(run, sink),
            section_playbook(run, sink),
            section_examples(run),
            section_tokens(run),
        ]
    )


def run_report(run: Run, sink: PlotSink) -> str:
    body = f"<p>Run directory: <code>{esc(run.path)}</code></p>" + run_sections(run, sink)
    return page(f"resd report: {run.name} ({run.algorithm})", SINGLE_NAV, body)
