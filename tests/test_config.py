"""Config loading: YAML + dotted overrides, and errors that name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

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
        ("warmup_ratio=1.5", "warmup_ratio"),  # a fraction of the run is below 1
        ("warmup_steps=10.5", "warmup_steps"),  # neither a whole count nor a fraction
        ("warmup_steps=1.5", "warmup_steps"),
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
        ("lr=.inf", "lr"),  # accepted before: the first step made every weight NaN
        ("lr=inf", "lr"),  # YAML's string "inf", which float() reads as infinity
        ("max_grad_norm=-.inf", "max_grad_norm"),
        ("is_clip=.inf", "is_clip"),  # "no cap" is null
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
        ("success_weight_beta=-1", "success_weight_beta"),  # was accepted: failures up-weighted
        ("trust_region_weight=1.5", "trust_region_weight"),  # refused only once the model loaded
        ("trust_region_weight=-0.1", "trust_region_weight"),
        # the adapter's common values, refused when read (PEFT checks them as it wraps the
        # loaded model; a string rank and an int target_modules crashed there)
        ("lora={r: big}", "lora.r"),
        ("lora={rank: 0}", "lora.rank"),
        ("lora={r: 4.5}", "lora.r"),
        ("lora={alpha: 0}", "lora.alpha"),  # scales the adapter to nothing: trains in vain
        ("lora={lora_alpha: -8}", "lora.lora_alpha"),
        ("lora={dropout: 1}", "lora.dropout"),
        ("lora={lora_dropout: -0.1}", "lora.lora_dropout"),
        ("lora={target_modules: 5}", "lora.target_modules"),
        ("lora={target_modules: []}", "lora.target_modules"),
        ("lora={target_modules: [q_proj, 3]}", "lora.target_modules"),
        ("seed=-1", "seed"),
        ("dtype=float16", "dtype"),  # AdamW's eps underflows: nan weights after one step
        ("chat_template_kwargs={tokenize: true}", "chat_template_kwargs"),
        ("reflector={base_url: nonsense, model: x}", "reflector"),
        ("reflector={base_url: 'http://h/v1', model: x, timeout: -1}", "reflector"),
        ("reflector={base_url: 'http://h/v1', model: x, max_concurrency: 0.5}", "reflector"),
        # every choice field refuses a value outside its list
        ("distillation_mode=partial", "distillation_mode"),
        ("pg_reward=advantage", "pg_reward"),
        ("dtype=int8", "dtype"),
        ("generation_dtype=fp8", "generation_dtype"),
        ("zero_stage=4", "zero_stage"),
        ("structured_output=maybe", "structured_output"),
        ("loss_aggregation=sum", "loss_aggregation"),
        ("curation_ops=delete", "curation_ops"),
        ("lesson_calls=three", "lesson_calls"),
        ("reflection_layout=chat", "reflection_layout"),
        ("unparsed_reflection=keep", "unparsed_reflection"),
        ("solution_buffer_keep=best", "solution_buffer_keep"),
        ("report_to=mlflow", "report_to"),
        ("report_to=3", "report_to"),  # was a TypeError from iterating an int
        ("report_to=[1]", "report_to"),  # was an AttributeError from int.strip
        # a wrong type, caught by the type check (not by a TypeError later)
        ("topk=lots", "topk"),  # an int-or-null field: the union's check
        ("lora=3", "lora"),
        ("model=[a, b]", "model"),
        ("steps=2.5", "steps"),
        ("lr=true", "lr"),  # a bool is not a number (float(True) is 1.0)
        # each bound, just outside (the values just inside are in test_values_at_the_bounds...)
        ("min_new_tokens=-1", "min_new_tokens"),
        ("min_new_tokens=129", "min_new_tokens"),  # more than max_new_tokens (128)
        ("curation_min_operations=-1", "curation_min_operations"),
        ("alpha=-0.1", "alpha"),
        ("top_p=0", "top_p"),
        ("top_p=1.01", "top_p"),
        ("eval_top_p=0", "eval_top_p"),  # was reported as top_p
        ("eval_top_p=1.5", "eval_top_p"),
        ("top_k=-1", "top_k"),
        ("top_k=0.5", "top_k"),  # a count
        ("min_p=-0.1", "min_p"),
        ("min_p=1.01", "min_p"),
        ("eval_top_k=-1", "eval_top_k"),  # not reported as top_k
        ("eval_min_p=1.5", "eval_min_p"),
        ("temperature=-0.1", "temperature"),
        ("eval_temperature=-0.1", "eval_temperature"),  # was reported as temperature
        ("teacher_update_rate=-0.1", "teacher_update_rate"),
        ("teacher_update_rate=1.5", "teacher_update_rate"),
        ("distillation_weight=-0.1", "distillation_weight"),
        ("distillation_weight=1.01", "distillation_weight"),
        ("adam_beta1=1", "adam_beta1"),
        ("adam_beta1=-0.1", "adam_beta1"),
        ("adam_beta2=1", "adam_beta2"),  # Adam's second-moment average would never move
        ("pg_clip_low=1.5", "pg_clip_low"),  # clip to [-0.5, ...]: a negative ratio bound
        ("pg_clip_high=-0.1", "pg_clip_low, pg_clip_high"),  # one message names both
        ("seed=4294967296", "seed"),  # 2**32
        ("seed=17592186044416", "seed"),  # 2**44: step 1's seed overflowed torch.manual_seed
        ("device=cuda:x", "device"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field)


def test_settings_checked_against_each_other():
    with pytest.raises(ConfigError, match=r"^max_ratio: must be >= min_ratio"):
        load_config(None, ["min_ratio=0.5", "max_ratio=0.1"])  # the teacher floored, then capped
    with pytest.raises(ConfigError, match=r"^max_ratio: must be > 0"):
        load_config(None, ["min_ratio=null", "max_ratio=0"])  # no floor to be under: log(0)
    with pytest.raises(ConfigError, match=r"^hub_model_id: expected"):
        load_config(None, ["push_to_hub=true", "hub_model_id=bad name!!"])  # found after training
    assert load_config(None, ["push_to_hub=true", "hub_model_id=me/resd-qwen_0.5b"]).push_to_hub
    with pytest.raises(ConfigError, match=r"^lr_scheduler_type: polynomial .* lr > 1e-7"):
        load_config(None, ["lr_scheduler_type=polynomial", "lr=1e-8"])  # failed in step 1
    assert load_config(None, ["lr_scheduler_type=polynomial", "lr=2e-7"]).lr == 2e-7
    assert load_config(None, ["lr_scheduler_type=linear", "lr=0"]).lr == 0.0


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


@pytest.mark.parametrize(
    ("given", "pointer"),
    [("bf16=true", "`autocast`"), ("use_vllm=true", "generation_backend: vllm"),
     ("logging_steps=10", "metrics.jsonl"), ("gradient_accumulation_steps=4", "micro_batch_size"),
     ("reward_weights=[1,2]", "`env_args.scorer_weights`")],
)  # fmt: skip
def test_a_trl_setting_without_a_key_here_says_what_does_its_job(given, pointer):
    """A config brought over from TRL: catches one of its settings with no key here
    stopping at a bare "unknown config key", or passing silently."""
    key = given.split("=")[0]
    with pytest.raises(
        ConfigError, match=rf"^{key}: TRL's setting has no key here; .*{re.escape(pointer)}"
    ):
        load_config(None, [given])


def test_a_misspelt_key_names_the_closest_known_one():
    """A typo got the bare "unknown config key": the message now names the closest key,
    ours or TRL's, with a dash read as an underscore; a name close to none gets no guess."""
    for given, close in [("learnig_rate=1", "learning_rate"), ("top-k=3", "top_k"),
                         ("eval_top=3", "eval_top_p"), ("early_stoping={}", "early_stopping")]:  # fmt: skip
        key = given.split("=")[0]
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: unknown config key \(did "
                           rf"you mean '{close}'\?\) \(known keys: "):  # fmt: skip
            load_config(None, [given])
    with pytest.raises(ConfigError) as far:
        load_config(None, ["zzzz=1"])
    assert "did you mean" not in str(far.value)


