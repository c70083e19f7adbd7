"""Output that goes straight to the Hub: a model card, and the push itself.

The card says what produced the model (algorithm, environment, steps, final evaluation,
the resd version) in the Hub's README format. The push uploads only what a user of the
model needs (weights or adapter, configs, tokenizer, card), not the run's logs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import resd
from resd.config import TrainConfig
from resd.models import BUNDLED_MODELS

# What a model repository needs; a run directory also holds logs, checkpoints, playbooks.
HUB_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "adapter_config.json",
    "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
    "README.md",
)  # fmt: skip


def hub_base_model(model: str) -> str | None:
    """What a card's `base_model` can name, which the Hub checks against its models: a
    bundled model's upstream id, a Hub id as given, nothing for a local folder."""
    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model].hub_id or None
    return None if Path(model).expanduser().exists() else model


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _eval_sampling(cfg: TrainConfig) -> str:
    """How evaluation sampled: temperature and top-p, and top-k / min-p where set."""
    filters = [("temperature", cfg.eval_temperature), ("top-p", cfg.eval_top_p),
               ("top-k", cfg.eval_top_k), ("min-p", cfg.eval_min_p)]  # fmt: skip
    return ", ".join(f"{name} {value}" for name, value in filters if value or name == "temperature")


def model_card(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    """The card; `summary["env"]` names an environment given in Python, which `cfg` cannot."""
    env = summary.get("env", cfg.env)
    after = summary.get("eval_after") or {}
    before = summary.get("eval_before") or {}
    rows = "\n".join(
        f"| {key} | {before.get(key, float('nan')):.3f} | {after[key]:.3f} |"
        for key in ("task_mean@k", "task_best@k", "case_mean@k", "case_best@k")
        if key in after
    )
    evaluation = (
        f"Evaluated on {_count(int(after.get('items', 0)), 'test item')} of `{env}`, "
        f"{_count(int(after.get('k', cfg.eval_samples)), 'sample')} each at "
        f"{_eval_sampling(cfg)}:\n\n"
        f"| metric | before | after |\n|---|---|---|\n{rows}\n"
        if rows
        else "No evaluation was recorded.\n"
    )
    front = {
        "library_name": "peft" if cfg.lora else "transformers",
        "base_model": hub_base_model(cfg.model),
        "tags": list(dict.fromkeys(["resd", "self-distillation", cfg.algorithm])),
    }
    front = {key: value for key, value in front.items() if value is not None}
    header = "---\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in front.items()) + "\n---\n"
    stopped = (
        f"It stopped early: {summary['stopped_early']}.\n\n" if summary.get("stopped_early") else ""
    )
    steps = summary.get("steps")
    steps = _count(steps, "optimizer step") if isinstance(steps, int) else "? optimizer steps"
    return (
        f"{header}\n# {cfg.model} trained with resd ({cfg.algorithm})\n\n"
        f"Trained with [resd](https://pypi.org/project/resd/) {resd.__version__}: algorithm "
        f"`{cfg.algorithm}` on the environment `{env}` for {steps} "
        f"(batches of {_count(cfg.batch_size, 'prompt')}, "
        f"{_count(cfg.rollouts_per_prompt, 'rollout')} each, "
        f"lr {cfg.lr:g}{', LoRA' if cfg.lora else ''}).\n\n"
        f"{stopped}## Evaluation\n\n{evaluation}\n"
        "The run's configuration is `config.yaml` in the run folder that produced this model.\n"
    )


def write_model_card(folder: Path, cfg: TrainConfig, summary: dict[str, Any]) -> Path:
    path = folder / "README.md"
    path.write_text(model_card(cfg, summary))
    return path


def hub_files(folder: Path) -> list[str]:
    """The files of `folder` a push uploads (relative names, sorted)."""
    names = {p.name for pattern in HUB_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(names)


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Create (if needed) and upload to `repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), allow_patterns=hub_files(folder)
    )
    return str(getattr(info, "commit_url", info))
