"""The environment protocol: what a task must provide for RESD to learn from it.

An environment hands out *items* (a chat prompt plus whatever the verifier needs) and
turns a model response into a `Score`: a sparse success bit, a partial credit and a
feedback text. The feedback text is the whole point of RESD: it is what the teacher
and the reflector read, so environments should say *what* went wrong, with the
measured facts, not just that something did.
"""

from __future__ import annotations

import math
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Where a dataset's reference answers come from, for messages about their absence.
REFERENCES_FROM = "a dataset's come from env_args.reference_column: a column of correct responses"


@dataclass
class Item:
    """One prompt. `messages` is what the student sees; `meta` is for the verifier only."""

    id: str
    messages: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    # A reference answer, if the task has one: used by SDFT as the demonstration and by
    # `resd env-check` to prove the verifier accepts a correct answer.
    reference: str | None = None
    # The literal final answer, where the task has a short one (a number, a name). A
    # playbook lesson that contains it is a leak, not a lesson, and is skipped.
    answer: str | None = None

    def __post_init__(self) -> None:
        # A number is text here: an id keys the solution buffer, which a checkpoint keeps in
        # JSON (an int key came back a string, and the resumed run's lookups missed), and a
        # reference or answer goes into a chat as text.
        if isinstance(self.id, int) and not isinstance(self.id, bool):
            self.id = str(self.id)
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Item: id must be a non-empty string, got {self.id!r}")
        for name in ("reference", "answer"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                setattr(self, name, str(value))
        # A bare prompt is one user turn, as TRL's "prompt" column may be; anything else
        # must be a chat, or the chat template fails far from the environment that made it.
        if isinstance(self.messages, str):
            self.messages = [{"role": "user", "content": self.messages}]
        if not isinstance(self.messages, (list, tuple)):
            raise ValueError(f"Item {self.id!r}: messages must be a list of chat messages "
                             f"({{'role': 'user', 'content': ...}}) or a prompt string, got "
                             f"{type(self.messages).__name__}")  # fmt: skip
        for i, message in enumerate(self.messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"Item {self.id!r}: message {i} is not a chat message "
                                 f"({{'role': ..., 'content': ...}}): {message!r:.80}")  # fmt: skip
            # the chat template wrote None as the word "None", and a list of parts failed
            # inside the tokenizer, both far from the environment that made the message
            if not isinstance(message.get("content"), str):
                raise ValueError(f"Item {self.id!r}: message {i}'s content must be text, got "
                                 f"{type(message.get('content')).__name__} "
                                 f"({message.get('content')!r:.60})")  # fmt: skip
        for name in ("reference", "answer"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"Item {self.id!r}: {name} must be text or None, got "
                                 f"{type(value).__name__} ({value!r:.60})")  # fmt: skip

    @property
    def prompt_text(self) -> str:
        """The user-visible task text (last user message), used in reflection prompts."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else ""

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages before the last user message: a system message, and in a longer
        conversation (a served chat, a tool's call and result) its earlier turns. The
        teacher's context keeps them, with its prompt in place of that last message."""
        users = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        return self.messages[: users[-1]] if users else list(self.messages)


def listed_items(env: Environment, split: str) -> list[Item]:
    """What `env.train_items()` or `env.test_items()` returned, as a list, refused in the
    environment's own terms when it is not a collection of `Item`s with a prompt each:
    returning None failed as "'NoneType' object is not iterable", a list of prompt strings
    as "'str' object has no attribute 'id'", and an item with no messages inside the
    tokenizer's chat template."""
    method = f"env: {type(env).__name__}.{'train' if split == 'training' else split}_items()"
    returned = env.train_items() if split == "training" else env.test_items()
    if returned is None or isinstance(returned, (str, bytes, dict)):
        raise ValueError(f"{method} returned {type(returned).__name__}, not a list of "
                         "resd.Item")  # fmt: skip
    try:
        items = list(returned)
    except TypeError:
        raise ValueError(f"{method} returned {type(returned).__name__}, not a list of "
                         "resd.Item") from None  # fmt: skip
    for i, item in enumerate(items):
        if not isinstance(item, Item):
            raise ValueError(f"{method}: item {i} is {type(item).__name__} ({item!r:.60}), not "
                             "a resd.Item(id=..., messages=[{'role': 'user', 'content': ...}])")  # fmt: skip
        if not item.messages:
            raise ValueError(f"{method}: item {item.id!r} has no messages: give it the prompt "
                             "as messages=[{'role': 'user', 'content': ...}]")  # fmt: skip
    return items


def check_item_ids(items: list[Item], split: str) -> None:
    """Refuse one id on two different items: the solution buffer, the logs, resumption and
    per-item evaluation know an item by its id. The same item listed again (a task
    repeated in the stream) is fine."""
    seen: dict[str, Item] = {}
    for item in items:
        first = seen.setdefault(item.id, item)
        if first is not item and first != item:
            raise ValueError(f"env: {split} item id {item.id!r} names two different items "
                             f"(prompts {first.prompt_text[:40]!r} and "
                             f"{item.prompt_text[:40]!r}); ids must be unique")  # fmt: skip


def checked_test_items(env: Environment) -> list[Item]:
    """The environment's test items, refused when two different ones share an id: per-item
    evaluation is keyed by it."""
    items = listed_items(env, "test")
    check_item_ids(items, "test")
    return items


# A reply succeeds when its reward is at least this. Environments give 0 or 1; a reward
# in between (a served reply's feedback, a user scorer's number) counts the same
# everywhere: the solution buffer, the teacher's context, success weighting, the report.
SUCCESS_REWARD = 0.5


class NotAScoreError(TypeError):
    """An environment's `score` returned something other than a `Score` (a float, a tuple),
    or one whose feedback is not text: its bug on every reply, which stops a run with what
    to return instead."""


@dataclass
class Score:
    reward: float  # 1.0 iff the response fully solves the item, else 0.0
    score: float  # partial credit in [0, 1] (e.g. fraction of tests passed)
    feedback: str  # rich text for the teacher and the reflector; "" when nothing to say
    # Where several reward functions make this score (a dataset's list of them): each
    # one's score by its name, logged per step as `rewards/<name>` as TRL logs them.
    parts: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reward = float(self.reward)
        # clamping made nan 0.0; an infinite reward made GRPO's advantages nan
        if not (math.isfinite(self.reward) and math.isfinite(float(self.score))):
            raise ValueError(
                f"Score: reward and score must be finite numbers, got {self.reward}, {self.score}"
            )
        self.score = min(1.0, max(0.0, float(self.score)))
        if not isinstance(self.parts, dict):
            raise ValueError(f"Score: parts must map each reward function's name to its "
                             f"score, got {type(self.parts).__name__}")  # fmt: skip
        for name, value in self.parts.items():  # averaged per step, where text failed
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"Score: parts[{name!r}] must be a finite number, got {value!r:.40}"
                )

    @property
    def success(self) -> bool:
        return self.reward >= SUCCESS_REWARD


