"""Continual learning: forgetting / BWT arithmetic, config validation, a 2-stage run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from resd.analysis.continual import (
    backward_transfer,
    build_plan,
    check_reused_output,
    forgetting,
    format_table,
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


def test_a_task_missing_from_the_last_row_counts_in_neither_metric():
    """A task with no final number (not evaluated after the last stage) is left out of
    forgetting and BWT, not an error. Catches the `final is not None` / `acc[T][i] is
    not None` checks dropped (None − x raised TypeError)."""
    acc = [
        [0.5, None, None],
        [0.4, 0.8, None],
        [None, 0.6, 0.9],  # task 0 was not evaluated after the last stage
    ]
    assert forgetting(acc) == pytest.approx(0.2)  # task 1 alone: 0.8 − 0.6
    assert backward_transfer(acc) == pytest.approx(-0.2)
    assert forgetting([[0.5, None], [None, 0.4]]) is None
    assert backward_transfer([[0.5, None], [None, 0.4]]) is None


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


@pytest.mark.parametrize("key", ["model", "output_dir"])
def test_a_stage_that_names_what_the_chain_sets_is_refused(key):
    """A stage's `model` (or `output_dir`) lost to the chain without a word: the stage
    trained from the one before it, not from the model its config named."""
    with pytest.raises(ConfigError, match=rf"^stages\[1\]\.{key}: set by the chain"):
        build_plan({"stages": [{"env": "arithmetic"}, {"env": "arithmetic", key: "other"}]})
    assert build_plan({key: "top", "stages": [{}]}).base.to_dict()[key] == "top"


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


def test_the_printed_table_has_a_row_per_stage_and_the_heldout_after_a_bar():
    """What `resd continual` prints at the end: the task columns, the held-out suites
    after a bar, one line per evaluation row, the two metrics and each held-out change.
    Catches a row, a bar, a metric line or a held-out line left out, and columns that
    do not line up (a width or label of the wrong size)."""
    plan = build_plan(
        {"stages": [{"name": "a", "env": "arithmetic"}, {"name": "b", "env": "arithmetic"}],
         "heldout": [{"name": "h", "env": "arithmetic"}, {"name": "g", "env": "arithmetic"}]}
    )  # fmt: skip

    def row(**acc: float) -> dict:
        return {n: {"metrics": {"case_mean@k": v, "task_mean@k": v / 2}} for n, v in acc.items()}

    rows = [row(a=0.2, h=0.5, g=0.1), row(a=0.8, h=0.4, g=0.3), row(a=0.6, b=0.9, h=0.7, g=0.05)]
    assert format_table(summarize(plan, rows)).splitlines() == [
        "accuracy = case_mean@k (rows: after each stage)",
        "                   a          b |          h          g",
        "before        0.2000          - |     0.5000     0.1000",
        "stage-1-a     0.8000          - |     0.4000     0.3000",
        "stage-2-b     0.6000     0.9000 |     0.7000     0.0500",
        "forgetting: +0.2000",
        "backward transfer: -0.2000",
        "held-out h: +0.2000 from before to the last stage",
        "held-out g: -0.0500 from before to the last stage",
    ]
    # One task, no held-out suite: no bar, and no metric to compute. A long name widens
    # its column and the row labels.
    long = "a-very-long-task-name"
    plan = build_plan({"stages": [{"name": long, "env": "arithmetic"}]})
    rows = [{long: {"metrics": {"case_mean@k": v, "task_mean@k": v}}} for v in (0.25, 0.5)]
    assert format_table(summarize(plan, rows)).splitlines() == [
        "accuracy = case_mean@k (rows: after each stage)",
        f"{'':29s} {long}",
        f"before{'':23s} {0.25:21.4f}",
        f"stage-1-{long} {0.5:21.4f}",
        "forgetting: n/a (one task)",
        "backward transfer: n/a (one task)",
    ]


def test_a_one_stage_run_reports_its_heldout_change():
    """With one stage there are two rows, before and after it: the held-out change is
    their difference, and there is no earlier task to forget. Catches a change reported
    only from a third row on (`len(rows) > 2`)."""
    plan = build_plan(
        {
            "stages": [{"name": "a", "env": "arithmetic"}],
            "heldout": [{"name": "h", "env": "arithmetic"}],
        }
    )
    rows = [
        {n: {"metrics": {"case_mean@k": v, "task_mean@k": v}} for n, v in row.items()}
        for row in ({"a": 0.1, "h": 0.6}, {"a": 0.7, "h": 0.45})
    ]
    metrics = summarize(plan, rows)["metrics"]["case_mean@k"]
    assert metrics["heldout_change"] == {"h": pytest.approx(-0.15)}
    assert metrics["forgetting"] is None and metrics["backward_transfer"] is None


def test_a_plan_leaves_the_callers_mapping_alone_and_checks_eval_all_tasks():
    """build_plan takes a parsed YAML mapping that a caller may use again (a second plan
    from the same mapping is the same plan), and `eval_all_tasks` must be a boolean.
    Catches the mapping's `stages` / `eval_all_tasks` popped from the caller's own dict
    and a non-boolean `eval_all_tasks` taken as true."""
    config = {
        "eval_all_tasks": True,
        "stages": [{"name": "a", "env": "arithmetic"}, {"env": "arithmetic"}],
    }
    first, again = build_plan(config), build_plan(config)
    assert config == {
        "eval_all_tasks": True,
        "stages": [{"name": "a", "env": "arithmetic"}, {"env": "arithmetic"}],
    }
    assert [s.name for s in again.stages] == [s.name for s in first.stages] == ["a", "arithmetic"]
    assert again.eval_all_tasks and [s.name for s in again.row_suites(0)] == ["a", "arithmetic"]
    assert plan_record(again)["eval_all_tasks"] is True  # recorded, so a re-run compares it
    with pytest.raises(ConfigError, match=r"^eval_all_tasks: expected true/false, got 'yes'"):
        build_plan({"stages": [{"env": "arithmetic"}], "eval_all_tasks": "yes"})


def test_a_heldout_suite_without_env_or_with_env_args_not_a_mapping_is_refused():
    """A held-out suite names its environment and gives `env_args` as a mapping; else the
    config error names the field. Catches either check dropped (a KeyError, or a list
    handed to the environment as its arguments)."""
    stages = [{"env": "arithmetic"}]
    with pytest.raises(ConfigError, match=r"^heldout\[0\]\.env: missing"):
        build_plan({"stages": stages, "heldout": [{"name": "h"}]})
    with pytest.raises(ConfigError, match=r"^heldout\[1\]\.env_args: expected a mapping"):
        build_plan(
            {
                "stages": stages,
                "heldout": [{"env": "arithmetic"}, {"env": "arithmetic", "env_args": [1]}],
            }
        )


def test_bad_heldout_settings_and_an_unreadable_record_are_config_errors(tmp_path):
    """A held-out suite's evaluation setting is checked like any config value and named
    under `heldout[k]`; a `continual-config.yaml` that is not YAML is refused by name.
    Catches either error swallowed (the suite then evaluated with the previous stage's
    settings, or a NameError)."""
    with pytest.raises(ConfigError, match=r"^heldout\[0\]\.eval_samples:"):
        build_plan({"stages": [{"env": "arithmetic"}],
                    "heldout": [{"env": "arithmetic", "eval_samples": "many"}]})  # fmt: skip
    plan = build_plan({"output_dir": str(tmp_path), "stages": [{"env": "arithmetic"}]})
    # not YAML; emptied or a list (read as settings, every key was "changed", the whole
    # config printed); not text (UnicodeDecodeError's words alone, naming no file)
    for damaged in (b"stages: [unclosed\n", b"", b"[1, 2]\n", b"\x80 not text"):
        (tmp_path / "continual-config.yaml").write_bytes(damaged)
        with pytest.raises(ConfigError, match=r"^output_dir: .*continual-config.yaml cannot be "
                           r"read \(.+\), so the stages and evaluations in .* cannot be "
                           r"vouched for; use another output_dir$") as exc:  # fmt: skip
            check_reused_output(plan, plan_record(plan))
        assert "\n" not in str(exc.value)
    # the YAML problem and where, not its context ("while parsing a flow sequence")
    (tmp_path / "continual-config.yaml").write_bytes(b"stages: [unclosed\n")
    with pytest.raises(ConfigError, match=r"\(expected ',' or '\]', but got '<stream end>' at "
                                          r"line 2, column 1\)"):  # fmt: skip
        check_reused_output(plan, plan_record(plan))


def test_a_heldout_suite_sets_every_evaluation_key_of_its_own():
    """Each evaluation key a held-out suite may set reaches its settings, and only its
    own: the stages keep the base's. Catches a key missing from the allowed set (refused
    as unknown) or not passed on."""
    plan = build_plan(
        {"eval_samples": 2,
         "stages": [{"env": "arithmetic"}],
         "heldout": [{"name": "h", "env": "arithmetic", "eval_items": 3, "eval_samples": 5,
                      "eval_temperature": 0.3, "eval_top_p": 0.5, "max_new_tokens": 40,
                      "max_prompt_tokens": 70},
                     {"name": "g", "env": "arithmetic", "env_args": {"n_test": 2},
                      "eval_max_new_tokens": 20}]}
    )  # fmt: skip
    h, g = (s.settings for s in plan.heldout)
    assert (h.items, h.samples, h.temperature, h.top_p) == (3, 5, 0.3, 0.5)
    assert (h.max_new_tokens, h.max_prompt_tokens) == (40, 70)
    assert g.max_new_tokens == 20 and g.samples == 2
    assert plan.heldout[0].env_args == {} and plan.heldout[1].env_args == {"n_test": 2}
    stage = plan.stages[0].suite.settings
    assert stage.samples == 2 and (stage.temperature, stage.items) != (0.3, 3)


def test_stages_must_be_a_list_of_mappings_and_the_command_needs_a_config(capsys):
    """`stages` is required and holds mappings; `resd continual` without `--config` is a
    usage error. Catches a missing `stages` read as an empty plan, stage entries that are
    not mappings passed on (a ValueError), and `--config` made optional."""
    for bad in ({}, {"stages": ["arithmetic"]}, {"stages": [{"env": "arithmetic"}, 3]}):
        with pytest.raises(ConfigError, match=r"^stages: expected a non-empty list of mappings"):
            build_plan(bad)
    with pytest.raises(SystemExit) as exc:
        main(["continual"])
    assert exc.value.code == 2 and "--config" in capsys.readouterr().err


def test_a_stage_without_env_anywhere_is_warned_about_and_only_then(caplog):
    """A stage trains on the default environment only when neither it nor the base config
    names one: that alone is warned about. Catches the warning given when either names
    an environment."""
    build_plan({"stages": [{"env": "arithmetic"}]})
    build_plan({"env": "arithmetic", "stages": [{"steps": 1}]})
    assert "no env" not in caplog.text
    build_plan({"stages": [{"env": "arithmetic"}, {"steps": 1}]})
    assert "stages[1]: no env, here or in the base config" in caplog.text
    # a stage without a name is named after its environment, not the base config's
    assert build_plan({"stages": [{"env": "toy_envs:ParityEnv"}]}).stages[0].name == (
        "toy_envs-ParityEnv"
    )


def test_the_record_holds_each_heldout_suite_and_a_refusal_names_three_differences(tmp_path):
    """`continual-config.yaml` records every held-out suite by name, environment,
    arguments and settings; a re-run refused for more than three differences names the
    first three and counts the rest. Catches a suite recorded under the wrong keys, and
    the rest counted at the wrong number of differences or joined without a separator."""
    config = {"output_dir": str(tmp_path),
              "stages": [{"env": "arithmetic", "steps": 1}],
              "heldout": [{"name": "h", "env": "arithmetic", "env_args": {"n_test": 2}}]}  # fmt: skip
    record = plan_record(build_plan(dict(config)))
    (suite,) = record["heldout"]
    assert sorted(suite) == ["env", "env_args", "name", "settings"]
    assert (suite["name"], suite["env"], suite["env_args"]) == ("h", "arithmetic", {"n_test": 2})
    (tmp_path / "continual-config.yaml").write_text(yaml.safe_dump(record))

    def refusal(stage: dict, heldout: dict) -> str:
        plan = build_plan({**config, "stages": [stage], "heldout": [heldout]})
        with pytest.raises(ConfigError) as exc:
            check_reused_output(plan, plan_record(plan))
        return str(exc.value)

    three = refusal(
        {"env": "arithmetic", "steps": 2},
        {"name": "g", "env": "arithmetic", "env_args": {"n_test": 3}},
    )
    assert three.count(" then, ") == 3 and "more" not in three
    four = refusal({"env": "arithmetic", "steps": 2, "lr": 1e-4},
                   {"name": "g", "env": "arithmetic", "env_args": {"n_test": 3}})  # fmt: skip
    shown = four.split("other settings (", 1)[1].split("); re-running", 1)[0]
    assert len(shown.split("; ")) == 4 and shown.endswith("; and 1 more")
    assert shown.count(" then, ") == 3


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
    # progress lines and where the result went (catches each print dropped, and a stage
    # trained from scratch announced as resuming)
    assert "[continual] stage 1 (parity): training" in printed
    assert "[continual] row 2: evaluating ifeval" in printed
    assert printed.rstrip().endswith(f"continual: {out / 'continual.json'}")

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
    # the samples file holds one JSON record a line; a row keeps each suite's per-item scores
    samples = (out / "evals" / "row-2-ifeval.jsonl").read_text().splitlines()
    assert len(samples) == 2 and all(isinstance(json.loads(line), dict) for line in samples)
    assert set(result["evaluations"][2]["ifeval"]) == {"metrics", "per_item"}
    # Each row is cached under its own index (a shifted index would hand a later row the
    # base model's numbers), and the settings a re-run is checked against are recorded.
    for k, row in enumerate(result["evaluations"]):
        assert json.loads((out / "evals" / f"row-{k}.json").read_text()) == row
    assert yaml.safe_load((out / "continual-config.yaml").read_text())["stages"][1]["steps"] == 2

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


def test_a_stage_that_sets_its_own_playbook_does_not_carry_the_last_one_on(
    tiny_model_dir, tmp_path, capsys, one_thread
):
    """`playbook_init` set on a stage (null: start empty) replaces the playbook the
    previous stage handed on, and a stage interrupted after a checkpoint resumes from it.
    Catches the stage's own setting ignored (the carried-on playbook, here a file that
    does not exist, used instead) and the resume flag inverted."""
    from resd.analysis.continual import train_stage

    plan = build_plan(
        {**PREFILLS, "model": str(tiny_model_dir), "output_dir": str(tmp_path / "cl"),
         "batch_size": 2, "inner_updates": 1, "steps": 1, "max_new_tokens": 8,
         "reflection_max_new_tokens": 8, "curation_max_new_tokens": 8, "warmup_steps": 0,
         "progress": False, "generation_dtype": None,
         "stages": [{"name": "fresh", "env": "toy_envs:ParityEnv", "playbook_init": None,
                     "env_args": {"n_train": 2, "n_test": 1}}]}
    )  # fmt: skip
    carried = str(tmp_path / "missing-playbook.json")
    _, playbook, info = train_stage(plan.stages[0], 1, plan, str(tiny_model_dir), carried)
    assert info["playbook_in"] is None and info["config"]["playbook_init"] is None
    assert (info["name"], info["env"]) == ("fresh", "toy_envs:ParityEnv")
    assert info["env_args"] == {"n_train": 2, "n_test": 1}
    assert "[continual] stage 1 (fresh): training" in capsys.readouterr().out
    assert playbook == str(tmp_path / "cl" / "stage-1-fresh" / "playbook.json")
    # killed after its last checkpoint, before its summary: a re-run resumes the stage
    # (a fresh start would refuse to overwrite the folder's files)
    (tmp_path / "cl" / "stage-1-fresh" / "summary.json").unlink()
    model, _, info = train_stage(plan.stages[0], 1, plan, str(tiny_model_dir), carried)
    assert model == str(tmp_path / "cl" / "stage-1-fresh" / "checkpoint-1")
    assert "[continual] stage 1 (fresh): resuming" in capsys.readouterr().out
    assert info["summary"]["steps"] == 1


def test_a_run_that_fails_in_a_later_stage_keeps_the_rows_before_it(
    tiny_model_dir, tmp_path, one_thread
):
    """continual.json is rewritten after each stage's row, so a run that fails in its
    second stage (here a LoRA target the model lacks) keeps the first stage's row and
    record; the output folder may sit in folders not made yet. Catches the per-stage write
    dropped (only the row before training kept) and the folder made without its parents."""
    from resd.analysis.continual import run_continual

    out = tmp_path / "runs" / "cl"
    parity = {"env": "toy_envs:ParityEnv", "env_args": {"n_train": 2, "n_test": 1}}
    plan = build_plan(
        {**PREFILLS, "model": str(tiny_model_dir), "output_dir": str(out), "batch_size": 2,
         "inner_updates": 1, "steps": 1, "max_new_tokens": 8, "reflection_max_new_tokens": 8,
         "curation_max_new_tokens": 8, "warmup_steps": 0, "progress": False,
         "generation_dtype": None, "eval_samples": 1,
         "stages": [{"name": "first", **parity},
                    {"name": "second", **parity,
                     "lora": {"r": 2, "alpha": 4, "target_modules": ["no_such_proj"]}}]}
    )  # fmt: skip
    with pytest.raises(ValueError, match="no_such_proj"):
        run_continual(plan)
    result = json.loads((out / "continual.json").read_text())
    assert result["rows"] == ["before", "stage-1-first"]
    assert [s["name"] for s in result["stages"]] == ["first"]
    assert result["accuracy"][1][0] is not None


def test_a_row_already_evaluated_is_read_back_without_loading_the_model(tmp_path):
    """A re-run reuses `evals/row-<k>.json`: with every suite of the row in it, nothing is
    evaluated and no model is loaded (here the model does not exist). Catches the cache
    looked for elsewhere or its suites evaluated again."""
    from resd.analysis.continual import evaluate_row

    plan = build_plan(
        {"output_dir": str(tmp_path), "stages": [{"name": "a", "env": "arithmetic"}],
         "heldout": [{"name": "h", "env": "arithmetic"}]}
    )  # fmt: skip
    cached = {n: {"metrics": {"case_mean@k": 0.5}, "per_item": {}} for n in ("a", "h")}
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "row-1.json").write_text(json.dumps(cached))
    assert evaluate_row(plan, 1, str(tmp_path / "no-such-model")) == cached


def test_a_damaged_row_cache_is_evaluated_again(tiny_model_dir, tmp_path, caplog):
    """`evals/row-<k>.json` emptied, cut or holding a list failed the re-run with json's
    words or a traceback; it is a cache, so its row is evaluated again and written anew."""
    from resd.analysis.continual import evaluate_row

    plan = build_plan(
        {"output_dir": str(tmp_path), "eval_items": 1, "eval_samples": 1,
         "eval_max_new_tokens": 2, "stages": [{"name": "a", "env": "arithmetic"}]}
    )  # fmt: skip
    (tmp_path / "evals").mkdir()
    cache = tmp_path / "evals" / "row-1.json"
    for damaged in (b"", b'{"a": {"metr', b"[1, 2]", b'{"a": 3}'):
        cache.write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="resd.analysis.continual"):
            results = evaluate_row(plan, 1, str(tiny_model_dir))
        assert list(results) == ["a"] and "case_mean@k" in results["a"]["metrics"]
        assert json.loads(cache.read_text()) == results
        assert f"{cache} cannot be read; its evaluations are made again" in caplog.text
        caplog.clear()


def test_a_stage_folder_with_a_summary_but_no_checkpoint_is_an_error(tmp_path):
    """A stage folder holding summary.json counts as finished and is not trained again;
    with no checkpoint in it there is no model to hand on: an error naming the folder.
    Catches the missing-checkpoint check dropped (a model path of None handed on)."""
    from resd.analysis.continual import train_stage

    plan = build_plan({"output_dir": str(tmp_path), "stages": [{"name": "a", "env": "arithmetic"}]})
    (tmp_path / "stage-1-a").mkdir()
    (tmp_path / "stage-1-a" / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"stage-1-a finished without a checkpoint"):
        train_stage(plan.stages[0], 1, plan, str(tmp_path / "no-such-model"), None)


def test_a_bad_heldout_env_fails_the_run_before_anything_is_written(tmp_path):
    """Every stage's and held-out suite's environment is built before the first row is
    evaluated, so a missing data file fails the run at once, with nothing written. Catches
    that check dropped (the run would load the model and fail only after the training)."""
    from resd.analysis.continual import run_continual

    out = tmp_path / "cl"
    plan = build_plan(
        {"model": str(tmp_path / "no-such-model"), "output_dir": str(out),
         "stages": [{"name": "a", "env": "arithmetic"}],
         "heldout": [{"name": "h", "env": "ifeval",
                      "env_args": {"path": str(tmp_path / "missing.parquet")}}]}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"env_args\.path: no such file"):
        run_continual(plan)
    assert not out.exists()


def test_a_run_whose_first_stage_fails_keeps_the_row_before_it(tmp_path):
    """continual.json is written once the row before any training is evaluated, so a run
    that fails in its first stage still reports that row (here read back from the row's
    cache; the model to train does not exist). Catches that first write dropped."""
    from resd.analysis.continual import run_continual

    out = tmp_path / "cl"
    plan = build_plan(
        {"model": str(tmp_path / "no-such-model"), "output_dir": str(out),
         "stages": [{"name": "a", "env": "arithmetic", "env_args": {"n_train": 2, "n_test": 1}}]}
    )  # fmt: skip
    before = {"a": {"metrics": {"case_mean@k": 0.25, "task_mean@k": 0.5}, "per_item": {}}}
    (out / "evals").mkdir(parents=True)
    (out / "evals" / "row-0.json").write_text(json.dumps(before))
    with pytest.raises(ValueError, match="model: no such folder"):
        run_continual(plan)
    result = json.loads((out / "continual.json").read_text())
    assert result["rows"] == ["before"] and result["stages"] == []
    assert result["accuracy"] == [[0.25]] and result["evaluations"] == [before]


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


def test_a_finished_stages_damaged_summary_is_refused_before_anything_is_written(tmp_path, capsys):
    """A re-run found a finished stage's damaged summary.json only when it reached that
    stage: by then it had rewritten continual-config.yaml and continual.json, which lost
    the rows and stages it had held. The summaries are read before anything is written
    (the model named here does not exist: nothing loads either)."""
    out = tmp_path / "cl"
    config = {"model": str(tmp_path / "no-such-model"), "output_dir": str(out),
              "stages": [{"name": "a", "env": "arithmetic", "env_args": {"n_train": 2, "n_test": 1}}]}  # fmt: skip
    out.mkdir()
    (out / "continual-config.yaml").write_text(
        yaml.safe_dump(plan_record(build_plan(dict(config))))
    )
    (out / "continual.json").write_text('{"stages": ["what the first run reported"]}')
    (out / "stage-1-a").mkdir()
    (out / "stage-1-a" / "summary.json").write_text('{"steps": 4, "eval_af')  # a copy cut short
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["continual", "--config", str(path)]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"resd: error: {out / 'stage-1-a' / 'summary.json'}: cannot be read")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
