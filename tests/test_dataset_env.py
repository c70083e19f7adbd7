"""DatasetEnv: local files and in-memory datasets, column mapping, splits, scorers, training.

Everything is offline: data files are written to tmp_path, the `datasets` cache goes
there too, and the one Hub-id test replaces `datasets.load_dataset`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from resd.analysis.evaluation import safe_score
from resd.envs import make_env, resolve_env_class
from resd.envs.base import Item, Score
from resd.envs.dataset import DatasetEnv
from resd.envs.loading import (
    Span,
    load_rows,
    load_splits,
    rows_from_dataset,
    split_span,
    splits_overlap,
)
from resd.envs.qa import QAEnv
from resd.envs.scorers import (
    ScorerTimeout,
    exact_match,
    numeric,
    regex,
    to_score,
    wrap_callable,
)

ROWS = [
    {"qid": f"q{i}", "question": q, "answer": a, "difficulty": d}
    for i, (q, a, d) in enumerate(
        [
            ("What is the capital of France?", "Paris", 1),
            ("What is the capital of Italy?", "Rome", 1),
            ("How many legs has a spider?", "8", 2),
            ("What is 6 times 7?", "42", 2),
            ("Which planet is the largest?", "Jupiter", 3),
            ("What is the opposite of hot?", "cold", 1),
            ("What is the plural of mouse?", "mice", 2),
            ("What colour is the sky on a clear day?", "blue", 1),
            ("What is 10 squared?", "100", 2),
            ("Which ocean is the largest?", "the Pacific", 3),
        ]
    )
]
COLUMNS = {"prompt_column": "question", "answer_column": "answer"}


def write(tmp_path: Path, fmt: str, rows: list[dict] = ROWS, stem: str = "data") -> str:
    path = tmp_path / f"{stem}.{fmt}"
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.to_csv(str(path), index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def env_from(tmp_path: Path, fmt: str, **kwargs) -> DatasetEnv:
    args = {**COLUMNS, "cache_dir": str(tmp_path / "cache"), **kwargs}
    return DatasetEnv(path=write(tmp_path, fmt), **args)


def all_items(env: DatasetEnv) -> list[Item]:
    return env.train_items() + env.test_items()


def by_qid(env: DatasetEnv) -> dict[str, Item]:
    return {it.id.rsplit("/", 1)[1]: it for it in all_items(env)}


def memory_env(rows: list[dict] = ROWS, **kwargs) -> DatasetEnv:
    return DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), **{**COLUMNS, **kwargs})


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_local_files_give_the_same_items_as_an_in_memory_dataset(tmp_path, fmt):
    # Catches a format whose rows come out different from the same rows held in memory: a
    # lost or renamed column, a changed value (CSV must give difficulty back as 1, not "1").
    env = env_from(tmp_path, fmt, id_column="qid")
    ref = memory_env(id_column="qid")
    assert env.name == "dataset" and len(all_items(env)) == len(ROWS)
    got, want = by_qid(env), by_qid(ref)
    assert set(got) == {r["qid"] for r in ROWS}
    for qid, item in got.items():
        assert item.messages == want[qid].messages
        assert item.answer == want[qid].answer
        assert item.meta["difficulty"] == want[qid].meta["difficulty"]
    spider = got["q2"]
    assert spider.messages == [{"role": "user", "content": "How many legs has a spider?"}]
    assert spider.answer == "8" and spider.reference is None
    assert set(spider.meta) == {"qid", "answer", "difficulty"}  # all but the prompt column


def test_ids_default_to_the_row_index_and_name_the_source_and_split(tmp_path):
    env = env_from(tmp_path, "parquet")
    ids = sorted(it.id for it in all_items(env))
    assert ids == sorted(f"data/train/{i}" for i in range(len(ROWS)))


def test_a_jsonl_column_may_mix_types_and_bad_lines_are_named(tmp_path):
    # JSON lines are read directly: Arrow would refuse a column holding str, int and list.
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"q": "a", "x": "s"}\n\n{"q": "b", "x": 3}\n{"q": "c", "x": [1, 2]}\n')
    rows = load_rows(str(path))
    assert [r["x"] for r in rows.records] == ["s", 3, [1, 2]]
    assert rows.lines == [1, 3, 4] and rows.where(1) == f"{path}:3"
    path.write_text('{"q": "a"}\n{"q": oops}\n')
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2: not valid JSON"):
        load_rows(str(path))


def test_missing_keys_become_none_as_in_datasets(tmp_path):
    path = tmp_path / "sparse.jsonl"
    path.write_text(
        '{"question": "q1?", "answer": "a"}\n{"question": "q2?", "answer": "b", "note": 1}\n'
    )
    rows = load_rows(str(path))
    assert rows.columns == ["question", "answer", "note"]
    assert rows.records[0] == {"question": "q1?", "answer": "a", "note": None}


def test_in_memory_dataset_dict_uses_its_splits():
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:7]),
            "test": datasets.Dataset.from_list(ROWS[7:]),
        }
    )
    env = DatasetEnv.from_dataset(dd, test_split="test", id_column="qid", **COLUMNS)
    assert [it.id for it in env.train_items()] == [f"dataset/train/q{i}" for i in range(7)]
    assert [it.id for it in env.test_items()] == [f"dataset/test/q{i}" for i in range(7, 10)]
    with pytest.raises(ValueError, match=r"env_args\.test_split: .*no split 'valid'.*train, test"):
        DatasetEnv.from_dataset(dd, test_split="valid", **COLUMNS)
    with pytest.raises(ValueError, match=r"Dataset\.from_list"):
        DatasetEnv.from_dataset(ROWS, **COLUMNS)  # a plain list is not a Dataset


@pytest.mark.parametrize(("train", "test", "n_train"), [
    ("train[:70%]", "train[70%:]", 7),
    ("train[:33%]", "train[33%:]", 3),  # 3.3 rows: both readers must round the same way
    ("train[:-3]", "train[-3:]", 7),
    ("train[ :1_0%]", "train[ 1_0% : ]", 1),  # spaces and grouped digits
    ("train [:6]", "train[ 6 : ]", 6),
])  # fmt: skip
def test_split_slices_match_datasets_own_slicing(tmp_path, train, test, n_train):
    # The JSON-lines file is sliced by our code, the parquet file by `datasets`: the same
    # rows must land in each split, or the two readers disagree about what a slice means.
    # Bug caught: `datasets` refused spaces inside a spec that the JSON reader took, and
    # `train[1_000:]`, which `datasets` takes, was refused before it was asked.
    kwargs = {"split": train, "test_split": test, "id_column": "qid"}
    direct = env_from(tmp_path, "jsonl", **kwargs)
    via_datasets = env_from(tmp_path, "parquet", **kwargs)

    def qids(items: list[Item]) -> list[str]:
        return [it.id.rsplit("/", 1)[1] for it in items]

    want_train = [f"q{i}" for i in range(n_train)]
    want_test = [f"q{i}" for i in range(n_train, len(ROWS))]
    assert qids(direct.train_items()) == qids(via_datasets.train_items()) == want_train
    assert qids(direct.test_items()) == qids(via_datasets.test_items()) == want_test


def test_data_files_dict_with_named_splits(tmp_path):
    train = write(tmp_path, "parquet", ROWS[:6], stem="train")
    test = write(tmp_path, "parquet", ROWS[6:], stem="test")
    env = DatasetEnv(
        data_files={"train": train, "test": test},
        test_split="test",
        cache_dir=str(tmp_path / "cache"),
        **COLUMNS,
    )
    assert len(env.train_items()) == 6 and len(env.test_items()) == 4
    assert {it.answer for it in env.test_items()} == {r["answer"] for r in ROWS[6:]}


def test_deterministic_split():
    def ids(env: DatasetEnv) -> tuple[list[str], list[str]]:
        return [it.id for it in env.train_items()], [it.id for it in env.test_items()]

    a, b = memory_env(seed=3, test_fraction=0.3), memory_env(seed=3, test_fraction=0.3)
    assert ids(a) == ids(b)
    train, test = ids(a)
    assert len(test) == 3 and not set(train) & set(test) and len(train) + len(test) == len(ROWS)
    assert ids(memory_env(seed=4, test_fraction=0.3)) != ids(a)  # the seed is used at all
    capped = memory_env(seed=3, test_fraction=0.3, n_train=2, n_test=1)
    assert ids(capped) == (train[:2], test[:1])


def test_each_split_is_loaded_once_in_one_call(tmp_path, monkeypatch):
    # "Nothing is loaded twice": one load_dataset call serves the train and the test split.
    calls = []
    real = datasets.load_dataset

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", counting)
    env_from(tmp_path, "parquet", split="train[:5]", test_split="train[5:]")
    assert len(calls) == 1 and calls[0][1]["split"] == ["train[:5]", "train[5:]"]
    assert calls[0][0] == ("parquet",) and calls[0][1]["data_files"].endswith("data.parquet")


def test_hub_id_and_options_are_passed_through(monkeypatch):
    seen = {}

    def fake_load_dataset(path, **kwargs):
        seen.update(path=path, **kwargs)
        return [datasets.Dataset.from_list(ROWS[:4]), datasets.Dataset.from_list(ROWS[4:])]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    env = make_env(
        "dataset",
        {"path": "someorg/trivia", "name": "main", "split": "train", "test_split": "test",
         "load_kwargs": {"revision": "v1"}, **COLUMNS},
    )  # fmt: skip
    assert seen == {"path": "someorg/trivia", "name": "main", "split": ["train", "test"],
                    "revision": "v1"}  # fmt: skip
    assert isinstance(env, DatasetEnv)
    assert env.test_items()[0].id == "trivia/test/0"


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match=r"env_args\.path: no such file"):
        DatasetEnv(path=str(tmp_path / "nope.parquet"), **COLUMNS)
    with pytest.raises(ValueError, match=r"env_args\.path: cannot read \.txt files"):
        (tmp_path / "data.txt").write_text("x")
        DatasetEnv(path=str(tmp_path / "data.txt"), **COLUMNS)


def test_qa_reads_other_formats_through_the_shared_loader(tmp_path):
    # Would fail if QAEnv still parsed JSON lines itself: a parquet file is not JSON.
    rows = [{"question": r["question"], "answer": r["answer"]} for r in ROWS]
    env = QAEnv(path=write(tmp_path, "parquet", rows))
    items = env.train_items() + env.test_items()
    assert sorted(it.id for it in items) == sorted(f"qa/data/{i}" for i in range(1, 11))
    paris = next(it for it in items if it.answer == "Paris")
    assert env.score(paris, "Answer: paris").reward == 1.0


def test_qa_row_with_null_answer_names_the_row(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("question,answer\nq1?,a\nq2?,\n")
    with pytest.raises(ValueError, match=r'row 1: need an object with "question" and "answer"'):
        QAEnv(path=str(path))


@pytest.mark.parametrize(
    ("text", "cause"),
    [(b'question,answer\n"unclosed,a\n', "(ParserError: Error tokenizing data. C error: EOF "
                                           "inside string starting at row 1)"),
     (b"\x10\x80 not text", "(UnicodeDecodeError: 'utf-8' codec can't decode byte 0x80")],
)  # fmt: skip
def test_a_csv_that_cannot_be_parsed_names_the_parsers_reason(tmp_path, text, cause):
    """datasets wraps a parser's error in "An error occurred while generating the dataset",
    which was all the user saw: found by giving the environments damaged data files."""
    path = tmp_path / "cut.csv"
    path.write_bytes(text)
    with pytest.raises(ValueError, match=r"^env_args\.path: cannot load '.*cut\.csv': An error "
                       r"occurred while generating the dataset ") as refused:  # fmt: skip
        QAEnv(path=str(path))
    assert cause in str(refused.value)


# -- prompts, references, chats --------------------------------------------------------------


def test_chat_column_final_assistant_turn_becomes_the_reference():
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima"},
            ],
            "answer": "Lima",
        }
    ] * 2
    env = DatasetEnv.from_dataset(
        datasets.Dataset.from_list(rows), answer_column="answer", instruction="Answer: <city>"
    )
    item = all_items(env)[0]
    assert item.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Peru?\n\nAnswer: <city>"},
    ]
    assert item.reference == "Lima" and env.score(item, item.reference).reward == 1.0
    assert env.conversational


def test_a_conversational_completion_column_is_the_reference_reply():
    """TRL's conversational format keeps the reply in `completion` as assistant messages.
    As `reference_column` its Python repr ("[{'role': 'assistant', ...}]") became the
    reference, and no reference scored; the messages' text is the reply. Catches that, and
    a list of other things taken silently."""
    rows = [{"prompt": [{"role": "user", "content": f"{a} + 1?"}],
             "completion": [{"role": "assistant", "content": f"Answer: {a + 1}"}],
             "solution": str(a + 1)} for a in range(4)]  # fmt: skip
    env = DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), reference_column="completion",
                                  answer_column="solution", scorer="numeric", test_fraction=0.5)  # fmt: skip
    items = all_items(env)
    assert sorted(item.reference for item in items) == [f"Answer: {a + 1}" for a in range(4)]
    assert all(env.score(item, item.reference).reward == 1.0 for item in items)
    for row in rows:  # a list of strings (one column's rows share one type)
        row["completion"] = [row["solution"]]
    with pytest.raises(ValueError, match=r"row 0: column 'completion' \(env_args.reference_column\) "
                                         r"holds a list that is not assistant messages"):  # fmt: skip
        DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), reference_column="completion",
                                answer_column="solution", scorer="numeric")  # fmt: skip


def test_reference_column_references_score_full_marks():
    # What `resd env-check` checks: with the answer as reference, every reference passes.
    env = memory_env(reference_column="answer")
    for item in all_items(env):
        s = env.score(item, item.reference)
        assert (s.reward, s.score, s.feedback) == (1.0, 1.0, ""), item.id


# -- column-mapping errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt_column": "query"}, "prompt_column"),
        ({"answer_column": "solution"}, "answer_column"),
        ({"reference_column": "gold"}, "reference_column"),
        ({"id_column": "uid"}, "id_column"),
        ({"meta_columns": ["difficulty", "topic"]}, "meta_columns"),
        ({"prompt_column": None, "messages_column": "chat"}, "messages_column"),
        ({"prompt_column": ""}, "prompt_column"),  # was "column None ... holds NoneType"
    ],
)
def test_bad_column_names_name_the_field_and_the_columns(kwargs, field):
    with pytest.raises(ValueError, match=rf"env_args\.{field}: no column") as err:
        memory_env(**kwargs)
    assert "available columns: qid, question, answer, difficulty" in str(err.value)


def test_other_mapping_errors():
    with pytest.raises(ValueError, match=r"env_args\.prompt_column: .*no 'prompt' or 'messages'"):
        memory_env(prompt_column=None)
    with pytest.raises(ValueError, match=r"env_args\.answer_column: the 'numeric' scorer"):
        memory_env(answer_column=None, scorer="numeric")
    with pytest.raises(ValueError, match=r"env_args\.id_column: the id .* more than once"):
        memory_env(id_column="difficulty")
    with pytest.raises(ValueError, match=r"row 0: the numeric scorer needs a number"):
        memory_env(scorer="numeric")  # "Paris" has no number in it
    with pytest.raises(ValueError, match=r"env_args\.scorer: unknown scorer 'fuzzy'"):
        memory_env(scorer="fuzzy")
    with pytest.raises(ValueError, match=r"env_args\.scorer_args\.tolerance: not an argument"):
        memory_env(scorer="numeric", scorer_args={"tolerance": 0.1})
    with pytest.raises(ValueError, match=r"invalid regex in column 'answer'"):
        memory_env(rows=[{**ROWS[0], "answer": "(unclosed"}] * 2, scorer="regex")


def test_prompt_default_is_trls_prompt_column():
    rows = [{"prompt": r["question"], "answer": r["answer"]} for r in ROWS]
    env = DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), answer_column="answer")
    assert all_items(env)[0].prompt_text in {r["question"] for r in ROWS}


def test_unknown_split_of_a_file_names_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"env_args\.test_split: .*no split 'test'"):
        env_from(tmp_path, "jsonl", test_split="test")
    with pytest.raises(ValueError, match=r"env_args\.test_split: .*Unknown split"):
        env_from(tmp_path, "parquet", test_split="test")  # the error comes from `datasets`


# -- built-in scorers ------------------------------------------------------------------------


def test_exact_match_normalises_and_says_what_it_expected():
    assert exact_match("the Pacific", "Answer: pacific.").reward == 1.0
    assert exact_match(["Rome", "Roma"], "I think\nroma").reward == 1.0  # accepted alternatives
    wrong = exact_match("Paris", "Answer: Lyon")
    assert (wrong.reward, wrong.score) == (0.0, 0.0)
    assert wrong.feedback == 'Incorrect. The correct answer is "Paris".'  # "Lyon" not repeated
    last_line = exact_match(["Rome", "Roma"], "It is\nMilan")
    assert last_line.feedback == (
        "No 'Answer:' line found; the last line was used. "
        'Incorrect. The correct answer is "Rome" (also accepted: "Roma").'
    )
    hidden = exact_match("Paris", "Answer: Lyon", reveal_answer=False)
    assert hidden.feedback == 'Incorrect: "Lyon" is not the expected answer.'
    assert (
        exact_match("Paris", "").feedback
        == 'The response contains no answer. The correct answer is "Paris".'
    )


def test_numeric_reads_the_last_number_within_a_tolerance():
    assert numeric("42", "6 * 7 = 42").reward == 1.0
    assert numeric(1234, "Answer: $1,234.00").reward == 1.0
    assert numeric("Natalia sold 48/2 = 24 clips.\n#### 72", "so 72 in all").reward == 1.0
    assert numeric(42, "Answer: 3 + 4 = 7\nI double-checked 42").reward == 0.0  # answer line wins
    wrong = numeric(42, "Answer: 41")
    assert wrong.feedback == (
        "Incorrect: the last number in your answer line should be 42 (relative tolerance 1e-06)."
    )
    assert numeric(42, "It is about 40 or 41").feedback.startswith(
        "Incorrect: the last number in the response should be 42"
    )
    assert numeric(42, "no idea").feedback == (
        "The response contains no number; the expected value is 42."
    )
    assert numeric(42, "Answer: 42.3").reward == 0.0
    assert numeric(42, "Answer: 42.3", rel_tol=0.01).reward == 1.0
    assert numeric(0, "Answer: -0.0").reward == 1.0
    assert numeric(5, "the range 3-5 and -5").reward == 0.0  # "-5" is minus five
    assert numeric(5, "pages 3-5").reward == 1.0  # a dash between numbers is not a sign
    assert "42" not in numeric(42, "Answer: 41", reveal_answer=False).feedback


def test_regex_from_the_answer_column_or_a_pattern():
    assert regex(r"^\d{3}-\d{4}$", "555-1234", fullmatch=True).reward == 1.0
    miss = regex(r"(?i)\bparis\b", "I would say\nLyon")
    assert miss.feedback == (
        "The response does not match the pattern '(?i)\\\\bparis\\\\b'; it ends with "
        '"I would say Lyon".'
    )
    assert regex("x", "  ").feedback == "The response is empty; it must match the pattern 'x'."
    rows = [{"prompt": "Name a French city", "answer": r"(?i)\b(paris|lyon)\b"}] * 3
    env = DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), scorer="regex",
                                  answer_column="answer")  # fmt: skip
    item = all_items(env)[0]
    assert item.answer is None  # a pattern is not a literal answer for the leak guard
    assert env.score(item, "Lyon, of course").reward == 1.0
    assert env.score(item, "Berlin").reward == 0.0
    fmt = memory_env(answer_column=None, scorer="regex",
                     scorer_args={"pattern": r"(?s)^<think>.*</think>\s*\S"})  # fmt: skip
    it = all_items(fmt)[0]
    assert fmt.score(it, "<think>hm</think> Paris").reward == 1.0
    assert "does not match the pattern" in fmt.score(it, "Paris").feedback


def test_builtin_scorers_through_the_env_use_answer_column_args_and_reveal_flag():
    numbers = [r for r in ROWS if r["answer"].isdigit()]
    env = memory_env(rows=numbers, scorer="numeric", id_column="qid")
    item = by_qid(env)["q3"]
    assert item.answer == "42" and env.score(item, "Answer: 42").reward == 1.0
    feedback = env.score(item, "Answer: 24").feedback
    assert feedback.endswith("should be 42 (relative tolerance 1e-06).") and "24" not in feedback
    tolerant = memory_env(
        rows=numbers, scorer="numeric", scorer_args={"rel_tol": 0.05}, id_column="qid"
    )
    assert tolerant.score(by_qid(tolerant)["q3"], "about 41").reward == 1.0
    hidden = memory_env(reveal_answer=False)
    paris = next(it for it in all_items(hidden) if it.answer == "Paris")
    assert "Paris" not in hidden.score(paris, "Answer: Lyon").feedback


# -- user scorers ----------------------------------------------------------------------------

CALLS: list[dict] = []


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """A TRL-style reward: 1.0 for a completion as long as the answer, less otherwise."""
    CALLS.append({"prompts": prompts, "completions": completions, **kwargs})
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [
        min(1.0, len(t) / max(1, len(str(a)))) for t, a in zip(texts, kwargs["answer"], strict=True)
    ]


def answer_only_reward(completions, answer) -> list[float | None]:
    """No **kwargs: only the columns it names are passed (TRL would pass them all)."""
    return [
        None if c == "skip" else float(c.strip() == a)
        for c, a in zip(completions, answer, strict=True)
    ]


def judge(item: Item, response: str) -> Score | float:
    """A per-item scorer: a Score when it has something to say, else a number."""
    if response.strip().lower() == str(item.meta["answer"]).lower():
        return 1.0
    return Score(0.0, 0.1, f"Expected {item.meta['answer']}, got {response.strip()!r}.")


def test_trl_style_reward_function_gets_batched_columns():
    CALLS.clear()
    env = memory_env(scorer=length_reward, id_column="qid")
    item = by_qid(env)["q0"]  # answer "Paris"
    s = env.score(item, "Par")
    assert (s.reward, s.score, s.feedback) == (0.0, 0.6, "The reward function gave 0.6.")
    call = CALLS[-1]
    assert call["prompts"] == ["What is the capital of France?"]
    assert call["completions"] == ["Par"]
    assert call["answer"] == ["Paris"] and call["difficulty"] == [1] and call["qid"] == ["q0"]
    assert "question" not in call  # the prompt column is passed as prompts, as in TRL
    assert env.score(item, "Paris!").reward == 1.0


def test_trl_reward_threshold_none_and_named_columns_only():
    env = memory_env(scorer=length_reward, threshold=0.5)
    item = next(it for it in all_items(env) if it.answer == "Paris")
    assert env.score(item, "Par").reward == 1.0  # 0.6 >= 0.5
    named = memory_env(scorer=answer_only_reward)
    item = next(it for it in all_items(named) if it.answer == "Paris")
    assert named.score(item, "Paris").reward == 1.0
    none = named.score(item, "skip")
    assert none.reward == 0.0 and "no reward (None)" in none.feedback


def test_trl_reward_in_conversational_form():
    CALLS.clear()
    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
            for r in ROWS]  # fmt: skip
    env = DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), scorer=length_reward,
                                  answer_column="answer")  # fmt: skip
    item = all_items(env)[0]
    env.score(item, "hello")
    assert CALLS[-1]["prompts"] == [item.messages]
    assert CALLS[-1]["completions"] == [[{"role": "assistant", "content": "hello"}]]


def test_reward_function_needing_an_absent_column_fails_at_construction():
    def needs_solution(completions, solution, **kwargs):
        return [0.0]

    with pytest.raises(
        ValueError, match=r"env_args\.scorer: needs_solution needs the column 'solution'"
    ):
        memory_env(scorer=needs_solution)

    def needs_ids(prompts, completions, completion_ids):
        return [0.0]

    with pytest.raises(ValueError, match="'completion_ids', which RESD does not supply"):
        memory_env(scorer=needs_ids)

    def three_args(a, b, c):
        return 0.0

    with pytest.raises(ValueError, match=r"must take \(item, response\)"):
        memory_env(scorer=three_args)


def test_reward_function_returning_the_wrong_shape_raises():
    env = memory_env(scorer=lambda prompts, completions, **kw: [0.0, 1.0])
    with pytest.raises(TypeError, match="one reward per completion"):
        env.score(all_items(env)[0], "x")


def test_per_item_function_returns_a_score_or_a_number():
    env = memory_env(scorer=judge, id_column="qid")
    item = by_qid(env)["q1"]
    assert env.score(item, "rome") == Score(1.0, 1.0, "The reward function gave 1.")
    assert env.score(item, "Milan") == Score(0.0, 0.1, "Expected Rome, got 'Milan'.")


def test_to_score_documented_rule():
    assert to_score(0.3) == Score(0.0, 0.3, "The reward function gave 0.3.")
    assert to_score(1) == Score(1.0, 1.0, "The reward function gave 1.")
    assert to_score(-2.5) == Score(0.0, 0.0, "The reward function gave -2.5.")
    assert to_score(0.7, threshold=0.7).reward == 1.0
    assert "NaN" in to_score(float("nan")).feedback
    with pytest.raises(TypeError):
        to_score("1.0")


def test_scorer_from_an_import_path_as_in_yaml(tmp_path):
    args = {"path": write(tmp_path, "jsonl"), **COLUMNS, "scorer": "test_dataset_env:judge"}
    env = make_env("dataset", args)
    item = next(it for it in all_items(env) if it.answer == "Paris")
    assert env.score(item, "paris").reward == 1.0
    with pytest.raises(ValueError, match=r"env_args\.scorer: module 'test_dataset_env' has no"):
        make_env("dataset", {**args, "scorer": "test_dataset_env:nothing_here"})


def test_registered_as_a_builtin(tmp_path):
    assert resolve_env_class("dataset") is DatasetEnv
    env = make_env("dataset", {"path": write(tmp_path, "jsonl"), **COLUMNS})
    assert isinstance(env, DatasetEnv) and len(all_items(env)) == len(ROWS)


# -- training end to end ---------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trains_one_step_from_a_parquet_file(tiny_model_dir, tmp_path):
    from resd.training.trainer import Trainer
    from test_trainer import config

    data = write(tmp_path, "parquet")
    cfg = config(
        tiny_model_dir, tmp_path / "run", "steps=1", "env=dataset", f"env_args.path={data}",
        "env_args.prompt_column=question", "env_args.answer_column=answer",
        f"env_args.cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert isinstance(trainer.env, DatasetEnv)
    trainer.train()
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    questions = {r["question"] for r in ROWS}
    assert samples and all(s["prompt"] in questions for s in samples)
    # A random tiny model never names the capital: the scorer's feedback must reach the log.
    assert any("The correct answer is" in s["feedback"] for s in samples)


def test_trains_one_step_from_an_in_memory_dataset(tiny_model_dir, tmp_path):
    from resd.training.trainer import Trainer
    from test_trainer import config

    env = DatasetEnv.from_dataset(datasets.Dataset.from_list(ROWS), scorer=length_reward, **COLUMNS)
    trainer = Trainer(config(tiny_model_dir, tmp_path / "run", "steps=1"), env=env)
    assert trainer.env is env
    trainer.train()
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["prompt"] in {r["question"] for r in ROWS} for s in samples)
    assert all(s["feedback"].startswith("The reward function gave ") for s in samples)
    # The records name what ran, not the config's default environment (arithmetic).
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["env"] == "dataset"
    card = (run / "README.md").read_text()
    assert "on the environment `dataset`" in card and "arithmetic" not in card
    saved = (run / "config.yaml").read_text()
    assert saved.startswith("# env: dataset, given in Python")


def test_trainer_takes_a_dataset_and_a_scorer_directly(tiny_model_dir, tmp_path):
    from resd.training.trainer import Trainer
    from test_trainer import config

    columns = [f"env_args.{key}={value}" for key, value in COLUMNS.items()]
    cfg = config(tiny_model_dir, tmp_path / "run", "steps=1", "env=dataset", *columns)
    trainer = Trainer(cfg, env=datasets.Dataset.from_list(ROWS), scorer=length_reward)
    assert (
        isinstance(trainer.env, DatasetEnv)
        and trainer.env.prompt_column == COLUMNS["prompt_column"]
    )
    trainer.train()
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["feedback"].startswith("The reward function gave ") for s in samples)
    with pytest.raises(ValueError, match=r"^scorer: only used with a dataset"):
        Trainer(cfg, scorer=length_reward)
    with pytest.raises(TypeError, match=r"^env: expected an Environment or a datasets.Dataset"):
        Trainer(cfg, env=ROWS)
    # the class for an instance, as `Trainer(cfg, env=Capitals)`: say which was meant
    with pytest.raises(TypeError, match=r"^env: got the class DatasetEnv, not an environment: "
                                        r"pass an instance, DatasetEnv\(\.\.\.\)"):  # fmt: skip
        Trainer(cfg, env=DatasetEnv)


def test_a_feedback_column_replaces_the_scorers_sentence_on_a_wrong_reply():
    rows = [{**r, "why": f"The right answer is {r['answer']}, as any atlas says." if i % 2 else ""}
            for i, r in enumerate(ROWS)]  # fmt: skip
    env = memory_env(rows=rows, feedback_column="why", meta_columns=["difficulty"], id_column="qid")
    items = by_qid(env)
    right, wrong = items["q1"], items["q0"]  # q1 has a text, q0 an empty cell
    assert env.score(right, "Answer: Rome").feedback == ""  # a reward keeps no feedback
    assert (
        env.score(right, "Answer: Milan").feedback == "The right answer is Rome, as any atlas says."
    )
    assert env.score(wrong, "Answer: Lyon").feedback == 'Incorrect. The correct answer is "Paris".'
    assert "why" in right.meta  # kept although meta_columns did not name it
    with pytest.raises(ValueError, match=r"env_args\.feedback_column: no column 'because'"):
        memory_env(feedback_column="because")


def test_the_demo_config_trains_on_the_items_it_tests():
    """`make demo` (configs/demo_learn.yaml): 8 products, the same 8 in both splits, and
    the feedback wording the sanity check measured."""
    from resd.config import load_config
    from resd.envs import make_env

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "demo_learn.yaml")
    env_args = {
        **cfg.env_args,
        "data_files": {k: str(root / v) for k, v in cfg.env_args["data_files"].items()},
    }
    env = make_env(cfg.env, env_args)
    train, test = env.train_items(), env.test_items()
    assert len(train) == 8 and [i.messages for i in train] == [i.messages for i in test]
    item = train[0]
    assert item.messages[0]["content"] == (
        "What is 964 * 60? End your reply with a line of the form 'Answer: <number>'."
    )
    assert env.score(item, "Answer: 57840").reward == 1.0
    assert (
        env.score(item, "Answer: 57760").feedback
        == "Incorrect. The correct value is 964 * 60 = 57840."
    )
    assert cfg.epochs * len(train) // cfg.batch_size * cfg.inner_updates >= cfg.steps


# -- audit fixes: no silent wrong reward, no silently wrong settings -------------------------


@pytest.mark.parametrize("gold", ["A", "An", "?"])
@pytest.mark.parametrize("reply", ["", "Answer: ", "Answer: The", "Answer: a an the"])
def test_exact_match_an_empty_reply_never_matches_a_gold_that_normalises_away(gold, reply):
    # Multiple-choice option "A" used to normalise to "", which an empty reply also was.
    assert exact_match(gold, reply).reward == 0.0
    assert exact_match("The", reply.replace("The", "A")).reward == 0.0


def test_exact_match_still_accepts_option_letters_and_squad_forms():
    assert exact_match("A", "Answer: A").reward == 1.0
    assert exact_match("A", "Answer: (a).").reward == 1.0
    assert exact_match("the Pacific", "Answer: Pacific").reward == 1.0
    assert exact_match("C++", "Answer: c++.").reward == 1.0
    assert exact_match("-5", "Answer: −5").reward == 1.0


@pytest.mark.parametrize(
    ("gold", "reply"),
    [("-5", "Answer: 5"), ("C++", "Answer: C"), ("C#", "Answer: C"), ("3.5", "Answer: 3,5")],
)
def test_exact_match_keeps_signs_decimal_points_and_language_names(gold, reply):
    assert exact_match(gold, reply).reward == 0.0


@pytest.mark.parametrize("response", ["Answer: 5.0.1", "Answer: 12_000", "Answer: 2nd"])
def test_numeric_does_not_read_versions_literals_or_ordinals_as_numbers(response):
    gold = {"Answer: 5.0.1": 5, "Answer: 12_000": 12, "Answer: 2nd": 2}[response]
    assert numeric(gold, response).reward == 0.0
    assert numeric(10, "Answer: 10kg").reward == 1.0  # a unit after a number is still fine


@pytest.mark.parametrize(
    ("response", "gold", "reward"),
    [
        ("So the total is __5__.", 5, 1.0),
        ("Answer: it is __5__ apples", 5, 1.0),
        ("The total is _-3.5_ degrees", -3.5, 1.0),
        ("In all: ___1,234___", 1234, 1.0),
        ("set x__5__y", 5, 0.0),  # underscores inside a word are not emphasis
        ("pages 3 to 12_000", 12000, 0.0),  # nor inside a Python literal
    ],
)
def test_numeric_reads_a_number_in_underscore_emphasis(response: str, gold: float, reward: float):
    """Bug caught: "__5__" (markdown bold with underscores) held no number, because "_" counts
    as part of a word, so a reply that bolded its answer that way scored "contains no number"
    while "**5**" scored 1."""
    assert numeric(gold, response).reward == reward


@pytest.mark.parametrize("cell", ["", "   "])
def test_empty_answer_cell_is_refused_naming_the_row(tmp_path, cell):
    rows = [{"prompt": "ok", "answer": "x"}, {"prompt": "ok", "answer": cell}]
    path = write(tmp_path, "jsonl", rows)
    with pytest.raises(ValueError, match=r"data\.jsonl:2: empty answer"):
        DatasetEnv(path=path, answer_column="answer")


def test_float_gold_answers_score_as_the_number_item_answer_shows(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": a} for i, a in enumerate([1.0, 2.5, 3.0])]
    env = DatasetEnv(path=write(tmp_path, "parquet", rows), answer_column="answer", n_test=0)
    three = next(it for it in all_items(env) if it.meta["answer"] == 3.0)
    assert three.answer == "3"
    assert env.score(three, "Answer: 3").reward == 1.0
    assert env.score(three, "Answer: 4").feedback == 'Incorrect. The correct answer is "3".'


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scorer": "numeric", "scorer_args": {"rel_tol": "x"}}, "scorer_args.rel_tol"),
        ({"scorer": "numeric", "scorer_args": {"rel_tol": -1}}, "scorer_args.rel_tol"),
        ({"scorer": "numeric", "scorer_args": {"abs_tol": float("nan")}}, "scorer_args.abs_tol"),
        (
            {"scorer": "regex", "scorer_args": {"pattern": "x", "fullmatch": "no"}},
            "scorer_args.fullmatch",
        ),
        ({"scorer": "regex", "scorer_args": {"pattern": ""}}, "scorer_args.pattern"),
        ({"n_train": -1}, "n_train"),
        ({"n_test": 2.7}, "n_test"),
        ({"n_train": "abc"}, "n_train"),
        ({"test_fraction": "abc"}, "test_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"threshold": "high"}, "threshold"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"split": "train", "test_split": " train "}, "test_split"),
        ({"split": "train", "test_split": "train[:50%]"}, "test_split"),
        ({"split": "train[:60%]", "test_split": "train[50%:]"}, "test_split"),
        ({"scorer_timeout": -1}, "scorer_timeout"),
        ({"scorer_timeout": "soon"}, "scorer_timeout"),
        ({"scorer_timeout": float("inf")}, "scorer_timeout"),
        # a string failed in dict() ("dictionary update sequence element #0 ..."), or,
        # empty, was taken for no arguments
        ({"scorer": "numeric", "scorer_args": "abs_tol"}, "scorer_args"),
        ({"scorer_args": ""}, "scorer_args"),
        ({"load_kwargs": "streaming"}, "load_kwargs"),
    ],
)
def test_bad_settings_are_refused_at_construction_naming_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=rf"env_args\.{field}"):
        memory_env(**kwargs)


def test_whole_number_settings_still_accept_their_usual_spellings():
    env = memory_env(n_train="3", n_test=2.0)
    assert (len(env.train_items()), len(env.test_items())) == (3, 2)
    assert len(memory_env(split="train[:50%]", test_split="train[50%:]").test_items()) == 5


def _reward_two(item, response):
    return Score(2.0, 1.0, "")


def _reward_nan(item, response):
    return Score(float("nan"), 0.0, "")


def _feedback_none(item, response):
    return Score(0.0, 0.0, None)


@pytest.mark.parametrize("fn", [_reward_two, _feedback_none])
def test_a_user_scores_bad_score_is_refused_naming_the_function(fn):
    env = memory_env(scorer=fn)
    with pytest.raises((ValueError, TypeError), match=fn.__name__):
        env.score(all_items(env)[0], "x")


def test_a_nan_score_is_refused_where_it_is_made():
    """Clamping turned a nan `score` into 0.0 before any caller could see it; a nan reward
    is refused there too (the traceback names the function that built it)."""
    env = memory_env(scorer=_reward_nan)
    with pytest.raises(
        ValueError, match=r"^Score: reward and score must be finite numbers, got nan"
    ):
        env.score(all_items(env)[0], "x")
    with pytest.raises(ValueError, match=r"must be finite numbers"):
        Score(0.0, float("nan"), "")


# -- a test split given by row numbers ------------------------------------------------------


@pytest.mark.parametrize("source", ["jsonl", "parquet", "memory", "save_to_disk"])
@pytest.mark.parametrize(("train", "test", "shared"), [
    ("train[:8]", "train[6:]", "rows 6 to 7 are"),
    ("train[:80%]", "train[-3:]", "row 7 is"),  # 80% of 10 rows is rows 0-7
    ("train[2:-2]", "train[5:6]", "row 5 is"),
])  # fmt: skip
def test_a_row_number_test_split_that_overlaps_the_training_split_is_refused(
    tmp_path, source, train, test, shared
):
    """Bug: `splits_overlap` leaves row-number slices alone (their overlap depends on the
    split's length), so train[:8] with test_split train[6:] trained on two test rows unnoticed.
    Once the rows are loaded the length is known, and the overlap is refused, whichever
    reader sliced the rows (ours for JSON lines and in-memory data, `datasets` for parquet)."""
    kwargs = {**COLUMNS, "split": train, "test_split": test}
    with pytest.raises(ValueError) as caught:
        if source == "memory":
            memory_env(**kwargs)
        elif source == "save_to_disk":
            folder = tmp_path / "saved"
            datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(folder)
            DatasetEnv(path=str(folder), **kwargs)
        else:
            env_from(tmp_path, source, split=train, test_split=test)
    message = str(caught.value)
    assert message.startswith(f"env_args.test_split: {test!r} shares rows with env_args.split")
    assert f"{train!r} ({shared} in both, of the 10 rows of 'train')" in message
    assert "measures nothing" in message


@pytest.mark.parametrize("source", ["jsonl", "parquet", "memory"])
def test_row_number_splits_that_do_not_meet_are_accepted(tmp_path, source):
    """The row-range check must not refuse adjacent slices (train[:7] / train[-3:] is rows
    0-6 and 7-9), nor slices of different splits of a DatasetDict."""
    kwargs = {"split": "train[:7]", "test_split": "train[-3:]", "id_column": "qid"}
    env = memory_env(**kwargs) if source == "memory" else env_from(tmp_path, source, **kwargs)
    assert [it.id.rsplit("/", 1)[1] for it in env.test_items()] == ["q7", "q8", "q9"]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:7]),
            "test": datasets.Dataset.from_list(ROWS[7:]),
        }
    )
    apart = DatasetEnv.from_dataset(dd, split="train[:5]", test_split="test[:2]", **COLUMNS)
    assert len(apart.test_items()) == 2


def test_a_surely_overlapping_test_split_is_still_refused_before_loading(tmp_path):
    """The pre-load check stays: a test split equal to the training split is refused before
    anything is read (here the file does not even exist), not after a download."""
    with pytest.raises(ValueError, match=r"^env_args\.test_split: 'train\[:50%\]' shares rows"):
        DatasetEnv(path=str(tmp_path / "absent.jsonl"), test_split="train[:50%]", **COLUMNS)


# -- a scorer that hangs ---------------------------------------------------------------------


class _Stuck:
    """A scorer that hangs until released, and says when it has finished."""

    def __init__(self) -> None:
        self.release, self.done = threading.Event(), threading.Event()

    def wait(self) -> None:
        try:
            self.release.wait(30)
        finally:
            self.done.set()

    def finish(self) -> None:
        """Leave no work behind: let the abandoned call end, and see that it did."""
        self.release.set()
        assert self.done.wait(5)


def test_a_hanging_user_scorer_raises_instead_of_hanging_the_run():
    """Bug: a user scorer that never returns hung the whole training run, silently. With
    `scorer_timeout` the call raises an error that names the scorer, the item and the
    limit and says what to do, and it does so after the limit, not when the scorer ends."""
    stuck = _Stuck()

    def slow_scorer(item, response):
        stuck.wait()
        return 1.0

    env = memory_env(scorer=slow_scorer, scorer_timeout=0.2)
    item = env.train_items()[0]
    start = time.monotonic()
    try:
        with pytest.raises(ScorerTimeout) as caught:
            env.score(item, "Paris")
        assert time.monotonic() - start < 5
    finally:
        stuck.finish()
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)  # what `resd train` reports in one line
    assert "\n" not in message and message.startswith("env_args.scorer_timeout: ")
    assert "slow_scorer" in message and repr(item.id) in message and "0.2 s" in message
    assert "raise env_args.scorer_timeout" in message and "fix the scorer" in message


def test_a_hanging_trl_reward_function_raises_too():
    """Bug: the same hang through a TRL-style (batched) reward function, which is wrapped
    separately from a per-item scorer."""
    stuck = _Stuck()

    def accuracy_reward(completions, answer, **kwargs):
        stuck.wait()
        return [1.0 for _ in completions]

    env = memory_env(scorer=accuracy_reward, scorer_timeout=0.2)
    try:
        with pytest.raises(ScorerTimeout, match=r"accuracy_reward took longer than 0\.2 s"):
            env.score(env.train_items()[0], "Paris")
    finally:
        stuck.finish()


def test_a_catastrophically_backtracking_pattern_is_stopped_by_the_limit():
    """Bug: the regex scorer with a user pattern that backtracks catastrophically on a long
    reply ran for minutes (and `re` holds the GIL, so no watchdog thread could step in);
    now the match itself is bounded by `scorer_timeout`."""
    env = memory_env(scorer="regex", scorer_args={"pattern": r"(a|aa)+$"}, scorer_timeout=0.2)
    item = env.train_items()[0]
    start = time.monotonic()
    with pytest.raises(ScorerTimeout) as caught:
        env.score(item, "a" * 60 + "b")
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert "the scorer regex took longer than 0.2 s" in message and repr(item.id) in message
    assert "(a|aa)+$" in message and "raise env_args.scorer_timeout" in message
    assert env.score(item, "aaaa").reward == 1.0  # an ordinary reply is scored as before
    assert env.score(item, "aab").reward == 0.0


@pytest.mark.parametrize("off", [0, None, "default"])
def test_without_a_scorer_timeout_the_scorer_runs_on_the_callers_thread(off):
    """Bug: with a limit by default, every user scorer ran in a watchdog thread, where
    code that needs the main thread fails: math_verify's SIGALRM timeouts raise "signal
    only works in main thread", and every reply would have scored 0. By default (and with
    0 or null) the scorer runs in the caller's thread; only a limit moves it."""
    import signal

    threads = []

    def where(item, response):
        threads.append(threading.current_thread())
        signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))  # main thread only
        return 1.0

    env = (
        memory_env(scorer=where)
        if off == "default"
        else memory_env(scorer=where, scorer_timeout=off)
    )
    assert env.score(env.train_items()[0], "x").reward == 1.0
    assert threads == [threading.current_thread()]
    limited = memory_env(scorer=where, scorer_timeout=30)  # a limit: a watchdog thread
    score = safe_score(limited, limited.train_items()[0], "x")  # as the trainer scores
    assert threads[-1] is not threading.current_thread()
    assert score.reward == 0.0 and "main thread" in score.feedback  # what a limit costs


