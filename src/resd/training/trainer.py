"""The training loop: every algorithm (RESD, its ablations, SDPO, SDPO+ss, SDFT, GRPO).

One step, for a batch of prompts and their fresh rollouts, in the order `train_step`
runs it:

    rollout → feedback → [prune] → reflect + tag → curate → [prune] → teacher prompts
    → teacher and student score the responses → loss → AdamW → EMA teacher → sync sampler

The algorithm (`algorithms.py`) only switches parts of this on and off. The lesson half
lives in `lessons.py`, the update half in `update.py`, the policy and its sampler in
`policy.py`, and how the run is spread over processes in `resd.parallel`. The stream of
prompts is a single pass in batches; each batch is used for `inner_updates` steps, each
with fresh on-policy rollouts. Steps are seeded from (seed, step), so a resumed run
replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import signal
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from resd.allocator import keep_freed_memory
from resd.analysis.evaluation import evaluate, reward_means, safe_score
from resd.config import TrainConfig
from resd.envs import make_env
from resd.envs.base import (
    REFERENCES_FROM,
    Environment,
    Item,
    check_item_ids,
    checked_test_items,
    listed_items,
)
from resd.generation.hf import chat_prompt_ids
from resd.models import load_tokenizer, pick_device
from resd.parallel import full_tensor, make_parallel
from resd.rundir import (
    COUNTERS,
    GIVEN_IN_PYTHON,
    PHASES,
    PLAYBOOK_READERS,
    RUN_LOGS,
    SKIP_REASONS,
    TOP_LEVEL_FILES,
    append_jsonl,
    hold_folder,
    holds_run_logs,
    output_dir_problem,
    read_jsonl,
    truncate_jsonl,
)
from resd.training.algorithms import Algorithm, get_algorithm
from resd.training.callbacks import Callback, EarlyStopping, checked_callbacks
from resd.training.checkpoint import (
    check_readable,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    save_model,
)
from resd.training.hub import model_card, push_to_hub, write_model_card
from resd.training.lessons import Lessons, PlaybookChanges
from resd.training.plan import Schedule
from resd.training.playbook import Playbook
from resd.training.policy import PolicySampler, load_policy, merged_sampling
from resd.training.rollout import GivenRollout, PhaseTimer, Rollout, RowStats, row_seed
from resd.training.teacher import Teacher
from resd.training.teacher_context import SolutionBuffer
from resd.training.tracking import Tracker, check_trackers
from resd.training.update import Update

__all__ = ["PHASES", "Trainer"]

log = logging.getLogger(__name__)

# Settings a resumed run must share with its checkpoint: they decide the stream of prompts
# (which items, in which order, how many per step) and what is trained.
RESUME_FIXED = ("model", "algorithm", "env", "env_args", "seed", "shuffle", "epochs", "batch_size",
                "inner_updates", "rollouts_per_prompt", "lora", "teacher")  # fmt: skip


def training_items(env: Environment, algo: Algorithm, env_name: str) -> list[Item]:
    """The environment's training items, refused when there are none. An algorithm whose
    teacher reads the item's reference demonstration (SDFT) has nothing to distil on an
    item without one: with none at all, the run would train nothing while looking like it
    ran; with some missing, those items are counted in a warning. One id on two different
    items is refused, and the first item is scored once, so a `score` that returns no
    `Score` stops the run before the model loads."""
    items = listed_items(env, "training")
    if not items:
        raise ValueError(f"env: {env_name!r} has no training items")
    check_item_ids(items, "training")
    safe_score(env, items[0], items[0].reference or "")
    if not algo.demonstration:
        return items
    missing, algorithm = sum(not item.reference for item in items), algo.name
    where = f" ({REFERENCES_FROM})"
    if missing == len(items):
        raise ValueError(f"algorithm: {algorithm} distils from each item's reference "
                         f"demonstration, and no training item of env {env_name!r} has one"
                         f"{where}")  # fmt: skip
    if missing:
        log.warning("algorithm: %s distils from reference demonstrations; %d of %d training "
                    "items of env %r have none and are never distilled%s",
                    algorithm, missing, len(items), env_name, where)  # fmt: skip
    return items


def files_a_run_overwrites(run_dir: Path) -> list[str]:
    """Files in `run_dir` that a run writes at its top level and that no run of this
    config wrote there: a model folder given as `output_dir`, a project's own README.md or
    config.yaml. A config.yaml naming this `output_dir` is the trainer's own, from an
    attempt killed before it logged anything."""
    found = sorted({p.name for pattern in TOP_LEVEL_FILES for p in run_dir.glob(pattern)})
    if "config.yaml" in found:
        try:
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            ours = Path(saved["output_dir"]).resolve() == run_dir.resolve()
        except (yaml.YAMLError, TypeError, KeyError, OSError):
            ours = False
        if ours:
            found.remove("config.yaml")
    return found


def _environment(cfg: TrainConfig, env: Any, scorer: Any) -> Environment:
    """The run's environment: from the config, as given, or around an in-memory dataset."""
    if scorer is not None and (env is None or isinstance(env, Environment)):
        raise ValueError("scorer: only used with a dataset passed as env")
    if env is None:
        return make_env(cfg.env, cfg.env_args)
    if isinstance(env, Environment):
        return env
    if type(env).__module__.split(".")[0] == "datasets":
        from resd.envs.dataset import DatasetEnv

        return DatasetEnv.from_dataset(env, scorer=scorer or "exact_match", **cfg.env_args)
    if isinstance(env, type) and issubclass(env, Environment):
        raise TypeError(f"env: got the class {env.__name__}, not an environment: pass an "
                        f"instance, {env.__name__}(...)")  # fmt: skip
    if isinstance(env, str):  # a name or an import path: the config's field
        raise TypeError(f"env: expected an Environment or a datasets.Dataset, got the string "
                        f"{env!r}; an environment by name goes in the config: "
                        f"TrainConfig(env={env!r}, ...)")  # fmt: skip
    raise TypeError(f"env: expected an Environment or a datasets.Dataset, got {type(env).__name__}")


