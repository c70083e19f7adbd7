"""The paper presets (configs/paper/): they load, say what the release did, and run a step.

Each preset is the GPU recipe with the paper's settings; here its model is swapped for
the tiny test model and the sizes are cut down, everything else is the preset's own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resd.cli import main
from resd.config import load_config
from resd.training.trainer import Trainer

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
RELEASE = {  # the release's choices, which every training preset must carry
    "loss_aggregation": "seq_mean_token_mean", "rollout_is_cap": 2.0, "unparsed_reflection": "raw",
    "curation_ops": "add", "solution_buffer_keep": "latest", "teacher_feedback_with_solution": False,
    "batch_size": 32, "inner_updates": 4, "lr": 1e-6, "teacher_update_rate": 1e-4, "topk": 100,
    "add_tail": True, "min_ratio": 0.2, "is_clip": 2.0, "playbook_max_entries": 200, "playbook_prune_every": 4, "playbook_similarity": None,
    "teacher_playbook_tokens": None, "reflection_playbook_tokens": None, "curation_playbook_tokens": None,
}  # fmt: skip
SMALL = ["steps=1", "batch_size=2", "max_new_tokens=8", "reflection_max_new_tokens=24",
         "curation_max_new_tokens=24", "max_prompt_tokens=1024", "max_teacher_prompt_tokens=2048",
         "env_args.n_train=2", "env_args.n_test=1", "eval_samples=1", "loss_chunk_size=4",
         "generation_batch_size=4", "progress=false"]  # fmt: skip


@pytest.mark.parametrize(("name", "algorithm", "n", "weighting"), [
    ("manufactoria_resd", "resd", 1, True),
    ("manufactoria_sdpo", "sdpo", 1, False),
    ("manufactoria_grpo", "grpo", 8, False),
])  # fmt: skip
def test_training_preset_runs_a_step(tiny_model_dir, tmp_path, name, algorithm, n, weighting):
    cfg = load_config(PAPER / f"{name}.yaml")
    assert (cfg.algorithm, cfg.rollouts_per_prompt, cfg.success_weighting) == (
        algorithm,
        n,
        weighting,
    )
    assert cfg.model == "Qwen/Qwen3-4B-Thinking-2507" and cfg.env == "manufactoria"
    for key, value in RELEASE.items():
        assert getattr(cfg, key) == value, key
    small = load_config(PAPER / f"{name}.yaml", [f"model={tiny_model_dir}", f"output_dir={tmp_path / name}",
                                                 *SMALL, f"rollouts_per_prompt={min(n, 2)}"])  # fmt: skip
    summary = Trainer(small).train()
    assert summary["steps"] == 1
    last = summary["last"]
    assert last["rollouts"] == 2 * min(n, 2) and last["loss"] == last["loss"]
    if algorithm != "grpo":
        assert last["distilled"] > 0 and last["rollout_logprob_gap"] >= 0


def test_ifeval_forgetting_preset_evaluates(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ifeval.json"
    code = main(["eval", "--config", str(PAPER / "ifeval_forgetting.yaml"), "--model", str(tiny_model_dir),
                 "--items", "2", "--samples", "1", "--max-new-tokens", "8", "--out", str(out), "path=null"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "env:   ifeval" in printed and "T = 0.6, top-p = 0.95" in printed
    assert "(k = 1 samples per item, 2 test items)" in printed  # flags override the file


def test_eval_config_with_an_unknown_key_is_refused(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: ifeval\nsampels: 4\n")
    assert main(["eval", "--config", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert "sampels: unknown key" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "env: required" in capsys.readouterr().err
