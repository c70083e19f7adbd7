"""Seconds per training step: RESD vs its baselines vs TRL, measured side by side.

One process, one machine, one model, the same prompts. For `resd`'s own trainer it
builds a `Trainer` per algorithm and calls `train_step` directly (no evaluation): one
warm-up step, then `--repeats` timed steps, and reports the median of every phase the
trainer times itself (`time_rollout`, ..., `time_update`) plus the wall-clock of the
whole `train_step` call. For TRL it runs `trl.experimental.sdpo.SDPOTrainer` (N = 1)
and `trl.GRPOTrainer` (N = 8) for 1 + `--repeats` optimizer steps on the same prompts
and times each optimizer step between consecutive `on_step_end` callbacks, with the
phases taken from thin timing wrappers around the trainers' own methods.

Every step of every method sees a fresh batch of `--batch-size` prompts; step k uses
the same prompts for all methods. Sampling settings (temperature, top-p, no top-k,
`max_new_tokens`), optimizer settings and the distillation loss (top-k, tail, alpha,
IS clip, EMA teacher) are taken from the same `TrainConfig` for both implementations.

    .venv/bin/python benchmarks/step_time.py                      # the real benchmark
    .venv/bin/python benchmarks/step_time.py --smoke --repeats 1  # seconds, tiny random model
    .venv/bin/python benchmarks/step_time.py --fixed-length       # equal work: every reply max_new_tokens long

The table is printed last; the JSON (`--out`) holds every step and the settings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OURS = ("resd", "sdpo", "sdpo_ss", "grpo")
TRL = ("trl_sdpo", "trl_grpo")
# sdpo between resd and trl_sdpo: the two headline ratios compare neighbours in time.
ORDER = ("resd", "sdpo", "trl_sdpo", "sdpo_ss", "grpo", "trl_grpo")
PHASES = ("rollout", "feedback", "reflect", "curate", "teacher", "update", "other")
SMOKE = {
    "batch_size": 2,
    "max_new_tokens": 8,
    "grpo_n": 4,
    "overrides": ["reflection_max_new_tokens=8", "curation_max_new_tokens=8"],
}


# ---- shared set-up ---------------------------------------------------------------------
def rollouts_per_prompt(method: str, grpo_n: int) -> int:
    return grpo_n if method in ("grpo", "trl_grpo") else 1


def base_config(args: argparse.Namespace, model: str):
    """The one TrainConfig both implementations read their settings from."""
    from resd.config import load_config

    return load_config(
        args.config,
        [
            f"model={model}",
            f"batch_size={args.batch_size}",
            f"micro_batch_size={args.batch_size}",
            f"max_new_tokens={args.max_new_tokens}",
            f"min_new_tokens={args.max_new_tokens if args.fixed_length else 0}",
            "progress=false",
            "eval_items=1",
            "eval_samples=1",
            *args.overrides,
        ],
    )


def prompt_batches(cfg, count: int) -> list[list[Any]]:
    """Step k's prompts, identical for every method: the trainer's own shuffled order."""
    from resd.envs import make_env

    items = list(make_env(cfg.env, cfg.env_args).train_items())
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(items)
    need = count * cfg.batch_size
    if len(items) < need:  # a small environment: cycle rather than fail
        items = (items * (need // len(items) + 1))[:need]
    return [items[k * cfg.batch_size : (k + 1) * cfg.batch_size] for k in range(count)]


class ForwardCounter:
    """Counts forward calls per module: sampling (no grad), teacher, student with grad."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.handles: list[Any] = []

    def watch(self, module, name: str, split_by_grad: bool = False) -> None:
        import torch

        def hook(_module, _args) -> None:
            key = name
            if split_by_grad:
                key = f"{name}_grad" if torch.is_grad_enabled() else f"{name}_nograd"
            self.counts[key] += 1

        self.handles.append(module.register_forward_pre_hook(hook))

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process) so far."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system


