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


class Open(ArithmeticEnv):
    """Takes any argument and hands the rest on: its constructor decides, not the loader."""

    def __init__(self, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if k != "label"})


def test_a_misspelt_environment_or_argument_names_the_closest_and_the_rest():
    """Python's TypeError named neither the argument meant nor the ones there are, and an
    unknown environment only listed them all. Catches those messages back, a suggestion
    made for a name close to nothing, and a constructor taking **kwargs refused."""
    with pytest.raises(ValueError, match=r"^env: unknown environment 'arithmatic' \(did you "
                       r"mean 'arithmetic'\?\); use one of "):  # fmt: skip
        make_env("arithmatic")
    with pytest.raises(ValueError) as typo:
        make_env("arithmetic", {"n_trian": 3})
    assert str(typo.value).startswith("env_args: arithmetic takes no argument 'n_trian' (did "
                                      "you mean 'n_train'?) (its arguments: seed, n_train, ")  # fmt: skip
    with pytest.raises(ValueError) as far:
        make_env("arithmetic", {"zzz": 3})
    assert "did you mean" not in str(far.value) and "(its arguments: seed," in str(far.value)
    assert isinstance(make_env("test_arithmetic_env:Open", {"label": "x", "n_train": 2}), Open)


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


def test_questions_carry_their_hand_computed_values() -> None:
    """Catches a wrong operator table (`+` computing a - b), an extra item generated past
    n_train + n_test, and a train split that drops or repeats an item."""
    plus = ArithmeticEnv(seed=0, ops="+", max_operand=1, n_train=3, n_test=1)
    minus = ArithmeticEnv(seed=0, ops="-", max_operand=1, n_train=3, n_test=1)
    assert (len(plus.train_items()), len(plus.test_items())) == (3, 1)
    roomy = ArithmeticEnv(seed=0, ops="+", max_operand=2, n_train=3, n_test=1)  # pool of 9
    assert (len(roomy.train_items()), len(roomy.test_items())) == (3, 1)
    assert {
        it.meta["question"]: it.meta["value"] for it in plus.train_items() + plus.test_items()
    } == {
        "What is 0 + 0?": 0,
        "What is 0 + 1?": 1,
        "What is 1 + 0?": 1,
        "What is 1 + 1?": 2,
    }
    assert {it.id: it.answer for it in minus.train_items() + minus.test_items()} == {
        "arithmetic/0-0": "0",
        "arithmetic/0-1": "-1",
        "arithmetic/1-0": "1",
        "arithmetic/1-1": "0",
    }


def test_one_more_item_than_the_pool_holds_is_refused() -> None:
    """Catches the pool check comparing against n_train - n_test: 3 + 2 = 5 questions
    asked of a pool of 4 must raise, not return a short split."""
    with pytest.raises(
        ValueError, match=r"make 4 distinct questions, fewer than n_train \+ n_test = 5;"
    ):
        ArithmeticEnv(ops="+", max_operand=1, n_train=3, n_test=2)


def test_both_factors_of_a_product_are_bounded_by_mul_max_operand() -> None:
    """Catches a lost or off-by-one `% (mul_max_operand + 1)`: with mul_max_operand=2 the
    products are exactly the nine of 0..2 x 0..2, though max_operand is 20."""
    env = ArithmeticEnv(seed=0, ops="*", max_operand=20, mul_max_operand=2, n_train=8, n_test=1)
    assert sorted(it.id for it in env.train_items() + env.test_items()) == [
        "arithmetic/0*0", "arithmetic/0*1", "arithmetic/0*2",
        "arithmetic/1*0", "arithmetic/1*1", "arithmetic/1*2",
        "arithmetic/2*0", "arithmetic/2*1", "arithmetic/2*2",
    ]  # fmt: skip


def test_exact_feedback_texts() -> None:
    """Catches a mangled restatement of the question (`question[8:-1]` off by one gives
    "s 1 + 1 = 2" or "1 + 1? = 2"), notes joined without a space, a missing "too low",
    and an unformatted reply read by its first number instead of its last."""
    env = ArithmeticEnv(seed=0, ops="+", max_operand=1, n_train=3, n_test=1)
    item = item_for(env, "What is 1 + 1?")
    assert env.score(item, "Answer: 5").feedback == "Incorrect. The correct value is 1 + 1 = 2."
    both = env.score(item, "I get 5.")
    assert (both.reward, both.score) == (0.0, 0.0)
    assert both.feedback == (
        "The reply has no line 'Answer: <number>'; the final answer must be given that way. "
        "Incorrect. The correct value is 1 + 1 = 2."
    )
    last = env.score(item, "1 + 1 makes 2")
    assert (last.reward, last.score) == (0.0, 0.5)
    hidden = ArithmeticEnv(seed=0, ops="+", max_operand=1, n_train=3, n_test=1, reveal_answer=False)
    assert hidden.score(item, "Answer: 0").feedback == "Incorrect: the final answer is too low."
    assert hidden.score(item, "Answer: 3").feedback == "Incorrect: the final answer is too high."
    assert ArithmeticEnv.name == "arithmetic"


def test_score_success_threshold_and_clamp() -> None:
    """Catches a moved SUCCESS_REWARD (0.5 counts as success, 0.49 does not), `>=` turned
    into `>` or `<=`, and a score clamp that lets 2.0 through."""
    from resd.envs.base import Score

    assert [Score(r, 0.0, "").success for r in (0.0, 0.49, 0.5, 1.0)] == [False, False, True, True]
    assert (Score(0.0, 2.0, "").score, Score(0.0, -1.0, "").score) == (1.0, 0.0)


def test_prompt_text_is_the_last_user_message() -> None:
    """Catches `users[0]` in place of `users[-1]`."""
    from resd.envs.base import Item

    item = Item(
        id="x",
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "second"},
        ],
    )
    assert item.prompt_text == "second"


def test_split_items_bounds() -> None:
    """Catches split_items refusing the legal ends 0 and 1 (`<` for `<=`), accepting 1.5,
    and a test_fraction of 0 giving no test item (the split keeps at least one)."""
    from resd.envs.base import Item, split_items

    items = [Item(id=str(i), messages=[]) for i in range(10)]
    assert [len(part) for part in split_items(items, 0, seed=0)] == [9, 1]
    assert [len(part) for part in split_items(items, 1, seed=0)] == [0, 10]
    assert [len(part) for part in split_items(items, 0.3, seed=0)] == [7, 3]
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"^env_args\.test_fraction"):
            split_items(items, bad, seed=0)  # type: ignore[arg-type]


def test_asking_for_more_products_than_the_factors_allow_is_refused_not_drawn_forever() -> None:
    """Bug: the generator stopped drawing at len(ops) * (max_operand + 1)^2 distinct
    questions, but a product's factors are cut to mul_max_operand, so with
    mul_max_operand=1 only 4 products exist and asking for 6 drew forever instead of
    raising the "fewer than n_train + n_test" error."""
    with pytest.raises(ValueError, match=r"\(factors up to 1\) make 4 distinct questions"):
        ArithmeticEnv(ops="*", max_operand=20, mul_max_operand=1, n_train=5, n_test=1)
    env = ArithmeticEnv(ops="+*", max_operand=1, mul_max_operand=1, n_train=7, n_test=1)
    assert len(env.train_items()) + len(env.test_items()) == 8  # 4 sums and 4 products
