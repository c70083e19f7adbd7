"""`resd eval`: accuracy of any model or checkpoint on an environment's test split.

    resd eval --model Qwen/Qwen3-0.6B --env manufactoria --samples 4 --out base.json
    resd eval --model runs/x --env arithmetic n_test=64          # a run's final model
    resd eval --model runs/x/checkpoint-100 --env arithmetic       # or one of its checkpoints
    resd eval --model runs/lora/checkpoint-100 --base-model Qwen/Qwen3-0.6B ...

The metrics are the trainer's (`resd.analysis.evaluation`): per-task accuracy (all tests
pass) and per-test-case accuracy (fraction of tests passed), each as mean@k and best@k
over k samples per item at the evaluation temperature, plus the same four numbers per
item, so that one can see *which* problems a method solves.

A model folder (a run's top level or a checkpoint folder, `runs/x/checkpoint-40`) holds
either a full Hugging Face model or, for a LoRA run, a PEFT adapter (it holds
`adapter_config.json`). An adapter is applied to its base model (recorded in the adapter
config, or `--base-model`) in float32 and merged, and only then cast to the sampling
dtype: merging in bfloat16 would round the small LoRA update away.

Sampling runs in the trainer's default sampling precision (`--dtype auto`: bfloat16 where
the device has fast bf16 kernels, float32 elsewhere, see `resd.models.fast_bfloat16`), so a
checkpoint is judged at the precision it was trained to sample at; `--dtype` pins one
(`int8`: float32 with int8 weights for decoding, `resd.generation.int8`, on a CPU).
The prompts are the items' own messages: a run trained with `student_playbook=true`
showed the student its playbook, which is not reproduced here.
The loading and evaluation functions here are reused by `resd continual`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resd.config import (
    ALIASES,
    ConfigError,
    TrainConfig,
    check_device,
    check_type,
    env_arg_overrides,
    is_finite_number,
    load_config,
    read_yaml_mapping,
)
from resd.envs import Environment, make_env
from resd.envs.base import Item, Score, checked_test_items
from resd.rundir import GIVEN_IN_PYTHON, check_out_file, path_option, reward_keys

METRIC_ROWS = (("per-task", "task"), ("per-test-case", "case"))


@dataclass
class EvalSettings:
    """How to sample for evaluation; the defaults are TrainConfig's (4 samples at T = 0.6)."""

    samples: int = 4  # k
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    max_new_tokens: int = 128
    max_prompt_tokens: int = 1024
    items: int | None = None  # the first N test items; None = the whole test split
    batch_size: int = 16
    seed: int = 0
    autocast: str | None = "auto"

    def __post_init__(self) -> None:
        for name in ("samples", "max_new_tokens", "max_prompt_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.items is not None and self.items < 1:
            raise ValueError(f"items: must be >= 1 or unset, got {self.items}")
        # nan passes `< 0` and sampled with nan logits; inf sampled uniformly, unnoticed
        if not (is_finite_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1] (0: off), got {self.min_p}")
        if not 0 <= self.seed < 2**32:  # as training's; torch refuses 2**64 in its own words
            raise ValueError(f"seed: must be in [0, 2**32), got {self.seed}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> EvalSettings:
        """The settings the trainer evaluates a run with (`Trainer.evaluate`), but the seed:
        the trainer's evaluation at step t draws with seed × 7919 + t (each evaluation of
        a run its own draws), this one with the run's seed (every model the same draws).
        `resd eval --seed <seed × 7919 + t>` repeats the trainer's step-t evaluation."""
        return cls(
            samples=cfg.eval_samples,
            temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p,
            top_k=cfg.eval_top_k,
            min_p=cfg.eval_min_p,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
            max_prompt_tokens=cfg.max_prompt_tokens,
            items=cfg.eval_items,
            batch_size=cfg.generation_batch_size,
            seed=cfg.seed,
            autocast=cfg.autocast,
        )


# ---- loading ------------------------------------------------------------------------------
def is_adapter(path: str | Path) -> bool:
    """A PEFT adapter folder (what a LoRA run saves in its checkpoints and at its top level)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_model(path: str | Path, base_model: str | None = None) -> str:
    """The model an adapter was trained on: `base_model` if given, else its config's.

    A run on a bundled model records the folder that model was converted into on the
    machine that trained it (`~/.cache/resd/models/<alias>`); where that folder is not,
    as on another machine or under another user, the alias finds this machine's copy."""
    if base_model:
        return base_model
    from resd.models import read_adapter_config

    config = read_adapter_config(path)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"model: adapter {path} does not name its base model; pass --base-model")
    from resd.models import BUNDLED_MODELS

    folder = Path(base)
    if folder.name in BUNDLED_MODELS and folder.parent.name == "models" and not folder.exists():
        return folder.name
    return str(base)


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file()


def load_policy(
    path: str | Path,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_length: int | None = None,
    init_kwargs: dict[str, Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
):
    """(model, tokenizer) for a model id, a full HF folder or a PEFT adapter folder.

    An adapter is merged into its base in float32 (see the module docstring), so the
    result is always a plain transformers model in `dtype`, in eval mode. `max_length`
    (prompt + new tokens) replaces the tokenizer's saved limit: a checkpoint stores the
    training run's, which may be shorter than what an evaluation asks for.
    """
    from resd.models import (
        DTYPES,
        load_adapter,
        load_model,
        load_tokenizer,
        pick_device,
        resolve_dtype,
    )

    dtype = resolve_dtype(dtype, pick_device(device))
    int8 = dtype == "int8"  # fp32 weights, plus int8 copies that decode steps read
    if int8:
        dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected auto, int8 or one of {sorted(DTYPES)}, got {dtype!r}")
    path = str(path)
    tok_kwargs = {"init_kwargs": init_kwargs, "chat_template_kwargs": chat_template_kwargs}
    if not is_adapter(path):
        model = load_model(path, dtype=dtype, device=device, init_kwargs=init_kwargs)
        tokenizer = load_tokenizer(path, max_length, **tok_kwargs)
    else:
        base = adapter_base_model(path, base_model)
        base_model = load_model(base, dtype="float32", device=device, init_kwargs=init_kwargs)
        model = load_adapter(base_model, path)
        model = model.merge_and_unload().to(DTYPES[dtype])
        # Checkpoints save the tokenizer beside the adapter; a bare adapter may not.
        tokenizer = load_tokenizer(
            path if _has_tokenizer(Path(path)) else base, max_length, **tok_kwargs
        )
    model.eval()
    model.requires_grad_(False)
    if int8:
        from resd.generation.int8 import quantize_for_decoding

        quantize_for_decoding(model)
    return model, tokenizer


def merge_adapter(path: str | Path, out: str | Path, *, base_model: str | None = None) -> Path:
    """Write adapter + base as one full float32 HF folder (with tokenizer) to `out`.

    A LoRA run can only start from a full model, so a continual-learning stage that
    follows a LoRA stage starts from the merged model (and trains a fresh adapter).
    """
    model, tokenizer = load_policy(path, base_model=base_model, dtype="float32", device="cpu")
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---- evaluating ---------------------------------------------------------------------------
def per_item_metrics(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """mean@k / best@k of each item, from `evaluate`'s per-sample records, in item order."""
    from resd.analysis.evaluation import aggregate

    by_item: dict[str, list[Score]] = {}
    for rec in records:
        by_item.setdefault(rec["item"], []).append(Score(rec["reward"], rec["score"], ""))
    rows = []
    for item, scores in by_item.items():
        metrics = aggregate([scores])
        rows.append(
            {
                "item": item,
                "rewards": [s.reward for s in scores],
                "scores": [s.score for s in scores],
                **{key: metrics[key] for key in metrics if "@" in key},
            }
        )
    return rows


def test_items(env: Environment, limit: int | None) -> list[Item]:
    """The first `limit` test items, refused when there are none or when two different
    ones share an id (the per-item results are keyed by it)."""
    items = checked_test_items(env)
    if not items[:limit]:
        raise ValueError(f"env: {type(env).__name__} has no test items")
    return items[:limit]


def evaluate_env(model, tokenizer, env: Environment, settings: EvalSettings) -> dict[str, Any]:
    """Sample k answers per test item and score them: aggregate, per-item and per-sample."""
    import torch

    from resd.analysis.evaluation import evaluate
    from resd.generation.hf import TransformersSampler

    items = test_items(env, settings.items)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    sampler = TransformersSampler(
        model, tokenizer, batch_size=settings.batch_size, autocast=settings.autocast
    )
    metrics, records = evaluate(
        sampler, tokenizer, env, items, samples=settings.samples,
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
        top_p=settings.top_p, max_prompt_tokens=settings.max_prompt_tokens,
        top_k=settings.top_k, min_p=settings.min_p,
    )  # fmt: skip
    return {"metrics": metrics, "per_item": per_item_metrics(records), "samples": records}


def evaluate_model(
    model_path: str | Path,
    env: str,
    env_args: dict[str, Any] | None = None,
    settings: EvalSettings | None = None,
    *,
    base_model: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    model_init_kwargs: dict[str, Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a model or checkpoint and evaluate it on `env`; the JSON `resd eval` writes.
    The two dicts are TrainConfig's of the same names (revision, trust_remote_code, ...;
    the chat template's variables)."""
    from resd.models import pick_device, resolve_dtype

    settings = settings or EvalSettings()
    environment = make_env(env, env_args)  # a bad env fails before the model is loaded
    test_items(environment, settings.items)  # as does one with nothing to evaluate
    dtype = resolve_dtype(dtype, pick_device(device))  # recorded as it ran
    model, tokenizer = load_policy(
        model_path, base_model=base_model, dtype=dtype, device=device,
        max_length=settings.max_prompt_tokens + settings.max_new_tokens,
        init_kwargs=model_init_kwargs, chat_template_kwargs=chat_template_kwargs,
    )  # fmt: skip
    adapter = is_adapter(model_path)
    result = evaluate_env(model, tokenizer, environment, settings)
    return {
        "model": str(model_path),
        "adapter": adapter,
        "base_model": adapter_base_model(model_path, base_model) if adapter else None,
        "dtype": dtype,
        "env": env,
        "env_args": env_args or {},
        "settings": dataclasses.asdict(settings),
        **result,
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """The four numbers as a small table: accuracy kind × (mean@k, best@k); then each
    reward function's mean, where a list of them scores the replies."""
    lines = [f"{'accuracy':16s} {'mean@k':>8s} {'best@k':>8s}"]
    for label, prefix in METRIC_ROWS:
        mean, best = metrics[f"{prefix}_mean@k"], metrics[f"{prefix}_best@k"]
        lines.append(f"{label:16s} {mean:8.4f} {best:8.4f}")
    lines.append(f"(k = {int(metrics['k'])} samples per item, {int(metrics['items'])} test items)")
    parts = {key: metrics[key] for key in reward_keys([metrics])}
    if parts:  # a list of reward functions: each one's mean over every sample
        width = max(16, *(len(key) for key in parts))
        lines += ["", f"{'reward function':{width}s} {'mean':>8s}"]
        lines += [f"{key:{width}s} {value:8.4f}" for key, value in parts.items()]
    return "\n".join(lines)


def format_per_item(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'item':32s} {'task mean':>9s} {'task best':>9s} {'case mean':>9s} {'case best':>9s}"
    ]
    for row in rows:
        lines.append(
            f"{str(row['item'])[:32]:32s} {row['task_mean@k']:9.3f} {row['task_best@k']:9.3f} "
            f"{row['case_mean@k']:9.3f} {row['case_best@k']:9.3f}"
        )
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------
# Settings `resd eval --config FILE` may hold, with their types (the flags' types, and
# TrainConfig's for the two dicts); a flag given on the command line wins.
EVAL_OPTION_TYPES: dict[str, Any] = {
    "model": str | None, "env": str | None, "env_args": dict | None, "base_model": str | None,
    "samples": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float,
    "max_new_tokens": int,
    "max_prompt_tokens": int, "items": int | None, "batch_size": int, "seed": int,
    "dtype": str, "device": str, "model_init_kwargs": dict | None,
    "chat_template_kwargs": dict | None,
}  # fmt: skip
EVAL_OPTIONS = tuple(EVAL_OPTION_TYPES)


# The sampling settings `resd eval` takes as options (its flags, a --config's keys).
SETTING_OPTIONS = tuple(f.name for f in dataclasses.fields(EvalSettings) if f.name != "autocast")
# The keys of a training config (`resd train`'s YAML, a run's config.yaml), TRL's included.
TRAINING_KEYS = {f.name for f in dataclasses.fields(TrainConfig)} | set(ALIASES)
TRAINED_FROM = "trained from"  # not an option: what to say when --model is missing


def _training_config_options(path: str) -> dict[str, Any]:
    """From a training config, what evaluating as its run evaluates takes: the environment
    and the run's evaluation settings (`eval_samples`, `eval_temperature`, ...). Not its
    `model`, which is the model the run started from: `--model` names the one to
    evaluate, the run's folder or the base."""
    cfg = load_config(path)
    settings = EvalSettings.from_config(cfg)
    # A run whose environment was built in Python says so in its config's first line
    # (`Trainer.train`): the `env` below it did not run, and --env must name the one that did.
    from_python = GIVEN_IN_PYTHON in Path(path).read_text().partition("\n")[0]
    return {
        **{key: getattr(settings, key) for key in SETTING_OPTIONS},
        **({} if from_python else {"env": cfg.env, "env_args": cfg.env_args}),
        "device": cfg.device,
        "model_init_kwargs": cfg.model_init_kwargs, "chat_template_kwargs": cfg.chat_template_kwargs,
        TRAINED_FROM: cfg.model,
    }  # fmt: skip


def _config_options(path: str) -> dict[str, Any]:
    """The settings in `--config FILE`, each checked against its type (YAML's `4.0` for a
    count becomes 4), or a ConfigError naming the key and the file: unchecked, `samples:
    abc` would fail only inside EvalSettings, as a TypeError that names neither."""
    loaded = read_yaml_mapping(path)
    unknown = sorted(set(loaded) - set(EVAL_OPTIONS))
    if any(key in TRAINING_KEYS for key in unknown):  # its other keys are checked as such
        return _training_config_options(path)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key in {path} (known: {', '.join(EVAL_OPTIONS)})")
    checked = {}
    for key, value in loaded.items():
        try:
            checked[key] = check_type(key, value, EVAL_OPTION_TYPES[key])
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
    return checked


def _eval_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the config file, then the flags actually given."""
    defaults = EvalSettings.from_config(TrainConfig())
    options: dict[str, Any] = {
        **{k: getattr(defaults, k) for k in SETTING_OPTIONS},
        "env_args": {}, "base_model": None, "dtype": "auto", "device": "auto",
    }  # fmt: skip
    if args.config:
        options.update(_config_options(args.config))
    options.update(
        {
            k: getattr(args, k)
            for k in EVAL_OPTIONS
            if k != "env_args" and getattr(args, k, None) is not None
        }
    )
    options["env_args"] = env_arg_overrides(dict(options.get("env_args") or {}), args.env_args)
    trained_from = options.pop(TRAINED_FROM, None)
    if not options.get("model") and trained_from:
        raise ConfigError(f"model: --config {args.config} is a training config, whose model "
                          f"({trained_from}) is the one its run started from: name the model "
                          f"to evaluate with --model (the run's folder, a checkpoint, or "
                          f"{trained_from} itself)")  # fmt: skip
    for key in ("model", "env"):
        if not options.get(key):
            raise ConfigError(f"{key}: required (--{key} or in --config)")
    check_device(options["device"])  # before the model loads, in the option's name
    if options["base_model"] and not is_adapter(options["model"]):  # it would go unused
        raise ConfigError(f"base_model: {options['model']} is not a LoRA adapter folder (no "
                          "adapter_config.json); --base-model names an adapter's base model")  # fmt: skip
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    opts = _eval_options(args)
    if args.out:  # now, not after an evaluation that may take hours
        check_out_file(Path(args.out), "out")
    settings = EvalSettings(**{key: opts[key] for key in SETTING_OPTIONS})
    env_args = opts["env_args"]
    result = evaluate_model(
        opts["model"], opts["env"], env_args, settings,
        base_model=opts["base_model"], dtype=opts["dtype"], device=opts["device"],
        model_init_kwargs=opts.get("model_init_kwargs"),
        chat_template_kwargs=opts.get("chat_template_kwargs"),
    )  # fmt: skip
    model = opts["model"]
    source = f"{model} (adapter on {result['base_model']})" if result["adapter"] else model
    print(f"model: {source}\nenv:   {opts['env']} {json.dumps(env_args) if env_args else ''}")
    filters = "".join(f", {name} = {value}" for name, value in
                      (("top-k", settings.top_k), ("min-p", settings.min_p)) if value)  # fmt: skip
    print(
        f"T = {settings.temperature}, top-p = {settings.top_p}{filters}, seed = {settings.seed}\n"
    )
    print(format_metrics(result["metrics"]))
    if args.per_item:
        print("\n" + format_per_item(result["per_item"]))
    if args.out:  # after printing: should writing still fail, the numbers are on screen
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\nwritten: {args.out}")
    return 0


def add_eval_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd eval --model M --env E [key=value ...]` (or `--config FILE`)."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a model or checkpoint on an environment's test split"
    )
    parser.add_argument("--config", type=path_option, default=None,
                        help="YAML with any of the settings below (e.g. configs/paper/ifeval_forgetting.yaml), "
                             "or a training config (a run's config.yaml): its environment and "
                             "evaluation settings, with --model naming the model")  # fmt: skip
    parser.add_argument(
        "--model", help="HF id, model folder, run folder or checkpoint folder (LoRA too)"
    )
    parser.add_argument("--env", help="built-in name or module:Class")
    parser.add_argument("env_args", nargs="*", help="environment arguments as key=value")
    parser.add_argument(
        "--base-model", type=path_option, help="base of a LoRA adapter (default: its config's)"
    )
    parser.add_argument("--samples", type=int, help="k per item (default 4)")
    parser.add_argument("--temperature", type=float, help="(default 0.6)")
    parser.add_argument("--top-p", type=float, help="(default 0.95)")
    parser.add_argument("--top-k", type=int, help="(default 0: off)")
    parser.add_argument("--min-p", type=float, help="(default 0: off)")
    parser.add_argument("--max-new-tokens", type=int, help="(default 128)")
    parser.add_argument("--max-prompt-tokens", type=int, help="(default 1024)")
    parser.add_argument("--items", type=int, help="first N test items (default: all)")
    parser.add_argument("--batch-size", type=int, help="(default 16)")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16", "int8"),
        help="(default auto: bfloat16 where the device runs it fast, else float32; int8: "
        "float32 with int8 weights for decoding, a CPU's faster choice)",
    )
    parser.add_argument("--device", help="(default auto)")
    parser.add_argument(
        "--out", type=path_option, default=None, help="write the full result as JSON here"
    )
    parser.add_argument("--per-item", action="store_true", help="also print every item")
    parser.set_defaults(fn=cmd_eval)
    return parser
