"""The background learner of `resd serve --learn CONFIG`: RESD steps on served traffic.

Users and checkers post feedback on completions the server wrote; this thread turns the
stored (prompt, reply, score, feedback) rows into training steps. Each step is an
ordinary `Trainer.train_step` in which the rollouts are *given* (`GivenRollout`) instead
of sampled: reflect on the failures, curate the playbook, build each teacher context
from the stored feedback, distil. The replies were sampled by whatever version was
served at the time, so the update weighs every token by the capped ratio between the
policy and the serving model's recorded log-probabilities (`rollout_is_cap`: 2 here
unless the config sets it).

After each step a guard decides whether the new weights are served: the environment's
held-out items (`eval_items` of the config's `env`) are scored, and the new version
replaces the served one only if `guard_metric` did not fall. The swap is a reference
swap in the `ModelHolder`: requests in flight finish on the old version.

Exactly once. A step's checkpoint records the feedback ids it consumed, and only then
are those rows marked consumed in the database. Killed before the checkpoint, the rows
are still unconsumed and the restarted learner (resuming from the previous checkpoint)
trains on them once; killed between the two, the restart finds the ids in the
checkpoint and marks them without training again.

A restart serves what was served. The checkpoints hold the trainer's latest weights, which
the guard may have kept off the server (and `keep_checkpoints` may have pruned the served
step's); so each served version's weights are also written to `served.safetensors` in the
learner's folder (once a version, when a later step is refused), and a restart loads them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from resd.config import TrainConfig, apply_overrides, build_config, first_line, read_yaml_mapping
from resd.envs import make_env
from resd.envs.base import Item, Score
from resd.generation.base import Generation
from resd.rundir import LEARNER_DIR, eval_metric, holds_run_logs, read_jsonl
from resd.serve.engine import ModelHolder, ServedModel, same_model
from resd.serve.store import Store, TrainingRow
from resd.training.checkpoint import save_tensors
from resd.training.rollout import GivenRollout
from resd.training.trainer import Trainer

__all__ = ["Learner", "LearnerSettings", "given_rollout"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnerSettings:
    """How the learner paces itself; everything else is the train config."""

    min_rows: int  # rows with feedback needed before a step (default: the config's batch_size)
    poll_seconds: float = 2.0
    guard_metric: str = "case_mean@k"  # an evaluation metric; higher is better
    guard_tolerance: float = 0.0  # serve when new >= served - tolerance


def given_rollout(row: TrainingRow) -> GivenRollout:
    """A stored interaction with its feedback, as the trainer's off-policy input.

    Identical prompts share an item id, so the solution buffer can hold a success for a
    prompt that users send again. A row without a reward counts as a failure unless its
    score is perfect; a row without a score takes its reward as the score. A reply the
    server cut at max_tokens (finish_reason "length") is an unfinished generation.
    """
    key = hashlib.sha1(json.dumps(row.messages, sort_keys=True).encode()).hexdigest()[:12]
    item = Item(id=f"served/{key}", messages=list(row.messages))
    reward = row.reward if row.reward is not None else float((row.score or 0.0) >= 1.0)
    score = row.score if row.score is not None else reward
    finished = row.finish_reason == "stop"
    gen = Generation(list(row.response_token_ids), row.response, finished, row.response_logprobs)
    return GivenRollout(item, list(row.prompt_token_ids), gen, Score(reward, score, row.feedback))


def learner_config(
    path: str | Path, *, output_dir: str | Path, overrides: list[str] | None = None,
    min_rows: int | None = None, check_env: bool = False,
) -> TrainConfig:  # fmt: skip
    """The learner's train config (its run folder: `<output_dir>/learner`), refused where a
    learner cannot run it; with `check_env`, its environment is built too. `resd serve`
    calls it before the served model loads, so a bad config costs no load."""
    data = read_yaml_mapping(path)
    # Served replies come from another copy of the weights: their ratio to the policy is
    # capped at 2 unless the config says otherwise (null: no correction).
    default = [] if "rollout_is_cap" in data else ["rollout_is_cap=2.0"]
    run_dir = Path(output_dir) / LEARNER_DIR
    cfg = build_config(
        apply_overrides(data, [*default, *(overrides or []), f"output_dir={run_dir}"])
    )
    if cfg.early_stopping is not None:
        raise ValueError("early_stopping: a learner trains for as long as feedback comes; "
                         "its guard (--guard-metric) decides which steps are served")  # fmt: skip
    if min_rows is not None and not 1 <= min_rows <= cfg.batch_size:
        raise ValueError(f"--learn-min-rows: {min_rows} is not in 1..{cfg.batch_size} "
                         f"(a step takes at most the config's batch_size rows)")  # fmt: skip
    if check_env:
        make_env(cfg.env, cfg.env_args)
    return cfg


# The served version's weights in the learner's folder, for a restart (module docstring).
SERVED_WEIGHTS = "served.safetensors"


def _file_version(path: Path) -> str | None:
    """The version whose weights `served.safetensors` holds, or None without the file."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("version")