def test_every_trl_name_read_or_pointed_from_is_trls_and_points_at_our_keys():
    """TRL's GRPOConfig (trl is pinned in the dev extra) is the oracle: each alias and
    each setting with a pointer is a field of it, but for the names older TRL and
    transformers releases had; each pointer names keys that exist here. Catches a
    misspelt TRL name, which no TRL config would ever reach, and a pointer to a key that
    does not exist."""
    import dataclasses

    from trl import GRPOConfig

    from resd.config import ALIASES, FIELDS, TRL_INSTEAD

    trl = {f.name for f in dataclasses.fields(GRPOConfig)}
    older = {"max_prompt_length", "warmup_ratio", "logging_dir"}
    assert set(ALIASES) | set(TRL_INSTEAD) <= trl | older
    assert set(ALIASES.values()) <= FIELDS and not set(TRL_INSTEAD) & (FIELDS | set(ALIASES))
    for key, pointer in TRL_INSTEAD.items():
        named = re.findall(r"`([a-z_]+)[`:/]", pointer)
        assert set(named) <= FIELDS, key
        with pytest.raises(ConfigError, match=rf"^{key}: TRL's setting has no key here; "):
            load_config(None, [f"{key}=1"])


def test_trls_clip_range_evaluation_interval_and_shuffle_names():
    """GRPOConfig's `epsilon` / `epsilon_high` are our policy-gradient clip bounds, and
    without `epsilon_high` TRL clips symmetrically. Catches the names refused, the upper
    bound left at our 0.28 when TRL's user gave only `epsilon`, and an explicit upper
    bound overwritten by it."""
    cfg = load_config(None, ["epsilon=0.1", "eval_steps=5", "shuffle_dataset=false"])
    assert (cfg.pg_clip_low, cfg.pg_clip_high, cfg.eval_every, cfg.shuffle) == (0.1, 0.1, 5, False)
    for upper in ("epsilon_high=0.3", "pg_clip_high=0.3"):
        cfg = load_config(None, ["epsilon=0.1", upper])
        assert (cfg.pg_clip_low, cfg.pg_clip_high) == (0.1, 0.3)
    assert load_config(None, ["epsilon_high=0.4"]).pg_clip_low == 0.2  # ours, untouched


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


