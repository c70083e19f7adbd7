"""Lesson guards at their bounds, and the reflect / tag / curate prompts and parsers.

Each test names the fault it catches; they came from mutation testing `guards.py` and
`reflection.py`, where these faults went unnoticed by the other tests. Expected values
are written out by hand.
"""

from __future__ import annotations

import json

from resd.rundir import SKIP_REASONS
from resd.training.guards import (
    REASONS,
    LessonSource,
    contains_answer,
    copied_fraction,
    lesson_problem,
    word_overlap,
)
from resd.training.reflection import (
    OPERATION_SHAPES,
    Reflection,
    curation_messages,
    parse_operations,
    parse_reflection,
    reflection_followup,
    reflection_messages,
    success_tag_followup,
    success_tag_messages,
)

TASK = (
    "Design a factory that accepts every tape containing the pattern red blue red and "
    "rejects all other tapes. End your reply with the program in a code block."
)
FEEDBACK = "The program accepted the tape BRB although it does not contain the pattern RBR."
SOURCE = LessonSource(task=TASK, feedback=FEEDBACK, answer="1770384")

KEY_LINES = (
    '- "reasoning": ',
    '- "error_identification": ',
    '- "root_cause_analysis": ',
    '- "correct_approach": ',
    '- "key_insight": ',
    '- "bullet_tags": ',
)
SECTIONS_LINE = (
    "Sections: Strategies & Insights, Formulas & Calculations, Code Snippets & Templates, "
    "Common Mistakes to Avoid, Problem-Solving Heuristics, Context Clues & Indicators, Others."
)
ADD_SHAPE = '{"type": "ADD", "section": "<section name>", "content": "<a one-sentence lesson>"}'
DELETE_SHAPE = '{"type": "DELETE", "id": "<entry id>"}'
TASK_MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


# ---- guards ---------------------------------------------------------------------------------


def test_too_short_applies_each_bound_on_its_own() -> None:
    """Catches MIN_CHARS or MIN_WORDS changed, `<` made `<=`, or the two bounds joined by
    `and`: 16 characters in 4 words is long enough, 15 is not, and 3 long words are not."""
    assert lesson_problem("Sort it, then go", SOURCE) is None  # 16 characters, 4 words
    assert lesson_problem("Sort it then go", SOURCE) == "too_short"  # 15 characters
    assert lesson_problem("Normalise denominators first.", SOURCE) == "too_short"  # 3 words


def test_exactly_half_copied_is_a_copy() -> None:
    """Catches `>=` COPIED_FRACTION made `>` for the task or the feedback: 6 of 12 words in
    a shared 6-word run is a copy."""
    half_task = "accepts every tape containing the pattern, so start at the entry node"
    assert copied_fraction(half_task, TASK) == 0.5
    assert lesson_problem(half_task, SOURCE) == "copies_task"
    half_feedback = "it does not contain the pattern: then route those tapes to reject"
    assert copied_fraction(half_feedback, FEEDBACK) == 0.5
    assert lesson_problem(half_feedback, SOURCE) == "copies_feedback"


def test_an_empty_lesson_or_source_is_no_copy() -> None:
    """Catches the empty-input early return removed (a division by zero), its `or` made
    `and`, or it returning 1.0: with no task text every lesson was a copy of the task."""
    assert copied_fraction("", "one two three four five six") == 0.0
    assert copied_fraction("one two three four five six", "") == 0.0
    good = "Before routing, check whether the tape is empty and reject it at once."
    assert lesson_problem(good, LessonSource()) is None


def test_copied_fraction_by_hand_at_the_source_end_and_over_overlapping_runs() -> None:
    """Catches the source's last n-gram dropped (`range(len(src) - n)`), and overlapping
    shared runs counted twice or their coverage slice shifted: a fraction above 1."""
    source = "one two three four five six seven eight nine"
    assert copied_fraction("four five six seven eight nine", source) == 1.0
    assert copied_fraction("one two three four five six seven", "zero " + source) == 1.0
    # bigrams of the source: "b a", "a b", "b b"; only the middle "a" of "a a a" is outside
    assert copied_fraction("b b a b b a b a a a b a", "b a b b a b", n=2) == 11 / 12