class Learner:
    """Runs learner steps in a background thread; `step_once` is the unit (and the tests')."""

    def __init__(
        self, trainer: Trainer, store: Store, holder: ModelHolder, settings: LearnerSettings
    ) -> None:
        self.trainer, self.store, self.holder, self.settings = trainer, store, holder, settings
        self.steps: list[dict[str, Any]] = list(trainer.extra_state.get("history", []))
        self._lock = threading.Lock()  # one step at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        # (ids, step, cursor) of rows a saved checkpoint trained on that the database may not
        # have marked (a kill, or a failed write, between the two): see `_mark_consumed`
        consumed = trainer.extra_state.get("consumed")
        self._unmarked: tuple[list[int], int, dict[str, Any] | None] | None = (
            (list(consumed), int(trainer.extra_state["consumed_step"]), None) if consumed else None
        )
        self._mark_consumed()
        trainer.write_config()  # its run folder reads as any run's (`resd report`, `resd eval`)
        if trainer.step == 0:
            self._baseline()
        self._snapshot_status()

    @classmethod
    def from_config(
        cls,
        path: str | Path,
        *,
        store: Store,
        holder: ModelHolder,
        output_dir: str | Path,
        overrides: list[str] | None = None,
        min_rows: int | None = None,
        guard_metric: str = "case_mean@k",
        guard_tolerance: float = 0.0,
    ) -> Learner:
        """Build the trainer from a train config (its run folder: `<output_dir>/learner`),
        resuming it when that folder already holds a learner's run."""
        cfg = learner_config(path, output_dir=output_dir, overrides=overrides, min_rows=min_rows)
        run_dir = Path(cfg.output_dir)
        served = holder.current()
        if not same_model(str(cfg.model), served.source):
            log.warning("learner: the config trains %s while the server serves %s; the first "
                        "swap replaces the served model", cfg.model, served.source)  # fmt: skip
        # resumed whenever the folder holds a run's logs: a server stopped before its
        # first step leaves only the starting model's evaluation, and starts over from it
        trainer = Trainer(cfg, resume=holds_run_logs(run_dir))
        settings = LearnerSettings(min_rows or cfg.batch_size, guard_metric=guard_metric,
                                   guard_tolerance=guard_tolerance)  # fmt: skip
        learner = cls(trainer, store, holder, settings)
        last = trainer.extra_state.get("served_version")
        if trainer.step and last:  # a restarted server serves what the learner last served
            restored = learner._restore_served(last, trainer.extra_state.get("served_step"))
            if restored is not None:
                holder.swap(restored)
        return learner

    # ---- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="resd-learner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.step_once() is None:
                    self._stop.wait(self.settings.poll_seconds)
            except Exception as exc:  # keep serving; the page and /health show the error
                log.exception("learner step failed")
                self.error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(self.settings.poll_seconds)

    # ---- one step -----------------------------------------------------------------------------
    def step_once(self) -> dict[str, Any] | None:
        """Train on the oldest unconsumed feedback rows if there are enough; the step's
        record (metrics, guard, served version), or None when there was nothing to do."""
        with self._lock:
            trainer = self.trainer
            self._mark_consumed()
            rows = self.store.unconsumed(trainer.cfg.batch_size)
            if len(rows) < self.settings.min_rows:
                return None
            metrics = trainer.train_step([], [given_rollout(r) for r in rows])
            trainer.log_step(metrics)
            step = trainer.step
            served = self.holder.current()
            evaluation = trainer.evaluate() if trainer.test_items else None
            accuracy = self._guard(evaluation)
            before = self._served_accuracy(served.version)
            serve = (
                accuracy is None
                or before is None
                or accuracy >= before - self.settings.guard_tolerance
            )
            version = f"{served.name}@step{step}" if serve else served.version
            record = {
                "step": step, "rows": len(rows), "reward": metrics["reward"], "score": metrics["score"],
                "loss": metrics["loss"], "playbook_size": metrics["playbook_size"],
                "accuracy": accuracy, "served_accuracy": before, "served": serve, "version": version,
            }  # fmt: skip
            self.steps.append(record)
            ids = [r.feedback_id for r in rows]
            kept = trainer.extra_state
            if not serve and served.version == kept.get("served_version"):
                # the trainer moves on from the served weights: keep them for a restart
                # (before the checkpoint that records this step: a kill between the two
                # must not leave a checkpoint whose served weights are nowhere)
                self._keep_served(served)
            trainer.extra_state = {
                "consumed": ids, "consumed_step": step, "history": self.steps,
                "served_version": version if serve else kept.get("served_version"),
                "served_step": step if serve else kept.get("served_step"),
            }  # fmt: skip
            trainer.save()  # the checkpoint knows which rows this step consumed ...
            self._unmarked = (ids, step, {"step": step, "version": version})
            self._mark_consumed()
            if serve:  # ... then they are marked, and the new weights are served
                self.store.add_version(version, parent=served.version, step=step, accuracy=accuracy,
                                       note=f"trained on {len(rows)} rows")  # fmt: skip
                self.holder.swap(self._snapshot(version))
            self._snapshot_status()
            log.info("learner step %d: %s", step, record)
            return record

    def _snapshot(self, version: str) -> ServedModel:
        """A frozen copy of what the trainer samples from: later steps do not touch it."""
        model = copy.deepcopy(self.trainer.sampler.generator).eval().requires_grad_(False)
        return ServedModel(
            model=model, tokenizer=self.trainer.tokenizer, version=version,
            name=self.holder.current().name, source=f"{self.trainer.run_dir}@{version}",
        )  # fmt: skip

    def _keep_served(self, served: ServedModel) -> None:
        """The served weights, under their version, where a restart finds them (written
        whole, then renamed: a kill leaves the previous version's file). Written once a
        version, at the first step the guard refuses after it: while the served version is
        the trainer's latest step, its checkpoint holds them."""
        path = self.trainer.run_dir / SERVED_WEIGHTS
        if _file_version(path) == served.version:
            return
        partial = path.with_name(f".tmp-{SERVED_WEIGHTS}")
        save_tensors(partial, served.model.state_dict(), metadata={"version": served.version})
        partial.replace(path)

    def _restore_served(self, version: str, step: int | None) -> ServedModel | None:
        """After a restart: `version`, the one last served, as it was. Its step is the
        trainer's own when the last step was served (killed before `_keep_served` or not);
        else its weights are in `served.safetensors`. None (the loaded model stays) when
        neither holds them: a run from before the file was written."""
        served = self._snapshot(version)
        if step == self.trainer.step:
            return served
        path = self.trainer.run_dir / SERVED_WEIGHTS
        why = "no such file" if not path.is_file() else "another version's"
        try:
            if _file_version(path) == version:
                _, unexpected = served.model.load_state_dict(load_file(str(path)), strict=False)
                if not unexpected:
                    return served
                why = "other weights"
        except Exception as exc:  # damaged (SafetensorError): a copy cut short, an edit
            why = f"cannot be read: {first_line(exc)}"
        log.warning("learner: the weights of %s, the version last served, are not in %s (%s); "
                    "serving the model loaded until a step is served", version, path, why)  # fmt: skip
        return None

    def _served_accuracy(self, version: str) -> float | None:
        for v in self.store.versions():
            if v["id"] == version:
                return v.get("accuracy")
        return None

    def _guard(self, evaluation: dict[str, Any] | None) -> float | None:
        """The guard metric of an evaluation (None: no held-out items), or an error naming
        the metrics it has: a `rewards/<name>` the environment's scores do not carry."""
        if evaluation is None:
            return None
        return eval_metric(evaluation, self.settings.guard_metric, "--guard-metric")

    def _baseline(self) -> None:
        """Score the served starting model on the guard items once, so the first step has
        something to beat (the trainer starts from the same weights)."""
        served = self.holder.current()
        evaluation = self.trainer.evaluate() if self.trainer.test_items else None
        accuracy = self._guard(evaluation)
        # registered by the server already (without an accuracy; its note, "loaded from
        # <model>", is what a restart is checked against, so it stays) or not: this fills it in
        known = any(v["id"] == served.version for v in self.store.versions())
        self.store.add_version(served.version, parent=None, step=0, accuracy=accuracy,
                               note="" if known else "the starting model")  # fmt: skip

    def _mark_consumed(self) -> None:
        """Mark the rows the last saved checkpoint trained on, if the database has not yet:
        at start-up (killed between the two writes) and before each step reads the
        unconsumed rows (the write failed while serving), so none is trained on twice."""
        if self._unmarked is not None:
            ids, step, cursor = self._unmarked
            self.store.mark_consumed(ids, step, cursor=cursor)
            self._unmarked = None

    # ---- what the page shows ------------------------------------------------------------------
    def _snapshot_status(self) -> None:
        """What the page and /health show, taken once per step: `status()` must answer
        while a step runs (minutes) without waiting for it or re-reading the logs."""
        run_dir = self.trainer.run_dir
        self._status = {
            "step": self.trainer.step,
            "playbook_markdown": self.trainer.playbook.render(),
            "playbook_history": read_jsonl(run_dir / "playbook_history.jsonl"),
            "steps": list(self.steps),
            "accuracy": [
                {"step": r["step"], "accuracy": r.get(self.settings.guard_metric)}
                for r in read_jsonl(run_dir / "eval.jsonl")
            ],
        }

    def status(self) -> dict[str, Any]:
        return {**self._status, "error": self.error}
