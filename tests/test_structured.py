"""Structured output: schemas built per call, grammar-constrained replies, the vLLM request.

The grammar tests use the tiny random-init model: its weights are garbage, so every
well-formed reply it writes is the grammar's doing, not the model's.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from resd.config import ConfigError
from resd.generation.budget import (
    SENTENCE_WINDOW_TOKENS,
    ArrayRoom,
    FieldCloser,
    ForcedText,
    _JsonCursor,
    array_room,
    budgeted_schema,
    path_tail,
)
from resd.generation.hf import chat_prompt_ids, eos_token_ids, generate
from resd.generation.schemas import (
    CHARS_PER_TOKEN,
    MAX_LESSON_CHARS,
    MAX_OPERATIONS,
    MAX_TAGS,
    MIN_LESSON_CHARS,
    MIN_STRING_CHARS,
    SAFETY_TOKENS,
    curation_schema,
    reflection_schema,
    string_limit,
    tag_schema,
)
from resd.generation.structured import (
    JsonGrammar,
    StructuredOutputUnavailable,
    grammar_available,
)
from resd.models import load_model, load_tokenizer
from resd.training.playbook import OPERATION_TYPES, SECTIONS, TAGS, Playbook
from resd.training.reflection import parse_operations, parse_reflection, parse_tags

pytest.importorskip("xgrammar")

IDS = ["strat-00001", "err-00002", "calc-00007"]


def _op_shapes(schema: dict) -> dict[str, dict]:
    shapes = schema["properties"]["operations"]["items"]["anyOf"]
    return {s["properties"]["type"]["const"]: s for s in shapes}


def _string_chars(schema: dict) -> int:
    """Sum of the maxLength of every string in a schema (each operation counted once)."""
    if schema.get("type") == "string":
        return string_limit(schema)
    total = sum(_string_chars(v) for v in schema.get("properties", {}).values())
    if "anyOf" in schema:
        total += max(_string_chars(s) for s in schema["anyOf"])
    if "items" in schema:
        total += schema.get("maxItems", 1) * _string_chars(schema["items"])
    return total


# ---- the schema builders ------------------------------------------------------------------


def test_reflection_schema_enums_follow_the_live_playbook():
    schema = reflection_schema(IDS, 256)
    assert list(schema["properties"]) == [
        "reasoning",
        "error_identification",
        "root_cause_analysis",
        "correct_approach",
        "key_insight",
        "bullet_tags",
    ]  # fmt: skip  (the release's order: think first, then diagnose, then tag)
    assert schema["required"] == list(schema["properties"])
    assert schema["additionalProperties"] is False
    tags = schema["properties"]["bullet_tags"]
    assert tags["items"]["properties"]["id"]["enum"] == IDS
    assert tags["items"]["properties"]["tag"]["enum"] == list(TAGS)
    assert tags["maxItems"] == min(len(IDS), MAX_TAGS)
    # a new entry appears in the next call's enum; a deleted one disappears
    later = reflection_schema(["strat-00001", "misc-00009"], 256)
    assert later["properties"]["bullet_tags"]["items"]["properties"]["id"]["enum"] == [
        "strat-00001", "misc-00009"]  # fmt: skip
    # no playbook: the array must stay empty (an empty enum is not valid JSON Schema)
    empty = reflection_schema([], 256)["properties"]["bullet_tags"]
    assert empty["maxItems"] == 0 and "enum" not in json.dumps(empty)


def test_curation_schema_has_one_shape_per_operation_and_valid_targets():
    schema = curation_schema(IDS, 640)
    assert list(schema["properties"]) == ["reasoning", "operations"]
    ops = schema["properties"]["operations"]
    assert ops["maxItems"] == MAX_OPERATIONS and "minItems" not in ops  # an empty list is fine
    shapes = _op_shapes(schema)
    assert set(shapes) == {"ADD", "UPDATE", "MERGE", "DELETE"}
    assert shapes["ADD"]["properties"]["section"]["enum"] == list(SECTIONS.values())
    assert set(shapes["ADD"]["required"]) == {"type", "section", "content"}
    assert set(shapes["DELETE"]["required"]) == {"type", "id"}
    for kind in ("UPDATE", "DELETE"):
        assert shapes[kind]["properties"]["id"]["enum"] == IDS
    assert shapes["MERGE"]["properties"]["ids"]["items"]["enum"] == IDS
    assert shapes["MERGE"]["properties"]["ids"]["minItems"] == 2
    # an empty playbook leaves only ADD; a single entry cannot be merged, two can
    assert set(_op_shapes(curation_schema(IDS[:2], 256))) == set(OPERATION_TYPES)
    assert set(_op_shapes(curation_schema([], 256))) == {"ADD"}
    assert set(_op_shapes(curation_schema(IDS[:1], 256))) == {"ADD", "UPDATE", "DELETE"}
    # the release's curator only ADDs
    assert set(_op_shapes(curation_schema(IDS, 256, operations=("ADD",)))) == {"ADD"}


def _lesson_chars(schema: dict) -> list[int]:
    return [shape["properties"]["content"]["maxLength"] for shape in _op_shapes(schema).values()
            if "content" in shape["properties"]]  # fmt: skip


@pytest.mark.parametrize("single_call", [False, True])
def test_a_small_budget_allows_fewer_lessons_not_lessons_cut_short(single_call):
    """At the experiments' curation budget (192 tokens) three operations of ~70 characters
    cut lessons mid-sentence; fewer, whole lessons are allowed instead."""

    def build(budget: int, **kw):
        if single_call:
            return reflection_schema(IDS, budget, operations=OPERATION_TYPES, **kw)
        return curation_schema(IDS, budget, **kw)

    counts = []
    for budget in (192, 256, 400, 640, 1200):
        schema = build(budget)
        ops = schema["properties"]["operations"]
        counts.append(ops["maxItems"])
        if ops["maxItems"] > 1:  # a reply may hold several only if each gets a whole lesson
            assert min(_lesson_chars(schema)) >= MIN_LESSON_CHARS
        assert _string_chars(schema) / CHARS_PER_TOKEN < budget  # and still closes in time
    assert counts == sorted(counts) and counts[0] < MAX_OPERATIONS == counts[-1]
    # min_operations is a floor the sizing never goes under
    forced = build(192, min_operations=2)["properties"]["operations"]
    assert forced["minItems"] == 2 and forced["maxItems"] >= 2


@pytest.mark.parametrize("build", [reflection_schema, tag_schema, curation_schema])
def test_string_bounds_are_sized_from_the_token_budget(build):
    small, large = build(IDS, 160), build(IDS, 640)
    assert _string_chars(large) > 2 * _string_chars(small)
    for schema, budget in ((small, 160), (large, 640)):
        # free text at CHARS_PER_TOKEN leaves room for the structure within the budget
        assert _string_chars(schema) / CHARS_PER_TOKEN < budget
    # a tokenizer that finds the structure expensive leaves less room for text
    costly = build(IDS, 640, lambda text: len(text))
    assert _string_chars(costly) < _string_chars(large)


def _longest_reply(schema: dict) -> tuple[object, int]:
    """The longest reply a schema allows: its JSON structure (every string left empty)
    and how many characters of free text its strings may hold."""
    if schema.get("type") == "string":
        return "", string_limit(schema)
    if "const" in schema:
        return schema["const"], 0
    if "enum" in schema:
        return max(schema["enum"], key=lambda v: len(json.dumps(v))), 0
    if "anyOf" in schema:  # the shape that costs most: structure at 2 and text at 3 a token
        options = [_longest_reply(s) for s in schema["anyOf"]]
        return max(options, key=lambda o: len(json.dumps(o[0])) / 2 + o[1] / CHARS_PER_TOKEN)
    if schema.get("type") == "array":
        if not schema["maxItems"]:
            return [], 0
        item, chars = _longest_reply(schema["items"])
        return [item] * schema["maxItems"], chars * schema["maxItems"]
    parts = {k: _longest_reply(v) for k, v in schema["properties"].items()}
    return {k: v for k, (v, _) in parts.items()}, sum(c for _, c in parts.values())


def _single_call(ids, budget, count=None, **kw):
    return reflection_schema(ids, budget, count, operations=OPERATION_TYPES, **kw)


@pytest.mark.parametrize("build", [reflection_schema, tag_schema, curation_schema, _single_call])
@pytest.mark.parametrize(
    "ids",
    [
        IDS,
        ["a-1", "strat-00001", "strategy-0000000123"],
        ["s-1"],
        ["s" * 30],
        ["s" * 20, "t" * 20],
        [],
    ],
    ids=["three", "mixed-lengths", "one", "one-long", "two-long", "none"],
)
def test_the_longest_reply_leaves_the_safety_tokens_of_the_budget(build, ids):
    """The promise behind every maxLength and maxItems: the longest reply a schema allows
    (its structure counted like the tokenizer counts it, free text at CHARS_PER_TOKEN)
    still leaves SAFETY_TOKENS of the budget for the end-of-sequence token. Sizing that
    measured a shorter reply than the longest (the shortest entry id, the shortest
    heading, or a MERGE where an ADD is wider, as `_widest_operation` did with ids under
    twelve characters; an ADD where an UPDATE of a long id is wider) lets the object run
    into the end of the budget; sizing that wastes it gives lessons less room."""
    estimate = lambda text: -(-len(text) // 2)  # noqa: E731  (2 structure characters a token)
    for count in (None, lambda text: len(text) // 3 + 1):
        for budget in range(160, 1300, 37):
            schema = build(ids, budget, count)
            if min(map(string_limit, _strings(schema))) <= MIN_STRING_CHARS:
                continue  # too small a budget: every string keeps its minimum instead
            structure, chars = _longest_reply(schema)
            tokens = (count or estimate)(json.dumps(structure, separators=(",", ":")))
            spent = tokens + chars / CHARS_PER_TOKEN + SAFETY_TOKENS
            assert spent <= budget, (budget, structure)
            assert spent - SAFETY_TOKENS + 1 <= budget  # end-of-sequence always fits
            lessons = _lesson_chars(schema) if "operations" in schema["properties"] else []
            if max(lessons, default=0) < MAX_LESSON_CHARS:  # no lesson held back by its cap
                assert spent > budget - 4, (budget, structure)  # only rounding left over


def test_a_budget_too_small_for_the_structure_still_allows_every_field():
    """Below what the structure needs, strings keep MIN_STRING_CHARS: each still holds
    the one character its minLength asks for, so the schema can be met."""
    for build in (reflection_schema, tag_schema, curation_schema, _single_call):
        schema = build(IDS, 8)
        assert _strings(schema)
        for field in _strings(schema):
            assert 1 == field["minLength"] <= field["maxLength"]
            assert field["maxLength"] >= MIN_STRING_CHARS


def _strings(schema: dict) -> list[dict]:
    """Every string schema inside `schema`."""
    if schema.get("type") == "string":
        return [schema]
    found = [s for v in schema.get("properties", {}).values() for s in _strings(v)]
    found += [s for v in schema.get("anyOf", []) for s in _strings(v)]
    return found + (_strings(schema["items"]) if "items" in schema else [])


@pytest.mark.parametrize("build", [curation_schema, _single_call])
def test_a_reply_holds_as_many_operations_as_get_a_whole_lesson(build):
    """The operation count is the most for which every lesson still gets MIN_LESSON_CHARS:
    forcing one more (`min_operations`) leaves each lesson less than that, and forcing
    more than MAX_OPERATIONS gives MAX_OPERATIONS, all required."""
    counts = set()
    for budget in range(60, 900, 3):
        ops = build(IDS, budget)["properties"]["operations"]
        n = ops["maxItems"]
        counts.add(n)
        if n > 1:
            assert min(_lesson_chars(build(IDS, budget))) >= MIN_LESSON_CHARS, budget
        if n < MAX_OPERATIONS:
            assert max(_lesson_chars(build(IDS, budget, min_operations=n + 1))) < MIN_LESSON_CHARS
    assert counts == set(range(1, MAX_OPERATIONS + 1))  # one more at a time, none skipped
    forced = build(IDS, 160, min_operations=MAX_OPERATIONS + 2)["properties"]["operations"]
    assert forced["minItems"] == forced["maxItems"] == MAX_OPERATIONS
    # a floor of one with room for more: at least one, still up to MAX_OPERATIONS
    assert "minItems" not in build(IDS, 1200)["properties"]["operations"]  # by default none
    one = build(IDS, 1200, min_operations=1)["properties"]["operations"]
    assert one["minItems"] == 1 and one["maxItems"] == MAX_OPERATIONS
    # lessons stop at MAX_LESSON_CHARS however large the budget; the diagnosis does not
    roomy = build(IDS, 4000)
    assert set(_lesson_chars(roomy)) == {MAX_LESSON_CHARS}
    assert string_limit(roomy["properties"]["reasoning"]) > MAX_LESSON_CHARS


# ---- token budgets for free text --------------------------------------------------------------


def test_json_cursor_knows_which_string_value_is_open():
    reply = (
        '{"reasoning":"say \\"a\\", \\u0022b","bullet_tags":[{"id":"x","tag":"helpful"}],'
        '"operations":[{"type":"ADD","content":"one"},{"type":"DELETE","id":"x"},"two"]}'
    )
    text = json.loads(reply)  # valid JSON: escaped quotes inside, strings nested in arrays
    assert text["reasoning"] == 'say "a", "b'
    cursor, seen = _JsonCursor(), []
    for b in reply.encode():
        cursor.feed(bytes([b]))
        seen.append(cursor.path)
    opened, closed = reply.index('"say') + 1, reply.index('","bullet_tags')
    assert set(seen[opened:closed]) == {("reasoning",)}  # the escaped quotes do not end it
    assert seen[closed] is None
    assert seen[reply.index('"helpful"')] == ("bullet_tags", 0, "tag")
    assert seen[reply.index('"one"')] == ("operations", 0, "content")
    assert seen[reply.index('"x"}')] == ("operations", 1, "id")
    assert seen[reply.index('"two"')] == ("operations", 2)
    assert not any(p and "type" not in p and p[-1] in ("id", "tag") and p[0] == "id" for p in seen)
    assert seen[-1] is None and cursor.stack == []
    # keys are never values
    assert all(p is None for p, ch in zip(seen, reply, strict=True) if ch == ":")
    # bytes arrive in pieces that split escapes (tokens span boundaries)
    cursor = _JsonCursor()
    cursor.feed(reply[: reply.index("\\u0022") + 3].encode())
    assert cursor.field == "reasoning" and not cursor.closable()  # half an escape: no quote yet
    cursor.feed(b"0022")
    assert cursor.closable() and not cursor.sentence_end
    cursor.feed(b"c. ")  # a sentence ends (spaces after it do not change that)
    assert cursor.sentence_end
    cursor.feed(b"3.5")  # a decimal point is not an end once its digits follow
    assert not cursor.sentence_end


def test_token_tails_give_every_string_at_least_its_character_share():
    budget, count = 256, lambda text: len(text) // 2 + 1  # two structure characters a token
    schema = reflection_schema(IDS, budget, count)
    props = schema["properties"]
    tails = {k: path_tail(schema, (k,), count) for k in props}
    names = [k for k, t in tails.items() if t is not None]
    assert names == list(props)[:5]  # the diagnosis fields; bullet tags are not free text
    assert path_tail(schema, ("bullet_tags", 0, "id"), count) is None  # an enum
    deadlines = [budget - SAFETY_TOKENS - tails[k] for k in names]
    assert deadlines == sorted(deadlines)
    # the last field still leaves room for the tags array at its longest
    longest_tags = json.dumps({"bullet_tags": [{"id": max(IDS, key=len), "tag": "helpful"}] * 3},
                              separators=(",", ":"))  # fmt: skip
    assert tails[names[-1]] >= count(longest_tags)
    # a field that writes nothing hands its tokens on: each field's own allowance (its
    # deadline minus the previous one's) covers its character limit at CHARS_PER_TOKEN
    for prev, name, deadline in zip([None, *names], names, deadlines, strict=False):
        start = 0 if prev is None else budget - SAFETY_TOKENS - tails[prev]
        assert deadline - start >= props[name]["maxLength"] / CHARS_PER_TOKEN
    # lessons inside the operations array: each later one keeps a whole lesson's share
    curation = curation_schema(IDS, 320, count)
    n = curation["properties"]["operations"]["maxItems"]
    share = _op_shapes(curation)["ADD"]["properties"]["content"]["maxLength"] / CHARS_PER_TOKEN
    lesson = [path_tail(curation, ("operations", i, "content"), count) for i in range(n)]
    assert n >= 2 and all(a - b >= share for a, b in pairwise(lesson))
    assert path_tail(curation, ("reasoning",), count) >= lesson[0] + share


# ---- decoding under the grammar ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    return model, tok, JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok))


def _replies(tiny, schema, n=6, max_new_tokens=700, prefixes=None):
    model, tok, grammar = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"task {i}"}]) for i in range(n)]
    gens = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.95,
                    seeds=list(range(n)), grammar=grammar, json_schemas=[schema] * n,
                    json_prefixes=prefixes)  # fmt: skip
    return gens


def test_garbage_weights_write_valid_reflections(tiny):
    # Sized for a 160-token budget at 3 characters per token; a random model writes
    # arbitrary bytes (up to 4 tokens a character), so it gets room to close the object.
    gens = _replies(tiny, reflection_schema(IDS, 160))
    for gen in gens:
        assert gen.finished, "the grammar ends the reply with end-of-sequence"
        obj = json.loads(gen.text, strict=False)  # raw control characters are allowed
        reflection = parse_reflection(gen.text)
        assert reflection is not None and not reflection.loose
        assert all(obj[k] for k in ("error_identification", "key_insight"))
        assert all(i in IDS and t in TAGS for i, t in reflection.bullet_tags)
    assert len({g.text for g in gens}) == len(gens)  # sampled, not one fixed string


def test_garbage_weights_write_valid_curation_and_tags(tiny):
    for gen in _replies(tiny, curation_schema(IDS, 160)):
        obj = json.loads(gen.text, strict=False)  # raw control characters are allowed
        ops = parse_operations(gen.text)
        assert ops == obj["operations"] and len(ops) <= MAX_OPERATIONS
        for op in ops:
            if op["type"] == "ADD":
                assert op["section"] in SECTIONS.values()
            else:
                targets = op["ids"] if op["type"] == "MERGE" else [op["id"]]
                assert set(targets) <= set(IDS)
            assert not op.get("content") or 1 <= len(op["content"]) <= 300
    for gen in _replies(tiny, tag_schema(IDS, 96)):
        assert (
            parse_tags(gen.text) is not None
            and json.loads(gen.text, strict=False)["bullet_tags"] is not None
        )


def test_the_grammar_accepts_the_replies_its_schema_allows_and_no_others(tiny):
    """What "valid by construction" rests on: the compiled grammar takes a compact reply
    of the schema's shape to its end, and refuses at once what the schema forbids (an
    empty field, an id or tag or section not in the enum, a wrong operation shape, too
    many items, a string past its maxLength, whitespace the compact separators leave out,
    a missing or extra key). With the token budget on, top-level free text is bounded in
    tokens instead of maxLength, but lessons still stop at MAX_LESSON_CHARS."""
    xgr = pytest.importorskip("xgrammar")
    model, tok, _ = tiny
    schema = curation_schema(IDS, 1200)
    assert schema["properties"]["operations"]["maxItems"] == 3
    limit = string_limit(schema["properties"]["reasoning"])
    add = {"type": "ADD", "section": next(iter(SECTIONS.values())), "content": "Check the sign."}
    merge = {"type": "MERGE", "ids": IDS[:2], "content": "One rule."}
    reply = {"reasoning": "r", "operations": [add, merge, {"type": "DELETE", "id": IDS[2]}]}

    def text(obj: dict) -> str:
        return json.dumps(obj, separators=(",", ":"))

    def accepted(grammar: JsonGrammar, reply: str, schema: dict = schema) -> bool:
        matcher = xgr.GrammarMatcher(grammar.compile(schema))
        return matcher.accept_string(reply) and matcher.is_completed()

    def ops(*items: dict) -> str:
        return text({**reply, "operations": list(items)})

    exact = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok), token_budget=False)
    budgeted = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok))
    for grammar in (exact, budgeted):
        assert accepted(grammar, text(reply))
        assert accepted(grammar, ops())  # an empty list: the curator saw nothing to add
        assert accepted(grammar, ops({"type": "UPDATE", "id": IDS[1], "content": "New."}))
        assert not accepted(grammar, text(reply)[:-1])  # an object that never closes
        assert not accepted(grammar, json.dumps(reply))  # whitespace after ':' and ','
        for bad in (
            text({**reply, "reasoning": ""}),
            text({"operations": reply["operations"]}),
            text({**reply, "extra": "x"}),
            ops(add, merge, add, add),
            ops({**add, "section": "Misc"}),
            ops({**add, "content": ""}),
            ops({**merge, "ids": IDS[:1]}),
            ops({**merge, "ids": IDS[0]}),
            ops({**merge, "ids": [*IDS[:2], IDS[0]]}),
            ops({"type": "DELETE", "id": "strat-99999"}),
            ops({"type": "DELETE", "id": IDS[0], "content": "x"}),
            ops({"type": "UPDATE", "id": IDS[0]}),
            ops({"type": "RENAME", "id": IDS[0]}),
            ops({**add, "content": "x" * (MAX_LESSON_CHARS + 1)}),
        ):
            assert not accepted(grammar, bad), bad
    long_reasoning = text({**reply, "reasoning": "x" * (limit + 1)})
    assert not accepted(exact, long_reasoning)
    assert accepted(budgeted, long_reasoning)  # the FieldCloser budgets it in tokens
    # the reflection's bullet tags: visible ids, the three tags, at most one per entry
    reflection = reflection_schema(IDS, 640)
    diagnosis = dict.fromkeys(list(reflection["properties"])[:5], "d")
    tag = {"id": IDS[0], "tag": "helpful"}
    assert accepted(exact, text({**diagnosis, "bullet_tags": [tag] * 3}), reflection)
    for bad in ([tag] * 4, [{**tag, "tag": "useful"}], [{**tag, "id": "err-9"}]):
        assert not accepted(exact, text({**diagnosis, "bullet_tags": bad}), reflection), bad


def test_the_processor_masks_each_row_and_follows_the_tokens_it_sampled(tiny):
    """One `generate` call, step by step: the constrained row may take only what its
    grammar allows next (the reply's own next token among them), the free row is left
    as it was, the row is left alone once its end-of-sequence is accepted, and a
    sampled token the grammar refuses is an error, not a silently broken reply."""
    model, tok, _ = tiny
    eos = eos_token_ids(model, tok)
    grammar = JsonGrammar(tok, model.config.vocab_size, eos, token_budget=False)
    schema = tag_schema(IDS, 96)
    reply = tok('{"reasoning":"ok","bullet_tags":[]}', add_special_tokens=False)["input_ids"]
    tokens = [*reply, eos[0]]
    processor = grammar.processor([schema, None])
    prompt = [5, 6]
    for t in range(len(tokens) + 2):
        done = tokens[:t]
        ids = torch.tensor([prompt + done, prompt + [7] * len(done)])
        scores = processor(ids, torch.zeros(2, model.config.vocab_size))
        assert processor.generated == t
        assert torch.isfinite(scores[1]).all()  # the free row
        if t < len(tokens):
            assert torch.isfinite(scores[0, tokens[t]]) and not torch.isfinite(scores[0]).all()
        else:  # closed and ended: generate pads the row from here on
            assert torch.isfinite(scores[0]).all()
    processor = grammar.processor([schema])
    processor(torch.tensor([prompt]), torch.zeros(1, model.config.vocab_size))
    wrong = tok("x", add_special_tokens=False)["input_ids"][0]  # a reply opens with '{'
    with pytest.raises(RuntimeError, match="broke its grammar"):
        processor(torch.tensor([[*prompt, wrong]]), torch.zeros(1, model.config.vocab_size))


def test_token_tails_are_measured_per_schema_with_the_run_tokenizer(tiny):
    """`tail` caches by the schema's text: two budgets (two schemas) sharing a path must
    not share a measurement, and each is `path_tail` counted by this tokenizer."""
    _, tok, grammar = tiny
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    small, large = reflection_schema(IDS, 160, count), reflection_schema(IDS, 640, count)
    path = ("reasoning",)
    assert grammar.tail(small, path) == path_tail(small, path, count)
    assert grammar.tail(large, path) == path_tail(large, path, count)
    assert grammar.tail(small, path) != grammar.tail(large, path)


def test_text_the_grammar_forces_is_offered_in_its_longest_spelling(tiny):
    """With the token budget on, structure the grammar forces (the reply opens with
    `{"`) is written in the fewest tokens of this tokenizer: only the one-token `{"` is
    allowed, not `{` then `"`. Without a map from spellings to tokens it is not."""
    model, tok, _ = tiny
    vocab = model.config.vocab_size
    allowed = {}
    for token_budget in (False, True):
        grammar = JsonGrammar(tok, vocab, eos_token_ids(model, tok), token_budget=token_budget)
        processor = grammar.processor([tag_schema(IDS, 96)], max_new_tokens=96)
        scores = processor(torch.tensor([[5, 6]]), torch.zeros(1, vocab))
        tokens = torch.isfinite(scores[0]).nonzero().flatten().tolist()
        allowed[token_budget] = {tok.decode([t]) for t in tokens}
    assert allowed == {False: {"{", '{"'}, True: {'{"'}}


def test_reply_cut_at_the_budget_is_reported_unfinished(tiny):
    (gen,) = _replies(tiny, reflection_schema(IDS, 400), n=1, max_new_tokens=10)
    assert not gen.finished and len(gen.token_ids) == 10


def test_forced_structure_is_written_in_the_fewest_tokens():
    token_of = {b'"': 0, b'",': 1, b'","': 2, b"k": 3, b"ke": 4, b"x": 5}
    closer = FieldCloser([None], 100, [b'"', b'",', b'","', b"k", b"ke", b"x"],
                         torch.zeros(6, dtype=torch.bool), forced_text=ForcedText(token_of))  # fmt: skip
    scores = torch.zeros(1, 8)
    assert closer.force_structure(0, '","key":"', scores)
    assert torch.isfinite(scores[0]).tolist() == [False, False, True] + [False] * 5
    scores = torch.zeros(1, 8)
    scores[0, 2] = float("-inf")  # the grammar forbids the longest: the next longest, then
    assert closer.force_structure(0, '","key":"', scores)
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [1]
    scores = torch.zeros(1, 8)
    assert not closer.force_structure(0, "zzz", scores)  # no token begins it: left alone
    assert torch.isfinite(scores).all()


def test_forced_structure_keeps_the_choice_after_it():
    """The tokens that cross the forced text's end carry the model's choice: after
    `"operations":` an empty list is `":` + `[]}` and a full one `":[{"`. Forcing the
    longest piece `":[` alone took the empty list away (the 0.5B curator then wrote
    operations in every reply); a closer that does so fails here."""
    spellings = [b'"', b'":', b'":[', b'":[{"', b"[", b"[]}", b'[{"', b"x", b'"x', b"operations"]
    token_of = {t: i for i, t in enumerate(spellings)}
    closer = FieldCloser([None], 100, spellings, torch.zeros(len(spellings), dtype=torch.bool),
                         forced_text=ForcedText(token_of))  # fmt: skip

    def allowed(forced: str, scores: torch.Tensor) -> set[bytes]:
        assert closer.force_structure(0, forced, scores)
        return {spellings[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()}

    # `":` stays (one token, `[]}`, then writes the rest and the choice); `"` does not
    # (nothing crosses `:[`): the structure is still written in few tokens
    assert allowed('":[', torch.zeros(1, 12)) == {b'":', b'":[', b'":[{"'}
    assert allowed("[", torch.zeros(1, 12)) == {b"[", b"[]}", b'[{"'}
    scores = torch.zeros(1, 12)
    scores[0, token_of[b"[]}"]] = float("-inf")  # the grammar's own mask still rules
    assert allowed("[", scores) == {b"[", b'[{"'}
    # this tokenizer's own "no change" is `operations` + `":` + `[]}`: two pieces in a
    # row. A rule that allowed, after one piece, only a token that ends the forced text
    # (tried in the seventeenth session) took `":` away again and fails here
    assert b"operations" in allowed('operations":[', torch.zeros(1, 12))
    closer.accept(0, token_of[b"operations"])
    assert b'":' in allowed('":[', torch.zeros(1, 12))


def _late_text(grammar, gen, schema, budget) -> int:
    """How many tokens of `gen` extend a free-text string past its token deadline."""
    cursor, late = _JsonCursor(), 0
    for t, token in enumerate(gen.token_ids):
        piece = grammar._token_bytes[token]
        tail = grammar.tail(schema, cursor.path) if cursor.closable() else None
        late += tail is not None and budget - t - SAFETY_TOKENS <= tail and piece[:1] != b'"'
        cursor.feed(piece)
    return late


@pytest.mark.parametrize("build", [reflection_schema, curation_schema])
def test_token_budget_closes_strings_by_their_deadline_where_characters_overrun(tiny, build):
    model, tok, _ = tiny
    budget = 400
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    schema = build(IDS, budget, count)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"task {i}"}]) for i in range(4)]
    late = {}
    for token_budget in (False, True):
        grammar = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok),
                              token_budget=token_budget)  # fmt: skip
        gens = generate(model, tok, prompts, max_new_tokens=budget, temperature=1.0,
                        seeds=list(range(4)), grammar=grammar, json_schemas=[schema] * 4)  # fmt: skip
        late[token_budget] = sum(_late_text(grammar, g, schema, budget) for g in gens)
        if token_budget:
            assert sum(grammar.cut.values()) == sum(g.fields_cut for g in gens) > 0
            for g in gens:
                assert g.finished
                json.loads(g.text, strict=False)  # closed within the budget
    # random bytes run at about a token a character: limits sized at 3 characters a token
    # let the text run past the point where the rest of the object needs the budget
    assert late[False] > 0
    assert late[True] == 0


def test_prefill_continues_under_the_grammar_and_a_bad_one_is_refused(tiny):
    model, tok, grammar = tiny
    opener = '{"reasoning":"'
    prompt = chat_prompt_ids(tok, [{"role": "user", "content": "t"}])
    prompt += tok(opener, add_special_tokens=False)["input_ids"]
    (gen,) = generate(model, tok, [prompt], max_new_tokens=700, temperature=1.0, seeds=[0],
                      grammar=grammar, json_schemas=[reflection_schema(IDS, 160)],
                      json_prefixes=[opener])  # fmt: skip
    assert json.loads(opener + gen.text, strict=False)["key_insight"]
    with pytest.raises(ValueError, match="prefill"):
        generate(model, tok, [prompt], max_new_tokens=4, temperature=1.0, seeds=[0],
                 grammar=grammar, json_schemas=[reflection_schema(IDS, 160)],
                 json_prefixes=['{\n  "reasoning": "'])  # fmt: skip


def test_free_rows_beside_constrained_rows_are_untouched(tiny):
    model, tok, grammar = tiny
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"t{i}"}]) for i in range(2)]
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "seeds": [5, 6]}
    free = generate(model, tok, prompts, **kwargs)
    mixed = generate(model, tok, prompts, grammar=grammar,
                     json_schemas=[None, reflection_schema(IDS, 160)], **kwargs)  # fmt: skip
    assert mixed[0].token_ids == free[0].token_ids
    assert mixed[1].text.startswith('{"reasoning":"') and mixed[1].token_ids != free[1].token_ids


# ---- the trainer ---------------------------------------------------------------------------


def _trainer_config(tiny_model_dir, out, *extra):
    from resd.config import apply_overrides, build_config
    from test_trainer import SEED_PLAYBOOK

    (out.parent / "seed.md").write_text(SEED_PLAYBOOK)
    return build_config(apply_overrides({}, [
        f"model={tiny_model_dir}", f"output_dir={out}", "env=toy_envs:ParityEnv", "steps=2",
        "batch_size=4", "inner_updates=2", "max_new_tokens=8", "reflection_max_new_tokens=500",
        "curation_max_new_tokens=500", "max_teacher_prompt_tokens=1024", "eval_samples=1", "eval_items=1", "warmup_steps=0",
        "progress=false", f"playbook_init={out.parent / 'seed.md'}", "playbook_prune_every=100",
        "structured_output=on", *extra,
    ]))  # fmt: skip


def test_trainer_step_with_structured_output_parses_every_reply(tiny_model_dir, tmp_path):
    from resd.rundir import SKIP_REASONS
    from resd.training.trainer import Trainer

    # a reflection budget tight enough that random text meets its fields' token deadlines
    trainer = Trainer(
        _trainer_config(tiny_model_dir, tmp_path / "run", "reflection_max_new_tokens=280")
    )
    assert trainer.sampler.grammar is not None and trainer.sampler.prefills == {
        "reflection": "",
        "curation": "",
    }
    trainer.train()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["reflections"] for m in metrics) > 0
    for m in metrics:
        assert m["reflections_parsed"] == m["reflections"] and m["reflection_parse_failures"] == 0
        assert m["reflection_truncated"] == 0  # the token budget closed every object in time
        assert m["curations_parsed"] == m["curations"] == m["reflections"]
        skipped = sum(m[f"ops_skipped_{r}"] for r in SKIP_REASONS)
        assert skipped == m["ops_skipped"]  # every skipped operation has its reason
        assert m["ops_skipped_malformed"] == 0
    for row in (
        json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    ):
        if row["reflection_reply"]:  # the raw reply opens a JSON object: no prose before it
            assert row["reflection_reply"].startswith('{"reasoning":"')
            assert parse_reflection(row["reflection_reply"]) is not None
    Playbook.load(tmp_path / "run" / "playbook.json")  # still a valid playbook
    # every field the budget closed early is in the step metrics, whichever reply it was in
    cut = sum(
        m[f"{kind}_fields_cut"] for m in metrics for kind in ("reflection", "tag", "curation")
    )
    assert sum(m["reflection_fields_cut"] for m in metrics) > 0
    assert cut == sum(trainer.sampler.grammar.cut.values())


def test_structured_output_on_without_xgrammar_is_a_config_error(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    from resd.training.trainer import Trainer

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import now fails
    with pytest.raises(ConfigError, match=r"structured_output: .*xgrammar"):
        Trainer(_trainer_config(tiny_model_dir, tmp_path / "a"))
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(_trainer_config(tiny_model_dir, tmp_path / "b", "structured_output=auto"))
    assert trainer.sampler.grammar is None and "xgrammar" in caplog.text
    assert trainer.sampler.prefills["reflection"].startswith("{")  # the free-text opener is back


def test_grammar_available_says_whether_structured_output_can_run(monkeypatch):
    """The check a caller makes before asking for structured output, and the error it
    gets (with the install command) when it asks anyway without xgrammar."""
    assert grammar_available()
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import now fails
    assert not grammar_available()
    with pytest.raises(StructuredOutputUnavailable, match=r"pip install 'resd\[structured\]'"):
        JsonGrammar(None, 8, [0])


# ---- the vLLM request ------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["structured_outputs", "guided_decoding"])
def test_vllm_requests_carry_the_schema(tiny_model_dir, monkeypatch, spelling):
    from resd.generation.vllm_engine import VLLMSampler

    class Params:
        def __init__(self, **kw):
            self.kw = kw

    sampling_params = types.SimpleNamespace()
    if spelling == "structured_outputs":
        sampling_params.StructuredOutputsParams = Params
    else:
        sampling_params.GuidedDecodingParams = Params
    seen = {}

    class LLM:
        def __init__(self, model, **kw):
            pass

        def generate(self, requests, sampling_params=None, use_tqdm=True):
            seen["params"] = sampling_params
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5], finish_reason="length",
                                                             stop_reason=None)]) for _ in requests]  # fmt: skip

    module = types.ModuleType("vllm")
    module.LLM, module.sampling_params = LLM, sampling_params
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sampler = VLLMSampler(
        str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), max_model_len=64
    )
    schema = reflection_schema(IDS, 160)
    sampler.generate([[1], [2]], max_new_tokens=4, temperature=1.0, top_p=1.0,
                     json_schemas=[schema, None])  # fmt: skip
    constrained, free = seen["params"]
    assert getattr(constrained, spelling).kw == {"json": schema}
    assert not hasattr(free, spelling)
    with pytest.raises(ValueError, match="prefill"):
        sampler.generate([[1]], max_new_tokens=4, temperature=1.0, top_p=1.0,
                         json_schemas=[schema], json_prefixes=['{"'])  # fmt: skip


def test_curation_min_operations_forbids_an_empty_list(tiny):
    # the 0.5B curator returned "operations": [] on every call of a headline run
    free, forced = curation_schema(IDS, 160), curation_schema(IDS, 160, min_operations=1)
    assert "minItems" not in free["properties"]["operations"]
    assert forced["properties"]["operations"]["minItems"] == 1
    replies = _replies(tiny, forced)
    assert replies and all(gen.finished for gen in replies)
    assert all(len(json.loads(gen.text, strict=False)["operations"]) >= 1 for gen in replies)


def test_single_call_mode_reflects_and_curates_in_one_reply(tiny_model_dir, tmp_path):
    from resd.training.trainer import Trainer

    trainer = Trainer(_trainer_config(tiny_model_dir, tmp_path / "run", "lesson_calls=one"))
    trainer.train()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["reflections"] for m in metrics) > 0
    for m in metrics:
        # every reflection reply is also the step's curation reply: no curator pass at all
        assert m["curations"] == m["reflections"] == m["reflections_parsed"]
        assert m["curation_tokens"] == 0 and m["time_curate"] < m["time_reflect"] + 1.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    reflected = [r for r in rows if r["reflection_reply"]]
    assert reflected and all(r["curation_reply"] == r["reflection_reply"] for r in reflected)
    assert all("operations" in json.loads(r["reflection_reply"], strict=False) for r in reflected)


def test_json_cursor_knows_when_an_array_may_take_another_item():
    cursor = _JsonCursor()
    cursor.feed(b'{"a":"x","tags":[')
    assert cursor.array_choice and cursor.innermost_array() == 1
    assert cursor.array_path(1) == ("tags",)
    assert cursor.begins_item(1, b'{"') and not cursor.begins_item(1, b"]}")
    cursor.feed(b'{"id":"e')
    assert not cursor.array_choice and cursor.stack[1][2] == 1  # item 0 has begun
    assert not cursor.begins_item(1, b'-1"')  # the rest of this item
    assert cursor.begins_item(1, b'-1"},{"') and not cursor.begins_item(1, b'-1"}]}')
    assert cursor.begins_item(1, b'-1"},')  # after the comma the grammar allows only an item
    cursor.feed(b'-1"}')
    assert cursor.array_choice  # another item, or the closing bracket
    cursor.feed(b",")
    assert not cursor.array_choice and cursor.stack[1][1:] == [1, 1]
    cursor.feed(b'{"id":"e-2"}]')
    assert not cursor.array_choice and cursor.innermost_array() is None
    strings = _JsonCursor()
    strings.feed(b'{"ids":["a"')  # an array of strings: a closed string ends an item
    assert strings.array_choice


def test_array_room_bounds_an_item_in_bytes_and_skips_free_text():
    count = lambda t: len(t) // 2  # noqa: E731
    room = array_room(reflection_schema(IDS, 256), ("bullet_tags",), count)
    longest = max(IDS, key=len)
    # after the list, the object's end (counted as the empty object's two braces)
    assert room == ArrayRoom(count("{}"), len(f'{{"id":"{longest}","tag":"helpful"}}'))
    assert array_room(reflection_schema(IDS, 256), ("reasoning",), count) is None
    # operations hold free text: their strings are budgeted one by one instead
    assert array_room(curation_schema(IDS, 256), ("operations",), count) is None
    assert array_room(reflection_schema([], 256), ("bullet_tags",), count).item_bytes == 2


def test_a_full_array_closes_and_forced_text_does_not_start_another_item():
    spellings = [b'"', b"}", b"},", b'},{"', b"}]", b"}]}", b"]", b",", b"x"]
    token_of = {t: i for i, t in enumerate(spellings)}
    starts = lambda c: torch.tensor([t.startswith(c) for t in spellings])  # noqa: E731
    room = ArrayRoom(after=1, item_bytes=20)

    def closer_at(budget: int) -> FieldCloser:
        closer = FieldCloser([lambda path: None], budget, spellings, starts(b'"'),
                             forced_text=ForcedText(token_of), rooms=[lambda path: room],
                             bracket_starts=starts(b"]"))  # fmt: skip
        closer.cursors[0].feed(b'{"tags":[{"id":"a"')
        return closer

    def allowed(scores: torch.Tensor) -> set[bytes]:
        return {spellings[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()}

    # room for another item: the forced `}` may go on into it
    scores = torch.zeros(1, len(spellings))
    assert closer_at(100).force_structure(0, "}", scores, generated=10)
    assert b'},{"' in allowed(scores)
    # 100 - 70 - 1 - 8 - 1 = 20 spare tokens: 20 bytes still fit; one token more does not
    scores = torch.zeros(1, len(spellings))
    assert closer_at(100).force_structure(0, "}", scores, generated=70)
    assert b'},{"' in allowed(scores)
    closer = closer_at(100)
    scores = torch.zeros(1, len(spellings))
    assert closer.force_structure(0, "}", scores, generated=71)
    assert allowed(scores) == {b"}", b"}]", b"}]}"}  # `},` commits to another item
    # at the choice after the item: only the closing bracket, counted as a cut
    closer.accept(0, token_of[b"}"])
    scores = torch.zeros(1, len(spellings))
    closer.narrow(0, scores, generated=72)
    assert allowed(scores) == {b"]"} and closer.cut["tags"] == 1 and closer.rows_cut == [1]
    scores = torch.zeros(1, len(spellings))
    closer_with_room = closer_at(200)
    closer_with_room.accept(0, token_of[b"}"])
    closer_with_room.narrow(0, scores, generated=72)
    assert torch.isfinite(scores).all()  # room left: the model chooses


def test_garbage_weights_close_the_tag_list_within_the_budget(tiny):
    """Four tags reserved in the tokenizer's own spelling, written in pieces by random
    weights, ran past a 160-token budget inside the list (3 of 16 replies before the
    array rule): every reply now closes, and some tag lists were closed early."""
    model, tok, _ = tiny
    grammar = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok))
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    ids = [*IDS, "code-00004", "misc-00005"]
    schema = reflection_schema(ids, 160, count)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"task {i}"}]) for i in range(16)]
    gens = generate(model, tok, prompts, max_new_tokens=160, temperature=1.0, top_p=0.95,
                    seeds=list(range(16)), grammar=grammar, json_schemas=[schema] * 16)  # fmt: skip
    for gen in gens:
        assert gen.finished, gen.text[-120:]
        reflection = parse_reflection(gen.text)
        assert reflection is not None and not reflection.loose
        assert all(i in ids for i, _ in reflection.bullet_tags)
    assert grammar.cut["bullet_tags"] > 0


def test_a_string_closes_at_its_token_deadline_or_at_a_sentence_end_just_before_it():
    """`FieldCloser.narrow` on its own: a string whose rest of the reply needs 10 tokens
    (its tail) may run while more than that plus SAFETY_TOKENS of the budget is left;
    at that point only the tokens that begin with a quote (and that the grammar allows)
    are left, and the cut is counted. In the last `sentence_window` tokens before it, a
    sentence that has just ended closes the string too. A closer that closed a token
    late (the object then runs past the budget), closed early, closed mid-escape or
    before the string holds a character, or narrowed where the grammar allows no quote
    (every token masked: the row cannot go on), fails here."""
    spellings = [b'"', b'"}', b'",', b"x", b".", b"\\"]
    quotes = torch.tensor([t.startswith(b'"') for t in spellings])
    tails = {("a",): 10, ("b",): None}  # "b": an enum or unbounded string

    names = [*spellings, b"<6>", b"<7>"]  # the model's vocabulary: two more, not spelled

    def narrowed(prefill: str, generated: int, forbid: tuple[int, ...] = ()):
        closer = FieldCloser([lambda path: tails.get(path)], 100, spellings, quotes,
                             prefills=[prefill], sentence_window=16)  # fmt: skip
        scores = torch.zeros(1, len(names))
        scores[0, list(forbid)] = float("-inf")  # the grammar's own mask
        closer.narrow(0, scores, generated)
        return {names[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()}, closer

    deadline = 100 - SAFETY_TOKENS - 10  # 82 tokens generated: only the tail is left
    everything = set(names)
    allowed, closer = narrowed('{"a":"x', deadline - 1)
    assert allowed == everything and not closer.cut
    allowed, closer = narrowed('{"a":"x', deadline)
    assert allowed == {b'"', b'"}', b'",'}  # the unspelled tokens are masked too
    assert closer.cut == {"a": 1} and closer.rows_cut == [1]
    allowed, closer = narrowed('{"a":"x', deadline, forbid=(1,))
    assert allowed == {b'"', b'",'}  # the grammar's mask still rules
    # the grammar allows nothing but a quote (a lesson at its character cap): the schema
    # closed the string, not the budget, so it is not counted as a cut
    allowed, closer = narrowed('{"a":"x', deadline, forbid=(3, 4, 5, 6, 7))
    assert allowed == {b'"', b'"}', b'",'} and not closer.cut and closer.rows_cut == [0]
    # the grammar allows no quote: left as it was, not counted (never an all -inf row)
    allowed, closer = narrowed('{"a":"x', deadline + 5, forbid=(0, 1, 2))
    assert allowed == everything - {b'"', b'"}', b'",'} and not closer.cut
    # a sentence that ends within the window closes the string; before the window it does not
    assert narrowed('{"a":"x. ', deadline - 16)[0] == {b'"', b'"}', b'",'}
    assert narrowed('{"a":"x. ', deadline - 17)[0] == everything
    assert narrowed('{"a":"x', deadline - 16)[0] == everything  # no sentence end: runs on
    # nothing to close: an empty string, half an escape, a string with no tail, a key
    for prefill in ('{"a":"', '{"a":"x\\', '{"b":"x', '{"a', '{"a":"x","'):
        allowed, closer = narrowed(prefill, deadline + 5)
        assert allowed == everything and not closer.cut, prefill
    # a row with no schema (no tail at all) is never narrowed, even on its first step
    free = FieldCloser([None], 100, spellings, quotes)
    scores = torch.zeros(1, len(names))
    free.narrow(0, scores, 99)
    assert torch.isfinite(scores).all()
    fresh = FieldCloser([lambda path: 10], 100, spellings, quotes)  # no prefill
    fresh.narrow(0, scores, 99)
    assert torch.isfinite(scores).all()


def test_forced_text_falls_back_to_the_longest_piece_the_grammar_allows():
    """Where none of the tokens `ForcedText.tokens` offers is allowed, `force_structure`
    writes the longest token that begins the forced text and that the grammar allows:
    the fewest tokens for the structure. A search that skipped the longest spelling, or
    took the shortest, fails here."""
    forced = ForcedText({b'"': 0, b'",': 1, b'","': 2, b"x": 3})
    assert forced.longest_piece(b'","k', lambda t: True) == 2
    assert forced.longest_piece(b'","k', lambda t: t != 2) == 1
    assert forced.longest_piece(b'","k', lambda t: t == 0) == 0
    assert forced.longest_piece(b"k", lambda t: True) is None
    assert ForcedText({}).longest_piece(b'"', lambda t: True) is None


def test_budgeted_schema_lifts_top_level_limits_and_keeps_lessons_at_the_playbook_cap():
    """What the grammar enforces with the token budget on: top-level free text has no
    `maxLength` (the `FieldCloser` closes it in tokens), a lesson keeps the playbook's
    MAX_LESSON_CHARS however small the budget made it, and every other constraint (enums,
    item counts, the object's keys) is as the schema wrote it. The schema passed in is
    left untouched: it is also what the closer measures."""
    schema = curation_schema(IDS, 192)
    before = json.dumps(schema)
    budgeted = budgeted_schema(schema)
    assert json.dumps(schema) == before
    assert "maxLength" not in budgeted["properties"]["reasoning"]
    assert budgeted["properties"]["reasoning"]["minLength"] == 1
    lessons = _lesson_chars(schema)
    assert lessons and max(lessons) < MAX_LESSON_CHARS  # a small budget sized them below the cap
    assert set(_lesson_chars(budgeted)) == {MAX_LESSON_CHARS}
    ops, budgeted_ops = schema["properties"]["operations"], budgeted["properties"]["operations"]
    assert budgeted_ops["maxItems"] == ops["maxItems"]
    assert _op_shapes(budgeted)["ADD"]["properties"]["section"] == {"enum": list(SECTIONS.values())}
    assert budgeted["required"] == schema["required"]
    # a free string nested one level down (an array's items) is not top level: it keeps a cap
    notes = {"type": "object", "properties": {"notes": {"type": "array", "maxItems": 2,
             "items": {"type": "string", "minLength": 1, "maxLength": 40}}}}  # fmt: skip
    item = budgeted_schema(notes)["properties"]["notes"]["items"]
    assert item["maxLength"] == MAX_LESSON_CHARS


def test_json_cursor_waits_for_a_whole_utf8_character_before_a_string_may_close():
    """A token may end inside a multi-byte character; a closing quote there would break
    it (the reply would not decode). The lead byte says how many continuation bytes are
    due: one for é, two for अ and €, three for 😀. A cursor that miscounted them allowed
    the quote mid-character, or never again after the first non-ASCII character."""
    for char in ("é", "अ", "€", "😀"):
        data = char.encode()
        cursor = _JsonCursor()
        cursor.feed(b'{"a":"x')
        for n, b in enumerate(data):
            cursor.feed(bytes([b]))
            assert cursor.closable() == (n == len(data) - 1), (char, n)
        cursor.feed(b"y")  # ASCII after it: still closable
        assert cursor.closable() and cursor.chars == 2 + len(data)


def test_path_tail_reserves_the_longest_rest_of_the_reply_exactly():
    """`path_tail` on a schema small enough to spell out: after a string, the rest of
    every enclosing object and array at its longest (consts and the longest enum value
    written in full, an `anyOf` at its costliest shape with structure at two characters
    a token and text at three, later items up to `maxItems`), plus every later string's
    share. A measure that took a shorter rest lets the reply run out of budget before
    its object closes; one that took a longer rest cuts text that had room."""
    # the ADD costs 30/2 + 12/3 = 19 tokens at its longest, the DELETE 37/2 = 18.5
    delete = {"type": {"const": "DELETE"}, "id": {"enum": ["x", "long-id-1"]}}
    add = {"type": {"const": "ADD"}, "content": {"type": "string", "maxLength": 12}}
    shapes = [{"type": "object", "properties": delete}, {"type": "object", "properties": add}]
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 30},
        "kind": {"enum": ["no", "maybe"]},
        "ops": {"type": "array", "maxItems": 2, "items": {"anyOf": shapes}},
        "b": {"type": "string", "maxLength": 9},
    }}  # fmt: skip
    item = '{"type":"ADD","content":""}'  # the costlier shape, its string empty
    rest = f'{{"kind":"maybe","ops":[{item},{item}],"b":""}}'
    assert path_tail(schema, ("a",), len) == len(rest) + math.ceil((2 * 12 + 9) / CHARS_PER_TOKEN)
    # inside the first lesson: its object's end, one more item, the last string
    first = len("{}") + len(f"[{item}]") + len('{"b":""}') + math.ceil((12 + 9) / CHARS_PER_TOKEN)
    assert path_tail(schema, ("ops", 0, "content"), len) == first
    last = len("{}") + len("[]") + len('{"b":""}') + math.ceil(9 / CHARS_PER_TOKEN)
    assert path_tail(schema, ("ops", 1, "content"), len) == last
    assert path_tail(schema, ("b",), len) == len("{}")  # only the object's end is left
    # not free text, or not in the schema: no tail
    for path in (("kind",), ("ops", 0, "id"), ("ops",), ("nope",), ("a", "x"), ()):
        assert path_tail(schema, path, len) is None, path
    unbounded = {"type": "object", "properties": {"s": {"type": "string"}}}  # no maxLength
    assert path_tail(unbounded, ("s",), len) is None


def test_forced_text_keeps_the_longest_piece_and_only_pieces_a_token_crosses_after():
    """`":[` where the only token that goes on past it opens an item (`":[{"`): the
    longest piece `":` stays allowed, so `[` and `]}` (an empty list) can still be
    written after it; `"` does not, since no token crosses the end after it (`:[` is a
    token, but one that ends exactly there chooses nothing). A rule without the longest
    piece left only the item (the empty list gone, as when `":[` alone was forced); one
    that took a token ending at the text's end for one that crosses it let `"` in."""
    spellings = [b'"', b'":', b":[", b'":[{"', b"[", b"]}"]
    token_of = {t: i for i, t in enumerate(spellings)}
    closer = FieldCloser([None], 100, spellings, torch.zeros(len(spellings), dtype=torch.bool),
                         forced_text=ForcedText(token_of))  # fmt: skip
    scores = torch.zeros(1, len(spellings))
    assert closer.force_structure(0, '":[', scores)
    allowed = {spellings[i] for i in torch.isfinite(scores[0]).nonzero().flatten().tolist()}
    assert allowed == {b'":', b'":[{"'}


def test_forced_text_never_offers_a_token_past_the_models_logits():
    """A spelling whose token id is the scores' width (a token the model has no logit
    for) is never offered, by the forced-text token sets nor by the fallback to the
    longest piece: indexing it would raise. The token sets are built once per text and
    device, not once per step; a sampled token with no spelling is skipped."""
    forced = ForcedText({b'"': 0, b'",x': 3, b'",': 4, b"y": 1})
    closer = FieldCloser([lambda path: None], 100, [b'"', b"y", b"z"],
                         torch.zeros(3, dtype=torch.bool), forced_text=forced)  # fmt: skip
    scores = torch.zeros(1, 3)  # logits for tokens 0..2 only
    assert forced.tokens(b'",x', scores).tolist() == []  # `",x` and `",` lie past the logits
    assert forced.tokens(b'",x', scores) is forced.tokens(b'",x', scores)  # cached
    assert closer.force_structure(0, '",x', scores)  # the fallback: the longest piece in range
    assert torch.isfinite(scores[0]).tolist() == [True, False, False]
    closer.accept(0, 3)  # a token past the spelled vocabulary moves the cursor nowhere
    assert closer.cursors[0].stack == [] and closer.cursors[0].path is None


def test_only_text_that_ends_a_sentence_closes_a_string_before_its_deadline():
    """With the default `sentence_window` (SENTENCE_WINDOW_TOKENS), a string whose text
    has just ended a sentence closes one token before its deadline. A string holding only
    a space has ended no sentence, and a string just opened starts afresh: the sentence
    the previous string ended and its characters do not carry over (an empty string may
    not close at all). A row without a schema may have a prefill beside one with a
    schema. A closer with no window, or one that carried a string's state into the next,
    or that began a string as a sentence end, fails here; so does one that, built
    without array rooms or forced text (both optional), raised."""
    spellings = [b"x", b".", b'"', b'"}', b'",']  # the last spelled token closes a string
    quotes = torch.tensor([t.startswith(b'"') for t in spellings])
    tails = {("a",): 10, ("c",): 10}
    deadline = 100 - SAFETY_TOKENS - 10
    closing = {b'"', b'"}', b'",'}

    def narrowed(prefill: str, generated: int) -> set[bytes]:
        closer = FieldCloser([None, lambda path: tails.get(path)], 100, spellings, quotes,
                             prefills=["Lessons: ", prefill])  # fmt: skip
        scores = torch.zeros(2, len(spellings))
        closer.narrow(0, scores, generated)
        closer.narrow(1, scores, generated)
        assert torch.isfinite(scores[0]).all()  # the free row is never narrowed
        return {spellings[i] for i in torch.isfinite(scores[1]).nonzero().flatten().tolist()}

    assert narrowed('{"a":"x. ', deadline - 1) == closing
    assert narrowed('{"a":"x. ', deadline - SENTENCE_WINDOW_TOKENS) == closing
    assert narrowed('{"a":"x. ', deadline - SENTENCE_WINDOW_TOKENS - 1) == set(spellings)
    assert narrowed('{"a":" ', deadline - 1) == set(spellings)  # a space ends no sentence
    assert narrowed('{"a":"x. ","c":" ', deadline - 1) == set(spellings)
    assert narrowed('{"a":"x. ","c":"', deadline + 5) == set(spellings)  # empty: stays open
    # built without array rooms or forced text, it leaves arrays and structure to the grammar
    assert narrowed('{"a":"x","l":[', deadline + 5) == set(spellings)
    bare = FieldCloser([lambda path: 10], 100, spellings, quotes)
    scores = torch.zeros(1, len(spellings))
    assert not bare.force_structure(0, '","', scores) and torch.isfinite(scores).all()


def test_json_cursor_holds_a_string_open_to_the_last_byte_of_an_escape():
    """A closing quote may follow an escape only once it is whole: `\\n` after its second
    byte, `\\u00e9` after its sixth. A cursor that counted the four hex digits two at a
    time allowed the quote inside `\\u00e9`; one that read every escape as `\\u` held the
    string open four bytes after a `\\n`."""
    for escape, whole_after in ((b"\\n", 2), (b"\\u00e9", 6), (b'\\"', 2)):
        cursor = _JsonCursor()
        cursor.feed(b'{"a":"x')
        closable = []
        for b in escape:
            cursor.feed(bytes([b]))
            closable.append(cursor.closable())
        assert closable == [n + 1 == whole_after for n in range(len(escape))], escape
        assert cursor.path == ("a",)


def test_json_cursor_counts_the_items_of_an_array_of_numbers():
    """In an array of numbers (fixed items, like tags) an item is begun by its first
    digit and the next one only after a comma: the digits after the first neither begin
    an item nor count as one. A cursor that counted every byte, or took every byte in an
    array for a comma, would let a full array's number run on as another item."""
    cursor = _JsonCursor()
    cursor.feed(b'{"n":[12')
    assert cursor.stack[1][1:] == [0, 1]  # item 0 has begun
    assert not cursor.begins_item(1, b"3") and not cursor.begins_item(1, b"]}")
    assert cursor.begins_item(1, b",") and cursor.begins_item(1, b",4")
    cursor.feed(b",345")
    assert cursor.stack[1][1:] == [1, 2] and cursor.array_path(1) == ("n",)
    assert cursor.path is None and cursor.field is None  # no string is open
    cursor.feed(b'],"s":"x')
    assert cursor.path == ("s",) and cursor.field == "s" and cursor.closable()
    root = _JsonCursor()  # a reply that is itself an array
    root.feed(b"[1,")
    assert root.innermost_array() == 0 and root.array_path(0) == ()
    assert root.begins_item(0, b"2") and not root.begins_item(0, b"]")


def test_path_tail_reserves_an_anyof_at_its_costliest_shape_structure_or_text():
    """Of an `anyOf`'s shapes the reserve takes the costliest, structure at two
    characters a token and text at three: a 32-character constant shape (16 tokens)
    outweighs a 19-character shape with 6 characters of text (11.5), and is reserved
    as written. A measure that weighed text at three tokens a character reserved the
    smaller shape, and one that misspelled the constant reserved the wrong length."""
    long = {"type": "object", "properties": {"type": {"const": "A-LONG-CONSTANT-NAME"}}}
    short = {"type": "object", "properties": {"t": {"const": "B"},
             "s": {"type": "string", "maxLength": 6}}}  # fmt: skip
    schema = {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 3}, "x": {"anyOf": [short, long]}}}  # fmt: skip
    assert path_tail(schema, ("a",), len) == len('{"x":{"type":"A-LONG-CONSTANT-NAME"}}')


