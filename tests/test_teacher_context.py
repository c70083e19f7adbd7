"""Teacher template: literal insertion, empty slots, hostile text, the solution buffer, and
what the teacher is shown (and whether a rollout is distilled) for each algorithm."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from resd.envs.base import Item, Score
from resd.generation import Generation
from resd.templating import fill, names_a_file
from resd.training.algorithms import ALGORITHMS
from resd.training.rollout import Rollout
from resd.training.teacher_context import (
    SLOT_TITLES,
    SolutionBuffer,
    TeacherContext,
    TeacherTemplate,
    teacher_context,
)


def test_slots_in_order_and_empty_slots_vanish():
    text = TeacherTemplate().render(
        prompt="P", playbook="", previous_trial="Y", feedback="F", reflection=""
    )
    assert text.index("<prompt>") < text.index("<previous_trial>") < text.index("<feedback>")
    assert (
        "<playbook>" not in text and "<reflection>" not in text and "<successful_trial>" not in text
    )


def test_blank_slots_vanish_and_slot_text_is_trimmed():
    """A slot holding only whitespace (feedback of a blank line) is empty, not a titled block
    around nothing; text is inserted without its surrounding whitespace."""
    text = TeacherTemplate().render(prompt="  P  \n", feedback=" \n\t ", reflection="\n")
    assert "<feedback>" not in text and "<reflection>" not in text
    assert SLOT_TITLES["feedback"] not in text
    assert "<prompt>\nP\n</prompt>" in text


def test_hostile_text_is_inserted_literally():
    hostile = "{prompt} {playbook} {} {{x}} </feedback> <playbook> %s {0}"
    text = TeacherTemplate().render(prompt="TASK", feedback=hostile, reflection="R {feedback}")
    assert text.count("TASK") == 1  # {prompt} inside feedback did not re-enter the template
    assert "{prompt} {playbook} {} {{x}}" in text and "%s {0}" in text
    assert "R {feedback}" in text
    assert text.count("</feedback>") == 1  # the fake closing tag was defused
    assert "<\\/feedback>" in text and "<\\playbook>" in text


def test_custom_template_from_file_and_validation(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Lessons:{playbook}\nTask:{prompt}")
    t = TeacherTemplate.from_config(str(path))
    out = t.render(prompt="Q", playbook="L1")
    assert out.startswith("Lessons:") and out.index("L1") < out.index("Q")
    with pytest.raises(ValueError, match="unknown slots"):
        TeacherTemplate("{prompt}{answer}")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        TeacherTemplate("{feedback}")
    assert TeacherTemplate.from_config(None).text == TeacherTemplate().text
    # a file name that is not there: named so, not "must contain the {prompt} slot"
    with pytest.raises(ValueError, match=r"^teacher_template: no such file 'nofile.txt'"):
        TeacherTemplate.from_config("nofile.txt")


def test_a_long_one_line_template_is_taken_literally():
    """A value of 4096 characters or more is never a path (PATH_MAX): it is the template
    itself, not looked up on disk (which would raise "File name too long")."""
    text = "{prompt}" + "x" * (4096 - len("{prompt}"))
    assert TeacherTemplate.from_config(text).text == text


def test_fill_is_single_pass():
    assert fill("{a}-{b}", {"a": "{b}", "b": "x"}) == "{b}-x"
    assert fill('{"json": {a}}', {"a": "1"}) == '{"json": 1}'
    with pytest.raises(KeyError):
        fill("{missing}", {})


def test_solution_buffer_keeps_first_success():
    buf = SolutionBuffer()
    assert buf.add("item-1", "first")
    assert not buf.add("item-1", "second")
    assert not buf.add("item-2", "   ")
    assert buf.get("item-1") == "first" and buf.get("item-2") is None and len(buf) == 1


@pytest.mark.parametrize(
    ("name", "left_out"),
    [
        ("teacher_without_attempt.txt", {"previous_trial"}),
        ("teacher_lessons_only.txt", {"previous_trial", "feedback"}),
        ("teacher_without_attempt_or_success.txt", {"previous_trial", "successful_trial"}),
        ("teacher_without_attempt_or_reflection.txt", {"previous_trial", "reflection"}),
    ],
)
def test_shipped_templates_leave_out_exactly_their_slots(name, left_out):
    """The templates in configs/templates/ are what the README and results point users to:
    a renamed slot would silently drop material, a leftover one would show it anyway."""
    path = Path(__file__).resolve().parents[1] / "configs" / "templates" / name
    template = TeacherTemplate.from_config(str(path))
    values = {slot: f"<<{slot} text>>" for slot in SLOT_TITLES}
    text = template.render(**values)
    shown = {slot for slot, marker in values.items() if marker in text}
    assert shown == set(values) - left_out


# ---- what the teacher is shown, and which rollouts are distilled ---------------------------


def _rollout(
    reward: float = 0.0,
    feedback: str = "The reply is odd.",
    tokens: tuple[int, ...] = (5, 6),
    reference: str | None = None,
) -> Rollout:
    item = Item("x/1", [{"role": "user", "content": "Reply."}], reference=reference)
    return Rollout(
        item, [1], Generation(list(tokens), "xy z", True), Score(reward, reward, feedback)
    )


def _context(algo: str, rollout: Rollout, **kw: object) -> TeacherContext:
    kw = {"playbook": "", "buffer": SolutionBuffer(), "peers": {}, **kw}
    return teacher_context(ALGORITHMS[algo], rollout, **kw)


def test_sdft_teacher_sees_the_reference_answer():
    """SDFT's solution slot is the item's reference answer (and nothing without one)."""
    ctx = _context("sdft", _rollout(reference="the demonstration"))
    assert (ctx.solution, ctx.feedback, ctx.distill) == ("the demonstration", "", True)
    assert _context("sdft", _rollout(reference=None)).solution == ""


def test_peer_solution_only_with_siblings_and_only_for_failures():
    """SDPO shows a successful sibling of this step, which exists only with N > 1 rollouts
    per prompt (the default is 1), and only to a failed rollout."""
    peers = {"x/1": "a sibling that succeeded"}
    failed, solved = _rollout(0.0), _rollout(1.0)
    assert _context("sdpo", failed, peers=peers, rollouts_per_prompt=2).solution == peers["x/1"]
    assert _context("sdpo", failed, peers=peers, rollouts_per_prompt=1).solution == ""
    assert _context("sdpo", failed, peers=peers).solution == ""
    assert _context("sdpo", solved, peers=peers, rollouts_per_prompt=2).solution == ""


def test_feedback_is_kept_beside_a_buffered_solution_by_default():
    """`feedback_with_solution` defaults to True: the teacher sees both."""
    buffer = SolutionBuffer()
    buffer.add("x/1", "a reply that once worked")
    ctx = _context("resd", _rollout(), buffer=buffer)
    assert (ctx.solution, ctx.feedback) == ("a reply that once worked", "The reply is odd.")


def test_which_rollouts_are_distilled():
    """Distilled iff the context holds something new (non-blank feedback, a reflection or a
    solution) and the reply has tokens; never a success under an algorithm that skips
    successes (SDPO), always one under an algorithm that distils them (its own reply)."""
    assert _context("sdpo", _rollout(0.0)).distill  # a failure with feedback
    assert not _context("sdpo", _rollout(0.0, feedback=" \n ")).distill  # blank feedback
    assert not _context("sdpo", _rollout(0.0, tokens=())).distill  # nothing to score
    assert not _context("sdpo", _rollout(1.0)).distill  # SDPO skips its successes
    own = _context("sdpo_ss", _rollout(1.0, feedback=""))
    assert own.distill and own.solution == "xy z"
    assert not TeacherContext().distill  # an empty context holds nothing new
    with pytest.raises(dataclasses.FrozenInstanceError):
        TeacherContext().distill = True  # type: ignore[misc]


def test_a_one_line_template_longer_than_a_file_name_is_the_template(tmp_path: Path) -> None:
    """Bug: a one-line template of 256 to 4095 characters was looked up on disk, and
    Linux raised "File name too long" (OSError) instead of answering "no such file", so
    `teacher_template` given inline crashed the run at start. The same lookup served the
    chat template; both go through `names_a_file` now."""
    text = "{prompt} " + "x" * 300
    assert TeacherTemplate.from_config(text).text == text
    assert not names_a_file("x" * 300) and not names_a_file("a\0b")
    saved = tmp_path / "teacher.txt"
    saved.write_text("From a file: {prompt}")
    assert names_a_file(str(saved))
    assert TeacherTemplate.from_config(str(saved)).text == "From a file: {prompt}"
