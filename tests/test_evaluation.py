"""mean@k / best@k arithmetic, and `resd eval` on the tiny model and on a LoRA checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from resd.analysis.eval_cli import (
    EvalSettings,
    adapter_base_model,
    is_adapter,
    load_policy,
    merge_adapter,
    per_item_metrics,
)
from resd.analysis.evaluation import aggregate
from resd.cli import main
from resd.config import apply_overrides, build_config
from resd.envs.base import Score

# Two items, three samples each: (reward, score) per sample.
OUTCOMES = [
    [(1, 1.0), (0, 0.5), (0, 0.0)],  # task mean 1/3, best 1; case mean 0.5, best 1
    [(0, 0.25), (0, 0.75), (0, 0.5)],  # task mean 0, best 0; case mean 0.5, best 0.75
]
FAST = ("--dtype", "float32", "--max-new-tokens", "8", "--samples", "2")


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model gains nothing from threads; on a shared CPU they only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scores(rows):
    return [[Score(r, s, "") for r, s in item] for item in rows]


def test_mean_and_best_at_k_on_hand_made_outcomes():
    m = aggregate(scores(OUTCOMES))
    assert m["task_mean@k"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["task_best@k"] == pytest.approx(0.5)
    assert m["case_mean@k"] == pytest.approx(0.5)
    assert m["case_best@k"] == pytest.approx((1.0 + 0.75) / 2)
    assert (m["k"], m["items"]) == (3, 2)
    # k = 1: mean@1 == best@1
    single = aggregate(scores([[item[0]] for item in OUTCOMES]))
    assert single["task_mean@k"] == single["task_best@k"] == 0.5
    assert single["case_mean@k"] == single["case_best@k"] == pytest.approx(0.625)


def test_aggregate_needs_samples():
    with pytest.raises(ValueError, match="at least one sample"):
        aggregate([])
    with pytest.raises(ValueError, match="at least one sample"):
        aggregate([[Score(1, 1, "")], []])


def test_per_item_metrics_from_records():
    records = [
        {"item": f"i{n}", "sample": j, "response": "", "reward": r, "score": s}
        for n, item in enumerate(OUTCOMES)
        for j, (r, s) in enumerate(item)
    ]
    rows = per_item_metrics(records)
    assert [r["item"] for r in rows] == ["i0", "i1"]
    assert rows[0]["rewards"] == [1.0, 0.0, 0.0] and rows[1]["scores"] == [0.25, 0.75, 0.5]
    assert rows[0]["task_mean@k"] == pytest.approx(1 / 3) and rows[0]["task_best@k"] == 1.0
    assert rows[1]["case_mean@k"] == pytest.approx(0.5) and rows[1]["case_best@k"] == 0.75


def test_eval_settings_follow_the_training_config():
    cfg = build_config(apply_overrides({}, ["eval_samples=3", "max_new_tokens=20", "eval_items=5"]))
    settings = EvalSettings.from_config(cfg)
    assert (settings.samples, settings.max_new_tokens, settings.items) == (3, 20, 5)
    assert settings.temperature == cfg.eval_temperature == 0.6
    with pytest.raises(ValueError, match="samples"):
        EvalSettings(samples=0)


def test_resd_eval_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--env", "toy_envs:ParityEnv", "n_test=3",
            *FAST, "--seed", "1", "--out", str(out), "--per-item"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "per-task" in printed and "per-test-case" in printed and "parity/1002" in printed
    result = json.loads(out.read_text())
    assert result["adapter"] is False and result["env_args"] == {"n_test": 3}
    assert result["settings"]["samples"] == 2 and result["settings"]["seed"] == 1
    assert len(result["per_item"]) == 3 and len(result["samples"]) == 6
    # The aggregate is the mean of the per-item numbers, and matches the samples.
    for key in ("task_mean@k", "task_best@k", "case_mean@k", "case_best@k"):
        per_item = [row[key] for row in result["per_item"]]
        assert result["metrics"][key] == pytest.approx(sum(per_item) / 3)
    for sample in result["samples"]:
        assert sample["reward"] == float(len(sample["response"]) % 2 == 0)
    # Same seed, same numbers.
    assert main([*args[:-3], "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert [s["response"] for s in again["samples"]] == [s["response"] for s in result["samples"]]


def test_resd_eval_on_a_lora_checkpoint(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    from resd.models import load_model
    from resd.training.trainer import Trainer

    cfg = build_config(apply_overrides({}, [
        f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "env=toy_envs:ParityEnv",
        "algorithm=sdpo_ss", "steps=1", "batch_size=2", "inner_updates=1", "max_new_tokens=8",
        "eval_samples=1", "eval_items=1", "lr=1e-1", "warmup_steps=0", "progress=false",
        "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
    ]))  # fmt: skip
    Trainer(cfg).train()
    adapter = tmp_path / "run" / "checkpoint-1"
    assert is_adapter(adapter) and not is_adapter(tiny_model_dir)
    assert adapter_base_model(adapter) == str(tiny_model_dir)
    assert adapter_base_model(adapter, "other/base") == "other/base"

    # The merged model computes what base + adapter computes.
    merged, _ = load_policy(adapter, dtype="float32", device="cpu")
    reference = PeftModel.from_pretrained(load_model(str(tiny_model_dir), device="cpu"), adapter)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference(input_ids=ids).logits)
        # the adapter is not a no-op, so the comparison above means something
        base = load_model(str(tiny_model_dir), device="cpu")
        assert not torch.allclose(base(input_ids=ids).logits, reference(input_ids=ids).logits)
    # merge_adapter writes a full model that loads on its own, tokenizer included
    folder = merge_adapter(adapter, tmp_path / "merged")
    assert (folder / "config.json").exists() and not is_adapter(folder)
    reloaded, _ = load_policy(folder, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)

    out = tmp_path / "lora-eval.json"
    args = ["eval", "--model", str(adapter), "--env", "toy_envs:ParityEnv", "n_test=2", *FAST,
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "adapter on" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["adapter"] is True and result["base_model"] == str(tiny_model_dir)
    assert result["metrics"]["items"] == 2 and result["metrics"]["k"] == 2


def test_resd_eval_rejects_a_bad_environment(tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--env", "no_such_env"]) == 2
    assert "unknown environment" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "message"),
    [("samples: abc", "samples: expected an integer, got 'abc'"),
     ("temperature: hot", "temperature: expected a number, got 'hot'"),
     ("env_args: n_test", "env_args: expected a mapping")],
)  # fmt: skip
def test_resd_eval_checks_the_types_in_its_config_file(tmp_path, capsys, line, message):
    """A value of the wrong type is named with its key and file, not a TypeError later."""
    config = tmp_path / "e.yaml"
    config.write_text(f"model: some/model\nenv: toy_envs:ParityEnv\n{line}\n")
    assert main(["eval", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(config) in err


def test_resd_eval_checks_out_before_evaluating(tmp_path, capsys, monkeypatch):
    """An --out that cannot be written fails before the evaluation, whose results it would lose."""
    monkeypatch.setattr(
        "resd.analysis.eval_cli.evaluate_model",
        lambda *args, **kwargs: pytest.fail("evaluated before --out was checked"),
    )
    base = ["eval", "--model", "some/model", "--env", "toy_envs:ParityEnv", "--out"]
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert main([*base, str(tmp_path / "runs" / "a")]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("kept")
    assert main([*base, str(tmp_path / "file" / "sub" / "eval.json")]) == 2
    assert f"{tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "kept"