def test_whitespace_answer_marks_nothing() -> None:
    """Catches `if not answer: return False` removed in `contains_answer`: an answer that is
    only whitespace became an empty pattern that matched beside any punctuation."""
    assert not contains_answer("first a, then b", "   ")
    lesson = "Check the carry, then the sign of the result."
    assert lesson_problem(lesson, LessonSource(TASK, FEEDBACK, answer="  \n ")) is None


def test_answer_must_not_be_part_of_a_longer_token() -> None:
    """Catches either look-around of the answer pattern dropped (a longer number or a
    decimal matched), and the answer's whitespace removed rather than normalised."""
    assert not contains_answer("the code 17703845 is unrelated", "1770384")
    assert not contains_answer("the id x1770384 is unrelated", "1770384")
    assert not contains_answer("use 0.5 as the ratio", "5")
    assert contains_answer("the pair 12  34 appears", " 12\n34 ")


def test_word_overlap_by_hand() -> None:
    """Catches an empty side scored 1.0 (every wordless lesson a near duplicate)."""
    assert word_overlap("Check the tape", "check THE end") == 2 / 4
    assert word_overlap("", "check the tape") == 0.0
    assert word_overlap("!!!", "") == 0.0


def test_reasons_are_the_five_that_the_metrics_count() -> None:
    """Catches a reason renamed in `REASONS`: the trainer's `ops_skipped_<reason>` metrics
    (`rundir.SKIP_REASONS`) must have a counter for each."""
    assert REASONS == ("too_short", "placeholder", "copies_task", "copies_feedback", "leaks_answer")
    assert set(REASONS) <= set(SKIP_REASONS)


# ---- prompts --------------------------------------------------------------------------------


def _user_text(message: dict[str, str]) -> str:
    """A prompt's request: a user turn holding nothing but its role and content."""
    assert set(message) == {"role", "content"} and message["role"] == "user"
    return message["content"]


def test_reflection_prompt_puts_each_slot_under_its_heading() -> None:
    """Catches a slot, a heading or a requested JSON key dropped from the reflection
    prompt, a value filled under the wrong slot name, or the message's role or key lost."""
    messages = reflection_messages("TASK-T", "RESP-R", "FB-F", "PB-P")
    assert len(messages) == 1
    text = _user_text(messages[0])
    assert text.startswith("You are reviewing an attempt at a task that did not fully succeed.")
    assert (
        "## Task\nTASK-T\n\n## The attempt\nRESP-R\n\n## What the checker reported\nFB-F\n\n"
        "## Current playbook of lessons\nPB-P\n\nAnswer with one JSON object and nothing else"
    ) in text
    positions = [text.index(line) for line in KEY_LINES]
    assert positions == sorted(positions)
    assert '"operations"' not in text


def test_empty_or_blank_slots_say_none() -> None:
    """Catches `_slot` not stripping, leaving a blank slot blank, or its test inverted."""
    text = reflection_messages("  spaced task \n", "", "   ", "")[0]["content"]
    assert (
        "## Task\nspaced task\n\n## The attempt\n(none)\n\n## What the checker reported\n(none)"
        "\n\n## Current playbook of lessons\n(none)\n\n"
    ) in text


def test_single_call_mode_asks_for_the_allowed_operations() -> None:
    """Catches the operations request left out or added without `operations`, the
    `:` / `one of` choice flipped, shapes run together, the Sections line dropped, or a
    blank line left before the request."""
    one = reflection_messages("T", "R", "F", "P", operations=("ADD",))[0]["content"]
    assert one.endswith(
        '(an empty list if none).\n- "operations": how to change the playbook in light of this '
        "diagnosis, a list where each operation is:\n"
        + ADD_SHAPE
        + "\n"
        + SECTIONS_LINE
        + " Write general lessons that transfer to other tasks (no checker feedback and no "
        "answers will be available when the playbook is used), never the answer to this one "
        "task, and none the playbook already has. Use an empty list if nothing should change.\n"
    )
    assert "DELETE" not in one
    two = reflection_messages("T", "R", "F", "P", operations=("ADD", "DELETE"))[0]["content"]
    assert (
        "each operation is one of\n" + ADD_SHAPE + "\n" + DELETE_SHAPE + "\n" + SECTIONS_LINE
    ) in two
    assert "UPDATE" not in two and "MERGE" not in two