def others_cores(before: tuple[float, float], after: tuple[float, float], wall: float) -> float:
    """Cores' worth of CPU that other processes used during `wall` seconds: the noise gauge."""
    if wall <= 0:
        return 0.0
    return max((after[0] - before[0]) - (after[1] - before[1]), 0.0) / wall


def wait_for_quiet(max_wait: float, threshold: float = 0.15, window: float = 2.0) -> float:
    """On a shared machine, wait (up to `max_wait` s) until other processes use < `threshold`
    cores over a `window`-second sample. Never part of a timed interval; 0 disables."""
    if max_wait <= 0:
        return 0.0
    start = time.perf_counter()
    while True:
        before = cpu_snapshot()
        time.sleep(window)
        busy = others_cores(before, cpu_snapshot(), window)
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait:
            return waited


def median_phases(steps: list[dict[str, Any]]) -> dict[str, float]:
    keys = [*PHASES, "step", "others_cores"]
    return {k: statistics.median(s[k] for s in steps) for k in keys if all(k in s for s in steps)}


# ---- our trainer -----------------------------------------------------------------------
def run_ours(algorithm: str, args, model: str, batches, workdir: Path) -> dict[str, Any]:
    from resd.config import load_config
    from resd.generation.hf import chat_prompt_ids
    from resd.training.trainer import Trainer

    n = rollouts_per_prompt(algorithm, args.grpo_n)
    cfg = load_config(
        args.config,
        [
            f"model={model}",
            f"algorithm={algorithm}",
            f"output_dir={workdir / algorithm}",
            f"batch_size={args.batch_size}",
            f"micro_batch_size={args.batch_size}",
            f"rollouts_per_prompt={n}",
            # one sampling call for all rollouts of a step, as TRL does
            f"generation_batch_size={args.batch_size * n}",
            f"max_new_tokens={args.max_new_tokens}",
            f"min_new_tokens={args.max_new_tokens if args.fixed_length else 0}",
            "progress=false",
            "eval_items=1",
            "eval_samples=1",
            *args.overrides,
        ],
    )
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - start
    counter = ForwardCounter()
    counter.watch(trainer.model, "student", split_by_grad=True)
    if trainer.sampler.generator is not trainer.model:
        counter.watch(trainer.sampler.generator, "sampler")
    if trainer.teacher.copy is not None:
        counter.watch(trainer.teacher.copy, "teacher")
    samples = Path(cfg.output_dir) / "samples.jsonl"
    steps = []
    try:
        for index, items in enumerate(batches):
            waited = wait_for_quiet(args.quiet_wait)
            cpu_before, begin = cpu_snapshot(), time.perf_counter()
            m = trainer.train_step(items)
            wall = time.perf_counter() - begin
            busy = others_cores(cpu_before, cpu_snapshot(), wall)
            forwards = counter.take()
            rows = []
            if samples.exists():
                rows = [json.loads(line) for line in samples.read_text().splitlines()]
            teacher_tokens = [
                len(chat_prompt_ids(trainer.tokenizer, [{"role": "user", "content": r["teacher_prompt"]}],
                                    cfg.max_teacher_prompt_tokens))
                for r in rows if r["step"] == m["step"] and r["teacher_prompt"]
            ]  # fmt: skip
            phases = {p: float(m[f"time_{p}"]) for p in PHASES if p != "other"}
            counters = ("reflection_parse_failures", "curation_parse_failures", "ops_applied",
                        "ops_skipped")  # fmt: skip
            step = {
                "index": index,
                "warmup": index == 0,
                **phases,
                "other": max(wall - sum(phases.values()), 0.0),
                "step": wall,
                "trainer_time_step": m["time_step"],
                "others_cores": busy,
                "quiet_wait_s": waited,
                "rollouts": len(items) * n,
                "completion_tokens_mean": m["response_tokens"],
                "teacher_prompt_tokens_mean": (
                    statistics.mean(teacher_tokens)
                    if teacher_tokens and algorithm != "grpo"
                    else None
                ),
                "distilled": m["distilled"],
                "reflections": m["reflections"],
                "success_rate": m["success_rate"],
                "truncated": m["truncated"],
                "playbook_size": m["playbook_size"],
                **{c: m[c] for c in counters if c in m},
                "forwards": {
                    "sampling": forwards.get("sampler", 0) + forwards.get("student_nograd", 0),
                    "teacher": forwards.get("teacher", 0),
                    "student_grad": forwards.get("student_grad", 0),
                },
            }
            steps.append(step)
            print(f"  [{algorithm}] step {index}{' (warm-up)' if index == 0 else ''}: "
                  f"{wall:.2f}s  " + " ".join(f"{p}={step[p]:.2f}" for p in PHASES), flush=True)  # fmt: skip
    finally:
        counter.close()
        del trainer
        gc.collect()
    return {
        "implementation": "resd.training.trainer.Trainer.train_step",
        "algorithm": algorithm,
        "n": n,
        "rollouts_per_step": args.batch_size * n,
        "prompts_per_step": args.batch_size,
        "setup_s": setup,
        "settings": {
            "generation_dtype": cfg.generation_dtype,
            "dtype": cfg.dtype,
            "autocast": cfg.autocast,
            "micro_batch_size": cfg.micro_batch_size,
            "generation_batch_size": cfg.generation_batch_size,
            "max_new_tokens": cfg.max_new_tokens,
            "min_new_tokens": cfg.min_new_tokens,
            "reflection_max_new_tokens": cfg.reflection_max_new_tokens,
            "curation_max_new_tokens": cfg.curation_max_new_tokens,
            "max_reflections_per_step": cfg.max_reflections_per_step,
            "teacher": cfg.teacher,
            "distillation_mode": cfg.distillation_mode,
            "topk": cfg.topk,
        },
        "steps": steps,
    }


