"""The server's one HTML page (`GET /`): what is served, what users said, what was learned.

Server-rendered with no JavaScript, so it works from any browser on the operator's
machine (through an SSH tunnel, say) and can be screenshotted headless; it refreshes
itself with a `<meta http-equiv="refresh">`. Everything shown that came from users or
the model (messages, replies, feedback, playbook text, learner fields) is untrusted and
goes through `esc` (the report's escaping helpers); the only raw markup is built here.
The accuracy curve is an inline SVG drawn here, so the page needs no plotting package.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from resd.analysis.report.markup import CSS, _fmt, details, esc, pre, section, table

PAGE_CSS = (
    CSS
    + """
.badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 0.8em;
         background: #e8f0fe; border: 1px solid #9ab; font-family: ui-monospace, monospace; }
.counts span { margin-right: 1.5em; }
td.text { max-width: 36em; white-space: pre-wrap; word-break: break-word; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""
)

_PLAYBOOK_TEXT_KEYS = ("playbook_markdown", "markdown", "playbook", "text", "diff", "changes")


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return str(messages[-1].get("content", "")) if messages else ""


def _clip(text: str, limit: int = 600) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _feedback_cell(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return '<span class="empty">none</span>'
    items = []
    for row in rows:
        numbers = ", ".join(
            f"{k}={_fmt(row[k])}" for k in ("reward", "score") if row.get(k) is not None
        )
        used = (
            f" · used at step {row['consumed_step']}"
            if row.get("consumed_step") is not None
            else ""
        )
        text = f": {_clip(str(row.get('feedback') or ''), 300)}" if row.get("feedback") else ""
        items.append(
            f"<li><b>{esc(row.get('source'))}</b> {esc(numbers)}{esc(text)}{esc(used)}</li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def interactions_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Recent completions: the last user message, the reply and the feedback on it."""
    if not rows:
        return '<p class="empty">No completions yet.</p>'
    body = []
    for row in rows:
        body.append(
            "<tr>"
            f"<td>{esc(row.get('created_at'))}<br><code>{esc(row.get('id'))}</code></td>"
            f'<td><span class="badge">{esc(row.get("model_version"))}</span></td>'
            f'<td class="text">{esc(_clip(_last_user_text(row.get("messages") or [])))}</td>'
            f'<td class="text">{esc(_clip(str(row.get("response", ""))))}</td>'
            f"<td>{esc(row.get('finish_reason'))}, {esc(row.get('completion_tokens'))} tokens</td>"
            f"<td>{_feedback_cell(row.get('feedback') or [])}</td>"
            "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>" for h in ("time / id", "version", "user", "reply", "finish", "feedback")
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def accuracy_svg(points: Sequence[tuple[float, float]], width: int = 640, height: int = 240) -> str:
    """A line chart of accuracy against learner step, as inline SVG (y from 0 to 1, or
    wider if a value falls outside)."""
    if not points:
        return '<p class="empty">No accuracy measured yet.</p>'
    points = sorted(points)
    left, right, top, bottom = 48, 16, 12, 32
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = min(0.0, *ys), max(1.0, *ys)

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="accuracy by learner step">']  # fmt: skip
    for i in range(5):  # horizontal grid and y labels
        y = y_lo + (y_hi - y_lo) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{sy(y) + 4:.1f}" '
                     f'text-anchor="end">{esc(_fmt(round(y, 3)))}</text>')  # fmt: skip
    for x in sorted({xs[0], xs[len(xs) // 2], xs[-1]}):  # a few x labels
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" '
                     f'text-anchor="middle">{esc(_fmt(x))}</text>')  # fmt: skip
    parts.append(f'<text x="{(left + width - right) / 2:.1f}" y="{height - 4}" '
                 'text-anchor="middle">learner step</text>')  # fmt: skip
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>')
    for x, y in points:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#1f77b4">'
                     f"<title>step {esc(_fmt(x))}: {esc(_fmt(y))}</title></circle>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _accuracy_points(
    status: Mapping[str, Any] | None, versions: Sequence[Mapping[str, Any]]
) -> list[tuple[float, float]]:
    """The learner's accuracy curve; without a learner, the accuracies recorded on versions."""
    raw = (status or {}).get("accuracy") or [
        {"step": v["step"], "accuracy": v["accuracy"]}
        for v in versions
        if v.get("accuracy") is not None
    ]
    points = []
    for entry in raw:
        try:
            points.append((float(entry["step"]), float(entry["accuracy"])))
        except (KeyError, TypeError, ValueError):
            continue  # a malformed entry is skipped, not fatal to the page
    return points


def _history_entry(index: int, entry: Any) -> str:
    if isinstance(entry, Mapping):
        label = ", ".join(f"{k} {_fmt(entry[k])}" for k in ("step", "version") if k in entry)
        text = next((entry[k] for k in _PLAYBOOK_TEXT_KEYS if k in entry), None)
        body = pre(text if isinstance(text, str) else json.dumps(entry, indent=1, default=str))
        return details(label or f"entry {index + 1}", body)
    return details(f"entry {index + 1}", pre(entry))


def learner_sections(status: Mapping[str, Any] | None) -> str:
    """The playbook as it stands, its history and the learner's steps; or "no learner"."""
    if status is None:
        return section(
            "learner", "Learner", '<p class="empty">no learner (start with --learn CONFIG)</p>'
        )
    playbook = status.get("playbook_markdown") or ""
    history = list(status.get("playbook_history") or [])
    steps = [s for s in status.get("steps") or [] if isinstance(s, Mapping)]
    scalars = {
        k: v
        for k, v in status.items()
        if isinstance(v, str | int | float | bool) and k != "playbook_markdown"
    }
    out = [table(["field", "value"], [[k, v] for k, v in scalars.items()]) if scalars else ""]
    out.append(pre(playbook) if playbook.strip() else '<p class="empty">The playbook is empty.</p>')
    playbook_html = section("playbook", "Playbook", "".join(out))
    history_html = section("history", f"Playbook history ({len(history)})", "".join(
        _history_entry(i, e) for i, e in reversed(list(enumerate(history)))
    ) or '<p class="empty">No changes yet.</p>')  # fmt: skip
    columns: list[str] = []
    for step in steps:
        columns += [k for k in step if k not in columns]
    steps_html = section("steps", f"Learner steps ({len(steps)})", table(
        columns, [[s.get(c) for c in columns] for s in reversed(steps)]
    ) if steps else '<p class="empty">No learner steps yet.</p>')  # fmt: skip
    return playbook_html + history_html + steps_html


def render_page(
    *,
    model_name: str,
    version: str,
    counts: Mapping[str, int],
    versions: Sequence[Mapping[str, Any]],
    recent: Sequence[Mapping[str, Any]],
    learner_status: Mapping[str, Any] | None,
    refresh_s: int = 10,
) -> str:
    """The whole page as a string; every argument is data, escaped here."""
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s > 0 else ""
    count_html = "".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>" for k, v in counts.items())
    header = (
        f'<p>Model <b>{esc(model_name)}</b>, serving version <span class="badge">{esc(version)}</span></p>'
        f'<p class="counts">{count_html}</p>'
    )
    version_rows = [[v.get("id"), v.get("created_at"), v.get("parent"), v.get("step"),
                     v.get("accuracy"), v.get("note")] for v in reversed(versions)]  # fmt: skip
    body = (
        header
        + section("accuracy", "Accuracy", accuracy_svg(_accuracy_points(learner_status, versions)))
        + learner_sections(learner_status)
        + section("recent", f"Recent completions ({len(recent)})", interactions_table(recent))
        + section("versions", f"Model versions ({len(versions)})", table(
            ["id", "created", "parent", "step", "accuracy", "note"], version_rows))
    )  # fmt: skip
    # Each link is named by its section's id; without a learner its sections are one.
    learner = ["playbook", "steps"] if learner_status is not None else ["learner"]
    links = "".join(f'<a href="#{a}">{a}</a>' for a in ["accuracy", *learner, "recent", "versions"])
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">{refresh}<title>resd serve: {esc(model_name)}</title>'
        f"<style>{PAGE_CSS}</style></head><body><h1>resd serve</h1><nav>{links}</nav>{body}</body></html>\n"
    )
