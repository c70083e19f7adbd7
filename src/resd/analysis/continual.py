"""`resd continual`: train on a sequence of tasks and measure what is kept and forgotten.

    resd continual --config configs/continual.yaml [key=value ...]

The config is an ordinary training config (every TrainConfig key; `key=value` overrides
apply to it) plus:

    stages:                       # trained in order, each from the previous stage's model
      - {env: arithmetic, env_args: {n_train: 64}, steps: 20}
      - {name: factory, env: manufactoria, steps: 40, lr: 1.0e-5}   # any TrainConfig key
    heldout:                      # evaluated at every row, never trained on
      - {name: ifeval, env: ifeval, env_args: {path: ../shared/data/ifeval_100.parquet}}
    eval_all_tasks: false         # true: every row evaluates every stage's task

A stage's keys override the base config for that stage only; its `env_args` replace the
base's (they belong to another environment); `model` and `output_dir` are set by the
chain (a stage that names either is refused), and so is `playbook_init` unless the stage
sets it (null: start empty). A held-out suite may also set evaluation keys
(`eval_items`, `eval_samples`, `eval_max_new_tokens`, ...).

Stage k (1-based) trains in `<output_dir>/stage-<k>-<name>/` starting from stage k−1's
final model, its last checkpoint folder (for a LoRA stage, the adapter
merged into its base, since a LoRA run starts from a full model), and from its playbook
(`playbook_init` = its `playbook.json`): what the playbook learnt is carried forward
like the weights.

Evaluation rows: "before" (the base model) and one after each stage. A row evaluates the
tasks seen so far (row 0: the first stage's task, the base reference) and every held-out
suite, with the evaluation code of `resd eval` and the settings of the stage that
introduced the task, at the same seed in every row: differences between rows are the
model's, not the sampler's. The accuracy of the matrix is the per-test-case mean@k
(`case_mean@k`); the per-task mean@k is kept beside it.

Metrics over the matrix acc[s][i] (row s = after stage s, task i; spec-free standard
definitions, Chaudhry et al. 2018 / Lopez-Paz & Ranzato 2017):
  forgetting         = mean over tasks i < T of (max over i ≤ s < T of acc[s][i]) − acc[T][i]
  backward transfer  = mean over tasks i < T of acc[T][i] − acc[i][i]
Forgetting ≥ 0 means accuracy lost since its best; BWT < 0 means later training hurt.

Everything lands in `<output_dir>/continual.json` and a table is printed. Re-running the
same command reuses finished stages (`summary.json`), resumes interrupted ones from their
last checkpoint, and reuses finished evaluation rows (`evals/row-<k>.json`); a re-run with
other settings (`continual-config.yaml` records them all) is refused before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resd.analysis.eval_cli import (
    EvalSettings,
    evaluate_env,
    is_adapter,
    load_policy,
    merge_adapter,
)
from resd.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    build_config,
    read_yaml_mapping,
    recorded_settings,
    settings_differences,
    yaml_problem,
)
from resd.envs import Environment, make_env
from resd.rundir import holding, path_option, read_json_object, read_summary

log = logging.getLogger(__name__)

ACCURACY = "case_mean@k"  # the matrix entry (the paper reports per-test-case accuracy)
ALSO_KEPT = "task_mean@k"
# Keys a held-out suite may set for its evaluation (besides name, env, env_args).
HELDOUT_EVAL_KEYS = frozenset(
    {"eval_items", "eval_samples", "eval_temperature", "eval_top_p", "eval_top_k", "eval_min_p",
     "eval_max_new_tokens", "max_new_tokens", "max_prompt_tokens"}
)  # fmt: skip
Matrix = Sequence[Sequence[float | None]]


# ---- the metric arithmetic ------------------------------------------------------------------
def forgetting(acc: Matrix) -> float | None:
    """Average forgetting over tasks 0..T−2 of a T×T matrix acc[stage][task] (0-based,
    after each training stage; None = not evaluated).

    For task i: the best accuracy it had from the stage that trained it up to the one
    before the last (i ≤ s < T−1), minus its final accuracy. Stages before task i was
    trained do not count even when evaluated (`eval_all_tasks`): forgetting is about
    what was learnt, not about what the base model happened to know. None when no
    earlier task has both numbers.
    """
    last = len(acc) - 1
    drops = []
    for i in range(last):
        final = acc[last][i]
        earlier = [acc[s][i] for s in range(i, last) if acc[s][i] is not None]
        if final is not None and earlier:
            drops.append(max(earlier) - final)
    return sum(drops) / len(drops) if drops else None


def backward_transfer(acc: Matrix) -> float | None:
    """BWT over tasks 0..T−2: mean of acc[T−1][i] − acc[i][i] (final minus just-learnt)."""
    last = len(acc) - 1
    diffs = [
        acc[last][i] - acc[i][i]
        for i in range(last)
        if acc[last][i] is not None and acc[i][i] is not None
    ]
    return sum(diffs) / len(diffs) if diffs else None


# ---- the plan -------------------------------------------------------------------------------
@dataclass
class Suite:
    """Something to evaluate: a stage's task or a held-out suite."""

    name: str
    env: str
    env_args: dict[str, Any]
    settings: EvalSettings
    _instance: Environment | None = field(default=None, repr=False)

    def environment(self) -> Environment:
        """Built once: every row evaluates the very same items."""
        if self._instance is None:
            self._instance = make_env(self.env, self.env_args)
        return self._instance


