"""Data parallelism: 2 CPU processes (gloo, via `accelerate launch`) reproduce a 1-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import PREFILLS, SEED_PLAYBOOK, TESTS, read_jsonl

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                                reason="accelerate launcher not installed")  # fmt: skip


def run(tmp_path: Path, tiny_model_dir: Path, name: str, processes: int) -> Path:
    (tmp_path / "seed.md").write_text(SEED_PLAYBOOK)
    cfg = {
        **PREFILLS, "model": str(tiny_model_dir), "env": "toy_envs:ParityEnv", "steps": 4, "batch_size": 4,
        "inner_updates": 2, "rollouts_per_prompt": 1, "max_new_tokens": 10, "reflection_max_new_tokens": 10,
        "curation_max_new_tokens": 10, "generation_dtype": "float32", "autocast": "none", "lr": 0.01,
        "warmup_steps": 0, "progress": False, "eval_samples": 1, "teacher_update_rate": 0.3,
        "micro_batch_size": 1, "playbook_init": str(tmp_path / "seed.md"), "output_dir": str(tmp_path / name),
        "playbook_prune_every": 100,
    }  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg))
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    cmd = [*launcher, "-m", "resd", "train", "--config", str(tmp_path / f"{name}.yaml")]
    env = dict(
        os.environ,
        PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


def test_two_processes_match_one_process(tiny_model_dir, tmp_path):
    one = run(tmp_path, tiny_model_dir, "one", 1)
    two = run(tmp_path, tiny_model_dir, "two", 2)
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == [1, 2, 3, 4]  # written once, by rank 0
    for a, b in zip(m1, m2, strict=True):
        assert (a["reward"], a["distilled"], a["playbook_size"]) == (
            b["reward"],
            b["distilled"],
            b["playbook_size"],
        )
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
        assert b["reflections"] == a["reflections"] and b["tags_applied"] == a["tags_applied"]
    assert json.loads((one / "playbook.json").read_text()) == json.loads(
        (two / "playbook.json").read_text()
    )
    assert json.loads((two / "playbook.json").read_text())["entries"]
    samples1, samples2 = read_jsonl(one / "samples.jsonl"), read_jsonl(two / "samples.jsonl")
    assert [s["response"] for s in samples1] == [s["response"] for s in samples2]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000004"]