def _class_path(env: Environment) -> str:
    return f"{type(env).__module__}:{type(env).__qualname__}"


def _env_name(env: Environment) -> str:
    """An environment built in Python, named: its `name`, or its class where it kept the
    base's placeholder."""
    name = getattr(env, "name", "")
    return name if name and name != Environment.name else _class_path(env)


# Nats per token above which the teacher is said to agree with failed tokens: measured
# contexts that copied the mistake gave +0.58 and +0.72, one that taught −0.79; a few
# hundredths either way is a teacher that has barely moved from the student.
CONFIRMING_ADVANTAGE = 0.05


def teacher_confirms_failures(metrics: dict[str, Any]) -> bool:
    """True when a step distilled only failed rollouts and the teacher still preferred the
    student's tokens (mean log π_T − log π_θ over them > 0).

    On a failure the teacher should disagree somewhere; a teacher that copies the attempt
    or a quoted wrong answer from its context agrees everywhere, and the loss then sharpens
    the mistake. Measured (docs/results.md, the sanity check): +0.72 and +0.58 at step 1 for
    the two contexts that showed the wrong number, which never learned; −0.79 for the one
    that did not, which learned all 8 items.
    """
    return (
        metrics.get("success_rate", 1.0) == 0.0
        and metrics.get("distilled", 0) > 0
        and metrics.get("teacher_advantage", 0.0) > CONFIRMING_ADVANTAGE
    )


def memory_metrics(device: torch.device) -> dict[str, float]:
    """What this process holds: its peak resident memory so far (`host_memory_peak_gib`)
    and, on a GPU, the step's peak of allocated memory (`device_memory_peak_gib`, whose
    counter is reset here for the next step). The host figure never falls; a run whose
    host memory keeps climbing shows it here long before the machine runs out."""
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    metrics = {
        "host_memory_peak_gib": round(usage / (2**30 if sys.platform == "darwin" else 2**20), 3)
    }
    if device.type == "cuda":
        metrics["device_memory_peak_gib"] = round(
            torch.cuda.max_memory_allocated(device) / 2**30, 3
        )
        torch.cuda.reset_peak_memory_stats(device)
    return metrics


