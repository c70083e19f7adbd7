"""Random combinations of training settings on the tests' tiny model: what no single test
tries. Not part of the suite (minutes to hours); run it after a change that touches how
settings meet, and turn each failure it finds into a test of its own.

    python tests/fuzz_combinations.py single 0 400 --out /tmp/fuzz   # 3 steps each, 1 process
    python tests/fuzz_combinations.py dist 0 30 --out /tmp/fuzz      # 1 process against 2
    python tests/fuzz_combinations.py edge 0 788 --out /tmp/fuzz     # one setting at an edge
    python tests/fuzz_combinations.py options 0 97 --out /tmp/fuzz  # eval's and serve's options
    python tests/fuzz_combinations.py corrupt 0 351 --out /tmp/fuzz  # a run's file damaged
    python tests/fuzz_combinations.py serve 0 154 --out /tmp/fuzz    # a learning server's
    python tests/fuzz_combinations.py folders 0 415 --out /tmp/fuzz  # compare's, continual's

`single`: each combination trains 3 steps (a checkpoint at step 2, evaluations), and
one in three resumes for a fourth; a crash other than a refused setting (`ConfigError`,
a clear `ValueError`) is a finding. `dist`: each combination trains 4 steps in one
process, resumes that run from step 2 (it must replay the same steps), and trains again
in two processes under ddp, FSDP, ZeRO-2 or ZeRO-3 (the same run up to float rounding:
metrics, playbook, samples and final weights), whose checkpoint at step 2 one process then
continues (the same run again). `edge`: one setting, or one environment argument, at an
edge of its type (-1, 0, 1000, an empty string, a wrong type, an unknown key), the rest at a
small base; refused when the config is read is best, refused with its reason later is
fine, a crash or a non-finite loss is a finding, and a run still going after a minute
(1000 rollouts per prompt) is slow, not wrong. `options`: each option of `resd eval` and
`resd serve`, read off the parser, at an edge of its type (-1, 0, a million, nan, inf, an
empty or blank string, a word that names nothing); a one-line refusal or a run (a server
that starts) is fine, a traceback is a finding. `corrupt`: one file of a finished run
deleted, emptied, cut in half, overwritten or replaced by JSON of another shape, then
`resd report`, `resd eval` and `resd train --resume` on it; each must work or refuse in
one line, and a refusal (or a report) must leave the run's files as they were; the
full run's 183 cases come first, then a LoRA run's. `serve`: one file of a learning
server's folder (its database, the learner's run, the served version's weights) damaged,
then `resd report` and `resd serve --learn` restarted on it: the server starts (and
answers) or refuses in one line, leaving the folder as it was. `folders`: one file of a
`resd compare` or `resd continual` folder (its checkpoints apart, which are `corrupt`'s)
damaged, then `resd report` and the command that made it, run again. Each
combination is seeded by its index, so
`single 17 1` reruns the 17th. One line of JSON per combination goes to `OUT/<mode>_<start>.jsonl`, and
a summary line per combination to the terminal.

Findings so far, each now a test: the trust-region teacher under `loss_chunk_size` with
bf16 weights and no autocast; int8 decoding with a static KV cache under autocast; FSDP
with `update_epochs: 2` leaving the root without gradients. From `edge`: a string LoRA rank
or an int `target_modules` crashing inside PEFT; code's negative feedback limits and a
per-case timeout of 0 read as the default; Manufactoria's `n_per_level: 0` read as 10; the
dataset environment's `scorer_args`/`load_kwargs` given as a string, and an empty
`prompt_column`. From `options`: a device torch would not train on (a traceback), eval's
nan temperature, serve's infinite `--batch-wait-ms`, limits refused only after the model
loaded, empty paths read as the working directory. From `corrupt`: a damaged checkpoint
file, model weights or tokenizer file (tracebacks from torch.load, safetensors and
transformers), a log line of another shape that failed every resume, and a LoRA run's
damaged README.md, which failed the resumed run's final save (peft reads the card).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

# Each key's values; the first is the default or a common choice.
SINGLE: dict[str, list[Any]] = {
    "algorithm": ["resd", "resd_no_reflection", "resd_no_playbook", "resd_no_buffer", "sdpo",
                  "sdpo_ss", "sdft", "grpo"],
    "env": ["arithmetic", "house_rules", "ifeval", "qa", "code", "manufactoria"],
    "lora": [None, "{r: 4, alpha: 8}"],
    "teacher": ["ema", "base", "live", "trust_region"],
    "distillation_mode": ["topk", "full", "sampled"],
    "topk": [5, None, 100],
    "add_tail": [True, False],
    "alpha": [1.0, 0.0, 0.5],
    "min_ratio": [0.2, 1.0],
    "max_ratio": [None, 1.5],
    "loss_aggregation": ["token_mean", "seq_mean_token_mean"],
    "distillation_weight": [None, 0.5, 0.0, 1.0],
    "rollouts_per_prompt": [1, 2, 3],
    "batch_size": [2, 3, 4],
    "micro_batch_size": [1, 3, 4],
    "generation_batch_size": [1, 5, 16],
    "pack_rows": [True, False],
    "gradient_checkpointing": [False, True],
    "dtype": ["float32", "bfloat16"],
    "autocast": ["auto", "none", "bfloat16"],
    "generation_dtype": ["auto", "float32", "int8", "bfloat16"],
    "generation_cache": [None, "static"],
    "lesson_calls": ["two", "one"],
    "reflection_layout": ["prompt", "conversation"],
    "student_playbook": [False, True],
    "structured_output": ["auto", "off"],
    "unparsed_reflection": ["drop", "raw"],
    "curation_ops": ["all", "add"],
    "curation_min_operations": [0, 1],
    "max_reflections_per_step": [None, 1],
    "solution_buffer_keep": ["first", "latest"],
    "teacher_feedback_with_solution": [True, False],
    "playbook_max_entries": [120, 1],
    "playbook_prune_every": [4, 1],
    "teacher_playbook_tokens": [1024, 3],
    "max_teacher_prompt_tokens": [3072, 40],
    "slot_max_tokens": [1024, 5],
    "max_prompt_tokens": [256, 20],
    "success_weighting": [False, True],
    "loss_chunk_size": [None, 3],
    "update_epochs": [1, 2],
    "kl_coef": [0.0, 0.1],
    "rollout_is_cap": [None, 2.0],
    "pg_reward": ["reward", "score"],
    "pg_scale_std": [True, False],
    "min_new_tokens": [0, 3],
    "temperature": [1.0, 0.3],
    "top_k": [0, 7],
    "min_p": [0.0, 0.1],
    "eval_temperature": [0.6, 0.0],
    "eval_max_new_tokens": [None, 4],
    "epochs": [1, 2],
    "shuffle": [True, False],
    "warmup_steps": [1, 0, 0.5],
    "lr_scheduler_type": ["constant_with_warmup", "cosine", "linear"],
    "max_grad_norm": [1.0, 0],
    "keep_host_memory": [True, False],
    "log_samples": [2, 0],
    "early_stopping": [None, "{metric: case_mean@k, patience: 1}"],
    "teacher_template": [None, str(TESTS.parent / "configs/templates/teacher_without_attempt.txt"),
                         str(TESTS.parent / "configs/templates/teacher_lessons_only.txt")],
    "playbook_similarity": [0.6, 0.3, 1.0],
    "reflection_playbook_tokens": [2048, 3],
    "is_clip": [2.0, 1.0],
    "top_p": [0.95, 1.0],
    "weight_decay": [0.01, 0.0],
    "keep_checkpoints": [2, 1],
    "report_to": ["[]", "[tensorboard]"],
}  # fmt: skip
SINGLE_ENV_ARGS = {
    "arithmetic": ["env_args.n_train=16", "env_args.n_test=2"],
    "house_rules": ["env_args.n_test=2"],
    "ifeval": ["env_args.n_train=16", "env_args.n_test=2"],
    "code": [],
    "manufactoria": [],
}
DIST: dict[str, list[Any]] = {
    "algorithm": ["resd", "sdpo", "grpo", "resd_no_buffer", "sdpo_ss", "resd_no_playbook"],
    "lora": [None, {"r": 4, "alpha": 8}],
    "teacher": ["ema", "base", "trust_region", "live"],
    "loss_chunk_size": [None, 4],
    "pack_rows": [True, False],
    "gradient_checkpointing": [False, True],
    "distillation_mode": ["topk", "full", "sampled"],
    "topk": [5, 100],
    "distillation_weight": [None, 0.5],
    "kl_coef": [0.0, 0.1],
    "update_epochs": [1, 2],
    "success_weighting": [False, True],
    "lesson_calls": ["two", "one"],
    "rollouts_per_prompt": [1, 2],
    "micro_batch_size": [1, 2],
    "loss_aggregation": ["token_mean", "seq_mean_token_mean"],
}
LAUNCHES = [None, "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"]

# `edge`: one setting at a time at the edge of its type, every other at the `single` base.
EDGE_BY_TYPE: dict[str, list[Any]] = {
    "int": [-1, 0, 1, 2, 1000],
    "float": [-1.0, 0.0, 1e-9, 1.0, 1000.0],
    "str": ["", "nonsense", "1"],
}
EDGE_MAPPINGS: dict[str, list[Any]] = {
    "model_init_kwargs": [{}, {"attn_implementation": "nonsense"}, {"torch_dtype": "banana"},
                          {"nonsense": 1}, {"device_map": 5}],
    "chat_template_kwargs": [{"enable_thinking": False}, {"nonsense": [1]}],
    "env_args": [{"nonsense": 1}, {"n_train": 0}, {"n_train": -1}, {"n_test": 0},
                 {"n_train": "many"}, {"seed": "x"}],
    "lora": [{}, {"r": 0}, {"r": -1}, {"r": "big"}, {"target_modules": 5},
             {"target_modules": ["nonsense"]}, {"nonsense": 1}, {"alpha": 0}, {"dropout": 2.0}],
    "reflector": [{}, {"model": "/nonexistent"}, {"nonsense": 1}, {"temperature": -1}],
    "early_stopping": [{}, {"metric": "nonsense"}, {"metric": "case_mean@k", "patience": 0},
                       {"metric": "case_mean@k", "patience": -1}, {"patience": 1},
                       {"metric": "case_mean@k", "mode": "sideways"}],
    "vllm_args": [{"nonsense": 1}],
    "report_to": [[], ["nonsense"], "tensorboard,tensorboard"],
}  # fmt: skip
EDGE_SECONDS = 60
EDGE_SKIP = {"model", "output_dir", "progress", "device", "push_to_hub", "hub_model_id"}
# Each environment's arguments at an edge, the others at these (`env_args` above tries
# arithmetic's); qa and dataset read a file of questions the tool writes.
EDGE_ENV_BASE: dict[str, dict[str, Any]] = {
    "arithmetic": {"n_train": 16, "n_test": 2},
    "house_rules": {"n_test": 2},
    "ifeval": {"n_train": 16, "n_test": 2},
    "qa": {"path": "{qa}"},
    "code": {},
    "manufactoria": {},
    "dataset": {"path": "{qa}", "prompt_column": "question", "answer_column": "answer"},
}
EDGE_ENV_SKIP = {"dataset": {"dataset"}}  # an in-memory dataset object, for Python callers
EDGE_BY_WORD = {"list": [[], ["nonsense"], [1]], "dict": [{}, {"nonsense": 1}],
                "Callable": ["nonsense:function"]}  # fmt: skip


def small_run(model: Path, run_dir: Path, steps: int) -> list[str]:
    """The settings `single` and `edge` draw from or leave alone: a few short steps on the
    tiny model, a checkpoint and an evaluation at step 2."""
    return [f"model={model}", "progress=false", "max_new_tokens=12", "reflection_max_new_tokens=48",
            "curation_max_new_tokens=48", "eval_samples=1", "eval_items=2", "inner_updates=2",
            f"steps={steps}", f"output_dir={run_dir}", "save_every=2", "eval_every=2",
            "teacher_update_rate=0.1", "lr=1e-3"]  # fmt: skip


def edge_values(words: str) -> list[Any]:
    """Edge values for a type hint written as text, each once (1, 1.0 and True are equal
    keys, so not dict.fromkeys or a set)."""
    values: list[Any] = [None] if "None" in words else []
    for kind in ("int", "float", "str"):
        if kind in words:
            values += EDGE_BY_TYPE[kind]
    for kind, more in EDGE_BY_WORD.items():
        if kind in words:
            values += more
    if "bool" in words:
        values.append(True)
    return [v for i, v in enumerate(values)
            if not any(type(v) is type(w) and v == w for w in values[:i])]  # fmt: skip


@functools.cache  # read once, not once per case
def edge_cases() -> list[tuple[str, Any, str]]:
    """Every (setting, value, environment) the `edge` mode tries, in a fixed order: the
    training settings on arithmetic, then each environment's own arguments."""
    import dataclasses
    import inspect
    import typing

    from resd.config import TrainConfig
    from resd.envs import BUILTIN_ENVS, resolve_env_class

    hints = typing.get_type_hints(TrainConfig)
    cases: list[tuple[str, Any, str]] = []
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in EDGE_MAPPINGS:
            cases += [(name, v, "arithmetic") for v in EDGE_MAPPINGS[name]]
        elif name not in EDGE_SKIP:
            cases += [(name, v, "arithmetic") for v in edge_values(str(hints[name]))]
    for env in BUILTIN_ENVS:
        params = inspect.signature(resolve_env_class(env)).parameters.values()
        for param in params:
            if param.name not in EDGE_ENV_SKIP.get(env, ()):
                words = str(param.annotation)
                cases += [(f"env_args.{param.name}", v, env) for v in edge_values(words)]
    return cases


