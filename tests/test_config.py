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
        ("learning_rate=1e-5", "learning_rate"),
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
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(field)


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
