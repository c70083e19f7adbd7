"""Structured output: reflection, tagging and curation replies decoded under a JSON schema.

Asked for JSON, a small model writes almost-JSON: a missing comma, an invented entry id,
a section name of its own, an object that never closes. The parsers in `parsing.py`
rescue some of that; a grammar prevents it. Under a schema every reply is valid JSON of
the right shape by construction:

- playbook ids come from an enum of the live entries, so tags and UPDATE / MERGE /
  DELETE targets always name real entries;
- sections come from an enum of the seven headings;
- each operation type has its own object shape (an ADD has a section and content, a
  DELETE only an id);
- strings carry `maxLength` and arrays `maxItems`, sized from the reply's token budget
  so that the object can close before the budget ends. After the closing brace the
  grammar allows only end-of-sequence, so generation stops as soon as the object does.

Characters are a poor unit for that budget: the 0.5B model's reflections run at 2.5 to
4.4 characters per token, so a limit sized at 3 both cuts fields mid-word ("produce the
expected 5") and, on digit-heavy text, can still overrun. The transformers backend
therefore budgets free text in tokens instead (`token_budget=True`, its default): the
grammar lifts the budget-derived `maxLength`s (lessons keep the playbook's 300-character
cap), and a `FieldCloser` closes a string when what is left of the budget is what the
rest of the object needs at its longest, each later string keeping its full share
(`path_tail`); in the last `SENTENCE_WINDOW_TOKENS` before that point a sentence's end
closes it too. A string that stops early hands its tokens to the ones after it, and the
object closes within the budget whatever the text's characters per token. The vLLM
backend and `resd serve` compile schemas as written, character limits included.

Two parts. The schema builders are pure functions of (visible ids, token budget),
torch-free and unit-tested. `JsonGrammar` compiles schemas for one tokenizer with
xgrammar and makes a fresh logits processor for every transformers `generate` call;
the vLLM backend hands the same schemas to vLLM's own structured outputs instead.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from resd.training.playbook import OPERATION_TYPES, SECTIONS, TAGS

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
SEPARATORS = (",", ":")  # compact JSON: no token is spent on whitespace

# Sizing. Free text in English runs at about 4 characters per BPE token; 3 leaves a
# margin for digits, code and non-English text. The fixed structure (keys, quotes,
# ids) is measured with the run's tokenizer when one is given, else estimated.
CHARS_PER_TOKEN = 3.0
STRUCTURE_CHARS_PER_TOKEN = 2.0
SAFETY_TOKENS = 8  # the end-of-sequence token, and slack for tokens that span a boundary
MIN_STRING_CHARS = 24
# The last tokens before a free-text field's token deadline: there, a sentence that ends
# ends the field too, so that fewer fields stop mid-sentence at the deadline itself.
SENTENCE_WINDOW_TOKENS = 16
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


class StructuredOutputUnavailable(RuntimeError):
    """Structured output was asked for, but the grammar library is not installed."""


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
    if len(entry_ids) > 1:
        return {"type": "MERGE", "ids": [longest_id] * 2, "content": ""}
    return {"type": "ADD", "section": heading, "content": ""}


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


# ---- token budgets for free text ---------------------------------------------------------------

Path = tuple[str | int, ...]  # keys and array indices from the root to a string value


def _free_string(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and "maxLength" in schema


def _longest(schema: dict[str, Any]) -> tuple[Any, int]:
    """The instance of `schema` whose fixed structure is longest, with its free strings
    empty, and how many free-text characters those strings may hold."""
    if "const" in schema:
        return schema["const"], 0
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v))), 0
    if "anyOf" in schema:
        options = [_longest(s) for s in schema["anyOf"]]
        return max(
            options,
            key=lambda o: (
                len(json.dumps(o[0])) / STRUCTURE_CHARS_PER_TOKEN + o[1] / CHARS_PER_TOKEN
            ),
        )
    kind = schema.get("type")
    if kind == "object":
        parts = {k: _longest(v) for k, v in schema.get("properties", {}).items()}
        return {k: v for k, (v, _) in parts.items()}, sum(c for _, c in parts.values())
    if kind == "array":
        item, chars = _longest(schema.get("items", {}))
        n = schema.get("maxItems", 1)
        return [item] * n, chars * n
    if kind == "string":
        return "", schema.get("maxLength", 0)
    return None, 0


def _container(schema: dict[str, Any], step: str | int) -> dict[str, Any] | None:
    """The object (an `anyOf` alternative, if need be) or array that `step` goes into."""
    if isinstance(step, int):
        return schema if schema.get("type") == "array" else None
    for option in [schema, *schema.get("anyOf", [])]:
        if step in option.get("properties", {}):
            return option
    return None


def _walk(schema: dict[str, Any], path: Path) -> tuple[list[tuple[dict, str | int]], dict] | None:
    """The containers `path` passes through, each with its step, and the node it ends at."""
    levels, node = [], schema
    for step in path:
        container = _container(node, step)
        if container is None:
            return None
        levels.append((container, step))
        node = (
            container.get("items", {}) if isinstance(step, int) else container["properties"][step]
        )
    return levels, node


def _after(levels: list[tuple[dict, str | int]], count_tokens: CountTokens) -> int:
    """The tokens the reply needs after the node the levels lead to: the rest of every
    enclosing object and array at its longest, every later free string at its full share
    (its `maxLength` at `CHARS_PER_TOKEN`)."""
    tokens = chars = 0
    for container, step in levels:
        if isinstance(step, int):
            later = max(0, container.get("maxItems", step + 1) - step - 1)
            rest = {"type": "array", "items": container.get("items", {}), "maxItems": later}
        else:
            names = list(container["properties"])
            after = names[names.index(step) + 1 :]
            rest = {"type": "object", "properties": {k: container["properties"][k] for k in after}}
        value, free = _longest(rest)
        tokens += count_tokens(json.dumps(value, separators=SEPARATORS))
        chars += free
    return tokens + math.ceil(chars / CHARS_PER_TOKEN)


def path_tail(schema: dict[str, Any], path: Path, count_tokens: CountTokens) -> int | None:
    """The tokens a reply still needs once the free-text string at `path` has closed
    (`_after`). None if `path` is not free text.

    A string may run until only that much of the budget is left: one that stops early
    leaves its tokens to the strings after it, and none gets less than its share."""
    walked = _walk(schema, path)
    if walked is None or not path or not _free_string(walked[1]):
        return None
    return _after(walked[0], count_tokens)


@dataclass(frozen=True)
class ArrayRoom:
    """What an open array of fixed items (bullet tags: an id and a label, both enums) needs.

    The budget reserves such an array in the tokenizer's own spelling of its longest
    instance, but a model may spell an enum value in pieces: garbage weights wrote four
    tags in more tokens than that and ran out of budget inside the array (3 of 16
    reflections at 160 tokens with the test tokenizer; 2 of 24 on a GPU and 7 of 24 on a
    CPU with Qwen's at 256). A token writes at least one byte, so `item_bytes` bounds what
    one more item can cost however it is spelled; `FieldCloser` starts another item (or
    writes the comma that commits to one) only where that fits."""

    after: int  # tokens the reply needs once the array has closed (`_after`)
    item_bytes: int  # bytes of the longest item


def array_room(schema: dict[str, Any], path: Path, count_tokens: CountTokens) -> ArrayRoom | None:
    """The `ArrayRoom` of the array at `path`; None unless its items are fixed (no free text:
    those items' strings are budgeted one by one instead)."""
    walked = _walk(schema, path)
    if walked is None or walked[1].get("type") != "array":
        return None
    item, free = _longest(walked[1].get("items", {}))
    if free:
        return None
    return ArrayRoom(
        _after(walked[0], count_tokens), len(json.dumps(item, separators=SEPARATORS).encode())
    )


def _budgeted(schema: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The schema the grammar enforces when free text is budgeted in tokens: top-level
    free strings unbounded, nested ones (lessons) at the playbook's `MAX_LESSON_CHARS`."""
    if _free_string(schema):
        if depth <= 1:
            return {k: v for k, v in schema.items() if k != "maxLength"}
        return {**schema, "maxLength": max(schema["maxLength"], MAX_LESSON_CHARS)}
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: _budgeted(v, depth + 1) for k, v in schema["properties"].items()}
    if "items" in schema:
        out["items"] = _budgeted(schema["items"], depth + 1)
    if "anyOf" in schema:
        out["anyOf"] = [_budgeted(v, depth) for v in schema["anyOf"]]
    return out


class _JsonCursor:
    """Where a reply is in its JSON, read from its bytes as they come.

    Only what a budget needs: the path of the string value being written (None
    elsewhere), how many bytes it holds, whether its text ends a sentence, and whether
    an escape sequence or a UTF-8 character is half written (the grammar allows no
    closing quote there: it would be text, or break the character); and, for arrays,
    how many items each open one has begun and whether the next byte decides between
    another item and the closing bracket (`array_choice`).
    """

    def __init__(self) -> None:
        # ["obj", key, after_colon] or ["arr", index, items begun]
        self.stack: list[list[Any]] = []
        self.array_choice = False
        self.in_string = False
        self.escape = 0  # -1 right after a backslash, else hex digits of \uXXXX still due
        self.utf8 = 0  # continuation bytes still due for the character being written
        self.key = bytearray()
        self.reading_key = False
        self.path: Path | None = None
        self.chars = 0
        self.sentence_end = False  # the open value's text ends with . ! or ? (and spaces)

    @property
    def field(self) -> str | None:
        """The innermost key of the open string value."""
        keys = [s for s in self.path or () if isinstance(s, str)]
        return keys[-1] if keys else None

    def feed(self, data: bytes) -> None:
        for b in data:
            if self.in_string:
                self._in_string(b)
                continue
            top = self.stack[-1] if self.stack else None
            self.array_choice = False
            if top is not None and top[0] == "arr" and b not in b",]" and top[2] == top[1]:
                top[2] += 1  # the first byte of item `index`
            if b == 0x22:  # "
                self.in_string = True
                if top is not None and top[0] == "obj" and not top[2]:
                    self.reading_key, self.key = True, bytearray()
                elif top is not None:
                    self.path = tuple(entry[1] for entry in self.stack)
                    self.chars, self.sentence_end = 0, False
            elif b in b"{[":
                self.stack.append(["obj", None, False] if b == 0x7B else ["arr", 0, 0])
                self.array_choice = b == 0x5B
            elif b in b"}]":
                if self.stack:
                    self.stack.pop()
                self.array_choice = self._in_array()
            elif top is not None and b == 0x3A and top[0] == "obj":  # :
                top[2] = True
            elif top is not None and b == 0x2C:  # ,
                if top[0] == "obj":
                    top[2] = False
                else:
                    top[1] += 1

    def _in_string(self, b: int) -> None:
        if b >= 0x80:  # a multi-byte character: its lead byte says how many follow
            self.utf8 = max(0, self.utf8 - 1) if b < 0xC0 else 1 + (b >= 0xE0) + (b >= 0xF0)
        if self.escape:
            self.escape = 4 if self.escape == -1 and b == 0x75 else max(0, self.escape - 1)
        elif b == 0x5C:  # backslash
            self.escape = -1
        elif b == 0x22:
            if self.reading_key:
                self.stack[-1][1] = self.key.decode(errors="replace")
            self.in_string, self.reading_key, self.path = False, False, None
            self.array_choice = self._in_array()  # a string item has ended
            return
        elif self.reading_key:
            self.key.append(b)
        if self.path is not None:
            self.chars += 1
            if b not in b" \t":
                self.sentence_end = b in b".!?" and not self.escape

    def closable(self) -> bool:
        return self.path is not None and self.chars > 0 and not self.escape and not self.utf8

    def _in_array(self) -> bool:
        return bool(self.stack) and self.stack[-1][0] == "arr"

    def innermost_array(self) -> int | None:
        """The stack depth of the innermost open array, if any."""
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth][0] == "arr":
                return depth
        return None

    def array_path(self, depth: int) -> Path:
        """The path of the array open at stack `depth`."""
        return tuple(entry[1] for entry in self.stack[:depth])

    def begins_item(self, depth: int, data: bytes) -> bool:
        """Whether writing `data` next would begin another item of the array at `depth`, or
        commit to one: after a comma the grammar allows only an item."""
        trial = copy.copy(self)
        trial.stack, trial.key = [list(entry) for entry in self.stack], bytearray(self.key)
        trial.feed(data)
        if len(trial.stack) <= depth:
            return False
        return trial.stack[depth][1:] != self.stack[depth][1:]  # a comma, or an item's first byte


class ForcedText:
    """Which tokens may write the grammar's forced text (keys, quotes, separators).

    Built once per tokenizer (`JsonGrammar` owns one and lends it to each call's
    `FieldCloser`): the sorted spellings and the per-text token sets are vocabulary
    facts, not per-call state. The allowed tokens are those that cross the forced text's
    end into the choice after it, each piece after which one token does that, the whole
    text if it is a token, and the longest piece (`FieldCloser` says why).
    """

    def __init__(self, token_of: dict[bytes, int]) -> None:
        self.token_of = token_of  # a spelling -> its first token id
        self.longest = max(map(len, token_of), default=0)
        self._spellings = sorted(token_of)  # tokens that begin with a text are a run
        self._tokens: dict[bytes, Any] = {}  # forced text -> tensor of token ids

    def _crossing(self, text: bytes) -> list[int]:
        """The tokens that begin with `text` and go on past it."""
        start = bisect.bisect_left(self._spellings, text)
        out = []
        for spelling in self._spellings[start:]:
            if not spelling.startswith(text):
                break
            if len(spelling) > len(text):
                out.append(self.token_of[spelling])
        return out

    def tokens(self, text: bytes, scores: Any) -> Any:
        """The tokens that may write `text`, on the scores' device (cached by the text)."""
        cached = self._tokens.get(text)
        if cached is None or cached.device != scores.device:
            import torch  # the schema builders above stay torch-free

            tokens = self._crossing(text)
            pieces = [text[:n] for n in range(1, min(len(text), self.longest) + 1)
                      if text[:n] in self.token_of]  # fmt: skip
            for piece in pieces:
                if piece in (text, pieces[-1]) or self._crossing(text[len(piece) :]):
                    tokens.append(self.token_of[piece])
            ids = torch.tensor(tokens, dtype=torch.long, device=scores.device)
            self._tokens[text] = cached = ids[ids < scores.shape[-1]]
        return cached

    def longest_piece(self, text: bytes, allowed: Any) -> int | None:
        """The longest token that begins `text` and that `allowed(token)` accepts."""
        for n in range(min(len(text), self.longest), 0, -1):
            token = self.token_of.get(text[:n])
            if token is not None and allowed(token):
                return token
        return None


class FieldCloser:
    """Closes each row's free-text strings when its token budget says so.

    Applied after the grammar's mask: it only narrows the allowed tokens to those that
    begin with a quote, which end the string. A string is closed at its deadline (when
    the rest of the object needs what is left, `path_tail`), or up to `sentence_window`
    tokens before it where a sentence has just ended. Counts the strings it closed
    (cut), by innermost key and by row.

    It also writes the grammar's forced text (keys, quotes, separators) in few tokens. A
    small model under a grammar otherwise spells `","key":"` in pieces (the 135M model
    spent 128 tokens on a reply that re-tokenizes to 108), and the budget's reserve for
    the structure, counted in the tokenizer's own tokens, would not hold. Forcing only
    the longest token that begins the forced text is not enough: the model's choice
    after the forced text lives in tokens that cross it. After `"operations":` the
    tokenizer writes an empty list as `":` + `[]}` and a full one as `":[{"`; forced to
    `":[`, the 0.5B curator could no longer say "no change" in its own tokens and wrote
    operations in 256 of 256 replies against 23 of 256 before. So the allowed tokens
    are those that begin with the whole forced text and go on past it, the pieces after
    which one token does that, and the longest piece (`ForcedText`).
    """

    def __init__(
        self,
        tails: Sequence[Callable[[Path], int | None] | None],
        max_new_tokens: int,
        token_bytes: Sequence[bytes],
        quote_starts: Any,
        prefills: Sequence[str] | None = None,
        cut: Counter | None = None,
        sentence_window: int = SENTENCE_WINDOW_TOKENS,
        forced_text: ForcedText | None = None,
        rooms: Sequence[Callable[[Path], ArrayRoom | None] | None] | None = None,
        bracket_starts: Any = None,
    ) -> None:
        self.tails = list(tails)
        self.rooms = list(rooms) if rooms is not None else [None] * len(self.tails)
        # by the byte they begin with: the tokens that close a string, and an array
        self.forced_text = forced_text or ForcedText({})
        self.sentence_window = sentence_window
        self.max_new_tokens = max_new_tokens
        self.token_bytes = token_bytes
        self.starts = {b'"': quote_starts, b"]": bracket_starts}
        self.cursors = [_JsonCursor() if t is not None else None for t in self.tails]
        for row, text in enumerate(prefills or []):
            if self.cursors[row] is not None and text:
                self.cursors[row].feed(text.encode())
        self.cut = cut if cut is not None else Counter()
        self.rows_cut = [0] * len(self.tails)

    def accept(self, row: int, token: int) -> None:
        cursor = self.cursors[row]
        if cursor is not None and token < len(self.token_bytes):
            cursor.feed(self.token_bytes[token])

    def force_structure(self, row: int, forced: str, scores: Any, generated: int = 0) -> bool:
        """Narrow the row to the tokens that may write `forced` (the grammar's
        jump-forward text) and that the grammar allows; where the grammar allows none of
        them, to the longest allowed token that begins it. False if there is none.

        Where an array of fixed items has no room for another item (`ArrayRoom`), the
        tokens that end this item and go on into the next are dropped too."""
        text = forced.encode()
        tokens = self.forced_text.tokens(text, scores)
        allowed = tokens[scores[row, tokens].isfinite()]
        depth = self._array_full(row, generated) if allowed.numel() else None
        if depth is not None:
            cursor = self.cursors[row]
            keep = [not cursor.begins_item(depth, self.token_bytes[t]) for t in allowed.tolist()]
            allowed = allowed[allowed.new_tensor(keep, dtype=bool)]
        if not allowed.numel():
            token = self.forced_text.longest_piece(
                text, lambda t: t < scores.shape[-1] and bool(scores[row, t].isfinite())
            )
            if token is None:
                return False
            allowed = tokens.new_tensor([token])
        keep = scores[row, allowed].clone()
        scores[row].fill_(float("-inf"))
        scores[row, allowed] = keep
        return True

    def narrow(self, row: int, scores: Any, generated: int) -> None:
        """Close the row's open string at its deadline, or its array of fixed items where
        another item would not fit. `generated`: tokens this row has already produced in
        this call."""
        cursor = self.cursors[row]
        if cursor is None:
            return
        if cursor.array_choice:  # another item, or the closing bracket
            depth = self._array_full(row, generated)
            if depth is not None and self._only(row, scores, b"]"):
                keys = [k for k in cursor.array_path(depth) if isinstance(k, str)]
                self.cut[keys[-1] if keys else None] += 1
                self.rows_cut[row] += 1
            return
        if not cursor.closable():
            return
        tail = self.tails[row](cursor.path)
        if tail is None:  # an enum or unbounded string: the grammar's business
            return
        spare = self.max_new_tokens - generated - SAFETY_TOKENS - tail
        if spare > 0 and not (cursor.sentence_end and spare <= self.sentence_window):
            return
        if self._only(row, scores, b'"'):
            self.cut[cursor.field] += 1
            self.rows_cut[row] += 1

    def _array_full(self, row: int, generated: int) -> int | None:
        """The stack depth of the row's innermost open array of fixed items if the budget
        left after this token has no room for another of its items; else None."""
        cursor, room_of = self.cursors[row], self.rooms[row]
        depth = cursor.innermost_array() if cursor is not None and room_of else None
        if depth is None:
            return None
        room = room_of(cursor.array_path(depth))
        if room is None:
            return None
        spare = self.max_new_tokens - generated - 1 - SAFETY_TOKENS - room.after
        return depth if spare < room.item_bytes else None

    def _only(self, row: int, scores: Any, first: bytes) -> bool:
        """Narrow the row to the allowed tokens that begin with `first` (a quote, or a
        bracket); False, and untouched, if none is allowed."""
        starts = self.starts[first]
        if starts is None:
            return False
        if starts.device != scores.device:  # once per call, not per row and step
            starts = self.starts[first] = starts.to(scores.device)
        allowed = scores[row, : starts.numel()].isfinite() & starts
        if not allowed.any():
            return False
        scores[row, : starts.numel()].masked_fill_(~allowed, float("-inf"))
        scores[row, starts.numel() :] = float("-inf")
        return True


def grammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


INSTALL_HINT = (
    "structured_output needs the xgrammar package: pip install 'resd[structured]' "
    "(on CPU-only machines: pip install --no-deps xgrammar apache-tvm-ffi, which skips triton)"
)


class JsonGrammar:
    """Compiles JSON schemas for one tokenizer and constrains transformers' `generate`.

    Compiled grammars are cached by schema text: within a step every reflection shares
    the same playbook snapshot, hence the same schema. With `token_budget` (the default)
    free text is budgeted in tokens by a `FieldCloser` rather than cut at its `maxLength`
    (the module's docstring says why); `cut` counts the strings it closed, by their
    innermost key, over the grammar's life.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        *,
        token_budget: bool = True,
        sentence_window: int = SENTENCE_WINDOW_TOKENS,
    ) -> None:
        try:
            import xgrammar as xgr
        except ImportError as exc:
            raise StructuredOutputUnavailable(INSTALL_HINT) from exc
        import torch

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: dict[str, Any] = {}
        self.token_budget = token_budget
        self.sentence_window = sentence_window
        self._tokenizer = tokenizer
        self._token_bytes = [
            t if isinstance(t, bytes) else str(t).encode() for t in info.decoded_vocab
        ]
        self._quote_starts = torch.tensor([t.startswith(b'"') for t in self._token_bytes])
        self._bracket_starts = torch.tensor([t.startswith(b"]") for t in self._token_bytes])
        special = set(info.special_token_ids)
        token_of: dict[bytes, int] = {}
        for token, text in enumerate(self._token_bytes):  # the first of equal spellings
            if text and token not in special:
                token_of.setdefault(text, token)
        self._forced_text = ForcedText(token_of)
        self._budgets: dict[tuple[str, str, Path], Any] = {}  # path_tail, array_room
        self.cut: Counter = Counter()

    def compile(self, schema: dict[str, Any]) -> Any:
        if self.token_budget:
            schema = _budgeted(schema)
        key = json.dumps(schema)  # key order is the order the reply must follow
        if key not in self._cache:
            self._cache[key] = self._compiler.compile_json_schema(
                key, any_whitespace=False, separators=SEPARATORS
            )
        return self._cache[key]

    def tail(self, schema: dict[str, Any], path: Path, key: str | None = None) -> int | None:
        """`path_tail` with this tokenizer, cached by the schema's text (`key`, if the
        caller has it): a step's replies share their schema, and a decode step asks for
        every row."""
        return self._budget(path_tail, schema, path, key)

    def room(self, schema: dict[str, Any], path: Path, key: str | None = None) -> ArrayRoom | None:
        """`array_room` with this tokenizer, cached like `tail`."""
        return self._budget(array_room, schema, path, key)

    def _budget(
        self, measure: Callable, schema: dict[str, Any], path: Path, key: str | None
    ) -> Any:
        cached = (measure.__name__, key or json.dumps(schema), path)
        if cached not in self._budgets:
            self._budgets[cached] = measure(schema, path, self._count_tokens)
        return self._budgets[cached]

    def _count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def processor(
        self,
        schemas: Sequence[dict[str, Any] | None],
        prefills: Sequence[str] | None = None,
        max_new_tokens: int | None = None,
    ) -> GrammarLogitsProcessor:
        """A fresh processor for one batch (rows in order); a None schema leaves its row free.

        `max_new_tokens` (the call's budget) turns on the token budget of free-text fields."""
        grammars = [self.compile(s) if s is not None else None for s in schemas]
        closer = None
        if self.token_budget and max_new_tokens is not None:
            keys = [json.dumps(s) if s is not None else None for s in schemas]
            tails = [partial(self.tail, s, key=k) if s is not None else None
                     for s, k in zip(schemas, keys, strict=True)]  # fmt: skip
            rooms = [partial(self.room, s, key=k) if s is not None else None
                     for s, k in zip(schemas, keys, strict=True)]  # fmt: skip
            closer = FieldCloser(tails, max_new_tokens, self._token_bytes, self._quote_starts,
                                 prefills, self.cut, self.sentence_window, self._forced_text,
                                 rooms, self._bracket_starts)  # fmt: skip
        return GrammarLogitsProcessor(self._xgr, grammars, self.vocab_size, prefills, closer)


class GrammarLogitsProcessor:
    """Masks each row's logits to the tokens its grammar allows next.

    One matcher per row, advanced by the token the row sampled last. A row's `prefill`
    (text already in its prompt that opens the reply) is fed to its matcher first, so the
    grammar continues from it. Rows whose object is closed and whose end-of-sequence was
    accepted are left alone: generate pads them from then on. Used once per `generate`
    call: matchers hold state.
    """

    def __init__(
        self,
        xgr: Any,
        grammars: Sequence[Any | None],
        vocab_size: int,
        prefills: Sequence[str] | None = None,
        closer: FieldCloser | None = None,
    ) -> None:
        self._xgr = xgr
        self.closer = closer
        self.generated = 0
        self.matchers = [xgr.GrammarMatcher(g) if g is not None else None for g in grammars]
        for row, text in enumerate(prefills or []):
            matcher = self.matchers[row]
            if matcher is not None and text and not matcher.accept_string(text):
                raise ValueError(
                    f"structured output: the prefill {text[:40]!r} is not a valid start of the "
                    "reply's JSON; drop the prefill or set structured_output: off"
                )
        self.rows = [row for row, m in enumerate(self.matchers) if m is not None]
        self.bitmask = xgr.allocate_token_bitmask(len(self.matchers), vocab_size)
        self.vocab_size = vocab_size
        self.started = False

    def __call__(self, input_ids, scores):
        if self.started:
            for row in self.rows:
                matcher = self.matchers[row]
                if matcher.is_terminated():
                    continue
                token = int(input_ids[row, -1])
                if not matcher.accept_token(token):
                    raise RuntimeError("structured output: a sampled token broke its grammar")
                if self.closer is not None:
                    self.closer.accept(row, token)
            self.generated += 1
        self.started = True
        live = [row for row in self.rows if not self.matchers[row].is_terminated()]
        for row in live:
            self.matchers[row].fill_next_token_bitmask(self.bitmask, row)
        if live:
            device = scores.device
            cpu = scores if device.type in ("cpu", "cuda") else scores.cpu()
            self._xgr.apply_token_bitmask_inplace(
                cpu, self.bitmask.to(cpu.device), vocab_size=self.vocab_size, indices=live
            )
            if self.closer is not None:
                for row in live:
                    forced = self.matchers[row].find_jump_forward_string()
                    if not (
                        forced and self.closer.force_structure(row, forced, cpu, self.generated)
                    ):
                        self.closer.narrow(row, cpu, self.generated)
            scores = cpu.to(device)
        return scores
