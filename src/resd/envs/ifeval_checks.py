"""Checking IFEval instructions: the entry points the environment and the tests use.

IFEval (Zhou et al., 2023) scores a response against a list of instruction ids, each
with keyword arguments. This module validates and normalises those arguments (records in
the wild pad them with None, store them as JSON strings, or use pandas types), runs the
verifier of each instruction (`resd.envs.ifeval_verifiers`), strictly or with the
benchmark's loose relaxations, and returns one `InstructionResult` per instruction whose
message says what was measured, for feedback. Sentence splitting and language
identification (`resd.envs.ifeval_text`) are re-exported here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from resd.envs.ifeval_text import (
    LANGUAGE_NAMES,
    count_sentences,
    detect_language,
    split_sentences,
)
from resd.envs.ifeval_verifiers import RELATIONS, SPECS, Kwargs, Spec, quoted

__all__ = [
    "INSTRUCTION_IDS",
    "LANGUAGE_NAMES",
    "InstructionResult",
    "check_instruction",
    "clean_kwargs",
    "count_sentences",
    "describe_instruction",
    "detect_language",
    "evaluate_instructions",
    "explain_instruction",
    "loose_variants",
    "split_sentences",
]


class InstructionResult(NamedTuple):
    """One instruction's verdict; `message` is the measured fact, phrased for feedback."""

    instruction_id: str
    ok: bool
    message: str


INSTRUCTION_IDS: tuple[str, ...] = tuple(SPECS)

# How `_normalise` coerces keyword arguments that records store loosely (floats from
# pandas, a single word instead of a list, relations in odd case or spacing).
_INT_KEYS = frozenset(
    {
        "frequency",
        "let_frequency",
        "num_sentences",
        "num_paragraphs",
        "num_words",
        "nth_paragraph",
        "num_placeholders",
        "num_bullets",
        "num_highlights",
        "num_sections",
        "capital_frequency",
    }
)
_LIST_KEYS = frozenset({"keywords", "forbidden_words"})
_RELATION_KEYS = ("relation", "let_relation", "capital_relation")


# ------------------------------------------------------------------------ public API


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def clean_kwargs(kwargs: Mapping[str, Any] | str | None) -> Kwargs:
    """Normalise one instruction's kwargs as stored in the wild.

    IFEval records pad every kwargs dict with all possible keys set to None (and pandas
    turns those into NaN); some exports store the dict as a JSON string. Missing values
    are dropped, counts become ints, array-likes become lists.
    """
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs.strip() else {}
        if kwargs is None:
            return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"instruction kwargs must be a mapping, got {type(kwargs).__name__}")
    out: Kwargs = {}
    for key, value in kwargs.items():
        if hasattr(value, "tolist"):  # numpy arrays and scalars from pandas
            value = value.tolist()
        if _is_missing(value):
            continue
        out[str(key)] = value
    return out


def _spec(instruction_id: str) -> Spec:
    spec = SPECS.get(instruction_id)
    if spec is None:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    return spec


def _normalise(instruction_id: str, kwargs: Mapping[str, Any] | str | None, prompt: str) -> Kwargs:
    """Validate the id and kwargs up front, so bad data fails loudly and names the culprit."""
    spec = _spec(instruction_id)
    kw = clean_kwargs(kwargs)
    if instruction_id == "combination:repeat_prompt" and "prompt_to_repeat" not in kw and prompt:
        kw["prompt_to_repeat"] = prompt
    missing = [key for key in spec.required if key not in kw]
    if missing:
        raise ValueError(f"{instruction_id}: missing keyword argument(s) {quoted(missing)}")
    for key in _INT_KEYS.intersection(kw):
        try:
            kw[key] = int(kw[key])
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"{instruction_id}: {key} must be an integer, got {kw[key]!r}"
            ) from exc
    for key in _LIST_KEYS.intersection(kw):
        value = kw[key]
        kw[key] = [value] if isinstance(value, str) else [str(word) for word in value]
    for key in _RELATION_KEYS:
        if key in kw:
            relation = " ".join(str(kw[key]).lower().split())
            if relation not in RELATIONS:
                raise ValueError(
                    f"{instruction_id}: {key} must be one of {quoted(RELATIONS)}, got {kw[key]!r}"
                )
            kw[key] = relation
    return kw


def describe_instruction(instruction_id: str, kwargs: Mapping[str, Any] | str | None = None) -> str:
    """A short statement of what the instruction demands, for feedback lines."""
    return _spec(instruction_id).describe(_normalise(instruction_id, kwargs, ""))


def loose_variants(response: str) -> list[tuple[str, str]]:
    """The benchmark's loose relaxations, each labelled for feedback.

    Loose scoring forgives an intro line ("Sure, here is..."), an outro line and markdown
    emphasis, because those are chat habits rather than failures to follow the request.
    """
    lines = response.split("\n")
    cut = {
        "the first line removed": "\n".join(lines[1:]).strip(),
        "the last line removed": "\n".join(lines[:-1]).strip(),
        "the first and last lines removed": "\n".join(lines[1:-1]).strip(),
    }
    variants = [("", response), ("'*' removed", response.replace("*", ""))]
    variants += list(cut.items())
    variants += [(f"{label} and '*' removed", text.replace("*", "")) for label, text in cut.items()]
    return variants


def explain_instruction(
    instruction_id: str,
    kwargs: Mapping[str, Any] | str | None,
    response: str,
    prompt: str = "",
    strict: bool = True,
) -> InstructionResult:
    """Check one instruction and say what was measured.

    In loose mode the response passes if any relaxation passes; the message then names
    the relaxation that was needed, and on failure it reports the unrelaxed response.
    """
    kw = _normalise(instruction_id, kwargs, prompt)
    check = SPECS[instruction_id].check
    if not response.strip():
        return InstructionResult(instruction_id, False, "the response is empty")
    ok, message = check(response, kw)
    if ok or strict:
        return InstructionResult(instruction_id, ok, message)
    for label, variant in loose_variants(response)[1:]:
        if variant.strip():
            variant_ok, variant_message = check(variant, kw)
            if variant_ok:
                return InstructionResult(instruction_id, True, f"{variant_message} (with {label})")
    return InstructionResult(instruction_id, False, message)


def check_instruction(
    instruction_id: str,
    kwargs: Mapping[str, Any] | str | None,
    response: str,
    prompt: str = "",
    strict: bool = True,
) -> bool:
    """True iff `response` follows the instruction (strict or loose IFEval semantics)."""
    return explain_instruction(instruction_id, kwargs, response, prompt, strict).ok


def evaluate_instructions(
    instruction_ids: Iterable[str],
    kwargs_list: Iterable[Mapping[str, Any] | str | None] | None,
    response: str,
    prompt: str = "",
    strict: bool = True,
) -> list[InstructionResult]:
    """Check every instruction of one IFEval record; kwargs pair with ids by position."""
    ids = list(instruction_ids)
    kwargs_seq = list(kwargs_list) if kwargs_list is not None else []
    if kwargs_seq and len(kwargs_seq) != len(ids):
        raise ValueError(f"{len(ids)} instruction ids but {len(kwargs_seq)} kwargs entries")
    kwargs_seq = kwargs_seq or [None] * len(ids)
    return [
        explain_instruction(iid, kw, response, prompt, strict)
        for iid, kw in zip(ids, kwargs_seq, strict=True)
    ]
