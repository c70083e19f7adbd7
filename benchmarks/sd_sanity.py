"""Self-distillation sanity check: can the teacher teach at all?

The simplest case self-distillation must handle: 8 multiplication problems (3-digit by
2-digit), trained on again and again and tested on themselves, with feedback that states
the right value. If distillation works, the student learns these 8 answers.

Every step it records, per run:
- train accuracy (the step's rollouts) and, every `--eval-every` steps, accuracy on the
  8 items (4 samples each);
- the teacher's log-probability of the correct answer's digits with the feedback in its
  context and without it (the teacher's advantage: does the context carry anything?),
  and the student's, on the same tokens;
- the mean response length.

Feedback modes: `quote` says "The final answer 1770384 is wrong: 967 * 19 = 18373."
(the wrong number is in the teacher's context, and a small teacher copies it);
`plain` says "Incorrect. The correct value is 967 * 19 = 18373."

    python benchmarks/sd_sanity.py --out runs/sd_sanity                      # the grid below
    python benchmarks/sd_sanity.py --algorithms sdpo --feedback plain --steps 8 --out runs/try

Runs resume (each is an ordinary run folder); every run of the grid is reported.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import torch

from resd.config import load_config
from resd.envs.arithmetic import ArithmeticEnv
from resd.envs.base import Environment, Item, Score
from resd.generation.hf import chat_prompt_ids
from resd.models import autocast_context
from resd.training.callbacks import Callback

SETTINGS = [
    "model=qwen2.5-coder-0.5b", "batch_size=8", "inner_updates=4", "micro_batch_size=4",
    "generation_batch_size=8", "max_new_tokens=64", "reflection_max_new_tokens=256",
    "curation_max_new_tokens=192", "lr=1e-4", "warmup_steps=2", "teacher_update_rate=0.05",
    "lora={r: 16, alpha: 32}", "shuffle=false", "eval_samples=4", "log_samples=8",
    "progress=false", "save_every=8", "keep_checkpoints=1",
]  # fmt: skip


class SanityEnv(Environment):
    """8 fixed products, repeated `repeats` times in the training stream, tested on themselves."""

    name = "sd_sanity"
    description = "8 multiplications, trained and tested on the same items"

    def __init__(
        self, n_items: int = 8, repeats: int = 8, quote_answer: bool = True, seed: int = 0
    ) -> None:
        rng = random.Random(seed)
        self.scorer = ArithmeticEnv(n_train=1, n_test=1, quote_answer=quote_answer)
        self.items = []
        for _ in range(n_items):
            a, b = rng.randint(100, 999), rng.randint(11, 99)
            question = f"What is {a} * {b}?"
            self.items.append(Item(
                id=f"sanity/{a}*{b}",
                messages=[{"role": "user", "content": f"{question} End your reply with a line of the form 'Answer: <number>'."}],
                meta={"a": a, "b": b, "op": "*", "value": a * b, "question": question},
                reference=f"Answer: {a * b}", answer=str(a * b),
            ))  # fmt: skip
        self.repeats = repeats

    def train_items(self) -> list[Item]:
        return self.items * self.repeats  # batch i (shuffle off) is the 8 items again

    def test_items(self) -> list[Item]:
        return self.items

    def score(self, item: Item, response: str) -> Score:
        return self.scorer.score(item, response)


@torch.no_grad()
def answer_logprob(trainer, model, prompt_ids: list[int], answer: str) -> float:
    """Mean log-prob per token of the answer's digits after "Answer: " (teacher forcing,
    the path the loss uses: one forward over prompt + continuation)."""
    tok = trainer.tokenizer
    head = tok("Answer: ", add_special_tokens=False)["input_ids"]
    digits = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + head + digits], device=trainer.device)
    with autocast_context(trainer.device, trainer.cfg.autocast):
        logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[-len(digits) - 1 : -1], -1)
    return float(logp.gather(-1, torch.tensor(digits, device=trainer.device)[:, None]).mean())


class Probe(Callback):
    """After every step: the teacher with and without its context, and the student, on the
    right answers of the 8 items (probes.jsonl in the run folder)."""

    def __init__(self, env: SanityEnv, path: Path) -> None:
        self.env, self.path = env, path

    def measure(self, trainer, step: int) -> dict[str, float]:
        samples = [s for s in _jsonl(trainer.run_dir / "samples.jsonl") if s["step"] == step]
        contexts = {s["item"]: s["teacher_prompt"] for s in samples if s.get("teacher_prompt")}
        with_fb, without, student = [], [], []
        for item in self.env.items:
            plain = chat_prompt_ids(trainer.tokenizer, item.messages)
            student.append(answer_logprob(trainer, trainer.model, plain, item.answer))
            without.append(trainer.teacher.logits(
                trainer.model, partial(answer_logprob, trainer, prompt_ids=plain, answer=item.answer)))  # fmt: skip
            if item.id in contexts:
                ids = trainer.lessons._chat([{"role": "user", "content": contexts[item.id]}])
                with_fb.append(trainer.teacher.logits(
                    trainer.model, partial(answer_logprob, trainer, prompt_ids=ids, answer=item.answer)))  # fmt: skip
        return {
            "step": step,
            "teacher_with_feedback": statistics.mean(with_fb) if with_fb else float("nan"),
            "teacher_without_feedback": statistics.mean(without),
            "student": statistics.mean(student),
        }

    def _write(self, row: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def on_evaluate(self, trainer, row) -> None:
        if trainer.step == 0:
            self._write(self.measure(trainer, 0))

    def on_step_end(self, trainer, metrics) -> None:
        row = self.measure(trainer, metrics["step"])
        self._write(row)
        print(f"{trainer.run_dir.name} step {metrics['step']}: reward {metrics['reward']:.2f} "
              f"teacher+fb {row['teacher_with_feedback']:.2f} teacher {row['teacher_without_feedback']:.2f} "
              f"student {row['student']:.2f} tokens {metrics['response_tokens']:.1f}", flush=True)  # fmt: skip


def run(
    out: Path, algorithm: str, feedback: str, steps: int, eval_every: int, extra: list[str]
) -> Path:
    from resd.rundir import truncate_jsonl
    from resd.training.trainer import Trainer

    run_dir = out / f"{algorithm}-{feedback}"
    if (run_dir / "summary.json").exists():
        return run_dir
    env = SanityEnv(repeats=-(-steps // 4), quote_answer=feedback == "quote")
    cfg = load_config(None, [*SETTINGS, f"algorithm={algorithm}", f"steps={steps}", f"eval_every={eval_every}",
                             f"output_dir={run_dir}", *extra])  # fmt: skip
    probe = Probe(env, run_dir / "probes.jsonl")
    trainer = Trainer(cfg, resume=(run_dir / "metrics.jsonl").exists(), env=env, callbacks=[probe])
    truncate_jsonl(probe.path, trainer.step)  # a resumed run rewrites its later probes
    trainer.train()
    return run_dir


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    )


def report(out: Path, names: list[str]) -> dict[str, Any]:
    runs = {}
    for name in names:
        d = out / name
        metrics, probes, evals = (
            _jsonl(d / f) for f in ("metrics.jsonl", "probes.jsonl", "eval.jsonl")
        )
        runs[name] = {
            "steps": [{"step": m["step"], "train_accuracy": m["success_rate"], "response_tokens": m["response_tokens"],
                       "teacher_advantage": m.get("teacher_advantage")} for m in metrics],
            "probes": probes,
            "eval": [{"step": e["step"], "task_mean@k": e["task_mean@k"], "task_best@k": e["task_best@k"]} for e in evals],
        }  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sd_sanity")
    parser.add_argument("--algorithms", default="sdpo,resd")
    parser.add_argument("--feedback", default="quote,plain")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--json", default="benchmarks/results/sd_sanity.json")
    parser.add_argument("overrides", nargs="*", help="extra config key=value for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    names = []
    for feedback in args.feedback.split(","):
        for algorithm in args.algorithms.split(","):
            names.append(
                run(out, algorithm, feedback, args.steps, args.eval_every, args.overrides).name
            )
    # every run in the folder is reported, also those an earlier invocation asked for
    names = sorted({*names, *(p.name for p in out.iterdir() if (p / "metrics.jsonl").exists())})
    result = {"settings": SETTINGS, "overrides": args.overrides, "runs": report(out, names)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(
        f"\n{'run':14s} {'step':>4s} {'train acc':>9s} {'test acc':>8s} {'T+fb':>6s} {'T':>6s} {'S':>6s} {'tokens':>6s}"
    )
    for name, r in result["runs"].items():
        evals = {e["step"]: e["task_mean@k"] for e in r["eval"]}
        probes = {p["step"]: p for p in r["probes"]}
        for s in r["steps"]:
            p = probes.get(s["step"], {})
            test = f"{evals[s['step']]:8.3f}" if s["step"] in evals else " " * 8
            print(f"{name:14s} {s['step']:4d} {s['train_accuracy']:9.3f} {test} {p.get('teacher_with_feedback', float('nan')):6.2f} "
                  f"{p.get('teacher_without_feedback', float('nan')):6.2f} {p.get('student', float('nan')):6.2f} {s['response_tokens']:6.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