@dataclass
class Stage:
    name: str
    config: TrainConfig  # model / playbook_init / output_dir are filled in when it runs
    suite: Suite
    # The stage sets playbook_init itself (null: start empty) instead of carrying one on.
    own_playbook: bool = False


@dataclass
class ContinualPlan:
    base: TrainConfig
    stages: list[Stage]
    heldout: list[Suite]
    eval_all_tasks: bool = False

    @property
    def out(self) -> Path:
        return Path(self.base.output_dir)

    def row_suites(self, row: int) -> list[Suite]:
        """What row `row` evaluates (0 = before training, k = after stage k)."""
        seen = len(self.stages) if self.eval_all_tasks else max(row, 1)
        return [stage.suite for stage in self.stages[:seen]] + self.heldout


def slug(text: str) -> str:
    """A name safe for a directory: `toy_envs:ParityEnv` → `toy_envs-ParityEnv`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "task"


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _mapping_list(data: dict[str, Any], key: str, required: bool) -> list[dict[str, Any]]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key}: expected a non-empty list of mappings, got {value!r}")
    return [dict(v) for v in value]


def _prefixed(prefix: str, exc: ConfigError) -> ConfigError:
    return ConfigError(f"{prefix}.{exc}")


# What the chain sets in each stage's config, whatever the stage says.
CHAINED_KEYS = {
    "model": "set by the chain (stage 1 starts from the base config's model, each later "
    "stage from the one before): give the first model as the top-level `model`",
    "output_dir": "set by the chain (<output_dir>/stage-<k>-<name>/): give the top-level "
    "`output_dir`",
}


def build_plan(data: dict[str, Any], overrides: list[str] | None = None) -> ContinualPlan:
    """Validate a continual config (a parsed YAML mapping) into stages and suites."""
    data = dict(data)
    stages_raw = _mapping_list(data, "stages", required=True)
    heldout_raw = _mapping_list(data, "heldout", required=False)
    eval_all = data.pop("eval_all_tasks", False)
    if not isinstance(eval_all, bool):
        raise ConfigError(f"eval_all_tasks: expected true/false, got {eval_all!r}")
    data.pop("stages")
    data.pop("heldout", None)
    base_data = apply_overrides(data, overrides or [])
    base = build_config(base_data)

    names: set[str] = set()
    stages = []
    for k, raw in enumerate(stages_raw):
        if "env" not in raw and "env" not in base_data:
            log.warning("stages[%d]: no env, here or in the base config: it trains on the "
                        "default, %s", k, base.env)  # fmt: skip
        for key in CHAINED_KEYS:  # lost to the chain without a word
            if key in raw:
                raise ConfigError(f"stages[{k}].{key}: {CHAINED_KEYS[key]}")
        name = _unique(slug(str(raw.pop("name", None) or raw.get("env", base.env))), names)
        stage_data = {**base_data, **raw}
        if "env" in raw and "env_args" not in raw:
            stage_data["env_args"] = {}
        try:
            cfg = build_config(stage_data)
        except ConfigError as exc:
            raise _prefixed(f"stages[{k}]", exc) from None
        suite = Suite(name, cfg.env, cfg.env_args, EvalSettings.from_config(cfg))
        stages.append(Stage(name, cfg, suite, own_playbook="playbook_init" in raw))

    heldout = []
    for k, raw in enumerate(heldout_raw):
        if "env" not in raw:
            raise ConfigError(f"heldout[{k}].env: missing")
        extra = sorted(set(raw) - {"name", "env", "env_args"} - HELDOUT_EVAL_KEYS)
        if extra:
            raise ConfigError(f"heldout[{k}].{extra[0]}: unknown key for a held-out suite")
        name = _unique(slug(str(raw.get("name") or raw["env"])), names)
        eval_keys = {key: raw[key] for key in HELDOUT_EVAL_KEYS if key in raw}
        try:
            cfg = build_config({**base_data, **eval_keys})
        except ConfigError as exc:
            raise _prefixed(f"heldout[{k}]", exc) from None
        env_args = raw.get("env_args") or {}
        if not isinstance(env_args, dict):
            raise ConfigError(f"heldout[{k}].env_args: expected a mapping, got {env_args!r}")
        heldout.append(Suite(name, str(raw["env"]), env_args, EvalSettings.from_config(cfg)))
    return ContinualPlan(base, stages, heldout, eval_all)


def load_plan(path: str | Path, overrides: list[str] | None = None) -> ContinualPlan:
    return build_plan(read_yaml_mapping(path), overrides)


# ---- running --------------------------------------------------------------------------------
def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _last_checkpoint_model(run_dir: Path) -> Path:
    from resd.training.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"continual: {run_dir} finished without a checkpoint")
    return checkpoint


def train_stage(stage: Stage, index: int, plan: ContinualPlan, model: str, playbook: str | None):
    """Train one stage (or reuse / resume it); returns (final full model, playbook, info)."""
    from resd.training.checkpoint import latest_checkpoint
    from resd.training.interrupts import checkpoint_on_signals
    from resd.training.trainer import Trainer

    if stage.own_playbook:
        playbook = stage.config.playbook_init
    run_dir = stage_dir(plan, index, stage)
    data = stage.config.to_dict() | {
        "model": model,
        "playbook_init": playbook,
        "output_dir": str(run_dir),
    }
    cfg = build_config(data)
    if not (run_dir / "summary.json").exists():
        resume = latest_checkpoint(run_dir) is not None
        print(f"[continual] stage {index} ({stage.name}): {'resuming' if resume else 'training'}")
        trainer = Trainer(cfg, resume=resume)
        with checkpoint_on_signals(trainer):  # Ctrl-C: this stage checkpoints after its step
            trainer.train()
        del trainer
        _free_memory()
    final = _last_checkpoint_model(run_dir)
    if is_adapter(final):  # a LoRA run continues from a full model: merge once, keep it
        merged = run_dir / "merged-model"
        if not (merged / "config.json").exists():
            merge_adapter(final, merged, base_model=model)
        final = merged
    new_playbook = run_dir / "playbook.json"
    info = {
        "name": stage.name,
        "env": cfg.env,
        "env_args": cfg.env_args,
        "dir": str(run_dir),
        "model_in": model,
        "model_out": str(final),
        "playbook_in": playbook,
        "config": cfg.to_dict(),
        "summary": read_summary(run_dir),
    }
    return str(final), str(new_playbook) if new_playbook.exists() else playbook, info


def stage_dir(plan: ContinualPlan, index: int, stage: Stage) -> Path:
    """Stage `index`'s run folder (counted from 1)."""
    return plan.out / f"stage-{index}-{stage.name}"