def edge(index: int, out: Path, model: Path) -> dict[str, Any]:
    """One setting at an edge value: refused when it is read (best), refused later with
    its reason, or trained; anything else (a crash, a non-finite loss) is a finding."""
    from resd.cli import USER_ERRORS
    from resd.config import ConfigError, apply_overrides, build_config
    from resd.training.trainer import Trainer

    name, value, env = edge_cases()[index]
    run_dir = out / f"edge{index}"
    words = [*small_run(model, run_dir, steps=2), "batch_size=2", "rollouts_per_prompt=2"]
    base = {k: str(v).format(qa=out / "qa.jsonl") if isinstance(v, str) else v
            for k, v in EDGE_ENV_BASE[env].items()}  # fmt: skip
    data = {**apply_overrides({}, words), "env": env, "env_args": base}
    if name.startswith("env_args."):
        data["env_args"] = {**base, name.removeprefix("env_args."): value}
    elif isinstance(value, dict) and isinstance(data.get(name), dict):
        data[name] = {**data[name], **value}
    else:
        data[name] = value
    record: dict[str, Any] = {"index": index, "setting": name, "value": value, "env": env,
                              "ok": True}  # fmt: skip
    try:
        config = build_config(data)
    except ConfigError as exc:
        record.update(refused=f"read: {exc}"[:300])
        return record

    def too_long(*_: Any) -> None:
        raise TimeoutError

    signal.signal(signal.SIGALRM, too_long)  # 1000 rollouts per prompt is slow, not wrong
    signal.alarm(EDGE_SECONDS)
    try:
        summary = Trainer(config).train()
        record["steps"] = summary["steps"]
        if not math.isfinite(summary["last"].get("loss", 0.0)):
            record.update(ok=False, error="loss not finite")
    except TimeoutError:
        record.update(slow=f"still training after {EDGE_SECONDS} s")
    except USER_ERRORS as exc:  # what `resd` prints as "resd: error: ..."
        record.update(refused=f"later, {type(exc).__name__}: {exc}"[:300],
                      traceback=traceback.format_exc()[-1500:])  # fmt: skip
    except Exception as exc:
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500],
                      traceback=traceback.format_exc()[-3000:])  # fmt: skip
    finally:
        signal.alarm(0)
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


