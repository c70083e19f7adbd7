"""Checkpoints that let a killed run continue exactly where it stopped.

A checkpoint is a folder `checkpoints/step-000012/` holding the student (an ordinary
Hugging Face folder, loadable on its own), the teacher weights, the optimizer, the
playbook, the solution buffer, the RNG states and the data cursor. It is written to a
temporary folder and renamed into place, so a checkpoint either exists whole or not
at all: a SIGKILL during saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

_NAME = re.compile(r"^step-(\d{6})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and _NAME.match(p.name) and (p / "state.json").exists()
    ]
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model,
    tokenizer,
    teachers: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write everything needed to resume; `state` must be JSON-serialisable."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        for name, teacher in teachers.items():  # teacher weights, reference model, ...
            teacher.save(tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
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
    return final


def load_checkpoint(
    path: Path, *, teachers: dict[str, Any], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore teachers, optimizer and RNG in place (the student is loaded from `path/model`)."""
    for name, teacher in teachers.items():
        teacher.load(path / f"{name}.safetensors")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(
        {
            "python": state.pop("python_rng"),
            "torch": torch.load(path / "rng_torch.pt", weights_only=True),
        }
    )
    return state


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    path.write_text("".join(k + "\n" for k in kept))