def test_the_trainer_stops_on_a_timed_out_scorer_but_scores_other_errors_as_failures():
    """Bug: `safe_score`, which the trainer scores every rollout through, caught every
    exception, the time limit's included: a hanging scorer cost the whole limit on every
    reply, left a thread behind each time, and the run went on with the error message as
    the teacher's feedback. A scorer that raises anything else still counts as a failure."""
    stuck = _Stuck()

    def slow_scorer(item, response):
        stuck.wait()
        return 1.0

    env = memory_env(scorer=slow_scorer, scorer_timeout=0.2)
    try:
        with pytest.raises(ScorerTimeout):
            safe_score(env, env.train_items()[0], "Paris")
    finally:
        stuck.finish()

    def broken_scorer(item, response):
        raise KeyError("no such column")

    env = memory_env(scorer=broken_scorer, scorer_timeout=0.2)
    score = safe_score(env, env.train_items()[0], "Paris")
    assert (score.reward, score.score) == (0.0, 0.0)
    assert "KeyError" in score.feedback


# -- mutation-testing gaps: each test names the wrong reward it catches ----------------------


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("Answer: 12,345", 12345),
        ("Answer: 1,234,567", 1234567),
        ("Answer: .25", 0.25),
        ("Answer: 1e3", 1000),
        ("Answer: 1e+3", 1000),
        ("Answer: 2.5e10", 2.5e10),
        ("Answer: −5", -5),
        ("Answer: 12stone", 12),
        ("Answer: __5__", 5),
        ("**Answer:** __5__", 5),
        ("Answer: 2**3 = 8", 8),
    ],
)
def test_numeric_reads_numbers_as_people_write_them(response: str, gold: float) -> None:
    """Bug caught: a number read in part ("12,345" as 345, "1,234,567" as 567, ".25" as
    nothing, "1e3" or "1e+3" as 1 or 3, "2.5e10" as 2.5, "−5" as 5, "12stone" refused as
    an ordinal), markdown bold "__5__" left on the answer so no number is read, or the
    closing-"**" trim cutting "= 8" off "2**3 = 8": each scores a right reply 0."""
    assert numeric(gold, response) == Score(1.0, 1.0, "")


