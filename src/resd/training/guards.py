"""Guards on lesson content: a valid shape is not yet a useful lesson.

Structured output guarantees that a curator's ADD names a real section and carries a
string. It cannot tell a lesson from the task pasted back, the checker's message
repeated, or the answer to the one task the lesson came from, which the teacher would
then copy into every later task. `lesson_problem` names what is wrong with a proposed
lesson, or returns None; the trainer skips the operation and counts the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_WORDS = 4
MIN_CHARS = 16
SHINGLE = 6  # words in a shared run that counts as copied
COPIED_FRACTION = 0.5  # a lesson is a copy when this share of its words sits in shared runs

REASONS = ("too_short", "placeholder", "copies_task", "copies_feedback", "leaks_answer")

_WORD = re.compile(r"[a-z0-9]+")
# A template slot echoed back, e.g. the curation prompt's "<a one-sentence lesson>"; the
# 135M model's one surviving lesson in its free-text manufactoria cell was exactly that.
# A lesson is a placeholder when the words outside its slots are too few to be a lesson
# ("Lesson: <a one-sentence lesson>", "<lesson one> <lesson two>"), so a real lesson
# that names a tag ("Close every <think> block before the answer") is kept.
_SLOT = re.compile(r"<[^<>]+>")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copied_fraction(lesson: str, source: str, n: int = SHINGLE) -> float:
    """The share of the lesson's words that lie in a run of `n` words also found in source.

    Short lessons (under `n` words) count as copied only when all of them appear, in
    order, in the source.
    """
    words, src = _words(lesson), _words(source)
    if not words or not src:
        return 0.0
    n = min(n, len(words))
    grams = {tuple(src[i : i + n]) for i in range(len(src) - n + 1)}
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(covered) / len(words)


def word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of two texts' word sets: 1.0 for the same words in any order.

    Cheap enough to compare a lesson with every entry, and it catches what a small
    curator produces when it rewrites the playbook it reads: the same sentence with a word
    or two changed ("use series of checks to ensure the tape is an Y or R color").
    """
    x, y = set(_words(a)), set(_words(b))
    return len(x & y) / len(x | y) if x and y else 0.0


def contains_answer(lesson: str, answer: str) -> bool:
    """The literal answer, standing alone (not inside a longer number or word)."""
    answer = " ".join(answer.split())
    if not answer:
        return False
    pattern = r"(?<![\w.])" + re.escape(answer) + r"(?![\w])"
    return re.search(pattern, " ".join(lesson.split()), re.IGNORECASE) is not None


@dataclass(frozen=True)
class LessonSource:
    """What a lesson came from: it must not repeat these."""

    task: str = ""
    feedback: str = ""
    answer: str | None = None  # the environment's literal answer, where it marks one


def lesson_problem(content: str, source: LessonSource) -> str | None:
    """Why `content` should not enter the playbook (one of `REASONS`), or None."""
    text = " ".join(str(content or "").split())
    if len(text) < MIN_CHARS or len(_words(text)) < MIN_WORDS:
        return "too_short"
    if _SLOT.search(text) and len(_words(_SLOT.sub(" ", text))) < MIN_WORDS:
        return "placeholder"
    if source.answer and contains_answer(text, source.answer):
        return "leaks_answer"
    if copied_fraction(text, source.task) >= COPIED_FRACTION:
        return "copies_task"
    if copied_fraction(text, source.feedback) >= COPIED_FRACTION:
        return "copies_feedback"
    return None