# `options`: each option of `resd eval` and `resd serve` at an edge of its argparse type.
OPTION_EDGES = {int: ["-1", "0", "1000000"], float: ["-1", "0", "nan", "inf"]}
OPTION_TEXT_EDGES = ["", " ", "nonsense"]
OPTION_SKIP = {"help", "config", "learn", "env", "host", "log_level"}  # read as files, or
# covered elsewhere (a config's keys are `edge`'s; a non-loopback host needs a key)
OPTION_COMMANDS = ("eval", "serve")
SERVE_START_SECONDS = 90


@functools.cache
def option_cases() -> list[tuple[str, str, str]]:
    """Every (command, option, value) the `options` mode tries, read off the parser itself,
    so that an option added later is tried too."""
    from resd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for command in OPTION_COMMANDS:
        for action in commands.choices[command]._actions:
            if not action.option_strings or action.nargs == 0 or action.dest in OPTION_SKIP:
                continue
            values = (["nonsense"] if action.choices
                      else OPTION_EDGES.get(action.type, OPTION_TEXT_EDGES))  # fmt: skip
            cases += [(command, action.option_strings[-1], value) for value in values]
    return cases


def options(index: int, out: Path, model: Path) -> dict[str, Any]:
    """One option of `resd eval` or `resd serve` at an edge: refused in one line (status 2,
    no traceback), or run (eval) or started (serve); a traceback is a finding."""
    import contextlib
    import io
    import os
    import subprocess

    command, option, value = option_cases()[index]
    record: dict[str, Any] = {"index": index, "command": command, "option": option,
                              "value": value, "ok": True}  # fmt: skip
    where = out / f"options{index}"  # the working directory: a relative --out lands here
    where.mkdir(parents=True, exist_ok=True)
    if command == "eval":
        from resd.cli import main as resd_main

        argv = ["eval", "--model", str(model), "--env", "arithmetic", "--items", "2",
                "--samples", "1", "--max-new-tokens", "6", option, value]  # fmt: skip
        err = io.StringIO()
        here = os.getcwd()
        os.chdir(where)

        def too_long(*_: Any) -> None:
            raise TimeoutError

        signal.signal(signal.SIGALRM, too_long)  # a million samples is slow, not wrong
        signal.alarm(EDGE_SECONDS)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = resd_main(argv)
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
        except TimeoutError:
            code = None
            record["slow"] = f"still evaluating after {EDGE_SECONDS} s"
        except Exception as exc:
            code = None
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500],
                          traceback=traceback.format_exc()[-3000:])  # fmt: skip
        finally:
            signal.alarm(0)
            os.chdir(here)
        said = err.getvalue().strip().splitlines()
    else:
        import socket

        with socket.socket() as sock:  # a free port, unless the case is about --port
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        argv = [sys.executable, "-m", "resd.cli", "serve", "--model", str(model), "--port", port,
                "--output-dir", str(where / "serve"), option, value]  # fmt: skip
        started, said = False, []
        with subprocess.Popen(argv, cwd=where, stderr=subprocess.PIPE, text=True,
                              stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"}) as proc:  # fmt: skip
            deadline = time.monotonic() + SERVE_START_SECONDS
            for line in proc.stderr:
                said.append(line.rstrip())
                if line.startswith("resd serve: model"):
                    started = True
                    break
                if time.monotonic() > deadline:
                    break
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            said += proc.stderr.read().splitlines()
            code = 0 if started else proc.returncode
        record["started"] = started
    shutil.rmtree(where, ignore_errors=True)
    if any("Traceback" in line for line in said):
        record.update(
            ok=False, error=(said[-1] if said else "")[:500], traceback="\n".join(said)[-3000:]
        )
    elif code == 2:
        record["refused"] = next((x for x in said if "error:" in x), said[-1] if said else "")[:300]
    elif code not in (0, None):
        record.update(ok=False, error=f"exit status {code}: " + " | ".join(said[-3:])[:400])
    return record


# `corrupt`: one file of a finished run damaged in one way, then the commands that read it.
CORRUPTIONS = ("delete", "empty", "half", "garbage", "other_json")
CORRUPT_RUN = ["batch_size=2", "rollouts_per_prompt=2", "eval_every=1", "save_every=1",
               "eval_items=2", "keep_checkpoints=2"]  # fmt: skip


# the two finished runs the cases damage: full weights, then a LoRA adapter (its teacher an
# adapter too); a LoRA run's cases come after every full run's, so old indices stay
CORRUPT_BASES = {"corrupt-base": [], "corrupt-lora-base": ["lora={r: 4, alpha: 8}"]}


def corrupt_base(out: Path, model: Path, name: str = "corrupt-base") -> Path:
    """A finished run the cases damage a copy of: 2 steps, a checkpoint after each."""
    from resd.config import load_config
    from resd.training.trainer import Trainer

    base = out / name
    if not (base / "summary.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        settings = [*small_run(model, base, steps=2), *CORRUPT_RUN, *CORRUPT_BASES[name]]
        Trainer(load_config(None, settings)).train()
    return base


def corrupt_cases(out: Path, model: Path) -> list[tuple[Path, str, str]]:
    """(base run, file, damage) triples in a fixed order; `other_json` (valid JSON of
    another shape) only for the JSON files."""
    cases = []
    for name in CORRUPT_BASES:
        base = corrupt_base(out, model, name)
        files = sorted(str(f.relative_to(base)) for f in base.rglob("*") if f.is_file())
        cases += [(base, file, how) for file in files for how in CORRUPTIONS
                  if how != "other_json" or file.endswith((".json", ".jsonl"))]  # fmt: skip
    return cases


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "half":  # a write cut short
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(bytes(random.Random(len(data)).randrange(256) for _ in range(64)))
    else:
        path.write_text('["not", "what", "was", "here"]\n')


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*"))
            if f.is_file()}  # fmt: skip


def _resd(argv: list[str]) -> tuple[int | None, list[str], str | None]:
    """`resd ARGV` in this process: (exit status, what it said, a traceback or None)."""
    import contextlib
    import io

    from resd.cli import main as resd_main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = resd_main(argv)
    except SystemExit as exc:
        code = exc.code
    except Exception:
        return None, err.getvalue().strip().splitlines(), traceback.format_exc()[-3000:]
    return code, err.getvalue().strip().splitlines(), None


def run_commands(
    record: dict[str, Any], folder: Path, commands: dict[str, list[str]], may_change: set[str]
) -> None:
    """Each `resd` command in turn on a damaged `folder`, into `record`: it must work or
    refuse in one line (status 2); a refusal, or a command not in `may_change`, must leave
    the folder as it was. Stops at the first finding."""
    for command, argv in commands.items():
        before = folder_state(folder)
        code, said, crash = _resd(argv)
        if crash:
            record.update(ok=False, error=f"{command}: {crash.splitlines()[-1]}"[:500],
                          traceback=crash)  # fmt: skip
            return
        record[command] = "ran" if code == 0 else (said[-1] if said else f"status {code}")[:300]
        after = folder_state(folder)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if code not in (0, 2):
            record.update(ok=False, error=f"{command}: exit status {code}: {said[-1:]}")
        elif changed and (code != 0 or command not in may_change):
            record.update(ok=False, error=f"{command} (status {code}) changed {changed[:5]}")
        if not record["ok"]:
            return


def corrupt(index: int, out: Path, model: Path) -> dict[str, Any]:
    """One file of a finished run damaged (deleted, emptied, cut in half, overwritten, or
    valid JSON of another shape); then `resd report`, `resd eval` and `resd train --resume`
    read it. Each must work or refuse in one line (status 2); a traceback is a finding, and
    so is a command that refused yet changed the run's files, or a report or evaluation
    that changed them at all."""

    base, name, how = corrupt_cases(out, model)[index]
    run = out / f"corrupt{index}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run)
    damage(run / name, how)
    record: dict[str, Any] = {"index": index, "run": base.name, "file": name, "damage": how,
                              "ok": True}  # fmt: skip
    commands = {
        "report": ["report", str(run), "--out", str(out / f"report{index}" / "r.html")],
        "eval": ["eval", "--model", str(run), "--env", "arithmetic", "--items", "1",
                 "--samples", "1", "--max-new-tokens", "4"],
        "resume": ["train", "--resume", "--config", str(run / "config.yaml"),
                   f"output_dir={run}", "steps=3", "progress=false"],
    }  # fmt: skip
    run_commands(record, run, commands, may_change={"resume"})
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(out / f"report{index}", ignore_errors=True)
    return record


# `serve`: a learning server's folder (`resd serve --learn`) damaged the same ways. The
# base: one learner step served, then one the guard kept off, so the folder holds the
# database, the learner's run with two checkpoints, and the served version's weights.
SERVE_LEARN = ["batch_size=2", "rollouts_per_prompt=1", "eval_items=2", "save_every=1",
               "keep_checkpoints=2"]  # fmt: skip


def _serve(folder: Path, model: Path, learn: Path, *extra: str) -> tuple[Any, str, list[str]]:
    """`resd serve --learn` on `folder` as a process: (process, its URL, what it said up to
    the line that says it serves); the process has exited when that line never came."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "resd.cli", "serve", "--model", str(model), "--port", str(port),
            "--output-dir", str(folder), "--learn", str(learn), "--max-new-tokens", "8",
            "--log-level", "warning", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RESD_API_KEY", None)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)  # fmt: skip
    said = []
    for line in proc.stderr:
        said.append(line.rstrip())
        if line.startswith("resd serve: model"):
            break
    else:
        proc.wait()
    return proc, f"http://127.0.0.1:{port}", said


def _stop(proc: Any, said: list[str]) -> int:
    """SIGTERM, then what it said on the way out; its exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, rest = proc.communicate(timeout=120)
    except Exception:
        proc.kill()
        _, rest = proc.communicate()
    said += rest.splitlines()
    return proc.returncode


def _learn_from(url: str, model: Path, rows: int, step: int) -> None:
    """`rows` served replies with feedback, then wait for the learner's step `step`."""
    import httpx

    for i in range(rows):
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": str(model), "max_tokens": 6, "temperature": 1.0, "seed": i,
            "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]}).json()  # fmt: skip
        httpx.post(f"{url}/v1/feedback", timeout=30, json={
            "completion_id": reply["id"], "reward": 0.0,
            "feedback": f"Wrong: {i} + {i} is {2 * i}."}).raise_for_status()  # fmt: skip
    deadline = time.monotonic() + 300
    while (httpx.get(f"{url}/health", timeout=30).json().get("learner") or {}).get("step") != step:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the learner did not reach step {step}")
        time.sleep(0.5)


def serve_base(out: Path, model: Path) -> tuple[Path, Path]:
    """The learning server's folder every case damages a copy of, and its learner config
    (kept outside the folder): step 1 served (any guard result passes), step 2 kept off
    (the guard asks for a gain of 2), so `learner/served.safetensors` holds step 1."""
    from resd.config import load_config

    base, learn = out / "serve-base", out / "serve-learn.yaml"
    if (base / "built").exists():
        return base, learn
    shutil.rmtree(base, ignore_errors=True)
    cfg = load_config(None, [*small_run(model, base / "unused", steps=1), *SERVE_LEARN])
    import yaml

    learn.write_text(yaml.safe_dump(
        {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "steps")}))  # fmt: skip
    for step, tolerance in ((1, "1"), (2, "-2")):
        proc, url, said = _serve(base, model, learn, "--guard-tolerance", tolerance)
        if proc.poll() is not None:
            raise RuntimeError("\n".join(said[-20:]))
        try:
            _learn_from(url, model, rows=2, step=step)
        finally:
            _stop(proc, said)
    (base / "built").write_text("")
    return base, learn


