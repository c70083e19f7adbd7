"""Checkpoints (`training.checkpoint`) on their own, with stand-ins for the model and the
tokenizer: what a save writes, what a resume reads back (teachers, optimizer, RNG, state),
which folders count as checkpoints, and which a save prunes."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from resd.training.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    teacher_file,
)


class FakeModel:
    """Writes what `save_pretrained` would: config.json, and the state dict it was given."""

    def __init__(self, config_name: str = "config.json") -> None:
        self.config_name = config_name
        self.saved_state: dict[str, torch.Tensor] | None = None
        self.saved_in: Path | None = None

    def save_pretrained(self, folder: Path, state_dict: dict | None = None) -> None:
        self.saved_state, self.saved_in = state_dict, Path(folder)
        (Path(folder) / self.config_name).write_text("{}")


class FakeTokenizer:
    """A tokenizer that training set to left padding; it was loaded with right padding."""

    def __init__(self) -> None:
        self.padding_side = "left"
        self._resd_loaded = {"padding_side": "right"}
        self.saved_padding: str | None = None

    def save_pretrained(self, folder: Path) -> None:
        self.saved_padding = self.padding_side
        (Path(folder) / "tokenizer_config.json").write_text("{}")


class FakeTeacher:
    """Records the file `load` was given and the tensors in it."""

    def __init__(self) -> None:
        self.loaded: Path | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def load(self, path: Path) -> None:
        self.loaded = Path(path)
        self.tensors = load_file(str(path))


def save(run_dir: Path, step: int, keep: int = 2, **kwargs: Any) -> Path:
    args: dict[str, Any] = {"model": FakeModel(), "tokenizer": FakeTokenizer(),
                            "model_state": None, "teacher_states": {}, "optimizer_state": {},
                            "state": {}}  # fmt: skip
    args.update(kwargs)
    return save_checkpoint(run_dir, step, keep=keep, **args)


def test_a_checkpoint_resumes_teachers_optimizer_state_and_both_random_streams(tmp_path):
    """What a save writes, a load gives back: the run state with its step (and no RNG state
    left in it), the optimizer state, each teacher's tensors from `teachers/`, and the
    Python and torch random streams where they stood at the save. Catches a file saved or
    read under another name, a teacher skipped, or one RNG stream not restored."""
    weight = torch.arange(6.0).reshape(2, 3)
    teacher_states = {"teacher": {"embed.weight": weight, "lm_head.weight": weight.view(2, 3),
                                  "norm.weight": torch.ones(3), "a.bias": torch.zeros(0),
                                  "b.bias": torch.zeros(0)},  # tied weights; two empty tensors
                      "reference": {"norm.weight": torch.full((3,), 2.0)}}  # fmt: skip
    optimizer_state = {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.5}]}
    random.seed(1)
    torch.manual_seed(1)
    path = save(tmp_path, 7, teacher_states=teacher_states, optimizer_state=optimizer_state,
                state={"cursor": {"batch": 3}, "playbook": []})  # fmt: skip
    assert path == tmp_path / "checkpoint-7" and latest_checkpoint(tmp_path) == path
    expected = (random.random(), torch.rand(3))
    random.seed(2)  # the run goes on: both streams move
    torch.manual_seed(2)

    teachers = {"teacher": FakeTeacher(), "reference": FakeTeacher()}
    state, optimizer = load_checkpoint(path, teachers=teachers)
    assert state == {"cursor": {"batch": 3}, "playbook": [], "step": 7}
    assert optimizer["param_groups"] == [{"lr": 0.5}]
    assert torch.equal(optimizer["state"][0]["exp_avg"], torch.ones(2))
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])
    assert teachers["teacher"].loaded == path / "teachers" / "teacher.safetensors"
    assert teachers["reference"].loaded == teacher_file(path, "reference")
    assert torch.equal(teachers["reference"].tensors["norm.weight"], torch.full((3,), 2.0))
    tensors = teachers["teacher"].tensors
    assert torch.equal(tensors["norm.weight"], torch.ones(3))
    # tied tensors are stored once (safetensors refuses shared memory), under the first
    # name; empty tensors, whose storage addresses may coincide, each keep theirs
    assert sorted(tensors) == ["a.bias", "b.bias", "embed.weight", "norm.weight"]
    assert torch.equal(tensors["embed.weight"], weight)


def test_a_checkpoint_holds_the_student_and_its_tokenizer_as_loaded(tmp_path):
    """The student saves itself unless a gathered (sharded) state is given, and the
    tokenizer is saved with the padding side it was loaded with, then set back for
    training. Catches a gathered state dropped, or training's settings saved."""
    model, tokenizer = FakeModel(), FakeTokenizer()
    path = save(tmp_path, 1, model=model, tokenizer=tokenizer)
    assert model.saved_state is None
    # written in a hidden temporary folder first: a save killed midway is no checkpoint
    assert model.saved_in.parent == tmp_path and model.saved_in.name.startswith(".tmp-checkpoint-")
    assert (path / "config.json").exists() and (path / "tokenizer_config.json").exists()
    assert tokenizer.saved_padding == "right" and tokenizer.padding_side == "left"
    gathered = {"w": torch.zeros(1)}
    save(tmp_path, 2, model=model, model_state=gathered)
    assert model.saved_state is gathered


