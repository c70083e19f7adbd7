"""QAEnv: answer extraction, normalised exact match, FiNER-style list credit, feedback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from resd.envs import make_env
from resd.envs.base import Score
from resd.envs.qa import QAEnv, extract_answer, normalize_answer


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": "capital", "question": "What is the capital of France?", "answer": "Paris"},
            {
                "id": "tower",
                "question": "Which landmark is 330 m tall?",
                "answer": "The Eiffel Tower",
                "aliases": ["Tour Eiffel"],
            },
            {"id": "num", "question": "2 + 2?", "answer": 4},
            {
                "id": "tags",
                "question": "Tag the entities: revenue 5M, net loss 2M, cash 1M, debt 3M.",
                "answer": ["Revenues", "NetIncomeLoss", "Cash", "LongTermDebt"],
            },
        ],
    )


def items_by_id(env: QAEnv) -> dict:
    return {it.id.rsplit("/", 1)[1]: it for it in env.train_items() + env.test_items()}


def test_missing_path_names_env_args_path():
    with pytest.raises(ValueError, match=r"env_args\.path"):
        QAEnv()
    with pytest.raises(ValueError, match="no such file"):
        QAEnv(path="/nonexistent/qa.jsonl")


def test_bad_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        QAEnv(path=str(path))


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  The Eiffel-Tower!! ", "eiffel tower"),
        ("An apple, a day", "apple day"),
        ("PARIS.", "paris"),
        ("Ｆｕｌｌ　width", "full width"),
        ("theory", "theory"),  # articles only as whole words
        (4, "4"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


@pytest.mark.parametrize(
    ("response", "answer", "explicit"),
    [
        ("Let me think.\nAnswer: Paris", "Paris", True),
        ("**Answer:** Paris", "Paris", True),
        ("**Final answer: Paris**", "Paris", True),
        ("Answer: wrong\nOn reflection...\nAnswer: Paris", "Paris", True),
        ("<think>Answer: Lyon</think>\nAnswer: Paris", "Paris", True),
        ("so it is \\boxed{Paris}.", "Paris", True),
        ("I believe\n\nParis\n", "Paris", False),
        ("", "", False),
    ],
)
def test_extract_answer(response, answer, explicit):
    assert extract_answer(response) == (answer, explicit)


def test_prompts_say_how_to_answer(data):
    items = items_by_id(QAEnv(path=data))
    assert "'Answer: <answer>'" in items["capital"].prompt_text
    assert "Answer with 4 items" in items["tags"].prompt_text
    assert items["tags"].reference == "Answer: Revenues, NetIncomeLoss, Cash, LongTermDebt"


def test_references_score_full_marks(data):
    env = QAEnv(path=data)
    for item in env.train_items() + env.test_items():
        score = env.score(item, item.reference)
        assert (score.reward, score.score, score.feedback) == (1.0, 1.0, "")


def test_scalar_exact_match_with_normalisation_and_aliases(data):
    env = QAEnv(path=data)
    items = items_by_id(env)
    assert env.score(items["capital"], "Answer: paris.").reward == 1.0
    assert env.score(items["tower"], "Answer: eiffel tower").reward == 1.0
    assert env.score(items["tower"], "Answer: the Tour  Eiffel").reward == 1.0
    assert env.score(items["num"], "Answer: 4").reward == 1.0
    wrong = env.score(items["capital"], "Answer: Lyon")
    assert (wrong.reward, wrong.score) == (0.0, 0.0)
    assert wrong.feedback == 'Incorrect. The correct answer is "Paris".'  # "Lyon" not repeated


def test_scalar_feedback_without_reveal(data):
    env = QAEnv(path=data, reveal_answer=False)
    wrong = env.score(items_by_id(env)["capital"], "I think it is\nLyon")
    assert wrong.feedback == (
        "No 'Answer:' line found; the last line was used. "
        'Incorrect: "Lyon" is not the expected answer.'
    )
    assert "Paris" not in wrong.feedback


def test_list_answers_get_partial_credit_per_position(data):
    env = QAEnv(path=data)
    tags = items_by_id(env)["tags"]
    score = env.score(tags, "Answer: revenues, Cash, cash, LongTermDebt")
    assert score.reward == 0.0 and score.score == 0.75
    assert score.feedback == ('3 of 4 positions correct.\nPosition 2 should be "NetIncomeLoss".')


def test_list_answers_with_wrong_length(data):
    env = QAEnv(path=data)
    tags = items_by_id(env)["tags"]
    short = env.score(tags, "Answer: Revenues, NetIncomeLoss")
    assert short.score == 0.5
    assert "You gave 2 items; 4 were expected." in short.feedback
    assert 'Position 3 should be "Cash".' in short.feedback
    long = env.score(tags, "Answer: Revenues, NetIncomeLoss, Cash, LongTermDebt, Extra")
    assert (long.reward, long.score) == (0.0, 1.0)  # every position right, but one too many
    assert "You gave 5 items" in long.feedback
    assert env.score(tags, "no idea").score == 0.0


def test_list_feedback_without_reveal_names_positions_only(data):
    env = QAEnv(path=data, reveal_answer=False)
    tags = items_by_id(env)["tags"]
    score = env.score(tags, "Answer: Revenues, Cash, Cash, Debt")
    assert score.score == 0.5
    assert 'Position 2 is wrong (you answered "Cash").' in score.feedback
    assert 'Position 4 is wrong (you answered "Debt").' in score.feedback
    assert "NetIncomeLoss" not in score.feedback and "LongTermDebt" not in score.feedback


def test_custom_separator(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"question": "q", "answer": ["a, b", "c"]}])
    env = QAEnv(path=path, separator=";")
    (item,) = env.train_items() + env.test_items()
    assert env.score(item, "Answer: a, b; c").reward == 1.0
    assert item.reference == "Answer: a, b; c"


def test_split_is_deterministic_and_test_path_is_honoured(tmp_path, data):
    ids = lambda items: [it.id for it in items]  # noqa: E731
    a, b = QAEnv(path=data, seed=1), QAEnv(path=data, seed=1)
    assert ids(a.train_items()) == ids(b.train_items())
    assert len(a.test_items()) == 1 and len(a.train_items()) == 3
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"question": "q?", "answer": "x"}])
    c = QAEnv(path=data, test_path=test_file)
    assert len(c.train_items()) == 4 and ids(c.test_items()) == ["qa/test/1"]


def test_registry_builds_the_env(data):
    env = make_env("qa", {"path": data, "reveal_answer": False})
    assert isinstance(env, QAEnv) and env.name == "qa" and env.reveal_answer is False


# -- audit fixes: rows and settings that would score wrongly are refused ---------------------


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("", "non-empty answer"),
        ("  ", "non-empty answer"),
        ([], "empty list"),
        (["Washington, D.C.", "Paris"], "contains the separator"),
        (["a", None], "item 2"),
        (["a", ["b"]], "item 2"),
    ],
)
def test_rows_no_reply_could_answer_are_refused_naming_the_row(tmp_path, answer, message):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "ok?", "answer": "yes"}, {"question": "q", "answer": answer}],
    )
    with pytest.raises(ValueError, match=rf"qa\.jsonl:2: .*{message}"):
        QAEnv(path=path)


def test_a_list_item_may_hold_the_separator_when_another_one_is_chosen(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"id": "c", "question": "Capitals?", "answer": ["Washington, D.C.", "Paris"]}] * 1
        + [{"question": f"q{i}", "answer": "x"} for i in range(3)],
    )
    env = QAEnv(path=path, separator=";")
    item = items_by_id(env)["c"]
    assert env.score(item, item.reference).reward == 1.0


def test_qa_option_letter_and_float_answers_score_correctly(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": "mc", "question": "Pick one.", "answer": "A"},
            {"id": "f", "question": "1 + 2?", "answer": 3.0},
            {"id": "l", "question": "Signs?", "answer": ["-1", "C#"]},
        ],
    )
    env = QAEnv(path=path)
    items = items_by_id(env)
    assert env.score(items["mc"], "Answer: ").reward == 0.0
    assert env.score(items["mc"], "Answer: The").reward == 0.0
    assert env.score(items["mc"], "Answer: A").reward == 1.0
    assert items["f"].answer == "3"
    assert env.score(items["f"], "Answer: 3").reward == 1.0
    assert env.score(items["l"], "Answer: 1, C").score == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"separator": ""}, "separator"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"test_fraction": "abc"}, "test_fraction"),
        ({"seed": "abc"}, "seed"),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(data, kwargs, field):
    with pytest.raises(ValueError, match=rf"env_args\.{field}"):
        QAEnv(path=data, **kwargs)


def test_test_path_must_not_be_the_training_file(data):
    with pytest.raises(ValueError, match=r"env_args\.test_path"):
        QAEnv(path=data, test_path=data)


def test_duplicate_ids_are_refused_naming_both_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"id": "x", "question": "q1", "answer": "a"},
            {"id": "x", "question": "q2", "answer": "b"},
        ],
    )
    with pytest.raises(ValueError, match=r"qa\.jsonl:2: the id 'x' is also used at .*qa\.jsonl:1"):
        QAEnv(path=path)


# -- mutation-testing gaps: each test names the wrong reward it catches ----------------------


def test_a_single_alias_given_as_text_is_one_answer_not_its_letters(tmp_path: Path) -> None:
    """Bug caught: an "aliases" cell holding one string iterated letter by letter,
    so the reply "e" (a letter of "Tour Eiffel") was rewarded as a correct answer."""
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {
                "id": "t",
                "question": "Which tower?",
                "answer": "Eiffel Tower",
                "aliases": "Tour Eiffel",
            }
        ],
    )
    env = QAEnv(path=path)
    item = items_by_id(env)["t"]
    assert env.score(item, "Answer: Tour Eiffel") == Score(1.0, 1.0, "")
    assert env.score(item, "Answer: e").reward == 0.0
    assert env.score(item, "Answer: T").reward == 0.0


def test_scalar_outcomes_have_the_reward_score_and_feedback_they_state(data: str) -> None:
    """Bug caught: an empty reply given a score of 1, or told its (absent) answer is
    wrong instead of that it gave none; the tests checked the reward alone."""
    env = QAEnv(path=data)
    capital = items_by_id(env)["capital"]
    assert env.score(capital, "") == Score(
        0.0,
        0.0,
        "No 'Answer:' line found; the last line was used. The response contains no answer.",
    )
    assert env.score(capital, "Answer: Lyon") == Score(
        0.0, 0.0, 'Incorrect. The correct answer is "Paris".'
    )


def test_the_context_is_shown_before_the_question(tmp_path: Path) -> None:
    """Bug caught: the "context" column dropped from the prompt, so the model is asked
    about a passage it never sees and every reply it gets right is luck."""
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {
                "id": "c",
                "context": " Anna was born in Oslo. ",
                "question": "Where?",
                "answer": "Oslo",
            }
        ],
    )
    item = items_by_id(QAEnv(path=path))["c"]
    assert item.prompt_text.startswith("Anna was born in Oslo.\n\nWhere?\n\n")


def test_a_blank_question_is_refused_naming_the_row(tmp_path: Path) -> None:
    """Bug caught: a row whose question is blank accepted, and trained on as a prompt
    holding nothing but the answer format."""
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "ok?", "answer": "yes"}, {"question": "  ", "answer": "no"}],
    )
    with pytest.raises(ValueError, match=r"qa\.jsonl:2: empty question"):
        QAEnv(path=path)


def test_hidden_list_feedback_says_nothing_was_answered_past_the_reply(data: str) -> None:
    """Bug caught: with the answer hidden, a position past the end of a short reply was
    read from the reply (an IndexError that stops scoring) or named as an empty answer."""
    env = QAEnv(path=data, reveal_answer=False)
    short = env.score(items_by_id(env)["tags"], "Answer: Revenues, NetIncomeLoss, Cash")
    assert short == Score(
        0.0,
        0.75,
        "3 of 4 positions correct.\nYou gave 3 items; 4 were expected.\n"
        "Position 4 is wrong (you answered nothing).",
    )
