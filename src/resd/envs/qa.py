"""Question answering from a JSON-lines file, with FiNER-style partial credit.

Each line is ``{"question": ..., "answer": ...}``; optional keys: ``id``, ``context``
(shown before the question) and ``aliases`` (other accepted answers, for scalar
answers). The answer is either

* a string (or number): the response is right iff its normalised answer equals the
  normalised gold answer or an alias (case, punctuation, the articles a/an/the and
  whitespace are ignored, as in SQuAD-style exact match); or
* a list: the model answers a comma-separated list and gets credit per position, the
  way FiNER (one XBRL tag per entity) was scored: score = fraction of positions right,
  reward = 1 iff every position is right and the lengths agree.

With ``reveal_answer=True`` (what the paper did on FiNER) the feedback states the
correct answer; with False it only says which positions are wrong, so the teacher has to
work out the fix from the question.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, split_items

__all__ = ["QAEnv", "extract_answer", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_LINE = re.compile(
    r"^[\s*_#>-]*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*(?:\*\*|__)?\s*[:：]"
    r"\s*(?:\*\*|__)?\s*(.*)$",
    re.I,
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_answer(text: Any) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(
        " " if (ch in string.punctuation or unicodedata.category(ch).startswith("P")) else ch
        for ch in text
    )
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_answer(response: str) -> tuple[str, bool]:
    """The answer part of a response, and whether it came from an explicit answer line.

    Looks (after removing <think>...</think>) for the last line starting with
    "Answer:" (also "Final answer:", markdown bold allowed), then for the last
    \\boxed{...}, and otherwise takes the last non-empty line.
    """
    text = re.sub(r"<think>.*?</think>", "", response, flags=re.S)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _ANSWER_LINE.match(line)
        if m:
            return _clean(m.group(1)), True
    boxed = _BOXED.findall(text)
    if boxed:
        return _clean(boxed[-1]), True
    return (_clean(lines[-1]) if lines else ""), False


def _clean(answer: str) -> str:
    answer = answer.strip()
    for wrapper in ("**", "__"):  # the closing half of "**Answer: x**"
        if answer.endswith(wrapper) and answer.count(wrapper) % 2 == 1:
            answer = answer[: -len(wrapper)].strip()
    for wrapper in ("**", "__", "`", "*"):
        if (
            answer.startswith(wrapper)
            and answer.endswith(wrapper)
            and len(answer) > 2 * len(wrapper)
        ):
            answer = answer[len(wrapper) : -len(wrapper)].strip()
    return answer.strip()


class QAEnv(Environment):
    """Exact-match QA with per-position partial credit for list answers.

    Args:
        path: the JSON-lines data (required; `env_args.path=FILE.jsonl`).
        seed, test_fraction: deterministic train/test split of `path`.
        test_path: a separate test file; then all of `path` is used for training.
        reveal_answer: whether the feedback states the correct answer.
        separator: how list answers are separated in the response.
    """

    name: ClassVar[str] = "qa"
    description: ClassVar[str] = "question answering (exact match, per-position credit)"

    def __init__(
        self,
        path: str | None = None,
        seed: int = 0,
        test_fraction: float = 0.25,
        test_path: str | None = None,
        reveal_answer: bool = True,
        separator: str = ",",
    ) -> None:
        if path is None:
            raise ValueError(
                "QAEnv needs a data file: set env_args.path=FILE.jsonl (one "
                '{"question": ..., "answer": ...} object per line)'
            )
        self.reveal_answer = bool(reveal_answer)
        self.separator = separator
        items = self._load(path)
        if test_path is not None:
            self._train, self._test = items, self._load(test_path)
        else:
            self._train, self._test = split_items(items, test_fraction, seed)

    # -- data -----------------------------------------------------------------------------

    def _load(self, path: str | Path) -> list[Item]:
        items = []
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"env_args.path: no such file: {path}")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON: {exc}") from exc
                if not isinstance(rec, dict) or "question" not in rec or "answer" not in rec:
                    raise ValueError(f'{where}: need an object with "question" and "answer"')
                items.append(self._make_item(rec, f"qa/{path.stem}/{rec.get('id', lineno)}"))
        if not items:
            raise ValueError(f"{path}: no questions found")
        return items

    def _make_item(self, rec: dict[str, Any], item_id: str) -> Item:
        answer = rec["answer"]
        is_list = isinstance(answer, list)
        gold: str | list[str] = [str(a) for a in answer] if is_list else str(answer)
        if is_list:
            how = (
                f"Answer with {len(gold)} items, in the order asked, separated by "
                f"'{self.separator}', on a final line of the form "
                f"'Answer: item1{self.separator} item2{self.separator} ...'."
            )
            reference = "Answer: " + f"{self.separator} ".join(gold)
        else:
            how = "Give your final answer on the last line in the form 'Answer: <answer>'."
            reference = f"Answer: {gold}"
        question = str(rec["question"]).strip()
        if rec.get("context"):
            question = f"{str(rec['context']).strip()}\n\n{question}"
        return Item(
            id=str(item_id),
            messages=[{"role": "user", "content": f"{question}\n\n{how}"}],
            meta={"answer": gold, "aliases": [str(a) for a in rec.get("aliases", [])]},
            reference=reference,
            answer=None if is_list else gold,  # a list's items are too short to guard
        )

    def train_items(self) -> list[Item]:
        return list(self._train)

    def test_items(self) -> list[Item]:
        return list(self._test)

    # -- scoring ------------------------------------------------------------------------

    def score(self, item: Item, response: str) -> Score:
        answer, explicit = extract_answer(response)
        note = "" if explicit else "No 'Answer:' line found; the last line was used. "
        gold = item.meta["answer"]
        if isinstance(gold, list):
            return self._score_list(gold, answer, note)
        accepted = [gold, *item.meta.get("aliases", [])]
        if normalize_answer(answer) in {normalize_answer(a) for a in accepted}:
            return Score(1.0, 1.0, "")
        if not answer:
            return Score(0.0, 0.0, note + "The response contains no answer.")
        if self.reveal_answer:
            feedback = f'Incorrect. You answered "{answer}"; the correct answer is "{gold}".'
        else:
            feedback = f'Incorrect: "{answer}" is not the expected answer.'
        return Score(0.0, 0.0, note + feedback)

    def _score_list(self, gold: list[str], answer: str, note: str) -> Score:
        pred = [p.strip() for p in answer.split(self.separator)] if answer.strip() else []
        right = [
            i < len(pred) and normalize_answer(pred[i]) == normalize_answer(g)
            for i, g in enumerate(gold)
        ]
        n_right = sum(right)
        if n_right == len(gold) and len(pred) == len(gold):
            return Score(1.0, 1.0, "")
        lines = [f"{n_right} of {len(gold)} positions correct."]
        if len(pred) != len(gold):
            lines.append(f"You gave {len(pred)} items; {len(gold)} were expected.")
        for i, ok in enumerate(right):
            if ok:
                continue
            got = f'"{pred[i]}"' if i < len(pred) else "nothing"
            if self.reveal_answer:
                lines.append(f'Position {i + 1}: you answered {got}; correct is "{gold[i]}".')
            else:
                lines.append(f"Position {i + 1} is wrong (you answered {got}).")
        return Score(0.0, n_right / len(gold), note + "\n".join(lines))
