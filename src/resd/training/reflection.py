"""Reflection, success tagging and curation: the student model studying its own work.

Three prompts, all answered by the *current student* (not the EMA teacher):

- REFLECT a failed attempt: what went wrong, why, what would work, one reusable
  insight, and a verdict on each playbook entry it relied on;
- TAG a successful attempt: which playbook entries helped;
- CURATE: turn a reflection into playbook operations.

Prompts are templates with literal `{slot}` filling (see `templating.fill`), so text
from the model or the environment can never re-enter a template. Parsers return
`None` on failure; the trainer counts those and moves on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from resd.templating import fill
from resd.training.parsing import (
    extract_bullet_tags,
    extract_json_object,
    extract_json_objects_anywhere,
    extract_loose_fields,
)
from resd.training.playbook import OPERATION_TYPES

REFLECTION_PROMPT = """You are reviewing an attempt at a task that did not fully succeed. Diagnose it so the lesson can be reused on other tasks.

## Task
{task}

## The attempt
{response}

## What the checker reported
{feedback}

## Current playbook of lessons
{playbook}

Answer with one JSON object and nothing else, with these keys (one or two short sentences each):
- "reasoning": your analysis of the attempt;
- "error_identification": what exactly went wrong;
- "root_cause_analysis": why it went wrong (which idea was missing or wrong);
- "correct_approach": what should have been done instead;
- "key_insight": one general lesson that would help on similar tasks;
- "bullet_tags": a list of {"id": "<entry id>", "tag": "helpful" | "harmful" | "neutral"} for playbook entries that bear on this attempt (an empty list if none).
"""

# `reflection_layout: conversation`: the attempt is the assistant's turn of the rollout's
# own conversation, and this user turn follows it (the same questions and JSON keys).
REFLECTION_FOLLOWUP = """Your reply above did not fully succeed. Diagnose it so the lesson can be reused on other tasks.

## What the checker reported
{feedback}

## Current playbook of lessons
{playbook}

""" + REFLECTION_PROMPT[REFLECTION_PROMPT.index("Answer with one JSON object") :]

SUCCESS_TAG_PROMPT = """The attempt below solved its task. Decide which playbook lessons it agrees with.

## Task
{task}

## The successful attempt
{response}

## Playbook
{playbook}

Answer with one JSON object and nothing else: {"bullet_tags": [{"id": "<entry id>", "tag": "helpful" | "harmful" | "neutral"}]}. Tag only entries that bear on this attempt.
"""

CURATION_PROMPT = """You maintain a playbook of short, reusable lessons for solving tasks of this kind. A reflection on a recent attempt is below. Decide how to change the playbook.

Important: when the playbook is used, no checker feedback and no answers will be available. Write general lessons that transfer to other tasks, never the answer to this one task.

## Playbook statistics
{stats}

## Reflection on a recent attempt
{reflection}

## Current playbook
{playbook}

## The task the reflection is about
{task}

