"""Question answering from a data file, with FiNER-style partial credit.

Each line of a JSON-lines file (or row of any file `resd.envs.loading.load_rows` reads:
csv, parquet, ...) is ``{"question": ..., "answer": ...}``; optional keys: ``id``, ``context``
(shown before the question) and ``aliases`` (other accepted answers, for scalar
answers). The answer is either

* a string (or number): the response is right iff its normalised answer equals the
  normalised gold answer or an alias (case, punctuation, the articles a/an/the and
  whitespace are ignored, as in SQuAD-style exact match); or
* a list: the model answers a comma-separated list and gets credit per position, the
  way FiNER (one XBRL tag per entity) was scored: score = fraction of positions right,
  reward = 1 iff every position is right and the lengths agree.

With ``reveal_answer=True`` (what the paper did on FiNER) the feedback states the
correct answer, without repeating the wrong one (a small teacher copies what it reads);
with False it only says which positions are wrong and what was answered there, so the
teacher has to work out the fix from the question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, split_items
from resd.envs.loading import load_rows
from resd.envs.scorers import extract_answer, normalize_answer

__all__ = ["QAEnv", "extract_answer", "normalize_answer"]


class QAEnv(Environment):
    """Exact-match QA with per-position partial credit for list answers.

    Args:
        path: the data (required; `env_args.path=FILE.jsonl`, or csv, parquet, ...).
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
            self._train, self._test = items, self._load(test_path, "env_args.test_path")
        else:
            self._train, self._test = split_items(items, test_fraction, seed)

    # -- data -----------------------------------------------------------------------------

    def _load(self, path: str | Path, field: str = "env_args.path") -> list[Item]:
        """Items from a data file; JSON lines are read directly, so errors name the line.

        Any format `load_rows` reads works (csv, parquet, ...); the default id of a row is
        its line number in a JSON-lines file, else its 1-based row number.
        """
        rows = load_rows(path, field=field, required=("question", "answer"))
        stem = Path(str(path)).stem
        items = []
        for i, rec in enumerate(rows.records):
            number = rows.lines[i] if rows.lines is not None else i + 1
            key = rec.get("id") if rec.get("id") is not None else number
            items.append(self._make_item(rec, f"qa/{stem}/{key}"))
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
        aliases = rec.get("aliases") or []  # absent, or null in a tabular file
        if isinstance(aliases, str):
            aliases = [aliases]
        question = str(rec["question"]).strip()
        if rec.get("context"):
            question = f"{str(rec['context']).strip()}\n\n{question}"
        return Item(
            id=str(item_id),
            messages=[{"role": "user", "content": f"{question}\n\n{how}"}],
            meta={"answer": gold, "aliases": [str(a) for a in aliases]},
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
            feedback = f'Incorrect. The correct answer is "{gold}".'  # no copy of the wrong one
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
            if self.reveal_answer:
                lines.append(f'Position {i + 1} should be "{gold[i]}".')
            else:
                got = f'"{pred[i]}"' if i < len(pred) else "nothing"
                lines.append(f"Position {i + 1} is wrong (you answered {got}).")
        return Score(0.0, n_right / len(gold), note + "\n".join(lines))