def test_a_cut_inside_an_operation_counts_under_its_innermost_key():
    """A lesson closed at its deadline counts as a cut of `content`, and a MERGE's `ids`
    (fixed items inside an operation) closed for want of room as one of `ids`: the
    innermost key, not `operations` around them."""
    spellings = [b'"', b"]", b",", b"x"]
    starts = lambda c: torch.tensor([t.startswith(c) for t in spellings])  # noqa: E731
    room = ArrayRoom(after=1, item_bytes=20)
    closer = FieldCloser([lambda path: None], 40, spellings, starts(b'"'),
                         rooms=[lambda path: room if path[-1] == "ids" else None],
                         bracket_starts=starts(b"]"))  # fmt: skip
    closer.cursors[0].feed(b'{"operations":[{"type":"MERGE","ids":["a"')
    assert closer.cursors[0].array_choice
    scores = torch.zeros(1, len(spellings))
    closer.narrow(0, scores, generated=20)
    assert torch.isfinite(scores[0]).tolist() == [False, True, False, False]
    assert closer.cut == {"ids": 1} and closer.rows_cut == [1]
    # the grammar allows only the bracket (the list at its maxItems): not the budget's cut
    capped = FieldCloser([lambda path: None], 40, spellings, starts(b'"'),
                         rooms=[lambda path: room], bracket_starts=starts(b"]"))  # fmt: skip
    capped.cursors[0].feed(b'{"operations":[{"type":"MERGE","ids":["a"')
    scores = torch.tensor([[float("-inf"), 0.0, float("-inf"), float("-inf")]])
    capped.narrow(0, scores, generated=20)
    assert torch.isfinite(scores[0]).tolist() == [False, True, False, False]
    assert not capped.cut and capped.rows_cut == [0]
    # given no bracket tokens it cannot close the array: left to the grammar, not counted
    blind = FieldCloser([lambda path: None], 40, spellings, starts(b'"'),
                        rooms=[lambda path: room if path[-1] == "ids" else None])  # fmt: skip
    blind.cursors[0].feed(b'{"operations":[{"type":"MERGE","ids":["a"')
    scores = torch.zeros(1, len(spellings))
    blind.narrow(0, scores, generated=20)
    assert torch.isfinite(scores).all() and not blind.cut and blind.rows_cut == [0]
    lesson = FieldCloser([lambda path: 10], 40, spellings, starts(b'"'),
                         prefills=['{"operations":[{"type":"ADD","content":"x'])  # fmt: skip
    scores = torch.zeros(1, len(spellings))
    lesson.narrow(0, scores, generated=30)
    assert torch.isfinite(scores[0]).tolist() == [True, False, False, False]
    assert lesson.cut == {"content": 1}


def test_array_room_is_none_for_a_path_off_the_schema():
    """`array_room`, like `path_tail`, answers None for a path the schema does not hold
    (a key it does not have, an index into an object) rather than raising."""
    schema = reflection_schema(IDS, 256)
    for path in (("nope",), ("reasoning", 0), ("bullet_tags", "id")):
        assert array_room(schema, path, len) is None, path
