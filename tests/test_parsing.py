"""Reply parsing: every way a small model mangles JSON, and the fallbacks."""

from __future__ import annotations

import pytest

from resd.training.parsing import extract_bullet_tags, extract_json_object, extract_loose_fields
from resd.training.reflection import parse_operations, parse_reflection, parse_tags


@pytest.mark.parametrize(
    "reply",
    [
        '{"a": 1, "b": [1, 2]}',
        'Sure! Here it is:\n```json\n{"a": 1, "b": [1, 2]}\n```\nHope this helps {really}.',
        '{"a": 1, "b": [1, 2]} and some prose with {braces}',
        '{"a": 1, "b": [1, 2,],}',
        "{'a': 1, 'b': [1, 2]}",
        "```\n{'a': 1, 'b': [1, 2],}\n```",
        '{"a": 1, "b": [1, 2]',  # truncated
        "“a”",  # no object: checked below
    ][:-1],
)
def test_extract_json_object_variants(reply):
    assert extract_json_object(reply) == {"a": 1, "b": [1, 2]}


def test_curly_quotes_inside_valid_strings_are_kept_and_outside_them_rescued():
    """A valid object whose text holds curly quotes parsed only by the line-level
    fallback when they were straightened first (the string ended at the first one):
    random weights under the grammar hit this in 3 of 16 reflections."""
    reply = '{"reasoning": "it said “no” here", "key_insight": "quote ‘it’"}'
    assert extract_json_object(reply) == {
        "reasoning": "it said “no” here",
        "key_insight": "quote ‘it’",
    }
    reflection = parse_reflection(reply)
    assert reflection is not None and not reflection.loose
    assert extract_json_object("{“a”: 1, “b”: [1, 2]}") == {"a": 1, "b": [1, 2]}


def test_extract_json_object_failures_return_none():
    for reply in ["", "no braces", "{not: valid: at all", "[1, 2, 3]", None, "{" * 10_000]:
        assert extract_json_object(reply) is None  # type: ignore[arg-type]


def test_python_literals_and_apostrophes():
    assert extract_json_object("{'ok': true, 'x': null, 'why': \"don't\"}") == {
        "ok": True,
        "x": None,
        "why": "don't",
    }


def test_bullet_tags_shapes_and_regex_fallback():
    assert extract_bullet_tags({"bullet_tags": [{"id": "strat-00001", "tag": "Helpful"}]}, "") == [
        ("strat-00001", "helpful")
    ]
    assert extract_bullet_tags({"bullet_tags": [["err-00002", "harmful"]]}, "") == [
        ("err-00002", "harmful")
    ]
    assert extract_bullet_tags({"bullet_tags": {"calc-00003": "neutral"}}, "") == [
        ("calc-00003", "neutral")
    ]
    raw = 'tags: [strat-00001] helpful, "err-00002": "harmful" and calc-00003 -> neutral'
    assert extract_bullet_tags(None, raw) == [
        ("strat-00001", "helpful"),
        ("err-00002", "harmful"),
        ("calc-00003", "neutral"),
    ]


def test_parse_reflection_json_and_loose():
    good = parse_reflection(
        '```json\n{"reasoning": "r", "error_identification": "off by one", "root_cause_analysis": "carry",'
        ' "correct_approach": "add carefully", "key_insight": "check the units digit",'
        ' "bullet_tags": [{"id": "strat-00001", "tag": "harmful"}]}\n```'
    )
    assert good is not None and not good.loose
    assert good.as_text().splitlines()[0] == "Error: off by one"
    assert "Key insight: check the units digit" in good.as_text()
    assert good.bullet_tags == [("strat-00001", "harmful")]
    # What SmolLM2-135M actually writes after the prefill: keys right, commas missing.
    loose = parse_reflection(
        '{\n  "reasoning": "The sum was wrong."\n  "error_identification": "13 instead of 12\n'
        '  "key_insight": "Check the result"\n}'
    )
    assert loose is not None and loose.loose
    assert loose.fields["error_identification"] == "13 instead of 12"
    assert loose.fields["key_insight"] == "Check the result"
    assert parse_reflection('{"reasoning": "only reasoning"}') is None
    assert parse_reflection("I have no idea") is None


def test_loose_fields_ignore_other_keys():
    assert extract_loose_fields('"a": "1"\n"b": 2\n"c": "three', ("a", "b", "c", "d")) == {
        "a": "1",
        "c": "three",
    }


def test_parse_tags_and_operations():
    assert parse_tags('{"bullet_tags": []}') == []
    assert parse_tags("nothing here") is None
    assert parse_tags("[strat-00001] helpful") == [("strat-00001", "helpful")]
    ops = parse_operations('{"operations": {"type": "ADD", "section": "strat", "content": "x"}}')
    assert ops == [{"type": "ADD", "section": "strat", "content": "x"}]
    assert parse_operations('{"reasoning": "no ops"}') is None
    truncated = (
        '{\n  "operations": [\n    {"type": "ADD", "section": "err", "content": "check carries'
    )
    assert parse_operations(truncated) == [
        {"type": "ADD", "section": "err", "content": "check carries"}
    ]


def test_operations_salvaged_from_garbled_reply():
    reply = (
        '{\n  "operations": [\n    {"type": "ADD", "section": "err", "content": "carry the one"},\n'
        '    {"type": "UPDATE", "c_id": 12_3, "data": [oops}\n    {"type": "DELETE", "id": "misc-00001"}, ]'
    )
    assert parse_operations(reply) == [
        {"type": "ADD", "section": "err", "content": "carry the one"},
        {"type": "DELETE", "id": "misc-00001"},
    ]
