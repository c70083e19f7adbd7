"""mean@k / best@k arithmetic, and `resd eval` on the tiny model and on a LoRA checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from resd.analysis.eval_cli import (
    EvalSettings,
    adapter_base_model,
    evaluate_env,
    evaluate_model,
    format_metrics,
    format_per_item,
    is_adapter,
    load_policy,
    merge_adapter,
    per_item_metrics,
)
from resd.analysis.evaluation import aggregate, evaluate, safe_score
from resd.cli import main
from resd.config import TrainConfig, apply_overrides, build_config
from resd.envs.base import NotAScoreError, Score
from resd.generation.base import Generation
from resd.models import DTYPES, pick_device, resolve_dtype
from toy_envs import ParityEnv

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


def test_each_reward_functions_mean_is_taken_over_every_sample_that_has_it():
    """Where a list of reward functions scores the replies, an evaluation has each one's
    mean as `rewards/<name>` (TRL's `eval_rewards/<name>/mean`), over every sample of
    every item; a sample without a part (an environment that names it only on failure)
    does not count as a 0; an environment that scores in one piece adds no column. `resd
    eval` prints them under the accuracies. Catches a mean per item then over items (the
    items here have 3 and 1 parts: 0.25 against 0.375), a missing part read as 0, and a
    column added for no function."""
    parted = [
        [Score(1, 1.0, "", {"fmt": 1.0, "len": 0.0}), Score(0, 0.5, "", {"fmt": 0.0}),
         Score(0, 0.0, "", {"fmt": 0.5})],
        [Score(0, 0.25, "", {"fmt": 0.0}), Score(0, 0.75, "", {}), Score(0, 0.5, "", {})],
    ]  # fmt: skip
    m = aggregate(parted)
    assert m["rewards/fmt"] == pytest.approx(1.5 / 4) and m["rewards/len"] == 0.0
    assert [k for k in m if k.startswith("rewards/")] == ["rewards/fmt", "rewards/len"]
    assert m["case_mean@k"] == pytest.approx(0.5)  # the accuracies are unchanged by parts
    assert not [k for k in aggregate(scores(OUTCOMES)) if k.startswith("rewards/")]
    assert format_metrics(m).splitlines()[-3:] == [
        "reward function      mean",
        "rewards/fmt        0.3750",
        "rewards/len        0.0000",
    ]


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


@pytest.mark.parametrize(
    ("extra", "message"),
    [  # torch.device's own RuntimeError, a traceback, after the environment was built
     (["--device", ""], "resd: error: device: expected auto, cpu, cuda, cuda:N, mps or xpu, got ''"),
     (["--device", "gpu"], "resd: error: device: expected auto, cpu, cuda, cuda:N, mps or xpu, got 'gpu'"),
     # `meta` loaded and failed in the first sampling step
     (["--device", "meta"], "got 'meta'"),
     # ignored without a word: the model was not an adapter, so it was evaluated alone
     (["--base-model", "some/base"], "resd: error: base_model: some/model is not a LoRA adapter"),
     # read as "no file", so the evaluation ran and its JSON was never written
     (["--out", ""], "resd eval: error: argument --out: must not be empty"),
     (["--config", " "], "resd eval: error: argument --config: must not be empty")],
)  # fmt: skip
def test_resd_eval_refuses_a_bad_device_base_or_path_before_evaluating(
    extra, message, capsys, monkeypatch
):
    monkeypatch.setattr(
        "resd.analysis.eval_cli.evaluate_model",
        lambda *args, **kwargs: pytest.fail("evaluated before the options were checked"),
    )
    with contextlib.suppress(SystemExit):  # argparse's own refusals exit with status 2
        code = main(["eval", "--model", "some/model", "--env", "toy_envs:ParityEnv", *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# ---- what the mutation tests of `resd eval` found untested --------------------------------
def test_eval_settings_default_to_the_training_configs():
    """`EvalSettings()` (what `evaluate_model` uses without settings) samples as a run
    evaluates by default; a changed default (k, T, top-p, lengths, batch, seed) fails here."""
    assert dataclasses.asdict(EvalSettings()) == dataclasses.asdict(
        EvalSettings.from_config(TrainConfig())
    )


def test_eval_settings_from_a_config_carry_every_sampling_setting():
    """Each of a run's evaluation settings reaches the evaluation, not only the counts: a
    dropped field would silently fall back to the default (equal to TrainConfig's)."""
    cfg = build_config(apply_overrides({}, [
        "eval_temperature=0.3", "eval_top_p=0.8", "max_prompt_tokens=300", "max_new_tokens=20",
        "eval_max_new_tokens=12", "generation_batch_size=3", "seed=9", "autocast=bfloat16",
        "eval_top_k=7", "eval_min_p=0.1", "top_k=3", "min_p=0.2",
    ]))  # fmt: skip
    settings = EvalSettings.from_config(cfg)
    assert (settings.temperature, settings.top_p, settings.max_prompt_tokens) == (0.3, 0.8, 300)
    assert (settings.top_k, settings.min_p) == (7, 0.1)  # evaluation's own, not the rollouts'
    assert (settings.max_new_tokens, settings.batch_size, settings.seed) == (12, 3, 9)
    assert settings.autocast == "bfloat16"


@pytest.mark.parametrize(
    "bad",
    [{"items": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5},
     {"max_new_tokens": 0}, {"max_prompt_tokens": 0}, {"batch_size": 0}, {"top_k": -1},
     {"min_p": -0.1}, {"min_p": 1.5},
     # nan passed `temperature < 0` and sampled from nan logits; inf sampled uniformly
     {"temperature": float("nan")}, {"temperature": float("inf")},
     # -1 was seeded as torch's own; 2**64 failed with "Overflow when unpacking long long"
     {"seed": -1}, {"seed": 2**32}],
)  # fmt: skip
def test_eval_settings_refuse_what_cannot_be_sampled(bad):
    """Nonsense settings fail when made, naming the field, not deep inside sampling; the
    edges that do make sense (greedy T = 0, top-p = 1, a single item) are accepted."""
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        EvalSettings(**bad)
    edge = EvalSettings(temperature=0.0, top_p=1.0, items=1, samples=1, top_k=1, min_p=1.0)
    assert (edge.temperature, edge.top_p, edge.items) == (0.0, 1.0, 1)
    assert EvalSettings(top_k=0, min_p=0.0).top_k == 0  # off


def test_the_printed_tables_and_per_item_rows():
    """`resd eval`'s table (one row per accuracy kind, then k and the item count) and
    `--per-item`'s (ids clipped to 32 characters); a per-item row holds its own numbers only."""
    records = [
        {"item": f"{'x' * 40}{n}", "sample": j, "response": "", "reward": r, "score": s}
        for n, item in enumerate(OUTCOMES)
        for j, (r, s) in enumerate(item)
    ]
    rows = per_item_metrics(records)
    assert set(rows[0]) == {"item", "rewards", "scores", "task_mean@k", "task_best@k",
                            "case_mean@k", "case_best@k"}  # fmt: skip
    assert format_metrics(aggregate(scores(OUTCOMES))).splitlines() == [
        "accuracy           mean@k   best@k",
        "per-task           0.1667   0.5000",
        "per-test-case      0.5000   0.8750",
        "(k = 3 samples per item, 2 test items)",
    ]
    assert format_per_item(rows).splitlines() == [
        "item                             task mean task best case mean case best",
        f"{'x' * 32}     0.333     1.000     0.500     1.000",
        f"{'x' * 32}     0.000     0.000     0.500     0.750",
    ]


def test_resd_eval_flags_reach_the_settings_it_records(tiny_model_dir, tmp_path, capsys):
    """Every sampling flag is taken and recorded (a flag that went missing would be an
    argparse error or a silent default); --out may name folders that do not exist yet."""
    out = tmp_path / "new" / "deeper" / "eval.json"
    args = ["eval", "--model", str(tiny_model_dir), "--env", "toy_envs:ParityEnv", "n_test=3",
            "--dtype", "float32", "--device", "cpu", "--samples", "1", "--max-new-tokens", "4",
            "--max-prompt-tokens", "64", "--temperature", "0.3", "--top-p", "0.9", "--items", "2",
            "--batch-size", "1", "--seed", "3", "--top-k", "5", "--min-p", "0.05",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["settings"] == {
        "samples": 1, "temperature": 0.3, "top_p": 0.9, "top_k": 5, "min_p": 0.05,
        "max_new_tokens": 4, "max_prompt_tokens": 64, "items": 2, "batch_size": 1, "seed": 3,
        "autocast": "auto",
    }  # fmt: skip
    assert (result["model"], result["env"], result["dtype"]) == (
        str(tiny_model_dir),
        "toy_envs:ParityEnv",
        "float32",
    )
    assert len(result["per_item"]) == 2 and len(result["samples"]) == 2
    printed = capsys.readouterr().out.splitlines()
    assert 'env:   toy_envs:ParityEnv {"n_test": 3}' in printed
    assert "T = 0.3, top-p = 0.9, top-k = 5, min-p = 0.05, seed = 3" in printed
    assert "(k = 1 samples per item, 2 test items)" in printed
    assert f"written: {out}" in printed


def test_resd_eval_reads_a_config_file_and_its_flags_win(tiny_model_dir, tmp_path, capsys):
    """--config gives any setting (YAML's 4.0 for a count is 4); a flag given beside it
    wins, and environment arguments on the command line update the file's, key by key."""
    config = tmp_path / "eval.yaml"
    config.write_text(f"model: {tiny_model_dir}\nenv: toy_envs:ParityEnv\n"
                      "env_args: {n_test: 3, n_train: 2}\nsamples: 1\nmax_new_tokens: 4.0\n"
                      "seed: 5\ndevice: cpu\n")  # fmt: skip
    out = tmp_path / "eval.json"
    assert (
        main(["eval", "--config", str(config), "n_test=2", "--seed", "7", "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["env_args"] == {"n_test": 2, "n_train": 2}
    assert result["settings"]["max_new_tokens"] == 4 and result["settings"]["samples"] == 1
    assert result["settings"]["seed"] == 7 and len(result["per_item"]) == 2
    # no --dtype: the trainer's sampling precision, recorded as it ran
    assert result["dtype"] == resolve_dtype("auto", "cpu")


def test_resd_eval_names_a_missing_or_unknown_setting(tmp_path, capsys):
    """A typo in the config file, or no model or environment at all, is a usage error
    naming the key, not a crash (KeyError) or an evaluation of `None`."""
    config = tmp_path / "e.yaml"
    config.write_text("model: some/model\nenv: toy_envs:ParityEnv\nsample: 2\n")
    assert main(["eval", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "sample: unknown key" in err and str(config) in err
    assert main(["eval", "--env", "toy_envs:ParityEnv"]) == 2
    assert "model: required" in capsys.readouterr().err
    assert main(["eval", "--model", "some/model"]) == 2
    assert "env: required" in capsys.readouterr().err


def test_resd_eval_hands_template_variables_and_init_kwargs_to_the_loader(
    tiny_model_dir, tmp_path, capsys
):
    """A model whose chat template needs a variable (as Qwen3's `enable_thinking`) is
    evaluated with the config's chat_template_kwargs; model_init_kwargs reach
    from_pretrained (a bad attention implementation is refused by name)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(
        "{% if not persona %}{{ raise_exception('persona is required') }}{% endif %}" + template
    )
    base = (f"model: {model}\nenv: toy_envs:ParityEnv\nenv_args: {{n_test: 1}}\nsamples: 1\n"
            "max_new_tokens: 2\ndtype: float32\ndevice: cpu\n")  # fmt: skip
    config = tmp_path / "e.yaml"
    config.write_text(base)
    assert main(["eval", "--config", str(config)]) == 2
    assert "chat_template" in capsys.readouterr().err  # the template really needs it
    config.write_text(base + "chat_template_kwargs: {persona: tutor}\n")
    assert main(["eval", "--config", str(config)]) == 0
    config.write_text(base + "chat_template_kwargs: {persona: tutor}\n"
                      "model_init_kwargs: {attn_implementation: no_such_attention}\n")  # fmt: skip
    assert main(["eval", "--config", str(config)]) == 2
    assert "no_such_attention" in capsys.readouterr().err


def make_adapter(base, folder):
    """A real PEFT LoRA adapter on `base` (random, non-zero update), saved without a tokenizer."""
    from peft import LoraConfig, get_peft_model

    from resd.models import load_model

    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(load_model(str(base), device="cpu"), lora).save_pretrained(folder)
    return folder


def name_base(adapter, base):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": base})
    )


def test_an_adapter_that_names_no_base_model_or_a_bad_dtype_is_refused(tiny_model_dir, tmp_path):
    """An adapter config without its base asks for --base-model; a dtype that does not exist
    is refused by name for an adapter too, before any model is merged (not a KeyError)."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    name_base(adapter, None)
    with pytest.raises(ValueError, match="--base-model"):
        adapter_base_model(adapter)
    name_base(adapter, str(tiny_model_dir))
    with pytest.raises(ValueError, match="dtype: expected auto, int8 or one of"):
        load_policy(adapter, dtype="half", device="cpu")


@pytest.mark.parametrize(
    ("name", "damaged", "said"),
    [("adapter_model.safetensors", b"", "SafetensorError: "),  # safetensors' traceback
     ("adapter_config.json", b'{"r": 4', "JSONDecodeError: "),  # json's words alone
     ("adapter_config.json", b"[1, 2]", "adapter_config.json holds a list")],  # a traceback
    ids=["weights-empty", "config-cut", "config-list"],
)  # fmt: skip
def test_an_adapter_with_a_damaged_file_is_named_in_one_line(
    name, damaged, said, tiny_model_dir, tmp_path, capsys
):
    """Found by damaging a LoRA run's files by hand: `resd eval` of the adapter (and a
    resume of its checkpoint, `training.policy`, through the same `load_adapter`) failed
    with safetensors' traceback or json's words without a file; now one line names the
    folder, and says what failed."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    name_base(adapter, str(tiny_model_dir))
    (adapter / name).write_bytes(damaged)
    code = main(["eval", "--model", str(adapter), "--env", "toy_envs:ParityEnv", "n_test=1", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"resd: error: model: cannot read the folder '{adapter}': one of its "
                          "files is damaged or not what transformers expects (") and said in err  # fmt: skip


def test_resd_eval_applies_an_adapter_to_the_base_model_given(tiny_model_dir, tmp_path, capsys):
    """An adapter whose recorded base has moved is evaluated and merged on --base-model /
    base_model=; a bare adapter takes its base's tokenizer, and model_init_kwargs reach the base."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    name_base(adapter, str(tmp_path / "moved-away"))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(adapter), "--base-model", str(tiny_model_dir),
                 "--env", "toy_envs:ParityEnv", "n_test=1", *FAST, "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["adapter"] is True and result["base_model"] == str(tiny_model_dir)
    assert f"{adapter} (adapter on {tiny_model_dir})" in capsys.readouterr().out
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), base_model=str(tiny_model_dir))
    assert isinstance(merged, Path) and (merged / "config.json").is_file()
    with pytest.raises(ValueError, match="no_such_attention"):
        load_policy(adapter, base_model=str(tiny_model_dir), dtype="float32", device="cpu",
                    init_kwargs={"attn_implementation": "no_such_attention"})  # fmt: skip


def test_an_adapters_own_tokenizer_wins_over_its_bases(tiny_model_dir, tmp_path):
    """A checkpoint saves the run's tokenizer beside its adapter, and that one is used; a
    bare adapter falls back to its base model's."""
    from resd.models import load_tokenizer

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    _, tokenizer = load_policy(adapter, dtype="float32", device="cpu")
    base_template = load_tokenizer(str(tiny_model_dir)).chat_template
    assert tokenizer.chat_template == base_template
    own = load_tokenizer(str(tiny_model_dir))
    own.chat_template = "{# the run's own #}" + base_template
    own.save_pretrained(adapter)
    _, tokenizer = load_policy(adapter, dtype="float32", device="cpu")
    assert tokenizer.chat_template.startswith("{# the run's own #}")


def test_load_policy_samples_in_the_trainers_dtype_with_frozen_weights(tiny_model_dir):
    """`dtype="auto"` (the default, on the default device) is resolved as the trainer
    resolves it (not refused), an explicit dtype is applied, and the model is in eval mode
    with no weight requiring a gradient."""
    model, _ = load_policy(tiny_model_dir)
    assert {p.dtype for p in model.parameters()} == {DTYPES[resolve_dtype("auto", pick_device())]}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for dtype in ("float32", "bfloat16"):
        model, _ = load_policy(tiny_model_dir, dtype=dtype, device="cpu")
        assert {p.dtype for p in model.parameters()} == {DTYPES[dtype]}


def test_evaluate_model_records_its_defaults_and_loads_the_dtype_it_records(
    tiny_model_dir, monkeypatch
):
    """Without settings, `evaluate_model` samples with EvalSettings() and says so; the dtype
    it records is the one the model was loaded in (auto resolved; the other one when asked)."""
    import resd.analysis.eval_cli as eval_cli

    loaded = []
    real_load_policy = eval_cli.load_policy

    def recording_load_policy(*args, **kwargs):  # the real loader; notes what it returned
        model, tokenizer = real_load_policy(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model, tokenizer

    monkeypatch.setattr(eval_cli, "load_policy", recording_load_policy)
    result = evaluate_model(tiny_model_dir, "toy_envs:ParityEnv", {"n_test": 1})
    assert result["settings"] == dataclasses.asdict(EvalSettings())
    assert len(result["samples"]) == EvalSettings().samples
    assert result["dtype"] == resolve_dtype("auto", pick_device())
    assert (result["model"], result["env"]) == (tiny_model_dir.as_posix(), "toy_envs:ParityEnv")
    other = "float32" if resolve_dtype("auto", "cpu") == "bfloat16" else "bfloat16"
    settings = EvalSettings(samples=1, max_new_tokens=2)
    result = evaluate_model(tiny_model_dir, "toy_envs:ParityEnv", {"n_test": 1}, settings,
                            dtype=other, device="cpu")  # fmt: skip
    assert result["dtype"] == other and loaded[1] == DTYPES[other]
    assert loaded[0] == DTYPES[resolve_dtype("auto", pick_device())]


def test_evaluate_env_samples_with_top_k_and_min_p(tiny_model_dir):
    """`top_k = 1` (or `min_p = 1`) leaves the top token alone: replies at temperature 1.5
    are then greedy decoding's. Catches `resd eval` sampling without the two settings."""
    model, tokenizer = load_policy(tiny_model_dir, dtype="float32", device="cpu")

    def replies(**sampling):
        settings = EvalSettings(samples=2, max_new_tokens=6, items=2, **sampling)
        result = evaluate_env(model, tokenizer, ParityEnv(n_test=2), settings)
        return [r["response"] for r in result["samples"]]

    greedy = replies(temperature=0.0)
    assert replies(temperature=1.5, top_k=1) == greedy
    assert replies(temperature=1.5, min_p=1.0) == greedy
    assert replies(temperature=1.5) != greedy


class CoinEnv(ParityEnv):
    """Scores with Python's global `random`, as a user's environment may (say, to sample
    test cases)."""

    def score(self, item, response):
        reward = float(random.random() < 0.5)
        return Score(reward, reward, "")


def test_evaluate_env_seeds_pythons_random_and_needs_test_items(tiny_model_dir):
    """The same seed gives the same numbers for an environment that draws from `random`
    too; an environment without test items is named, not a bare aggregate error."""
    model, tokenizer = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    settings = EvalSettings(samples=4, max_new_tokens=2, seed=3)
    first = evaluate_env(model, tokenizer, CoinEnv(n_test=4), settings)
    random.random()  # the global state moves on between two evaluations
    again = evaluate_env(model, tokenizer, CoinEnv(n_test=4), settings)
    assert [s["reward"] for s in again["samples"]] == [s["reward"] for s in first["samples"]]
    with pytest.raises(ValueError, match="ParityEnv has no test items"):
        evaluate_env(model, tokenizer, ParityEnv(n_test=0), settings)


class EchoSampler:
    """A generation backend whose reply is its prompt's text and the reply's place in the
    batch: which prompt each score belongs to shows in the record."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, prompts, **sampling):
        return [
            Generation([], f"{self.tokenizer.decode(p)} #{n}", True) for n, p in enumerate(prompts)
        ]


def test_evaluate_scores_each_reply_against_its_own_item_in_the_prompt_it_was_given(
    tiny_model_dir,
):
    """Catches `evaluate` pairing item i's sample j with another reply than its own (the
    batch holds each item's k samples in turn) and ignoring `prompt_messages`, with which
    the trainer puts the student's playbook into the evaluation prompts."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    env = ParityEnv(n_test=3)

    def with_playbook(item):
        return [{"role": "system", "content": "PLAYBOOK"}, *item.messages]

    metrics, records = evaluate(EchoSampler(tokenizer), tokenizer, env, env.test_items(),
                                samples=2, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                max_prompt_tokens=256, prompt_messages=with_playbook)  # fmt: skip
    assert [(r["item"], r["sample"]) for r in records] == [
        (item.id, j) for item in env.test_items() for j in range(2)
    ]
    each_sample = [item for item in env.test_items() for _ in range(2)]
    for n, (record, item) in enumerate(zip(records, each_sample, strict=True)):
        assert record["response"].startswith("<|im_start|>system\nPLAYBOOK")
        assert item.prompt_text in record["response"] and record["response"].endswith(f" #{n}")
        assert record["reward"] == float(len(record["response"]) % 2 == 0)
    rewards = [r["reward"] for r in records]
    assert metrics["task_mean@k"] == pytest.approx(sum(rewards) / 6)
    assert (metrics["k"], metrics["items"]) == (2, 3)


def test_a_checker_that_raises_is_a_failure_and_a_warning(caplog):
    """Catches `safe_score` swallowing a verifier's crash without a word in the log: the
    run goes on (the reply scores 0 and the teacher reads the error), and the log says
    which item's checker failed."""

    class Broken(ParityEnv):
        def score(self, item, response):
            raise ZeroDivisionError("division by zero")

    env = Broken(n_test=1)
    item = env.test_items()[0]
    with caplog.at_level(logging.WARNING, logger="resd.analysis.evaluation"):
        score = safe_score(env, item, "42")
    assert (score.reward, score.score) == (0.0, 0.0)
    assert (
        score.feedback == "The checker failed on this response: ZeroDivisionError: division by zero"
    )
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert item.id in caplog.text and "ZeroDivisionError" in caplog.text


def test_a_score_that_is_not_a_Score_stops_with_what_to_return():
    """An environment whose `score` returns a float (a TRL reward function's habit) or a
    tuple failed far from its cause, with `AttributeError: 'float' object has no attribute
    'reward'`, after the model had loaded. Catches `safe_score` passing such a value on,
    or counting it as a failed reply (every reply would fail, and the run go on): it stops
    with the class's name, what came back and what to return."""

    class Floats(ParityEnv):
        def score(self, item, response):
            return 1.0

    env = Floats(n_test=1)
    with pytest.raises(NotAScoreError, match=r"^env: Floats\.score returned float \(1\.0\), "
                                             r"not a Score: return resd\.envs\.Score\("):  # fmt: skip
        safe_score(env, env.test_items()[0], "42")


def test_a_score_whose_feedback_is_not_text_stops_naming_the_environment():
    """`Score(0, 0, None)` from an environment's `score` crashed env-check (slicing None)
    and reached the teacher's context as the word None. Catches `safe_score` letting it
    through, or counting it as a failed reply: it stops, as a dataset's scorer does."""

    class NoFeedback(ParityEnv):
        def score(self, item, response):
            return Score(0.0, 0.0, None)

    env = NoFeedback(n_test=1)
    with pytest.raises(NotAScoreError, match=r'^env: NoFeedback\.score returned a Score whose '
                                             r'feedback is NoneType, not text \(use "" for'):  # fmt: skip
        safe_score(env, env.test_items()[0], "42")


def test_resd_eval_takes_env_args_as_resd_train_writes_them():
    """`resd eval ... env_args.n_test=2` (as `resd train` takes it) reached the environment
    as an argument named `env_args`, refused; it now means `n_test=2`, and updates the
    config file's env_args key by key like the bare form."""
    from resd.analysis.eval_cli import _eval_options
    from resd.cli import parse_args

    args = parse_args(["eval", "--model", "m", "--env", "arithmetic", "env_args.n_test=2",
                       "seed=3", "env_args.load_kwargs.a=1"])  # fmt: skip
    assert _eval_options(args)["env_args"] == {"n_test": 2, "seed": 3, "load_kwargs": {"a": 1}}


def test_resd_eval_takes_a_training_config_and_evaluates_as_its_run_did(tmp_path):
    """`resd eval --config runs/x/config.yaml --model runs/x` was refused at the first
    training key ("adam_beta1: unknown key"). A training config now gives the environment
    and the run's evaluation settings (eval_samples, eval_temperature, ...; TRL's names
    too), a flag still wins, and its `model`, the one the run started from, is never taken
    silently for the one to evaluate. A run whose environment was built in Python (its
    config.yaml says so in its first line) gives no environment. Catches each of these,
    and a file of neither kind let through."""
    from resd.analysis.eval_cli import _eval_options
    from resd.cli import parse_args
    from resd.config import ConfigError

    path = tmp_path / "config.yaml"
    path.write_text("model: base-model\nenv: arithmetic\nenv_args: {n_test: 3}\nalgorithm: sdpo\n"
                    "eval_samples: 3\neval_temperature: 0.2\neval_items: 2\nmax_new_tokens: 12\n"
                    "seed: 4\nlearning_rate: 1.0e-5\n")  # fmt: skip
    opts = _eval_options(parse_args(["eval", "--config", str(path), "--model", "runs/x",
                                     "--samples", "5"]))  # fmt: skip
    assert (opts["model"], opts["env"], opts["env_args"]) == ("runs/x", "arithmetic", {"n_test": 3})
    assert (opts["samples"], opts["temperature"], opts["items"], opts["max_new_tokens"],
            opts["seed"]) == (5, 0.2, 2, 12, 4)  # fmt: skip
    assert "trained from" not in opts
    with pytest.raises(ConfigError, match=r"^model: --config .* is a training config, whose "
                                          r"model \(base-model\) is the one its run started"):  # fmt: skip
        _eval_options(parse_args(["eval", "--config", str(path)]))
    path.write_text("# env: mytasks:Caps, given in Python; the `env` below did not run\n"
                    + path.read_text())  # fmt: skip
    with pytest.raises(ConfigError, match=r"^env: required"):
        _eval_options(parse_args(["eval", "--config", str(path), "--model", "runs/x"]))
    path.write_text("model: m\nenv: arithmetic\nalgorithm: sdpo\nsamplez: 3\n")
    with pytest.raises(ConfigError, match=r"^samplez: unknown"):  # checked as a training key
        _eval_options(parse_args(["eval", "--config", str(path)]))


def test_an_adapter_on_a_bundled_model_finds_it_on_another_machine(tmp_path):
    """A LoRA run on a bundled model records the folder the model was converted into on
    the machine that trained it. Copied to another machine (or read under another user)
    that folder is not there, and `resd eval` of the run failed on it. Catches the alias
    not taking its place, and a recorded folder that exists, or is no bundled model's,
    being replaced."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    name_base(adapter, "/home/someone-else/.cache/resd/models/smollm2-135m")
    assert adapter_base_model(adapter) == "smollm2-135m"
    here = tmp_path / "cache" / "models" / "smollm2-135m"  # the folder is here: it is the base
    here.mkdir(parents=True)
    name_base(adapter, str(here))
    assert adapter_base_model(adapter) == str(here)
    name_base(adapter, "/elsewhere/models/my-own-model")  # not bundled: its error is its own
    assert adapter_base_model(adapter) == "/elsewhere/models/my-own-model"


def test_a_score_with_an_infinite_reward_or_a_part_that_is_not_a_number_is_refused():
    """`Score(inf, ...)` passed (only nan was refused), and GRPO's group mean of an
    infinite reward made every advantage nan; a part given as text ("high") failed mid-run
    in the per-step mean of each reward function, with "unsupported operand type(s) for
    +". Both are refused where the Score is made, so an environment's `score` that builds
    one counts that reply as a failure, with the reason in its feedback and the log."""
    for reward, score in ((math.inf, 0.0), (-math.inf, 0.0), (0.0, math.inf)):
        with pytest.raises(ValueError, match=r"^Score: reward and score must be finite"):
            Score(reward, score, "")
    with pytest.raises(
        ValueError, match=r"^Score: parts\['a'\] must be a finite number, got 'high'"
    ):
        Score(0.0, 0.0, "", parts={"a": "high"})
    with pytest.raises(ValueError, match=r"^Score: parts must map each reward function's name"):
        Score(0.0, 0.0, "", parts=[0.5])  # type: ignore[arg-type]
    assert Score(1.0, 1.0, "", parts={"a": 1, "b": 0.5}).parts == {"a": 1, "b": 0.5}

    class Infinite(ParityEnv):
        def score(self, item, response):
            return Score(math.inf, 0.0, "")

    env = Infinite(n_test=1)
    failed = safe_score(env, env.test_items()[0], "42")
    assert (failed.reward, failed.success) == (0.0, False)
    assert "must be finite numbers, got inf" in failed.feedback