# ---- TRL -------------------------------------------------------------------------------
def _bf16_supported() -> bool:
    import torch

    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except Exception:
        return False


class _Clock:
    """Phase seconds accumulated by method wrappers, cut into optimizer steps by callbacks.

    Step k's interval runs from `starts[k]` to `ends[k]` (its `on_step_end`). The first
    step starts at its `on_step_begin`; every later one starts right where the previous
    one's `on_step_end` callback returned, so the time the Trainer spends between optimizer
    steps (logging, fetching the next batch) is counted. Only the optional wait for a quiet
    machine, done inside that callback, is left out.
    """

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.extra: dict[str, list[float]] = defaultdict(list)
        self.begins: list[float] = []  # on_step_begin
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.cpu_starts: list[tuple[float, float]] = []
        self.cpu_ends: list[tuple[float, float]] = []
        self.waits: list[float] = []
        self.per_step: list[dict[str, Any]] = []
        self.counter = ForwardCounter()

    def start(self, quiet_wait: float) -> None:
        self.waits.append(wait_for_quiet(quiet_wait))
        self.cpu_starts.append(cpu_snapshot())
        self.starts.append(time.perf_counter())

    def wrap(self, fn: Callable, phase: str | Callable[..., str | None]) -> Callable:
        def timed(*a, **k):
            name = phase(*a, **k) if callable(phase) else phase
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if name:
                    self.current[name] += time.perf_counter() - start

        return timed


def _make_callback(clock: _Clock, quiet_wait: float):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not clock.starts:
                clock.start(quiet_wait)
            clock.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock.ends.append(time.perf_counter())
            clock.cpu_ends.append(cpu_snapshot())
            clock.per_step.append(
                {
                    "phases": dict(clock.current),
                    "extra": {k: list(v) for k, v in clock.extra.items()},
                    "forwards": clock.counter.take(),
                }
            )
            clock.current.clear()
            clock.extra.clear()
            if state.global_step < state.max_steps:
                clock.start(quiet_wait)

    return StepClock()


