"""Run configuration: one flat dataclass, loaded from YAML and `key=value` overrides.

Every field can be set in the YAML file or on the command line (`lr=1e-5`,
`env_args.path=data.jsonl`). Unknown keys and values of the wrong type stop the run
before anything is loaded, with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resd.templating import read_text_file

# The choices of the fields that take one: the one list, also checked by the modules that
# receive these values from Python (the teacher, the playbook, model loading).
TEACHER_KINDS = ("ema", "base", "live", "trust_region")
PRUNE_POLICIES = ("staleness", "random")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
CHOICES: dict[str, tuple] = {
    "teacher": TEACHER_KINDS,
    "playbook_policy": PRUNE_POLICIES,
    "distillation_mode": ("topk", "full", "sampled"),
    "pg_reward": ("reward", "score"),
    "dtype": DTYPE_NAMES,
    "generation_dtype": ("auto", *DTYPE_NAMES, "int8", None),
    "autocast": ("auto", "none", *DTYPE_NAMES, None),
    "generation_backend": ("transformers", "vllm"),
    "generation_cache": (None, "static"),
    "strategy": ("auto", "ddp", "fsdp", "deepspeed"),
    "zero_stage": (None, 1, 2, 3),
    "structured_output": ("auto", "on", "off"),
    "loss_aggregation": ("token_mean", "seq_mean_token_mean"),
    "curation_ops": ("all", "add"),
    "lesson_calls": ("two", "one"),
    "reflection_layout": ("prompt", "conversation"),
    "unparsed_reflection": ("drop", "raw"),
    "solution_buffer_keep": ("first", "latest"),
    "lr_scheduler_type": (
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
    ),
}


# The arguments `apply_chat_template` gets from resd itself (`generation.hf.render_chat`).
RENDER_KEYS = {"conversation", "messages", "add_generation_prompt", "tokenize", "return_dict",
               "continue_final_message", "chat_template"}  # fmt: skip
HUB_ID = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")


class ConfigError(ValueError):
    """A configuration problem; the message always starts with the field's name."""