def test_every_shipped_config_loads_and_ends_its_warm_up():
    """configs/*.yaml are what the README and `--help` point users to. A run of a fixed
    length must get past its warm-up, or the learning rate never reaches `lr` and the
    trainer warns: configs/continual.yaml's 4-step stages kept the default 10 warm-up
    steps, a warning in every stage of the shipped example."""
    from pathlib import Path

    from resd.analysis.continual import load_plan

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 8
    runs = []
    for path in configs:
        if path.name == "continual.yaml":
            plan = load_plan(path)
            assert [s.config.env for s in plan.stages] == ["arithmetic", "house_rules"]
            assert plan.stages[1].config.env_args == {}  # the first stage's are arithmetic's
            runs += [(f"{path.name} {s.name}", s.config) for s in plan.stages]
        else:
            assert load_config(path).model, path.name
            runs.append((path.name, load_config(path)))
    for name, cfg in runs:
        if cfg.steps and cfg.lr_scheduler_type != "constant":
            assert cfg.warmup_step_count(cfg.steps) < cfg.steps, name


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


# The fields checked in groups, each name written out: a name dropped from its group in
# config.py is a field whose bad values reach the trainer unchecked.
AT_LEAST_ONE = ["batch_size", "rollouts_per_prompt", "inner_updates", "micro_batch_size",
                "generation_batch_size", "max_new_tokens", "max_prompt_tokens", "eval_samples",
                "reflection_max_new_tokens", "curation_max_new_tokens", "playbook_max_entries",
                "playbook_prune_every", "keep_checkpoints", "update_epochs", "epochs"]  # fmt: skip
AT_LEAST_ONE_OR_NULL = ["steps", "topk", "eval_items", "max_reflections_per_step",
                        "eval_max_new_tokens", "slot_max_tokens", "reflection_playbook_tokens",
                        "curation_playbook_tokens", "teacher_playbook_tokens", "loss_chunk_size"]  # fmt: skip