def run_trl(kind: str, args, model_name: str, batches, workdir: Path, cfg) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from resd.analysis.evaluation import safe_score
    from resd.envs import make_env
    from resd.generation.hf import eos_token_ids
    from resd.models import resolve_model_path

    n = rollouts_per_prompt(kind, args.grpo_n)
    path = resolve_model_path(model_name)  # the bundled alias -> its cached safetensors folder
    env = make_env(cfg.env, cfg.env_args)
    items = {it.id: it for batch in batches for it in batch}
    rows = [{"prompt": it.messages, "item_id": it.id} for batch in batches for it in batch]
    clock = _Clock()
    feedback: list[str] = []

    def arithmetic_reward(prompts, completions, completion_ids, item_id, **kwargs):
        """Our environment's `score`: reward for TRL, feedback kept for the SDPO teacher."""
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scores = [safe_score(env, items[i], t) for i, t in zip(item_id, texts, strict=True)]
        feedback[:] = [s.feedback for s in scores]
        clock.extra["completion_tokens"].extend(len(ids) for ids in completion_ids)
        clock.extra["truncated"].extend(
            float(len(ids) >= args.max_new_tokens and ids[-1] not in eos) for ids in completion_ids
        )
        clock.extra["reward"].extend(s.reward for s in scores)
        return [s.reward for s in scores]

    bf16 = cfg.autocast not in (None, "none", "off") and _bf16_supported()
    common = {
        "output_dir": str(workdir / kind),
        "per_device_train_batch_size": args.batch_size,  # = our micro_batch_size
        "gradient_accumulation_steps": n,  # one optimizer step = batch_size prompts x n
        "max_steps": len(batches),
        "learning_rate": cfg.lr,
        "lr_scheduler_type": "constant",
        "weight_decay": cfg.weight_decay,
        "adam_beta1": cfg.adam_beta1,
        "adam_beta2": cfg.adam_beta2,
        "max_grad_norm": cfg.max_grad_norm,
        "seed": cfg.seed,
        "bf16": bf16,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "shuffle_dataset": False,
        "num_generations": n,
        "max_completion_length": args.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": 0,
        "use_vllm": False,
        # equal work: every completion runs to max_completion_length, EOS held back
        **(
            {"generation_kwargs": {"min_new_tokens": args.max_new_tokens}}
            if args.fixed_length
            else {}
        ),
    }
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = set(eos_token_ids(model, tokenizer))
    dataset = Dataset.from_list(rows)

    def build_trl_trainer(trainer_cls, config, model=model):
        return trainer_cls(
            model=model,
            reward_funcs=arithmetic_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    start = time.perf_counter()
    if kind == "trl_sdpo":
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        mode = {"topk": "topk_logits", "full": "full_logits", "sampled": "sampled_token"}
        config = SDPOConfig(
            **common,
            distillation_weight=1.0,
            distillation_mode=mode[cfg.distillation_mode],
            distillation_topk=cfg.topk if cfg.distillation_mode == "topk" else None,
            distillation_add_tail=cfg.add_tail,
            distillation_alpha=cfg.alpha,
            distillation_is_clip=cfg.is_clip,
            teacher_model_kind=cfg.teacher,
            teacher_update_rate=cfg.teacher_update_rate,
            include_environment_feedback=True,
            use_successful_as_teacher=True,  # a successful sibling: none exists at N = 1
            dont_reprompt_on_self_success=True,  # our `sdpo`: no distillation on own successes
            success_reward_threshold=1.0,
            max_prompt_length=cfg.max_prompt_tokens,
        )
        trainer = build_trl_trainer(SDPOTrainer, config)
        # TRL reads privileged context from a static dataset column; our environment's
        # feedback depends on the rollout, so hand the teacher-context builder the
        # feedback the reward function just computed for these very rollouts.
        builder = trainer.teacher_context_builder
        original_build = builder.build

        def build(output, prompts, rewards, feedbacks=None):
            if len(feedback) != len(prompts):
                raise RuntimeError("feedback/prompt count mismatch in the SDPO benchmark hook")
            out = original_build(output, prompts, rewards, feedbacks=list(feedback))
            width = out["teacher_attention_mask"].sum(1) - output["completion_mask"].sum(1)
            clock.extra["teacher_prompt_tokens"].extend(width.tolist())
            clock.extra["distilled"].append(float(out["self_distillation_mask"].sum()))
            return out

        builder.build = clock.wrap(build, "other")
        trainer.sample_rollouts = clock.wrap(trainer.sample_rollouts, "rollout")
        teacher = trainer.teacher_model

        def forward_phase(*a, **k):
            model_arg = k.get("model", a[0] if a else None)
            return "teacher" if model_arg is teacher else None

        trainer._forward_logits = clock.wrap(trainer._forward_logits, forward_phase)
        clock.counter.watch(teacher, "teacher")
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(
            **common,
            beta=cfg.kl_coef,
            epsilon=cfg.pg_clip_low,
            epsilon_high=cfg.pg_clip_high,
            scale_rewards="group" if cfg.pg_scale_std else "none",
            loss_type="dapo",  # token-mean over the whole accumulated batch, like ours
        )
        trainer = build_trl_trainer(GRPOTrainer, config)
        trainer._generate = clock.wrap(trainer._generate, "rollout")
    trainer._calculate_rewards = clock.wrap(trainer._calculate_rewards, "feedback")
    trainer._prepare_inputs = clock.wrap(trainer._prepare_inputs, "_prepare")
    clock.counter.watch(trainer.model, "student", split_by_grad=True)
    trainer.add_callback(
        _make_callback(clock, args.quiet_wait)
    )  # last: its on_step_end follows the EMA sync
    setup = time.perf_counter() - start

    try:
        trainer.train()
    finally:
        clock.counter.close()
    steps = []
    for index, record in enumerate(clock.per_step):
        ph = record["phases"]
        wall = clock.ends[index] - clock.starts[index]
        prepare = ph.get("_prepare", 0.0)
        named_in_prepare = ph.get("rollout", 0.0) + ph.get("feedback", 0.0) + ph.get("other", 0.0)
        phases = {
            "rollout": ph.get("rollout", 0.0),
            "feedback": ph.get("feedback", 0.0),
            "reflect": 0.0,
            "curate": 0.0,
            "teacher": ph.get("teacher", 0.0),
            # batch preparation outside sampling/scoring (advantages, padding, metrics)
            # plus the SDPO teacher-prompt build
            "other": ph.get("other", 0.0) + max(prepare - named_in_prepare, 0.0),
        }
        phases["update"] = max(wall - prepare - phases["teacher"], 0.0)
        extra, fw = record["extra"], record["forwards"]
        steps.append(
            {
                "index": index,
                "warmup": index == 0,
                **phases,
                "step": wall,
                "step_begin_to_end": clock.ends[index] - clock.begins[index],
                "others_cores": others_cores(clock.cpu_starts[index], clock.cpu_ends[index], wall),
                "quiet_wait_s": clock.waits[index],
                "rollouts": args.batch_size * n,
                "completion_tokens_mean": _mean(extra.get("completion_tokens")),
                "teacher_prompt_tokens_mean": _mean(extra.get("teacher_prompt_tokens")),
                "distilled": sum(extra.get("distilled", [])) if kind == "trl_sdpo" else 0,
                "success_rate": _mean(extra.get("reward")),
                "truncated": _mean(extra.get("truncated")),
                "forwards": {
                    "sampling": fw.get("student_nograd", 0),
                    "teacher": fw.get("teacher", 0),
                    "student_grad": fw.get("student_grad", 0),
                },
            }
        )
        print(f"  [{kind}] step {index}{' (warm-up)' if index == 0 else ''}: {wall:.2f}s  "
              + " ".join(f"{p}={phases[p]:.2f}" for p in PHASES), flush=True)  # fmt: skip
    if kind == "trl_sdpo":
        specific = {"distillation_mode": config.distillation_mode, "topk": config.distillation_topk,
                    "teacher": config.teacher_model_kind}  # fmt: skip
    else:
        specific = {"loss_type": config.loss_type, "beta": config.beta}
    del trainer, model
    gc.collect()
    return {
        "implementation": "trl.experimental.sdpo.SDPOTrainer"
        if kind == "trl_sdpo"
        else "trl.GRPOTrainer",
        "algorithm": kind,
        "n": n,
        "rollouts_per_step": args.batch_size * n,
        "prompts_per_step": args.batch_size,
        "setup_s": setup,
        "settings": {
            "bf16_autocast": bf16,
            "weights": "float32",
            "per_device_train_batch_size": args.batch_size,
            "gradient_accumulation_steps": n,
            "generation_batch_size": config.generation_batch_size,
            **specific,
        },
        "steps": steps,
    }


def _mean(values) -> float | None:
    return statistics.mean(values) if values else None


# ---- report ----------------------------------------------------------------------------
def summarize(results: dict[str, dict[str, Any]]) -> None:
    for res in results.values():
        if "steps" not in res:
            continue
        timed = [s for s in res["steps"] if not s["warmup"]] or res["steps"]
        res["median"] = median_phases(timed)
        res["timed_steps"] = len(timed)
        tokens = [s["completion_tokens_mean"] for s in timed if s["completion_tokens_mean"]]
        res["completion_tokens_mean"] = _mean(tokens)
        teacher = [
            s["teacher_prompt_tokens_mean"] for s in timed if s["teacher_prompt_tokens_mean"]
        ]
        res["teacher_prompt_tokens_mean"] = _mean(teacher)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def step(name: str) -> float | None:
        return results.get(name, {}).get("median", {}).get("step")

    def div(a: str, b: str) -> float | None:
        x, y = step(a), step(b)
        return x / y if x and y else None

    return {
        "resd_over_sdpo": div("resd", "sdpo"),
        "sdpo_ss_over_sdpo": div("sdpo_ss", "sdpo"),
        "sdpo_over_trl_sdpo": div("sdpo", "trl_sdpo"),
        "grpo_over_trl_grpo": div("grpo", "trl_grpo"),
        "grpo_over_sdpo": div("grpo", "sdpo"),
    }


def table(results: dict[str, dict[str, Any]], grpo_n: int) -> str:
    heads = [
        "method",
        "N",
        "rollouts/step",
        "tok/rollout",
        *PHASES,
        "step s",
        "÷ sdpo",
        "÷ TRL same N",
        "others' cores",
    ]
    lines = []
    sdpo = results.get("sdpo", {}).get("median", {}).get("step")
    for name in ORDER:
        res = results.get(name)
        if res is None:
            continue
        if "median" not in res:
            lines.append([name, "", "", "", *["" for _ in PHASES], "FAILED", "", "", ""])
            continue
        med = res["median"]
        trl_peer = "trl_grpo" if res["n"] == grpo_n and grpo_n != 1 else "trl_sdpo"
        peer = results.get(trl_peer, {}).get("median", {}).get("step")
        label = {"trl_sdpo": "TRL SDPOTrainer", "trl_grpo": "TRL GRPOTrainer"}.get(name, name)
        tok = res.get("completion_tokens_mean")
        lines.append(
            [
                label,
                str(res["n"]),
                str(res["rollouts_per_step"]),
                f"{tok:.1f}" if tok else "-",
                *[f"{med[p]:.2f}" if med.get(p) else "-" for p in PHASES],
                f"{med['step']:.2f}",
                f"{med['step'] / sdpo:.2f}" if sdpo else "-",
                f"{med['step'] / peer:.2f}" if peer else "-",
                f"{med['others_cores']:.2f}",
            ]
        )
    widths = [
        max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(heads)
    ]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(heads), sep, *(fmt(r) for r in lines)])