def _cached_row(cache: Path) -> dict[str, dict[str, Any]]:
    """A row's cached evaluations ({} where there are none). A damaged cache (a copy cut
    short, an edit) failed the re-run with json's words, or a traceback for a list; what
    it held is evaluated again, at the same seed, and written anew."""
    if not cache.exists():
        return {}
    try:
        results = read_json_object(cache)
        if all(isinstance(v, dict) for v in results.values()):
            return results
    except ValueError:
        pass
    log.warning("%s cannot be read; its evaluations are made again", cache)
    return {}


def evaluate_row(plan: ContinualPlan, row: int, model: str) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on the row's suites; cached in `evals/row-<k>.json`."""
    cache = plan.out / "evals" / f"row-{row}.json"
    results = _cached_row(cache)
    todo = [s for s in plan.row_suites(row) if s.name not in results]
    if not todo:
        return results
    base = plan.base
    from resd.training.policy import sampling_dtype

    dtype = sampling_dtype(base, base.device)  # sample as the trainer's sampling copy does
    longest = max(s.settings.max_prompt_tokens + s.settings.max_new_tokens for s in todo)
    policy, tokenizer = load_policy(model, dtype=dtype, device=base.device, max_length=longest)
    for suite in todo:
        print(f"[continual] row {row}: evaluating {suite.name}")
        result = evaluate_env(policy, tokenizer, suite.environment(), suite.settings)
        samples = plan.out / "evals" / f"row-{row}-{suite.name}.jsonl"
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text("".join(json.dumps(r) + "\n" for r in result["samples"]))
        results[suite.name] = {"metrics": result["metrics"], "per_item": result["per_item"]}
        cache.write_text(json.dumps(results, indent=1))  # a kill loses one suite at most
    del policy
    _free_memory()
    return results