NOT_NEGATIVE = ["eval_every", "save_every", "warmup_steps", "log_samples", "lr", "weight_decay"]
POSITIVE_OR_NULL = ["min_ratio", "max_ratio", "is_clip", "rollout_is_cap"]


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [*[(name, ["1"], ["0", "-1"]) for name in AT_LEAST_ONE],
     *[(name, ["1", "null"], ["0"]) for name in AT_LEAST_ONE_OR_NULL],
     ("max_teacher_prompt_tokens", ["1"], ["0"]),
     *[(name, ["0"], ["-1"]) for name in NOT_NEGATIVE],
     *[(name, ["0.5", "null"], ["0", "-0.5"]) for name in POSITIVE_OR_NULL]],
)  # fmt: skip
def test_grouped_bounds_hold_for_every_field_in_the_group(name: str, good: list, bad: list):
    for value in good:
        load_config(None, [f"{name}={value}"])
    for value in bad:
        with pytest.raises(ConfigError, match=f"^{name}: must be"):
            load_config(None, [f"{name}={value}"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["min_new_tokens=0"],
        ["min_new_tokens=128"],  # equal to max_new_tokens: the equal-work benchmark mode
        ["curation_min_operations=0"],
        ["curation_min_operations=2"],
        ["alpha=0"],
        ["alpha=0.5"],
        ["alpha=1"],
        ["top_p=1", "eval_top_p=1"],
        ["top_p=0.01", "eval_top_p=0.01"],
        ["top_k=0", "min_p=0"],  # off
        ["top_k=1", "min_p=1"],  # the top token alone
        ["temperature=0", "eval_temperature=0"],  # greedy
        ["teacher_update_rate=0"],
        ["teacher_update_rate=1"],
        ["max_grad_norm=null"],
        ["distillation_weight=0"],
        ["distillation_weight=1"],
        ["distillation_weight=null"],
        ["adam_beta1=0", "adam_beta2=0"],
        ["adam_beta1=0.99", "adam_beta2=0.9999"],
        ["min_ratio=0.5", "max_ratio=0.5"],  # max_ratio may equal min_ratio
        ["min_ratio=null", "max_ratio=0.1"],
        ["pg_clip_low=0", "pg_clip_high=0"],
        ["pg_clip_low=1", "pg_clip_high=5"],
        ["success_weight_alpha=0"],
        ["success_weight_alpha=0.5"],
        ["success_weight_beta=0"],
        ["trust_region_weight=0"],
        ["trust_region_weight=1"],
        ["lora={r: 1, alpha: 0.5, dropout: 0, target_modules: q_proj}"],
        ["lora={rank: 8, lora_dropout: 0.99, target_modules: [q_proj, v_proj]}"],
        ["lora={target_modules: null}"],  # PEFT's default modules for the architecture
        ["lora={target_modules: !!set {q_proj: null}}"],  # PEFT takes a set (and a tuple)
        ["seed=5"],
        ["seed=4294967295"],  # 2**32 - 1
        ["kl_coef=0.1"],
        ["device=cpu"],
        ["device=cuda:1"],
        ["device=mps"],
        ["generation_dtype=int8"],  # the transformers backend's CPU decoding
        ["generation_backend=vllm"],
        ["generation_backend=vllm", "generation_dtype=bfloat16"],
        ["generation_cache=static", "generation_compile=true"],
        ["playbook_similarity=0.01"],
    ],
)
def test_values_at_the_bounds_and_inside_them_are_accepted(overrides: list):
    """The other side of each bound in test_bad_values_name_the_field: a check one step too
    strict refuses a setting the docs allow (greedy decoding, alpha 0, a cap equal to the floor)."""
    cfg = load_config(None, overrides)
    for item in overrides:
        key, _, raw = item.partition("=")
        assert getattr(cfg, key) is not None or raw == "null", item


def test_settings_that_only_clash_together():
    """int8 decoding is the transformers backend's; compiling needs the static cache."""
    with pytest.raises(ConfigError, match=r"^generation_dtype: int8 is the transformers"):
        load_config(None, ["generation_backend=vllm", "generation_dtype=int8"])
    with pytest.raises(ConfigError, match=r"^generation_compile: needs generation_cache: static"):
        load_config(None, ["generation_compile=true", "generation_cache=null"])


