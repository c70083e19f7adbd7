"""What a Hugging Face user gets: learning-rate schedules, LoRA settings in PEFT's own names,
the final model in output_dir with a clean tokenizer, checkpoints named checkpoint-N, a
model card and the files a Hub push would upload (checked offline)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import resd
from resd.config import ConfigError, load_config
from resd.generation.hf import chat_prompt_ids
from resd.models import load_model, load_tokenizer
from resd.training.checkpoint import save_model
from resd.training.hub import hub_base_model, hub_files, model_card, write_model_card
from resd.training.policy import lora_config
from resd.training.trainer import Trainer
from resd.training.update import Update
from test_trainer import config


def _lrs(kind: str, warmup: float, total: int) -> list[float]:
    cfg = load_config(None, [f"lr_scheduler_type={kind}", f"warmup_steps={warmup}", "lr=1.0"])
    update = Update(
        cfg, torch.nn.Linear(1, 1), None, None, None, None, 0, 1.0, lambda: None, total_steps=total
    )
    return [update.lr(step) for step in range(1, total + 1)]


def test_learning_rate_schedules_by_hand():
    # warm-up reaches the full rate at step `warmup_steps` (the paper's 10 steps), then:
    assert _lrs("constant_with_warmup", 2, 5) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    assert _lrs("linear", 2, 6) == pytest.approx(
        [0.5, 1.0, 0.8, 0.6, 0.4, 0.2]
    )  # ends after the last
    cosine = _lrs("cosine", 0, 4)
    assert cosine[0] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 1 / 5)).item()))
    assert cosine == sorted(cosine, reverse=True) and cosine[-1] > 0
    assert _lrs("constant", 3, 3) == [1.0, 1.0, 1.0]  # no warm-up at all
    # a fraction of the run: 0.3 of 5 steps is 2 (1.5 rounded up, as transformers does)
    assert _lrs("linear", 0.3, 6) == _lrs("linear", 2, 6)
    assert _lrs("constant_with_warmup", 0.3, 5) == _lrs("constant_with_warmup", 2, 5)


def test_lora_settings_are_peft_settings():
    cfg = lora_config({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "lora_dropout": 0.1})
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules)) == (
        4,
        8,
        0.1,
        {"q_proj"},
    )
    assert lora_config({"alpha": 64}).lora_alpha == 64  # our short name still works
    assert lora_config({}).target_modules == "all-linear" and lora_config({}).r == 16
    assert lora_config({"use_rslora": True}).use_rslora  # any PEFT field passes through
    # the base's revision (model_init_kwargs) is recorded in adapter_config.json
    assert lora_config({}, "v1.2").revision == "v1.2" and lora_config({}).revision is None
    with pytest.raises(ConfigError, match=r"^lora: unknown key 'lora_alfa' \(did you mean "
                       r"'lora_alpha'\?\) \(a peft\.LoraConfig field, or alpha, "):  # fmt: skip
        lora_config({"lora_alfa": 8})  # the closest of PEFT's fields and ours
    with pytest.raises(ConfigError, match=r"^lora: unknown key 'alpah' \(did you mean 'alpha'"):
        lora_config({"alpah": 8})
    assert lora_config({"rank": 4}).r == lora_config({"lora_rank": 4}).r == 4  # torchtune's
    with pytest.raises(ConfigError, match="same setting"):
        lora_config({"alpha": 8, "lora_alpha": 16})


def test_final_model_checkpoints_and_card(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(
        config(tiny_model_dir, out, "save_every=2", "max_prompt_tokens=100", "max_new_tokens=12")
    )
    summary = trainer.train()
    # checkpoints under the names HF tools expect, each loadable as it is
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint-4") is not None
    # the final model at the top of output_dir: the trained weights, not the initial ones
    final = AutoModelForCausalLM.from_pretrained(out)
    for name, param in trainer.model.named_parameters():
        assert torch.equal(dict(final.named_parameters())[name], param.detach()), name
    # the saved tokenizer carries no training-only overrides
    saved = AutoTokenizer.from_pretrained(out)
    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert saved.padding_side == original.padding_side != "left"
    assert saved.model_max_length == original.model_max_length != 100 + 12
    assert trainer.tokenizer.padding_side == "left"  # training's copy is untouched
    # the model card, and what a push would upload: the model, not the run's logs
    card = (out / "README.md").read_text()
    assert (
        "algorithm `resd`" in card and "toy_envs:ParityEnv" in card and "4 optimizer steps" in card
    )
    assert "| task_mean@k |" in card and card.startswith('---\nlibrary_name: "transformers"')
    files = hub_files(out)
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert not any(
        f.endswith(".jsonl") or f.startswith("checkpoint") or f == "config.yaml" for f in files
    )
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"] == 4


def test_model_card_of_a_lora_run_without_evaluation():
    cfg = load_config(None, ["lora={r: 4}", "algorithm=sdpo", "env=house_rules"])
    card = model_card(cfg, {"steps": 3})
    resd_card = model_card(load_config(None, ["algorithm=resd"]), {"steps": 3})
    assert 'tags: ["resd", "self-distillation"]' in resd_card  # the algorithm's tag once
    assert (
        'library_name: "peft"' in card
        and "No evaluation was recorded." in card
        and ", LoRA" in card
    )


def test_the_cards_base_model_is_one_the_hub_knows(tmp_path):
    """A bundled alias or a local folder as `base_model` would be refused on push."""

    def base(model: str) -> str:
        return model_card(load_config(None, [f"model={model}"]), {"steps": 1}).split("---")[1]

    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in base("smollm2-135m")
    assert 'base_model: "Qwen/Qwen3-0.6B"' in base("Qwen/Qwen3-0.6B")
    assert "base_model" not in base(str(tmp_path))


def test_the_card_states_the_runs_own_numbers(tmp_path):
    """Every number on the card is the run's: the before/after columns in that order, the
    items, samples and temperature of the evaluation, the steps, the batch shape, the
    version (a card that swapped or dropped any of them passed every other test)."""
    cfg = load_config(None, ["model=Qwen/Qwen3-0.6B", "batch_size=2", "rollouts_per_prompt=3",
                             "lr=2e-6", "eval_samples=9", "eval_temperature=0.7",
                             "temperature=1.1"])  # fmt: skip
    summary = {
        "steps": 7, "env": "my_env",
        "eval_before": {"task_mean@k": 0.25, "task_best@k": 0.5, "case_mean@k": 0.125},
        "eval_after": {"task_mean@k": 0.5, "task_best@k": 0.75, "case_mean@k": 0.375,
                       "case_best@k": 1.0, "items": 12, "k": 3, "reward": 0.9},
    }  # fmt: skip
    card = model_card(cfg, summary)
    # the front matter the Hub reads is YAML, one key a line
    front = card.split("---\n")[1]
    assert yaml.safe_load(front) == {
        "library_name": "transformers", "base_model": "Qwen/Qwen3-0.6B",
        "tags": ["resd", "self-distillation"],
    }  # fmt: skip
    assert "\n# Qwen/Qwen3-0.6B trained with resd (resd)\n" in card
    assert (
        f"[resd](https://pypi.org/project/resd/) {resd.__version__}: algorithm `resd` on the "
        "environment `my_env` for 7 optimizer steps (batches of 2 prompts, 3 rollouts each, "
        "lr 2e-06).\n"
    ) in card
    # the four headline metrics, before then after; one not measured before shows nan
    assert (
        "Evaluated on 12 test items of `my_env`, 3 samples each at temperature 0.7, top-p "
        "0.95:\n\n"
        "| metric | before | after |\n|---|---|---|\n| task_mean@k | 0.250 | 0.500 |\n"
        "| task_best@k | 0.500 | 0.750 |\n| case_mean@k | 0.125 | 0.375 |\n"
        "| case_best@k | nan | 1.000 |\n\n"
    ) in card
    # only the rows the run measured; no evaluation before training: the column is nan
    fewer = model_card(cfg, {"steps": 7, "eval_after": {"task_mean@k": 0.5, "items": 12, "k": 3}})
    assert "|---|\n| task_mean@k | nan | 0.500 |\n\n" in fewer
    # one of a kind reads as one ("1 samples each" before)
    one = model_card(dataclasses.replace(cfg, batch_size=1, rollouts_per_prompt=1),
                     {"steps": 1, "env": "my_env",
                      "eval_after": {"task_mean@k": 1.0, "items": 1, "k": 1}})  # fmt: skip
    assert "for 1 optimizer step (batches of 1 prompt, 1 rollout each," in one
    assert "Evaluated on 1 test item of `my_env`, 1 sample each at temperature" in one
    assert "stopped early" not in card  # it ran to the end
    # evaluation's top-k and min-p where set, and a run ended by `Trainer.stop` says why
    filtered = model_card(dataclasses.replace(cfg, eval_top_k=20, eval_min_p=0.05),
                          {**summary, "stopped_early": "case_mean@k reached 1 at step 7"})  # fmt: skip
    assert (
        "lr 2e-06).\n\nIt stopped early: case_mean@k reached 1 at step 7.\n\n## Evaluation"
        in filtered
    )
    assert "3 samples each at temperature 0.7, top-p 0.95, top-k 20, min-p 0.05:\n" in filtered
    # the card the trainer writes is this one, as README.md
    path = write_model_card(tmp_path, cfg, summary)
    assert path == tmp_path / "README.md" and path.read_text() == card


def test_a_push_uploads_the_model_files_and_nothing_else(tmp_path):
    """hub_files: each kind of model file by its pattern, sorted; never the run's logs, a
    checkpoint's files, or a folder whose name matches a pattern."""
    model = ["README.md", "adapter_config.json", "adapter_model.safetensors",
             "chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
             "model.safetensors", "special_tokens_map.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json"]  # fmt: skip
    logs = ["config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json", "wandb-id.txt"]
    for name in reversed(model + logs):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "model.safetensors").write_text("x")
    (tmp_path / "tokenizer_files").mkdir()
    assert hub_files(tmp_path) == model


