"""Reply parsing: every way a small model mangles JSON, and the fallbacks."""

from __future__ import annotations

import pytest

from resd.training.parsing import (
    MAX_REPLY_CHARS,
    extract_bullet_tags,
    extract_json_object,
    extract_json_objects_anywhere,
    extract_loose_fields,
)
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


def test_a_reply_is_read_up_to_its_50000th_character_and_no_further() -> None:
    """Catches the reply cap dropped or off by one in any reader: text that ends at
    character 50,000 is read whole, one character more is cut."""
    assert MAX_REPLY_CHARS == 50_000
    cut = "x" * 49_990 + '{"a": "' + "b" * 100  # 3 b's fit before the cap
    past = "x" * 50_000 + '{"a": 12}'
    assert extract_json_object(cut) == {"a": "bbb"} and extract_json_object(past) is None
    assert extract_json_objects_anywhere(cut) == [{"a": "bbb"}]
    assert extract_json_objects_anywhere(past) == []
    tag = "strat-00001 helpful"
    assert extract_bullet_tags(None, " " * 49_981 + tag) == [("strat-00001", "helpful")]
    assert extract_bullet_tags(None, " " * 49_982 + tag) == []
    assert extract_loose_fields('"k": "' + "v" * 49_994, ("k",)) == {"k": "v" * 49_994}
    assert extract_loose_fields('"k": "' + "v" * 49_995, ("k",)) == {"k": "v" * 49_994}


def test_non_string_replies_give_empty_results() -> None:
    """Catches a reader that raises on a reply that is not text."""
    for reply in (None, b'{"a": 1}', 42):
        assert extract_json_object(reply) is None  # type: ignore[arg-type]
        assert extract_json_objects_anywhere(reply) == []  # type: ignore[arg-type]
        assert extract_loose_fields(reply, ("a",)) == {}  # type: ignore[arg-type]
        assert extract_bullet_tags(None, reply) == []  # type: ignore[arg-type]


def test_a_reply_cut_inside_a_nested_list_is_closed_in_order() -> None:
    """Catches a truncated reply closed in the wrong order (`}]` for `]}`) or with the
    prose before its object: cut-off replies are the commonest failure."""
    assert extract_json_object('{"a": [1, 2') == {"a": [1, 2]}
    assert extract_json_object('Here it is: {"a": [1, {"b": "c') == {"a": [1, {"b": "c"}]}


def test_escaped_quotes_and_raw_newlines_stay_inside_strings() -> None:
    """Catches an escaped quote taken as the end of a string (its `}` then ends the
    object early) and raw newlines or tabs inside a string refused."""
    assert extract_json_object('{"a": "say \\"}\\" now", "c": 1} done') == {
        "a": 'say "}" now',
        "c": 1,
    }
    assert extract_json_object('{"a": "line one\nline two\tend"}') == {
        "a": "line one\nline two\tend"
    }


def test_an_apostrophe_inside_a_word_does_not_open_a_string() -> None:
    """Catches apostrophes in prose braces ("{robot's}", "{I'm}") taken as quotes, which
    swallows the real object after them."""
    assert extract_json_object('Set the {robot\'s} colour: {"a": 1}') == {"a": 1}
    assert extract_json_object('Hmm {I\'m not sure} {"a": 1}') == {"a": 1}
    # a quote after a space still opens a string, so its brace is text
    assert extract_json_object("{'a': 'x}y'}") == {"a": "x}y"}


def test_python_false_and_curly_single_quotes() -> None:
    """Catches JSON `false` not mapped for the Python-literal fallback and curly single
    quotes not straightened."""
    assert extract_json_object("{'ok': false, 'x': 1,}") == {"ok": False, "x": 1}
    assert extract_json_object("{‘a’: 1}") == {"a": 1}


def test_curly_quotes_inside_strings_survive_a_trailing_comma() -> None:
    """Catches the trailing-comma repair of the unstraightened text dropping the bracket
    it keeps: then a valid string with curly quotes and a trailing comma is lost."""
    assert extract_json_object('{"a": "he said “no”",}') == {"a": "he said “no”"}


def test_a_garbled_outer_object_is_not_replaced_by_an_inner_one() -> None:
    """Catches `extract_json_object` returning an inner object of a reply whose outer
    object does not parse: tags must then come from the regex fallback, not be lost."""
    reply = '{"reasoning": oops, "bullet_tags": [{"id": "strat-00001", "tag": "helpful"}'
    assert extract_json_object(reply) is None
    assert parse_tags(reply) == [("strat-00001", "helpful")]


def test_operations_inside_a_complete_but_invalid_object_are_salvaged() -> None:
    """Catches the salvage scan skipping the inner objects of a closed outer object that
    does not parse, or doubling them, or missing one after a stuttered `{{`."""
    reply = (
        '{"operations": [{"type": "ADD", "section": "err", "content": "x"}, oops, '
        '{"type": "DELETE", "id": "misc-00001"}]}'
    )
    assert parse_operations(reply) == [
        {"type": "ADD", "section": "err", "content": "x"},
        {"type": "DELETE", "id": "misc-00001"},
    ]
    assert extract_json_objects_anywhere('{{"type": "ADD", "content": "x"}') == [
        {"type": "ADD", "content": "x"}
    ]
    assert extract_json_objects_anywhere('{{"a": 1} oops}') == [{"a": 1}]
    assert extract_json_object('{oops}{"a": 1}') == {"a": 1}


def test_an_object_inside_a_fence_with_prose_is_found() -> None:
    """Catches fenced blocks searched only as a whole: prose inside the fence, and an
    unclosed brace before it, must not hide the object."""
    reply = 'Broken { here\n```json\n{"a": 1} and a note\n```'
    assert extract_json_object(reply) == {"a": 1}


def test_work_on_a_hostile_reply_is_bounded() -> None:
    """Catches the span limits dropped or off by one: at most 20 top-level candidates for
    `extract_json_object`, 100 objects for `extract_json_objects_anywhere`."""
    assert extract_json_object("{x} " * 19 + '{"a": 1}') == {"a": 1}
    assert extract_json_object("{x} " * 20 + '{"a": 1}') is None
    assert len(extract_json_objects_anywhere('{"a": 1} ' * 150)) == 100


def test_tags_of_a_parsed_reply_come_only_from_its_tag_list() -> None:
    """Catches the regex fallback run on a reply that parsed: an id and a tag word in the
    reasoning of a parsed reflection are not a vote."""
    reply = '{"reasoning": "strat-00001: helpful, I think"}'
    assert extract_bullet_tags(extract_json_object(reply), reply) == []


def test_tag_items_of_the_wrong_shape_are_skipped() -> None:
    """Catches tag items that are not an (id, tag) pair of strings being read anyway
    (a crash, a repeated pair, or a two-letter string split into id and tag), and the
    `tags` / `bullet_id` spellings and bracketed ids not accepted."""
    parsed = {
        "tags": [
            {"id": "strat-00001", "tag": "helpful"},
            "junk",
            "ab",
            ["err-00002", "harmful", "extra"],
            {"id": 5, "tag": "helpful"},
            {"id": "calc-00003", "tag": None},
            {"bullet_id": "[ctx-00004]", "tag": "Neutral"},
        ]
    }
    assert extract_bullet_tags(parsed, "") == [("strat-00001", "helpful"), ("ctx-00004", "neutral")]


def test_loose_fields_skip_blank_values() -> None:
    """Catches a key kept with an empty value: a blank field is no diagnosis."""
    assert extract_loose_fields('"a": "  "\n"b": "x', ("a", "b")) == {"b": "x"}