@pytest.mark.parametrize(
    "response",
    ["Answer:Paris", "The  final  answer  is: Paris", "\\boxed{3} no, \\boxed{Paris}"],
)
def test_exact_match_finds_the_answer_in_every_accepted_form(response: str) -> None:
    """Bug caught: an answer line without a space after the colon, or with doubled spaces
    between its words, not recognised (the whole line is then the answer), or the first
    \\boxed{} taken instead of the last: a right reply scored 0."""
    assert exact_match("Paris", response) == Score(1.0, 1.0, "")


@pytest.mark.parametrize(
    ("gold", "response", "reward"),
    [
        ("Santa Fe", "Answer: Sant Fe", 0.0),  # "a" is an article only as a whole word
        ("C++", "Answer: C+", 0.0),  # every "+" of "C++" is kept, not just the first
        ("A+", "Answer: An+", 0.0),  # "A+" is a grade, "An+" is not it
        ("The A", "Answer: thea", 0.0),  # a gold of articles keeps its word breaks
        ("? !", "Answer: ?!", 0.0),  # so does a gold of punctuation
        ("100", "Answer: $100", 1.0),  # "$" is ASCII punctuation, though a symbol
        ("Paris", "Answer: «Paris»", 1.0),  # "«" is punctuation, though not ASCII
    ],
)
def test_exact_match_normalisation_neither_merges_nor_splits_answers(
    gold: str, response: str, reward: float
) -> None:
    """Bug caught: a normalisation that drops "a" inside a word ("Sant Fe" = "Santa Fe"),
    keeps only one "+" ("C+" = "C++"), takes "An+" for an article ("An+" = "A+"), joins
    the words of a light-normalised gold ("thea" = "The A", "?!" = "? !"), or strips only
    characters that are both ASCII and Unicode punctuation ("$100" != "100")."""
    assert exact_match(gold, response).reward == reward


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("Answer: Paris\n</think>\nI don't know.", 0.0),  # the answer is in the thinking
        ("Answer: Lyon</think>Answer: Paris</think>I don't know.", 0.0),
        ("<think>hmm</think>Answer: Paris\n<think>done</think>", 1.0),  # each block removed alone
    ],
)
def test_an_answer_given_only_while_thinking_earns_nothing(response: str, reward: float) -> None:
    """Bug caught: when the chat template opens <think> in the prompt the reply holds only
    its closing tag; an "Answer:" line before the last </think> is thinking, not the
    answer, and must not earn the reward. Two think blocks are removed one by one, not
    with the answer between them (a greedy or one-character match)."""
    assert exact_match("Paris", response).reward == reward
    assert numeric(7, "I guess 7\n</think>\nno idea").reward == 0.0


