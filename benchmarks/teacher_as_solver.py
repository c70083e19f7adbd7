"""Can the teacher solve the task itself, in its own context?

Self-distillation moves the student towards what the model would say with the teacher's
context in front of it. If the model, given that context, still does not produce a
reply that succeeds, the target it distils holds no success to learn, however long the
run. This benchmark measures that ceiling directly: it takes the failed rollouts a run
logged (samples.jsonl: the task and the teacher prompt as rendered), lets the *base*
model (the EMA teacher at step 1 is the base model) answer each teacher prompt itself,
several times, and scores the answers with the run's own environment. The rows:

- the student's own prompt (the task alone): how often the model succeeds unaided;
- the teacher prompt as logged (RESD's: playbook, previous attempt, feedback, reflection);
- without the previous attempt;
- feedback only (SDPO's teacher context);
- with `--playbook FILE` (a playbook.md as runs write it), two more: the logged prompt
  and the feedback-only prompt, each with that playbook in the playbook slot. Given the
  lessons a perfect curator would have written (for house rules: the hidden rules), they
  measure the most that RESD's memory could add on this model.

A context whose success rate is no higher than the student's prompt cannot teach
success; one whose per-check score is higher can still teach the checks it raises.

    python benchmarks/teacher_as_solver.py runs/grid/headline/resd-seed1/resd-seed1 --steps 1-3
    python benchmarks/teacher_as_solver.py RUN --playbook benchmarks/playbooks/house_rules_headline.md

Prints a table and writes benchmarks/results/teacher_as_solver.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from teacher_context_probe import logged_slots

from resd.envs import make_env
from resd.generation.hf import chat_prompt_ids, generate
from resd.models import load_model, load_tokenizer, resolve_dtype
from resd.rundir import read_jsonl
from resd.training.playbook import Playbook
from resd.training.teacher_context import TeacherTemplate

VARIANTS = {  # name -> slots of the logged teacher prompt left out; None: the student's prompt
    "student's prompt (no context)": None,
    "teacher prompt as logged": (),
    "without the previous attempt": ("previous_trial",),
    "feedback only (SDPO's context)": ("previous_trial", "reflection", "playbook"),
}
PLAYBOOK_VARIANTS = {  # the same, with --playbook in the playbook slot
    "as logged, with the given playbook": (),
    "feedback and the given playbook": ("previous_trial", "reflection"),
}


def step_range(text: str) -> range:
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with samples.jsonl and config.yaml")
    parser.add_argument("--steps", type=step_range, default=step_range("1"), help="e.g. 1-3")
    parser.add_argument("--samples", type=int, default=4, help="answers per prompt and context")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--playbook", type=Path, help="a playbook.md for two more contexts")
    parser.add_argument("--json", default="benchmarks/results/teacher_as_solver.json")
    args = parser.parse_args(argv)

    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    env = make_env(cfg["env"], cfg.get("env_args") or {})
    items = {it.id: it for it in [*env.train_items(), *env.test_items()]}
    template = TeacherTemplate.from_config(cfg.get("teacher_template"))
    variants: dict[str, tuple[str, ...] | None] = dict(VARIANTS)
    given_playbook = ""
    if args.playbook:  # rendered as the trainer shows the teacher a playbook
        if not args.playbook.is_file():
            raise SystemExit(f"--playbook {args.playbook}: no such file")
        given_playbook = Playbook.parse(args.playbook.read_text()).render(include_empty=False)
        if not given_playbook.strip():
            raise SystemExit(f"{args.playbook}: no lesson in it (lines like '[id] ... :: text')")
        variants.update(PLAYBOOK_VARIANTS)
    failed = [s for s in read_jsonl(args.run / "samples.jsonl")
              if s["step"] in args.steps and s.get("teacher_prompt") and s["reward"] < 1]  # fmt: skip
    if not failed:
        raise SystemExit(
            f"{args.run}: no failed rollout with a teacher prompt in steps {args.steps}"
        )
    unknown = sorted({s["item"] for s in failed} - set(items))
    if unknown:  # e.g. a benchmark that handed the trainer an environment object of its own
        raise SystemExit(
            f"{args.run}: logged items {unknown[:3]} are not among the items of its config's "
            f"env {cfg['env']!r} {cfg.get('env_args') or {}}: they cannot be scored"
        )

    tokenizer = load_tokenizer(cfg["model"], 4096)
    # The dtype the trainer samples rollouts in here (`generation_dtype: auto`): bf16 where
    # the CPU runs it fast. fp32 weights under autocast re-cast every weight every token.
    model = load_model(cfg["model"], dtype=resolve_dtype("auto", "cpu"), device="cpu")
    prompts: list[list[int]] = []
    keys: list[tuple[str, int]] = []  # (variant, index into `failed`) of each prompt
    contexts: dict[str, str] = {}  # each variant's first prompt, as the model read it
    for index, s in enumerate(failed):
        slots = logged_slots(args.run, template, s["teacher_prompt"])
        item = items[s["item"]]
        system = [m for m in item.messages if m.get("role") == "system"]
        for name, left_out in variants.items():
            if left_out is None:
                messages = item.messages
            else:
                shown = {k: v for k, v in slots.items() if k not in left_out}
                if name in PLAYBOOK_VARIANTS:
                    shown["playbook"] = given_playbook
                messages = [*system, {"role": "user", "content": template.render(**shown)}]
            if index == 0:
                contexts[name] = messages[-1]["content"]
            prompts += [chat_prompt_ids(tokenizer, messages)] * args.samples  # tokenised once
            keys += [(name, index)] * args.samples

    start = time.perf_counter()
    replies = generate(
        model, tokenizer, prompts, max_new_tokens=cfg["max_new_tokens"],
        temperature=cfg["temperature"], top_p=cfg.get("top_p", 1.0), batch_size=args.batch_size,
        seeds=list(range(len(prompts))),
    )  # fmt: skip
    seconds = time.perf_counter() - start

    rows: dict[str, dict[str, Any]] = {
        name: {"answers": 0, "reward": 0.0, "score": 0.0, "examples": [], "context": contexts[name]}
        for name in variants
    }
    for (name, index), reply in zip(keys, replies, strict=True):
        score = env.score(items[failed[index]["item"]], reply.text)
        row = rows[name]
        row["answers"] += 1
        row["reward"] += score.reward
        row["score"] += score.score
        if len(row["examples"]) < 3:
            row["examples"].append({"item": failed[index]["item"], "reply": reply.text,
                                    "reward": score.reward, "score": score.score})  # fmt: skip
    for row in rows.values():
        row["reward"] /= row["answers"]
        row["score"] /= row["answers"]

    print(f"\n{args.run}: {len(failed)} failed rollouts of steps {args.steps.start}-"
          f"{args.steps.stop - 1}, {args.samples} answers each per context, "
          f"T = {cfg['temperature']}, ≤ {cfg['max_new_tokens']} tokens ({seconds:.0f} s)")  # fmt: skip
    print("| context | answers | success rate | per-check score |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['answers']} | {row['reward']:.3f} | {row['score']:.3f} |")
    out = {"run": str(args.run), "model": cfg["model"], "dtype": str(model.dtype),
           "steps": [args.steps.start, args.steps.stop - 1], "rollouts": len(failed),
           "samples": args.samples, "seconds": seconds,
           "playbook": str(args.playbook) if args.playbook else None, "rows": rows}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
