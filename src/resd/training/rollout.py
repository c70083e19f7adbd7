"""One rollout and what a step learns about it, in named fields.

A `Rollout` is created when its response is sampled and scored, and collects everything
the rest of the step decides about it: the reflection, the teacher's prompt, whether it
is distilled, its loss weight and advantage, its per-token losses. Batch-level results
travel as `Outcome`s (one per rollout of the *global* batch, in global order), so every
process computes the same batch statistics.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from resd.envs.base import SUCCESS_REWARD, Item, Score
from resd.generation.base import Generation
from resd.rundir import PHASES
from resd.templating import strip_thinking
from resd.training.reflection import Reflection


@dataclass
class Rollout:
    item: Item
    prompt_ids: list[int]
    gen: Generation
    score: Score
    index: int = 0  # position in the step's global rollout list (across processes)
    reflection: Reflection | None = None
    reflection_reply: str = ""
    curation_reply: str = ""
    teacher_prompt: str = ""
    teacher_ids: list[int] = field(default_factory=list)
    distill: bool = False  # the teacher's context holds something new: self-distil this row
    # Set by the update: which loss terms cover this row, its success-rate weight and its
    # group-normalised advantage.
    sd_row: bool = False
    pg_row: bool = False
    weight: float = 1.0
    advantage: float = 0.0
    token_losses: list[float] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.score.success

    @property
    def response(self) -> str:
        """The answer without its reasoning: what reflection prompts and contexts show."""
        return strip_thinking(self.gen.text)

    def outcome(self) -> Outcome:
        return Outcome(self.item.id, self.score.reward, self.score.score,
                       tuple(self.score.parts.items()))  # fmt: skip


@dataclass(frozen=True)
class GivenRollout:
    """A reply sampled elsewhere, with its score: served traffic (`resd serve --learn`)
    that a learner step trains on instead of sampling its own rollouts. `gen.logprobs`
    are the serving model's, so rollout correction weighs the reply against the policy."""

    item: Item
    prompt_ids: list[int]
    gen: Generation
    score: Score


class Outcome(NamedTuple):
    """What the batch needs to know of one rollout, on every process."""

    item_id: str
    reward: float
    score: float
    parts: tuple[tuple[str, float], ...] = ()  # each reward function's score (`Score.parts`)

    @property
    def success(self) -> bool:
        return self.reward >= SUCCESS_REWARD


class RowStats(NamedTuple):
    distilled: bool
    tokens: int
    finished: bool


def padding_rollout(pad_id: int | None) -> Rollout:
    """A one-token row that every loss masks out, for a process with fewer micro-batches
    (forward and backward are collective under sharding)."""
    pad = pad_id if pad_id is not None else 0
    return Rollout(
        item=Item(id="<padding>", messages=[]), prompt_ids=[pad], gen=Generation([pad], "", False),
        score=Score(0.0, 0.0, ""), index=-1, teacher_ids=[pad], weight=0.0,
    )  # fmt: skip


def row_seed(run_seed: int, step: int, phase: str, index: int) -> int:
    """A seed per (run seed, step, phase, global rollout index): sampling is batch-invariant,
    so a resumed or multi-process run draws exactly what a one-process run draws."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{phase}/{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class PhaseTimer:
    """Seconds per phase of a step (`time_<phase>` in metrics.jsonl)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start
