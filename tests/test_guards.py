"""Guards on lesson content: each reason fires on its case and only there."""

from __future__ import annotations

import pytest

from resd.training.guards import LessonSource, contains_answer, copied_fraction, lesson_problem

TASK = (
    "Design a factory that accepts every tape containing the pattern red blue red and "
    "rejects all other tapes. End your reply with the program in a code block."
)
FEEDBACK = "The program accepted the tape BRB although it does not contain the pattern RBR."
SOURCE = LessonSource(task=TASK, feedback=FEEDBACK, answer="1770384")
GOOD = "Before routing, check whether the tape is empty and reject it at once."


def test_a_general_lesson_passes():
    assert lesson_problem(GOOD, SOURCE) is None
    # a short quote of the task inside a real lesson is not a copy
    assert (
        lesson_problem(
            "When a task says 'rejects all other tapes', route leftovers to the reject node.",
            SOURCE,
        )
        is None
    )
    # angle brackets inside a lesson are content, not a slot
    assert (
        lesson_problem("Route <red> symbols to the <reject> node when the tape ends.", SOURCE)
        is None
    )


@pytest.mark.parametrize(
    ("lesson", "reason"),
    [
        ("", "too_short"),
        ("Be careful.", "too_short"),
        ("ok ok ok", "too_short"),
        ("<a one-sentence lesson>", "placeholder"),
        (' "<the lesson you learned from this failure>". ', "placeholder"),
        ("The product 967 * 19 is 1770384, remember it.", "leaks_answer"),
        (
            "Design a factory that accepts every tape containing the pattern red blue red",
            "copies_task",
        ),
        (
            "accepts every tape containing the pattern red blue red and rejects all other tapes",
            "copies_task",
        ),
        (
            "The program accepted the tape BRB although it does not contain the pattern RBR.",
            "copies_feedback",
        ),
    ],
)
def test_each_problem_is_named(lesson, reason):
    assert lesson_problem(lesson, SOURCE) == reason


def test_answer_must_stand_alone():
    assert contains_answer("the result is 1770384.", "1770384")
    assert not contains_answer("the id 117703845 is unrelated", "1770384")
    assert not contains_answer("anything", "")
    # no answer marked: nothing to leak
    assert (
        lesson_problem(
            "The product 967 * 19 is 1770384, remember it.", LessonSource(TASK, FEEDBACK)
        )
        is None
    )


def test_copied_fraction_counts_words_in_shared_runs():
    assert (
        copied_fraction(
            "one two three four five six seven eight", "x one two three four five six y"
        )
        == 6 / 8
    )
    assert copied_fraction("short lesson here now", "a short lesson here now b") == 1.0
    assert copied_fraction("short lesson here now", "now here lesson short") == 0.0