def test_every_scorer_outcome_has_the_reward_and_score_it_states() -> None:
    """Bug caught: a wrong answer rewarded 1 when the answer is hidden, or a score (the
    partial credit) of 1 beside a reward of 0 or of 0 beside a reward of 1, a boolean gold
    read as the number 1, or the float gold 1e16 compared as "10000000000000000" while
    `Item.answer` shows "1e+16": the tests looked at the reward
    of a right reply and the feedback of a wrong one, never both numbers."""
    assert exact_match("Paris", "Answer: Paris") == Score(1.0, 1.0, "")
    assert exact_match("Paris", "Answer: Lyon", reveal_answer=False) == Score(
        0.0, 0.0, 'Incorrect: "Lyon" is not the expected answer.'
    )
    assert exact_match("Paris", "", reveal_answer=False) == Score(
        0.0, 0.0, "The response contains no answer."
    )
    assert exact_match("Paris", "Answer: Lyon") == Score(
        0.0, 0.0, 'Incorrect. The correct answer is "Paris".'
    )
    assert numeric(True, "Answer: 1").reward == 0.0  # a boolean is not a gold number
    assert exact_match(1e16, "Answer: 1e+16").reward == 1.0  # 1e16 is shown as 1e+16


def test_exact_match_names_at_most_three_other_accepted_answers() -> None:
    """Bug caught: the list of other accepted answers cut at the wrong place or run
    together, so the feedback names too many, too few or an unreadable answer."""
    wrong = exact_match(["Rome", "Roma", "Rom", "Rzym", "Roum"], "Answer: Milan")
    assert wrong.feedback == (
        'Incorrect. The correct answer is "Rome" (also accepted: "Roma", "Rom", "Rzym").'
    )