def test_reflection_followup_continues_the_rollout_conversation() -> None:
    """Catches the attempt not added as the assistant's turn, the request's role or keys
    lost, the follow-up repeating the task and attempt sections, or its feedback and
    playbook slots dropped."""
    messages = reflection_followup(TASK_MESSAGES, "ATTEMPT", "FB-F", "PB-P")
    assert messages[:3] == [*TASK_MESSAGES, {"role": "assistant", "content": "ATTEMPT"}]
    assert len(messages) == 4
    text = _user_text(messages[3])
    assert text.startswith("Your reply above did not fully succeed.")
    assert (
        "## What the checker reported\nFB-F\n\n## Current playbook of lessons\nPB-P\n\n"
        "Answer with one JSON object and nothing else"
    ) in text
    assert "## Task" not in text and "## The attempt" not in text
    assert all(line in text for line in KEY_LINES)
    assert len(TASK_MESSAGES) == 2  # the rollout's own list is left alone
    with_ops = reflection_followup(TASK_MESSAGES, "A", "F", "P", operations=("DELETE",))
    assert with_ops[3]["content"].count(DELETE_SHAPE) == 1


def test_success_tag_prompts() -> None:
    """Catches a slot, heading or the answer format dropped from the tagging prompts, a
    value under the wrong slot, or the follow-up repeating the task."""
    answer = (
        'Answer with one JSON object and nothing else: {"bullet_tags": [{"id": "<entry id>", '
        '"tag": "helpful" | "harmful" | "neutral"}]}. Tag only entries that bear on this attempt.'
    )
    messages = success_tag_messages("TASK-T", "RESP-R", "PB-P")
    assert len(messages) == 1
    assert (
        "## Task\nTASK-T\n\n## The successful attempt\nRESP-R\n\n## Playbook\nPB-P\n\n" + answer
    ) in _user_text(messages[0])
    followup = success_tag_followup(TASK_MESSAGES, "ATTEMPT", "PB-P")
    assert followup[:3] == [*TASK_MESSAGES, {"role": "assistant", "content": "ATTEMPT"}]
    assert followup[3]["role"] == "user"
    assert followup[3]["content"] == (
        "Your reply above solved the task. Decide which playbook lessons it agrees with.\n\n"
        "## Playbook\nPB-P\n\n" + answer + "\n"
    )


def test_curation_prompt_by_hand() -> None:
    """Catches a statistic dropped or read from the wrong key, a section or slot dropped
    from the curator's prompt, the no-answers warning lost, or its role or keys lost."""
    stats = {"total": 7, "high_performing": 2, "problematic": 1, "unused": 3}
    messages = curation_messages(stats, "REFL", "PB-P", "TASK-T")
    assert len(messages) == 1
    text = _user_text(messages[0])
    assert (
        "Important: when the playbook is used, no checker feedback and no answers will be "
        "available. Write general lessons that transfer to other tasks, never the answer to "
        "this one task.\n\n## Playbook statistics\ntotal entries: 7; high-performing (helpful > "
        "5, harmful < 2): 2; problematic (harmful >= helpful, harmful > 0): 1; never tagged: 3"
        "\n\n## Reflection on a recent attempt\nREFL\n\n## Current playbook\nPB-P\n\n"
        "## The task the reflection is about\nTASK-T\n\nAnswer with one JSON object and nothing "
        'else:\n{"reasoning": "...", "operations": [ ... ]}\nwhere each operation is one of\n'
        + ADD_SHAPE
        + '\n{"type": "UPDATE", "id": "<entry id>", "content": "<improved lesson>"}\n'
        '{"type": "MERGE", "ids": ["<id>", "<id>"], "content": "<combined lesson>"}\n'
        + DELETE_SHAPE
        + "\n"
        + SECTIONS_LINE
    ) in text