# ---- main ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="rollout length (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after 1 warm-up step")
    p.add_argument("--methods", default=",".join(ORDER), help=f"comma-separated subset of {ORDER}")
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder or HF id")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"),
                   help="base TrainConfig for both implementations")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra TrainConfig override key=value (repeatable)")  # fmt: skip
    p.add_argument("--grpo-n", type=int, default=None, help="rollouts per prompt for GRPO (8)")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="shared machine: before each step wait up to this many seconds for other "
                   "processes to go idle (never inside a timed interval); 0 = off")  # fmt: skip
    p.add_argument("--skip-trl", action="store_true", help="only our trainer")
    p.add_argument("--fixed-length", action="store_true",
                   help="equal work: every rollout on both sides has exactly --max-new-tokens tokens (EOS held back)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny random local model, a few seconds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time.json"))
    args = p.parse_args(argv)
    defaults = SMOKE if args.smoke else {"batch_size": 4, "max_new_tokens": 64, "grpo_n": 8}
    for key in ("batch_size", "max_new_tokens", "grpo_n"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.smoke:
        args.overrides = [*SMOKE["overrides"], *args.overrides]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ORDER))
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {ORDER}")
    if args.skip_trl:
        methods = [m for m in methods if m not in TRL]
    args.methods = [m for m in ORDER if m in methods]
    if args.repeats < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or args.grpo_n < 2:
        p.error("--repeats, --batch-size, --max-new-tokens must be >= 1 and --grpo-n >= 2")
    return args


