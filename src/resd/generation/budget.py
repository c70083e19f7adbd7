"""Free text budgeted in tokens: when a structured reply's strings must close.

A schema's `maxLength`s are sized at `CHARS_PER_TOKEN`, and characters are a poor unit
for a token budget: the 0.5B model's reflections run at 2.5 to 4.4 characters per token,
so a limit sized at 3 both cuts fields mid-word ("produce the expected 5") and, on
digit-heavy text, can still overrun. The transformers backend therefore budgets free text
in tokens (`JsonGrammar(token_budget=True)`, its default): the grammar enforces the
`budgeted_schema` schema, whose budget-derived `maxLength`s are lifted (lessons keep the
playbook's 300-character cap), and a `FieldCloser` closes a string when what is left of
the budget is what the rest of the object needs at its longest, each later string keeping
its full share (`path_tail`); in the last `SENTENCE_WINDOW_TOKENS` before that point a
sentence's end closes it too. A string that stops early hands its tokens to the ones
after it, and the object closes within the budget whatever the text's characters per
token. The vLLM backend and `resd serve` compile schemas as written, character limits
included.

The measures of a schema (`path_tail`, `array_room`) are pure functions; `_JsonCursor`
follows one reply's bytes; `FieldCloser` narrows a row's logits from both.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from resd.generation.schemas import (
    CHARS_PER_TOKEN,
    MAX_LESSON_CHARS,
    SAFETY_TOKENS,
    SEPARATORS,
    STRUCTURE_CHARS_PER_TOKEN,
    CountTokens,
)

# The last tokens before a free-text field's token deadline: there, a sentence that ends
# ends the field too, so that fewer fields stop mid-sentence at the deadline itself.
SENTENCE_WINDOW_TOKENS = 16

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


def budgeted_schema(schema: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The schema the grammar enforces when free text is budgeted in tokens: top-level
    free strings unbounded, nested ones (lessons) at the playbook's `MAX_LESSON_CHARS`."""
    if _free_string(schema):
        if depth <= 1:
            return {k: v for k, v in schema.items() if k != "maxLength"}
        return {**schema, "maxLength": max(schema["maxLength"], MAX_LESSON_CHARS)}
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {
            k: budgeted_schema(v, depth + 1) for k, v in schema["properties"].items()
        }
    if "items" in schema:
        out["items"] = budgeted_schema(schema["items"], depth + 1)
    if "anyOf" in schema:
        out["anyOf"] = [budgeted_schema(v, depth) for v in schema["anyOf"]]
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
    (cut), by innermost key and by row: only where it took away a token the grammar
    allowed, so a string or list the schema itself ended is not counted.

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
        bracket). True if that took away a token the grammar allowed: the budget closed
        the string or array. False where the grammar itself allowed only such tokens (a
        lesson at its character cap, a list at its `maxItems`: the schema closed it), and
        False, untouched, where it allows none of them."""
        starts = self.starts[first]
        if starts is None:
            return False
        if starts.device != scores.device:  # once per call, not per row and step
            starts = self.starts[first] = starts.to(scores.device)
        finite = scores[row].isfinite()
        allowed = finite[: starts.numel()] & starts
        if not allowed.any():
            return False
        if int(allowed.sum()) == int(finite.sum()):
            return False  # nothing else was allowed: no cut of ours
        scores[row, : starts.numel()].masked_fill_(~allowed, float("-inf"))
        scores[row, starts.numel() :] = float("-inf")
        return True
