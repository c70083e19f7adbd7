"""Train on the rows of any dataset: a Hugging Face Hub id, a local data file, or a
`datasets.Dataset` built in Python.

A TRL user already has a dataset with a prompt column and an answer column, and often a
reward function. `DatasetEnv` maps the columns onto RESD items (prompt or chat, optional
reference, literal answer, extra columns kept for the scorer) and scores responses with a
built-in scorer (`exact_match`, `numeric`, `regex`; see `resd.envs.scorers`) or the
user's own function, TRL-style or per item.

Rows come from `resd.envs.loading`, the one loader every file-reading environment uses:
which formats, how splits are named and sliced, and how a bad row is reported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, real_number, split_items, whole_number
from resd.envs.loading import (
    DATA_SUFFIXES,
    Rows,
    first_file,
    load_splits,
    rows_from_dataset,
    splits_overlap,
)
from resd.envs.scorers import (
    BUILTIN_SCORERS,
    ScorerTimeout,
    combine_scores,
    format_number,
    gold_text,
    parse_gold_number,
    resolve_reward_functions,
    resolve_scorer,
    timeout_message,
    wrap_callable,
)

__all__ = ["DatasetEnv"]


# -- the environment -------------------------------------------------------------------------


class DatasetEnv(Environment):
    """Rows of a dataset as RESD items, scored by a built-in scorer or a user function.

    Args:
        path: a Hub id, a local jsonl/json/csv/tsv/parquet/arrow file, or a directory
            (data files or a `save_to_disk` folder). Optional when `data_files` is given.
        split: the training split (slices allowed: ``train[:1000]``).
        test_split: the evaluation split; without it, `test_fraction` of `split` is held
            out with `split_items(..., seed)`. One that shares rows with `split` is
            refused: at once when that is sure from the specs alone (the same split, a
            split and a slice of it, percent slices that meet), else once the rows are
            loaded (row-number slices such as ``train[:800]`` and ``train[700:]``).
        name, data_files, cache_dir, load_kwargs: passed to `datasets.load_dataset`.
        prompt_column: a string prompt (or a chat list, as in TRL's conversational format);
            default "prompt" when present.
        messages_column: a chat list; default "messages" when present and there is no
            "prompt". A final assistant turn is taken off the prompt and becomes the
            reference unless `reference_column` is set.
        instruction: text added, after a blank line, to the last user message of every
            prompt (say how to give the answer, e.g. "End with 'Answer: <number>'.").
        reference_column: a correct response (SDFT's demonstration; `resd env-check`):
            a string, or assistant messages (TRL's conversational "completion").
        answer_column: the gold value the built-in scorers compare against; also
            `Item.answer` (for `numeric`, the number read from it; for `regex`, none).
        id_column: item ids (default: the row index within its split).
        meta_columns: the columns kept in `Item.meta` for the scorer; default every column
            but the prompt column (what TRL hands a reward function). The answer column is
            always kept.
        scorer: "exact_match", "numeric", "regex", a callable, or "package.module:function";
            or a list of the last two, as TRL's `reward_funcs`: a reply succeeds when each
            gives the reward, its score is their weighted mean, and the feedback names each
            that did not.
        scorer_weights: the list's weights (TRL's `reward_weights`; default 1 each).
        scorer_args: keyword arguments of a built-in scorer (numeric: rel_tol, abs_tol;
            regex: pattern, fullmatch).
        reveal_answer: whether a built-in scorer's feedback states the expected answer.
        feedback_column: a column whose text is the feedback on a reply that did not get
            the reward, in place of the scorer's own sentence: a worked solution, or the
            right value in words your teacher reads well. Empty cells keep the scorer's.
        threshold: a user function's number v gives reward 1 iff v >= threshold.
        scorer_timeout: seconds one scorer call may take (default None: no limit, as in
            TRL; 0 also means none): a user function, either kind, or the regex scorer's
            match. A call that takes longer raises `ScorerTimeout` naming the scorer, the
            item and the limit, instead of hanging the run. Off by default because a
            limited user function runs in a worker thread, where code that needs the main
            thread (math_verify's SIGALRM timeouts, thread-bound connections) fails.
        test_fraction, seed: the held-out split when there is no `test_split`.
        n_train, n_test: keep only the first items of each split (quick runs).
        dataset: an in-memory `datasets.Dataset` or `DatasetDict` instead of `path`
            (see `from_dataset`).
    """

    name: ClassVar[str] = "dataset"
    description: ClassVar[str] = "rows of a Hugging Face dataset or data file, with a scorer"

    def __init__(
        self,
        path: str | None = None,
        split: str = "train",
        test_split: str | None = None,
        name: str | None = None,
        data_files: str | list[str] | dict[str, Any] | None = None,
        cache_dir: str | None = None,
        load_kwargs: dict[str, Any] | None = None,
        prompt_column: str | None = None,
        messages_column: str | None = None,
        instruction: str | None = None,
        reference_column: str | None = None,
        answer_column: str | None = None,
        id_column: str | None = None,
        meta_columns: str | list[str] | None = None,
        scorer: str | Callable[..., Any] | list[str | Callable[..., Any]] = "exact_match",
        scorer_weights: list[float] | None = None,
        scorer_args: dict[str, Any] | None = None,
        reveal_answer: bool = True,
        feedback_column: str | None = None,
        threshold: float = 1.0,
        scorer_timeout: float | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        n_train: int | None = None,
        n_test: int | None = None,
        dataset: Any = None,
    ) -> None:
        # Cheap argument checks first, so a typo does not wait for a download.
        if dataset is not None and (path is not None or data_files is not None):
            raise ValueError("env_args.path: give either a path or an in-memory dataset, not both")
        if test_split is not None and splits_overlap(split, test_split):
            raise ValueError(
                f"env_args.test_split: {test_split!r} shares rows with env_args.split "
                f"{split!r}; testing on training rows measures nothing"
            )
        test_fraction = real_number(test_fraction, "env_args.test_fraction")
        if test_split is None and not 0.0 < test_fraction < 1.0:
            raise ValueError(f"env_args.test_fraction: must be in (0, 1), got {test_fraction}")
        n_train = whole_number(n_train, "env_args.n_train")
        n_test = whole_number(n_test, "env_args.n_test")
        seed = whole_number(seed, "env_args.seed", negative_ok=True)
        threshold = real_number(threshold, "env_args.threshold")
        if scorer_timeout is not None:  # seconds; 0 or null: no limit
            scorer_timeout = real_number(
                scorer_timeout, "env_args.scorer_timeout", negative_ok=False
            )
        self.scorer_timeout = scorer_timeout or None
        if prompt_column is not None and messages_column is not None:
            raise ValueError("env_args.prompt_column, env_args.messages_column: set one, not both")
        # a string here failed inside dict() with a message that named neither argument
        for arg, given in (("load_kwargs", load_kwargs), ("scorer_args", scorer_args)):
            if given is not None and not isinstance(given, dict):
                raise ValueError(f"env_args.{arg}: expected a mapping of names to values, "
                                 f"got {given!r}")  # fmt: skip
        if isinstance(scorer, (list, tuple)):  # TRL's reward_funcs, with its reward_weights
            self.scorer, self.scorer_weights = resolve_reward_functions(
                list(scorer), scorer_weights
            )
        elif scorer_weights is not None:
            raise ValueError("env_args.scorer_weights: weights go with a list of reward "
                             "functions as env_args.scorer")  # fmt: skip
        else:
            self.scorer, self.scorer_weights = resolve_scorer(scorer), None
        self.scorer_args = dict(scorer_args or {})
        self._check_scorer_args()
        self.instruction = instruction
        self.reveal_answer = bool(reveal_answer)
        self.threshold = float(threshold)
        if isinstance(meta_columns, str):
            meta_columns = [meta_columns]

        splits = [split] if test_split is None else [split, test_split]
        fields = ["env_args.split", "env_args.test_split"][: len(splits)]
        if dataset is not None:
            loaded = rows_from_dataset(dataset, splits, fields)
            self.label = "dataset"
        else:
            loaded = load_splits(
                path,
                splits,
                name=name,
                data_files=data_files,
                cache_dir=cache_dir,
                load_kwargs=load_kwargs,
                split_fields=fields,
            )
            self.label = _label(path, data_files)
        for rows, arg in zip(loaded, fields, strict=True):
            if not rows.records:
                raise ValueError(f"{arg}: {rows.source} [{rows.split}] has no rows")
        if test_split is not None:
            _check_disjoint(loaded[0], loaded[1])

        columns = loaded[0].columns
        if prompt_column is None and messages_column is None:
            if "prompt" in columns:
                prompt_column = "prompt"
            elif "messages" in columns:
                messages_column = "messages"
            else:
                raise ValueError(
                    "env_args.prompt_column: the data has no 'prompt' or 'messages' column; "
                    f"name the prompt column (available columns: {', '.join(columns)})"
                )
        # `is not None`: an empty prompt_column is a column name the check below refuses
        self.prompt_column = prompt_column if prompt_column is not None else messages_column
        self.from_messages = messages_column is not None
        self.reference_column = reference_column
        self.answer_column = answer_column
        self.id_column = id_column
        self.feedback_column = feedback_column
        for rows in loaded:
            self._check_columns(rows, meta_columns)
        if meta_columns is None:
            meta_columns = [c for c in columns if c != self.prompt_column]
        else:  # the scorer's own columns are always kept
            meta_columns = [*meta_columns, *(c for c in (answer_column, feedback_column)
                                             if c and c not in meta_columns)]  # fmt: skip
        self.meta_columns = list(meta_columns)

        self.conversational = self.from_messages
        built = [[self._item(rows, i) for i in range(len(rows))] for rows in loaded]
        if test_split is None:
            self._train, self._test = split_items(built[0], test_fraction, seed or 0)
        else:
            self._train, self._test = built
        self._check_ids(self._train + self._test)
        if n_train is not None:
            self._train = self._train[:n_train]
        if n_test is not None:
            self._test = self._test[:n_test]
        self._score = self._with_feedback_column(self._make_scorer())

    @classmethod
    def from_dataset(
        cls, dataset: Any, scorer: str | Callable[..., Any] = "exact_match", **columns: Any
    ) -> DatasetEnv:
        """An environment over an in-memory `datasets.Dataset` or `DatasetDict`.

        `columns` are the other constructor arguments (prompt_column, answer_column,
        split, test_split, ...). A plain Dataset is the split "train".
        """
        if "path" in columns or "data_files" in columns:
            raise ValueError("from_dataset: the dataset replaces path and data_files")
        return cls(dataset=dataset, scorer=scorer, **columns)

    # -- checks --------------------------------------------------------------------------

    def _check_scorer_args(self) -> None:
        if not isinstance(self.scorer, str):
            if self.scorer_args:
                raise ValueError("env_args.scorer_args: only the built-in scorers take arguments")
            return
        allowed = {"numeric": {"rel_tol", "abs_tol"}, "regex": {"pattern", "fullmatch"}}
        takes = allowed.get(self.scorer, set())
        for key in self.scorer_args:
            if key not in takes:
                options = ", ".join(sorted(takes)) or "none"
                hint = " (use env_args.reveal_answer)" if key == "reveal_answer" else ""
                raise ValueError(
                    f"env_args.scorer_args.{key}: not an argument of the {self.scorer!r} "
                    f"scorer (it takes: {options}){hint}"
                )
        for key in ("rel_tol", "abs_tol"):
            if key in self.scorer_args:
                field = f"env_args.scorer_args.{key}"
                self.scorer_args[key] = real_number(self.scorer_args[key], field, negative_ok=False)
        fullmatch = self.scorer_args.get("fullmatch", False)
        if not isinstance(fullmatch, bool):
            raise ValueError(
                f"env_args.scorer_args.fullmatch: must be true or false, got {fullmatch!r}"
            )
        pattern = self.scorer_args.get("pattern")
        if "pattern" in self.scorer_args and (not isinstance(pattern, str) or not pattern):
            raise ValueError(
                f"env_args.scorer_args.pattern: must be a non-empty regex string, got {pattern!r}"
            )
        if self.scorer == "regex" and "pattern" in self.scorer_args:
            try:
                re.compile(str(self.scorer_args["pattern"]))
            except re.error as exc:
                raise ValueError(f"env_args.scorer_args.pattern: invalid regex: {exc}") from exc

    def _check_columns(self, rows: Rows, meta_columns: list[str] | None) -> None:
        """Every named column must exist in every split loaded; say which exist."""
        available = ", ".join(rows.columns)
        prompt_field = "messages_column" if self.from_messages else "prompt_column"
        named = [
            (prompt_field, self.prompt_column),
            ("reference_column", self.reference_column),
            ("answer_column", self.answer_column),
            ("id_column", self.id_column),
            ("feedback_column", self.feedback_column),
            *(("meta_columns", c) for c in meta_columns or []),
        ]
        for arg, column in named:
            if column is not None and column not in rows.columns:
                raise ValueError(
                    f"env_args.{arg}: no column {column!r} in {rows.source} [{rows.split}]; "
                    f"available columns: {available}"
                )
        needs_answer = isinstance(self.scorer, str) and not (
            self.scorer == "regex" and "pattern" in self.scorer_args
        )
        if needs_answer and self.answer_column is None:
            raise ValueError(
                f"env_args.answer_column: the {self.scorer!r} scorer compares responses with "
                f"an answer column; name it (available columns: {available})"
            )

    def _check_ids(self, items: list[Item]) -> None:
        seen: set[str] = set()
        for item in items:
            if item.id in seen:
                raise ValueError(f"env_args.id_column: the id {item.id!r} occurs more than once")
            seen.add(item.id)

    # -- items ---------------------------------------------------------------------------

    def _item(self, rows: Rows, i: int) -> Item:
        rec, where = rows.records[i], rows.where(i)
        messages, trailing = self._messages(rec.get(self.prompt_column), where)
        if self.instruction:
            last = max(j for j, m in enumerate(messages) if m["role"] == "user")
            text = messages[last]["content"].rstrip()
            messages[last] = {**messages[last], "content": f"{text}\n\n{self.instruction}"}
        reference = trailing
        if self.reference_column is not None:
            reference = self._reference(rec.get(self.reference_column), where)
        key: Any = i
        if self.id_column is not None:
            key = rec.get(self.id_column)
            if key is None or str(key) == "":
                raise ValueError(
                    f"{where}: empty id in column {self.id_column!r} (env_args.id_column)"
                )
        return Item(
            id=f"{self.label}/{rows.split}/{key}",
            messages=messages,
            meta={c: rec.get(c) for c in self.meta_columns},
            reference=reference,
            answer=self._literal_answer(rec, where),
        )

    def _messages(self, value: Any, where: str) -> tuple[list[dict[str, str]], str | None]:
        """The prompt as a chat, and a final assistant turn taken off it (if any)."""
        column = f"{self.prompt_column!r} (env_args." + (
            "messages_column)" if self.from_messages else "prompt_column)"
        )
        if isinstance(value, str) and not self.from_messages:
            if not value.strip():
                raise ValueError(f"{where}: empty prompt in column {column}")
            return [{"role": "user", "content": value}], None
        if not isinstance(value, list) or not value:
            kind = (
                "a string or a list of messages" if not self.from_messages else "a list of messages"
            )
            raise ValueError(f"{where}: column {column} holds {type(value).__name__}, not {kind}")
        messages = []
        for m in value:
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: column {column}: each message needs a string 'role' and 'content'"
                )
            messages.append({"role": m["role"], "content": m["content"]})
        self.conversational = True
        trailing = None
        if messages[-1]["role"] == "assistant":
            trailing = messages.pop()["content"]
        if not any(m["role"] == "user" for m in messages):
            raise ValueError(f"{where}: column {column} has no user message")
        return messages, trailing

    def _reference(self, value: Any, where: str) -> str | None:
        """The reference reply's text. TRL's conversational "completion" column holds it as
        assistant messages; their text is the reply (its Python repr was taken instead,
        and no reference scored)."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, (list, tuple)):
            return str(value)  # a number: the reply that states it
        if not all(isinstance(m, Mapping) and m.get("role") == "assistant"
                   and isinstance(m.get("content"), str) for m in value):  # fmt: skip
            raise ValueError(f"{where}: column {self.reference_column!r} "
                             f"(env_args.reference_column) holds a list that is not assistant "
                             f"messages ({{'role': 'assistant', 'content': ...}}): "
                             f"{value!r:.80}")  # fmt: skip
        return "\n".join(m["content"] for m in value) if value else None

    def _literal_answer(self, rec: dict[str, Any], where: str) -> str | None:
        """Item.answer, after checking that the scorer can use the gold value at all."""
        if self.answer_column is None:
            return None
        gold = rec.get(self.answer_column)
        column = f"column {self.answer_column!r} (env_args.answer_column)"
        builtin = self.scorer if isinstance(self.scorer, str) else None
        if gold is None or (isinstance(gold, (list, tuple)) and not gold):
            if builtin is None:
                return None
            raise ValueError(f"{where}: no answer in {column}")
        golds = gold if isinstance(gold, (list, tuple)) else [gold]
        from_column = builtin is not None and not (
            builtin == "regex" and "pattern" in self.scorer_args
        )
        # An empty gold would give the reward to an empty reply (or match everything).
        if from_column and any(g is None or not gold_text(g).strip() for g in golds):
            raise ValueError(f"{where}: empty answer in {column}, got {gold!r}")
        if builtin == "numeric":
            golds = gold if isinstance(gold, (list, tuple)) else [gold]
            numbers = [parse_gold_number(g) for g in golds]
            if any(x is None for x in numbers):
                raise ValueError(
                    f"{where}: the numeric scorer needs a number in {column}, got {gold!r}"
                )
            return format_number(numbers[0] or 0.0)
        if builtin == "regex":
            if "pattern" not in self.scorer_args:
                try:
                    re.compile(str(gold))
                except re.error as exc:
                    raise ValueError(f"{where}: invalid regex in {column}: {exc}") from exc
            return None  # a pattern is not a literal answer the playbook could leak
        return gold_text(golds[0])  # the text exact_match compares against

    def _make_scorer(self) -> Callable[[Item, str], Score]:
        if isinstance(self.scorer, list):
            parts = [self._wrap(fn, f"env_args.scorer[{i}]") for i, fn in enumerate(self.scorer)]
            names = [getattr(fn, "__name__", type(fn).__name__) for fn in self.scorer]
            # two of one name (two lambdas) would share a part and a line of feedback
            names = [n if names.count(n) == 1 else f"{n}[{i}]" for i, n in enumerate(names)]
            return combine_scores(parts, names, self.scorer_weights or [])
        if not isinstance(self.scorer, str):
            return self._wrap(self.scorer, "env_args.scorer")
        fn = BUILTIN_SCORERS[self.scorer]
        kwargs = {**self.scorer_args, "reveal_answer": self.reveal_answer}
        pattern = kwargs.pop("pattern", None)
        column = self.answer_column or ""
        name, limit = self.scorer, self.scorer_timeout
        if name == "regex":  # the one built-in whose time depends on the user's input
            kwargs["timeout"] = limit

        def score(item: Item, response: str) -> Score:
            gold = pattern if pattern is not None else item.meta.get(column)
            try:
                return fn(gold, response, **kwargs)
            except TimeoutError as exc:  # only with a limit: see `regex`
                raise ScorerTimeout(timeout_message(name, item.id, limit or 0, str(exc))) from exc

        return score

    # -- the protocol --------------------------------------------------------------------

    def train_items(self) -> list[Item]:
        return list(self._train)

    def test_items(self) -> list[Item]:
        return list(self._test)

    def _wrap(self, fn: Callable[..., Any], field: str) -> Callable[[Item, str], Score]:
        return wrap_callable(fn, columns=self.meta_columns, conversational=self.conversational,
                             threshold=self.threshold, field=field,
                             timeout=self.scorer_timeout)  # fmt: skip

    def _with_feedback_column(
        self, score: Callable[[Item, str], Score]
    ) -> Callable[[Item, str], Score]:
        """`score`, with a failed reply's feedback taken from `feedback_column` when its cell
        has text."""
        column = self.feedback_column
        if column is None:
            return score

        def scored(item: Item, response: str) -> Score:
            result = score(item, response)
            given = item.meta.get(column)
            given = "" if given is None else str(given).strip()
            return (
                dataclasses.replace(result, feedback=given)
                if result.reward < 1.0 and given
                else result
            )

        return scored

    def score(self, item: Item, response: str) -> Score:
        return self._score(item, response)


def _check_disjoint(train: Rows, test: Rows) -> None:
    """Refuse a test split that holds training rows, now that the split's length is known
    (``train[:800]`` and ``train[700:]`` share rows 700-799 of a 1000-row split)."""
    if train.span is None or test.span is None:
        return
    shared = train.span.shared(test.span)
    if shared:
        rows = f"rows {shared.start} to {shared.stop - 1} are"
        if len(shared) == 1:
            rows = f"row {shared.start} is"
        raise ValueError(
            f"env_args.test_split: {test.split!r} shares rows with env_args.split "
            f"{train.split!r} ({rows} in both, of the {train.span.total} rows of "
            f"{train.span.split!r}); testing on training rows measures nothing"
        )


def _label(path: str | Path | None, data_files: Any) -> str:
    """The prefix of item ids: a file's stem, a folder's name, a Hub id's last part."""
    if path is None or (data_files is not None and str(path) in set(DATA_SUFFIXES.values())):
        return Path(first_file(data_files)).stem or "dataset"
    local = Path(str(path)).expanduser()
    if local.is_file():
        return local.stem
    return local.name or str(path).rstrip("/").rsplit("/", 1)[-1] or "dataset"