SCHEDULERS = ["constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "constant"]  # fmt: skip
# The documented choices of each choice field (the comments beside the fields, the docs).
DOCUMENTED_CHOICES = {
    "teacher": ["ema", "base", "live", "trust_region"],
    "playbook_policy": ["staleness", "random"],
    "distillation_mode": ["topk", "full", "sampled"],
    "pg_reward": ["reward", "score"],
    "dtype": ["float32", "bfloat16"],  # float16 master weights are refused on their own
    "generation_dtype": ["auto", "float32", "bfloat16", "float16", "int8", "null"],
    "autocast": ["auto", "none", "float32", "bfloat16", "float16", "null"],
    "generation_backend": ["transformers", "vllm"],
    "generation_cache": ["null", "static"],
    "strategy": ["auto", "ddp", "fsdp", "deepspeed"],
    "zero_stage": ["null", "1", "2", "3"],
    "structured_output": ["auto", "on", "off"],
    "loss_aggregation": ["token_mean", "seq_mean_token_mean"],
    "curation_ops": ["all", "add"],
    "lesson_calls": ["two", "one"],
    "reflection_layout": ["prompt", "conversation"],
    "unparsed_reflection": ["drop", "raw"],
    "solution_buffer_keep": ["first", "latest"],
    "lr_scheduler_type": SCHEDULERS,
    "report_to": ["tensorboard", "wandb"],
}


@pytest.mark.parametrize(("name", "choices"), DOCUMENTED_CHOICES.items())
def test_every_documented_choice_is_accepted(name: str, choices: list):
    for choice in choices:
        value = getattr(load_config(None, [f"{name}={choice}"]), name)
        expected = {"null": None, "1": 1, "2": 2, "3": 3}.get(choice, choice)
        assert value == ([expected] if name == "report_to" else expected), (name, choice)


def test_template_variables_resd_sets_itself_are_refused():
    """`chat_template_kwargs` holds template variables only: the render arguments resd
    passes would clash with them as a duplicate keyword in `apply_chat_template`."""
    from resd.config import RENDER_KEYS

    documented = {"conversation", "messages", "add_generation_prompt", "tokenize",
                  "return_dict", "continue_final_message", "chat_template"}  # fmt: skip
    assert documented == RENDER_KEYS
    for key in sorted(RENDER_KEYS):
        with pytest.raises(ConfigError, match=f"^chat_template_kwargs: '{key}' is set by resd"):
            load_config(None, [f"chat_template_kwargs.{key}=x"])
    cfg = load_config(None, ["chat_template_kwargs.enable_thinking=false"])
    assert cfg.chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize(
    ("key", "owner"),
    [("dtype", "dtype"), ("torch_dtype", "dtype"), ("device_map", "device / strategy"),
     ("quantization_config", "a pre-quantized checkpoint")],
)  # fmt: skip
def test_model_loading_arguments_resd_owns_are_refused_and_named(key: str, owner: str):
    with pytest.raises(ConfigError, match=f"^model_init_kwargs: '{key}' is set by {owner}"):
        load_config(None, [f"model_init_kwargs.{key}=x"])


def test_other_model_loading_arguments_pass_through():
    cfg = load_config(None, ["model_init_kwargs.revision=main",
                             "model_init_kwargs.attn_implementation=sdpa"])  # fmt: skip
    assert cfg.model_init_kwargs == {"revision": "main", "attn_implementation": "sdpa"}


def test_values_are_coerced_to_the_declared_type():
    """YAML's `2.0` for a count is 2, a number for a name is its text, an int for a float
    is a float (saved as 1.0, as a float field reads back)."""
    cfg = load_config(None, ["steps=2.0", "output_dir=123", "model=0.5", "lr=1",
                             "max_grad_norm=2", "structured_output=true", "autocast=true"])  # fmt: skip
    assert cfg.steps == 2 and type(cfg.steps) is int
    assert (cfg.output_dir, cfg.model) == ("123", "0.5")
    assert type(cfg.lr) is float and type(cfg.max_grad_norm) is float
    assert (cfg.structured_output, cfg.autocast) == ("on", "bfloat16")  # YAML's bare on / true
    cfg = load_config(None, ["structured_output=false", "autocast=false"])
    assert (cfg.structured_output, cfg.autocast) == ("off", "none")
    assert load_config(None, ["autocast='off'"]).autocast == "none"  # off, quoted
    with pytest.raises(ConfigError, match=r"^topk: expected an integer, got 'lots'"):
        load_config(None, ["topk=lots"])  # the int's message, not a generic one


def test_check_type_takes_typing_optional_too():
    """`check_type` is also the eval command's checker; `Optional[int]` is a typing.Union."""
    import typing

    from resd.config import check_type

    assert check_type("items", None, typing.Optional[int]) is None  # noqa: UP045
    assert check_type("items", 3.0, typing.Optional[int]) == 3  # noqa: UP045
    with pytest.raises(ConfigError, match=r"^items: expected an integer"):
        check_type("items", "x", typing.Optional[int])  # noqa: UP045


def test_override_values_are_yaml_scalars_even_inside_mappings():
    """env_args are not type-checked: the override's own parse is what the environment gets,
    so `1e-5` (a string to YAML 1.1) must still arrive as a number."""
    cfg = load_config(None, ["env_args.tolerance=1e-5", "env_args.scale=2.5", "env_args.n=12",
                             "env_args.name=abc", "env_args.path=a=b.csv",
                             "env_args.pattern=[unclosed", "env_args.label=Infinity"])  # fmt: skip
    assert cfg.env_args == {"tolerance": 1e-5, "scale": 2.5, "n": 12, "name": "abc",
                            "path": "a=b.csv", "pattern": "[unclosed", "label": "Infinity"}  # fmt: skip
    assert type(cfg.env_args["n"]) is int
    with pytest.raises(ConfigError, match=r"^lr: overrides take the form key=value"):
        load_config(None, ["lr"])


@pytest.mark.parametrize("word", ["=5", "env_args.=1", "env_args..n=1", ".steps=1", " =1"])
def test_an_override_key_with_an_empty_part_is_refused_as_such(word):
    """`env_args.=1` set an environment argument named "" (an unknown argument, if the
    environment checked at all), and `=5` was refused as ": unknown config key"."""
    with pytest.raises(ConfigError, match=r"overrides take the form key=value, a dotted key "):
        load_config(None, [word])
    assert load_config(None, ["env_args. n=1"]).env_args == {"n": 1}  # spaces around a part


def test_apply_overrides_leaves_the_callers_mapping_alone():
    """`resd serve --learn` and `resd continual` apply overrides to a file's mapping they
    use again afterwards."""
    from resd.config import apply_overrides

    data = {"lr": 1e-6, "env_args": {"seed": 1}}
    out = apply_overrides(data, ["lr=2e-6", "env_args.seed=2", "env=qa"])
    assert data == {"lr": 1e-6, "env_args": {"seed": 1}}
    assert out == {"lr": 2e-6, "env_args": {"seed": 2}, "env": "qa"}


def test_setting_env_to_the_files_own_keeps_its_arguments(tmp_path):
    """Only a switch to another environment drops the file's env_args."""
    path = tmp_path / "cfg.yaml"
    path.write_text("env: qa\nenv_args: {path: x.csv}\n")
    assert load_config(path, ["env=qa"]).env_args == {"path": "x.csv"}
    assert load_config(path, ["env=arithmetic"]).env_args == {}


def test_more_trl_names_and_a_warmup_given_as_a_fraction():
    """transformers 5 and TRL read `warmup_steps` below 1 as a fraction of the run, and
    older configs write it as `warmup_ratio`. Catches either refused (the fraction was an
    error), a fraction rounded down, or a whole number read as a fraction."""
    cfg = load_config(None, ["num_train_epochs=3"])
    assert cfg.epochs == 3
    for given in ("warmup_ratio=0.3", "warmup_steps=0.3"):
        cfg = load_config(None, [given])
        assert cfg.warmup_steps == 0.3 and cfg.warmup_step_count(5) == 2  # 1.5, rounded up
    assert load_config(None, ["warmup_steps=2.0"]).warmup_step_count(5) == 2  # a count
    assert load_config(None, ["warmup_steps=1"]).warmup_step_count(50) == 1
    assert load_config(None, ["warmup_ratio=0"]).warmup_step_count(50) == 0
    with pytest.raises(ConfigError, match=r"^warmup_ratio: expected a fraction of the run"):
        load_config(None, ["warmup_ratio=1"])
    with pytest.raises(ConfigError, match=r"^warmup_ratio: given together with warmup_steps"):
        load_config(None, ["warmup_ratio=0.1", "warmup_steps=0.2"])


def test_an_empty_config_file_is_the_defaults(tmp_path):
    from resd.config import TrainConfig

    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path) == TrainConfig()