def test_numeric_outcomes_have_the_reward_score_and_feedback_they_state() -> None:
    """Bug caught: a gold column with no number rewarded every reply (or crashed), a
    reply with no number given a score of 1, a gold of 0 matched only by exactly 0 (the
    absolute tolerance lost), a number outside the answer line said to be in it, and a
    tolerance of 0 still quoted in the feedback."""
    assert numeric("no number here", "Answer: 5") == Score(
        0.0, 0.0, "The checker has no valid gold number (got 'no number here')."
    )
    assert numeric(42, "no idea", reveal_answer=False) == Score(
        0.0, 0.0, "The response contains no number."
    )
    assert numeric(0, "Answer: 1e-10") == Score(1.0, 1.0, "")
    assert numeric(0, "Answer: 1e-6").reward == 0.0
    assert numeric(42, "Answer: about forty\nmaybe 41").feedback == (
        "Incorrect: the last number in the response should be 42 (relative tolerance 1e-06)."
    )
    assert numeric(42, "Answer: 41", rel_tol=0) == Score(
        0.0, 0.0, "Incorrect: the last number in your answer line should be 42."
    )


def test_regex_outcomes_have_the_reward_score_and_feedback_they_state() -> None:
    """Bug caught: an empty reply rewarded, a score of 1 beside a failed match or 0
    beside a hit, a full match not said to be one, a reply padded with blanks failing a
    full match, the time-limited engine doing a full match for a search (and the other
    way round), or the quoted end of a long reply cut at the wrong place."""
    assert regex(r"\d+", "it is 42") == Score(1.0, 1.0, "")
    assert regex(r"\d+", "it is 42", timeout=5) == Score(1.0, 1.0, "")
    assert regex(r"\d+", "it is 42", fullmatch=True, timeout=5).reward == 0.0
    assert regex(r"\d+", " 42 \n", fullmatch=True) == Score(1.0, 1.0, "")
    assert regex("x", "  ") == Score(
        0.0, 0.0, "The response is empty; it must match the pattern 'x'."
    )
    assert regex("x", "y", fullmatch=True) == Score(
        0.0, 0.0, "The response does not match as a whole the pattern 'x'; it ends with \"y\"."
    )
    long = regex("x", "a" * 100 + "b" * 100)  # the last 120 characters, not shortened
    assert long == Score(
        0.0,
        0.0,
        "The response does not match the pattern 'x'; it ends with \""
        + "a" * 20
        + "b" * 100
        + '".',
    )


def test_user_numbers_and_scores_pass_through_unchanged() -> None:
    """Bug caught: a user's Score with reward 1 refused as out of range (the upper bound
    off by one), None given a score of 1, NaN a reward or score of 1, a numpy number (what TRL reward functions often
    return) refused as not a number, an error that no longer names "the scorer", and `wrap_callable`'s
    default threshold not 1 (0.99 rewarded, or 1.0 not)."""
    assert to_score(Score(1.0, 1.0, "ok")) == Score(1.0, 1.0, "ok")
    assert to_score(Score(0.0, 0.0, "")) == Score(0.0, 0.0, "")
    assert to_score(None) == Score(
        0.0, 0.0, "The reward function gave no reward (None) for this response."
    )
    assert to_score(float("nan")) == Score(
        0.0, 0.0, "The reward function gave no reward (NaN) for this response."
    )
    assert to_score(np.float32(0.25)) == Score(0.0, 0.25, "The reward function gave 0.25.")
    with pytest.raises(ValueError, match=r"^the scorer returned a Score with reward 1\.5;"):
        to_score(Score(1.5, 1.0, ""))
    item = Item(id="i", messages=[{"role": "user", "content": "q"}])
    for value, reward in [(0.99, 0.0), (1.0, 1.0)]:
        scorer = wrap_callable(lambda it, resp, v=value: v, columns=[], conversational=False)
        assert scorer(item, "x").reward == reward


def test_a_missing_column_error_lists_the_columns_there_are() -> None:
    """Bug caught: the columns a TRL reward function could have asked for replaced by
    "(none)", leaving the user to guess the name of the one it should use."""

    def needs_solution(completions: list, solution: list, **kwargs: object) -> list[float]:
        return [0.0]

    with pytest.raises(ValueError, match=r"columns available to it: qid, answer, difficulty \("):
        memory_env(scorer=needs_solution)


def test_a_trl_reward_function_naming_prompts_gets_them_without_kwargs() -> None:
    """Bug caught: `prompts` passed only to a function that also takes **kwargs, so one
    that names it (and nothing else) fails on every reply instead of scoring it."""

    def asks_prompts(prompts: list, completions: list) -> list[float]:
        return [float(prompts[0] == "What is the capital of France?" and completions[0] == "x")]

    env = memory_env(scorer=asks_prompts, id_column="qid")
    assert env.score(by_qid(env)["q0"], "x") == Score(1.0, 1.0, "The reward function gave 1.")


def test_a_leading_decimal_point_is_part_of_the_answer() -> None:
    """Bug: normalisation kept a decimal point only between digits, so ".5" became "5"
    and "-.5" became "5": `exact_match` with gold ".5" rewarded "Answer: 5"."""
    assert exact_match(".5", "Answer: 5").reward == 0.0
    assert exact_match(".5", "Answer: .5").reward == 1.0
    assert exact_match("-.5", "Answer: .5").reward == 0.0
    assert exact_match("-.5", "Answer: -.5").reward == 1.0
    assert exact_match("The end.", "Answer: the end").reward == 1.0  # a full stop is not


def test_a_reply_cut_off_while_thinking_has_no_answer() -> None:
    """Bug: the scorers removed only closed <think> blocks, so a reply cut off mid-thought
    was scored on what it wrote while thinking: `numeric` gave 42 for
    "<think>Answer: 42? let me chec". The training code's `strip_thinking` already
    dropped an unterminated block; the scorers use it now."""
    assert numeric(42, "<think>Answer: 42? let me chec").reward == 0.0
    assert exact_match("42", "<think>so 42\nAnswer: 42").reward == 0.0
    assert numeric(42, "<think>maybe 41</think>Answer: 42").reward == 1.0


# -- reading a user's files (from mutation testing loading.py) -------------------------------


