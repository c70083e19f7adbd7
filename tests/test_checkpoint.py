"""Checkpoints (`training.checkpoint`) on their own, with the tiny real model and tokenizer
of the other tests: what a save writes, what a resume reads back (teachers, optimizer, RNG,
state), which folders count as checkpoints, and which a save prunes."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from resd.models import load_tokenizer
from resd.training.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_tensors,
    set_rng_state,
    teacher_file,
)
from resd.training.teacher import Teacher


@pytest.fixture(scope="module")
def student(tiny_model_dir: Path) -> dict[str, Any]:
    """The model and the tokenizer as training holds them: left padding and a length of 64,
    where it was loaded with right padding and 2048."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return {"model": model, "tokenizer": load_tokenizer(str(tiny_model_dir), max_length=64)}


def save(run_dir: Path, step: int, student: dict[str, Any], keep: int = 2, **kwargs: Any) -> Path:
    args: dict[str, Any] = {**student, "model_state": None, "teacher_states": {},
                            "optimizer_state": {}, "state": {}}  # fmt: skip
    args.update(kwargs)
    return save_checkpoint(run_dir, step, keep=keep, **args)


def test_a_checkpoint_resumes_teachers_optimizer_state_and_both_random_streams(
    tmp_path: Path, student: dict[str, Any]
) -> None:
    """What a save writes, a load gives back: the run state with its step (and no RNG state
    left in it), the optimizer state, each teacher's weights from `teachers/`, and the
    Python and torch random streams where they stood at the save. Catches a file saved or
    read under another name, a teacher skipped, or one RNG stream not restored."""
    model = student["model"]
    moved = Teacher(model, "ema")  # an EMA teacher that has moved away from the student
    with torch.no_grad():
        moved.copy.model.norm.weight.fill_(2.0)
        moved.copy.model.embed_tokens.weight.mul_(3.0)  # tied to the output layer
    reference = Teacher(model, "base")
    optimizer_state = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.5}]}
    random.seed(1)
    torch.manual_seed(1)
    teacher_states = {"teacher": moved.copy.state_dict(), "reference": reference.copy.state_dict()}
    path = save(tmp_path, 7, student, teacher_states=teacher_states,
                optimizer_state=optimizer_state, state={"cursor": {"batch": 3}, "playbook": []})  # fmt: skip
    assert path == tmp_path / "checkpoint-7" and latest_checkpoint(tmp_path) == path
    expected = (random.random(), torch.rand(3))
    random.seed(2)  # the run goes on: both streams move
    torch.manual_seed(2)

    fresh = {"teacher": Teacher(model, "ema"), "reference": Teacher(model, "base")}
    state, optimizer = load_checkpoint(path, teachers=fresh)
    assert state == {"cursor": {"batch": 3}, "playbook": [], "step": 7}
    assert optimizer["param_groups"] == [{"lr": 0.5}]
    assert torch.equal(optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    assert teacher_file(path, "teacher") == path / "teachers" / "teacher.safetensors"
    restored = fresh["teacher"].copy
    assert torch.equal(restored.model.norm.weight, torch.full_like(restored.model.norm.weight, 2))
    assert torch.equal(restored.lm_head.weight, moved.copy.lm_head.weight)  # still tied
    assert not torch.equal(restored.lm_head.weight, model.lm_head.weight)
    assert torch.equal(fresh["reference"].copy.model.norm.weight, model.model.norm.weight)


def test_tied_tensors_are_stored_once_and_empty_ones_each_keep_their_name(tmp_path: Path) -> None:
    """safetensors refuses tensors that share memory: tied weights are stored once, under
    the first name; empty tensors, whose storage addresses may coincide, each keep theirs."""
    weight = torch.arange(6.0).reshape(2, 3)
    save_tensors(tmp_path / "t.safetensors", {"embed.weight": weight,
                 "lm_head.weight": weight.view(2, 3), "a.bias": torch.zeros(0),
                 "b.bias": torch.zeros(0)})  # fmt: skip
    tensors = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(tensors) == ["a.bias", "b.bias", "embed.weight"]
    assert torch.equal(tensors["embed.weight"], weight)


def test_a_checkpoint_holds_the_student_and_its_tokenizer_as_loaded(
    tmp_path: Path, student: dict[str, Any]
) -> None:
    """The student saves itself unless a gathered (sharded) state is given, and the
    tokenizer is saved with the padding side it was loaded with, then set back for
    training. Catches a gathered state dropped, or training's settings saved."""
    tokenizer = student["tokenizer"]
    path = save(tmp_path, 1, student)
    saved = load_file(str(path / "model.safetensors"))
    assert torch.equal(saved["model.norm.weight"], student["model"].model.norm.weight)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert (reloaded.padding_side, reloaded.model_max_length) == ("right", 2048)
    assert (tokenizer.padding_side, tokenizer.model_max_length) == ("left", 64)
    gathered = {k: torch.zeros_like(v) for k, v in student["model"].state_dict().items()}
    path = save(tmp_path, 2, student, model_state=gathered)
    assert not load_file(str(path / "model.safetensors"))["model.norm.weight"].any()


def test_a_teacher_saved_beside_the_student_by_an_older_version_still_loads(
    tmp_path: Path, student: dict[str, Any]
) -> None:
    model = student["model"]
    moved = Teacher(model, "ema")
    with torch.no_grad():
        moved.copy.model.norm.weight.fill_(5.0)
    path = save(tmp_path, 3, student, teacher_states={"teacher": moved.copy.state_dict()})
    (path / "teachers" / "teacher.safetensors").rename(path / "teacher.safetensors")
    teacher = Teacher(model, "ema")
    load_checkpoint(path, teachers={"teacher": teacher})
    assert torch.equal(teacher.copy.model.norm.weight, moved.copy.model.norm.weight)


def test_saving_keeps_the_newest_checkpoints_and_clears_killed_saves(
    tmp_path: Path, student: dict[str, Any]
) -> None:
    """`keep` newest checkpoints stay, ordered by step number rather than by name
    (checkpoint-10 is newer than checkpoint-9); a save of a step that exists replaces it;
    leftovers of a save that was killed go."""
    (tmp_path / ".tmp-checkpoint-killed").mkdir()
    for step in (8, 9, 10):
        save(tmp_path, step, student)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))

    (tmp_path / "checkpoint-10" / "stale.txt").write_text("from the first save of step 10")
    save(tmp_path, 10, student, state={"again": True})
    assert not (tmp_path / "checkpoint-10" / "stale.txt").exists()
    assert json.loads((tmp_path / "checkpoint-10" / "state.json").read_text())["again"] is True

    save(tmp_path, 11, student, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-11"]
    save(tmp_path, 12, student, keep=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-11", "checkpoint-12"]


def test_only_complete_checkpoint_folders_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, student: dict[str, Any], tiny_model_dir: Path
) -> None:
    """A folder counts when its name is `checkpoint-<step>` and it holds the run state, the
    optimizer, the torch RNG state and a model (a config.json, or a LoRA adapter's
    config); incomplete ones are skipped with a warning naming what is missing."""
    assert checkpoint_dirs(tmp_path / "absent") == []
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules=["q_proj"]))  # fmt: skip
    save(tmp_path, 2, {**student, "model": lora})  # a LoRA run: the adapter alone
    assert not (tmp_path / "checkpoint-2" / "config.json").exists()
    save(tmp_path, 3, student)
    for name in ("checkpoint-3-old", "checkpoint-x", "last-checkpoint-9"):
        save(tmp_path, 3, student, keep=5).rename(tmp_path / name)
        save(tmp_path, 3, student, keep=5)
    (tmp_path / "checkpoint-20").write_text("a file, not a folder")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    for missing in ("state.json", "optimizer.pt", "rng_torch.pt", "config.json"):
        broken = save(tmp_path, 4, student, keep=5)
        (broken / missing).unlink()
        with caplog.at_level(logging.WARNING, logger="resd.training.checkpoint"):
            caplog.clear()
            assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
        assert f"checkpoint-4 is incomplete (no {missing})" in caplog.text
    (tmp_path / "checkpoint-5").mkdir()
    with caplog.at_level(logging.WARNING, logger="resd.training.checkpoint"):
        caplog.clear()
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert "(no state.json, optimizer.pt, rng_torch.pt, config.json, model weights)" in caplog.text


def test_a_checkpoint_folder_is_readable_as_the_run_folder_is(
    tmp_path: Path, student: dict[str, Any]
) -> None:
    import os

    umask = os.umask(0o027)
    try:
        path = save(tmp_path, 1, student)
        assert os.umask(0o027) == 0o027  # the process's umask is left as it was
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o750  # the umask's, not mkdtemp's 0700


def test_a_save_into_a_new_run_folder_creates_it(tmp_path: Path, student: dict[str, Any]) -> None:
    path = save(tmp_path / "new" / "run", 1, student)
    assert latest_checkpoint(tmp_path / "new" / "run") == path


def test_the_random_state_round_trips():
    state = rng_state()
    expected = (random.random(), torch.rand(2))
    set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])