class Interrupted(KeyboardInterrupt):
    """`Trainer.interrupt` ended the run after a step (Ctrl-C, SIGTERM): it is checkpointed
    there (`checkpoint`; None when it had taken no step) and has no summary, so it reads as
    unfinished, and `--resume` (or `resd compare` run again) continues it."""

    def __init__(
        self, reason: str, step: int, checkpoint: Path | None, signum: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason, self.step, self.checkpoint, self.signum = reason, step, checkpoint, signum

    @property
    def saved(self) -> str:
        """Where the run stands, for the line a command prints."""
        where = f"{self.checkpoint} saved" if self.checkpoint else "no step taken, nothing to save"
        return f"interrupted ({self.reason}) after step {self.step}: {where}"

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process its signal ended: 128 + the signal (SIGINT's
        130 where no signal is known: an interruption asked for in Python)."""
        return 128 + (self.signum or signal.SIGINT)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        env: Environment | Any | None = None,
        scorer: str | Callable[..., Any] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        """`env` replaces the environment `cfg.env` names: an `Environment` built in Python,
        or a `datasets.Dataset`/`DatasetDict` scored by `scorer` (a built-in scorer's name
        or a function, see `resd.envs.dataset`; columns from `cfg.env_args`).
        `callbacks` are called as training begins and ends, on step end, evaluation and
        save (`resd.training.callbacks`)."""
        if not isinstance(cfg, TrainConfig):  # not an AttributeError on its first field
            raise TypeError(f"Trainer: cfg must be a resd.TrainConfig, got {type(cfg).__name__} "
                            "(from a YAML file: resd.load_config(path); from a mapping: "
                            "resd.TrainConfig(**mapping))")  # fmt: skip
        self.cfg = cfg
        self.callbacks = checked_callbacks(callbacks)
        if cfg.early_stopping is not None:
            self.callbacks.append(EarlyStopping(**cfg.early_stopping))
        self.parallel = make_parallel(cfg.strategy, cfg.zero_stage)
        self.parallel.check(cfg)
        check_trackers(cfg.report_to if self.parallel.is_main else [])
        if cfg.generation_backend == "vllm":  # the package and a GPU, before any load
            from resd.generation.vllm_engine import import_vllm

            import_vllm()
        if cfg.dtype == "bfloat16":
            log.warning("dtype: bfloat16 master weights round away updates smaller than about "
                        "1/256 of a weight (at lr %g most of AdamW's steps); float32 with bf16 "
                        "autocast keeps them", cfg.lr)  # fmt: skip
        self.algo = get_algorithm(cfg.algorithm)
        self.run_dir = Path(cfg.output_dir)
        self._let_go_of_run_dir: Callable[[], None] | None = None  # see _hold_run_dir
        self._seed(cfg.seed)
        self.env = _environment(cfg, env, scorer)
        # What the run's records (summary, model card) name: `cfg.env` unless Python gave one.
        self.env_name = cfg.env if env is None else _env_name(self.env)
        items = training_items(self.env, self.algo, getattr(self.env, "name", cfg.env))
        order, self.train_items = random.Random(cfg.seed), []
        for _ in range(cfg.epochs):  # the stream: every pass, each in its own order
            epoch = list(items)
            if cfg.shuffle:
                order.shuffle(epoch)
            self.train_items += epoch
        self.test_items = checked_test_items(self.env)[: cfg.eval_items]
        plan = Schedule.of(cfg, len(items))
        self.n_batches, self.total_steps, warmup = plan.batches, plan.steps, plan.warmup
        if warmup >= self.total_steps and cfg.lr_scheduler_type != "constant":
            log.warning("warmup_steps: %d for a run of %d step%s: the learning rate never "
                        "reaches lr (%g)", warmup, self.total_steps,
                        "" if self.total_steps == 1 else "s", cfg.lr)  # fmt: skip
        checkpoint = self._checkpoint_to_resume(resume)
        if cfg.keep_host_memory and pick_device(self.parallel.device(cfg.device)).type == "cpu":
            keep_freed_memory()  # before the model's weights and every step's tensors

        # The policy, its teachers and its optimizer; the sampler is made before sharding.
        self.tokenizer = load_tokenizer(
            cfg.model, cfg.max_prompt_tokens + cfg.max_new_tokens, init_kwargs=cfg.model_init_kwargs,
            chat_template=cfg.chat_template, chat_template_kwargs=cfg.chat_template_kwargs,
        )  # fmt: skip
        self.model, base_copy = load_policy(
            cfg, self.parallel, checkpoint, keep_base=merged_sampling(cfg, self.parallel)
        )
        self.model.train()
        self.device = next(self.model.parameters()).device
        lam = (
            self.algo.distillation_weight
            if cfg.distillation_weight is None
            else cfg.distillation_weight
        )
        # A pure policy-gradient run (grpo) never queries a teacher: no copy of the model.
        self.teacher = Teacher(self.model, cfg.teacher if lam > 0 else "live", cfg.teacher_update_rate,
                               cfg.trust_region_weight)  # fmt: skip
        self.reference = Teacher(self.model, "base") if cfg.kl_coef > 0 else None
        # A resumed run restores base/EMA/trust-region weights from the checkpoint.
        state, optimizer_state = (
            load_checkpoint(checkpoint, teachers=self._teachers()) if checkpoint else ({}, None)
        )
        self.sampler = PolicySampler(cfg, self.model, self.tokenizer, self.parallel, base_copy)
        for module in (self.model, self.teacher.copy, self.reference and self.reference.copy):
            if module is not None:
                self.parallel.shard_model(module, cfg.fsdp_reshard_after_forward)
        self.teacher.match_student_layout(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
        )
        self.parallel.prepare(self.model, self.optimizer, cfg.max_grad_norm)

        # The two halves of a step.
        self.lessons = Lessons(cfg, self.algo, self.tokenizer, self.sampler, self.parallel)
        self.update = Update(cfg, self.model, self.optimizer, self.teacher, self.reference, self.parallel,
                             self.tokenizer.pad_token_id, lam, after_step=self._after_step, total_steps=self.total_steps)  # fmt: skip
        self.step = 0
        self.warned_teacher = False  # teacher_confirms_failures is said once per run
        self.last_eval_step: int | None = None  # the same on every process
        self.totals: Counter[str] = Counter()
        # A caller's own resumable state, saved in every checkpoint beside the trainer's
        # (the serving learner keeps which feedback rows each step consumed).
        self.extra_state: dict[str, Any] = {}
        self.summary: dict[str, Any] | None = None  # what `train` returned, once it has run
        self.stop_reason: str | None = None  # set by `stop`: the run ends after this step
        self.interrupt_reason: str | None = None  # set by `interrupt`: ... and stays unfinished
        self.interrupt_signal: int | None = None  # the signal behind it, if one
        if checkpoint:
            self._restore(checkpoint, state, optimizer_state)
        # TensorBoard / W&B mirror the JSON-lines logs (which stay the source of truth).
        self.tracker = Tracker(
            self.run_dir, cfg.report_to if self.parallel.is_main else [], cfg.to_dict(),
            resume_step=self.step if checkpoint else None,
        )  # fmt: skip

    @property
    def playbook(self) -> Playbook:
        return self.lessons.playbook

    @property
    def buffer(self) -> SolutionBuffer:
        return self.lessons.buffer

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        """The checkpoint a resumed run continues from, or None for a run from step 0;
        decided before the model loads, so that a refusal comes at once."""
        problem = output_dir_problem(self.run_dir)
        if problem:
            raise FileExistsError(f"output_dir: {problem}")
        self._hold_run_dir()  # before anything in it is read as this run's, or cut
        logged = holds_run_logs(self.run_dir)
        if logged and not resume:
            raise FileExistsError(
                f"output_dir: {self.run_dir} already holds a run; pass --resume to continue it "
                "or choose another output_dir"
            )
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            check_readable(checkpoint)
            self._check_resumed_config(checkpoint)
        elif logged:
            # Killed before its first checkpoint: nothing to resume, so the run starts over,
            # and the logs of the lost steps go (they would otherwise appear twice).
            log.warning("resume: no checkpoint in %s; starting over from step 0 (its logs are cleared)",
                        self.run_dir)  # fmt: skip
            if self.parallel.is_main:
                for name in RUN_LOGS:
                    truncate_jsonl(self.run_dir / name, -1)
            self.parallel.barrier()
        else:
            others = files_a_run_overwrites(self.run_dir)
            if others:
                raise FileExistsError(
                    f"output_dir: {self.run_dir} holds {', '.join(others)}, which a run would "
                    "overwrite; choose an empty or new folder"
                )
            if resume:
                log.warning("resume: no run in %s; starting a new one", self.run_dir)
        return checkpoint

    def _after_step(self) -> None:
        """After each optimizer step: the EMA teacher follows the student,
        then whatever samples gets the new weights."""
        source = self.parallel.teacher_source(self.model) if self.teacher.copy is not None else None
        self.teacher.update(self.model, source)
        self.sampler.sync()

    # ---- lifecycle --------------------------------------------------------------------------------
    def write_config(self) -> None:
        """The resolved config as config.yaml in the run folder: what `resd eval --config`,
        `resd report` and `--resume` read back. By `train()`, and by a caller that drives
        the steps itself (`resd serve --learn`)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._hold_run_dir()  # a new folder: held from its first file
        given = (
            f"# env: {self.env_name}, {GIVEN_IN_PYTHON}\n" if self.env_name != self.cfg.env else ""
        )
        (self.run_dir / "config.yaml").write_text(
            given + yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        )

    def _hold_run_dir(self) -> None:
        """One process writes a run folder (`resd.rundir.hold_folder`): the main process
        holds it from its first look at it (or its making) to the end of `train()`, or
        for as long as this Trainer lives where nothing calls `train()`."""
        if self.parallel.is_main and self._let_go_of_run_dir is None:
            self._let_go_of_run_dir = hold_folder(self.run_dir, "output_dir")
            if self._let_go_of_run_dir is not None:
                weakref.finalize(self, self._let_go_of_run_dir)

    def _let_go(self) -> None:
        """The run folder, for another process to resume or read as finished."""
        if self._let_go_of_run_dir is not None:
            self._let_go_of_run_dir()
            self._let_go_of_run_dir = None

    def train(self) -> dict[str, Any]:
        """Run to the end of the stream (or `steps`), evaluating and checkpointing on schedule.

        Under data parallelism only rank 0 writes files and evaluates; the others wait.
        """
        if self.summary is not None:  # its trackers are closed and the summary written
            log.warning("train: this Trainer has finished; its summary is returned again "
                        "(to train further, build a Trainer with resume=True and more steps)")  # fmt: skip
            return self.summary
        cfg, main = self.cfg, self.parallel.is_main
        if main:
            self.write_config()
        for callback in self.callbacks:
            callback.on_train_begin(self)
        if self.step == 0 and self.test_items:
            self.evaluate()
        stopped = self._stop_agreed()  # a callback may end the run at its first evaluation
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=cfg.algorithm,
            disable=not (cfg.progress and main),
        )
        last: dict[str, Any] = {}
        while self.step < self.total_steps and not stopped:
            batch = self.step // cfg.inner_updates
            last = self.train_step(
                self.train_items[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
            )
            self.log_step(last)
            bar.update(1)
            bar.set_postfix(
                loss=f"{last['loss']:.4f}", reward=f"{last['reward']:.2f}", score=f"{last['score']:.2f}",
                playbook=last["playbook_size"], s=f"{last['time_step']:.1f}",
            )  # fmt: skip
            done = self.step >= self.total_steps
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not done and self.test_items:
                self.evaluate()
            stopped = not done and self._stop_agreed()
            if (cfg.save_every and self.step % cfg.save_every == 0) or done or stopped:
                self.save()
        bar.close()
        if self.interrupt_reason is not None and stopped:  # checkpointed above; no summary
            self.tracker.close()
            self.parallel.barrier()
            saved = self.run_dir / f"checkpoint-{self.step}" if self.step else None
            self._let_go()
            raise Interrupted(self.interrupt_reason, self.step, saved, self.interrupt_signal)
        # Decided from memory, not from eval.jsonl: rank 0 may already be appending to it.
        if self.test_items and self.last_eval_step != self.step:
            self.evaluate()
        summary = {
            "steps": self.step, "run_dir": str(self.run_dir), "env": self.env_name, "last": last,
            "strategy": self.parallel.name, "world_size": self.parallel.world_size,
            "stopped_early": self.stop_reason,
            **(self._evaluations() if main else {}),
        }  # fmt: skip
        self.save_model(summary, push=False)
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.close()
        self.parallel.barrier()
        self.summary = summary
        for callback in self.callbacks:
            callback.on_train_end(self, summary)
        self._let_go()
        if cfg.push_to_hub and main:  # last: a failed push loses nothing of the run
            try:
                self._push()
            except Exception as exc:
                raise ValueError(f"push_to_hub: the run is complete in {self.run_dir}, but the "
                                 f"push failed: {type(exc).__name__}: {exc}") from exc  # fmt: skip
        return summary

    def stop(self, reason: str) -> None:
        """End the run after the current step, as `control.should_training_stop` does in
        transformers: the run checkpoints, evaluates (unless it just did) and writes its
        summary as at the end of the stream, with `stopped_early` set to `reason`. For a
        callback; one rank asking is enough, and every rank stops at the same step
        (`--resume` continues the run from there, towards its `steps`)."""
        self.stop_reason = reason

    def interrupt(self, reason: str, *, signum: int | None = None) -> None:
        """End the run after the current step with a checkpoint and no summary: unlike
        `stop`, the run is unfinished, and `--resume` continues it. What Ctrl-C and SIGTERM
        do under `resd train` (a preempted machine, a queue's time limit); `train()` then
        raises `Interrupted`. Safe to call from a signal handler: it only sets a flag."""
        self.interrupt_reason, self.interrupt_signal = reason, signum

    def _stop_agreed(self) -> bool:
        """Whether any rank asked to stop or was interrupted: one collective, so all of them
        leave the loop together (a rank alone would leave the others waiting in the next
        step's), and an interruption on one rank interrupts them all."""
        asked = 2 if self.interrupt_reason is not None else int(self.stop_reason is not None)
        agreed = self.parallel.max(asked)
        if agreed == 0:
            return False
        if agreed == 2:
            self.interrupt_reason = self.interrupt_reason or "another process was interrupted"
        else:
            self.stop_reason = self.stop_reason or "another process asked to stop"
        return True

    def save(self) -> Path:
        """Checkpoint: every process helps gather full tensors, rank 0 writes them."""
        path = self.run_dir / f"checkpoint-{self.step}"
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
                "cursor": {"batch": self.step // self.cfg.inner_updates, "inner": self.step % self.cfg.inner_updates},
                "playbook": self.playbook.to_dict(), "buffer": self.buffer.solutions,
                "totals": dict(self.totals), "config": self.cfg.to_dict(), "env_class": _class_path(self.env),
                "extra": self.extra_state,
            }  # fmt: skip
            path = save_checkpoint(
                self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer,
                model_state=model_state, teacher_states=teacher_states,
                optimizer_state=optimizer_state, state=state, keep=self.cfg.keep_checkpoints,
                card=model_card(self.cfg, {"steps": self.step, "env": self.env_name,
                                           **self._evaluations(of_step=self.step)}),
            )  # fmt: skip
        self.parallel.barrier()
        for callback in self.callbacks:
            callback.on_save(self, path)
        return path

    def _evaluations(self, of_step: int | None = None) -> dict[str, Any]:
        """eval.jsonl's first and last rows as a summary's `eval_before` / `eval_after`;
        with `of_step`, only if the last evaluation was of that step's weights (a run's
        last checkpoint is written before its final evaluation)."""
        evals = read_jsonl(self.run_dir / "eval.jsonl")
        if not evals or (of_step is not None and evals[-1].get("step") != of_step):
            return {}
        return {"eval_before": evals[0], "eval_after": evals[-1]}

    def save_model(self, summary: dict[str, Any] | None = None, *, push: bool = True) -> Path:
        """The trained model (a LoRA run: its adapter) and its tokenizer at the top of
        `output_dir`, where `from_pretrained`, `resd eval` and vLLM look, with a model card;
        pushed to the Hub when `push_to_hub` is set and `push` (every process helps gather)."""
        model_state = self.parallel.full_state_dict(self.model) if self.parallel.sharded else None
        if self.parallel.is_main:
            save_model(self.run_dir, self.model, self.tokenizer, model_state)
            write_model_card(self.run_dir, self.cfg, summary or {})
            if self.cfg.push_to_hub and push:
                self._push()
        self.parallel.barrier()
        return self.run_dir

    def _push(self) -> str:
        return push_to_hub(self.run_dir, self.cfg.hub_model_id or self.run_dir.name)

    def _teachers(self) -> dict[str, Teacher]:
        return {
            "teacher": self.teacher,
            **({"reference": self.reference} if self.reference else {}),
        }

    def _check_resumed_config(self, path: Path) -> None:
        """A resumed run replays the stream of the run it continues: settings that change
        which prompts a step sees, or what is trained, must be the checkpoint's. Others
        (steps, learning rate, evaluation, saving) may change, and each change is said."""
        state = read_state(path)  # a complete checkpoint has it
        # `now` as the checkpoint holds it, in JSON, where a tuple (given in Python) is a list
        saved, now = state.get("config", {}), json.loads(json.dumps(self.cfg.to_dict()))
        env_class = _class_path(self.env)  # also where `cfg.env` cannot tell (given in Python)
        if state.get("env_class", env_class) != env_class:
            raise ValueError(f"env: {env_class} now, {state['env_class']} in {path.name}; a "
                             "resumed run continues on the environment it started on")  # fmt: skip
        had_reference, has_reference = saved.get("kl_coef", 0) > 0, now["kl_coef"] > 0
        if had_reference != has_reference:  # none saved to restore, or one saved for nothing
            raise ValueError(f"kl_coef: {now['kl_coef']} now, {saved.get('kl_coef')} in {path.name}; "
                             "the KL reference is the initial model, which a checkpoint keeps only "
                             "when the run started with kl_coef > 0")  # fmt: skip
        changed = {
            k: (saved[k], now[k])
            for k in saved
            if k in now and saved[k] != now[k] and k != "output_dir"
        }
        fixed = [k for k in RESUME_FIXED if k in changed]
        if fixed:
            was, new = changed[fixed[0]]
            raise ValueError(
                f"{fixed[0]}: {new!r} now, {was!r} in {path.name}; a resumed run keeps the "
                f"settings that decide its data and method ({', '.join(RESUME_FIXED)}): "
                "resume with the old value or start a new output_dir"
            )
        for key, (was, new) in changed.items():
            log.warning("resume: %s changed since %s: %r -> %r", key, path.name, was, new)

    def _restore(self, path: Path, state: dict[str, Any], optimizer_state: dict) -> None:
        self.parallel.load_optimizer_state(self.model, self.optimizer, optimizer_state)
        self.step = int(state["step"])
        self.lessons.playbook = Playbook.from_dict(state["playbook"])
        self.lessons.buffer = SolutionBuffer(
            dict(state["buffer"]), keep=self.cfg.solution_buffer_keep
        )
        self.totals = Counter(state.get("totals", {}))
        self.extra_state = dict(state.get("extra", {}))
        if self.parallel.is_main:
            for name in RUN_LOGS:
                truncate_jsonl(self.run_dir / name, self.step)
        self.parallel.barrier()
        evals = read_jsonl(self.run_dir / "eval.jsonl")
        self.last_eval_step = evals[-1]["step"] if evals else None
        log.info("resumed from %s at step %d", path, self.step)

    # ---- one step -----------------------------------------------------------------------------------
    def train_step(
        self, items: list[Item], given: Sequence[GivenRollout] | None = None
    ) -> dict[str, Any]:
        """One inner iteration on `items` (the global batch); returns the step's metrics.

        Each process works on its share of the rollouts; what changes shared state is
        gathered and applied in global order, so every process ends the step the same.
        `given` replaces sampling and scoring with replies and scores from elsewhere (the
        off-policy entry that `resd serve --learn` uses; `items` is then ignored).
        """
        cfg, lessons = self.cfg, self.lessons
        step = self.step + 1
        self._seed(cfg.seed * 1_000_003 + step)
        # `counts`: this process's own work (summed over processes below); `changes`: what
        # the step did to the playbook, which every process does identically.
        timer, counts, changes = PhaseTimer(), Counter(), PlaybookChanges()
        lessons.omitted = {}
        start, size_before = time.perf_counter(), len(self.playbook)

        with timer("rollout"):
            if given is None:
                flat = [it for it in items for _ in range(cfg.rollouts_per_prompt)]
                mine = self.parallel.shard(flat)
                prompts = {id(it): chat_prompt_ids(self.tokenizer, lessons.student_messages(it), cfg.max_prompt_tokens)
                           for it in items}  # fmt: skip
                gens = self.sampler.rollouts([prompts[id(flat[g])] for g in mine],
                                             [row_seed(cfg.seed, step, "rollout", g) for g in mine])  # fmt: skip
        with timer("feedback"):
            if given is None:
                rollouts = [Rollout(flat[g], prompts[id(flat[g])], gen, safe_score(self.env, flat[g], gen.text), index=g)
                            for g, gen in zip(mine, gens, strict=True)]  # fmt: skip
            else:
                rollouts = [Rollout(given[g].item, given[g].prompt_ids, given[g].gen, given[g].score, index=g)
                            for g in self.parallel.shard(list(given))]  # fmt: skip
        outcomes = self.parallel.gather_indexed([(r.index, r.outcome()) for r in rollouts])
        lessons.prune(step, changes)
        with timer("reflect"):
            lessons.reflect(rollouts, outcomes, step, counts, changes)
        with timer("curate"):
            lessons.curate(rollouts, step, counts, changes)
        peers = lessons.remember_solutions(rollouts)
        lessons.teacher_prompts(rollouts, peers)
        update = self.update(rollouts, outcomes, timer, step)  # teacher and update phases
        self.step = step

        counts = Counter({k: int(self.parallel.sum(counts.get(k, 0))) for k in COUNTERS})
        counts.update(changes.applied)
        self.totals.update(counts)
        stats = self.parallel.gather_indexed(
            [(r.index, RowStats(r.distill, len(r.gen.token_ids), r.gen.finished)) for r in rollouts]
        )
        n = len(outcomes)
        metrics = {
            "step": step, "batch": (step - 1) // cfg.inner_updates, "inner": (step - 1) % cfg.inner_updates,
            "lr": self.update.lr(step), **update,
            "reward": sum(o.reward for o in outcomes) / n, "score": sum(o.score for o in outcomes) / n,
            **reward_means(o.parts for o in outcomes),
            "success_rate": sum(o.success for o in outcomes) / n, "rollouts": n,
            "distilled": sum(s.distilled for s in stats), "response_tokens": sum(s.tokens for s in stats) / n,
            "truncated": sum(not s.finished for s in stats) / n,
            "playbook_size": len(self.playbook), "playbook_added": len(changes.added),
            "playbook_removed": len(set(changes.removed)), "playbook_updated": len(set(changes.updated)),
            "playbook_size_before": size_before,
            "buffer_size": len(self.buffer),
            **{k: counts.get(k, 0) for k in COUNTERS},
            **{f"ops_skipped_{k}": counts.get(f"ops_skipped_{k}", 0) for k in SKIP_REASONS},
            # entries each reader was not shown for lack of budget (every process sees the same)
            **{f"playbook_omitted_{k}": lessons.omitted.get(k, 0) for k in PLAYBOOK_READERS},
            **{f"time_{p}": round(s, 4) for p, s in timer.seconds.items()},
            "time_step": round(time.perf_counter() - start, 4),
            **memory_metrics(self.device),
        }  # fmt: skip
        self._log_samples(rollouts, step)
        if self.algo.playbook:
            self._append("playbook_history.jsonl", {
                "step": step, "size": len(self.playbook), "sections": self.playbook.section_counts(),
                "added": changes.added, "removed": sorted(set(changes.removed)),
                "updated": sorted(set(changes.updated)),
            })  # fmt: skip
        return metrics

    # ---- evaluation and logs ------------------------------------------------------------------------
    def log_step(self, metrics: dict[str, Any]) -> None:
        """A step's metrics to metrics.jsonl and the trackers, then the step-end callbacks."""
        self._append("metrics.jsonl", metrics)
        self.tracker.log(metrics, self.step, prefix="train")
        if not self.warned_teacher and teacher_confirms_failures(metrics):
            self.warned_teacher = True
            log.warning(
                "step %d: teacher_advantage is %+.2f although every distilled rollout failed: "
                "the teacher rates the student's own failing tokens higher than the student "
                "does, so distillation reinforces them. A teacher copies what its context "
                "shows (the previous attempt, feedback that repeats the wrong answer); see "
                "'Is the teacher teaching?' in the README.",
                metrics["step"], metrics["teacher_advantage"],
            )  # fmt: skip
        for callback in self.callbacks:
            callback.on_step_end(self, metrics)

    @staticmethod
    def _seed(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def evaluate(self) -> dict[str, Any] | None:
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
            self.sampler.backend, self.tokenizer, self.env, self.test_items, samples=cfg.eval_samples,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p, top_k=cfg.eval_top_k, min_p=cfg.eval_min_p,
            max_prompt_tokens=cfg.max_prompt_tokens, prompt_messages=self.lessons.student_messages,
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
        if self.parallel.is_main:
            append_jsonl(self.run_dir / name, row)