def test_a_json_file_holding_a_list_or_json_lines_is_read_and_a_bad_row_is_named(
    tmp_path: Path,
) -> None:
    """Bugs caught: a pretty-printed .json list read line by line (or its rows not checked
    to be objects), a .json file of JSON lines refused, one object spread over lines taken
    for rows, a JSON-lines row that is a list accepted."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS[:3], indent=2))
    (rows,) = load_splits(str(path))  # one split, "train", unless told
    assert rows.records == ROWS[:3] and rows.lines is None
    assert rows.where(1) == f"{path} [train] row 1"
    path.write_text(json.dumps([ROWS[0], ["not", "a", "row"]], indent=2))
    with pytest.raises(ValueError, match=r"data\.json \[train\] row 1: need a JSON object"):
        load_rows(str(path))
    with pytest.raises(ValueError, match=r'row 1: need an object with "qid", "question" and "an'):
        load_rows(str(path), required=["qid", "question", "answer"])
    with pytest.raises(ValueError, match=r'row 1: need an object with "question"$'):
        load_rows(str(path), required=["question"])
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))  # JSON lines in a .json
    assert load_rows(str(path)).lines == [1, 2]
    path.write_text(json.dumps(ROWS[0]))  # one object on one line: one row of JSON lines
    assert load_rows(str(path)).records == [ROWS[0]]
    path.write_text('{"rows":\n' + json.dumps(ROWS[:2]) + "}")  # two lines, one object
    with pytest.raises(ValueError, match=r"one JSON object, not rows.*load_kwargs\.field"):
        load_rows(str(path))
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"data\.jsonl:2: need a JSON object, got list"):
        load_rows(str(lines))


def test_the_rows_under_a_key_of_a_json_file_are_read_with_load_kwargs_field(
    tmp_path: Path,
) -> None:
    """What the "one JSON object" error advises must work: with load_kwargs the file goes
    to the `datasets` JSON reader (bug caught: .json mapped to no reader)."""
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"rows": ROWS[:4]}, indent=2))
    env = DatasetEnv(
        path=str(path), load_kwargs={"field": "rows"}, cache_dir=str(tmp_path / "c"), **COLUMNS
    )
    assert sorted(it.answer for it in all_items(env)) == sorted(r["answer"] for r in ROWS[:4])


@pytest.mark.parametrize("suffix", ["ndjson", "jsonl"])
def test_ndjson_is_read_as_json_lines_directly_or_through_datasets(
    tmp_path: Path, suffix: str
) -> None:
    """.ndjson is JSON lines: read directly (a column may mix types), and with load_kwargs
    by the `datasets` JSON reader (bugs caught: either suffix dropped from a table)."""
    path = tmp_path / f"data.{suffix}"
    path.write_text('{"q": "a", "x": "s"}\n\n{"q": "b", "x": 3}\n')
    direct = load_rows(str(path))
    assert [r["x"] for r in direct.records] == ["s", 3] and direct.lines == [1, 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rows = load_rows(str(path), load_kwargs={"keep_in_memory": True}, cache_dir=str(tmp_path))
    assert rows.records == ROWS and rows.lines is None


def test_a_tsv_file_is_split_at_tabs(tmp_path: Path) -> None:
    """Bug caught: .tsv read with no reader, or as comma-separated (one column per line)."""
    path = tmp_path / "data.tsv"
    path.write_text("question\tanswer\nWhat is 6, times 7?\t42\nSky colour?\tblue\n")
    rows = load_rows(str(path), cache_dir=str(tmp_path / "c"))
    assert rows.columns == ["question", "answer"]
    assert rows.records == [
        {"question": "What is 6, times 7?", "answer": "42"},
        {"question": "Sky colour?", "answer": "blue"},
    ]


def test_an_arrow_file_and_a_folder_of_data_files_are_read(tmp_path: Path) -> None:
    """Bugs caught: .arrow mapped to no reader; a folder of data files (not a save_to_disk
    folder) sent to `load_from_disk`; a saved single Dataset without its "train" split."""
    import pyarrow as pa

    table = datasets.Dataset.from_list(ROWS).data.table
    with pa.ipc.new_stream(str(tmp_path / "data.arrow"), table.schema) as out:
        out.write_table(table)
    rows = load_rows(str(tmp_path / "data.arrow"), cache_dir=str(tmp_path / "c"))
    assert rows.records == ROWS
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder, "parquet", ROWS[:6], stem="train")
    write(folder, "parquet", ROWS[6:], stem="test")
    train, test = load_splits(str(folder), ["train", "test"], cache_dir=str(tmp_path / "c"))
    assert train.records == ROWS[:6] and test.records == ROWS[6:]
    listed = load_rows(None, data_files=[str(folder / "test.parquet")], cache_dir=str(tmp_path))
    assert listed.records == ROWS[6:]
    datasets.Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved")  # one Dataset: "train"
    assert load_rows(str(tmp_path / "saved"), "train[-2:]").records == ROWS[-2:]


def test_a_missing_or_unreadable_dataset_argument_is_refused_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """Bugs caught: no path and no data_files, a single file given with data_files too, data
    files of an unknown format, an empty data_files list (an IndexError, not a message):
    each must be a ValueError naming the argument."""
    with pytest.raises(ValueError, match=r"^env_args\.path: give a dataset"):
        DatasetEnv(**COLUMNS)
    data = write(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"^env_args\.data_files: not with a single file"):
        DatasetEnv(path=data, data_files=data, **COLUMNS)
    for files in (str(tmp_path / "rows.txt"), [], {"train": []}):
        with pytest.raises(ValueError, match=r"^env_args\.data_files: cannot tell the format"):
            DatasetEnv(data_files=files, **COLUMNS)


def test_one_percent_bound_makes_both_bounds_percentages_as_in_datasets(tmp_path: Path) -> None:
    """Bug: `datasets` reads ``train[20:70%]`` as 20% to 70% (one ``%`` makes both bounds
    percentages: rows 2-6 of 10), our slicer read 20 as a row number. The JSON-lines file
    then had no training rows while the parquet file had five, and for parquet the span
    of ``train[3:50%]`` (rows 0-4 for `datasets`) was unknown, so a test split sharing
    rows 0-2 with the training split passed the overlap check."""
    kwargs = {"split": "train[20:70%]", "test_split": "train[70%:]", "id_column": "qid"}
    for fmt in ("jsonl", "parquet"):
        env = env_from(tmp_path, fmt, **kwargs)
        assert [it.id.rsplit("/", 1)[1] for it in env.train_items()] == [
            f"q{i}" for i in range(2, 7)
        ]
        assert [it.id.rsplit("/", 1)[1] for it in env.test_items()] == [
            f"q{i}" for i in range(7, 10)
        ]
        with pytest.raises(ValueError, match=r"shares rows .* \(rows 0 to 2 are in both"):
            env_from(tmp_path, fmt, split="train[:3]", test_split="train[3:50%]")
    assert split_span("train[2:50%]", 10) == Span("train", 0, 5, 10)


def test_overlapping_splits_are_refused_before_loading_however_they_are_spelled(
    tmp_path: Path,
) -> None:
    """A whole split and a slice of it, or one slice written with other spacing, surely
    share rows: refused before the (here absent) file is read. Bugs caught: either case
    left to the post-load check, which never runs when the loading fails or downloads."""
    absent = str(tmp_path / "absent.jsonl")
    spellings = [
        ("train", "train[:5]"),
        ("train[:5]", " train[ :5 ] "),
        ("train[-5:]", "train[-5:]"),
        ("train[:5]", "train"),
    ]
    for train, test in spellings:
        with pytest.raises(ValueError, match=r"^env_args\.test_split: .* shares rows"):
            DatasetEnv(path=absent, split=train, test_split=test, **COLUMNS)
    assert not splits_overlap("train[:50%]", "train[50%:]")
    assert not splits_overlap("train", "test")
    for a, b in [("train[10%:60%]", "train[50%:]"), ("train[:1%]", "train[:50%]")]:
        assert splits_overlap(a, b) and splits_overlap(b, a)


def test_a_split_that_does_not_parse_is_refused_naming_the_argument(tmp_path: Path) -> None:
    """Bug caught: an unreadable split spec crashing with an AttributeError instead of
    saying which argument is wrong and how to write it."""
    assert split_span("train[1:2:3]", 10) is None
    with pytest.raises(ValueError, match=r"^env_args\.test_split: cannot read the split 'tr ain'"):
        env_from(tmp_path, "jsonl", test_split="tr ain")
    with pytest.raises(ValueError, match=r"^env_args\.split: cannot read the split 'train\[1\]'"):
        memory_env(split="train[1]")


@pytest.mark.parametrize("split", ["train[:150%]", "train[-101%:]"])
def test_a_percentage_past_the_whole_split_is_refused_as_datasets_refuses_it(
    tmp_path: Path, split: str
) -> None:
    """Bug caught: `train[:150%]` read a JSON-lines file or an in-memory dataset whole
    (the bound clipped), where `datasets` refuses it for the sources it loads: one config,
    two readings."""
    with pytest.raises(ValueError, match=r"^env_args\.split: the split .* outside -100% to 100%"):
        env_from(tmp_path, "jsonl", split=split)
    with pytest.raises(ValueError, match=r"^env_args\.split: the split .* outside -100% to 100%"):
        memory_env(split=split)
    memory_env(split="train[-100%:100%]")  # the ends themselves are allowed, as in datasets


def test_a_missing_path_no_one_would_take_for_a_hub_id_is_not_sent_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative, absolute, home or Windows path, one with a data suffix or two slashes,
    that does not exist is refused as a missing file; only what could be a Hub id
    (``org/name``) goes to `datasets`. Bug caught: a typo in a local path turned into a
    Hub download attempt and an unclear error."""

    def no_hub(path: str, **kwargs: object) -> None:
        raise AssertionError(f"sent {path} to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    missing = ["./absent", "~/absent-folder", "/absent/folder", "data/sub/absent"]
    for path in [*missing, "data\\absent", "absent.csv", str(tmp_path / "absent")]:
        with pytest.raises(ValueError, match=r"^env_args\.path: no such file"):
            DatasetEnv(path=path, **COLUMNS)
    with pytest.raises(ValueError, match=r"cannot load 'someorg/trivia': sent someorg/trivia"):
        DatasetEnv(path="someorg/trivia", **COLUMNS)


def test_an_in_memory_dataset_is_one_train_split_and_a_streaming_one_is_refused() -> None:
    """`rows_from_dataset` with no splits named reads a Dataset's one split, "train";
    a streaming dataset (which has no length to slice or check) is refused by name."""
    ds = datasets.Dataset.from_list(ROWS)
    (rows,) = rows_from_dataset(ds)
    assert rows.split == "train" and rows.records == ROWS
    assert rows.where(3) == "the dataset [train] row 3"  # what an error about row 3 says
    assert rows.span == Span("train", 0, len(ROWS), len(ROWS))
    with pytest.raises(ValueError, match=r"^dataset: streaming datasets are not supported"):
        DatasetEnv.from_dataset(ds.to_iterable_dataset(), **COLUMNS)


def test_split_span_selects_the_rows_datasets_selects() -> None:
    """`split_span` against `datasets`' own reading of a split spec, for percentages
    (rounded to the nearest row, ties to even), negative and open bounds, bounds past
    the end and a mix of row numbers and percentages. Bugs caught: any arithmetic slip
    in turning bounds into rows (a JSON-lines file sliced differently from a parquet one)."""
    specs = ["train", "train[:50%]", "train[33%:]", "train[-30%:]", "train[:-2]", "train[2:50%]"]
    specs += ["train[-20:]", "train[5:3]", "train[250:]", "train[-5%:-1%]", "train[12%:88%]"]
    for spec in [*specs, "train[:100%]", "train[-100%:]", "train[:25%]", "train[:-2%]"]:
        for total in (0, 1, 5, 7, 10, 1000):
            (want,) = datasets.ReadInstruction.from_spec(spec).to_absolute({"train": total})
            assert split_span(spec, total) == Span("train", want.from_, want.to, total), spec


def test_errors_about_a_split_name_the_split_argument_by_default(tmp_path: Path) -> None:
    """Called without `split_fields` (as the QA, code and IFEval environments do), the
    error about a missing split names env_args.split and the splits there are; when
    `datasets` finds a sliced split missing, the error names the argument that asked."""
    with pytest.raises(ValueError, match=r"^env_args\.split: .*data\.jsonl has no split 'valid'"):
        load_rows(write(tmp_path, "jsonl"), "valid")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(ValueError, match=r"^env_args\.split: the dataset has no split 'valid'"):
        rows_from_dataset(dd, ["valid"])
    with pytest.raises(ValueError, match=r"^env_args\.test_split: cannot load .*Unknown split"):
        env_from(tmp_path, "parquet", test_split="test[:2]")  # a slice of a split there is not
    (tmp_path / "notes.txt").write_text("a note")
    with pytest.raises(ValueError, match=r"\.txt files; use jsonl, ndjson, json, csv, tsv, par"):
        load_rows(str(tmp_path / "notes.txt"))


# -- the environment's own checks (from mutation testing dataset.py) -------------------------


def test_ids_name_the_data_file_when_data_files_replaces_the_path(tmp_path: Path) -> None:
    """Bug caught: with `data_files` and no path (or a builder name such as "parquet" as
    the path) item ids began "None/" or "parquet/" instead of the data file's name."""
    train = write(tmp_path, "parquet", ROWS, stem="trivia")
    cache = str(tmp_path / "cache")
    alone = DatasetEnv(data_files=train, cache_dir=cache, **COLUMNS)
    assert sorted(it.id for it in all_items(alone)) == sorted(
        f"trivia/train/{i}" for i in range(len(ROWS))
    )
    builder = DatasetEnv(path="parquet", data_files={"train": train}, cache_dir=cache, **COLUMNS)
    assert {it.id.rsplit("/", 1)[0] for it in all_items(builder)} == {"trivia/train"}


def test_contradictory_arguments_are_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    """Bugs caught: a path (or data_files) and an in-memory dataset together, both a prompt
    and a messages column, or a held-out fraction of 0 or 1 (no test items, or no training
    items) accepted, one of the two silently ignored. Each is refused by name before the
    (here absent) file would be read."""
    ds = datasets.Dataset.from_list(ROWS)
    absent = str(tmp_path / "absent.jsonl")
    for where in ({"path": absent}, {"data_files": absent}):
        with pytest.raises(ValueError, match=r"^env_args\.path: give either a path or an in-mem"):
            DatasetEnv(dataset=ds, **where, **COLUMNS)
        with pytest.raises(ValueError, match=r"^from_dataset: the dataset replaces path and data"):
            DatasetEnv.from_dataset(ds, **where, **COLUMNS)
    with pytest.raises(ValueError, match=r"^env_args\.prompt_column, env_args\.messages_colu"):
        DatasetEnv(path=absent, messages_column="chat", **COLUMNS)
    for fraction in (0, 1.0):
        with pytest.raises(ValueError, match=r"^env_args\.test_fraction: must be in \(0, 1\)"):
            DatasetEnv(path=absent, test_fraction=fraction, **COLUMNS)
    # With a test split the fraction is not used, so it is not checked either.
    env = memory_env(split="train[:7]", test_split="train[7:]", test_fraction=0)
    assert (len(env.train_items()), len(env.test_items())) == (7, 3)


def test_meta_columns_may_name_a_single_column() -> None:
    """Bug caught: `meta_columns: difficulty` (one name, not a list, as YAML users write
    it) read letter by letter, refused as "no column 'd'"."""
    env = memory_env(meta_columns="difficulty", id_column="qid")
    spider = by_qid(env)["q2"]
    assert spider.meta == {"difficulty": 2, "answer": "8"}  # the answer column is kept too


def test_a_split_that_selects_no_rows_is_refused_naming_the_argument(tmp_path: Path) -> None:
    """Bug caught: an empty training or test split (a slice past the end) built an
    environment with nothing to train or test on, and the run failed later, or reported
    an accuracy over no items."""
    with pytest.raises(
        ValueError, match=r"^env_args\.split: .*data\.jsonl \[train\[20:\]\] has no"
    ):
        env_from(tmp_path, "jsonl", split="train[20:]", test_split="train[:5]")
    with pytest.raises(ValueError, match=r"^env_args\.test_split: .*data\.jsonl \[train\[10:\]\] "):
        env_from(tmp_path, "jsonl", split="train[:10]", test_split="train[10:]")
    # Bug caught: on an in-memory Dataset the same slice crashed inside `datasets`
    # (`select(range(10, 10))`: "IndexError: Index 10 out of range").
    for env in (lambda **kw: env_from(tmp_path, "parquet", **kw), memory_env):
        with pytest.raises(ValueError, match=r"^env_args\.test_split: .*\[train\[10:\]\] has no"):
            env(split="train[:10]", test_split="train[10:]")


@pytest.mark.parametrize("spec", ["train[1__0:]", "train[_1:]", "train[:33%](round)", "train+"])
def test_a_split_no_reader_can_parse_is_refused_before_datasets_sees_it(
    tmp_path: Path, spec: str
) -> None:
    """Bug caught: a malformed split of a parquet file went to `datasets`, and its
    error ("invalid literal for int()") was reported against `env_args.path`."""
    with pytest.raises(ValueError, match=r"^env_args\.test_split: cannot read the split"):
        env_from(tmp_path, "parquet", split="train[:5]", test_split=spec)


def test_a_test_split_only_datasets_can_read_skips_the_row_overlap_check(tmp_path: Path) -> None:
    """A test split such as ``validation+test`` has no known row range; the overlap check
    needs both ranges and skips it. Bug caught: the check ran with one range missing and
    crashed with an AttributeError."""
    files = {
        name: write(tmp_path, "parquet", part, stem=name)
        for name, part in (("train", ROWS[:6]), ("validation", ROWS[6:8]), ("test", ROWS[8:]))
    }
    env = DatasetEnv(
        data_files=files, split="train[:4]", test_split="validation+test",
        cache_dir=str(tmp_path / "cache"), **COLUMNS,
    )  # fmt: skip
    assert len(env.train_items()) == 4
    assert {it.answer for it in env.test_items()} == {r["answer"] for r in ROWS[6:]}
    flipped = DatasetEnv(
        data_files=files, split="validation+test", test_split="train[:4]",
        cache_dir=str(tmp_path / "cache"), **COLUMNS,
    )  # fmt: skip
    assert (len(flipped.train_items()), len(flipped.test_items())) == (4, 4)


def test_the_held_out_split_without_a_seed_is_seed_zeros() -> None:
    """The documented default seed is 0: a config that leaves it out holds out the same
    items as one that says seed: 0 (bug caught: another default, so results reported with
    the default could not be reproduced by naming it; a negative seed refused)."""

    def ids(env: DatasetEnv) -> list[str]:
        return [it.id for it in env.test_items()]

    assert ids(memory_env()) == ids(memory_env(seed=0)) != ids(memory_env(seed=1))
    assert len(ids(memory_env(seed=-1))) == 2  # any integer seeds `random.Random`


def test_scorer_arguments_are_checked_for_the_scorer_they_go_to() -> None:
    """Bugs caught: scorer_args given with a user function silently dropped; an invalid
    regex pattern in scorer_args accepted until the first reply was scored; the regex
    scorer without a pattern accepted with no answer column; an unknown argument's error
    not saying what the scorer takes; numeric's abs_tol or regex's fullmatch refused as
    unknown (their value checks passed for the wrong reason); a scorer that
    is an object with settings (a dataclass instance, which cannot be hashed) crashing the
    check meant for built-in names."""

    def judge_fn(item: Item, response: str) -> float:
        return 1.0

    with pytest.raises(ValueError, match=r"^env_args\.scorer_args: only the built-in scorers"):
        memory_env(scorer=judge_fn, scorer_args={"rel_tol": 0.1})
    with pytest.raises(ValueError, match=r"^env_args\.scorer_args\.pattern: invalid regex"):
        memory_env(scorer="regex", scorer_args={"pattern": "(unclosed"})
    with pytest.raises(ValueError, match=r"^env_args\.answer_column: the 'regex' scorer"):
        memory_env(scorer="regex", answer_column=None)  # no pattern: one per row is needed
    with pytest.raises(
        ValueError, match=r"exact_match' scorer \(it takes: none\) \(use env_args\.r"
    ):
        memory_env(scorer_args={"reveal_answer": False})
    with pytest.raises(ValueError, match=r"'numeric' scorer \(it takes: abs_tol, rel_tol\)$"):
        memory_env(scorer="numeric", scorer_args={"tol": 1})

    @dataclasses.dataclass
    class Contains:
        word: str

        def __call__(self, item: Item, response: str) -> float:
            return float(self.word in response)

    numbers = [r for r in ROWS if r["answer"].isdigit()]
    near = memory_env(rows=numbers, scorer="numeric", scorer_args={"abs_tol": 1}, id_column="qid")
    assert near.score(by_qid(near)["q3"], "Answer: 41").reward == 1.0
    whole = memory_env(scorer="regex", answer_column=None,
                       scorer_args={"pattern": "Paris", "fullmatch": True})  # fmt: skip
    item = whole.train_items()[0]
    assert (whole.score(item, "Paris").reward, whole.score(item, "Paris!").reward) == (1.0, 0.0)

    env = memory_env(scorer=Contains("Paris"))
    item = env.train_items()[0]
    assert (env.score(item, "Paris").reward, env.score(item, "Rome").reward) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("rows", "columns", "error"),
    [
        ([{"q": "  ", "a": "x"}], {"prompt_column": "q"}, r"row 0: empty prompt in column 'q'"),
        ([{"q": 7, "a": "x"}], {"prompt_column": "q"},
         r"row 0: column 'q' \(env_args\.prompt_column\) holds int, not a string or a list of"),
        ([{"m": "Hi", "a": "x"}], {"messages_column": "m"},
         r"row 0: column 'm' \(env_args\.messages_column\) holds str, not a list of messages"),
        ([{"m": [], "a": "x"}], {"messages_column": "m"}, r"holds list, not a list of messages"),
        ([{"m": [{"role": "user"}], "a": "x"}], {"messages_column": "m"},
         r"row 0: column 'm' .*: each message needs a string 'role' and 'content'"),
        ([{"m": [{"role": "user", "content": 5}], "a": "x"}], {"messages_column": "m"},
         r"each message needs a string 'role' and 'content'"),
        ([{"m": [{"role": "system", "content": "Be brief."},
                 {"role": "assistant", "content": "x"}], "a": "x"}], {"messages_column": "m"},
         r"row 0: column 'm' \(env_args\.messages_column\) has no user message"),
    ],
)  # fmt: skip
def test_a_prompt_the_model_cannot_be_given_is_refused_naming_the_row(
    rows: list[dict], columns: dict, error: str
) -> None:
    """Bugs caught: an empty prompt, a number or a string where a chat is expected, a
    message without a string role and content, or a chat with no user turn became an
    item (the model prompted with nothing, or a crash deep in the chat template)."""
    with pytest.raises(ValueError, match=error):
        DatasetEnv.from_dataset(datasets.Dataset.from_list(rows * 2), answer_column="a", **columns)