@dataclass
class TrainConfig:
    # model
    model: str = "smollm2-135m"  # HF id, local folder, or a bundled alias
    dtype: str = "float32"  # weights: float32 master weights
    # bf16 autocast for forwards; auto: only where bf16 is fast on the device ("none" or
    # off to disable; YAML reads a bare off as false)
    autocast: str | bool | None = "auto"
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda, cuda:1, ...
    # Passed to `from_pretrained` for the model (and, for the keys that apply, the
    # tokenizer): {revision: main, trust_remote_code: true, attn_implementation: sdpa, ...}.
    model_init_kwargs: dict[str, Any] = field(default_factory=dict)
    # Recompute activations in the backward pass: less memory for long replies, ~30% slower.
    gradient_checkpointing: bool = False
    # A Jinja chat template (or a path to one) for tokenizers that have none, or to
    # replace theirs; and extra variables every template call receives, such as
    # {enable_thinking: false} for Qwen3. Templates that refuse a system message (Gemma)
    # get its text at the top of the first user message instead.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # task
    env: str = "arithmetic"  # built-in name or "package.module:Class"
    env_args: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "resd"
    # schedule (the paper's streaming protocol): batches of prompts, K inner on-policy updates each
    steps: int | None = None  # cap on optimizer steps; null = every pass over the train items
    # Passes over the training items (the paper streams them once); each pass is shuffled
    # on its own when `shuffle` is on. More than one: learning a small fixed set, as the demo does.
    epochs: int = 1
    batch_size: int = 8
    rollouts_per_prompt: int = 1
    inner_updates: int = 4
    micro_batch_size: int = 4  # sequences per forward/backward
    # Run a micro-batch's rows as one row, the prompt they share computed once and no
    # padding, where that costs fewer multiply-adds (`resd.training.packing`); the same
    # values up to rounding.
    pack_rows: bool = True
    # CPU training under glibc: memory a step frees stays in the process for the next step
    # instead of going back to the kernel, so its pages are not faulted in afresh every step
    # (`resd.allocator`). The process then holds on to its peak.
    keep_host_memory: bool = True
    generation_batch_size: int = 16
    # Sampling runs on a copy of the policy in this dtype, synced after every optimizer
    # step (as a vLLM engine would be); null samples from the fp32 training weights. auto:
    # bfloat16 where the device has fast bf16 kernels (GPUs, CPUs with AVX512-BF16 or AMX),
    # else null, since a CPU that emulates bf16 runs it slower than fp32
    # (`resd.models.fast_bfloat16`).
    # int8 (CPU, transformers backend): the copy keeps the training dtype and adds int8
    # weights that decode steps read, 2-3x faster there (`resd.generation.int8`).
    generation_dtype: str | None = "auto"
    # Who samples: "transformers" (HF generate on that copy) or "vllm" (`pip install
    # resd[vllm]`, GPU only; weights pushed to the engine after every optimizer step).
    generation_backend: str = "transformers"
    # transformers backend on GPU: a pre-allocated KV cache ("static") lets `torch.compile`
    # capture the decode step once; both only pay off for long, repeated decoding.
    generation_cache: str | None = None  # null = dynamic cache | static
    generation_compile: bool = False
    vllm_args: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM(...)
    shuffle: bool = True
    # sampling
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 128
    # Rollouts only: EOS is kept out of the first min_new_tokens tokens. Equal to
    # max_new_tokens it fixes every reply's length: the step-time benchmark's equal-work mode.
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    # 0 = off. Rollouts and the lesson passes apply them in transformers' order: temperature,
    # top_k, top_p, then min_p (a token stays if its probability is at least min_p × the top
    # token's). Evaluation has its own: eval_temperature, eval_top_p, eval_top_k, eval_min_p.
    top_k: int = 0
    min_p: float = 0.0
    # optimizer
    lr: float = 1e-6
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # Steps of linear warm-up; a number below 1 is a fraction of the run's steps, rounded
    # up (as transformers' and TRL's warmup_steps: 0.1; warmup_ratio is read the same way).
    warmup_steps: int | float = 10
    # transformers.get_scheduler's names: constant_with_warmup (the paper's), linear, cosine,
    # cosine_with_restarts, polynomial, constant (no warm-up); decays run to the last step.
    lr_scheduler_type: str = "constant_with_warmup"
    max_grad_norm: float | None = 1.0  # 0 or null: no clipping (as in transformers)
    # self-distillation loss (student vs teacher on the student's own tokens)
    alpha: float = 1.0  # 0 forward KL, 1 reverse KL, between: JSD
    topk: int | None = 100  # null = full vocabulary
    add_tail: bool = True
    min_ratio: float | None = 0.2
    max_ratio: float | None = None
    success_weighting: bool = False
    success_weight_alpha: float = 1.0
    success_weight_beta: float = 1.0
    distillation_mode: str = "topk"  # topk (see topk/add_tail) | full | sampled
    # How token losses become the batch loss. token_mean: one mean over every distilled
    # token of the batch (long replies weigh more). seq_mean_token_mean: the mean over the
    # batch's sequences of each sequence's own token mean, undistilled rows counting zero
    # (what the release computes, training one sequence per micro-batch). Either is the
    # same number at any micro-batch size and number of processes.
    loss_aggregation: str = "token_mean"
    distillation_weight: float | None = None  # λ in (1 − λ)·PG + λ·SD; null = the algorithm's
    # Apply the output head to this many positions at a time (activation-checkpointed), so
    # full-vocabulary logits of the batch never exist at once; null = one pass.
    loss_chunk_size: int | None = None
    is_clip: float | None = 2.0  # per-token importance weight cap against the rollout policy
    # Rollout correction: weight each token's loss by min(π_trainer / π_sampler, cap), the
    # sampler being the bf16 copy (or vLLM) that drew it; null = off (the release: 2). The
    # mean |log π_trainer − log π_sampler| is logged every step either way.
    rollout_is_cap: float | None = None
    update_epochs: int = 1  # optimizer passes over one batch of rollouts
    teacher: str = "ema"  # ema | base | live | trust_region
    teacher_update_rate: float = 1e-4
    trust_region_weight: float = 0.5  # trust_region teacher: (1 − w)·base + w·current logits
    # policy gradient (grpo, or any algorithm with distillation_weight < 1)
    pg_reward: str = "reward"  # reward (0/1) | score (partial credit)
    pg_scale_std: bool = True
    pg_clip_low: float = 0.2
    pg_clip_high: float = 0.28
    kl_coef: float = 0.0  # k3 KL to the initial model
    # LoRA: any peft.LoraConfig field ({r: 16, lora_alpha: 32, target_modules: [q_proj, v_proj],
    # lora_dropout: 0.0, ...}; `alpha` and `dropout` are short for lora_alpha and lora_dropout).
    # Defaults: r 16, lora_alpha 32, every linear layer. The EMA teacher is a second adapter.
    lora: dict[str, Any] | None = None
    # Lessons from another model: {base_url, model, api_key_env, timeout, max_concurrency,
    # temperature} of an OpenAI-compatible server (vLLM, `resd serve`, a hosted API) that
    # then writes the reflections, tags and curations. null = the policy reflects itself.
    reflector: dict[str, Any] | None = None
    student_playbook: bool = False  # also show the playbook in the student's own prompt
    teacher_template: str | None = None  # file path or literal template; null = generic
    max_teacher_prompt_tokens: int = 3072
    # Task, attempt, feedback, reflection and solution are each clipped to this many tokens
    # in reflection, curation and teacher prompts (null = never clipped).
    slot_max_tokens: int | None = 1024
    # reflection and curation (the student studying its own failures)
    reflection_max_new_tokens: int = 256
    curation_max_new_tokens: int = 256
    # Bound a step's reflection cost: that many failures, each task's first before any
    # task's second (null = every failure).
    max_reflections_per_step: int | None = None
    # An unparsable reflection: "drop" it, or hand the raw reply (thinking removed) on to
    # the curator and the teacher, as the release does ("raw").
    unparsed_reflection: str = "drop"
    # Which operations the curator may propose: "all" (ADD, UPDATE, MERGE, DELETE) or
    # "add" (the release's curator only adds).
    curation_ops: str = "all"
    # Under structured output, the curator must propose at least this many operations
    # (0: it may propose none, as in the release).
    curation_min_operations: int = 0
    # two: reflect, then curate (the release); one: the reflector's reply also holds the
    # playbook operations, which saves the curator's generation pass.
    lesson_calls: str = "two"
    # How the reflector is shown an attempt: "prompt" = one user message quoting the task
    # and the attempt (the release); "conversation" = the rollout's own conversation (task,
    # the attempt as the assistant's turn) continued by a user turn asking for the
    # diagnosis, so the prompt begins with the rollout's tokens and the transformers
    # backend reuses their keys and values instead of prefilling them again (vLLM's prefix
    # cache does the same). Success tagging follows the same layout.
    reflection_layout: str = "prompt"
    # Decode reflection, tagging and curation replies under a JSON schema (live entry ids,
    # the seven sections, one shape per operation), so every reply is valid JSON by
    # construction: "auto" = on where the grammar library is installed (xgrammar for the
    # transformers backend; vLLM has its own), "on" = required, "off" = free text + parsers.
    structured_output: str | bool = "auto"  # YAML reads bare on/off as true/false
    # Text that opens the reflector's / curator's answer. null = none under structured
    # output, else a JSON opener so small models start inside the object instead of
    # chatting; "" = none (e.g. for models that must think first).
    reflection_prefill: str | None = None
    curation_prefill: str | None = None
    # playbook (the global memory of lessons)
    playbook_init: str | None = None  # playbook.md / playbook.json to start from
    playbook_max_entries: int = 120  # M_max
    # Skip a lesson whose words overlap an existing entry's this much (Jaccard of word
    # sets) as `near_duplicate`: a small curator that reads the playbook rewrites it in
    # paraphrases (docs/results.md, section 3). null = skip exact duplicates only.
    playbook_similarity: float | None = 0.6
    playbook_prune_every: int = 4  # F
    # staleness: drop harmful and stale unused entries, then the longest unused; random: drop
    # every unused and harmful entry, then random helpful ones (the paper's "prioritized")
    playbook_policy: str = "staleness"
    # Token budgets of the playbook as each reader sees it (null = the whole playbook). Over
    # budget, whole entries are left out, least proven first, and counted per step.
    reflection_playbook_tokens: int | None = 2048  # the reflector and the success tagger
    curation_playbook_tokens: int | None = 2048
    teacher_playbook_tokens: int | None = 1024  # also the student's, with student_playbook
    # The solution buffer keeps each prompt's "first" success, or the "latest" (the release).
    solution_buffer_keep: str = "first"
    # When the teacher sees a successful solution, also show it the environment's feedback
    # (true) or not (false: the release drops the feedback then).
    teacher_feedback_with_solution: bool = True
    # evaluation
    eval_every: int = 0  # 0 = only before and after training
    eval_samples: int = 4
    eval_items: int | None = None  # null = whole test split
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_top_k: int = 0  # 0 = off, as top_k
    eval_min_p: float = 0.0  # 0 = off, as min_p
    eval_max_new_tokens: int | None = None  # null = max_new_tokens
    # End the run early on its evaluations (eval_every > 0): {metric: case_mean@k,
    # patience: 3, min_delta: 0.0, target: null} stops after `patience` evaluations without
    # a gain above min_delta, or once the metric reaches `target`. null = run to the end.
    early_stopping: dict[str, Any] | None = None
    # run directory
    seed: int = 0
    output_dir: str = "runs/resd"
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    # After training, push output_dir's model, tokenizer and model card to the Hub as
    # hub_model_id (default: the folder's name); needs a token (`huggingface-cli login`).
    push_to_hub: bool = False
    hub_model_id: str | None = None
    log_samples: int = 4  # rollouts per step written to samples.jsonl
    progress: bool = True
    # Data parallelism under `accelerate launch` / `torchrun`: "ddp" keeps a full replica
    # per process; "fsdp" shards parameters, gradients and optimizer state (FSDP2, like
    # ZeRO-3); "deepspeed" hands policy and optimizer to DeepSpeed ZeRO (`zero_stage`);
    # "auto" follows accelerate's config. See docs/scaling.md.
    strategy: str = "auto"
    # fsdp: false keeps each layer gathered from forward to backward (fewer gathers)
    fsdp_reshard_after_forward: bool = True
    zero_stage: int | None = None  # deepspeed: 1, 2 or 3; null = accelerate's config, else 2
    # Mirror numeric metrics to experiment trackers (metrics.jsonl stays the record):
    # any of "tensorboard", "wandb"; needs `pip install resd[logging]`.
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Built in Python, a config meets none of the type checks a YAML file's values get
        # (`build_config`): `TrainConfig(lr="fast")` failed as "'<' not supported between
        # instances of 'str' and 'int'" just below, a wrong type elsewhere much later.
        for name, hint in _HINTS.items():
            setattr(self, name, recordable(check_type(name, getattr(self, name), hint), name))
        positive = ["batch_size", "rollouts_per_prompt", "inner_updates", "micro_batch_size",
                    "generation_batch_size", "max_new_tokens", "max_prompt_tokens", "eval_samples",
                    "reflection_max_new_tokens", "curation_max_new_tokens", "playbook_max_entries",
                    "playbook_prune_every", "keep_checkpoints", "update_epochs", "epochs"]  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens: must be in [0, max_new_tokens], got {self.min_new_tokens}"
            )
        if self.playbook_similarity is not None and not 0 < self.playbook_similarity <= 1:
            raise ConfigError(
                f"playbook_similarity: must be in (0, 1] or null, got {self.playbook_similarity}"
            )
        if self.curation_min_operations < 0:
            raise ConfigError(
                f"curation_min_operations: must be >= 0, got {self.curation_min_operations}"
            )
        for name in [
            "steps",
            "topk",
            "eval_items",
            "max_reflections_per_step",
            "eval_max_new_tokens",
            "slot_max_tokens",
            "reflection_playbook_tokens",
            "curation_playbook_tokens",
            "teacher_playbook_tokens",
            "loss_chunk_size",
            "max_teacher_prompt_tokens",
        ]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")
        for name in [
            "eval_every",
            "save_every",
            "warmup_steps",
            "log_samples",
            "lr",
            "weight_decay",
        ]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if isinstance(self.warmup_steps, float) and self.warmup_steps >= 1:
            raise ConfigError(
                f"warmup_steps: a number of steps is whole, a fraction of the run is below 1; "
                f"got {self.warmup_steps}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: must be in [0, 1], got {self.alpha}")
        for name in ["top_p", "eval_top_p"]:
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in (0, 1], got {getattr(self, name)}")
        for name in ["min_p", "eval_min_p"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1] (0: off), got {getattr(self, name)}")
        for name in ["top_k", "eval_top_k"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ["temperature", "eval_temperature"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ["teacher_update_rate", "trust_region_weight"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if isinstance(self.structured_output, bool):
            self.structured_output = "on" if self.structured_output else "off"
        if isinstance(self.autocast, bool) or self.autocast == "off":
            self.autocast = "bfloat16" if self.autocast is True else "none"
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError(
                f"max_grad_norm: must be >= 0 (0 or null: no clipping), got {self.max_grad_norm}"
            )
        if self.distillation_weight is not None and not 0.0 <= self.distillation_weight <= 1.0:
            raise ConfigError(
                f"distillation_weight: must be in [0, 1] or null, got {self.distillation_weight}"
            )
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef: must be >= 0, got {self.kl_coef}")
        for name in ["adam_beta1", "adam_beta2"]:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        check_device(self.device)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.lr_scheduler_type == "polynomial" and self.lr <= 1e-7:
            raise ConfigError(  # transformers refuses it too, but only at the first step
                "lr_scheduler_type: polynomial decays to transformers' lr_end of 1e-7, so it "
                f"needs lr > 1e-7, got lr={self.lr}"
            )
        if self.generation_compile and self.generation_cache != "static":
            raise ConfigError(
                "generation_compile: needs generation_cache: static (decoding is compiled "
                "against a pre-allocated cache)"
            )
        if self.generation_dtype == "int8" and self.generation_backend != "transformers":
            raise ConfigError(
                "generation_dtype: int8 is the transformers backend's CPU decoding; "
                f"the {self.generation_backend} backend samples in bfloat16 or float16"
            )
        for name in ["min_ratio", "max_ratio", "is_clip", "rollout_is_cap"]:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}: must be > 0 or null, got {value}")
        if (
            self.min_ratio is not None
            and self.max_ratio is not None
            and self.max_ratio < self.min_ratio
        ):
            raise ConfigError(
                f"max_ratio: must be >= min_ratio ({self.min_ratio}), got {self.max_ratio}"
            )
        if not 0.0 <= self.pg_clip_low <= 1.0 or self.pg_clip_high < 0:
            raise ConfigError(
                f"pg_clip_low, pg_clip_high: the ratio is clipped to [1 - low, 1 + high] "
                f"with 0 <= low <= 1 and high >= 0, got {self.pg_clip_low}, {self.pg_clip_high}"
            )
        for name in ["success_weight_alpha", "success_weight_beta"]:
            if getattr(self, name) < 0:  # below 0 the rarer outcome would weigh less
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        # Each step seeds torch with seed * 1_000_003 + step, which must fit in 64 bits
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")
        # AdamW's eps (1e-8) is 0 in float16: the first step divides 0 by 0
        if self.dtype == "float16":
            raise ConfigError(
                "dtype: float16 master weights are not supported (AdamW's update "
                "underflows to nan); keep float32, with bf16 autocast for speed"
            )
        reserved = sorted(set(self.chat_template_kwargs) & RENDER_KEYS)
        if reserved:
            raise ConfigError(
                f"chat_template_kwargs: {reserved[0]!r} is set by resd itself when it "
                "renders a prompt; only template variables belong here"
            )
        if (
            self.push_to_hub
            and self.hub_model_id is not None
            and not HUB_ID.fullmatch(self.hub_model_id)
        ):
            raise ConfigError(
                f"hub_model_id: expected 'name' or 'owner/name' of letters, digits, "
                f"'-', '_' and '.', got {self.hub_model_id!r}"
            )
        self.report_to = _check_report_to(self.report_to)
        if self.early_stopping is not None:
            from resd.training.callbacks import check_early_stopping

            problem = check_early_stopping(self.early_stopping)
            if problem is None and self.eval_every == 0:
                problem = "needs eval_every > 0: it reads the evaluations made during the run"
            if problem:
                raise ConfigError(f"early_stopping: {problem}")
        if self.lora is not None and (problem := check_lora(self.lora)):
            raise ConfigError(f"lora.{problem}")
        if self.reflector is not None:
            from resd.training.reflector import check_reflector

            problem = check_reflector(self.reflector)
            if problem:
                raise ConfigError(f"reflector: {problem}")
        owned = {"dtype": "dtype", "torch_dtype": "dtype", "device_map": "device / strategy",
                 "quantization_config": "a pre-quantized checkpoint (not supported)"}  # fmt: skip
        for key in self.model_init_kwargs:
            if key in owned:
                raise ConfigError(f"model_init_kwargs: {key!r} is set by {owned[key]}, not here")
        from resd.training.algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"algorithm: unknown {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}"
            )

    def warmup_step_count(self, total_steps: int) -> int:
        """`warmup_steps` as a number of steps in a run of `total_steps`."""
        if isinstance(self.warmup_steps, float):  # below 1: a fraction (__post_init__)
            return math.ceil(total_steps * self.warmup_steps)
        return self.warmup_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REPORT_TO = ("tensorboard", "wandb")


def _check_report_to(value: Any) -> list[str]:
    """`report_to=tensorboard` and `report_to=tensorboard,wandb` on the command line are
    strings; YAML gives a list. Either way the result is a list of known tracker names."""
    if (
        value is None or value == "none" or value == ["none"]
    ):  # transformers' spelling of "no tracker"
        return []
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"report_to: expected a list of tracker names, got {value!r}")
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker {unknown[0]!r}; choose from {REPORT_TO}")
    return list(dict.fromkeys(names))  # drop repeats, keep the order


