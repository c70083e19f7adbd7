"""The training loop: every algorithm (RESD, its ablations, SDPO, SDPO+ss) runs here.

One step (spec §3), for a batch of prompts and their fresh rollouts:

    rollout → feedback → [prune] → reflect + tag → curate → [prune] → teacher prompts
    → teacher and student score the response → self-distillation loss → AdamW → EMA

The algorithm (`algorithms.py`) only switches parts of this on and off. The stream
of prompts is a single pass in batches; each batch is used for `inner_updates` steps,
each with fresh on-policy rollouts. Steps are seeded from (seed, step), so a resumed
run replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from resd.algorithms import get_algorithm
from resd.callbacks import Callback
from resd.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_jsonl
from resd.config import ConfigError, TrainConfig
from resd.envs import make_env
from resd.envs.base import Environment, Item, Score
from resd.evaluation import evaluate, safe_score
from resd.generation import (
    Generation,
    TransformersSampler,
    chat_prompt_ids,
    eos_token_ids,
    left_pad,
)
from resd.guards import LessonSource, lesson_problem
from resd.losses import (
    TokenTerms,
    aggregate_loss,
    chunked_token_losses,
    group_advantages,
    importance_weight,
    policy_gradient_loss,
    sampled_token_loss,
    self_distillation_loss,
    success_rate_weights,
    token_logprobs,
)
from resd.models import DTYPES, autocast_context, load_model, load_tokenizer, resolve_model_path
from resd.parallel import full_tensor, make_parallel
from resd.parsing import extract_bullet_tags
from resd.playbook import OPERATION_TYPES, Playbook, prune_due
from resd.reflection import (
    Reflection,
    curation_messages,
    parse_operations,
    parse_reflection,
    parse_tags,
    reflection_messages,
    success_tag_messages,
)
from resd.schema import COUNTERS, PHASES, PLAYBOOK_READERS, SKIP_REASONS
from resd.structured import (
    JsonGrammar,
    StructuredOutputUnavailable,
    curation_schema,
    reflection_schema,
    tag_schema,
)
from resd.teacher import Teacher, is_peft
from resd.teacher_context import SolutionBuffer, TeacherTemplate
from resd.templating import clip_tokens, strip_thinking
from resd.tracking import Tracker

log = logging.getLogger(__name__)

# The JSON-lines logs of a run, cut back to the checkpoint's step when a run resumes.
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "eval.jsonl", "playbook_history.jsonl")

# Opens reflector and curator replies when no grammar constrains them, so a small model
# starts inside the JSON object instead of chatting (see `structured_output`).
JSON_OPENER = '{\n  "reasoning": "'


@dataclass(frozen=True)
class PlaybookView:
    """The playbook as one reader is shown it: text, the ids in it, how many were left out."""

    text: str = ""
    ids: list[str] = field(default_factory=list)
    omitted: int = 0


@dataclass(frozen=True)
class BatchTotals:
    """Counts over the whole global batch (all ranks) that scale each micro-batch's loss."""

    sd_tokens: int  # tokens of self-distilled rows
    pg_tokens: int  # tokens of policy-gradient rows
    sequences: int  # rollouts in the batch, distilled or not


