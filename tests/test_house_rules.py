"""The house_rules environment: every rule's checker, feedback that names only broken rules,
seeded rule sets, and references that pass."""

from __future__ import annotations

import pytest

from resd.envs import make_env
from resd.envs.house_rules import (
    RULES,
    HouseRulesEnv,
    conforming_reply,
    draw_rules,
    load_tasks,
    make_rule,
)


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
    with pytest.raises(
        ValueError, match="unknown rule 'shout'; choose from start_word, lowercase,"
    ):
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


def test_an_answer_with_a_possessive_or_contracted_s_counts():
    """A reply "Rome's the capital" was scored "does not answer": the apostrophe made
    "rome's" one word, which is not "rome". The 's goes; a longer word that starts with the
    answer does not count, nor does an 's that turns one word into another."""
    env = HouseRulesEnv(rules=["one_line"])
    item = next(it for it in env.train_items() + env.test_items() if it.meta["accept"] == ["rome"])
    assert env.score(item, "Rome's the capital of Italy.").reward == 1.0
    assert env.score(item, "Italy's capital city is ROME'S.").reward == 1.0
    assert env.score(item, "Romeo's the capital.").reward == 0.0
    assert env.score(item, "Roma's the capital.").reward == 0.0


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


def test_every_catalogue_setting_is_a_real_rule():
    """Each start word, marker and phrase of the catalogue is broken by a bare answer and
    obeyed by the reference reply: an empty marker or phrase would hold for every reply
    (a rule that always passes), an empty start word for none."""
    for kind in ("start_word", "end_marker", "phrase"):
        for param in RULES[kind]:
            rule = make_rule(kind, param)
            assert not rule.holds("paris"), (kind, param)
            assert rule.holds(conforming_reply("paris", [rule])), (kind, param)
    for limit in RULES["max_words"]:
        rule = make_rule("max_words", limit)
        assert rule.holds(" ".join(["w"] * limit)) and not rule.holds(" ".join(["w"] * (limit + 1)))


def test_reference_reply_is_built_in_order():
    """start word, phrase, answer, marker, separated by spaces; lowercased only under the
    lowercase rule (catches a marker glued to the answer and an inverted lowercase test)."""
    rules = [make_rule("end_marker", "(end)"), make_rule("phrase", "in short"),
             make_rule("start_word", "indeed")]  # fmt: skip
    assert conforming_reply("Paris", rules) == "indeed in short Paris (end)"
    assert (
        conforming_reply("Paris", [*rules, make_rule("lowercase")]) == "indeed in short paris (end)"
    )
    assert conforming_reply("Paris", []) == "Paris"


def test_describe_shows_the_setting_only_when_there_is_one():
    """`describe` labels a rule set in logs: kind alone, or kind(param)."""
    assert make_rule("lowercase").describe() == "lowercase"
    assert make_rule("max_words", 8).describe() == "max_words(8)"
    assert make_rule("end_marker", "(end)").describe() == "end_marker('(end)')"


def test_one_rule_is_a_valid_rule_set_and_nine_are_too_many():
    """`1 <= n_rules <= len(RULES)`: the lower bound is inclusive (catches `1 < n_rules`)."""
    assert len(draw_rules(1, seed=0)) == 1
    assert len(HouseRulesEnv(n_rules=1).house_rules) == 1
    with pytest.raises(ValueError, match="n_rules"):
        draw_rules(len(RULES) + 1, seed=0)


def test_feedback_notes_are_joined_with_spaces_in_rule_order():
    """The feedback, exactly: the missing answer first, then each broken rule in the rule
    set's (sorted) order, one space apart; the score counts held checks out of 1 + rules."""
    env = HouseRulesEnv(rules=["one_line", "no_exclamation", "lowercase"])
    item = next(it for it in env.train_items() + env.test_items() if it.meta["accept"] == ["paris"])
    score = env.score(item, "lyon!\nyes")
    assert (score.reward, score.score) == (0.0, 1 / 4)  # only lowercase holds
    assert score.feedback == (
        "The reply does not answer the question. No exclamation marks: keep the tone calm. "
        "The reply must fit on a single line."
    )


def test_items_and_split_sizes():
    """Items carry the task's question as the only (user) message and the accepted answers
    in meta; n_train / n_test cut the seeded split to exactly that many."""
    tasks = {f"house_rules/{t['id']}": t for t in load_tasks()}
    full = HouseRulesEnv(seed=3)
    for item in full.train_items() + full.test_items():
        task = tasks[item.id]
        assert item.messages == [{"role": "user", "content": task["prompt"]}]
        assert item.meta == {"accept": task["accept"]}
    cut = HouseRulesEnv(seed=3, n_train=5, n_test=3)
    assert [i.id for i in cut.train_items()] == [i.id for i in full.train_items()[:5]]
    assert [i.id for i in cut.test_items()] == [i.id for i in full.test_items()[:3]]
    assert HouseRulesEnv.name == "house_rules"
    with pytest.raises(ValueError, match=r"^env_args\.n_train: expected a whole number"):
        HouseRulesEnv(n_train=-1)
