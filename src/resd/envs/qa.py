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

from resd.envs.base import Environment, Item, Score, real_number, split_items
from resd.envs.loading import load_rows
from resd.envs.scorers import answers_match, extract_answer, gold_text, normalize_answer

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
        if not isinstance(separator, str) or not separator:
            raise ValueError(
                f"env_args.separator: must be a non-empty string (e.g. ','), got {separator!r}"
            )
        fraction = real_number(test_fraction, "env_args.test_fraction")
        if test_path is None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"env_args.test_fraction: must be in [0, 1), got {test_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"env_args.seed: must be a whole number, got {seed!r}")
        if test_path is not None and _same_file(path, test_path):
            raise ValueError(
                "env_args.test_path: is the same file as env_args.path; testing on the "
                "training questions measures nothing (leave test_path out to hold some out)"
            )
        self.reveal_answer = bool(reveal_answer)
        self.separator = separator
        self._where: dict[str, str] = {}  # item id -> its row, to name both of a duplicate
        items = self._load(path)
        if test_path is not None:
            self._train, self._test = items, self._load(test_path, "env_args.test_path")
        else:
            self._train, self._test = split_items(items, fraction, seed)

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
            self._check_row(rec, rows.where(i))
            item = self._make_item(rec, f"qa/{stem}/{key}")
            if item.id in self._where:
                raise ValueError(
                    f"{rows.where(i)}: the id {key!r} is also used at {self._where[item.id]}; "
                    "ids must be unique"
                )
            self._where[item.id] = rows.where(i)
            items.append(item)
        if not items:
            raise ValueError(f"{path}: no questions found")
        return items

    def _check_row(self, rec: dict[str, Any], where: str) -> None:
        """Refuse a row whose answer no reply could be scored against correctly.

        An empty answer would give the reward to an empty reply; an empty list would divide
        by zero; a list item that holds the separator (or is null, blank or a list) could
        never be answered, since the reply is split at the separator.
        """
        if not str(rec["question"]).strip():
            raise ValueError(f"{where}: empty question")
        answer = rec["answer"]
        if not isinstance(answer, list):
            if isinstance(answer, dict) or not gold_text(answer).strip():
                raise ValueError(f"{where}: need a non-empty answer, got {answer!r}")
            return
        if not answer:
            raise ValueError(f"{where}: the answer is an empty list; give at least one item")
        for j, part in enumerate(answer):
            if part is None or isinstance(part, (list, dict)) or not gold_text(part).strip():
                raise ValueError(
                    f"{where}: answer item {j + 1} is {part!r}; each item must be a "
                    "non-empty string or number"
                )
            if self.separator in gold_text(part):
                raise ValueError(
                    f"{where}: answer item {j + 1} ({part!r}) contains the separator "
                    f"{self.separator!r} (env_args.separator), so no reply could give it; "
                    "choose another separator"
                )

    def _make_item(self, rec: dict[str, Any], item_id: str) -> Item:
        answer = rec["answer"]
        is_list = isinstance(answer, list)
        gold: str | list[str] = [gold_text(a) for a in answer] if is_list else gold_text(answer)
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
            meta={"answer": gold, "aliases": [gold_text(a) for a in aliases]},
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
        if answers_match(answer, accepted):
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
        right = [i < len(pred) and answers_match(pred[i], [g]) for i, g in enumerate(gold)]
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


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (or, if either is missing, the same text)."""
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    try:
        return pa.samefile(pb)
    except OSError:
        return pa.resolve() == pb.resolve()