@dataclass
class Rollout:
    item: Item
    prompt_ids: list[int]
    gen: Generation
    score: Score
    index: int = 0  # position in the step's global rollout list (across ranks)
    reflection: Reflection | None = None
    teacher_prompt: str = ""
    teacher_ids: list[int] = field(default_factory=list)
    reflection_reply: str = ""
    curation_reply: str = ""
    distill: bool = False  # the teacher's context holds something new: self-distil this row
    # Set by the update: which loss terms cover this row, its success-rate weight and its
    # group-normalised advantage.
    sd_row: bool = False
    pg_row: bool = False
    weight: float = 1.0
    advantage: float = 0.0
    token_losses: list[float] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.score.reward >= 0.5

    @property
    def response(self) -> str:
        return strip_thinking(self.gen.text)


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def response_logits(model, sequences: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    """Next-token logits `[B, width, V]` for the last `width` tokens of each sequence.

    Sequences are left-padded, so every response ends in the last column and a
    response of length r occupies the last r positions of the returned window.
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1
    )
    return out.logits[:, :-1]


def response_hidden(model, sequences: list[list[int]], width: int, pad_id: int) -> torch.Tensor:
    """Final hidden states `[B, width, H]` that predict the last `width` tokens (no output head).

    They are caught on their way out of the decoder during the whole model's forward
    (asked for one position of logits only), rather than by calling the decoder alone:
    under FSDP only the root module's forward gathers the embedding and final norm.
    """
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caught: list[torch.Tensor] = []
    hook = model.get_decoder().register_forward_hook(
        lambda _module, _args, out: caught.append(out.last_hidden_state)
    )
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    finally:
        hook.remove()
    return caught[-1][:, -width - 1 : -1]


def right_aligned_mask(lengths: list[int], width: int, device: torch.device) -> torch.Tensor:
    cols = torch.arange(width, device=device)
    return (cols[None, :] >= width - torch.tensor(lengths, device=device)[:, None]).float()


def right_aligned(rows: list[list[float]], width: int, device: torch.device) -> torch.Tensor:
    """Per-token values `[B, width]` in the layout of the response window (zeros before)."""
    out = torch.zeros(len(rows), width)
    for row, values in enumerate(rows):
        if values:
            out[row, width - len(values) :] = torch.tensor(values)
    return out.to(device)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        env: Environment | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """`env` replaces the environment `cfg.env` names (for environments built in Python);
        `callbacks` are called on step end, evaluation and save (`resd.callbacks`)."""
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.parallel = make_parallel(cfg.strategy, cfg.zero_stage)
        self.parallel.check(cfg)
        self.algo = get_algorithm(cfg.algorithm)
        self.run_dir = Path(cfg.output_dir)
        self._seed(cfg.seed)
        self.env = env if env is not None else make_env(cfg.env, cfg.env_args)
        self.train_items = list(self.env.train_items())
        if not self.train_items:
            raise ValueError(f"env: {getattr(self.env, 'name', cfg.env)!r} has no training items")
        if cfg.shuffle:
            random.Random(cfg.seed).shuffle(self.train_items)
        self.test_items = list(self.env.test_items())[: cfg.eval_items]
        self.n_batches = math.ceil(len(self.train_items) / cfg.batch_size)
        self.total_steps = min(cfg.steps or 10**12, self.n_batches * cfg.inner_updates)

        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if not resume and (self.run_dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"output_dir: {self.run_dir} already holds a run; pass --resume to continue it "
                "or choose another output_dir"
            )
        if resume and checkpoint is None and (self.run_dir / "metrics.jsonl").exists():
            # Killed before its first checkpoint: nothing to resume, so the run starts over,
            # and the logs of the lost steps go (they would otherwise appear twice).
            log.warning("resume: no checkpoint in %s; starting over from step 0 (its logs are cleared)",
                        self.run_dir)  # fmt: skip
            if self.parallel.is_main:
                for name in RUN_LOGS:
                    truncate_jsonl(self.run_dir / name, -1)
            self.parallel.barrier()
        self.tokenizer = load_tokenizer(cfg.model, cfg.max_prompt_tokens + cfg.max_new_tokens)
        param_dtype, sample_dtype = DTYPES[cfg.dtype], DTYPES[cfg.generation_dtype or cfg.dtype]
        # A LoRA policy samples from a plain copy of the base model with the adapter merged
        # in: decoding through unmerged fp32 adapters ran 4x slower than a merged bf16 copy.
        self.merged_sampler = (
            bool(cfg.lora) and cfg.generation_backend == "transformers"
            and not self.parallel.sharded and sample_dtype != param_dtype
        )  # fmt: skip
        self._sampler_base = None  # the base model, copied before the adapter wraps it
        self.model = self._load_student(checkpoint)
        self.model.train()
        self.device = next(self.model.parameters()).device
        self.distillation_weight = (
            self.algo.distillation_weight
            if cfg.distillation_weight is None
            else cfg.distillation_weight
        )
        # A resumed run restores base/EMA/trust-region weights from the checkpoint.
        # A pure policy-gradient run (grpo) never queries a teacher: do not copy the model.
        teacher_kind = cfg.teacher if self.distillation_weight > 0 else "live"
        self.teacher = Teacher(
            self.model, teacher_kind, cfg.teacher_update_rate, cfg.trust_region_weight
        )
        self.reference = Teacher(self.model, "base") if cfg.kl_coef > 0 else None
        state, optimizer_state = (
            load_checkpoint(checkpoint, teachers=self._teachers()) if checkpoint else ({}, None)
        )
        # Sample from a full copy in the sampling dtype (always when the policy is partitioned:
        # fsdp, ZeRO-3), synced after every optimizer step.
        self.generator = self.model
        if cfg.generation_backend == "transformers" and (
            self.parallel.sharded or sample_dtype != param_dtype
        ):
            copied = self._sampler_base if self.merged_sampler else copy.deepcopy(self.model)
            self.generator = copied.to(sample_dtype).eval()
            self.generator.requires_grad_(False)
            self._sampler_base = None
        for module in (self.model, self.teacher.copy, self.reference and self.reference.copy):
            if module is not None:
                self.parallel.shard_model(module, cfg.fsdp_reshard_after_forward)
        self.teacher.match_student_layout(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        self.parallel.prepare(self.model, self.optimizer, cfg.max_grad_norm)
        self.grammar = self._make_grammar()
        self.structured = self.grammar is not None or (
            cfg.generation_backend == "vllm" and cfg.structured_output != "off"
        )
        self.prefills = {
            "reflection": self._prefill("reflection_prefill", cfg.reflection_prefill),
            "curation": self._prefill("curation_prefill", cfg.curation_prefill),
        }
        self.sampler = self._make_sampler()
        self.template = TeacherTemplate.from_config(cfg.teacher_template)
        self.playbook = Playbook.load(cfg.playbook_init) if cfg.playbook_init else Playbook()
        self.buffer = SolutionBuffer(keep=cfg.solution_buffer_keep)
        self._playbook_views: dict[tuple[str, int | None], PlaybookView] = {}
        self._omitted: dict[str, int] = {}  # entries each reader was not shown, this step
        self._curation_ops = OPERATION_TYPES if cfg.curation_ops == "all" else ("ADD",)
        self._clip = partial(clip_tokens, max_tokens=cfg.slot_max_tokens, tokenizer=self.tokenizer)
        self.step = 0
        self.last_eval_step: int | None = None  # same on every rank
        self.totals: Counter[str] = Counter()
        self.pad_id = self.tokenizer.pad_token_id
        if checkpoint:
            self._restore(checkpoint, state, optimizer_state)
        # TensorBoard / W&B mirror the JSON-lines logs (which stay the source of truth).
        self.tracker = Tracker(
            self.run_dir, cfg.report_to if self.parallel.is_main else [], cfg.to_dict(),
            resume_step=self.step if checkpoint else None,
        )  # fmt: skip

    def _make_sampler(self):
        """The generation backend: HF generate on the in-process copy, or a vLLM engine."""
        cfg = self.cfg
        if cfg.generation_backend == "vllm":
            from resd.vllm_backend import VLLMSampler

            sampler = VLLMSampler(
                resolve_model_path(cfg.model), self.tokenizer, dtype=cfg.generation_dtype or cfg.dtype,
                seed=cfg.seed, max_model_len=cfg.max_teacher_prompt_tokens + cfg.max_new_tokens,
                vllm_args=cfg.vllm_args,
            )  # fmt: skip
            sampler.load_weights(self._policy_weights())  # the checkpoint's, when resuming
            return sampler
        sampler = TransformersSampler(
            self.generator, self.tokenizer, batch_size=cfg.generation_batch_size, autocast=cfg.autocast,
            cache_implementation=cfg.generation_cache, compile=cfg.generation_compile, grammar=self.grammar,
        )  # fmt: skip
        if self.merged_sampler:  # the copy holds the base weights: merge a resumed adapter in
            sampler.load_weights(self._policy_weights())
        return sampler

    def _make_grammar(self) -> JsonGrammar | None:
        """xgrammar for JSON replies on the transformers backend (vLLM brings its own)."""
        cfg = self.cfg
        if cfg.structured_output == "off" or cfg.generation_backend == "vllm":
            return None
        try:
            return JsonGrammar(
                self.tokenizer,
                self.model.config.vocab_size,
                eos_token_ids(self.model, self.tokenizer),
            )
        except StructuredOutputUnavailable as exc:
            if cfg.structured_output == "on":
                raise ConfigError(f"structured_output: {exc}") from None
            log.warning(
                "structured_output: auto and xgrammar is missing; replies are parsed as free text"
            )
            return None

    def _prefill(self, name: str, value: str | None) -> str:
        """The text that opens a reply: none under a grammar, a JSON opener without one."""
        if value is None:
            return "" if self.structured else JSON_OPENER
        if value and self.structured and self.cfg.generation_backend == "vllm":
            raise ConfigError(
                f"{name}: a prefill cannot be combined with vLLM's structured output; "
                "drop it or set structured_output: off"
            )
        return value

    @property
    def policy(self):
        """The policy as called for training forwards (the DeepSpeed engine, if any)."""
        return self.parallel.policy(self.model)

    def _teacher_source(self):
        """Full student weights for a whole EMA teacher copy beside a partitioned policy
        (ZeRO-3); None: the teacher reads the student."""
        return self.parallel.teacher_source(self.model) if self.teacher.copy is not None else None

    def _policy_weights(self):
        """The current policy as (name, full tensor) pairs, for a sampler to load."""
        if is_peft(self.model) and (self.cfg.generation_backend == "vllm" or self.merged_sampler):
            from resd.vllm_backend import merged_lora_weights

            return merged_lora_weights(self.model)
        return self.parallel.full_parameters(self.model)

    def _load_student(self, checkpoint: Path | None):
        """The policy: a full model, or a base model with a LoRA adapter (PEFT)."""
        cfg = self.cfg
        if not cfg.lora:
            source = str(checkpoint / "model") if checkpoint else cfg.model
            return load_model(source, dtype=cfg.dtype, device=self.parallel.device(cfg.device))
        from peft import LoraConfig, PeftModel, get_peft_model

        base = load_model(cfg.model, dtype=cfg.dtype, device=self.parallel.device(cfg.device))
        if self.merged_sampler:  # a deep copy of the PEFT model decoded 5x slower than this
            self._sampler_base = copy.deepcopy(base)
        if checkpoint:
            return PeftModel.from_pretrained(base, str(checkpoint / "model"), is_trainable=True)
        lora = LoraConfig(
            r=int(cfg.lora.get("r", 16)),
            lora_alpha=int(cfg.lora.get("alpha", 32)),
            lora_dropout=float(cfg.lora.get("dropout", 0.0)),
            target_modules=cfg.lora.get("target_modules", "all-linear"),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(base, lora)

    # ---- lifecycle --------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run to the end of the stream (or `steps`), evaluating and checkpointing on schedule.

        Under data parallelism only rank 0 writes files and evaluates; the others wait.
        """
        cfg, main = self.cfg, self.parallel.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(
                yaml.safe_dump(cfg.to_dict(), sort_keys=False)
            )
        if self.step == 0 and self.test_items:
            self._evaluate()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=cfg.algorithm,
            disable=not (cfg.progress and main),
        )
        last: dict[str, Any] = {}
        while self.step < self.total_steps:
            batch_index = self.step // cfg.inner_updates
            items = self.train_items[
                batch_index * cfg.batch_size : (batch_index + 1) * cfg.batch_size
            ]
            last = self.train_step(items)
            self._append("metrics.jsonl", last)
            self.tracker.log(last, self.step, prefix="train")
            for callback in self.callbacks:
                callback.on_step_end(self, last)
            bar.update(1)
            bar.set_postfix(
                loss=f"{last['loss']:.4f}", reward=f"{last['reward']:.2f}", score=f"{last['score']:.2f}",
                playbook=last["playbook_size"], s=f"{last['time_step']:.1f}",
            )  # fmt: skip
            done = self.step >= self.total_steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not done and self.test_items:
                self._evaluate()
            if (cfg.save_every and self.step % cfg.save_every == 0) or done:
                self.save()
        bar.close()
        # Decided from memory, not from eval.jsonl: rank 0 may already be appending to it.
        if self.test_items and self.last_eval_step != self.step:
            self._evaluate()
        evals = self._read_jsonl("eval.jsonl") if main else []
        summary = {
            "steps": self.step, "run_dir": str(self.run_dir), "last": last,
            "strategy": self.parallel.name, "world_size": self.parallel.world_size,
        }  # fmt: skip
        if evals:
            summary["eval_before"], summary["eval_after"] = evals[0], evals[-1]
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.close()
        self.parallel.barrier()
        return summary

    def save(self) -> Path:
        """Checkpoint: every rank helps gather full tensors, rank 0 writes them."""
        path = self.run_dir / "checkpoints" / f"step-{self.step:06d}"
        # Unsharded, the model saves itself (PEFT writes just the adapter).
        model_state = self.parallel.full_state_dict(self.model) if self.parallel.sharded else None
        teacher_states = {}
        for name, teacher in self._teachers().items():
            if teacher.adapter:  # LoRA EMA: adapter tensors (sharded like the adapter)
                teacher_states[name] = {n: full_tensor(t) for n, t in teacher.adapter.items()}
            elif teacher.copy is not None:
                teacher_states[name] = self.parallel.full_state_dict(teacher.copy)
        optimizer_state = self.parallel.full_optimizer_state(self.model, self.optimizer)
        if self.parallel.is_main:
            self.playbook.save(self.run_dir)
            state = {
                "cursor": {
                    "batch": self.step // self.cfg.inner_updates,
                    "inner": self.step % self.cfg.inner_updates,
                },
                "playbook": self.playbook.to_dict(),
                "buffer": self.buffer.solutions,
                "totals": dict(self.totals),
                "config": self.cfg.to_dict(),
            }
            path = save_checkpoint(
                self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                model_state=model_state, teacher_states=teacher_states,
                optimizer_state=optimizer_state, state=state, keep=self.cfg.keep_checkpoints,
            )  # fmt: skip
        self.parallel.barrier()
        for callback in self.callbacks:
            callback.on_save(self, path)
        return path

    def _teachers(self) -> dict[str, Teacher]:
        return {
            "teacher": self.teacher,
            **({"reference": self.reference} if self.reference else {}),
        }

    def _restore(self, path: Path, state: dict[str, Any], optimizer_state: dict) -> None:
        self.parallel.load_optimizer_state(self.model, self.optimizer, optimizer_state)
        self.step = int(state["step"])
        self.playbook = Playbook.from_dict(state["playbook"])
        self.buffer = SolutionBuffer(dict(state["buffer"]), keep=self.cfg.solution_buffer_keep)
        self.totals = Counter(state.get("totals", {}))
        if self.parallel.is_main:
            for name in RUN_LOGS:
                truncate_jsonl(self.run_dir / name, self.step)
        self.parallel.barrier()
        evals = self._read_jsonl("eval.jsonl")
        self.last_eval_step = evals[-1]["step"] if evals else None
        log.info("resumed from %s at step %d", path, self.step)

    # ---- one step ---------------------------------------------------------------------
    def train_step(self, items: list[Item]) -> dict[str, Any]:
        """One inner iteration on `items` (the global batch); returns the step's metrics.

        Under data parallelism each rank works on its share of the rollouts; results
        that change shared state are gathered and applied in global order (see
        `distributed.py`), so every rank ends the step in the same state.
        """
        cfg, algo = self.cfg, self.algo
        step = self.step + 1
        self._seed(cfg.seed * 1_000_003 + step)
        # `counts` holds this rank's own work (summed over ranks below); `applied` counts
        # playbook changes, which every rank makes identically (so they are not summed).
        timer, counts, applied = PhaseTimer(), Counter(), Counter()
        self._omitted = {}
        start = time.perf_counter()
        size_before = len(self.playbook)

        with timer("rollout"):
            flat = [it for it in items for _ in range(cfg.rollouts_per_prompt)]
            mine = self.parallel.shard(flat)
            prompts = {id(it): chat_prompt_ids(self.tokenizer, self._student_messages(it), cfg.max_prompt_tokens)
                       for it in items}  # fmt: skip
            gens = self._generate([prompts[id(flat[g])] for g in mine], cfg.max_new_tokens,
                                  [self._row_seed(step, "rollout", g) for g in mine])  # fmt: skip
        with timer("feedback"):
            rollouts = [
                Rollout(
                    flat[g],
                    prompts[id(flat[g])],
                    gen,
                    safe_score(self.env, flat[g], gen.text),
                    index=g,
                )
                for g, gen in zip(mine, gens, strict=True)
            ]
        outcomes = self.parallel.gather_indexed(
            [(r.index, (r.item.id, r.score.reward, r.score.score)) for r in rollouts]
        )

        removed: list[str] = []
        if algo.playbook and prune_due(step, cfg.playbook_prune_every):
            removed += self.playbook.concise(step, policy=cfg.playbook_policy, seed=cfg.seed + step)
        with timer("reflect"):
            tags: list[tuple[int, list[tuple[str, str]]]] = []
            if algo.reflection:
                failed = [g for g, o in enumerate(outcomes) if o[2] < 1.0][
                    : cfg.max_reflections_per_step
                ]
                tags += self._reflect(rollouts, set(failed), step, counts)
            if algo.playbook and len(self.playbook):
                tags += [(len(flat) + i, t) for i, t in self._tag_successes(rollouts, step, counts)]
            if algo.playbook:
                for pairs in self.parallel.gather_indexed(tags):
                    applied["tags_applied"] += sum(self.playbook.tag(i, t, step) for i, t in pairs)
        added: list[str] = []
        with timer("curate"):
            if algo.playbook:
                for ops, source in self.parallel.gather_indexed(
                    self._curate(rollouts, step, counts)
                ):
                    report = self.playbook.apply_operations(
                        ops,
                        step,
                        allowed=self._curation_ops,
                        check=partial(lesson_problem, source=source),
                    )
                    applied["ops_applied"] += report.applied
                    applied["curations_effective"] += report.applied > 0
                    applied["ops_skipped"] += report.skipped
                    applied.update({f"ops_skipped_{k}": v for k, v in report.reasons.items()})
                    added += report.added
                if len(self.playbook) > cfg.playbook_max_entries:
                    removed += self.playbook.concise(step, policy=cfg.playbook_policy,
                                                     max_entries=cfg.playbook_max_entries, seed=cfg.seed + step)  # fmt: skip
        wins = self.parallel.gather_indexed(
            [(r.index, (r.item.id, r.response)) for r in rollouts if r.success]
        )
        if algo.solution_buffer:
            for item_id, response in wins:
                self.buffer.add(item_id, response)

        self._build_teacher_prompts(rollouts, peers=dict(reversed(wins)))
        update = self._update(rollouts, outcomes, timer)
        self.step = step

        counts = Counter({k: int(self.parallel.sum(counts.get(k, 0))) for k in COUNTERS})
        counts.update(applied)
        self.totals.update(counts)
        stats = self.parallel.gather_indexed(
            [(r.index, (r.distill, len(r.gen.token_ids), r.gen.finished)) for r in rollouts]
        )
        n = len(outcomes)
        metrics = {
            "step": step,
            "batch": (step - 1) // cfg.inner_updates,
            "inner": (step - 1) % cfg.inner_updates,
            "lr": self._lr(step),
            **update,
            "reward": sum(o[1] for o in outcomes) / n,
            "score": sum(o[2] for o in outcomes) / n,
            "success_rate": sum(o[1] >= 0.5 for o in outcomes) / n,
            "rollouts": n,
            "distilled": sum(s[0] for s in stats),
            "response_tokens": sum(s[1] for s in stats) / n,
            "truncated": sum(not s[2] for s in stats) / n,
            "playbook_size": len(self.playbook),
            "playbook_added": len(added),
            "playbook_removed": len(set(removed)),
            "playbook_size_before": size_before,
            "buffer_size": len(self.buffer),
            **{k: counts.get(k, 0) for k in COUNTERS},
            **{f"ops_skipped_{k}": counts.get(f"ops_skipped_{k}", 0) for k in SKIP_REASONS},
            # entries each reader was not shown for lack of budget (every rank sees the same)
            **{f"playbook_omitted_{k}": self._omitted.get(k, 0) for k in PLAYBOOK_READERS},
            **{f"time_{p}": round(s, 4) for p, s in timer.seconds.items()},
            "time_step": round(time.perf_counter() - start, 4),
        }
        self._log_samples(rollouts, step)
        if algo.playbook and self.parallel.is_main:
            self._append(
                "playbook_history.jsonl",
                {"step": step, "size": len(self.playbook), "sections": self.playbook.section_counts(),
                 "added": added, "removed": sorted(set(removed))},
            )  # fmt: skip
        return metrics

    def _row_seed(self, step: int, phase: str, index: int) -> int:
        """A seed per (run seed, step, phase, global rollout index): sampling is batch-invariant."""
        digest = hashlib.blake2b(f"{self.cfg.seed}/{step}/{phase}/{index}".encode(), digest_size=8)
        return int.from_bytes(digest.digest(), "little") >> 1

    def _student_messages(self, item: Item) -> list[dict[str, str]]:
        """The student's prompt: the item's messages, plus the playbook if `student_playbook`.

        RESD's student never sees the playbook (the lessons must be distilled into the
        weights); showing it is the deployment-time option ACE uses.
        """
        if not (self.cfg.student_playbook and self.algo.playbook and len(self.playbook)):
            return item.messages
        lessons = f"Lessons from earlier tasks:\n{self._playbook_view('teacher').text}\n\n"
        messages = [dict(m) for m in item.messages]
        last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last_user]["content"] = lessons + messages[last_user]["content"]
        return messages

    def _generate(
        self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int]
    ) -> list[Generation]:
        """Rollouts, with the sampler's log-probs for rollout correction."""
        cfg = self.cfg
        return self.sampler.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seeds=seeds,
            return_logprobs=True,
        )

    def _generate_replies(
        self,
        prompts: list[list[int]],
        prefill: str,
        max_new_tokens: int,
        seeds: list[int],
        schema: dict[str, Any] | None = None,
    ) -> list[Generation]:
        """Replies that start with `prefill` (the returned text includes it), decoded under
        `schema` when structured output is on."""
        prefix = self.tokenizer(prefill, add_special_tokens=False)["input_ids"] if prefill else []
        schemas = [schema] * len(prompts) if self.structured and schema is not None else None
        gens = self.sampler.generate(
            [p + prefix for p in prompts], max_new_tokens=max_new_tokens, temperature=self.cfg.temperature,
            top_p=self.cfg.top_p, seeds=seeds, json_schemas=schemas,
            json_prefixes=[prefill] * len(prompts) if schemas and prefill else None,
        )  # fmt: skip
        return [Generation(g.token_ids, prefill + g.text, g.finished) for g in gens]

    def _playbook_view(self, reader: str) -> PlaybookView:
        """The playbook as `reader` (reflection, curation, teacher) is shown it.

        Each reader has a token budget (`<reader>_playbook_tokens`, null = all); when the
        playbook does not fit, whole entries are left out, least proven first, and the
        omission is counted in the step's metrics. Views are cached until the playbook's
        text changes: a step asks for them many times, and fitting a budget tokenizes
        every entry.
        """
        budget = getattr(self.cfg, f"{reader}_playbook_tokens")
        key = (self.playbook.render(), budget)
        view = self._playbook_views.get(key)
        if view is None:
            text = self.playbook.render(
                max_tokens=budget, count_tokens=self._count_tokens, include_empty=False
            )
            shown = [i for i in self.playbook.entries if f"[{i}]" in text]
            view = PlaybookView(text if shown else "", shown, len(self.playbook) - len(shown))
            self._playbook_views = {k: v for k, v in self._playbook_views.items() if k[0] == key[0]}
            self._playbook_views[key] = view
        self._omitted[reader] = view.omitted
        return view

    def _reply_schema(self, build, budget: int, view: PlaybookView) -> dict[str, Any] | None:
        """The JSON schema of a reflection / tag / curation reply; None without a grammar.

        Its id enums hold the entries the reply's prompt shows.
        """
        if not self.structured:
            return None
        if build is curation_schema:
            return build(view.ids, budget, self._count_tokens, operations=self._curation_ops)
        return build(view.ids, budget, self._count_tokens)

    def _count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages, self.cfg.max_teacher_prompt_tokens)

    def _reflect(
        self, rollouts: list[Rollout], chosen: set[int], step: int, counts: Counter
    ) -> list[tuple[int, list[tuple[str, str]]]]:
        """REFLECT on this rank's failed rollouts among `chosen`, in one batched call.

        Returns the bullet tags per rollout index; the caller applies them in global order.
        """
        failed = [r for r in rollouts if r.index in chosen]
        if not failed:
            return []
        view = self._playbook_view("reflection") if self.algo.playbook else PlaybookView()
        clip = self._clip
        prompts = [
            self._chat(
                reflection_messages(
                    clip(r.item.prompt_text), clip(r.response), clip(r.score.feedback), view.text
                )
            )
            for r in failed
        ]
        seeds = [self._row_seed(step, "reflect", r.index) for r in failed]
        budget = self.cfg.reflection_max_new_tokens
        schema = self._reply_schema(reflection_schema, budget, view)
        replies = self._generate_replies(
            prompts, self.prefills["reflection"], budget, seeds, schema
        )
        tags = []
        for r, reply in zip(failed, replies, strict=True):
            counts["reflections"] += 1
            counts["reflection_tokens"] += len(reply.token_ids)
            counts["reflection_truncated"] += not reply.finished
            r.reflection_reply = reply.text
            r.reflection = parse_reflection(reply.text)
            if r.reflection is None:
                counts["reflection_parse_failures"] += 1
                tags.append((r.index, extract_bullet_tags(None, reply.text)))  # regex fallback
                if self.cfg.unparsed_reflection == "raw" and strip_thinking(reply.text):
                    # the release hands the raw reply on to the curator and the teacher
                    r.reflection = Reflection.raw(strip_thinking(reply.text))
                    counts["reflections_raw"] += 1
            else:
                counts["reflection_loose_parses"] += r.reflection.loose
                counts["reflections_parsed"] += not r.reflection.loose
                tags.append((r.index, r.reflection.bullet_tags))
        return tags

    def _tag_successes(
        self, rollouts: list[Rollout], step: int, counts: Counter
    ) -> list[tuple[int, list[tuple[str, str]]]]:
        wins = [r for r in rollouts if r.success]
        if not wins:
            return []
        view = self._playbook_view("reflection")
        prompts = [
            self._chat(
                success_tag_messages(
                    self._clip(r.item.prompt_text), self._clip(r.response), view.text
                )
            )
            for r in wins
        ]
        seeds = [self._row_seed(step, "tag", r.index) for r in wins]
        budget = self.cfg.reflection_max_new_tokens
        schema = self._reply_schema(tag_schema, budget, view)
        tags = []
        for r, reply in zip(
            wins, self._generate_replies(prompts, "", budget, seeds, schema), strict=True
        ):
            counts["tag_replies"] += 1
            counts["tag_tokens"] += len(reply.token_ids)
            parsed = parse_tags(reply.text)
            if parsed is None:
                counts["tag_parse_failures"] += 1
            else:
                tags.append((r.index, parsed))
        return tags

    def _curate(
        self, rollouts: list[Rollout], step: int, counts: Counter
    ) -> list[tuple[int, list[dict]]]:
        """CURATE: every curator sees the same playbook snapshot; the caller applies in order."""
        if self.algo.reflection:
            sources = [(r, r.reflection.as_text()) for r in rollouts if r.reflection is not None]
        else:  # ablation: curate straight from the environment's feedback
            sources = [(r, f"Feedback on a failed attempt: {r.score.feedback}") for r in rollouts
                       if not r.success and r.score.feedback]  # fmt: skip
        if not sources:
            return []
        view = self._playbook_view("curation")
        stats = self.playbook.stats()
        prompts = [
            self._chat(
                curation_messages(
                    stats,
                    self._clip(text),
                    view.text,
                    self._clip(r.item.prompt_text),
                    operations=self._curation_ops,
                )
            )
            for r, text in sources
        ]
        seeds = [self._row_seed(step, "curate", r.index) for r, _ in sources]
        budget = self.cfg.curation_max_new_tokens
        schema = self._reply_schema(curation_schema, budget, view)
        replies = self._generate_replies(prompts, self.prefills["curation"], budget, seeds, schema)
        operations = []
        for (r, _), reply in zip(sources, replies, strict=True):
            counts["curations"] += 1
            counts["curation_tokens"] += len(reply.token_ids)
            counts["curation_truncated"] += not reply.finished
            r.curation_reply = reply.text
            ops = parse_operations(reply.text)
            if ops is None:
                counts["curation_parse_failures"] += 1
            else:
                counts["curations_parsed"] += 1
                source = LessonSource(r.item.prompt_text, r.score.feedback, r.item.answer)
                operations.append((r.index, (ops, source)))
        return operations

    def _build_teacher_prompts(self, rollouts: list[Rollout], peers: dict[str, str]) -> None:
        """Fill the teacher template per rollout and decide which rollouts are distilled.

        `peers` maps an item id to a successful response for it from this step (any rank).
        """
        algo, cfg, clip = self.algo, self.cfg, self._clip
        playbook_text = self._playbook_view("teacher").text if algo.playbook else ""
        for r in rollouts:
            solution = ""
            if algo.demonstration:
                solution = r.item.reference or ""
            elif r.success and algo.distill_successes:
                solution = r.response
            elif algo.solution_buffer and self.buffer.get(r.item.id):
                solution = self.buffer.get(r.item.id) or ""
            elif algo.peer_solution and self.cfg.rollouts_per_prompt > 1 and not r.success:
                solution = peers.get(r.item.id, "")
            feedback = r.score.feedback if algo.feedback else ""
            if solution and not cfg.teacher_feedback_with_solution:
                feedback = ""  # the release: a solution speaks for itself
            reflection = r.reflection.as_text() if r.reflection else ""
            r.distill = bool(feedback.strip() or reflection or solution) and bool(r.gen.token_ids)
            if r.success and not algo.distill_successes:
                r.distill = False
            r.teacher_prompt = self.template.render(
                prompt=clip(r.item.prompt_text),
                playbook=playbook_text,
                previous_trial=clip(r.response) if algo.previous_trial else "",
                feedback=clip(feedback),
                reflection=clip(reflection),
                successful_trial=clip(solution),
            )
            system = [m for m in r.item.messages if m.get("role") == "system"]
            r.teacher_ids = self._chat([*system, {"role": "user", "content": r.teacher_prompt}])

    def _update(
        self, rollouts: list[Rollout], outcomes: list[tuple[str, float, float]], timer: PhaseTimer
    ) -> dict[str, float]:
        """Optimizer step(s) on (1 − λ)·policy-gradient + λ·self-distillation.

        Self-distillation covers the rollouts marked `distill`; the policy gradient (GRPO,
        or a mixed objective) covers all rollouts with group-normalised advantages.
        `outcomes` (item id, reward, score) covers the whole global batch, so batch-level
        quantities (success-rate weights, advantages, token and sequence counts) are the
        same on every rank and the same as in a one-process run.
        """
        cfg, lam = self.cfg, self.distillation_weight
        for r in rollouts:
            r.sd_row = lam > 0 and r.distill and bool(r.gen.token_ids)
            r.pg_row = lam < 1 and bool(r.gen.token_ids)
        rows = [r for r in rollouts if r.sd_row or r.pg_row]
        totals = BatchTotals(
            sd_tokens=int(self.parallel.sum(sum(len(r.gen.token_ids) for r in rows if r.sd_row))),
            pg_tokens=int(self.parallel.sum(sum(len(r.gen.token_ids) for r in rows if r.pg_row))),
            sequences=len(outcomes),
        )
        out = {"loss": 0.0, "sd_loss": 0.0, "pg_loss": 0.0, "tokens": totals.sd_tokens, "grad_norm": 0.0,
               "rollout_logprob_gap": 0.0, "teacher_advantage": 0.0}  # fmt: skip
        if totals.sd_tokens + totals.pg_tokens == 0:
            return out
        rewards = torch.tensor([o[1] for o in outcomes])
        weights = (
            success_rate_weights(rewards, cfg.success_weight_alpha, cfg.success_weight_beta)
            if cfg.success_weighting
            else torch.ones(len(outcomes))
        )
        values = torch.tensor([o[1] if cfg.pg_reward == "reward" else o[2] for o in outcomes])
        advantages = group_advantages(values, cfg.rollouts_per_prompt, cfg.pg_scale_std)
        for r in rollouts:
            r.weight, r.advantage = float(weights[r.index]), float(advantages[r.index])
        size = cfg.micro_batch_size
        micro_batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if self.parallel.lockstep:  # forward/backward are collective: every rank runs as many
            missing = self.parallel.max(len(micro_batches)) - len(micro_batches)
            micro_batches += [[self._padding_rollout()] for _ in range(missing)]
        old_logps = self._old_logprobs(micro_batches, timer) if cfg.update_epochs > 1 else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Σ |log π_trainer − log π_sampler| and its tokens; Σ (log π_T − log π_θ) over
        # distilled tokens and their count (the teacher's advantage)
        gap = torch.zeros(4, dtype=torch.float64)
        for epoch in range(cfg.update_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            losses = {"sd_loss": 0.0, "pg_loss": 0.0}
            for index, micro in enumerate(micro_batches):
                old = old_logps[index] if old_logps is not None else None
                sd, pg = self._micro_batch_loss(
                    micro, totals, old, timer, gap if epoch == 0 else None
                )
                with timer("update"):
                    self.parallel.backward((1 - lam) * pg + lam * sd)
                losses["sd_loss"] += sd.item()
                losses["pg_loss"] += pg.item()
            with timer("update"):
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr(self.step + 1)
                grad_norm = self.parallel.step(self.optimizer, params, cfg.max_grad_norm)
                for frozen in (self.teacher.copy, self.reference and self.reference.copy):
                    self.parallel.reshard(frozen)
                self.teacher.update(self.model, self._teacher_source())
                self._sync_sampler()
        losses = {k: self.parallel.sum(v) for k, v in losses.items()}
        gap_sum, gap_tokens, adv_sum, adv_tokens = (self.parallel.sum(float(x)) for x in gap)
        out.update(
            losses,
            grad_norm=grad_norm,
            loss=(1 - lam) * losses["pg_loss"] + lam * losses["sd_loss"],
            rollout_logprob_gap=gap_sum / gap_tokens if gap_tokens else 0.0,
            teacher_advantage=adv_sum / adv_tokens if adv_tokens else 0.0,
        )
        return out

    def _micro_batch_loss(
        self,
        micro: list[Rollout],
        totals: BatchTotals,
        old_logp: torch.Tensor | None,
        timer: PhaseTimer,
        gap: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the batch's SD and PG losses (see `aggregate_loss`).

        `gap`, on the first pass over the batch, accumulates the log-prob mismatch between
        the sampler that drew the tokens and the trainer, and token losses are recorded
        for the samples log.
        """
        cfg = self.cfg
        lengths = [len(r.gen.token_ids) for r in micro]
        width = max(lengths)
        mask = right_aligned_mask(lengths, width, self.device)
        token_ids = left_pad([r.gen.token_ids for r in micro], 0, self.device)[0]
        zero = torch.zeros((), device=self.device)
        is_sd = torch.tensor([r.sd_row for r in micro], device=self.device, dtype=torch.float32)
        is_pg = torch.tensor([r.pg_row for r in micro], device=self.device, dtype=torch.float32)

        # In lockstep a rank runs every forward the others run, even on rows it masks out.
        want_sd = bool(totals.sd_tokens) and (self.parallel.lockstep or bool(is_sd.any()))
        want_pg = bool(totals.pg_tokens) and (self.parallel.lockstep or bool(is_pg.any()))
        teacher_seqs = [r.teacher_ids + r.gen.token_ids for r in micro]
        student_seqs = [r.prompt_ids + r.gen.token_ids for r in micro]
        sd_loss = pg_loss = zero
        terms = self._token_losses(
            student_seqs, teacher_seqs if want_sd else None, token_ids, width, timer
        )
        tok, logp = terms.loss, terms.logp
        with timer("update"):
            old = logp.detach() if old_logp is None else old_logp
            # The sampler's log-probs; NaN where it gave none (those tokens get weight 1).
            sampled = [
                r.gen.logprobs or [math.nan] * n for r, n in zip(micro, lengths, strict=True)
            ]
            sampler_logp = right_aligned(sampled, width, self.device)
            known = mask * ~sampler_logp.isnan()
            sampler_logp = torch.where(known.bool(), sampler_logp, logp.detach())
            if gap is not None:
                gap[0] += float(((logp.detach() - sampler_logp).abs() * known).sum())
                gap[1] += float(known.sum())
                if terms.teacher_logp is not None:  # the teacher's advantage on distilled tokens
                    distilled = mask * is_sd[:, None]
                    gap[2] += float(((terms.teacher_logp - logp.detach()) * distilled).sum())
                    gap[3] += float(distilled.sum())
            correction = importance_weight(logp, sampler_logp, cfg.rollout_is_cap)

            def aggregate(
                token_loss: torch.Tensor, rows: torch.Tensor, tokens: int
            ) -> torch.Tensor:
                return aggregate_loss(token_loss, mask * rows[:, None], mode=cfg.loss_aggregation,
                                      tokens=tokens, sequences=totals.sequences)  # fmt: skip

            if tok is not None:
                tok = tok * importance_weight(logp, old, cfg.is_clip) * correction
                w = torch.tensor([r.weight for r in micro], device=self.device)
                sd_loss = aggregate(tok * w[:, None], is_sd, totals.sd_tokens)
                if gap is not None:
                    for row, r in enumerate(micro):
                        if r.sd_row:
                            r.token_losses = (
                                tok[row, width - lengths[row] :].detach().float().tolist()
                            )
            if want_pg:
                adv = torch.tensor([r.advantage for r in micro], device=self.device)
                ref = None
                if self.reference is not None:
                    with torch.no_grad(), autocast_context(self.device, cfg.autocast):
                        ref_logits = self.reference.logits(
                            self.model,
                            lambda m: response_logits(
                                self.parallel.policy(m), student_seqs, width, self.pad_id
                            ),
                        )
                    ref = token_logprobs(ref_logits, token_ids)
                tok = policy_gradient_loss(logp, old, adv, clip_low=cfg.pg_clip_low, clip_high=cfg.pg_clip_high,
                                           ref_logp=ref, kl_coef=cfg.kl_coef)  # fmt: skip
                pg_loss = aggregate(tok * correction, is_pg, totals.pg_tokens)
        return sd_loss, pg_loss

    def _token_losses(
        self,
        student_seqs: list[list[int]],
        teacher_seqs: list[list[int]] | None,
        token_ids: torch.Tensor,
        width: int,
        timer: PhaseTimer,
    ) -> TokenTerms:
        """Per-token distillation loss (None without teacher sequences), the student's
        log-probs of the response tokens, and the teacher's.

        Two paths with the same result: full logits for both models (simple, fastest
        for small vocabularies), or hidden states with the output head applied chunk by
        chunk (`loss_chunk_size`), which keeps peak memory flat in the vocabulary size.
        """
        cfg = self.cfg

        def sd_token_loss(s_logits, t_logits, ids, s_logp):
            if cfg.distillation_mode == "sampled":
                return sampled_token_loss(
                    s_logp, token_logprobs(t_logits, ids), min_ratio=cfg.min_ratio
                )
            topk = None if cfg.distillation_mode == "full" else cfg.topk
            return self_distillation_loss(s_logits, t_logits, alpha=cfg.alpha, topk=topk, add_tail=cfg.add_tail,
                                          min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio)  # fmt: skip

        # The teacher's side: final hidden states for the chunked head, else full logits.
        forward = response_hidden if cfg.loss_chunk_size else response_logits
        teacher_out = None
        if teacher_seqs is not None:
            with timer("teacher"), autocast_context(self.device, cfg.autocast):
                teacher_out = self.teacher.logits(
                    self.model,
                    lambda m: forward(self.parallel.policy(m), teacher_seqs, width, self.pad_id),
                )
        if cfg.loss_chunk_size:
            with timer("update"), autocast_context(self.device, cfg.autocast):
                s_hidden = response_hidden(self.policy, student_seqs, width, self.pad_id)
                softcap = getattr(self.model.config, "final_logit_softcapping", None)
                return chunked_token_losses(
                    s_hidden, self.model.get_output_embeddings(), token_ids, chunk_size=cfg.loss_chunk_size,
                    teacher_hidden=teacher_out, teacher_head=self.teacher.head(self.model),
                    token_loss=sd_token_loss, softcap=softcap,
                )  # fmt: skip
        with timer("update"):
            with autocast_context(self.device, cfg.autocast):
                s_logits = response_logits(self.policy, student_seqs, width, self.pad_id)
            logp = token_logprobs(s_logits, token_ids)
            if teacher_out is None:
                return TokenTerms(None, logp, None)
            with torch.no_grad():
                t_logp = token_logprobs(teacher_out, token_ids)
            return TokenTerms(sd_token_loss(s_logits, teacher_out, token_ids, logp), logp, t_logp)

    def _old_logprobs(
        self, micro_batches: list[list[Rollout]], timer: PhaseTimer
    ) -> list[torch.Tensor]:
        """Log-probs of the rollout policy, needed once several updates reuse one batch."""
        result = []
        with torch.no_grad():
            for micro in micro_batches:
                lengths = [len(r.gen.token_ids) for r in micro]
                token_ids = left_pad([r.gen.token_ids for r in micro], 0, self.device)[0]
                seqs = [r.prompt_ids + r.gen.token_ids for r in micro]
                result.append(
                    self._token_losses(seqs, None, token_ids, max(lengths), PhaseTimer()).logp
                )
        return result

    # ---- helpers ----------------------------------------------------------------------
    def _padding_rollout(self) -> Rollout:
        """A one-token row that every loss masks out, for a rank with fewer micro-batches."""
        pad = self.pad_id if self.pad_id is not None else 0
        return Rollout(
            item=Item(id="<padding>", messages=[]), prompt_ids=[pad],
            gen=Generation([pad], "", False), score=Score(0.0, 0.0, ""), index=-1, teacher_ids=[pad],
        )  # fmt: skip

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        """Push the new weights to whatever samples (spec §3 step 9)."""
        if self.generator is self.model and self.cfg.generation_backend == "transformers":
            return
        self.sampler.load_weights(self._policy_weights())

    def _lr(self, step: int) -> float:
        if self.cfg.warmup_steps and step <= self.cfg.warmup_steps:
            return self.cfg.lr * step / self.cfg.warmup_steps
        return self.cfg.lr

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _evaluate(self) -> dict[str, Any] | None:
        """Evaluate on rank 0 (the others wait): the test split is small next to training."""
        self.last_eval_step = self.step
        row = self._evaluate_main() if self.parallel.is_main else None
        self.parallel.barrier()
        for callback in self.callbacks:
            callback.on_evaluate(self, row)
        return row

    def _evaluate_main(self) -> dict[str, Any]:
        cfg = self.cfg
        self._seed(cfg.seed * 7919 + self.step)
        metrics, records = evaluate(
            self.sampler, self.tokenizer, self.env, self.test_items, samples=cfg.eval_samples,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p, max_prompt_tokens=cfg.max_prompt_tokens, prompt_messages=self._student_messages,
        )  # fmt: skip
        row = {"step": self.step, **metrics}
        self._append("eval.jsonl", row)
        self.tracker.log(metrics, self.step, prefix="eval")
        with (self.run_dir / f"eval-step-{self.step:06d}.jsonl").open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        log.info("eval at step %d: %s", self.step, {k: round(v, 4) for k, v in metrics.items()})
        return row

    def _log_samples(self, rollouts: list[Rollout], step: int) -> None:
        """The first `log_samples` rollouts of the global batch, with everything the report shows."""
        rows = [
            (r.index, {
                "step": step, "item": r.item.id, "prompt": r.item.prompt_text, "response": r.gen.text,
                "reward": r.score.reward, "score": r.score.score, "feedback": r.score.feedback,
                "reflection": r.reflection.as_text() if r.reflection else None,
                "reflection_reply": r.reflection_reply, "curation_reply": r.curation_reply,
                "teacher_prompt": r.teacher_prompt, "distilled": r.distill,
                "tokens": [self.tokenizer.decode([t]) for t in r.gen.token_ids],
                "token_losses": [round(x, 5) for x in r.token_losses],
            })
            for r in rollouts
            if r.index < self.cfg.log_samples
        ]  # fmt: skip
        for row in self.parallel.gather_indexed(rows):
            self._append("samples.jsonl", row)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        if not self.parallel.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / name).open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.run_dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
