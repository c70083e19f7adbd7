"""The demo environment and the environment loader."""

from __future__ import annotations

import pytest

from resd.envs import make_env, resolve_env_class
from resd.envs.arithmetic import ArithmeticEnv


def item_for(env: ArithmeticEnv, question: str):
    return next(
        it for it in env.train_items() + env.test_items() if it.meta["question"] == question
    )


def test_items_are_deterministic_and_disjoint():
    a, b = ArithmeticEnv(seed=3), ArithmeticEnv(seed=3)
    assert [i.id for i in a.train_items()] == [i.id for i in b.train_items()]
    assert not {i.id for i in a.train_items()} & {i.id for i in a.test_items()}
    assert len(a.test_items()) == 64


def test_scores_and_feedback():
    env = ArithmeticEnv(seed=0, max_operand=5, n_train=20, n_test=5, quote_answer=True)
    item = env.train_items()[0]
    value = item.meta["value"]
    full = env.score(item, f"Let me think.\nAnswer: {value}")
    assert (full.reward, full.score, full.feedback) == (1.0, 1.0, "")
    wrong = env.score(item, f"Answer: {value + 3}")
    assert (wrong.reward, wrong.score) == (0.0, 0.5)
    assert (
        f"The final answer {value + 3} is wrong" in wrong.feedback
        and f"= {value}" in wrong.feedback
    )
    unformatted = env.score(item, f"It is {value}.")
    assert (unformatted.reward, unformatted.score) == (0.0, 0.5)
    assert "Answer: <number>" in unformatted.feedback
    nothing = env.score(item, "no idea")
    assert (nothing.reward, nothing.score) == (0.0, 0.0) and "No number" in nothing.feedback
    assert env.score(item, item.reference).reward == 1.0


def test_hidden_answer_feedback():
    env = ArithmeticEnv(seed=0, reveal_answer=False, n_train=10, n_test=2)
    item = env.train_items()[0]
    fb = env.score(item, f"Answer: {item.meta['value'] + 1}").feedback
    assert "too high" in fb and f"= {item.meta['value']}" not in fb


def test_loader_errors_name_the_field():
    with pytest.raises(ValueError, match=r"^env: unknown"):
        make_env("nope")
    with pytest.raises(ValueError, match="cannot import"):
        make_env("no_such_module_xyz:Env")
    with pytest.raises(ValueError, match="not a subclass"):
        resolve_env_class("resd.training.playbook:Playbook")
    with pytest.raises(ValueError, match=r"^env_args"):
        make_env("arithmetic", {"bogus": 1})
    with pytest.raises(ValueError, match=r"env_args\.ops"):
        make_env("arithmetic", {"ops": "/"})
    assert isinstance(
        make_env("resd.envs.arithmetic:ArithmeticEnv", {"n_train": 4, "n_test": 1}), ArithmeticEnv
    )


def test_the_last_number_on_the_answer_line_counts():
    env = ArithmeticEnv(seed=0, n_train=30, n_test=2)
    item = next(it for it in env.train_items() if it.meta["op"] == "+")
    a, b, value = item.meta["a"], item.meta["b"], item.meta["value"]
    # the bug: the first number of "Answer: a + b = value" was read as the answer
    assert env.score(item, f"Answer: {a} + {b} = {value}").reward == 1.0
    assert env.score(item, f"Answer: {value}.\nDone.").reward == 1.0
    late = env.score(item, f"Answer: {value + 1}\nWait, no.\nAnswer: {value}")
    assert late.reward == 1.0  # the last Answer line wins
    assert env.score(item, f"Answer: {value} (not {value + 1})").reward == 0.0


def test_thousands_separators_and_negative_answers():
    env = ArithmeticEnv(
        seed=0, n_train=60, n_test=2, ops="*-", max_operand=999, mul_max_operand=999
    )
    big = next(it for it in env.train_items() if it.meta["value"] >= 10_000)
    assert env.score(big, f"Answer: {big.meta['value']:,}").reward == 1.0
    neg = next(it for it in env.train_items() if it.meta["value"] < 0)
    assert env.score(neg, f"Answer: {neg.meta['value']}").reward == 1.0


def test_products_can_be_large_and_feedback_does_not_quote_the_reply_by_default():
    env = ArithmeticEnv(seed=1, ops="*", max_operand=999, mul_max_operand=99, n_train=20,
                        n_test=2)  # fmt: skip
    assert max(it.meta["b"] for it in env.train_items()) > 12
    item = env.train_items()[0]
    wrong = item.meta["value"] + 7
    feedback = env.score(item, f"Answer: {wrong}").feedback
    assert str(wrong) not in feedback and f"= {item.meta['value']}" in feedback
    assert (
        ArithmeticEnv(seed=1, n_train=20, n_test=2, quote_answer=True)
        .score(item, f"Answer: {wrong}")
        .feedback.count(str(wrong))
        == 1
    )
    with pytest.raises(ValueError, match="mul_max_operand"):
        ArithmeticEnv(mul_max_operand=0)


def test_counts_the_pool_cannot_fill_are_refused():
    """`n_train=1000000 max_operand=1` gave 0 training items (the test split took the 12
    questions there are); a negative count sliced items away."""
    with pytest.raises(
        ValueError, match=r"make 12 distinct questions, fewer than n_train \+ n_test"
    ):
        ArithmeticEnv(n_train=1_000_000, n_test=4, max_operand=1)
    for bad in ({"n_train": -5}, {"n_test": 2.7}, {"n_train": True}):
        with pytest.raises(ValueError, match=r"^env_args\.n_(train|test): expected a whole number"):
            ArithmeticEnv(**bad)