def test_a_teacher_saved_beside_the_student_by_an_older_version_still_loads(tmp_path):
    path = save(tmp_path, 3, teacher_states={"teacher": {"w": torch.ones(2)}})
    (path / "teachers" / "teacher.safetensors").rename(path / "teacher.safetensors")
    teacher = FakeTeacher()
    load_checkpoint(path, teachers={"teacher": teacher})
    assert teacher.loaded == path / "teacher.safetensors"
    assert torch.equal(teacher.tensors["w"], torch.ones(2))


def test_saving_keeps_the_newest_checkpoints_and_clears_killed_saves(tmp_path):
    """`keep` newest checkpoints stay, ordered by step number rather than by name
    (checkpoint-10 is newer than checkpoint-9); a save of a step that exists replaces it;
    leftovers of a save that was killed go."""
    (tmp_path / ".tmp-checkpoint-killed").mkdir()
    for step in (8, 9, 10):
        save(tmp_path, step)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-9", "checkpoint-10"]
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))

    (tmp_path / "checkpoint-10" / "stale.txt").write_text("from the first save of step 10")
    save(tmp_path, 10, state={"again": True})
    assert not (tmp_path / "checkpoint-10" / "stale.txt").exists()
    assert json.loads((tmp_path / "checkpoint-10" / "state.json").read_text())["again"] is True

    save(tmp_path, 11, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-11"]
    save(tmp_path, 12, keep=3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-11", "checkpoint-12"]


def test_only_complete_checkpoint_folders_count(tmp_path, caplog):
    """A folder counts when its name is `checkpoint-<step>` and it holds the run state, the
    optimizer, the torch RNG state and a model (a config.json, or a LoRA adapter's
    config); incomplete ones are skipped with a warning naming what is missing."""
    assert checkpoint_dirs(tmp_path / "absent") == []
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 2, model=FakeModel("adapter_config.json"))  # a LoRA run: the adapter
    save(tmp_path, 3)
    for name in ("checkpoint-3-old", "checkpoint-x", "last-checkpoint-9"):
        save(tmp_path, 3, keep=5).rename(tmp_path / name)
        save(tmp_path, 3, keep=5)
    (tmp_path / "checkpoint-20").write_text("a file, not a folder")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-3"]

    for missing in ("state.json", "optimizer.pt", "rng_torch.pt", "config.json"):
        broken = save(tmp_path, 4, keep=5)
        (broken / missing).unlink()
        with caplog.at_level(logging.WARNING, logger="resd.training.checkpoint"):
            caplog.clear()
            assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
        assert f"checkpoint-4 is incomplete (no {missing})" in caplog.text
    (tmp_path / "checkpoint-5").mkdir()
    with caplog.at_level(logging.WARNING, logger="resd.training.checkpoint"):
        caplog.clear()
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert "(no state.json, optimizer.pt, rng_torch.pt, config.json)" in caplog.text


def test_a_checkpoint_folder_is_readable_as_the_run_folder_is(tmp_path):
    import os

    umask = os.umask(0o027)
    try:
        path = save(tmp_path, 1)
        assert os.umask(0o027) == 0o027  # the process's umask is left as it was
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o750  # the umask's, not mkdtemp's 0700


def test_a_save_into_a_new_run_folder_creates_it(tmp_path):
    path = save(tmp_path / "new" / "run", 1)
    assert latest_checkpoint(tmp_path / "new" / "run") == path


def test_the_random_state_round_trips():
    state = rng_state()
    expected = (random.random(), torch.rand(2))
    set_rng_state(state)
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])
