"""Continual learning: forgetting / BWT arithmetic, config validation, a 2-stage run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from resd.analysis.continual import (
    backward_transfer,
    build_plan,
    check_reused_output,
    forgetting,
    load_plan,
    plan_record,
    summarize,
)
from resd.cli import main
from resd.config import ConfigError

# Reflector / curator replies a random tiny model cannot write: prefilled (see test_trainer).
PREFILLS = {
    "structured_output": "off",  # the prefill scripts the whole reply; no grammar
    "reflection_prefill": '{"error_identification": "odd length", "key_insight": "count"}',
    "curation_prefill": '{"operations": [{"type": "ADD", "section": "Common Mistakes to Avoid",'
    ' "content": "Count the characters of a reply before sending it."}]}',
}


# ---- arithmetic on hand-made matrices: acc[stage][task] after each stage -----------------------
def test_forgetting_and_bwt_on_a_lower_triangular_matrix():
    acc = [
        [0.5, None, None],
        [0.3, 0.8, None],
        [0.2, 0.6, 0.9],
    ]
    # task 0: best 0.5, final 0.2 → 0.3; task 1: best 0.8, final 0.6 → 0.2
    assert forgetting(acc) == pytest.approx(0.25)
    # task 0: 0.2 − 0.5; task 1: 0.6 − 0.8
    assert backward_transfer(acc) == pytest.approx(-0.25)


def test_forgetting_takes_the_best_earlier_stage_not_the_first():
    acc = [
        [0.4, 0.1, 0.0],
        [0.7, 0.5, 0.1],  # task 0 improved after stage 1 (positive transfer) ...
        [0.6, 0.5, 0.9],  # ... then dropped a little
    ]
    # task 0: max(0.4, 0.7) − 0.6 = 0.1; task 1: max over s ≥ 1 only (0.5) − 0.5 = 0
    assert forgetting(acc) == pytest.approx(0.05)
    # BWT: (0.6 − 0.4) + (0.5 − 0.5), halved: positive = later stages helped task 0
    assert backward_transfer(acc) == pytest.approx(0.1)


def test_metrics_without_earlier_tasks_or_numbers():
    assert forgetting([[0.5]]) is None and backward_transfer([[0.5]]) is None
    assert forgetting([[None, None], [0.3, 0.4]]) is None
    assert backward_transfer([[None, None], [0.3, 0.4]]) is None
    no_forgetting = [[0.5, None], [0.9, 0.4]]
    assert forgetting(no_forgetting) == pytest.approx(-0.4)  # it got better: negative
    assert backward_transfer(no_forgetting) == pytest.approx(0.4)


# ---- config validation ----------------------------------------------------------------------
def test_plan_merges_stage_overrides_and_names_bad_fields():
    plan = build_plan(
        {"lr": 1e-5, "env_args": {"n_train": 3},
         "stages": [{"env": "arithmetic", "steps": 2}, {"name": "more", "lr": 1e-4},
                    {"env": "arithmetic", "env_args": {"n_train": 5}, "playbook_init": None}],
         "heldout": [{"env": "arithmetic", "eval_items": 3}]},
        ["steps=7"],
    )  # fmt: skip
    names = [s.name for s in plan.stages]
    assert names == ["arithmetic", "more", "arithmetic-2"]
    first, second, third = (s.config for s in plan.stages)
    assert first.steps == 2 and first.env_args == {} and first.lr == 1e-5
    assert second.steps == 7 and second.lr == 1e-4 and second.env_args == {"n_train": 3}
    assert third.env_args == {"n_train": 5}
    # only a stage that sets playbook_init itself opts out of carrying the playbook on
    assert [s.own_playbook for s in plan.stages] == [False, False, True]
    assert plan.heldout[0].name == "arithmetic-3" and plan.heldout[0].settings.items == 3
    assert [s.name for s in plan.row_suites(0)] == ["arithmetic", "arithmetic-3"]
    assert [s.name for s in plan.row_suites(2)] == ["arithmetic", "more", "arithmetic-3"]

    with pytest.raises(ConfigError, match=r"^stages\[1\]\.lr:"):
        build_plan({"stages": [{"env": "arithmetic"}, {"lr": "fast"}]})
    with pytest.raises(ConfigError, match=r"^heldout\[0\]\.steps: unknown key"):
        build_plan({"stages": [{}], "heldout": [{"env": "ifeval", "steps": 3}]})
    with pytest.raises(ConfigError, match=r"^stages:"):
        build_plan({"stages": []})
    with pytest.raises(ConfigError, match=r"^lerning_rate:"):
        build_plan({"stages": [{}]}, ["lerning_rate=1"])


def test_stage_names_become_safe_folder_names():
    """A stage's name names its folder (`stage-<k>-<name>`) and its column: runs of other
    characters become one dash, none is left at either end, and a name with nothing
    usable becomes `task`. Catches a slug that keeps the edge dashes or yields ''."""
    plan = build_plan(
        {"stages": [{"name": "(math) drills!", "env": "arithmetic"},
                    {"name": "toy_envs:ParityEnv v1.0", "env": "arithmetic"},
                    {"name": "?!", "env": "arithmetic"}]}
    )  # fmt: skip
    assert [s.name for s in plan.stages] == ["math-drills", "toy_envs-ParityEnv-v1.0", "task"]


def test_summary_waits_for_every_stage_and_compares_heldout_with_before():
    """continual.json is rewritten after every row: after the "before" row alone there is
    no held-out change yet (catches one reported as +0.0 against itself), and the
    metrics come from the rows after each stage once all have run."""
    plan = build_plan(
        {"stages": [{"name": "a", "env": "arithmetic"}, {"name": "b", "env": "arithmetic"}],
         "heldout": [{"name": "h", "env": "arithmetic"}]}
    )  # fmt: skip

    def row(**acc: float) -> dict:
        return {n: {"metrics": {"case_mean@k": v, "task_mean@k": v / 2}} for n, v in acc.items()}

    rows = [row(a=0.2, h=0.5)]
    first = summarize(plan, rows)
    assert first["rows"] == ["before"] and first["accuracy"] == [[0.2, None]]
    assert first["metrics"]["case_mean@k"] == {
        "forgetting": None, "backward_transfer": None, "heldout_change": {}
    }  # fmt: skip

    rows += [row(a=0.8, h=0.4), row(a=0.6, b=0.9, h=0.7)]
    result = summarize(plan, rows)
    assert result["rows"] == ["before", "stage-1-a", "stage-2-b"]
    assert result["accuracy"] == [[0.2, None], [0.8, None], [0.6, 0.9]]
    assert result["heldout_accuracy"] == [[0.5], [0.4], [0.7]]
    metrics = result["metrics"]["case_mean@k"]
    assert metrics["forgetting"] == pytest.approx(0.2)  # task a: best 0.8 after stage 1, 0.6 now
    assert metrics["backward_transfer"] == pytest.approx(-0.2)
    assert metrics["heldout_change"] == {"h": pytest.approx(0.2)}  # 0.7 now against 0.5 before
    assert result["metrics"]["task_mean@k"]["heldout_change"] == {"h": pytest.approx(0.1)}


# ---- a 2-stage run with the tiny model ------------------------------------------------------
@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads; on a shared CPU they only wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_stage_run(tiny_model_dir, tmp_path, shared_data_dir, capsys, one_thread):
    ifeval = shared_data_dir / "ifeval_100.parquet"
    if not ifeval.exists():
        pytest.skip("shared IFEval data not present")
    out = tmp_path / "cl"
    config = {
        **PREFILLS,
        "model": str(tiny_model_dir), "output_dir": str(out), "algorithm": "resd",
        "batch_size": 2, "inner_updates": 1, "steps": 1, "max_new_tokens": 8,
        "reflection_max_new_tokens": 8, "curation_max_new_tokens": 8, "eval_samples": 2,
        "lr": 1e-2, "warmup_steps": 0, "progress": False, "generation_dtype": None,
        "max_prompt_tokens": 64,  # IFEval prompts are long for the tiny tokenizer
        "stages": [
            {"name": "parity", "env": "toy_envs:ParityEnv", "env_args": {"n_train": 4, "n_test": 2}},
            {"env": "arithmetic", "env_args": {"n_train": 4, "n_test": 2}, "steps": 2},
        ],
        "heldout": [{"name": "ifeval", "env": "ifeval", "env_args": {"path": str(ifeval)},
                     "eval_items": 2, "eval_samples": 1}],
    }  # fmt: skip
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["continual", "--config", str(path), "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "forgetting:" in printed and "backward transfer:" in printed and "ifeval" in printed

    result = json.loads((out / "continual.json").read_text())
    assert result["rows"] == ["before", "stage-1-parity", "stage-2-arithmetic"]
    assert result["tasks"] == ["parity", "arithmetic"] and result["heldout"] == ["ifeval"]
    acc = result["accuracy"]
    # before: the first task only; after stage 1: the tasks seen so far; after 2: both
    assert acc[0][1] is None and acc[1][1] is None and acc[0][0] is not None
    assert all(v is not None for v in acc[2])
    assert all(row[0] is not None for row in result["heldout_accuracy"])
    assert (
        result["accuracy_task"][2][1]
        == result["evaluations"][2]["arithmetic"]["metrics"]["task_mean@k"]
    )
    metrics = result["metrics"]["case_mean@k"]
    assert metrics["forgetting"] == pytest.approx(forgetting(acc[1:]))
    assert metrics["backward_transfer"] == pytest.approx(acc[2][0] - acc[1][0])
    assert set(metrics["heldout_change"]) == {"ifeval"}
    assert result["metrics"]["task_mean@k"]["backward_transfer"] is not None

    # Stage 2 starts from stage 1's last checkpoint and carries its playbook forward.
    stage1, stage2 = (Path(s["dir"]) for s in result["stages"])
    assert stage1.name == "stage-1-parity" and stage2.name == "stage-2-arithmetic"
    assert result["stages"][0]["model_in"] == str(tiny_model_dir)
    assert result["stages"][1]["model_in"] == str(stage1 / "checkpoint-1")
    assert result["stages"][1]["playbook_in"] == str(stage1 / "playbook.json")
    assert (
        result["stages"][1]["config"]["seed"] == 3 and result["stages"][1]["config"]["steps"] == 2
    )
    lesson = "Count the characters of a reply before sending it."
    first, second = (
        {e["content"]: e for e in json.loads((stage / "playbook.json").read_text())["entries"]}
        for stage in (stage1, stage2)
    )
    # Stage 2's curator proposes the same lesson again: the stage-1 entry is carried over, not
    # re-created (same id, same creation step), so its history survives the stage boundary.
    assert (second[lesson]["id"], second[lesson]["created_step"]) == (
        first[lesson]["id"],
        first[lesson]["created_step"],
    )
    assert sum(e == lesson for e in second) == 1
    assert json.loads((stage2 / "summary.json").read_text())["steps"] == 2
    assert (out / "evals" / "row-2-ifeval.jsonl").exists()

    # Re-running reuses the finished stages and evaluations.
    mtimes = [(s / "metrics.jsonl").stat().st_mtime_ns for s in (stage1, stage2)]
    assert main(["continual", "--config", str(path), "seed=3"]) == 0
    assert [(s / "metrics.jsonl").stat().st_mtime_ns for s in (stage1, stage2)] == mtimes
    assert json.loads((out / "continual.json").read_text())["accuracy"] == acc


def test_a_lora_stage_hands_the_next_stage_a_merged_full_model(
    tiny_model_dir, tmp_path, one_thread
):
    """A LoRA run starts from a full model, so a LoRA stage's adapter is merged into its
    base once; catches a next stage pointed at the adapter or at a merge never written."""
    from resd.analysis.continual import train_stage
    from resd.analysis.eval_cli import is_adapter
    from resd.models import load_model

    out = tmp_path / "cl"
    plan = build_plan(
        {**PREFILLS, "model": str(tiny_model_dir), "output_dir": str(out), "batch_size": 2,
         "inner_updates": 1, "steps": 1, "max_new_tokens": 8, "reflection_max_new_tokens": 8,
         "curation_max_new_tokens": 8, "warmup_steps": 0, "progress": False,
         "generation_dtype": None, "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
         "stages": [{"name": "parity", "env": "toy_envs:ParityEnv",
                     "env_args": {"n_train": 2, "n_test": 1}}]}
    )  # fmt: skip
    model, _, info = train_stage(plan.stages[0], 1, plan, str(tiny_model_dir), None)
    merged = out / "stage-1-parity" / "merged-model"
    assert model == info["model_out"] == str(merged)
    assert is_adapter(out / "stage-1-parity" / "checkpoint-1") and not is_adapter(merged)
    assert load_model(model, device="cpu").config.num_hidden_layers == 2


def test_load_plan_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^config: file not found"):
        load_plan(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_plan(tmp_path / "list.yaml")


def test_a_rerun_with_other_settings_is_refused_before_anything_runs(tmp_path, capsys):
    """A re-run reuses finished stages and cached evaluations (`evals/row-<k>.json`, keyed
    by suite name): with a stage's steps or a held-out suite changed, the numbers it
    would report were made by another run than it records."""
    out = tmp_path / "cl"
    config = {
        "model": "unused-until-a-stage-runs", "output_dir": str(out),
        "stages": [{"env": "arithmetic", "env_args": {"n_train": 4, "n_test": 2}, "steps": 1}],
        "heldout": [{"name": "more", "env": "arithmetic", "env_args": {"n_test": 2}, "eval_samples": 1}],
    }  # fmt: skip
    out.mkdir()
    (out / "continual-config.yaml").write_text(
        yaml.safe_dump(plan_record(build_plan(dict(config))))
    )
    check_reused_output(
        build_plan(dict(config)), plan_record(build_plan(dict(config)))
    )  # same: fine
    changed = {**config, "stages": [{**config["stages"][0], "steps": 3}], "progress": False}
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert main(["continual", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[0].steps: 1 then, 3 now" in err and "progress" not in err
    assert sorted(p.name for p in out.iterdir()) == ["continual-config.yaml"]  # nothing ran
    samples = {**config, "heldout": [{**config["heldout"][0], "eval_samples": 4}]}
    with pytest.raises(ConfigError, match=r"heldout\[0\]\.settings\.samples: 1 then, 4 now"):
        check_reused_output(build_plan(dict(samples)), plan_record(build_plan(dict(samples))))