def test_operation_shapes_are_json_of_their_own_type() -> None:
    """Catches a shape filed under the wrong or an empty key, or emptied."""
    assert set(OPERATION_SHAPES) == {"ADD", "UPDATE", "MERGE", "DELETE"}
    for kind, shape in OPERATION_SHAPES.items():
        assert json.loads(shape)["type"] == kind


# ---- reflections and replies ----------------------------------------------------------------


def test_reflection_text_has_the_four_labels_in_order() -> None:
    """Catches a field key or label emptied, the lines joined without newlines, or a new
    Reflection flagged loose."""
    reflection = Reflection(
        {
            "key_insight": "K",
            "reasoning": "not shown",
            "correct_approach": "C",
            "root_cause_analysis": "R",
            "error_identification": "E",
        }
    )
    assert reflection.as_text() == "Error: E\nRoot cause: R\nCorrect approach: C\nKey insight: K"
    assert reflection.loose is False and reflection.bullet_tags == []


def test_a_raw_reflection_is_handed_on_as_one_line() -> None:
    """Catches the raw text stored under another key, its words run together, it not
    flagged loose, or `as_text` not returning it."""
    raw = Reflection.raw("  the  reply\n was\tgarbled ")
    assert raw.fields == {"raw": "the reply was garbled"}
    assert raw.loose is True
    assert raw.as_text() == "the reply was garbled"


def test_parsed_reflections_keep_their_reasoning() -> None:
    """Catches the reasoning dropped, stored under another key, or its words run together,
    from a JSON reply and from the line-level fallback."""
    parsed = parse_reflection('{"reasoning": "the  sum\\nwas off", "key_insight": "carry"}')
    assert parsed is not None and not parsed.loose
    assert parsed.fields == {"key_insight": "carry", "reasoning": "the sum was off"}
    loose = parse_reflection('"reasoning": "looked  at it"\n"key_insight": "carry the one')
    assert loose is not None and loose.loose
    assert loose.fields == {"key_insight": "carry the one", "reasoning": "looked at it"}


def test_tags_of_a_parsed_reflection_come_from_its_tag_list() -> None:
    """Catches `parse_reflection` handing a parsed reply to the regex fallback: an id and
    a tag word in its reasoning are not a vote."""
    reply = (
        '{"reasoning": "entry [strat-00001] helpful looked right", "key_insight": "k", '
        '"bullet_tags": [{"id": "err-00002", "tag": "harmful"}]}'
    )
    parsed = parse_reflection(reply)
    assert parsed is not None and parsed.bullet_tags == [("err-00002", "harmful")]


def test_an_empty_operation_list_is_read_as_no_change() -> None:
    """Catches a parsed operation list not returned as it is: `[]` ("nothing should
    change", as the prompt asks) became None (a failed reply), and a single operation
    object or one of an unknown type was dropped instead of passed to the playbook."""
    assert parse_operations('{"reasoning": "fine as it is", "operations": []}') == []
    assert parse_operations('{"operations": {"type": "RENAME", "id": "x"}}') == [
        {"type": "RENAME", "id": "x"}
    ]
    assert parse_operations('{"operations": [{"type": "RENAME", "id": "x"}, 3]}') == [
        {"type": "RENAME", "id": "x"}
    ]


def test_a_slot_echoed_inside_a_few_words_is_a_placeholder() -> None:
    """Bug: only a lesson that was exactly one echoed template slot was refused, so
    "Lesson: <a one-sentence lesson>" and "<lesson one> <lesson two>" entered the playbook
    as lessons. A lesson whose words outside its slots are too few is a placeholder now;
    one that names a tag among enough words of its own is still a lesson."""
    src = LessonSource()
    assert lesson_problem("<a one-sentence lesson>", src) == "placeholder"
    assert lesson_problem("Lesson: <a one-sentence lesson>", src) == "placeholder"
    assert lesson_problem("<lesson one> <lesson two>", src) == "placeholder"
    assert lesson_problem("Close every <think> block before the final answer.", src) is None