def test_report_to_spellings():
    """A comma list on the command line, a list in YAML, `none` either way; repeats and
    blanks dropped, order kept."""
    assert load_config(None, ["report_to=wandb, tensorboard,wandb,"]).report_to == [
        "wandb",
        "tensorboard",
    ]
    assert load_config(None, ["report_to=[tensorboard, wandb]"]).report_to == [
        "tensorboard",
        "wandb",
    ]
    assert load_config(None, ["report_to=[none]"]).report_to == []
    assert load_config(None, ["report_to=null"]).report_to == []
    with pytest.raises(ConfigError, match=r"^report_to: unknown tracker 'mlflow'"):
        load_config(None, ["report_to=tensorboard,mlflow,comet"])  # the first unknown one


def test_settings_differences_names_each_changed_setting():
    """What `resd compare` / `resd continual` print when a re-used run's settings differ:
    dotted keys, indexed list items, whole lists of another length, and none of the
    settings that change no result, at any depth."""
    from resd.config import UNCOMPARED_KEYS, settings_differences

    unrelated = {"output_dir", "progress", "report_to", "save_every", "keep_checkpoints"}
    assert unrelated == UNCOMPARED_KEYS
    old = {"lr": 1e-6, "env_args": {"path": "x", "n": [1, 2]}, "lora": None, "tags": [1, 2],
           "output_dir": "a", "progress": True, "report_to": [], "save_every": 0,
           "keep_checkpoints": 2, "stage": {"output_dir": "a/1"}}  # fmt: skip
    new = {"lr": 2e-6, "env_args": {"path": "x", "n": [1, 3]}, "lora": {"r": 8}, "tags": [1],
           "output_dir": "b", "progress": False, "report_to": ["wandb"], "save_every": 5,
           "keep_checkpoints": 1, "stage": {"output_dir": "b/1"}}  # fmt: skip
    assert settings_differences(old, new) == [
        "env_args.n[1]: 2 then, 3 now",
        "lora: None then, {'r': 8} now",
        "lr: 1e-06 then, 2e-06 now",
        "tags: [1, 2] then, [1] now",
    ]
    assert settings_differences(old, dict(old)) == []
    assert settings_differences([{"a": 1}], [{"a": 2}]) == ["[0].a: 1 then, 2 now"]