def serve_cases(base: Path) -> list[tuple[str, str]]:
    files = sorted(str(f.relative_to(base)) for f in base.rglob("*")
                   if f.is_file() and f.name != "built")  # fmt: skip
    return [(name, how) for name in files for how in CORRUPTIONS
            if how != "other_json" or name.endswith((".json", ".jsonl"))]  # fmt: skip


def serve(index: int, out: Path, model: Path) -> dict[str, Any]:
    """One file of a learning server's folder damaged; then `resd report` on the folder and
    `resd serve --learn` restarted on it. The report works or refuses in one line without
    changing a file; the server starts (and answers /health and a completion), or refuses
    in one line (status 2) and leaves the folder as it was. A traceback is a finding."""
    import httpx

    base, learn = serve_base(out, model)
    name, how = serve_cases(base)[index]
    folder = out / f"serve{index}"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    damage(folder / name, how)
    record: dict[str, Any] = {"index": index, "file": name, "damage": how, "ok": True}
    report = ["report", str(folder), "--out", str(out / f"sreport{index}" / "r.html")]
    run_commands(record, folder, {"report": report}, may_change=set())
    before = folder_state(folder)
    if record["ok"]:
        proc, url, said = _serve(folder, model, learn)
        if proc.poll() is None:
            try:
                health = httpx.get(f"{url}/health", timeout=60).json()
                reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                    "model": str(model), "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
                record["serve"] = f"started: {health.get('model_version')}, step " + str(
                    (health.get("learner") or {}).get("step")
                )
                if reply.status_code != 200:
                    record.update(
                        ok=False, error=f"a completion: {reply.status_code} {reply.text[:200]}"
                    )
            except Exception as exc:
                record.update(ok=False, error=f"serve: {type(exc).__name__}: {exc}"[:500])
            code = _stop(proc, said)
            if code != 0:
                record.update(ok=False, error=f"serve stopped with status {code}: {said[-1:]}")
        else:
            code = proc.returncode
            record["serve"] = (said[-1] if said else f"status {code}")[:300]
            after = folder_state(folder)
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            if code != 2:
                record.update(ok=False, error=f"serve: exit status {code}: {said[-1:]}")
            elif changed:
                record.update(ok=False, error=f"a refused start changed {changed[:5]}")
        if any("Traceback" in line for line in said):
            record.update(ok=False, error=record.get("error") or "a traceback",
                          traceback="\n".join(said)[-3000:])  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out / f"sreport{index}", ignore_errors=True)
    return record


