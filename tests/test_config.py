"""Config loading: YAML + dotted overrides, and errors that name the field."""

from __future__ import annotations

import pytest

from resd.config import ConfigError, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: some/model\nenv_args: {n_train: 5, seed: 1}\nlr: 1.0e-6\n")
    cfg = load_config(
        path, ["lr=1e-5", "env_args.n_train=7", "env_args.path=data.jsonl", "topk=null", "steps=3"]
    )
    assert cfg.model == "some/model"
    assert cfg.lr == pytest.approx(1e-5)
    assert cfg.env_args == {"n_train": 7, "seed": 1, "path": "data.jsonl"}
    assert cfg.topk is None and cfg.steps == 3


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("lerning_rate=1e-5", "lerning_rate"),
        ("learning_rate=fast", "lr"),  # a TRL alias: the error names our field
        ("warmup_ratio=0.1", "warmup_ratio"),
        ("lr_scheduler_type=triangle", "lr_scheduler_type"),
        ("batch_size=lots", "batch_size"),
        ("batch_size=0", "batch_size"),
        ("alpha=1.5", "alpha"),
        ("teacher=frozen", "teacher"),
        ("algorithm=ppo", "algorithm"),
        ("shuffle=maybe", "shuffle"),
        ("env_args=3", "env_args"),
        ("playbook_policy=lru", "playbook_policy"),
        ("min_ratio=-1", "min_ratio"),
        ("strategy=zero3", "strategy"),
        ("generation_backend=sglang", "generation_backend"),
        ("generation_cache=paged", "generation_cache"),
        ("generation_compile=true", "generation_compile"),
        ("vllm_args=0.3", "vllm_args"),
        ("lr", "lr"),
        ("lr=.nan", "lr"),
        ("temperature=.nan", "temperature"),
        ("max_grad_norm=-1", "max_grad_norm"),  # clip_grad_norm_ would flip the gradient
        ("distillation_weight=5", "distillation_weight"),  # a negative policy-gradient weight
        ("kl_coef=-1", "kl_coef"),
        ("adam_beta1=1.5", "adam_beta1"),
        ("autocast=bogus", "autocast"),
        ("device=foo", "device"),
        ("loss_chunk_size=-3", "loss_chunk_size"),  # torch.split's traceback in step 1
        ("loss_chunk_size=0", "loss_chunk_size"),  # was read as "off"
        ("max_teacher_prompt_tokens=-5", "max_teacher_prompt_tokens"),  # cut 5 tokens off the front
        ("pg_clip_low=-1", "pg_clip_low"),  # clamp(2, 0.5): every ratio 0.5
        ("success_weight_alpha=-1", "success_weight_alpha"),
        ("seed=-1", "seed"),
        ("dtype=float16", "dtype"),  # AdamW's eps underflows: nan weights after one step
        ("chat_template_kwargs={tokenize: true}", "chat_template_kwargs"),
        ("reflector={base_url: nonsense, model: x}", "reflector"),
        ("reflector={base_url: 'http://h/v1', model: x, timeout: -1}", "reflector"),
        ("reflector={base_url: 'http://h/v1', model: x, max_concurrency: 0.5}", "reflector"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field)


def test_settings_checked_against_each_other():
    with pytest.raises(ConfigError, match=r"^max_ratio: must be >= min_ratio"):
        load_config(None, ["min_ratio=0.5", "max_ratio=0.1"])  # the teacher floored, then capped
    with pytest.raises(ConfigError, match=r"^hub_model_id: expected"):
        load_config(None, ["push_to_hub=true", "hub_model_id=bad name!!"])  # found after training
    assert load_config(None, ["push_to_hub=true", "hub_model_id=me/resd-qwen_0.5b"]).push_to_hub


def test_yaml_spellings_a_user_writes_mean_what_they_say(tmp_path):
    """YAML 1.1 reads `1e-5` (no dot) as a string and a bare `off` as false."""
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-5\nautocast: off\nmax_grad_norm: 0\n")
    cfg = load_config(path)
    assert (cfg.lr, cfg.autocast, cfg.max_grad_norm) == (1e-5, "none", 0.0)
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match=r"^lr: expected a number, got 'fast'"):
        load_config(path)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_demo_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cfg.algorithm == "resd" and cfg.model == "smollm2-135m"


