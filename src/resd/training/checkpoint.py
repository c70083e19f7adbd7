"""Checkpoints that let a killed run continue exactly where it stopped.

A checkpoint is a folder `checkpoint-12/` in the run directory (the name every Hugging
Face tool expects) holding the student at its top level (an ordinary model folder, or a
PEFT adapter, that `from_pretrained` loads as it is), the teacher weights (in
`teachers/`), the optimizer,
the playbook, the solution buffer, the RNG states and the data cursor. It is written to
a temporary folder and renamed into place, so a checkpoint either exists whole or not
at all: a SIGKILL during saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from resd.config import first_line
from resd.models import as_loaded
from resd.rundir import read_json_object

log = logging.getLogger(__name__)
_NAME = re.compile(r"^checkpoint-(\d+)$")


# What a checkpoint must hold to be resumed from (teacher files are optional: a run with a
# live teacher has none), besides the model: its config.json, or a LoRA adapter's.
REQUIRED = ("state.json", "optimizer.pt", "rng_torch.pt")
MODEL_FILES = ("config.json", "adapter_config.json")
# ... and its weights, whole or sharded, or the adapter's
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")  # fmt: skip


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A leftover `.tmp-*` folder (a save that was
    killed) is not one; a `checkpoint-*` folder missing a required file is skipped with a
    warning, so a resume falls back to the newest complete one instead of failing."""
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        if not (p.is_dir() and _NAME.match(p.name)):
            continue
        missing = [name for name in REQUIRED if not (p / name).exists()]
        if not any((p / name).exists() for name in MODEL_FILES):
            missing.append("config.json")
        if not any((p / name).exists() for name in WEIGHT_FILES):
            missing.append("model weights")
        if missing:
            log.warning("checkpoint %s is incomplete (no %s); skipped", p, ", ".join(missing))
            continue
        found.append(p)
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """safetensors refuses tensors that share memory (tied embeddings): keep one name each."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        unique[name] = t.detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(unique, str(path), metadata=metadata)


def save_model(
    folder: Path, model, tokenizer, model_state: dict[str, torch.Tensor] | None = None
) -> None:
    """The student as an ordinary Hugging Face folder (PEFT: the adapter) with its tokenizer,
    without the settings training forced on it (left padding, a shortened length).

    A model card already in `folder` goes first: each caller writes its own, and peft
    would read the old one to update it, failing at the end of a resumed run on one it
    cannot read (a damaged or binary README.md)."""
    (folder / "README.md").unlink(missing_ok=True)
    if model_state is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, state_dict=model_state)
    with as_loaded(tokenizer):
        tokenizer.save_pretrained(folder)


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    model_state: dict[str, torch.Tensor] | None,
    teacher_states: dict[str, dict[str, torch.Tensor]],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
    card: str | None = None,
) -> Path:
    """Write everything needed to resume; `state` must be JSON-serialisable. `card` is
    the checkpoint's model card (README.md), in place of peft's blank template.

    Tensors come in as full (unsharded) state dicts, gathered by the caller, so the
    layout does not depend on how the run was distributed; `model_state` None means
    the model is whole and saves itself.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".tmp-checkpoint-"))
    umask = os.umask(0)  # mkdtemp makes it 0700; the checkpoint is read as the run folder is
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        save_model(tmp, model, tokenizer, model_state)
        if card is not None:
            (tmp / "README.md").write_text(card)
        for name, tensors in teacher_states.items():  # teacher weights, reference model, ...
            save_tensors(teacher_file(tmp, name), tensors)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state()["torch"], tmp / "rng_torch.pt")
        payload = dict(state, step=step, python_rng=random.getstate())
        (tmp / "state.json").write_text(json.dumps(payload))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for killed in run_dir.glob(".tmp-checkpoint-*"):  # saves a kill cut short, never read
        shutil.rmtree(killed, ignore_errors=True)
    return final


def teacher_file(checkpoint: Path, name: str) -> Path:
    """Where a checkpoint keeps the weights of teacher `name` (`teacher`, `reference`): in
    `teachers/`, not beside the student, whose folder a server such as vLLM reads whole,
    every `*.safetensors` file in it, under the same tensor names."""
    return checkpoint / "teachers" / f"{name}.safetensors"


@contextmanager
def reading(file: Path) -> Iterator[None]:
    """Read a checkpoint's file, or fail with a ValueError that names it and the way on.

    A checkpoint is written whole or not at all (`save_checkpoint`), so a file of one that
    cannot be read was damaged later: a disk error, a copy cut short, an edit. Each reader
    (safetensors, torch.load, json) said so in its own words, as a traceback: EOFError,
    "header too small", "pop from empty list"."""
    try:
        yield
    except Exception as exc:
        folder = next((p for p in file.parents if _NAME.match(p.name)), file.parent)
        raise ValueError(
            f"resume: cannot read {file} ({type(exc).__name__}: {first_line(exc)}); checkpoint "
            f"{folder.name} is damaged: move it out of {folder.parent} to resume from the "
            "checkpoint before it, if the run has one"
        ) from exc


# The JSON files of a checkpoint that resuming reads through the model loader (its
# tokenizer's are not: the run's tokenizer comes from `model`, so a damaged one there does
# not stop a resume; state.json is `read_state`'s, under the same `reading`).
RESUME_READS = ("config.json", "generation_config.json", "adapter_config.json",
                "model.safetensors.index.json")  # fmt: skip


def check_readable(path: Path) -> None:
    """Each JSON file of checkpoint `path` that a resume reads holds an object, and each
    safetensors file's header reads, or the ValueError of `reading`: the file, and the way
    on. The model loader said it in its own words, naming a setting for a damaged
    generation_config.json ("model_init_kwargs: 'list' object is not a mapping") or
    transformers' guess for a damaged config.json ("It looks like the config file ... is
    not a valid JSON file")."""
    from safetensors import safe_open

    for file in (path / name for name in RESUME_READS):
        if not file.exists():
            continue
        with reading(file):
            try:
                read_json_object(file)
            except (json.JSONDecodeError, UnicodeDecodeError):
                # transformers reads a generation config it cannot parse as absent (resd
                # passes every sampling setting itself); only JSON of another shape fails it
                if file.name != "generation_config.json":
                    raise
    for file in sorted(path.rglob("*.safetensors")):
        with reading(file), safe_open(str(file), framework="pt"):
            pass


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json: the run's cursor, buffers and settings."""
    file = path / "state.json"
    with reading(file):
        return read_json_object(file)


def load_checkpoint(path: Path, *, teachers: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Restore teachers and RNG in place; returns (run state, full optimizer state).

    The student is loaded from `path` itself by the caller, and the optimizer state is
    loaded by it too, since under FSDP that must wait until the model is sharded.
    """
    for name, teacher in teachers.items():
        legacy = path / f"{name}.safetensors"  # checkpoints written before teachers/ existed
        file = legacy if legacy.exists() else teacher_file(path, name)
        with reading(file):
            teacher.load(file)
    with reading(path / "optimizer.pt"):
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    state = read_state(path)
    with reading(path / "state.json"):
        python_rng = state.pop("python_rng")
    with reading(path / "rng_torch.pt"):
        set_rng_state(
            {"python": python_rng, "torch": torch.load(path / "rng_torch.pt", weights_only=True)}
        )
    return state, optimizer_state