# `folders`: a `resd compare` folder (two algorithms, one seed) and a `resd continual`
# folder (two stages, a held-out suite) damaged the same ways, then the same command run
# again on it (it must finish what it can or refuse in one line) and `resd report`.
FOLDER_RUN = ["batch_size=2", "rollouts_per_prompt=1", "eval_items=2", "save_every=1", "steps=2",
              "eval_every=1"]  # fmt: skip


def folder_command(kind: str, folder: Path, model: Path, out: Path) -> list[str]:
    """The command that made (and, run again, resumes) a `folders` base."""
    run = [*small_run(model, folder, steps=2), *FOLDER_RUN]
    if kind == "compare":
        run = [x for x in run if not x.startswith("output_dir=")]
        return ["compare", "--algorithms", "resd,sdpo", "--seeds", "0", "--out", str(folder),
                "--no-plots", *run]  # fmt: skip
    import yaml

    config = out / "continual.yaml"
    if not config.exists():
        config.write_text(yaml.safe_dump({
            "stages": [{"env": "arithmetic", "env_args": {"n_train": 8, "n_test": 2}},
                       {"name": "again", "env": "arithmetic", "env_args": {"n_train": 8, "n_test": 2,
                                                                           "max_operand": 20}}],
            "heldout": [{"name": "held", "env": "arithmetic", "env_args": {"n_train": 2, "n_test": 2,
                                                                         "max_operand": 5}}]}))  # fmt: skip
    return ["continual", "--config", str(config), *run]