def test_an_empty_id_is_refused_naming_the_row() -> None:
    """Bug caught: an empty id cell gave every such row the id "dataset/train/", so the
    duplicate check blamed the wrong thing (or one empty id passed unnoticed)."""
    rows = [{**ROWS[0], "qid": ""}, *ROWS[1:]]
    with pytest.raises(ValueError, match=r"^the dataset \[train\] row 0: empty id in column 'qid'"):
        memory_env(rows=rows, id_column="qid")


def test_a_missing_answer_is_refused_for_a_built_in_scorer_only() -> None:
    """Bugs caught: a null (or empty list) answer cell accepted for a built-in scorer,
    which then compared replies with nothing; or refused for a user function, which may
    not need the column on every row (its item just has no literal answer)."""
    for hole in (None, []):
        rows = [{"prompt": "q?", "answer": ["x"]}, {"prompt": "q?", "answer": hole}]
        with pytest.raises(ValueError, match=r"^the dataset \[train\] row 1: no answer in colu"):
            DatasetEnv.from_dataset(datasets.Dataset.from_list(rows), answer_column="answer")
    rows = [{"prompt": "q?", "answer": "x"}, {"prompt": "r?", "answer": None}]
    env = DatasetEnv.from_dataset(
        datasets.Dataset.from_list(rows), scorer=judge, answer_column="answer"
    )
    assert {it.messages[0]["content"]: it.answer for it in all_items(env)} == {
        "q?": "x",
        "r?": None,
    }