Answer with one JSON object and nothing else:
{"reasoning": "...", "operations": [ ... ]}
where each operation is{operation_shapes}
Sections: Strategies & Insights, Formulas & Calculations, Code Snippets & Templates, Common Mistakes to Avoid, Problem-Solving Heuristics, Context Clues & Indicators, Others. Do not add a lesson the playbook already has. Use an empty list if nothing should change.
"""

OPERATION_SHAPES = {
    "ADD": '{"type": "ADD", "section": "<section name>", "content": "<a one-sentence lesson>"}',
    "UPDATE": '{"type": "UPDATE", "id": "<entry id>", "content": "<improved lesson>"}',
    "MERGE": '{"type": "MERGE", "ids": ["<id>", "<id>"], "content": "<combined lesson>"}',
    "DELETE": '{"type": "DELETE", "id": "<entry id>"}',
}

_REFLECTION_FIELDS = (
    ("error_identification", "Error"),
    ("root_cause_analysis", "Root cause"),
    ("correct_approach", "Correct approach"),
    ("key_insight", "Key insight"),
)


@dataclass
class Reflection:
    fields: dict[str, str]
    bullet_tags: list[tuple[str, str]] = field(default_factory=list)
    loose: bool = False  # read by the line-level fallback, not as a JSON object

    @classmethod
    def raw(cls, text: str) -> Reflection:
        """A reply that did not parse, passed on as it is (the release's hand-off)."""
        return cls({"raw": " ".join(text.split())}, loose=True)

    def as_text(self) -> str:
        """The reflection as the teacher and the curator read it."""
        if "raw" in self.fields:
            return self.fields["raw"]
        return "\n".join(
            f"{label}: {self.fields[key]}"
            for key, label in _REFLECTION_FIELDS
            if self.fields.get(key)
        )


SUCCESS_TAG_FOLLOWUP = """Your reply above solved the task. Decide which playbook lessons it agrees with.

## Playbook
{playbook}

""" + SUCCESS_TAG_PROMPT[SUCCESS_TAG_PROMPT.index("Answer with one JSON object") :]


def _slot(text: str) -> str:
    """Empty slots say so. Slots arrive clipped to the run's `slot_max_tokens`."""
    return text.strip() if text and text.strip() else "(none)"


# The single-call mode (`lesson_calls: one`): the reflector also curates, in the same reply.
REFLECTION_OPERATIONS = """- "operations": how to change the playbook in light of this diagnosis, a list where each operation is{operation_shapes}
Sections: Strategies & Insights, Formulas & Calculations, Code Snippets & Templates, Common Mistakes to Avoid, Problem-Solving Heuristics, Context Clues & Indicators, Others. Write general lessons that transfer to other tasks (no checker feedback and no answers will be available when the playbook is used), never the answer to this one task, and none the playbook already has. Use an empty list if nothing should change.
"""


def _operation_text(operations: tuple[str, ...]) -> str:
    return (" one of\n" if len(operations) > 1 else ":\n") + "\n".join(
        OPERATION_SHAPES[op] for op in operations
    )


def _asking_for(text: str, operations: tuple[str, ...] | None) -> str:
    """A reflector's request, which in the single-call mode also asks for operations."""
    if not operations:
        return text
    extra = fill(REFLECTION_OPERATIONS, {"operation_shapes": _operation_text(operations)},
                 strict=False)  # fmt: skip
    return text.rstrip("\n") + "\n" + extra


def _continued(
    task_messages: list[dict[str, str]], response: str, request: str
) -> list[dict[str, str]]:
    """The rollout's conversation, its attempt as the assistant's turn, then `request`."""
    return [*task_messages, {"role": "assistant", "content": response},
            {"role": "user", "content": request}]  # fmt: skip


def reflection_messages(
    task: str,
    response: str,
    feedback: str,
    playbook: str,
    operations: tuple[str, ...] | None = None,
) -> list[dict[str, str]]:
    """The reflector's prompt; with `operations`, it also asks for playbook operations
    (the single-call mode, which saves the curator's generation pass)."""
    values = {
        "task": _slot(task),
        "response": _slot(response),
        "feedback": _slot(feedback),
        "playbook": _slot(playbook),
    }
    text = _asking_for(fill(REFLECTION_PROMPT, values, strict=False), operations)
    return [{"role": "user", "content": text}]


def reflection_followup(
    task_messages: list[dict[str, str]],
    response: str,
    feedback: str,
    playbook: str,
    operations: tuple[str, ...] | None = None,
) -> list[dict[str, str]]:
    """The reflector's prompt in the conversation layout: the rollout's messages, the
    attempt as the assistant's turn, then the request (`reflection_messages`' questions)."""
    values = {"feedback": _slot(feedback), "playbook": _slot(playbook)}
    text = _asking_for(fill(REFLECTION_FOLLOWUP, values, strict=False), operations)
    return _continued(task_messages, response, text)


def success_tag_messages(task: str, response: str, playbook: str) -> list[dict[str, str]]:
    values = {"task": _slot(task), "response": _slot(response), "playbook": _slot(playbook)}
    return [{"role": "user", "content": (fill(SUCCESS_TAG_PROMPT, values, strict=False))}]


def success_tag_followup(
    task_messages: list[dict[str, str]], response: str, playbook: str
) -> list[dict[str, str]]:
    """Success tagging in the conversation layout (see `reflection_followup`)."""
    text = fill(SUCCESS_TAG_FOLLOWUP, {"playbook": _slot(playbook)}, strict=False)
    return _continued(task_messages, response, text)


def curation_messages(
    stats: dict[str, int],
    reflection: str,
    playbook: str,
    task: str,
    operations: tuple[str, ...] = OPERATION_TYPES,
) -> list[dict[str, str]]:
    """The curator's prompt; it describes only the operation types in `operations`."""
    stats_text = (
        f"total entries: {stats['total']}; high-performing (helpful > 5, harmful < 2): "
        f"{stats['high_performing']}; problematic (harmful >= helpful, harmful > 0): "
        f"{stats['problematic']}; never tagged: {stats['unused']}"
    )
    values = {
        "stats": stats_text,
        "reflection": _slot(reflection),
        "playbook": _slot(playbook),
        "task": _slot(task),
        "operation_shapes": _operation_text(operations),
    }
    return [{"role": "user", "content": (fill(CURATION_PROMPT, values, strict=False))}]


def parse_reflection(reply: str) -> Reflection | None:
    """A Reflection if the reply holds at least one diagnostic field, else None.

    A JSON object is preferred; failing that, `"key": "value"` lines are read one by
    one (flagged `loose`), since small models get the keys right more often than the
    commas.
    """
    keys = tuple(k for k, _ in _REFLECTION_FIELDS)
    obj = extract_json_object(reply)
    loose = obj is None or not any(obj.get(k) for k in keys)
    if loose:
        obj = extract_loose_fields(reply, (*keys, "reasoning"))
    fields = {key: " ".join(str(obj[key]).split()) for key in keys if obj.get(key)}
    if not fields:
        return None
    if obj.get("reasoning"):
        fields["reasoning"] = " ".join(str(obj["reasoning"]).split())
    return Reflection(fields, extract_bullet_tags(None if loose else obj, reply), loose=loose)


def parse_tags(reply: str) -> list[tuple[str, str]] | None:
    """Bullet tags from a success-tagging reply; None if nothing could be read."""
    obj = extract_json_object(reply)
    tags = extract_bullet_tags(obj, reply)
    if obj is None and not tags:
        return None
    return tags


def parse_operations(reply: str) -> list[dict[str, Any]] | None:
    """The curator's operation list; None if the reply holds no usable operation.

    When the whole reply does not parse (a garbled or truncated tail is common), the
    well-formed operation objects inside it are salvaged one by one.
    """
    obj = extract_json_object(reply)
    ops = obj.get("operations") if obj is not None else None
    if isinstance(ops, dict):
        ops = [ops]
    if isinstance(ops, list):
        return [op for op in ops if isinstance(op, dict)]
    salvaged = [
        o
        for o in extract_json_objects_anywhere(reply)
        if str(o.get("type", "")).upper() in OPERATION_TYPES
    ]
    return salvaged or None
