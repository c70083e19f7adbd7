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
    env = ArithmeticEnv(seed=0, max_operand=5, n_train=20, n_test=5)
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
        resolve_env_class("resd.playbook:Playbook")
    with pytest.raises(ValueError, match=r"^env_args"):
        make_env("arithmetic", {"bogus": 1})
    with pytest.raises(ValueError, match=r"env_args\.ops"):
        make_env("arithmetic", {"ops": "/"})
    assert isinstance(
        make_env("resd.envs.arithmetic:ArithmeticEnv", {"n_train": 4, "n_test": 1}), ArithmeticEnv
    )