def folder_base(kind: str, out: Path, model: Path) -> Path:
    """The folder a `folders` case damages a copy of. Built where every case runs
    (`<kind>-work`) and kept aside: a continual stage's model is the previous stage's
    checkpoint by its path, which a copy elsewhere would change."""
    base = out / f"{kind}-base"
    if not (base / "built").exists():
        work = out / f"{kind}-work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        code, said, crash = _resd(folder_command(kind, work, model, out))
        if code != 0:
            raise RuntimeError(crash or "\n".join(said[-10:]))
        shutil.copytree(work, base)
        (base / "built").write_text("")
    return base


def folder_cases(out: Path, model: Path) -> list[tuple[str, str, str]]:
    cases = []
    for kind in ("compare", "continual"):
        base = folder_base(kind, out, model)
        # a checkpoint's files are `corrupt`'s: here, what the command itself reads
        files = sorted(str(f.relative_to(base)) for f in base.rglob("*") if f.is_file()
                       and f.name != "built" and not any(p.startswith("checkpoint-")
                                                         for p in f.relative_to(base).parts))  # fmt: skip
        cases += [(kind, file, how) for file in files for how in CORRUPTIONS
                  if how != "other_json" or file.endswith((".json", ".jsonl"))]  # fmt: skip
    return cases


