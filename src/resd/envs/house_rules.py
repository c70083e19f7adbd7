"""House rules: easy questions, hidden style rules that hold for every one of them.

Each task is a short question a small instruction-tuned model can answer (a capital, an
opposite, a plural, a past tense, ...). A reply is accepted only if it answers the
question *and* obeys every rule of a fixed, hidden set of house rules: open with a given
word, stay in lowercase, stay under a word limit, end with a marker, and so on. The
prompt never states the rules; the feedback names each rule the reply broke, in a
reviewer's words, and never one it happened to obey.

Why it suits RESD: success needs every rule at once, so at one rollout per prompt it is
rare; feedback is rich but partial; and only a memory that spans tasks (the global
playbook) lets the teacher know the rules this attempt obeyed by chance. A lesson
learned on "the capital of France" is exactly what "the plural of mouse" needs.

Rule sets are drawn from `RULES` with `rules_seed`; `n_rules` is the difficulty knob.
Reward is 1 when the answer and every rule hold; the score is the fraction of checks
(the answer, then each rule) that hold.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from resd.envs.base import Environment, Item, Score, split_items, whole_number

_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
    """Words, with quotation marks around them dropped ('thin' is thin; don't stays)."""
    return [w for w in (m.strip("'") for m in _WORD.findall(text)) if w]


@dataclass(frozen=True)
class Rule:
    """One house rule: its check, what a reviewer says when it is broken, and how to obey it."""

    id: str
    holds: Callable[[str], bool]
    broken: str  # the reviewer's words when the reply breaks it
    param: Any = None
    kind: str = ""

    def describe(self) -> str:
        return f"{self.kind}({self.param!r})" if self.param is not None else self.kind


# Parameters a rule can take; all lowercase and digit-free so every rule set can hold at once.
START_WORDS = ("certainly", "indeed", "well", "noted", "right")
MARKERS = ("-- over", "(end)", "~ fin ~", "[done]")
PHRASES = ("as you asked", "in short", "for the record", "to be clear")
WORD_LIMITS = (8, 10, 12)


def _first_word(text: str) -> str:
    words = _words(text)
    return words[0].lower() if words else ""


def make_rule(kind: str, param: Any = None) -> Rule:
    """A rule of the catalogue (`RULES`), with its parameter."""
    if kind == "start_word":
        return Rule("start_word", lambda r: _first_word(r) == param,
                    f"Replies here must open with the word '{param}'.", param, kind)  # fmt: skip
    if kind == "lowercase":
        return Rule("lowercase", lambda r: r == r.lower(),
                    "House style is all lowercase: no capital letters anywhere.", None, kind)  # fmt: skip
    if kind == "max_words":
        return Rule("max_words", lambda r: len(_words(r)) <= param,
                    f"Too long: replies may have at most {param} words.", param, kind)  # fmt: skip
    if kind == "end_marker":
        return Rule("end_marker", lambda r: r.rstrip().endswith(param),
                    f"Every reply must end with the marker '{param}'.", param, kind)  # fmt: skip
    if kind == "phrase":
        return Rule("phrase", lambda r: param in " ".join(r.lower().split()),
                    f"The reply must contain the phrase '{param}'.", param, kind)  # fmt: skip
    if kind == "no_digits":
        return Rule("no_digits", lambda r: not re.search(r"\d", r),
                    "Digits are not allowed: spell any number out in words.", None, kind)  # fmt: skip
    if kind == "no_exclamation":
        return Rule("no_exclamation", lambda r: "!" not in r,
                    "No exclamation marks: keep the tone calm.", None, kind)  # fmt: skip
    if kind == "one_line":
        return Rule("one_line", lambda r: "\n" not in r.strip(),
                    "The reply must fit on a single line.", None, kind)  # fmt: skip
    raise ValueError(f"env_args.rules: unknown rule {kind!r}; choose from {', '.join(RULES)}")


# The catalogue: rule kind -> the parameters it is drawn from (None: takes none).
RULES: dict[str, tuple[Any, ...] | None] = {
    "start_word": START_WORDS,
    "lowercase": None,
    "max_words": WORD_LIMITS,
    "end_marker": MARKERS,
    "phrase": PHRASES,
    "no_digits": None,
    "no_exclamation": None,
    "one_line": None,
}


def draw_rules(n_rules: int, seed: int) -> list[Rule]:
    """`n_rules` distinct rule kinds with their parameters, drawn from the catalogue."""
    if not 1 <= n_rules <= len(RULES):
        raise ValueError(f"env_args.n_rules: must be between 1 and {len(RULES)}, got {n_rules}")
    rng = random.Random(seed)
    kinds = rng.sample(sorted(RULES), n_rules)
    return [make_rule(k, rng.choice(RULES[k]) if RULES[k] else None) for k in sorted(kinds)]


def conforming_reply(answer: str, rules: list[Rule]) -> str:
    """A reply that answers with `answer` and obeys every rule (the item's reference)."""
    params = {r.kind: r.param for r in rules}
    words = [params["start_word"]] if "start_word" in params else []
    words += [params["phrase"]] if "phrase" in params else []
    words += [answer]
    text = " ".join(words)
    if "end_marker" in params:
        text += " " + params["end_marker"]
    return text.lower() if "lowercase" in params else text


def load_tasks() -> list[dict[str, Any]]:
    data = resources.files("resd.envs").joinpath("data/house_rules_tasks.json").read_text()
    return json.loads(data)["tasks"]


@dataclass
class HouseRulesEnv(Environment):
    name = "house_rules"
    description = "Easy questions; replies must also obey hidden house rules named only in feedback"

    seed: int = 0  # the train/test split
    rules_seed: int = 0  # which rules, with which parameters
    n_rules: int = 3
    rules: list[str] | None = None  # explicit kinds (e.g. [lowercase, no_digits]) instead of a draw
    test_fraction: float = 0.2
    n_train: int | None = None
    n_test: int | None = None
    house_rules: list[Rule] = field(init=False)

    def __post_init__(self) -> None:
        self.n_train = whole_number(self.n_train, "env_args.n_train")
        self.n_test = whole_number(self.n_test, "env_args.n_test")
        if self.rules is not None and (isinstance(self.rules, str) or not self.rules):
            raise ValueError(f"env_args.rules: expected a list of one or more rule names "
                             f"(e.g. [lowercase]), got {self.rules!r}")  # fmt: skip
        if self.rules is not None:
            rng = random.Random(self.rules_seed)
            self.house_rules = [make_rule(k, rng.choice(RULES[k]) if RULES.get(k) else None)
                                for k in sorted(set(self.rules))]  # fmt: skip
        else:
            self.house_rules = draw_rules(self.n_rules, self.rules_seed)
        items = [self._item(task) for task in load_tasks()]
        self._train, self._test = split_items(items, self.test_fraction, self.seed)
        if self.n_train is not None:
            self._train = self._train[: self.n_train]
        if self.n_test is not None:
            self._test = self._test[: self.n_test]

    def _item(self, task: dict[str, Any]) -> Item:
        return Item(
            id=f"house_rules/{task['id']}",
            messages=[{"role": "user", "content": task["prompt"]}],
            meta={"accept": task["accept"]},
            reference=conforming_reply(task["accept"][0], self.house_rules),
        )

    def train_items(self) -> list[Item]:
        return self._train

    def test_items(self) -> list[Item]:
        return self._test

    def score(self, item: Item, response: str) -> Score:
        reply = response.strip()
        # "Rome's the capital" answers "Rome": a possessive or contracted 's is not part of
        # the word (no accepted answer is a pronoun, so "it's" reading as "it" costs nothing).
        tokens = _words(reply.lower())
        words = {form for w in tokens for form in (w, w.removesuffix("'s"))}
        text = " ".join(tokens)
        answered = any(
            (a in words) if " " not in a else re.search(rf"\b{re.escape(a)}\b", text)
            for a in item.meta["accept"]
        )
        broken = [rule for rule in self.house_rules if not rule.holds(reply)]
        notes = [] if answered else ["The reply does not answer the question."]
        notes += [rule.broken for rule in broken]
        checks = 1 + len(self.house_rules)
        held = int(bool(answered)) + len(self.house_rules) - len(broken)
        reward = float(bool(answered) and not broken)
        return Score(reward=reward, score=held / checks, feedback=" ".join(notes))
