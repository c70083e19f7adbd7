"""The global playbook: a curated list of reusable lessons, shared by every prompt.

Text form (what the teacher and the reflector read, and what `playbook.md` holds):

    ## Strategies & Insights
    [strat-00001] helpful=3 harmful=0 :: Check the empty tape before anything else.

The text form round-trips through `Playbook.parse` / `Playbook.render`. Creation and
last-used steps are not in the text; they live in the JSON form (`to_dict`), which is
what checkpoints store.

Every mutation goes through a method that validates its input and reports failure by
return value, never by exception: replies of a small model are routinely malformed,
and one bad reply must neither stop training nor corrupt the playbook.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from resd.config import PRUNE_POLICIES
from resd.templating import from_where, read_text_file
from resd.training.guards import word_overlap

log = logging.getLogger(__name__)

SECTIONS: dict[str, str] = {
    "strat": "Strategies & Insights",
    "calc": "Formulas & Calculations",
    "code": "Code Snippets & Templates",
    "err": "Common Mistakes to Avoid",
    "prob": "Problem-Solving Heuristics",
    "ctx": "Context Clues & Indicators",
    "misc": "Others",
}
# Words a curator might use for a section, checked in order; anything else is "misc".
_SECTION_WORDS: list[tuple[str, tuple[str, ...]]] = [
    ("err", ("mistake", "error", "pitfall", "avoid")),
    ("strat", ("strateg", "insight")),
    ("calc", ("formula", "calculation", "math")),
    ("code", ("code", "snippet", "template")),
    ("prob", ("heuristic", "problem")),
    ("ctx", ("context", "clue", "indicator")),
]
TAGS = ("helpful", "harmful", "neutral")
OPERATION_TYPES = ("ADD", "UPDATE", "MERGE", "DELETE")
MAX_ENTRY_CHARS = 500

_ENTRY_LINE = re.compile(
    r"^\[(?P<id>[a-z]+-\d{5})\]\s+helpful=(?P<h>\d+)\s+harmful=(?P<d>\d+)\s+::\s?(?P<text>.*)$"
)
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$")


def section_slug(name: Any) -> str:
    """Map whatever a curator wrote as section (slug, heading, free words) to a slug."""
    text = str(name or "").strip().lower()
    if text in SECTIONS:
        return text
    for slug, heading in SECTIONS.items():
        if text == heading.lower():
            return slug
    for slug, words in _SECTION_WORDS:
        if any(w in text for w in words):
            return slug
    return "misc"


def clean_content(text: Any) -> str:
    """Flatten to one bounded line: a lesson is one line in the text form."""
    flat = " ".join(str(text or "").split())
    if len(flat) > MAX_ENTRY_CHARS:
        flat = flat[: MAX_ENTRY_CHARS - 1].rstrip() + "…"
    return flat


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _successor(retired: dict[str, str | None], entry_id: str) -> str:
    """The entry that now holds `entry_id`'s lesson after this step's merges (itself if
    it was not merged away; an id that is not live if it was deleted)."""
    while retired.get(entry_id) is not None:
        entry_id = retired[entry_id]  # type: ignore[assignment]
    return entry_id


def prune_due(step: int, every: int) -> bool:
    """Whether the every-F pruning runs before `step`'s context update.

    As the release: after every F completed context updates, so at steps F+1, 2F+1, ...
    (a playbook is never pruned before it has been updated F times).
    """
    return step > 1 and (step - 1) % every == 0


@dataclass
class Entry:
    id: str
    section: str
    content: str
    helpful: int = 0
    harmful: int = 0
    created_step: int = 0
    last_used_step: int | None = None  # last step it got a helpful/harmful tag

    @property
    def category(self) -> str:
        """unused (never tagged), harmful (d ≥ h and d > 0) or helpful (the rest)."""
        if self.helpful + self.harmful == 0:
            return "unused"
        if self.harmful >= self.helpful and self.harmful > 0:
            return "harmful"
        return "helpful"

    def staleness(self, step: int) -> int:
        last = self.last_used_step if self.last_used_step is not None else self.created_step
        return step - last

    def line(self) -> str:
        return f"[{self.id}] helpful={self.helpful} harmful={self.harmful} :: {self.content}"


@dataclass
class OperationReport:
    """What one batch of curator operations did; fed to metrics."""

    applied: int = 0
    skipped: int = 0
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # entries whose text an UPDATE replaced
    # Why operations were skipped: malformed, not_allowed, unknown_id, retired, empty, duplicate,
    # or a reason returned by the caller's content check (see `guards.py`).
    reasons: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] += 1


class Playbook:
    def __init__(self, entries: Iterable[Entry] = (), next_id: int = 1) -> None:
        self.entries: dict[str, Entry] = {}
        for e in entries:
            self.entries[e.id] = e
        self.next_id = max(
            [next_id, *[int(e.id.rsplit("-", 1)[1]) + 1 for e in self.entries.values()]]
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self.entries

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Playbook) and self.to_dict() == other.to_dict()

    # ---- operations ---------------------------------------------------------------
    def add(self, section: Any, content: Any, step: int = 0) -> str | None:
        """Add a lesson; returns its new id, or None if empty or a duplicate."""
        text = clean_content(content)
        if not text or self._find_duplicate(text) is not None:
            return None
        slug = section_slug(section)
        entry_id = f"{slug}-{self.next_id:05d}"
        self.next_id += 1
        self.entries[entry_id] = Entry(entry_id, slug, text, created_step=step)
        return entry_id

    def update(self, entry_id: Any, content: Any, step: int = 0) -> bool:
        entry = self.entries.get(str(entry_id))
        text = clean_content(content)
        if entry is None or not text:
            return False
        entry.content = text
        return True

    def merge(self, entry_ids: Any, content: Any, section: Any = None, step: int = 0) -> str | None:
        """Replace several entries by one; their counters add up so evidence is kept."""
        ids = (
            [str(i) for i in (entry_ids or []) if str(i) in self.entries]
            if isinstance(entry_ids, list)
            else []
        )
        ids = list(dict.fromkeys(ids))
        text = clean_content(content)
        if len(ids) < 2 or not text:
            return None
        olds = [self.entries.pop(i) for i in ids]
        slug = section_slug(section) if section else olds[0].section
        entry_id = f"{slug}-{self.next_id:05d}"
        self.next_id += 1
        used = [o.last_used_step for o in olds if o.last_used_step is not None]
        self.entries[entry_id] = Entry(
            entry_id,
            slug,
            text,
            helpful=sum(o.helpful for o in olds),
            harmful=sum(o.harmful for o in olds),
            created_step=step,
            last_used_step=max(used) if used else None,
        )
        return entry_id

    def delete(self, entry_id: Any) -> bool:
        return self.entries.pop(str(entry_id), None) is not None

    def tag(self, entry_id: Any, tag: Any, step: int = 0) -> bool:
        """Count a helpful/harmful vote; neutral changes nothing; unknown ids are ignored."""
        entry = self.entries.get(str(entry_id).strip().strip("[]"))
        tag = str(tag).strip().lower()
        if entry is None:
            log.warning("bullet tag for unknown playbook id %r ignored", entry_id)
            return False
        if tag not in TAGS:
            return False
        if tag == "helpful":
            entry.helpful += 1
        elif tag == "harmful":
            entry.harmful += 1
        if tag != "neutral":
            entry.last_used_step = step
        return True

    def apply_operations(
        self,
        operations: Any,
        step: int = 0,
        *,
        allowed: Iterable[str] = OPERATION_TYPES,
        check: Callable[[str], str | None] | None = None,
        retired: dict[str, str | None] | None = None,
        similarity: float | None = None,
    ) -> OperationReport:
        """Apply curator operations in order; each one that cannot apply is skipped with a reason.

        `allowed` restricts the operation types (the release's curator only ADDs);
        `check(content)` may veto the text of an ADD, UPDATE or MERGE by returning a
        reason.

        `retired` is why one step's replies do not trip over each other. They are all
        written against one snapshot and applied one after another, so a later reply may
        name an entry an earlier one has merged away or deleted. The caller passes one
        dict per step; it maps each id retired so far to the entry that replaced it (None
        when deleted). A MERGE follows it to the replacement; an UPDATE or DELETE of a
        retired id is skipped as `retired` rather than `unknown_id`, which is kept for
        ids that were never live.

        `similarity` also skips, as `near_duplicate`, a lesson whose words overlap another
        live entry's at least this much (`guards.word_overlap`); None skips exact
        duplicates only. An UPDATE is not compared with the entry it rewrites, nor a MERGE
        with the entries it replaces.
        """
        report = OperationReport()
        if not isinstance(operations, list):
            return report
        allowed = {a.upper() for a in allowed}
        retired = {} if retired is None else retired
        for op in operations:
            kind = (
                str(op.get("type", op.get("op", ""))).strip().upper()
                if isinstance(op, dict)
                else ""
            )
            if kind not in OPERATION_TYPES:
                report.skip("malformed")
                continue
            if kind not in allowed:
                report.skip("not_allowed")
                continue
            reason = self._apply_one(kind, op, step, report, check, retired, similarity)
            if reason is None:
                report.applied += 1
            else:
                report.skip(reason)
        return report

    def _apply_one(
        self,
        kind: str,
        op: dict[str, Any],
        step: int,
        report: OperationReport,
        check: Callable[[str], str | None] | None,
        retired: dict[str, str | None],
        similarity: float | None,
    ) -> str | None:
        """Apply one well-typed operation; the reason it was skipped, or None."""
        target = str(op.get("id", op.get("bullet_id", "")))
        gone = "retired" if target in retired else "unknown_id"
        if kind == "DELETE":
            if not self.delete(target):
                return gone
            retired[target] = None
            report.removed.append(target)
            return None
        if kind == "UPDATE" and target not in self.entries:
            return gone
        ids = op.get("ids", op.get("source_ids"))
        named = [str(i) for i in ids] if kind == "MERGE" and isinstance(ids, list) else []
        live = list(dict.fromkeys(i for i in map(partial(_successor, retired), named) if i in self.entries))  # fmt: skip
        if kind == "MERGE" and len(live) < 2:
            return "retired" if any(i in retired for i in named) else "unknown_id"
        text = clean_content(op.get("content"))
        if not text:
            return "empty"
        replaced = {target} if kind == "UPDATE" else set(live)  # what this text stands in for
        duplicate = self._find_duplicate(text)
        if duplicate is not None and duplicate not in replaced:
            return "duplicate"
        if similarity is not None and self._find_similar(text, similarity, replaced):
            return "near_duplicate"
        problem = check(text) if check else None
        if problem:
            return problem
        if kind == "ADD":
            report.added.append(self.add(op.get("section"), text, step) or "")
        elif kind == "UPDATE":
            self.update(target, text, step)
            report.updated.append(target)
        else:
            merged = self.merge(live, text, op.get("section"), step)
            report.added.append(merged or "")
            report.removed += live
            retired.update(dict.fromkeys(live, merged))
        return None

    def prune(
        self, step: int, *, policy: str = "staleness", max_entries: int | None = None, seed: int = 0
    ) -> list[str]:
        """Drop entries by `policy`; returns their ids. Without `max_entries` only the
        policy's always-drop rule runs (the every-F trigger); with it, entries beyond the
        budget go too (the over-budget trigger).

        staleness: harmful entries, and unused ones older than one step; over budget, the
        longest-unused first. random (the paper's "prioritized"): every unused and harmful
        entry; over budget, helpful ones chosen at random.
        """
        if policy not in PRUNE_POLICIES:
            raise ValueError(f"playbook_policy: expected one of {PRUNE_POLICIES}, got {policy!r}")
        if policy == "random":
            drop = [e.id for e in self.entries.values() if e.category in ("unused", "harmful")]
        else:
            drop = [
                e.id
                for e in self.entries.values()
                if e.category == "harmful" or (e.category == "unused" and step - e.created_step > 1)
            ]
        for entry_id in drop:
            del self.entries[entry_id]
        excess = len(self.entries) - max_entries if max_entries is not None else 0
        if excess > 0:
            ids = list(self.entries)
            if policy == "random":
                victims = random.Random(seed).sample(ids, excess)
            else:  # longest-unused first; ties broken by age (older first)
                victims = sorted(ids, key=lambda i: -self.entries[i].staleness(step))[:excess]
            for entry_id in victims:
                del self.entries[entry_id]
            drop += victims
        return drop

    # ---- views --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        es = list(self.entries.values())
        return {
            "total": len(es),
            "high_performing": sum(e.helpful > 5 and e.harmful < 2 for e in es),
            "problematic": sum(e.harmful >= e.helpful and e.harmful > 0 for e in es),
            "unused": sum(e.helpful + e.harmful == 0 for e in es),
        }

    def section_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(SECTIONS, 0)
        for e in self.entries.values():
            counts[e.section] += 1
        return counts

    def render(
        self,
        *,
        max_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
        include_empty: bool = True,
    ) -> str:
        """Markdown text; with `max_tokens`, the most useful entries that fit the budget.

        Priority under a budget is helpful − harmful, then most recently used, so a
        growing playbook degrades by dropping its least proven lessons from the
        teacher prompt rather than by truncating mid-line.
        """
        keep = set(self.entries)
        if max_tokens is not None:
            count = count_tokens or (lambda s: len(s) // 4 + 1)
            ranked = sorted(
                self.entries.values(),
                key=lambda e: (e.helpful - e.harmful, e.last_used_step or -1, e.created_step),
                reverse=True,
            )
            keep, used = set(), 0
            for e in ranked:
                cost = count(e.line()) + 1
                if used + cost > max_tokens:
                    continue
                keep.add(e.id)
                used += cost
        blocks = []
        for slug, heading in SECTIONS.items():
            lines = [e.line() for e in self.entries.values() if e.section == slug and e.id in keep]
            if lines or include_empty:
                blocks.append("\n".join([f"## {heading}", *lines]))
        return "\n\n".join(blocks)

    @classmethod
    def parse(cls, text: str) -> Playbook:
        """Inverse of `render`. Unknown headings go to 'misc'; other lines are ignored."""
        entries: list[Entry] = []
        section = "misc"
        for raw in text.splitlines():
            line = raw.strip()
            heading = _HEADING.match(line)
            if heading:
                section = section_slug(heading.group("title"))
                continue
            m = _ENTRY_LINE.match(line)
            if m and m.group("id") not in {e.id for e in entries}:
                entries.append(
                    Entry(
                        m.group("id"),
                        section,
                        m.group("text").strip(),
                        int(m.group("h")),
                        int(m.group("d")),
                    )
                )
        return cls(entries)

    # ---- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "entries": [asdict(e) for e in self.entries.values()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Playbook:
        return cls(
            (Entry(**e) for e in data.get("entries", [])), next_id=int(data.get("next_id", 1))
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "playbook.json").write_text(json.dumps(self.to_dict(), indent=1))
        (directory / "playbook.md").write_text(self.render() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Playbook:
        """Load `playbook.json`, or a hand-written `playbook.md` (to seed a run)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"playbook_init: no such file {str(path)!r}{from_where(path)}")
        if path.suffix == ".json":
            try:
                return cls.from_dict(json.loads(read_text_file(path, "playbook_init")))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"playbook_init: {path} is not a saved playbook.json: {exc}"
                ) from exc
        return cls.parse(read_text_file(path, "playbook_init"))

    def _find_similar(self, text: str, threshold: float, exclude: set[str]) -> str | None:
        return next((e.id for e in self.entries.values()
                     if e.id not in exclude and word_overlap(text, e.content) >= threshold), None)  # fmt: skip

    def _find_duplicate(self, text: str) -> str | None:
        key = _norm(text)
        return next((e.id for e in self.entries.values() if _norm(e.content) == key), None)
