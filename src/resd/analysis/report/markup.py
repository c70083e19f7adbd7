"""HTML building blocks of the report, and the page around them.

Model text (prompts, responses, reflections, playbook entries) is untrusted and may hold
markup such as `<script>`. So every helper here treats its arguments as text and escapes
them, except the ones named `body`, which are markup built by this package: a caller
never has to remember to escape. `PlotSink` embeds each figure as a base64 data URI,
because the report must stay one file that can be mailed or archived, and also writes it
to `plots/` for slides and papers.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any


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