def test_numeric_item_answer_is_the_number_read_from_the_gold() -> None:
    """`Item.answer` for the numeric scorer is the number it compares against, not the
    whole gold cell (bug caught: a GSM8K solution "... #### 72" kept as the answer, which
    the playbook's leak guard then looks for verbatim; a gold of 0 shown as another number)."""
    rows = [{"prompt": "How many?", "answer": "48/2 = 24 clips.\n#### 72"},
            {"prompt": "How much?", "answer": "1,234.50"},
            {"prompt": "How little?", "answer": "0"}]  # fmt: skip
    env = memory_env(rows=rows, prompt_column="prompt", scorer="numeric")
    assert sorted(it.answer for it in all_items(env)) == ["0", "1234.5", "72"]


def test_the_instruction_goes_to_the_last_user_turn_of_a_chat() -> None:
    """Bug caught: in a multi-turn chat (a few-shot prompt) the instruction was added to the
    first user turn, an example, and not to the question the model answers. Trailing space
    is trimmed before the blank line."""
    chat = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "Answer: 4"},
        {"role": "user", "content": "3 + 5?  "},
    ]
    env = DatasetEnv.from_dataset(
        datasets.Dataset.from_list([{"messages": chat, "answer": "8"}] * 2),
        answer_column="answer", instruction="End with 'Answer: <number>'.",
    )  # fmt: skip
    item = all_items(env)[0]
    assert [m["content"] for m in item.messages] == [
        "2 + 2?",
        "Answer: 4",
        "3 + 5?\n\nEnd with 'Answer: <number>'.",
    ]
    assert item.reference is None  # the last turn is the user's: no reference taken off


def test_ids_of_a_hub_dataset_with_data_files_name_the_dataset(monkeypatch) -> None:
    """With a Hub id and `data_files` (some of a repository's files), ids still begin with
    the dataset's name (bug caught: the first data file's name taken instead, as if no
    path had been given)."""

    def fake_load_dataset(path, **kwargs):
        return [datasets.Dataset.from_list(ROWS)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    env = DatasetEnv(path="someorg/trivia", data_files={"train": "data/part-0.parquet"},
                     **COLUMNS)  # fmt: skip
    assert {it.id.rsplit("/", 1)[0] for it in all_items(env)} == {"trivia/train"}


def test_a_user_scorer_may_have_empty_answer_cells() -> None:
    """The empty-answer check guards the built-in scorers (an empty gold would reward an
    empty reply); a user function decides for itself what an empty cell means (bug
    caught: the check applied to every scorer, refusing the user's dataset)."""
    rows = [{**r, "answer": "" if i == 3 else r["answer"]} for i, r in enumerate(ROWS)]
    env = memory_env(rows=rows, scorer=judge, id_column="qid")
    assert by_qid(env)["q3"].answer == "" and by_qid(env)["q0"].answer == "Paris"
    for scorer in ("exact_match", "regex"):  # an empty pattern would match every reply
        with pytest.raises(ValueError, match=r"row 3: empty answer in column 'answer'"):
            memory_env(rows=rows, scorer=scorer)


def test_a_saved_dataset_given_as_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`path: .` (a `save_to_disk` folder the run starts in) has an empty pathlib name;
    its items are still built, with ids naming the split and row (bug caught: the id
    label's fallback for a path with no name crashing)."""
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "s")
    monkeypatch.chdir(tmp_path / "s")
    env = DatasetEnv(path=".", **COLUMNS)
    assert sorted(it.id.split("/", 1)[1] for it in all_items(env)) == sorted(
        f"train/{i}" for i in range(len(ROWS))
    )


def test_with_a_regex_pattern_the_answer_column_is_kept_but_not_read_as_a_regex() -> None:
    """With `scorer_args.pattern` the answer column is only kept for the scorer's meta:
    an answer that is no valid regex ("f(x") or an empty one must not be refused (bugs
    caught: every answer compiled as a pattern, or checked for emptiness, although none
    is used)."""
    rows = [{**r, "answer": "" if i == 4 else "f(x"} for i, r in enumerate(ROWS)]
    env = memory_env(rows=rows, scorer="regex", scorer_args={"pattern": r"\bParis\b"})
    item = env.train_items()[0]
    assert item.meta["answer"] in {"f(x", ""} and item.answer is None
    assert env.score(item, "Paris").reward == 1.0


@pytest.mark.parametrize("path", [".", "./", "~/data"])
def test_a_folder_of_data_files_named_by_dot_or_home_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Bugs caught: `path: .` (or `./`) for a folder of parquet files failed inside
    `datasets` ("dataset_name should be specified but got None"), and `~/data` went to
    `datasets` unexpanded and was refused as a malformed Hub id."""
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", "parquet")
    monkeypatch.chdir(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path))
    env = DatasetEnv(path=path, cache_dir=str(tmp_path / "cache"), id_column="qid", **COLUMNS)
    assert sorted(by_qid(env)) == sorted(r["qid"] for r in ROWS)


# -- several reward functions, as TRL's reward_funcs -------------------------------------------


def _says_answer(completions, **kwargs):
    return [1.0 if c.startswith("Answer:") else 0.0 for c in completions]


def _is_right(completions, answer, **kwargs):
    return [
        1.0 if a.lower() in c.lower() else 0.0 for c, a in zip(completions, answer, strict=True)
    ]


def test_a_list_of_reward_functions_succeeds_when_each_does_and_names_each_that_did_not():
    """TRL's `reward_funcs=[format, accuracy]` with `reward_weights`: a list was refused
    ("expected a scorer name or a callable"). Each function is called as TRL calls it; the
    reply succeeds only when every one gives the reward, its score is the weighted mean
    (weights 1 and 3 here), and the feedback names the ones that did not, with what each
    said. Catches a sum taken for success (one of two would pass), an unweighted mean, and
    feedback that blames a function that gave its reward."""
    env = memory_env(scorer=[_says_answer, _is_right], scorer_weights=[1, 3])
    item = next(i for i in all_items(env) if i.meta["answer"] == "Paris")
    both, form, right, neither = (env.score(item, reply) for reply in
                                  ("Answer: Paris", "Answer: Rome", "Paris", "Rome"))  # fmt: skip
    assert (both.reward, both.score, both.feedback) == (1.0, 1.0, "")
    assert (form.reward, form.score) == (0.0, 0.25)
    assert form.feedback == "_is_right: The reward function gave 0."
    assert (right.reward, right.score) == (0.0, 0.75)
    assert right.feedback == "_says_answer: The reward function gave 0."
    assert (neither.score, neither.feedback) == (0.0, "_says_answer: The reward function "
                                                 "gave 0. _is_right: The reward function gave 0.")  # fmt: skip
    assert memory_env(scorer=[_says_answer, _is_right]).score(item, "Answer: Rome").score == 0.5
    # two functions of one name (lambdas) keep a part and a line of feedback each
    twins = memory_env(scorer=[lambda completions, **kw: [0.0], lambda completions, **kw: [1.0]])
    assert twins.score(item, "x").parts == {"<lambda>[0]": 0.0, "<lambda>[1]": 1.0}
    assert twins.score(item, "x").feedback == "<lambda>[0]: The reward function gave 0."


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scorer": []}, r"^env_args.scorer: an empty list"),
    ({"scorer": [_says_answer, "exact_match"]}, r"built-in scorer 'exact_match' goes alone"),
    ({"scorer": [_says_answer, "nope"]}, r"^env_args.scorer\[1\]: unknown scorer 'nope'"),
    ({"scorer": [_says_answer, _is_right], "scorer_weights": [1]}, r"one weight per reward"),
    ({"scorer": [_says_answer, _is_right], "scorer_weights": [1, -1]},
     r"^env_args.scorer_weights\[1\]"),
    ({"scorer": [_says_answer, _is_right], "scorer_weights": [0, 0]}, r"a weight above 0"),
    ({"scorer": _says_answer, "scorer_weights": [1]}, r"weights go with a list"),
])  # fmt: skip
def test_a_bad_list_of_reward_functions_or_weights_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        memory_env(**kwargs)


def _long(completions, **kwargs):
    return [float(len(c) > 13) for c in completions]


def _vowels(completions, **kwargs):
    return [min(1.0, sum(ch in "aeiou" for ch in c) / 4) for c in completions]


def test_each_reward_functions_mean_is_logged_as_trl_logs_it(tiny_model_dir, tmp_path, capsys):
    """TRL logs `rewards/<name>/mean` per reward function; with a list of them, a step's
    row has `rewards/<name>`: the mean of that function over the step's rollouts, here
    recomputed from the replies samples.jsonl logged (all of them); each evaluation's row
    has them over its samples, which keep their parts. Catches a part lost on the way (a
    feedback column's Score rebuilt without it, an outcome that drops it), a mean over the
    wrong rollouts, and an evaluation, printed summary or report without them. The unit
    check: the feedback column keeps the parts."""
    from resd.training.trainer import Trainer
    from test_trainer import config, read_jsonl

    cfg = config(tiny_model_dir, tmp_path / "run", "steps=1", "algorithm=sdpo", "log_samples=32",
                 "env=dataset", "env_args.prompt_column=question", "env_args.answer_column=answer",
                 "env_args.feedback_column=why")  # fmt: skip
    rows = [{**row, "why": "Say more."} for row in ROWS]
    summary = Trainer(cfg, env=datasets.Dataset.from_list(rows), scorer=[_long, _vowels]).train()
    run = tmp_path / "run"
    (metrics,) = read_jsonl(run / "metrics.jsonl")
    replies = [s["response"] for s in read_jsonl(run / "samples.jsonl")]
    assert len(replies) == metrics["rollouts"]
    for fn in (_long, _vowels):
        assert metrics[f"rewards/{fn.__name__}"] == pytest.approx(sum(fn(replies)) / len(replies))
    # Each evaluation too, before and after: its samples keep their parts, and its row has
    # their means; the run's summary, the printed table and the report show them.
    evaluations = read_jsonl(run / "eval.jsonl")
    assert [row["step"] for row in evaluations] == [0, 1]
    for row in evaluations:
        records = read_jsonl(run / f"eval-step-{row['step']:06d}.jsonl")
        answers = [r["response"] for r in records]
        for fn in (_long, _vowels):
            assert [r["parts"][fn.__name__] for r in records] == fn(answers)
            assert row[f"rewards/{fn.__name__}"] == pytest.approx(sum(fn(answers)) / len(answers))
    assert (summary["eval_before"], summary["eval_after"]) == tuple(evaluations)
    from resd.analysis.report import build_report
    from resd.cli import _print_summary

    capsys.readouterr()
    _print_summary(summary)
    printed = capsys.readouterr().out.splitlines()
    assert printed[3:9:5] == [
        "task_mean@k     {:8.3f} {:8.3f}".format(*(e["task_mean@k"] for e in evaluations)),
        "rewards/_vowels {:8.3f} {:8.3f}".format(*(e["rewards/_vowels"] for e in evaluations)),
    ]
    page = build_report(run).read_text()
    # a row in the training table (first and last step: the one step) and in the evaluation's
    assert page.count("<tr><td>rewards/_long</td>") == 2
    assert page.count("<tr><td>rewards/_vowels</td>") == 2
    env = memory_env(rows, scorer=[_long, _vowels], feedback_column="why")
    scored = env.score(all_items(env)[0], "an")
    assert scored.feedback == "Say more." and scored.parts == {"_long": 0.0, "_vowels": 0.25}