def test_a_local_folder_under_home_is_no_base_model(tmp_path, monkeypatch):
    """`~/models/mine` is a local folder when it exists, not a Hub id to name on the card."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert hub_base_model("~/models/mine") is None


def test_a_bundled_model_without_an_upstream_names_no_base_model(monkeypatch):
    """A bundled model whose upstream is unknown (hub_id "") gets no `base_model: ""`."""
    from resd.models import BUNDLED_MODELS, BundledModel

    monkeypatch.setitem(BUNDLED_MODELS, "local-gguf", BundledModel(("pkg",), ("m.gguf",), 2048))
    assert hub_base_model("local-gguf") is None
    assert hub_base_model("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---- model options: from_pretrained arguments, chat templates, gradient checkpointing ----

GEMMA_LIKE = (  # refuses a system message, as Gemma's template does
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not think %}<think></think>{% endif %}{% endif %}"
)


def test_chat_template_override_variables_and_system_fallback(tiny_model_dir, tmp_path):
    template_file = tmp_path / "gemma.jinja"
    template_file.write_text(GEMMA_LIKE)
    tok = load_tokenizer(
        str(tiny_model_dir), chat_template=str(template_file), chat_template_kwargs={"think": False}
    )
    messages = [{"role": "system", "content": "Rules first."}, {"role": "user", "content": "2+2?"}]
    text = tok.decode(chat_prompt_ids(tok, messages))
    # the system text opens the first user turn; the template variable reached the template
    assert "<|im_start|>user\nRules first.\n\n2+2?<|im_end|>" in text and "system" not in text
    assert text.endswith("<|im_start|>assistant\n<think></think>")
    thinking = load_tokenizer(
        str(tiny_model_dir), chat_template=GEMMA_LIKE, chat_template_kwargs={"think": True}
    )
    assert not thinking.decode(chat_prompt_ids(thinking, messages)).endswith("</think>")
    # a template error that is not about the system role is not swallowed: it is found
    # when the tokenizer loads, before any model
    with pytest.raises(ValueError, match=r"^chat_template: .*TemplateError: bad"):
        load_tokenizer(str(tiny_model_dir), chat_template="{{ raise_exception('bad') }}")
    picky = load_tokenizer(
        str(tiny_model_dir),
        chat_template=(  # refuses one prompt only
            "{% if messages[0]['content'] == 'x' %}{{ raise_exception('bad') }}{% endif %}"
            + GEMMA_LIKE
        ),
    )
    with pytest.raises(Exception, match="bad"):
        chat_prompt_ids(picky, [{"role": "user", "content": "x"}])


def test_tokenizer_without_chat_template_is_a_clear_error(tiny_model_dir, tmp_path):
    base = tmp_path / "base-model"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.save_pretrained(base)
    with pytest.raises(ValueError, match=r"no chat template .*set chat_template"):
        load_tokenizer(str(base))


def test_model_init_kwargs_reach_from_pretrained(tiny_model_dir):
    eager = load_model(str(tiny_model_dir), init_kwargs={"attn_implementation": "eager"})
    assert eager.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match=r"^model_init_kwargs: 'torch_dtype' is set by dtype"):
        load_config(None, ["model_init_kwargs={torch_dtype: bfloat16}"])


def test_gradient_checkpointing_gives_the_same_update(tiny_model_dir, tmp_path):
    def trained(*extra: str) -> dict[str, torch.Tensor]:
        trainer = Trainer(
            config(
                tiny_model_dir, tmp_path / str(len(extra)), "steps=2", "max_new_tokens=12", *extra
            )
        )
        trainer.train()
        assert trainer.model.is_activation_checkpointing == bool(extra)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    plain, recomputed = trained(), trained("gradient_checkpointing=true")
    for name, param in plain.items():
        torch.testing.assert_close(recomputed[name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_every_builtin_environment_works_with_a_template_that_refuses_system(
    tiny_model_dir, tmp_path
):
    from resd.envs import make_env

    template = GEMMA_LIKE.replace("{% if not think %}<think></think>{% endif %}", "")
    tok = load_tokenizer(str(tiny_model_dir), chat_template=template)
    for name in ["arithmetic", "manufactoria", "ifeval", "code", "house_rules"]:
        item = next(iter(make_env(name).train_items()))
        text = tok.decode(chat_prompt_ids(tok, item.messages))
        assert (
            text.count("<|im_start|>")
            == len([m for m in item.messages if m["role"] != "system"]) + 1
        ), name
    # manufactoria's items open with a system message: one RESD step through every phase
    # (student, reflection, curation and teacher prompts all carry it)
    cfg = config(tiny_model_dir, tmp_path / "run", "steps=1", "env=manufactoria", "env_args.n_train=4",
                 "env_args.n_test=1", f"chat_template={template}", "max_prompt_tokens=1024",
                 "max_teacher_prompt_tokens=2048")  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reflections"] >= 1 and metrics["distilled"] >= 1


def test_an_adapter_saves_over_a_model_card_it_cannot_read(tiny_model_dir, tmp_path):
    """A run folder whose README.md was damaged (binary bytes): the final save of a
    resumed LoRA run failed after training with "'utf-8' codec can't decode byte", since
    peft reads the card it finds to update it. The save writes its own card instead."""
    from peft import get_peft_model

    model = get_peft_model(load_model(str(tiny_model_dir)), lora_config({"r": 2}))
    (tmp_path / "README.md").write_bytes(bytes(range(128, 192)))
    save_model(tmp_path, model, load_tokenizer(str(tiny_model_dir)))
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert "peft" in (tmp_path / "README.md").read_text()