class Environment(ABC):
    """Subclass this (about 20 lines) to train on your own task.

    Items must be deterministic for a given constructor seed so that runs are
    reproducible and resumable: the trainer stores only a cursor into `train_items()`.
    """

    name: ClassVar[str] = "custom"
    description: ClassVar[str] = ""

    @abstractmethod
    def train_items(self) -> list[Item]: ...

    @abstractmethod
    def test_items(self) -> list[Item]: ...

    @abstractmethod
    def score(self, item: Item, response: str) -> Score: ...


def whole_number(value: Any, field: str, *, negative_ok: bool = False) -> int | None:
    """An environment's whole-number setting (None stays None; "3" and 2.0 are 3 and 2),
    or a ValueError naming it: 2.7 is refused, not cut to 2, and so is a negative count,
    which would silently slice items off the end of a split."""
    if value is None:
        return None
    number: Any = value
    if (isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+\s*", value)) or (
        isinstance(value, float) and value.is_integer()
    ):
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"{field}: expected a whole number, got {value!r}")
    if number < 0 and not negative_ok:
        raise ValueError(f"{field}: expected a whole number >= 0, got {number}")
    return number


def real_number(value: Any, field: str, *, negative_ok: bool = True) -> float:
    """An environment's numeric setting as a finite float, or a ValueError naming it (not
    a bare float() error); with `negative_ok=False`, also one below 0 (a tolerance, a time
    limit)."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"{field}: expected a finite number, got {value!r}")
    if number < 0 and not negative_ok:
        raise ValueError(f"{field}: expected a number >= 0, got {number:g}")
    return number


def split_items(
    items: list[Item], test_fraction: float, seed: int
) -> tuple[list[Item], list[Item]]:
    """Deterministic shuffled train/test split, shared by generator-based environments."""
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not 0 <= test_fraction <= 1
    ):
        raise ValueError(
            f"env_args.test_fraction: expected a number in [0, 1], got {test_fraction!r}"
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(len(items) * test_fraction)) if items else 0
    test = [items[i] for i in order[:n_test]]
    train = [items[i] for i in order[n_test:]]
    return train, test
