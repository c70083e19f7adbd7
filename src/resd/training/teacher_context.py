"""The teacher's privileged context and the solution buffer.

The teacher is the same network as the student, shown material the student never
sees: the playbook, its own previous attempt, the environment's feedback, the
reflection and, when one exists, a successful attempt. Its next-token distributions
over the student's response then carry that knowledge into the loss.

A template is plain text with `{slot}` markers; each non-empty slot is rendered as a
titled block wrapped in a tag, empty slots render as nothing. Text inserted into a
slot is escaped so that a reply containing `</feedback>` cannot close our block early.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from resd.templating import fill, from_where, names_a_file, slots

if TYPE_CHECKING:
    from resd.envs.base import Item
    from resd.training.algorithms import Algorithm
    from resd.training.rollout import Rollout

SLOT_TITLES: dict[str, str] = {
    "prompt": "Task",
    "playbook": "Playbook of lessons from earlier tasks",
    "previous_trial": "Your previous attempt",
    "feedback": "Feedback on the previous attempt",
    "reflection": "Reflection on the previous attempt",
    "successful_trial": "A successful attempt",
}

DEFAULT_TEMPLATE = """Solve the task below. Use the material that follows it: lessons from earlier tasks, your previous attempt, what went wrong with it and, if available, an attempt that succeeded. Then write your own complete answer to the task.

{prompt}{playbook}{previous_trial}{feedback}{reflection}{successful_trial}
Now answer the task."""

_OWN_TAGS = re.compile(r"<(/?)(" + "|".join(SLOT_TITLES) + r")>", re.IGNORECASE)


def _escape(text: str) -> str:
    """Defuse our own block tags inside untrusted text (`</playbook>` -> `<\\/playbook>`)."""
    return _OWN_TAGS.sub(lambda m: f"<\\{m.group(1)}{m.group(2)}>", text)


def _block(name: str, text: str) -> str:
    text = (text or "").strip()
    if not text:
        return ""
    return f"\n## {SLOT_TITLES[name]}\n<{name}>\n{_escape(text)}\n</{name}>\n"


@dataclass
class TeacherTemplate:
    text: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        unknown = sorted(set(slots(self.text)) - set(SLOT_TITLES))
        if unknown:
            raise ValueError(
                f"teacher_template: unknown slots {unknown}; known: {sorted(SLOT_TITLES)}"
            )
        if "prompt" not in slots(self.text):
            raise ValueError("teacher_template: the template must contain the {prompt} slot")

    @classmethod
    def from_config(cls, value: str | None) -> TeacherTemplate:
        """None -> default; an existing file path -> its contents; else the literal text."""
        if not value:
            return cls()
        if names_a_file(value):
            return cls(Path(value).read_text())
        if "{" not in value:  # neither a template (it has slots) nor a file
            raise ValueError(f"teacher_template: no such file {value!r}{from_where(value)} (or "
                             "give the template itself, with its {prompt} slot)")  # fmt: skip
        return cls(value)

    def render(self, **values: str) -> str:
        blocks = {name: _block(name, values.get(name, "")) for name in SLOT_TITLES}
        return fill(self.text, blocks)


@dataclass(frozen=True)
class TeacherContext:
    """What the teacher is shown about one rollout, slot by slot ("" = the slot is empty)."""

    playbook: str = ""
    previous_trial: str = ""
    feedback: str = ""
    reflection: str = ""
    solution: str = ""
    distill: bool = False  # something here is new to the student: distil this rollout


def teacher_context(
    algo: Algorithm,
    rollout: Rollout,
    *,
    playbook: str,
    buffer: SolutionBuffer,
    peers: dict[str, str],
    rollouts_per_prompt: int = 1,
    feedback_with_solution: bool = True,
) -> TeacherContext:
    """The teacher's context for a rollout, from the algorithm's switches alone.

    The solution slot holds, in order of preference: the environment's demonstration
    (SDFT), the rollout's own success (algorithms that distil successes), the prompt's
    buffered success (RESD), a successful sibling rollout of this step (SDPO, N > 1).
    A rollout is distilled when the context holds feedback, a reflection or a solution
    (the playbook alone is not new), and never when it succeeded under an algorithm that
    does not distil successes. `peers` maps an item id to a success of this step.
    """
    solution = ""
    if algo.demonstration:
        solution = rollout.item.reference or ""
    elif rollout.success and algo.distill_successes:
        solution = rollout.response
    elif algo.solution_buffer and buffer.get(rollout.item.id):
        solution = buffer.get(rollout.item.id) or ""
    elif algo.peer_solution and rollouts_per_prompt > 1 and not rollout.success:
        solution = peers.get(rollout.item.id, "")
    feedback = rollout.score.feedback if algo.feedback else ""
    if solution and not feedback_with_solution:
        feedback = ""  # the release: a solution speaks for itself
    reflection = rollout.reflection.as_text() if rollout.reflection else ""
    distill = bool(feedback.strip() or reflection or solution) and bool(rollout.gen.token_ids)
    if rollout.success and not algo.distill_successes:
        distill = False
    return TeacherContext(
        playbook=playbook if algo.playbook else "",
        previous_trial=rollout.response if algo.previous_trial else "",
        feedback=feedback,
        reflection=reflection,
        solution=solution,
        distill=distill,
    )


def teacher_chat(item: Item, teacher_prompt: str) -> list[dict[str, str]]:
    """The teacher's chat: the turns the student read before the task's last user message
    (a system message; in a longer conversation, a tool's call and result), then the
    teacher's prompt in that message's place."""
    return [*item.history, {"role": "user", "content": teacher_prompt}]


@dataclass
class SolutionBuffer:
    """A successful response per prompt, keyed by item id, for the teacher of later tries.

    `keep="first"` keeps the first success for good (the paper: "a success per prompt");
    `keep="latest"` replaces it with each new one, as the release does, so the teacher
    sees the policy's most recent way of solving the prompt.
    """

    solutions: dict[str, str] = field(default_factory=dict)
    keep: str = "first"

    def __post_init__(self) -> None:
        if self.keep not in ("first", "latest"):
            raise ValueError(f"solution_buffer_keep: expected first or latest, got {self.keep!r}")

    def add(self, key: str, response: str) -> bool:
        if not response.strip() or (self.keep == "first" and key in self.solutions):
            return False
        self.solutions[key] = response
        return True

    def get(self, key: str) -> str | None:
        return self.solutions.get(key)

    def __len__(self) -> int:
        return len(self.solutions)
