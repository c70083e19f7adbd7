"""JSON schemas for the lesson replies: reflection, success tagging and curation.

Pure functions of (the playbook's visible ids, the reply's token budget), torch-free and
unit-tested; `structured.py` compiles them into a grammar, and the vLLM backend hands them
to vLLM's own structured outputs. Under such a schema every reply is valid JSON of the
right shape by construction:

- playbook ids come from an enum of the live entries, so tags and UPDATE / MERGE /
  DELETE targets always name real entries;
- sections come from an enum of the seven headings;
- each operation type has its own object shape (an ADD has a section and content, a
  DELETE only an id);
- strings carry `maxLength` and arrays `maxItems`, sized from the reply's token budget
  so that the object can close before the budget ends.

Sizing counts the fixed structure (keys, quotes, ids) with the run's tokenizer when one
is given and free text at `CHARS_PER_TOKEN`; `budget.py` says why the transformers
backend budgets free text in tokens instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from resd.training.playbook import OPERATION_TYPES, SECTIONS, TAGS

SEPARATORS = (",", ":")  # compact JSON: no token is spent on whitespace

# Sizing. Free text in English runs at about 4 characters per BPE token; 3 leaves a
# margin for digits, code and non-English text. The fixed structure (keys, quotes,
# ids) is measured with the run's tokenizer when one is given, else estimated.
CHARS_PER_TOKEN = 3.0
STRUCTURE_CHARS_PER_TOKEN = 2.0
SAFETY_TOKENS = 8  # the end-of-sequence token, and slack for tokens that span a boundary
MIN_STRING_CHARS = 24
MAX_TAGS = 4  # bullet tags per reply
MAX_OPERATIONS = 3  # curator operations per reply
MAX_LESSON_CHARS = 300
# A lesson shorter than this is usually cut mid-sentence by its maxLength ("Add an 'else'
# statement to reject the input tapes unless it contains"): when the budget cannot give
# every operation this much, fewer operations are allowed per reply, not shorter ones.
MIN_LESSON_CHARS = 120

REFLECTION_WEIGHTS = {
    "reasoning": 2.0,
    "error_identification": 1.0,
    "root_cause_analysis": 1.0,
    "correct_approach": 1.0,
    "key_insight": 1.5,
}

CountTokens = Callable[[str], int]


def _estimate_tokens(text: str) -> int:
    return int(len(text) / STRUCTURE_CHARS_PER_TOKEN) + 1


def _spare_chars(skeleton: dict[str, Any], budget: int, count_tokens: CountTokens | None) -> float:
    """Characters of free text that fit in `budget` tokens beside the skeleton's structure."""
    text = json.dumps(skeleton, separators=SEPARATORS)
    structure = (count_tokens or _estimate_tokens)(text)
    return max(0, budget - structure - SAFETY_TOKENS) * CHARS_PER_TOKEN


def _split(chars: float, weights: dict[str, float], cap: int | None = None) -> dict[str, int]:
    total = sum(weights.values())
    sizes = {k: max(MIN_STRING_CHARS, int(chars * w / total)) for k, w in weights.items()}
    return {k: min(v, cap) for k, v in sizes.items()} if cap else sizes


def _string(max_chars: int) -> dict[str, Any]:
    """1 to `max_chars` characters.

    A bounded-repetition pattern (`[^"]{1,200}`) would also keep out escapes and control
    characters, but xgrammar cannot precompute its token masks: 50 ms per token on a
    150k vocabulary against 0.07 ms for `maxLength`. Lessons are flattened to one line
    when they enter the playbook anyway.
    """
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def string_limit(schema: dict[str, Any]) -> int:
    """The most characters a string schema built here allows."""
    return int(schema["maxLength"])


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """Every property required, in this order, and nothing else."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _tags_array(entry_ids: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The bullet-tags array schema, and its longest instance (for sizing)."""
    n = min(len(entry_ids), MAX_TAGS)
    if n == 0:  # an empty enum is not valid JSON Schema; the array must then stay empty
        return {"type": "array", "maxItems": 0, "items": {"type": "object"}}, []
    item = _object({"id": {"enum": list(entry_ids)}, "tag": {"enum": list(TAGS)}})
    longest = max(entry_ids, key=len)
    return {"type": "array", "maxItems": n, "items": item}, [{"id": longest, "tag": "helpful"}] * n


def reflection_schema(
    entry_ids: Sequence[str],
    max_new_tokens: int,
    count_tokens: CountTokens | None = None,
    *,
    operations: Sequence[str] | None = None,
    min_operations: int = 0,
) -> dict[str, Any]:
    """REFLECT: the diagnosis fields in the release's order, then bullet tags on visible
    ids; with `operations` (the single-call mode) then the curator's operation list too,
    the budget shared between the diagnosis and the lessons."""
    tags, longest_tags = _tags_array(entry_ids)
    skeleton: dict[str, Any] = {
        **dict.fromkeys(REFLECTION_WEIGHTS, ""),
        "bullet_tags": longest_tags,
    }
    budget = (max_new_tokens, count_tokens)
    if not operations:
        sizes = _split(_spare_chars(skeleton, *budget), REFLECTION_WEIGHTS)
        return _object({k: _string(sizes[k]) for k in REFLECTION_WEIGHTS} | {"bullet_tags": tags})
    n, sizes = _operation_count(skeleton, REFLECTION_WEIGHTS, entry_ids, budget, min_operations)
    properties = {k: _string(sizes[k]) for k in REFLECTION_WEIGHTS} | {"bullet_tags": tags}
    properties["operations"] = _operations_array(
        entry_ids, operations, min(sizes["op0"], MAX_LESSON_CHARS), min_operations, n
    )
    return _object(properties)