def test_trl_names_are_aliases_saved_under_ours():
    cfg = load_config(None, ["learning_rate=3e-5", "num_generations=8", "max_completion_length=256",
                             "max_prompt_length=512", "max_steps=40", "save_steps=10", "save_total_limit=3",
                             "per_device_train_batch_size=2", "beta=0.04", "num_iterations=2"])  # fmt: skip
    assert (cfg.lr, cfg.rollouts_per_prompt, cfg.max_new_tokens, cfg.max_prompt_tokens) == (
        3e-5,
        8,
        256,
        512,
    )
    assert (cfg.steps, cfg.save_every, cfg.keep_checkpoints) == (40, 10, 3)
    assert (cfg.micro_batch_size, cfg.kl_coef, cfg.update_epochs) == (2, 0.04, 2)
    saved = cfg.to_dict()
    assert "learning_rate" not in saved and saved["lr"] == 3e-5  # one canonical name
    with pytest.raises(ConfigError, match=r"^learning_rate: given together with lr"):
        load_config(None, ["learning_rate=1e-5", "lr=2e-5"])


def test_an_override_replaces_the_files_setting_and_its_environments_arguments(tmp_path):
    """The README's commands switch `env=` on a config written for arithmetic: the file's
    env_args (arithmetic's) must not reach the other environment's constructor, wherever
    the `env_args.*` overrides stand; and an override in TRL's words replaces the file's
    setting in ours (and back) instead of clashing with it."""
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "env: arithmetic\nenv_args: {max_operand: 12, seed: 1}\nmax_steps: 200\nlr: 1.0e-5\n"
    )
    assert load_config(path, ["env=qa", "env_args.path=x.csv"]).env_args == {"path": "x.csv"}
    assert load_config(path, ["env_args.path=x.csv", "env=qa"]).env_args == {"path": "x.csv"}
    assert load_config(path, ["env=arithmetic", "env_args.seed=2"]).env_args == {
        "max_operand": 12,
        "seed": 2,
    }
    assert load_config(path, ["env_args.seed=2"]).env_args == {"max_operand": 12, "seed": 2}
    assert load_config(path, ["steps=3"]).steps == 3
    assert load_config(path, ["learning_rate=2e-5"]).lr == 2e-5
    path.write_text("steps: 200\n")
    assert load_config(path, ["max_steps=3"]).steps == 3


def test_every_shipped_config_loads():
    """configs/*.yaml are what the README and `--help` point users to."""
    from pathlib import Path

    from resd.analysis.continual import load_plan

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        if path.name == "continual.yaml":
            plan = load_plan(path)
            assert [s.config.env for s in plan.stages] == ["arithmetic", "house_rules"]
            assert plan.stages[1].config.env_args == {}  # the first stage's are arithmetic's
        else:
            assert load_config(path).model, path.name


def test_report_to_none_means_no_tracker():
    assert load_config(None, ["report_to=none"]).report_to == []
    assert load_config(None, ["report_to=tensorboard"]).report_to == ["tensorboard"]


def test_the_trl_style_example_config_means_what_it_says():
    from pathlib import Path

    from resd.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "trl_style.yaml")
    assert (cfg.lr, cfg.batch_size, cfg.rollouts_per_prompt, cfg.inner_updates) == (1e-5, 8, 1, 4)
    assert (cfg.max_new_tokens, cfg.max_prompt_tokens, cfg.kl_coef) == (256, 512, 0.0)
    assert (cfg.steps, cfg.save_every, cfg.keep_checkpoints) == (200, 50, 2)
    assert cfg.lr_scheduler_type == "cosine" and cfg.gradient_checkpointing
    saved = cfg.to_dict()
    assert "learning_rate" not in saved and saved["lr"] == 1e-5  # one canonical name


def test_playbook_similarity_is_a_share_or_null():
    assert load_config(None, ["playbook_similarity=null"]).playbook_similarity is None
    assert load_config(None, ["playbook_similarity=1"]).playbook_similarity == 1
    for bad in ("0", "1.5", "-0.2"):
        with pytest.raises(ConfigError, match=r"^playbook_similarity: must be in \(0, 1\]"):
            load_config(None, [f"playbook_similarity={bad}"])