def test_defaults_are_the_documented_ones():
    """What a run gets for every key it leaves out (`resd train --help-config` lists these,
    the comments in config.py say what each means): a default changed by accident changes
    every run that relies on it, silently."""
    from resd.config import TrainConfig

    expected = {
        "model": "smollm2-135m", "dtype": "float32", "autocast": "auto", "device": "auto",
        "gradient_checkpointing": False, "chat_template": None, "model_init_kwargs": {},
        "chat_template_kwargs": {}, "env": "arithmetic", "env_args": {}, "algorithm": "resd",
        # the schedule: one pass, batches of 8 prompts, K = 4 inner updates
        "steps": None, "epochs": 1, "batch_size": 8, "rollouts_per_prompt": 1, "inner_updates": 4,
        "micro_batch_size": 4, "pack_rows": True, "keep_host_memory": True,
        "generation_batch_size": 16, "generation_dtype": "auto", "generation_backend": "transformers",
        "generation_cache": None, "generation_compile": False, "vllm_args": {}, "shuffle": True,
        # sampling
        "max_prompt_tokens": 1024, "max_new_tokens": 128, "min_new_tokens": 0,
        "temperature": 1.0, "top_p": 0.95, "top_k": 0, "min_p": 0.0,
        # optimizer: the paper's constant 1e-6 after 10 warm-up steps
        "lr": 1e-6, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.999,
        "warmup_steps": 10, "lr_scheduler_type": "constant_with_warmup", "max_grad_norm": 1.0,
        # self-distillation: reverse KL on the top 100 tokens plus the tail
        "alpha": 1.0, "topk": 100, "add_tail": True, "min_ratio": 0.2, "max_ratio": None,
        "success_weighting": False, "success_weight_alpha": 1.0, "success_weight_beta": 1.0,
        "distillation_mode": "topk", "loss_aggregation": "token_mean",
        "distillation_weight": None, "loss_chunk_size": None, "is_clip": 2.0,
        "rollout_is_cap": None, "update_epochs": 1, "teacher": "ema",
        "teacher_update_rate": 1e-4, "trust_region_weight": 0.5,
        # policy gradient
        "pg_reward": "reward", "pg_scale_std": True, "pg_clip_low": 0.2, "pg_clip_high": 0.28,
        "kl_coef": 0.0, "lora": None, "reflector": None,
        # reflection, curation and the playbook
        "student_playbook": False, "teacher_template": None, "max_teacher_prompt_tokens": 3072,
        "slot_max_tokens": 1024, "reflection_max_new_tokens": 256, "curation_max_new_tokens": 256,
        "max_reflections_per_step": None, "unparsed_reflection": "drop", "curation_ops": "all",
        "curation_min_operations": 0, "lesson_calls": "two", "reflection_layout": "prompt",
        "structured_output": "auto", "reflection_prefill": None, "curation_prefill": None,
        "playbook_init": None, "playbook_max_entries": 120, "playbook_similarity": 0.6,
        "playbook_prune_every": 4, "playbook_policy": "staleness",
        "reflection_playbook_tokens": 2048, "curation_playbook_tokens": 2048,
        "teacher_playbook_tokens": 1024, "solution_buffer_keep": "first",
        "teacher_feedback_with_solution": True,
        # evaluation and the run directory
        "eval_every": 0, "eval_samples": 4, "eval_items": None, "eval_temperature": 0.6,
        "eval_top_p": 0.95, "eval_top_k": 0, "eval_min_p": 0.0, "eval_max_new_tokens": None,
        "early_stopping": None, "seed": 0, "output_dir": "runs/resd",
        "save_every": 0, "keep_checkpoints": 2, "push_to_hub": False, "hub_model_id": None,
        "log_samples": 4, "progress": True, "strategy": "auto", "fsdp_reshard_after_forward": True,
        "zero_stage": None, "report_to": [],
    }  # fmt: skip
    assert TrainConfig().to_dict() == expected
    assert load_config(None).to_dict() == expected


