"""Which part of the teacher's context makes it agree with a failing reply?

`teacher_advantage` (metrics.jsonl) is the mean, over a step's distilled tokens, of the
teacher's log-probability minus the student's, on the student's own reply. On failed
replies it should be negative. This probe takes the rollouts one step of a run logged
(samples.jsonl: the task, the reply and the teacher prompt), takes the teacher prompt apart
into its slots, and measures the same quantity with the base model as teacher and student
(the EMA teacher at step 1 *is* the base model) for the prompt as logged and for the
prompt with one slot left out at a time. The row "as logged" should land near the run's
own step-1 value; where it does not, the re-tokenised replies differ from the sampled ones.

    python benchmarks/teacher_context_probe.py runs/sd_sanity/resd-plain runs/headline_qwen/resd-seed0

Prints a table per run and writes benchmarks/results/teacher_context_probe.json.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from resd.envs import Item, make_env
from resd.generation.hf import chat_prompt_ids
from resd.models import autocast_context, load_model, load_tokenizer
from resd.rundir import read_jsonl
from resd.training.teacher_context import SLOT_TITLES, TeacherTemplate, teacher_chat

VARIANTS = {  # name -> slots left out of the logged prompt
    "as logged": (),
    "without the previous attempt": ("previous_trial",),
    "without the reflection": ("reflection",),
    "without the playbook": ("playbook",),
    "without the successful attempt": ("successful_trial",),
    # with one rollout per prompt, SDPO has no successful peer to show
    "feedback only (SDPO's context)": (
        "previous_trial",
        "reflection",
        "playbook",
        "successful_trial",
    ),
}
_SLOT = re.compile(r"<(" + "|".join(SLOT_TITLES) + r")>\n(.*?)\n</\1>", re.DOTALL)


def slots_of(teacher_prompt: str) -> dict[str, str]:
    """The text of each slot in a rendered teacher prompt (escaped tags stay escaped)."""
    return {m.group(1): m.group(2) for m in _SLOT.finditer(teacher_prompt)}


def logged_slots(run: Path, template: TeacherTemplate, teacher_prompt: str) -> dict[str, str]:
    """The slots of a logged teacher prompt, refused unless they re-render it exactly (a
    prompt taken apart wrongly would make every variant built from it wrong)."""
    slots = slots_of(teacher_prompt)
    if template.render(**slots) != teacher_prompt:
        raise SystemExit(f"{run}: the logged teacher prompt is not this template's rendering")
    return slots


@torch.no_grad()
def reply_logprobs(model, prompt_ids: list[int], reply_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + reply_ids])
    with autocast_context(ids.device, "auto"):
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply_ids)[:, None])[:, 0]


def items_of(cfg: dict[str, Any]) -> dict[str, Item]:
    """The run's items by id, from its environment: samples.jsonl logs only the last user
    message, not a task's system message or, in a longer conversation, its earlier turns
    (a tool's call and result). None for an environment that cannot be built here."""
    try:
        env = make_env(cfg["env"], cfg.get("env_args") or {})
    except (ValueError, KeyError):
        return {}
    return {it.id: it for it in [*env.train_items(), *env.test_items()]}


@dataclass
class Chats:
    student: list[dict[str, str]]  # the conversation the student answered
    teacher: dict[str, list[dict[str, str]]]  # per variant, the teacher's conversation


def sample_chats(
    run: Path, template: TeacherTemplate, items: dict[str, Item], sample: dict[str, Any]
) -> Chats:
    """A logged rollout's student chat and its teacher chats, one per variant, built as the
    trainer builds them: the teacher reads the turns before the task's last user message
    (a system message; a tool's call and result), then its prompt in that message's place.
    Without the run's items, the logged last user message stands alone."""
    slots = logged_slots(run, template, sample["teacher_prompt"])
    item = items.get(sample["item"]) or Item(
        sample["item"], [{"role": "user", "content": sample["prompt"]}]
    )
    if item.prompt_text != sample["prompt"]:
        raise SystemExit(f"{run}: item {sample['item']} is not the one it logged (other env_args?)")
    teacher = {
        name: teacher_chat(
            item, template.render(**{k: v for k, v in slots.items() if k not in out})
        )
        for name, out in VARIANTS.items()
    }
    return Chats(student=list(item.messages), teacher=teacher)


def probe(
    run: Path, step: int, model, tokenizer, template: TeacherTemplate, items: dict[str, Item]
) -> dict[str, Any]:
    samples = [
        s
        for s in read_jsonl(run / "samples.jsonl")
        if s["step"] == step and s.get("teacher_prompt") and s["reward"] < 1
    ]
    if not samples:
        raise SystemExit(f"{run}: no failed rollout with a teacher prompt at step {step}")
    logged = next((m for m in read_jsonl(run / "metrics.jsonl") if m["step"] == step), {})
    sums = dict.fromkeys(VARIANTS, 0.0)
    tokens = 0
    for s in samples:
        reply = tokenizer(s["response"], add_special_tokens=False)["input_ids"]
        if not reply:
            continue
        chats = sample_chats(run, template, items, s)
        student = reply_logprobs(model, chat_prompt_ids(tokenizer, chats.student), reply)
        for name, chat in chats.teacher.items():
            teacher = reply_logprobs(model, chat_prompt_ids(tokenizer, chat), reply)
            sums[name] += float((teacher - student).sum())
        tokens += len(reply)
    return {
        "run": str(run), "step": step, "rollouts": len(samples), "tokens": tokens,
        "logged_teacher_advantage": logged.get("teacher_advantage"),
        "teacher_advantage": {name: total / tokens for name, total in sums.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/teacher_context_probe.json")
    args = parser.parse_args(argv)
    configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in args.runs]
    models = {c["model"] for c in configs}
    if len(models) != 1:
        raise SystemExit(
            f"the runs use different models {sorted(models)}; probe them one model at a time"
        )
    name = models.pop()
    tokenizer, model = load_tokenizer(name, 4096), load_model(name, dtype="float32", device="cpu")
    model.eval()
    results = []
    for run, cfg in zip(args.runs, configs, strict=True):
        template = TeacherTemplate.from_config(cfg.get("teacher_template"))
        row = probe(run, args.step, model, tokenizer, template, items_of(cfg))
        results.append(row)
        print(f"\n{run} (step {row['step']}, {row['rollouts']} failed rollouts, {row['tokens']} reply tokens; "
              f"logged teacher_advantage {row['logged_teacher_advantage']:+.2f})")  # fmt: skip
        print("| teacher context | teacher_advantage |\n|---|---|")
        for variant, value in row["teacher_advantage"].items():
            print(f"| {variant} | {value:+.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": name, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