def folders(index: int, out: Path, model: Path) -> dict[str, Any]:
    """One file of a `resd compare` or `resd continual` folder damaged; then `resd report`
    on it and the command that made it, run again. Each works or refuses in one line
    (status 2); a refusal, or a report, leaves the folder as it was."""
    kind, name, how = folder_cases(out, model)[index]
    folder = out / f"{kind}-work"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(folder_base(kind, out, model), folder)
    (folder / "built").unlink()
    damage(folder / name, how)
    record: dict[str, Any] = {"index": index, "kind": kind, "file": name, "damage": how, "ok": True}
    commands = {"report": ["report", str(folder), "--out", str(out / f"freport{index}" / "r.html")],
                "again": folder_command(kind, folder, model, out)}  # fmt: skip
    run_commands(record, folder, commands, may_change={"again"})
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out / f"freport{index}", ignore_errors=True)
    return record


def yaml_word(value: Any) -> str:
    """A value as a key=value word: YAML's null, true and false (not a dict lookup, where
    1.0 == True would write alpha=1.0 as alpha=true)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def single(index: int, out: Path, model: Path) -> dict[str, Any]:
    from resd.cli import USER_ERRORS
    from resd.config import load_config
    from resd.training.trainer import Trainer

    rng = random.Random(index)
    pick = {key: rng.choice(values) for key, values in SINGLE.items()}
    run_dir = out / f"single{index}"
    words = [*small_run(model, run_dir, steps=3), *(f"{k}={yaml_word(v)}" for k, v in pick.items()),
             *SINGLE_ENV_ARGS[pick["env"]]]  # fmt: skip
    record: dict[str, Any] = {"index": index, "pick": pick, "ok": True}
    try:
        summary = Trainer(load_config(None, words)).train()
        record["steps"] = summary["steps"]
        if not math.isfinite(summary["last"].get("loss", 0.0)):
            record.update(ok=False, error="loss not finite")
        if rng.random() < 1 / 3:
            again = load_config(
                None, [*(w for w in words if not w.startswith("steps=")), "steps=4"]
            )
            record["resumed_to"] = Trainer(again, resume=True).train()["steps"]
    except USER_ERRORS as exc:  # a setting refused with its reason
        record.update(refused=f"{type(exc).__name__}: {exc}"[:300])
    except Exception as exc:
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500],
                      traceback=traceback.format_exc()[-3000:])  # fmt: skip
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


def differences(one: Path, two: Path, later_rel: float) -> list[str]:
    """Where two runs that should be one differ: metrics, playbook, samples, final weights."""
    from safetensors.torch import load_file

    from test_trainer import read_jsonl

    found = []
    m1, m2 = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    if [m["step"] for m in m2] != [1, 2, 3, 4]:
        found.append(f"steps {[m['step'] for m in m2]}")
    for i, (a, b) in enumerate(zip(m1, m2, strict=False)):
        for key in ("reward", "distilled", "playbook_size", "reflections", "tags_applied"):
            if a[key] != b[key]:
                found.append(f"step {a['step']} {key}: {a[key]} vs {b[key]}")
        for key, floor in (("loss", 1e-6), ("grad_norm", 1e-7)):
            if not math.isclose(
                a[key], b[key], rel_tol=1e-3 if i == 0 else later_rel, abs_tol=floor
            ):
                found.append(f"step {a['step']} {key}: {a[key]} vs {b[key]}")
    books = [d / "playbook.json" for d in (one, two)]
    if [b.exists() for b in books] != [True, True] and any(b.exists() for b in books):
        found.append("a playbook on one side only")
    elif books[0].exists() and json.loads(books[0].read_text()) != json.loads(books[1].read_text()):
        found.append("playbooks differ")
    responses = [[s["response"] for s in read_jsonl(d / "samples.jsonl")] for d in (one, two)]
    if responses[0] != responses[1]:
        found.append("samples differ")
    for name in ("model.safetensors", "adapter_model.safetensors", "teachers/teacher.safetensors"):
        a, b = one / "checkpoint-4" / name, two / "checkpoint-4" / name
        if a.exists() != b.exists():
            found.append(f"{name} on one side only")
        elif a.exists():
            wa, wb = load_file(a), load_file(b)
            for key in wa.keys() | wb.keys():
                if key not in wa or key not in wb:
                    found.append(f"{name}:{key} on one side only")
                    continue
                # AdamW moves each element by about lr whatever its gradient: rounding may
                # flip a few near-zero gradients (see test_distributed.assert_same_run)
                off = ((wa[key].float() - wb[key].float()).abs() > 2.5e-3).float().mean().item()
                if off >= 0.01:
                    found.append(f"{name}:{key}: {off:.1%} of it differs")
    return found


def dist(index: int, out: Path, model: Path) -> dict[str, Any]:
    import test_distributed as td

    rng = random.Random(1000 + index)
    pick = {key: rng.choice(values) for key, values in DIST.items()}
    launch = rng.choice(LAUNCHES)
    if launch == "deepspeed_zero3.yaml":  # refused with ZeRO-3, by design
        pick.update(loss_chunk_size=None, lora=None)
    settings = {k: v for k, v in pick.items() if v is not None}
    work = out / f"dist{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    record: dict[str, Any] = {"index": index, "pick": pick, "launch": launch, "ok": True}
    try:
        one = td.run(work, model, "one", 1, save_every=2, **settings)
        resumed = td.resume_elsewhere(work, model, one, "resumed", 1, **settings)
        if found := differences(one, resumed, later_rel=1e-3):
            record.update(ok=False, resume=found)
        launcher: dict[str, Any] = {}
        if launch:
            launcher["launch_config"] = f"configs/accelerate/{launch}"
        if launch == "deepspeed_zero3.yaml":
            (work / "ds.json").write_text(json.dumps(td.PARTITION_EVERY_PARAMETER))
            launcher["launch_args"] = ("--deepspeed_config_file", str(work / "ds.json"))
        two = td.run(work, model, "two", 2, save_every=2, **launcher, **settings)
        if found := differences(one, two, later_rel=2e-2):
            record.update(ok=False, two_processes=found)
        # the two processes' checkpoint at step 2, continued in one process
        moved = td.resume_elsewhere(work, model, two, "moved", 1, **settings)
        if found := differences(one, moved, later_rel=2e-2):
            record.update(ok=False, moved=found)
    except Exception as exc:
        record.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-1500:])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode", choices=["single", "dist", "edge", "options", "corrupt", "serve", "folders"]
    )
    parser.add_argument("start", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--out", type=Path, default=Path("/tmp/resd-fuzz"))
    args = parser.parse_args()
    from conftest import build_tiny_model

    logging.disable(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "tiny-model"
    if not model.exists():
        build_tiny_model(model)
    if args.mode in ("single", "edge"):
        data = args.out / "qa.jsonl"  # the qa environment needs a file of its own
        data.write_text("".join(json.dumps({"question": f"Capital of country {i}?",
                                            "answer": f"City{i}"}) + "\n" for i in range(20)))  # fmt: skip
        SINGLE_ENV_ARGS["qa"] = [f"env_args.path={data}"]
    log = args.out / f"{args.mode}_{args.start}.jsonl"
    for index in range(args.start, args.start + args.count):
        start = time.perf_counter()
        modes = {"single": single, "dist": dist, "edge": edge, "options": options,
                 "corrupt": corrupt, "serve": serve, "folders": folders}  # fmt: skip
        record = modes[args.mode](index, args.out, model)
        record["seconds"] = round(time.perf_counter() - start, 1)
        with log.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        said = [
            record.get(k) for k in ("error", "resume", "two_processes", "moved") if record.get(k)
        ]
        kind = next((k for k in ("refused", "slow") if record.get(k)), "ok")
        verdict = "FAIL" if not record["ok"] else kind
        print(index, verdict, str(said or record.get("refused", ""))[:300], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
