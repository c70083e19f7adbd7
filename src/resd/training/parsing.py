"""Robust extraction of JSON objects from free-form model replies.

Reflector and curator replies come from the model being trained, often a small one.
They wrap JSON in code fences, follow it with prose, leave trailing commas, use single
quotes or Python literals, or get cut off mid-object. Everything here returns `None`
rather than raising, so that the caller can count the failure and move on.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

MAX_REPLY_CHARS = 50_000
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'"})
_TAG_PAIR = re.compile(
    r"\[?\b([a-z]+-\d{5})\b\]?[\"']?\s*[:=,\-–>]*\s*[\"']?(?:tag[\"']?\s*[:=]\s*[\"']?)?(helpful|harmful|neutral)",
    re.IGNORECASE,
)


def _balanced_objects(text: str, limit: int = 20, nested: bool = False) -> list[str]:
    """`{...}` spans, aware of quoted strings; an unclosed one is closed.

    Top-level spans only, unless `nested`: then a span starts at every `{`, so the
    inner objects of an outer object that does not parse can still be salvaged.
    """
    found: list[str] = []
    i = 0
    while i < len(text) and len(found) < limit:
        start = text.find("{", i)
        if start < 0:
            break
        stack: list[str] = []
        quote: str | None = None
        escaped = False
        end = None
        for j in range(start, len(text)):
            ch = text[j]
            if quote:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == quote:
                    quote = None
                continue
            if ch in "\"'":
                # An apostrophe inside a word ("don't") is not a quote.
                if ch == "'" and j > 0 and text[j - 1].isalnum():
                    continue
                quote = ch
            elif ch in "{[":
                stack.append("}" if ch == "{" else "]")
            elif ch in "}]":
                if stack and stack[-1] == ch:
                    stack.pop()
                if not stack:
                    end = j
                    break
        if end is None:  # truncated reply: close what is open
            tail = (quote or "") + "".join(reversed(stack))
            found.append(text[start:] + tail)
            if not nested:
                break
            i = start + 1
            continue
        found.append(text[start : end + 1])
        i = start + 1 if nested else end + 1
    return found


def _loads(candidate: str) -> Any:
    # Curly quotes are straightened only if the text does not parse as written: inside a
    # valid string (`"he wrote “no”"`) straightening them ends the string early.
    raw = candidate.strip()
    candidate = raw.translate(_SMART_QUOTES)
    for attempt in dict.fromkeys((raw, _TRAILING_COMMA.sub(r"\1", raw), candidate,
                                  _TRAILING_COMMA.sub(r"\1", candidate))):  # fmt: skip
        try:  # strict=False: a raw tab or newline inside a string is still that string
            return json.loads(attempt, strict=False)
        except (json.JSONDecodeError, ValueError):
            pass
    # Python-literal style: single quotes, True/False/None; map JSON words first.
    pythonish = re.sub(r"\btrue\b", "True", _TRAILING_COMMA.sub(r"\1", candidate))
    pythonish = re.sub(r"\bfalse\b", "False", pythonish)
    pythonish = re.sub(r"\bnull\b", "None", pythonish)
    try:
        return ast.literal_eval(pythonish)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def extract_json_object(reply: str) -> dict[str, Any] | None:
    """The first JSON object in a reply that parses to a dict, or None."""
    if not isinstance(reply, str) or not reply:
        return None
    reply = reply[:MAX_REPLY_CHARS]
    candidates = [m.group(1) for m in _FENCE.finditer(reply)]
    candidates += [obj for c in candidates for obj in _balanced_objects(c)]
    candidates += _balanced_objects(reply)
    for candidate in candidates:
        value = _loads(candidate)
        if isinstance(value, dict):
            return value
    return None


def extract_json_objects_anywhere(reply: str, limit: int = 100) -> list[dict[str, Any]]:
    """Every `{...}` (outer or nested) that parses to a dict, in order of its start."""
    if not isinstance(reply, str):
        return []
    spans = _balanced_objects(reply[:MAX_REPLY_CHARS], limit=limit, nested=True)
    return [v for v in map(_loads, spans) if isinstance(v, dict)]


def extract_bullet_tags(parsed: dict[str, Any] | None, reply: str) -> list[tuple[str, str]]:
    """(id, tag) pairs from a parsed reply, else by regex from the raw text.

    Accepts the shapes small models produce: a list of {id, tag} dicts, a list of
    [id, tag] pairs, or a mapping {id: tag}.
    """
    pairs: list[tuple[str, str]] = []
    raw = parsed.get("bullet_tags", parsed.get("tags")) if isinstance(parsed, dict) else None
    if isinstance(raw, dict):
        raw = [{"id": k, "tag": v} for k, v in raw.items()]
    if isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict):
                entry_id, tag = item.get("id", item.get("bullet_id")), item.get("tag")
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                entry_id, tag = item
            else:
                continue
            if isinstance(entry_id, str) and isinstance(tag, str):
                pairs.append((entry_id.strip().strip("[]"), tag.strip().lower()))
        return pairs
    if parsed is None and isinstance(reply, str):
        pairs = [
            (m.group(1).lower(), m.group(2).lower())
            for m in _TAG_PAIR.finditer(reply[:MAX_REPLY_CHARS])
        ]
    return pairs


def extract_loose_fields(reply: str, keys: tuple[str, ...]) -> dict[str, str]:
    """`"key": "value"` pairs read line by line from JSON-like text that does not parse.

    Small models often write the right keys but drop commas or closing quotes; the
    values are still worth having. A value runs to its closing quote or the line end.
    """
    found: dict[str, str] = {}
    if not isinstance(reply, str):
        return found
    for key in keys:
        m = re.search(rf'"{re.escape(key)}"\s*:\s*"((?:[^"\\\n]|\\.)*)', reply[:MAX_REPLY_CHARS])
        if m and m.group(1).strip():
            found[key] = m.group(1).strip()
    return found