def _operation_count(
    skeleton: dict[str, Any],
    weights: dict[str, float],
    entry_ids: Sequence[str],
    budget: tuple[int, CountTokens | None],
    min_operations: int,
) -> tuple[int, dict[str, int]]:
    """How many operations a reply may hold, and the string sizes that go with it: the
    most (up to `MAX_OPERATIONS`) for which every lesson gets `MIN_LESSON_CHARS`, never
    fewer than one or than `min_operations` asks for."""
    floor = max(1, min(min_operations, MAX_OPERATIONS))
    for n in range(MAX_OPERATIONS, floor - 1, -1):
        sized = {**skeleton, "operations": [_widest_operation(entry_ids)] * n}
        sizes = _split(
            _spare_chars(sized, *budget), {**weights, **{f"op{i}": 1.0 for i in range(n)}}
        )
        if sizes["op0"] >= MIN_LESSON_CHARS:
            break
    return n, sizes


def _widest_operation(entry_ids: Sequence[str]) -> dict[str, Any]:
    """The operation whose JSON structure is longest (for sizing the free text)."""
    heading = max(SECTIONS.values(), key=len)
    longest_id = max(entry_ids, key=len) if entry_ids else ""
    shapes = [{"type": "ADD", "section": heading, "content": ""}]
    if entry_ids:
        shapes.append({"type": "UPDATE", "id": longest_id, "content": ""})
    if len(entry_ids) > 1:
        shapes.append({"type": "MERGE", "ids": [longest_id] * 2, "content": ""})
    # which one depends on the ids: a MERGE of ids under 12 characters is narrower than
    # an ADD (whose heading is 26), an UPDATE of an id over 28 characters wider
    return max(shapes, key=lambda op: len(json.dumps(op, separators=SEPARATORS)))


def _operations_array(
    entry_ids: Sequence[str],
    operations: Sequence[str],
    content_chars: int,
    min_operations: int,
    max_operations: int,
) -> dict[str, Any]:
    shapes = _operation_shapes(entry_ids, operations, content_chars)
    array = {"type": "array", "maxItems": max_operations, "items": {"anyOf": shapes}}
    if min_operations:
        array["minItems"] = min(min_operations, max_operations)
    return array


def tag_schema(
    entry_ids: Sequence[str], max_new_tokens: int, count_tokens: CountTokens | None = None
) -> dict[str, Any]:
    """Success tagging: a short reason, then which visible entries helped."""
    tags, longest_tags = _tags_array(entry_ids)
    skeleton = {"reasoning": "", "bullet_tags": longest_tags}
    chars = _spare_chars(skeleton, max_new_tokens, count_tokens)
    return _object({"reasoning": _string(max(MIN_STRING_CHARS, int(chars))), "bullet_tags": tags})


def _operation_shapes(
    entry_ids: Sequence[str], allowed: Sequence[str], content_chars: int
) -> list[dict[str, Any]]:
    content = _string(content_chars)
    ids = {"enum": list(entry_ids)}
    shapes = {
        "ADD": {"section": {"enum": list(SECTIONS.values())}, "content": content},
        "UPDATE": {"id": ids, "content": content},
        "MERGE": {"ids": {"type": "array", "minItems": 2, "maxItems": 2, "items": ids},
                  "content": content},
        "DELETE": {"id": ids},
    }  # fmt: skip
    kinds = [k for k in OPERATION_TYPES if k in allowed and (k == "ADD" or entry_ids)]
    if len(entry_ids) < 2 and "MERGE" in kinds:
        kinds.remove("MERGE")
    return [_object({"type": {"const": k}, **shapes[k]}) for k in kinds]


def curation_schema(
    entry_ids: Sequence[str],
    max_new_tokens: int,
    count_tokens: CountTokens | None = None,
    *,
    operations: Sequence[str] = OPERATION_TYPES,
    min_operations: int = 0,
) -> dict[str, Any]:
    """CURATE: reasoning first (as the release), then `min_operations` (default 0) to
    `MAX_OPERATIONS` operations.

    ADD is always possible; UPDATE and DELETE need a live entry, MERGE two. By default
    the list may be empty: a curator that sees nothing worth adding says so. A small
    model says so every time; `min_operations: 1` makes it commit to a change.
    """
    n, sizes = _operation_count({"reasoning": ""}, {"reasoning": 1.0}, entry_ids,
                                (max_new_tokens, count_tokens), min_operations)  # fmt: skip
    ops = _operations_array(
        entry_ids, operations, min(sizes["op0"], MAX_LESSON_CHARS), min_operations, n
    )
    return _object({"reasoning": _string(sizes["reasoning"]), "operations": ops})
