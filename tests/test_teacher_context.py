"""Teacher template: literal insertion, empty slots, hostile text, the solution buffer."""

from __future__ import annotations

from pathlib import Path

import pytest

from resd.templating import fill
from resd.training.teacher_context import SLOT_TITLES, SolutionBuffer, TeacherTemplate


def test_slots_in_order_and_empty_slots_vanish():
    text = TeacherTemplate().render(
        prompt="P", playbook="", previous_trial="Y", feedback="F", reflection=""
    )
    assert text.index("<prompt>") < text.index("<previous_trial>") < text.index("<feedback>")
    assert (
        "<playbook>" not in text and "<reflection>" not in text and "<successful_trial>" not in text
    )


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