def test_a_config_built_in_python_gets_the_type_checks_a_yaml_file_gets():
    """`TrainConfig(lr="fast")` failed as "'<' not supported between instances of 'str'
    and 'int'", and `TrainConfig(env_args=[1])` passed, to fail much later: a YAML file's
    values were checked (`build_config`), a Python caller's were not. Now both are, and
    converted alike ("1e-5" is a number, 8.0 a whole 8)."""
    from resd.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^lr: expected a number, got 'fast'$"):
        TrainConfig(lr="fast")
    with pytest.raises(ConfigError, match=r"^env_args: expected a mapping, got \[1\]$"):
        TrainConfig(env_args=[1])
    with pytest.raises(ConfigError, match=r"^shuffle: expected true/false, got 'yes'$"):
        TrainConfig(shuffle="yes")
    cfg = TrainConfig(lr="1e-5", batch_size=8.0)
    assert (cfg.lr, cfg.batch_size, type(cfg.batch_size)) == (1e-5, 8, int)
    assert TrainConfig() == load_config(None)  # the defaults pass as they are
    # a path given as a Path is text, as from YAML: as a Path, config.yaml could not be
    # written (yaml cannot represent a PosixPath), after the model had loaded
    cfg = TrainConfig(model=Path("models/tiny"), output_dir=Path("runs") / "x")
    assert (cfg.model, cfg.output_dir) == ("models/tiny", "runs/x")
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict()))["output_dir"] == "runs/x"


def test_load_config_names_a_mapping_or_a_string_given_where_it_takes_a_path_or_a_list():
    """`load_config({"lr": 1})` failed in pathlib ("expected str, bytes or os.PathLike
    object, not dict"), and `load_config(None, "lr=1")` read the string a character at a
    time ("l: overrides take the form key=value"). Each now says what to pass."""
    with pytest.raises(TypeError, match=r"^load_config: path is a YAML file's path or None, "
                                        r"got dict \(a mapping: resd\.TrainConfig\(\*\*mapping\)\)"):  # fmt: skip
        load_config({"lr": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^load_config: overrides is a list of 'key=value' "
                                        r"strings, got the string 'lr=1' \(pass \['lr=1'\]\)"):  # fmt: skip
        load_config(None, "lr=1")  # type: ignore[arg-type]
    assert load_config(None, ("lr=1",)).lr == 1.0  # any sequence of them


def _a_module_level_scorer(item, response):
    return 0.0


def test_a_config_from_python_holds_only_what_its_records_can_hold():
    """config.yaml and each checkpoint's state.json record the config. From Python,
    `env_args={"path": Path(...)}` or a scorer function in env_args trained until the first
    write of config.yaml, then failed with yaml's "cannot represent an object", after the
    model had loaded; a set of LoRA target modules failed at the first checkpoint (JSON).
    A Path is its text, a tuple or a set a list, a module-level function its import path
    (which the scorer setting takes back), and what no record can hold is refused at once."""
    from resd.config import TrainConfig

    cfg = TrainConfig(
        env_args={"path": Path("data") / "qa.jsonl", "scorer": _a_module_level_scorer,
                  "columns": ("a", "b")},
        lora={"r": 4, "target_modules": {"v_proj", "q_proj"}},
    )  # fmt: skip
    assert cfg.env_args == {"path": "data/qa.jsonl", "columns": ["a", "b"],
                            "scorer": "test_config:_a_module_level_scorer"}  # fmt: skip
    assert cfg.lora == {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    assert yaml.safe_load(yaml.safe_dump(cfg.to_dict())) == cfg.to_dict()
    from resd.envs.scorers import resolve_scorer

    assert resolve_scorer(cfg.env_args["scorer"]) is _a_module_level_scorer
    with pytest.raises(ConfigError, match=r"^env_args\.scorer: function <function test_a_config.* "
                                          r"cannot be recorded in the run's config\.yaml"):  # fmt: skip
        TrainConfig(env_args={"scorer": lambda item, response: 0.0})
    with pytest.raises(ConfigError, match=r"^env_args\.data\[0\]: object "):
        TrainConfig(env_args={"data": [object()]})
