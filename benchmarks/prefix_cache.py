"""What reusing the rollout's keys and values saves a reflection pass, at equal work.

`reflection_layout: conversation` lays the reflection prompt out as the rollout's own
conversation continued, so its first tokens are the rollout's prompt and reply, and the
transformers backend primes generation with their keys and values (`PrefixCache`)
instead of prefilling them again. This script isolates that saving from everything a
training step adds (different reflections, a different playbook, noisy updates):

1. sample one batch of rollouts on a task's prompts, keeping their prefixes;
2. build the conversation-layout reflection prompt of every rollout (the env's real
   feedback, an empty playbook), the same token ids for both arms;
3. decode them with and without the cache, alternating the order, `--repeats` times:
   once with one new token (the prefill alone) and once with `--new-tokens` forced new
   tokens (`min_new_tokens`: both arms decode exactly the same number);
4. time the rollout pass itself with and without keeping prefixes (the copy's cost).

It reports the hit rate, cached tokens per prompt, and the median seconds of each arm.

    python benchmarks/prefix_cache.py                                  # bundled 0.5B, both tasks
    python benchmarks/prefix_cache.py --smoke                          # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from step_profile import scratch_dir  # this script's folder is on the path

from resd.generation.hf import PrefixCache, chat_ids_after, chat_prompt_ids, generate
from resd.templating import strip_thinking
from resd.training.reflection import reflection_followup

ENVS = {  # the step profile's tasks: short prompts, and ~400-token manufactoria prompts
    "house_rules": {"n_test": 4},
    "manufactoria": {},
}


def load(model: str, dtype: str):
    from resd.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(model)
    return load_model(path, dtype=dtype), load_tokenizer(path)


def model_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every task-on-a-model benchmark here takes (and `--out` its JSON)."""
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16", help="the sampling copy's dtype")
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-prompt-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few tokens")
    parser.add_argument("--out", default=out)


def tiny_model(prefix: str) -> str:
    """A tiny random model of the tests' (`--smoke` runs: seconds, no weights to fetch)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model

    return str(build_tiny_model(Path(scratch_dir(prefix))))


def write_rows(out: str, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The run's settings, machine and rows as JSON at `out`."""
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"settings": settings, "threads": torch.get_num_threads(),
                                     "machine": platform.processor() or platform.machine(),
                                     "rows": rows}, indent=1))  # fmt: skip


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(model, tok, env_name: str, args: argparse.Namespace) -> dict[str, Any]:
    from resd.envs import make_env

    env = make_env(env_name, ENVS.get(env_name, {}))
    items = env.train_items()[: args.batch]
    prompts = [chat_prompt_ids(tok, item.messages, args.max_prompt_tokens) for item in items]
    seeds = list(range(len(prompts)))
    common = dict(temperature=0.7, top_p=1.0, seeds=seeds, batch_size=args.batch, autocast="none")
    generate(model, tok, prompts[:1], max_new_tokens=2, **{**common, "seeds": [0]})  # warm-up
    cache = PrefixCache()
    roll = {"keep": [], "plain": []}
    gens = None
    for _ in range(args.repeats):  # the rollout pass, with and without keeping prefixes
        for arm in ("plain", "keep"):
            seconds, out = timed(lambda arm=arm: generate(
                model, tok, prompts, max_new_tokens=args.rollout_tokens, **common,
                prefix_cache=cache if arm == "keep" else None, keep_prefixes=arm == "keep"))  # fmt: skip
            roll[arm].append(seconds)
            gens = out if arm == "keep" else gens
    followups = []
    for item, prompt, gen in zip(items, prompts, gens, strict=True):
        reply = gen.content_ids
        feedback = env.score(item, gen.text).feedback
        # the attempt as the trainer shows it (`Rollout.response`: reasoning and outer
        # whitespace removed), so a reply that is rewritten here is rewritten in training
        messages = reflection_followup(item.messages, strip_thinking(gen.text), feedback, "")
        followups.append(chat_ids_after(tok, messages, prompt + reply, args.max_prompt_tokens))
    # rows that begin with a whole kept sequence (the only hits before partial matches)
    whole = sum(
        any(len(t) < len(f) and f[: len(t)] == t for t, _ in cache.entries) for f in followups
    )
    arms: dict[str, dict[str, list[float]]] = {"cached": {}, "prefill": {}}
    hits = []
    for budget in (1, args.new_tokens):
        for arm in arms.values():
            arm[str(budget)] = []
        for repeat in range(args.repeats):
            order = ("cached", "prefill") if repeat % 2 == 0 else ("prefill", "cached")
            for arm in order:
                seconds, out = timed(lambda arm=arm, budget=budget: generate(
                    model, tok, followups, max_new_tokens=budget, min_new_tokens=budget, **common,
                    prefix_cache=cache if arm == "cached" else None))  # fmt: skip
                arms[arm][str(budget)].append(seconds)
                if arm == "cached":
                    hits = [g.cached_tokens for g in out]
    prompt_tokens = sum(len(f) for f in followups)
    row = {
        "env": env_name,
        "rows": len(followups),
        "prompt_tokens_mean": prompt_tokens / len(followups),
        "hit_rate": sum(h > 0 for h in hits) / len(hits),
        "whole_match_rate": whole / len(followups),
        "cached_tokens_mean": sum(hits) / len(hits),
        "cached_fraction": sum(hits) / prompt_tokens,
        "rollout_tokens_mean": statistics.mean(len(g.token_ids) for g in gens),
        "rollout_s": {k: statistics.median(v) for k, v in roll.items()},
        "reflect_s": {arm: {b: statistics.median(v) for b, v in d.items()} for arm, d in arms.items()},
        "runs": {"rollout": roll, "reflect": arms},
    }  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, "benchmarks/results/prefix_cache.json")
    parser.add_argument("--rollout-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.model = tiny_model("resd-prefix-")
        args.dtype, args.batch, args.rollout_tokens, args.new_tokens = "float32", 3, 6, 4
        args.repeats = 1
    model, tok = load(args.model, args.dtype)
    rows = [measure(model, tok, env, args) for env in args.envs.split(",")]
    write_rows(args.out, args, rows)
    n = args.new_tokens
    print(f"{'env':13s} {'prompt':>6s} {'hits':>5s} {'whole':>5s} {'cached':>6s} {'prefill s':>9s} "
          f"{'cached s':>8s} {f'{n} tok s':>9s} {'cached s':>8s} {'saving':>6s} {'keep s':>6s} {'plain s':>7s}")  # fmt: skip
    for r in rows:
        pre, cac = r["reflect_s"]["prefill"], r["reflect_s"]["cached"]
        saving = 1 - cac[str(n)] / pre[str(n)]
        print(f"{r['env']:13s} {r['prompt_tokens_mean']:6.0f} {r['hit_rate']:5.2f} {r['whole_match_rate']:5.2f} "
              f"{r['cached_tokens_mean']:6.0f} {pre['1']:9.2f} {cac['1']:8.2f} {pre[str(n)]:9.2f} "
              f"{cac[str(n)]:8.2f} {saving:6.1%} {r['rollout_s']['keep']:6.2f} {r['rollout_s']['plain']:7.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
