"""The house_rules environment: every rule's checker, feedback that names only broken rules,
seeded rule sets, and references that pass."""

from __future__ import annotations

import pytest

from resd.envs import make_env
from resd.envs.house_rules import RULES, HouseRulesEnv, draw_rules, make_rule


@pytest.mark.parametrize(
    ("kind", "param", "good", "bad"),
    [
        ("start_word", "indeed", "Indeed, it is Paris.", "It is indeed Paris."),
        ("lowercase", None, "it is paris.", "It is paris."),
        ("max_words", 4, "paris is the capital", "paris is the capital city"),
        ("end_marker", "(end)", "paris (end)  ", "paris (end) ok"),
        ("phrase", "in short", "In  short, paris.", "shortly: paris"),
        ("no_digits", None, "paris, since seventeen", "paris, since 1789"),
        ("no_exclamation", None, "paris.", "paris!"),
        ("one_line", None, "  paris \n", "paris\nof course"),
    ],
)
def test_each_rule_checks_what_it_says(kind, param, good, bad):
    rule = make_rule(kind, param)
    assert rule.holds(good) and not rule.holds(bad)
    if param is not None:
        assert str(param) in rule.broken  # the reviewer names the rule's setting


def test_feedback_names_broken_rules_only():
    env = HouseRulesEnv(rules=["start_word", "lowercase", "no_digits", "end_marker"], rules_seed=1)
    item = next(it for it in env.train_items() if it.meta["accept"] == ["paris"])
    by_kind = {r.kind: r for r in env.house_rules}
    reply = f"{by_kind['start_word'].param} it is Paris, 100 percent"  # start word ok; case, digits, marker broken
    score = env.score(item, reply)
    assert score.reward == 0.0
    for kind in ("lowercase", "no_digits", "end_marker"):
        assert by_kind[kind].broken in score.feedback
    assert by_kind["start_word"].broken not in score.feedback  # obeyed: never mentioned
    assert "does not answer" not in score.feedback
    assert score.score == pytest.approx(2 / 5)  # answered + one of four rules
    wrong = env.score(item, item.reference.replace("paris", "lyon"))
    assert (
        wrong.feedback == "The reply does not answer the question."
        and wrong.score == pytest.approx(4 / 5)
    )


def test_every_reference_passes_and_every_rule_set_is_satisfiable():
    for seed in range(30):
        env = HouseRulesEnv(rules_seed=seed, n_rules=len(RULES) if seed % 5 == 0 else 3)
        for item in env.train_items() + env.test_items():
            score = env.score(item, item.reference)
            assert (score.reward, score.score, score.feedback) == (1.0, 1.0, ""), (
                seed,
                item.reference,
            )


def test_rule_sets_and_splits_are_seeded():
    a, b, c = draw_rules(3, seed=7), draw_rules(3, seed=7), draw_rules(3, seed=8)
    assert [r.describe() for r in a] == [r.describe() for r in b] != [r.describe() for r in c]
    assert len({r.kind for r in a}) == 3
    e1, e2 = make_env("house_rules", {"seed": 1}), make_env("house_rules", {"seed": 1})
    assert [i.id for i in e1.train_items()] == [i.id for i in e2.train_items()]
    assert not {i.id for i in e1.train_items()} & {i.id for i in e1.test_items()}
    assert len(e1.train_items()) + len(e1.test_items()) > 200
    with pytest.raises(ValueError, match="n_rules"):
        HouseRulesEnv(n_rules=0)
    with pytest.raises(ValueError, match="unknown rule"):
        HouseRulesEnv(rules=["shout"])


def test_answers_match_whole_words():
    env = HouseRulesEnv(rules=["one_line"])
    item = next(it for it in env.train_items() + env.test_items() if it.meta["accept"] == ["rome"])
    assert env.score(item, "Rome.").reward == 1.0
    assert env.score(item, "Romeo.").reward == 0.0
    two = next(
        it for it in env.train_items() + env.test_items() if "buenos aires" in it.meta["accept"]
    )
    assert env.score(two, "It is Buenos  Aires.").reward == 1.0


def test_a_quoted_answer_counts():
    # The 0.5B model's own reply, which scored "does not answer" while apostrophes were
    # part of words: 'thin' in quotes is the word thin; don't keeps its apostrophe.
    env = HouseRulesEnv(rules=["one_line"])
    item = next(it for it in env.train_items() + env.test_items() if it.meta["accept"] == ["thin"])
    assert env.score(item, "The opposite of the word 'thick' is 'thin'.").reward == 1.0
    assert env.score(item, "'thinner'").reward == 0.0
    assert env.score(item, "The opposite of 'thick' is not 'thin', is it?").reward == 1.0


def test_arguments_that_read_wrongly_are_refused():
    """`rules=lowercase` (a string) was read letter by letter ("unknown rule 'l'"); `rules=[]`
    made a task without rules; `test_fraction=1.5` left no training items."""
    with pytest.raises(ValueError, match=r"^env_args\.rules: expected a list"):
        HouseRulesEnv(rules="lowercase")
    with pytest.raises(ValueError, match=r"^env_args\.rules: expected a list"):
        HouseRulesEnv(rules=[])
    with pytest.raises(
        ValueError, match=r"^env_args\.test_fraction: expected a number in \[0, 1\]"
    ):
        HouseRulesEnv(test_fraction=1.5)
    with pytest.raises(ValueError, match=r"^env_args\.n_test: expected a whole number"):
        HouseRulesEnv(n_test=-1)