def machine() -> dict[str, Any]:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    with contextlib.suppress(OSError, StopIteration):
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return info


def resd_source() -> dict[str, Any]:
    """Which `resd` was measured: its path, and the git commit and state of its tree."""
    import subprocess

    import resd

    src = Path(resd.__file__).resolve().parent
    info: dict[str, Any] = {"path": str(src)}
    try:
        git = ["git", "-C", str(src)]
        info["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True,
                                        text=True, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        info["uncommitted_changes"] = [line[3:] for line in status.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:  # the installed (editable) package, or whatever PYTHONPATH puts first
        import resd  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))
    with tempfile.TemporaryDirectory(prefix="resd-step-time-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if args.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_tiny_model

            model = str(build_tiny_model(workdir / "tiny-model"))
        cfg = base_config(args, model)
        batches = prompt_batches(cfg, 1 + args.repeats)
        results: dict[str, dict[str, Any]] = {}
        loads = {"start": os.getloadavg()}
        started = time.perf_counter()
        for name in args.methods:
            print(f"== {name}", flush=True)
            load_before = os.getloadavg()
            try:
                if name in OURS:
                    results[name] = run_ours(name, args, model, batches, workdir)
                else:
                    results[name] = run_trl(name, args, model, batches, workdir, cfg)
            except Exception as exc:  # keep the other methods' numbers
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}", "n": 0}
            results[name]["loadavg_before"] = load_before
            results[name]["loadavg_after"] = os.getloadavg()
        loads["end"] = os.getloadavg()
    summarize(results)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
        "machine": machine(),
        "resd_source": resd_source(),
        "loadavg": loads,
        "total_s": time.perf_counter() - started,
        "settings": {
            "model": args.model if not args.smoke else "tiny random Llama (tests/conftest.py)",
            "config": str(args.config),
            "overrides": args.overrides,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "grpo_n": args.grpo_n,
            "repeats": args.repeats,
            "quiet_wait_s": args.quiet_wait,
            "warmup_steps": 1,
            "statistic": "median over timed steps",
            "env": cfg.env,
            "env_args": cfg.env_args,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "prompts": [[it.id for it in b] for b in batches],
        },
        "methods": results,
        "ratios": ratios(results),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    r = report["ratios"]
    print()
    print(f"results: {out}")
    for key, goal in (("resd_over_sdpo", 1.3), ("sdpo_over_trl_sdpo", 1.0)):
        if r.get(key) is not None:
            print(f"{key}: {r[key]:.2f} (goal <= {goal})")
    print()
    print(table(results, args.grpo_n))
    failed = [n for n, res in results.items() if "error" in res]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    report["failed"] = failed
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