_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def check_type(name: str, value: Any, hint: Any) -> Any:
    """Coerce what YAML gives into the field's declared type, or fail naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):  # lr: inf trains to NaN weights; null means "no limit"
            raise ConfigError(f"{name}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if isinstance(value, os.PathLike):  # a Path from Python; YAML-dumped as text
            return os.fspath(value)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def recordable(value: Any, where: str) -> Any:
    """`value` as config.yaml and a checkpoint's state.json record it: YAML's and JSON's
    own types. From Python, a Path is its text, a tuple or a set a list, a module-level
    function its import path ("module:function", which a scorer setting takes back); anything else is
    refused here, where it was a RepresenterError from the first write of config.yaml,
    after the model had loaded."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {key: recordable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (set, frozenset)):  # peft's target_modules, say: in a fixed order
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return [recordable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if callable(value) and _imports_back(value):
        return f"{value.__module__}:{value.__qualname__}"
    raise ConfigError(
        f"{where}: {type(value).__name__} {value!r:.60} cannot be recorded in the run's "
        "config.yaml (text, numbers, lists, mappings and a module-level function, as "
        "'module:function', can); an environment that needs it can be built in Python and "
        "passed as Trainer(cfg, env=...)"
    )


def _imports_back(function: Any) -> bool:
    """Whether `module:qualname` names `function` itself (not a lambda or a nested one)."""
    import importlib

    try:
        found: Any = importlib.import_module(function.__module__)
        for part in function.__qualname__.split("."):
            found = getattr(found, part)
    except (AttributeError, ImportError, TypeError, ValueError):
        return False
    return found is function


def _parse_scalar(text: str) -> Any:
    """Command-line values are YAML scalars: `1e-5`, `true`, `null`, `[a, b]`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 1e-5 as a string; numbers without a dot are still numbers to us.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`data` with the command line's `key=value` overrides applied (dotted keys reach into
    mappings). An override replaces the file's setting under either of its names (TRL's
    `max_steps=` replaces a file's `steps:`), and one that switches `env` to another
    environment drops the file's `env_args`, which were written for the file's own."""
    data = dict(data)
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides take the form key=value")
        key, _, raw = item.partition("=")
        # `=5` and `env_args.=1` set a key named "", which surfaced later, if at all, as
        # ": unknown config key" or as an environment argument nobody could have meant
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"{item}: overrides take the form key=value, a dotted key "
                              "without empty parts (env_args.n_train=8)")  # fmt: skip
        pairs.append((key.strip(), raw))
    for key, raw in pairs:
        if key == "env" and data.get("env", TrainConfig.env) != _parse_scalar(raw):
            data.pop("env_args", None)
        data.pop(_OTHER_NAME.get(key, ""), None)
    for key, raw in pairs:
        parts = [part.strip() for part in key.split(".")]  # `env_args. n=1` sets n
        target = data
        for part in parts[:-1]:
            nested = target.get(part)
            target[part] = dict(nested) if isinstance(nested, dict) else {}
            target = target[part]
        target[parts[-1]] = _parse_scalar(raw)
    return data


