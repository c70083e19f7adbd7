"""What a run will do, worked out without loading the model's weights: `resd train --dry-run`.

A long run on rented GPUs should not fail at its first checkpoint on a typo, nor run
half as many steps as meant. The dry run builds the config, the environment and the
tokenizer as the trainer does, reads the model's config (not its weights) and prints the
schedule; nothing is written. The schedule is the trainer's own (`Schedule.of`), not a
copy of its arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from resd.config import TrainConfig
from resd.rundir import holds_run_logs, output_dir_problem


@dataclass(frozen=True)
class Schedule:
    """The stream of a run: every epoch's items in turn, `batch_size` prompts a batch,
    `inner_updates` optimizer steps on each batch, up to `steps`."""

    items: int  # items in the stream, over all epochs
    batches: int
    steps: int  # optimizer steps the run takes
    warmup: int  # of them, warm-up steps

    @classmethod
    def of(cls, cfg: TrainConfig, train_items: int) -> Schedule:
        items = train_items * cfg.epochs
        batches = math.ceil(items / cfg.batch_size)
        steps = min(cfg.steps or 10**12, batches * cfg.inner_updates)
        return cls(items, batches, steps, cfg.warmup_step_count(steps))


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def _steps_at(every: int, last: int, first: int | None) -> str:
    """The steps something happens at, as the trainer decides them: every `every` steps
    and at the last (and at `first`); a long list shows its first five and its last."""
    steps = sorted({*range(every, last, every), last}) if every else [last]
    steps = ([first] if first is not None else []) + steps
    if len(steps) > 6:
        return ", ".join(map(str, steps[:5])) + f", ..., {steps[-1]}"
    return ", ".join(map(str, steps))


def describe_run(cfg: TrainConfig, *, resume: bool = False) -> list[str]:
    """The lines `resd train --dry-run` prints; raises as the trainer would on a config,
    environment, model or tokenizer it could not use."""
    from resd.envs.base import checked_test_items
    from resd.models import load_model_config, load_tokenizer
    from resd.training.algorithms import get_algorithm
    from resd.training.checkpoint import latest_checkpoint
    from resd.training.policy import check_lora_targets, lora_config
    from resd.training.trainer import (
        _environment,
        files_a_run_overwrites,
        training_items,
    )

    algo = get_algorithm(cfg.algorithm)
    if cfg.generation_backend == "vllm":
        from resd.generation.vllm_engine import import_vllm

        import_vllm()
    env = _environment(cfg, None, None)
    train = training_items(env, algo, getattr(env, "name", cfg.env))
    tests = checked_test_items(env)
    test = tests[: cfg.eval_items]
    plan = Schedule.of(cfg, len(train))
    load_tokenizer(cfg.model, cfg.max_prompt_tokens + cfg.max_new_tokens,
                   init_kwargs=cfg.model_init_kwargs, chat_template=cfg.chat_template,
                   chat_template_kwargs=cfg.chat_template_kwargs)  # fmt: skip
    model_config = load_model_config(cfg.model, cfg.model_init_kwargs)
    run_dir = Path(cfg.output_dir)
    checkpoint = latest_checkpoint(run_dir) if resume and run_dir.is_dir() else None
    if cfg.lora and checkpoint is None:
        # a resumed LoRA run loads its adapter, with the settings it was made with
        revision = cfg.model_init_kwargs.get("revision")
        remote = bool(cfg.model_init_kwargs.get("trust_remote_code"))
        check_lora_targets(model_config, lora_config(cfg.lora, revision), trust_remote_code=remote)
    architecture = ", ".join(model_config.architectures or [model_config.model_type])
    rollouts = cfg.batch_size * cfg.rollouts_per_prompt
    if problem := output_dir_problem(run_dir):
        where = f"refused: {problem}"
    elif checkpoint is not None:
        where = f"resumes from {checkpoint.name}"
    elif holds_run_logs(run_dir):
        where = "holds a run: refused unless --resume" if not resume else "starts over"
    elif run_dir.is_dir() and (others := files_a_run_overwrites(run_dir)):
        where = f"holds {', '.join(others)}, which a run would overwrite: refused"
    else:
        where = "new" if not run_dir.exists() else "exists, holds no run"
    evaluations = (
        f"{_count(len(test), 'test item')} × {_count(cfg.eval_samples, 'sample')} at steps "
        f"{_steps_at(cfg.eval_every, plan.steps, 0)}"
        if test
        else "none (the environment has no test items)"
    )
    stop = f"; early_stopping {cfg.early_stopping}" if cfg.early_stopping else ""
    used = math.ceil(plan.steps / cfg.inner_updates)
    capped = (
        f" (`steps: {cfg.steps}` ends it; {_count(cfg.epochs, 'epoch')} would give "
        f"{_count(plan.batches, 'batch', 'batches')})"
        if used < plan.batches
        else f" ({_count(cfg.epochs, 'epoch')} of {_count(len(train), 'item')})"
    )
    return [
        f"model       {cfg.model} ({architecture}){', LoRA ' + str(cfg.lora) if cfg.lora else ''}",
        f"algorithm   {cfg.algorithm}: {algo.description}",
        f"env         {cfg.env}: {_count(len(train), 'training item')}, "
        f"{_count(len(tests), 'test item')}",
        f"steps       {plan.steps} optimizer steps on {_count(used, 'batch', 'batches')} of "
        f"{_count(cfg.batch_size, 'prompt')}, {cfg.inner_updates} a batch{capped}",
        f"rollouts    {rollouts} a step ({_count(cfg.batch_size, 'prompt')} × "
        f"{cfg.rollouts_per_prompt}), {rollouts * plan.steps} in all, up to "
        f"{cfg.max_new_tokens} new tokens each",
        f"lr          {cfg.lr:g}, {cfg.lr_scheduler_type}, warm-up {_count(plan.warmup, 'step')}",
        f"evaluation  {evaluations}{stop}",
        f"checkpoints at steps {_steps_at(cfg.save_every, plan.steps, None)}, the last "
        f"{cfg.keep_checkpoints} kept",
        f"output_dir  {run_dir} ({where})",
    ]