def _matrix(rows: list[dict[str, dict[str, Any]]], names: list[str], key: str):
    return [[row[n]["metrics"][key] if n in row else None for n in names] for row in rows]


def summarize(plan: ContinualPlan, rows: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The matrices and their metrics, from the evaluation rows done so far."""
    tasks = [stage.name for stage in plan.stages]
    heldout = [suite.name for suite in plan.heldout]
    out: dict[str, Any] = {
        "accuracy_key": ACCURACY,
        "rows": ["before", *(f"stage-{k}-{n}" for k, n in enumerate(tasks, 1))][: len(rows)],
        "tasks": tasks,
        "heldout": heldout,
        "metrics": {},
    }
    for key, suffix in ((ACCURACY, ""), (ALSO_KEPT, "_task")):
        acc = _matrix(rows, tasks, key)
        out[f"accuracy{suffix}"] = acc
        out[f"heldout_accuracy{suffix}"] = _matrix(rows, heldout, key)
        trained = acc[1:]  # rows after each stage: square once every stage has run
        done = len(trained) == len(tasks)
        out["metrics"][key] = {
            "forgetting": forgetting(trained) if done else None,
            "backward_transfer": backward_transfer(trained) if done else None,
            "heldout_change": {
                name: rows[-1][name]["metrics"][key] - rows[0][name]["metrics"][key]
                for name in heldout
                if len(rows) > 1 and name in rows[0] and name in rows[-1]
            },
        }
    return out


def format_table(result: dict[str, Any]) -> str:
    """The accuracy matrix (case_mean@k) with held-out suites after a bar, and metrics."""
    names = result["tasks"] + result["heldout"]
    width = max(10, *(len(n) for n in names))
    label = max(8, *(len(r) for r in result["rows"]))
    head = " ".join(f"{n:>{width}s}" for n in result["tasks"])
    if result["heldout"]:
        head += " | " + " ".join(f"{n:>{width}s}" for n in result["heldout"])
    lines = [
        f"accuracy = {result['accuracy_key']} (rows: after each stage)",
        f"{'':{label}s} {head}",
    ]

    def cells(values: list[float | None]) -> str:
        return " ".join(f"{'-':>{width}s}" if v is None else f"{v:{width}.4f}" for v in values)

    for i, row in enumerate(result["rows"]):
        line = f"{row:{label}s} {cells(result['accuracy'][i])}"
        if result["heldout"]:
            line += " | " + cells(result["heldout_accuracy"][i])
        lines.append(line)
    metrics = result["metrics"][result["accuracy_key"]]
    for name, value in (("forgetting", metrics["forgetting"]),
                        ("backward transfer", metrics["backward_transfer"])):  # fmt: skip
        lines.append(f"{name}: {'n/a (one task)' if value is None else f'{value:+.4f}'}")
    for name, change in metrics["heldout_change"].items():
        lines.append(f"held-out {name}: {change:+.4f} from before to the last stage")
    return "\n".join(lines)


def plan_record(plan: ContinualPlan) -> dict[str, Any]:
    """Everything that decides a continual run's numbers, as `continual-config.yaml` holds
    it: the base config, every stage's config and every held-out suite."""
    heldout = [{"name": s.name, "env": s.env, "env_args": s.env_args,
                "settings": dataclasses.asdict(s.settings)} for s in plan.heldout]  # fmt: skip
    record = {**plan.base.to_dict(), "stages": [s.config.to_dict() for s in plan.stages],
              "heldout": heldout, "eval_all_tasks": plan.eval_all_tasks}  # fmt: skip
    return yaml.safe_load(yaml.safe_dump(record))  # as the file will read back


def check_reused_output(plan: ContinualPlan, record: dict[str, Any]) -> None:
    """A re-run reuses finished stages and cached evaluations: only with the settings
    that made them, else its numbers would belong to another run than it records."""
    path = plan.out / "continual-config.yaml"
    if not path.exists():
        return
    try:  # not a mapping: compared as settings, it listed every key as changed
        old = recorded_settings(path)
    except (yaml.YAMLError, ValueError) as exc:  # UnicodeDecodeError among them
        raise ConfigError(f"output_dir: {path} cannot be read ({yaml_problem(exc)}), so the "
                          f"stages and evaluations in {plan.out} cannot be vouched for; use "
                          "another output_dir") from None  # fmt: skip
    differ = settings_differences(old, record)
    if differ:
        shown = "; ".join(differ[:3]) + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise ConfigError(
            f"output_dir: {plan.out} holds a continual run made with other settings ({shown}); "
            "re-running would reuse its stages and evaluations. Use another output_dir, or the "
            "settings it was made with"
        )


def run_continual(plan: ContinualPlan) -> dict[str, Any]:
    """Train every stage in order, evaluate every row, write continual.json."""
    out = plan.out
    record = plan_record(plan)
    check_reused_output(plan, record)
    for suite in [stage.suite for stage in plan.stages] + plan.heldout:
        suite.environment()  # a bad env or data path fails now, not after hours of training
    for k, stage in enumerate(plan.stages, 1):  # and a finished stage's damaged summary,
        read_summary(stage_dir(plan, k, stage))  # before continual.json is rewritten
    out.mkdir(parents=True, exist_ok=True)
    with holding(out, "output_dir"):  # a second `resd continual` on it, while this one runs
        (out / "continual-config.yaml").write_text(yaml.safe_dump(record, sort_keys=False))
        model, playbook = plan.base.model, plan.base.playbook_init
        rows = [evaluate_row(plan, 0, model)]
        stages: list[dict[str, Any]] = []

        def write() -> dict[str, Any]:
            result = {"stages": stages, **summarize(plan, rows), "evaluations": rows}
            (out / "continual.json").write_text(json.dumps(result, indent=1))
            return result

        write()
        for k, stage in enumerate(plan.stages, 1):
            model, playbook, info = train_stage(stage, k, plan, model, playbook)
            stages.append(info)
            rows.append(evaluate_row(plan, k, model))
            write()
        return write()


def cmd_continual(args: argparse.Namespace) -> int:
    from resd.training.trainer import Interrupted

    plan = load_plan(args.config, args.overrides)
    try:
        result = run_continual(plan)
    except Interrupted as exc:
        print(f"resd: {exc.saved}; the same `resd continual` command continues from there",
              file=sys.stderr)  # fmt: skip
        return exc.exit_status
    print("\n" + format_table(result))
    print(f"\ncontinual: {plan.out / 'continual.json'}")
    return 0


def add_continual_subcommand(subparsers) -> argparse.ArgumentParser:
    """Register `resd continual --config FILE [key=value ...]`."""
    parser = subparsers.add_parser(
        "continual", help="train on a sequence of tasks; report forgetting and transfer"
    )
    parser.add_argument(
        "--config", type=path_option, required=True, help="YAML: a training config + stages"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the base config")
    parser.set_defaults(fn=cmd_continual)
    return parser