def env_arg_overrides(env_args: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`env_args` with an environment's `key=value` arguments applied, as `resd env-check`
    and `resd eval` take them; `env_args.key=value`, as `resd train` takes the same
    argument, means the same."""
    return apply_overrides(env_args, [item.removeprefix("env_args.") for item in overrides])


# TRL's names for the same settings, accepted as aliases; a saved config holds ours.
# (TRL's per_device_train_batch_size counts sequences per forward/backward pass: our
# micro_batch_size; our batch_size is prompts per step over all processes.)
ALIASES = {
    "learning_rate": "lr",
    "num_generations": "rollouts_per_prompt",
    "max_completion_length": "max_new_tokens",
    "max_prompt_length": "max_prompt_tokens",
    "max_steps": "steps",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "per_device_train_batch_size": "micro_batch_size",
    "beta": "kl_coef",
    "num_iterations": "update_epochs",
    "num_train_epochs": "epochs",
    "warmup_ratio": "warmup_steps",  # a fraction below 1 (checked in canonical_keys)
    "epsilon": "pg_clip_low",  # without epsilon_high, also the upper bound (as in TRL)
    "epsilon_high": "pg_clip_high",
    "eval_steps": "eval_every",
    "shuffle_dataset": "shuffle",
}
# A setting's one name → its other one (TRL's ↔ ours), for overrides that replace it.
_OTHER_NAME = {
    **ALIASES,
    **{name: alias for alias, name in ALIASES.items()},
}


# TRL / transformers settings with no key of their own here: what does their job instead,
# so a config brought over from TRL stops with a pointer, not just "unknown".
TRL_INSTEAD = {
    **dict.fromkeys(("bf16", "fp16", "tf32"), "precision is `dtype` (master weights) and "
                    "`autocast` (auto: bf16 wherever the device runs it fast)"),
    "logging_steps": "every step is logged, to metrics.jsonl and the `report_to` trackers",
    "gradient_accumulation_steps": "one optimizer step takes the whole batch (`batch_size` "
                                   "prompts × `rollouts_per_prompt`), `micro_batch_size` rows at a time",
    "use_vllm": "set `generation_backend: vllm`",
    **dict.fromkeys(("vllm_mode", "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size"),
                    "vLLM's own arguments go in `vllm_args`"),
    "scale_rewards": "`pg_scale_std`: true divides by the group's std, false does not",
    "loss_type": "`loss_aggregation`: token_mean or seq_mean_token_mean",
    **dict.fromkeys(("eval_strategy", "save_strategy"), "`eval_every` / `save_every` count "
                    "steps (0: only at the end)"),
    "logging_dir": "TensorBoard writes into `output_dir`/tensorboard",
    "run_name": "`output_dir` names the run",
    **dict.fromkeys(("log_completions", "num_completions_to_print"),
                    "`log_samples` rollouts a step go to samples.jsonl"),
    "reward_weights": "a dataset's reward functions are a list in `env_args.scorer`, their "
                      "weights `env_args.scorer_weights`",
    "repetition_penalty": "rollouts sample with `temperature`, `top_p`, `top_k` and `min_p` alone",
    "generation_kwargs": "sampling is set by `temperature`, `top_p`, `top_k`, `min_p`, "
                         "`max_new_tokens` and `min_new_tokens`",
    "cache_implementation": "`generation_cache: static` pre-allocates the KV cache",
    "metric_for_best_model": "`early_stopping: {metric: ...}` names the evaluation metric "
                             "that may end a run",
    "greater_is_better": "every evaluation metric here is an accuracy: higher is better "
                         "(`early_stopping`)",
    "load_best_model_at_end": "a run keeps its last model; `early_stopping` ends it when "
                              "evaluations stop improving, and each checkpoint "
                              "(`save_every`, `keep_checkpoints`) loads as a model",
}  # fmt: skip


def _is_fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1


def canonical_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Rename TRL-style keys to ours; a key given under both names is an error."""
    out = dict(data)
    if "epsilon" in out and not {"epsilon_high", "pg_clip_high"} & set(out):
        out["epsilon_high"] = out["epsilon"]  # TRL's upper clip defaults to its lower one
    for alias, name in ALIASES.items():
        if alias not in out:
            continue
        if alias == "warmup_ratio" and not _is_fraction(out[alias]):
            raise ConfigError(f"warmup_ratio: expected a fraction of the run in [0, 1), got "
                              f"{out[alias]!r} (a number of steps is warmup_steps)")  # fmt: skip
        if name in out:
            raise ConfigError(f"{alias}: given together with {name}, which is the same setting")
        out[name] = out.pop(alias)
    return out


# Short names beside PEFT's own (torchtune's `lora_rank` too).
SHORT_LORA_KEYS = {"alpha": "lora_alpha", "dropout": "lora_dropout", "rank": "r", "lora_rank": "r"}


def first_line(message: object) -> str:
    """The first line of an error's message, for ours, which are one line: some libraries'
    run to a page (torch.load's UnpicklingError) or end in a footer (SQLAlchemy's)."""
    return next(iter(str(message).strip().splitlines()), "")


def yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: its problem and where ("could not find expected ':' at
    line 5, column 1"). Its message runs to five lines with a snippet and a caret, of which
    the first is the context ("while scanning a simple key"), not the problem."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return first_line(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def check_device(device: str, what: str = "device") -> None:
    """`auto` or a device that training and sampling run on. torch.device alone takes more
    (`meta`, `vulkan`, ...), on which the first sampling step fails far from the setting,
    and it refuses an empty string or a typo with a RuntimeError that names no option."""
    if device != "auto" and not re.fullmatch(r"(cpu|cuda|mps|xpu)(:\d+)?", str(device)):
        raise ConfigError(f"{what}: expected auto, cpu, cuda, cuda:N, mps or xpu, got {device!r}")


def is_finite_number(value: Any) -> bool:
    """An int or float that is finite; not a bool (YAML's `true` is not a number), not
    `.inf` or `.nan`."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# The adapter settings most runs give, checked when the config is read: PEFT checks them
# only as it wraps the loaded model, and a string rank crashed there with a TypeError.
LORA_VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "a whole number >= 1"),
    # an alpha of 0 scales the adapter's output to nothing: the run would train in vain
    "lora_alpha": (lambda v: is_finite_number(v) and v > 0, "a number > 0"),
    "lora_dropout": (lambda v: is_finite_number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    # null: PEFT's default modules for the architecture
    "target_modules": (lambda v: v is None or isinstance(v, str) or (
                       isinstance(v, list | tuple | set) and bool(v)
                       and all(isinstance(m, str) for m in v)),
                       "'all-linear', a module name pattern or a list of module names"),
}  # fmt: skip


def check_lora(settings: dict[str, Any]) -> str | None:
    """What is wrong with a `lora:` mapping's common values, or None. Unknown keys are
    named when the adapter is built (`policy.lora_config`): PEFT's field list needs PEFT,
    whose import takes seconds."""
    for key, value in settings.items():
        name = SHORT_LORA_KEYS.get(key, key)
        if name in LORA_VALUE_RULES:
            ok, expected = LORA_VALUE_RULES[name]
            if not ok(value):
                return f"{key}: expected {expected}, got {value!r}"
    return None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The words " (did you mean 'x'?)" for the known name closest to a misspelt one (a
    dash read as an underscore), or "" when none is close."""
    close = difflib.get_close_matches(name.replace("-", "_"), list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_config(data: dict[str, Any]) -> TrainConfig:
    data = canonical_keys(data)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        key = unknown[0]
        if key in TRL_INSTEAD:
            raise ConfigError(f"{key}: TRL's setting has no key here; {TRL_INSTEAD[key]}")
        hint = did_you_mean(key, [*FIELDS, *ALIASES, *TRL_INSTEAD])
        raise ConfigError(f"{key}: unknown config key{hint} (known keys: see `resd train "
                          f"--help-config`)")  # fmt: skip
    values = {name: check_type(name, value, _HINTS[name]) for name, value in data.items()}
    return TrainConfig(**values)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        loaded = yaml.safe_load(read_text_file(path, "config"))
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    except ValueError as exc:  # not UTF-8 text (read_text_file): said as a config error
        raise ConfigError(str(exc)) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys to values")
    return loaded


def recorded_settings(path: Path) -> dict[str, Any]:
    """Settings a command wrote to `path` (a run's config, a continual run's record), read
    back; yaml's error, or a ValueError, where the file is damaged: not text, not YAML, or
    not a mapping (emptied, overwritten). Each caller names the file and the way on."""
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        held = "nothing" if loaded is None else f"a {type(loaded).__name__}"
        raise ValueError(f"it holds {held}, not the settings")
    return loaded


# Settings that change nothing a run's results depend on: a run re-used by `resd compare`
# or `resd continual` may differ from the command's in these.
UNCOMPARED_KEYS = frozenset(
    {"output_dir", "progress", "report_to", "save_every", "keep_checkpoints"}
)


def settings_differences(old: Any, new: Any, where: str = "") -> list[str]:
    """`key: old then, new now` for every setting that differs between two configs (or
    records holding configs), nested keys dotted and list items indexed, leaving out
    `UNCOMPARED_KEYS` at every depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str) if key not in UNCOMPARED_KEYS
                for line in settings_differences(old.get(key), new.get(key), f"{where}{key}.")]  # fmt: skip
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for k, (a, b) in enumerate(zip(old, new, strict=True))
                for line in settings_differences(a, b, f"{where[:-1]}[{k}].")]  # fmt: skip
    return [] if old == new else [f"{where[:-1]}: {old!r} then, {new!r} now"]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML file's config (the defaults where `path` is None), with `key=value`
    overrides applied over it."""
    if path is not None and not isinstance(path, (str, Path)):  # pathlib's TypeError named neither
        raise TypeError(f"load_config: path is a YAML file's path or None, got "
                        f"{type(path).__name__} (a mapping: resd.TrainConfig(**mapping))")  # fmt: skip
    if isinstance(overrides, str):  # read a character at a time: "l: overrides take the form ..."
        raise TypeError(f"load_config: overrides is a list of 'key=value' strings, got the "
                        f"string {overrides!r} (pass [{overrides!r}])")  # fmt: skip
    data = read_yaml_mapping(path) if path is not None else {}
    return build_config(apply_overrides(data, overrides or []))


def defaults_yaml() -> str:
    """Every key with its default as a YAML config, with the comments `TrainConfig`'s
    source writes beside and above its fields: what `resd train --help-config` prints, so
    the help a key has is the one comment that documents it in the code, and the output
    is a config file to start from (`resd train --help-config > my.yaml`). Without the
    source (a zipped install), the keys and defaults alone."""
    import ast
    import io
    import tokenize

    defaults = TrainConfig().to_dict()
    try:
        source = Path(__file__).read_text()
    except OSError:
        source = ""
    nodes = [
        n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig"
    ]
    if not nodes:
        return yaml.safe_dump(defaults, sort_keys=False, width=1_000)
    own_line: dict[int, str] = {}  # comments on a line of their own, by line number
    after_code: dict[int, str] = {}  # comments at the end of a line of code
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
        if t.type == tokenize.COMMENT:
            own = t.line.lstrip().startswith("#")
            (own_line if own else after_code)[t.start[0]] = t.string
    out: list[str] = []
    done = nodes[0].lineno
    for node in nodes[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name, end = node.target.id, node.end_lineno or node.lineno
        out += [own_line[n] for n in range(done + 1, node.lineno) if n in own_line]
        entry = yaml.safe_dump({name: defaults[name]}, sort_keys=False, width=1_000).rstrip("\n")
        beside = [after_code[n] for n in range(node.lineno, end + 1) if n in after_code]
        first, *rest = entry.split("\n")
        out += [f"{first}  {' '.join(beside)}" if beside else first, *rest]
        done = end
    return "\n".join(out) + "\n"
