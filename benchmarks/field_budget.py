"""Reflection fields budgeted in characters or in tokens: how many get cut, side by side.

Structured reflections give each diagnosis field a `maxLength` sized at 3 characters a
token, so that the object closes within the reply's token budget. The 0.5B model's
reflections run at 2.5 to 4.4 characters a token, and in the sanity runs 5 to 18 % of
fields stopped at their limit mid-word ("produce the expected 5"). The transformers
backend now budgets those fields in tokens (`JsonGrammar(token_budget=True)`): a field
closes when what is left is only what the rest of the object needs, and a short field
hands its unused tokens on; in the last `SENTENCE_WINDOW_TOKENS` before its deadline, a
field also ends where a sentence does. This script decodes the same reflection prompts
three ways:

1. sample one rollout for each of `--items` training prompts of a task and score it (the
   task's real feedback);
2. build each failed rollout's reflection prompt (the release's layout, an empty
   playbook) and its schema at `--budget` tokens;
3. decode them, the same seeds, with the character limits (`characters`, the schema as
   vLLM gets it), with the token budget alone (`tokens`), and with the token budget and
   the sentence window (`sentences`, the default).

It reports, per arm, replies that parse, fields cut (stopped at their `maxLength`, or
closed at their token deadline), fields whose text does not end a sentence (cut, or so
ended by the model), characters per field, reply tokens and seconds. The arms write
different text after their first difference, so the counts compare arms, not replies.

    python benchmarks/field_budget.py                       # bundled 0.5B, arithmetic and house rules
    python benchmarks/field_budget.py --smoke               # tiny random model, seconds
    python benchmarks/field_budget.py --envs arithmetic --min-operations 0   # may the curator pass?
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any

import torch
from prefix_cache import (
    load,
    model_arguments,
    tiny_model,
    write_rows,
)  # the benchmarks' shared plumbing
from reflection_content import ends_mid_sentence  # one notion of a sentence's end

from resd.generation.budget import SENTENCE_WINDOW_TOKENS
from resd.generation.hf import chat_prompt_ids, eos_token_ids, generate
from resd.generation.schemas import REFLECTION_WEIGHTS, curation_schema, reflection_schema
from resd.generation.structured import JsonGrammar
from resd.training.reflection import curation_messages, parse_reflection, reflection_messages

ENVS = {  # the sanity check's quoted multiplications, and the headline's task
    # two-digit products and sums, the feedback quoting the wrong number (the sanity check's)
    "arithmetic": {"n_train": 64, "max_operand": 99, "mul_max_operand": 99, "quote_answer": True},
    "house_rules": {"seed": 0, "rules_seed": 0, "n_rules": 3, "n_test": 32},
}
FIELDS = list(REFLECTION_WEIGHTS)
ARMS = (  # name, token budget, sentence window
    ("characters", False, 0),
    ("tokens", True, 0),
    ("sentences", True, SENTENCE_WINDOW_TOKENS),
)


def reflection_prompts(
    model, tok, env_name: str, args: argparse.Namespace
) -> tuple[list[list[int]], list[str]]:
    """The reflection prompts of this task's failed rollouts (at most `--items`), and
    their tasks' text."""
    from resd.envs import make_env

    env = make_env(env_name, ENVS.get(env_name, {}))
    items = env.train_items()[: args.items]
    prompts = [chat_prompt_ids(tok, item.messages, args.max_prompt_tokens) for item in items]
    gens = generate(model, tok, prompts, max_new_tokens=args.rollout_tokens, temperature=0.7,
                    seeds=list(range(len(prompts))), batch_size=args.batch)  # fmt: skip
    out, tasks = [], []
    for item, gen in zip(items, gens, strict=True):
        score = env.score(item, gen.text)
        if score.reward < 1.0:
            messages = reflection_messages(item.prompt_text, gen.text, score.feedback, "")
            out.append(chat_prompt_ids(tok, messages, args.max_prompt_tokens))
            tasks.append(item.prompt_text)
    return out, tasks


def _parsed(gens) -> list[dict[str, Any]]:
    """The replies that are whole JSON objects (raw control characters allowed)."""
    objects = []
    for g in gens:
        with contextlib.suppress(json.JSONDecodeError):
            objects.append(json.loads(g.text, strict=False))
    return objects


def decode(model, tok, grammar: JsonGrammar, prompts, schema, args) -> dict[str, Any]:
    """Reflections: the five diagnosis fields of every reply."""
    before = sum(grammar.cut.values())
    start = time.perf_counter()
    gens = generate(model, tok, prompts, max_new_tokens=args.budget, temperature=0.7,
                    seeds=list(range(len(prompts))), batch_size=args.batch, grammar=grammar,
                    json_schemas=[schema] * len(prompts))  # fmt: skip
    seconds = time.perf_counter() - start
    objects = _parsed(gens)
    limits = {k: schema["properties"][k]["maxLength"] for k in FIELDS}
    lengths = {k: [len(o[k]) for o in objects] for k in FIELDS}
    if grammar.token_budget:
        cut = sum(grammar.cut.values()) - before
    else:  # a field that stops exactly at its limit was cut there
        cut = sum(n == limits[k] for k in FIELDS for n in lengths[k])
    tokens = [len(g.token_ids) for g in gens]
    return {
        "replies": len(gens),
        "parsed": len(objects),
        "finished": sum(g.finished for g in gens),
        "fields": len(objects) * len(FIELDS),
        "fields_cut": cut,
        # a field whose text does not end a sentence: cut, or ended by the model itself
        "fields_mid_sentence": sum(ends_mid_sentence(o[k]) for o in objects for k in FIELDS),
        "chars_mean": {k: statistics.mean(v) if v else 0.0 for k, v in lengths.items()},
        "chars_limit": limits,
        "reply_tokens_mean": statistics.mean(tokens),
        "reply_tokens_max": max(tokens),
        "seconds": seconds,
        "texts": [g.text for g in gens],
    }


def curate(model, tok, grammar: JsonGrammar, prompts, schema, args) -> dict[str, Any]:
    """Curations: the lessons (operation contents) and the curator's reasoning."""
    before = sum(grammar.cut.values())
    gens = generate(model, tok, prompts, max_new_tokens=args.curation_budget, temperature=0.7,
                    seeds=list(range(len(prompts))), batch_size=args.batch, grammar=grammar,
                    json_schemas=[schema] * len(prompts))  # fmt: skip
    objects = _parsed(gens)
    lessons = [op["content"] for o in objects for op in o["operations"] if "content" in op]
    limit = max((s["properties"]["content"]["maxLength"] for s in
                 schema["properties"]["operations"]["items"]["anyOf"] if "content" in s["properties"]),
                default=0)  # fmt: skip
    reasoning_limit = schema["properties"]["reasoning"]["maxLength"]
    if grammar.token_budget:
        cut = sum(grammar.cut.values()) - before  # reasoning and lessons together
    else:
        cut = sum(len(x) == limit for x in lessons)
        cut += sum(len(o["reasoning"]) == reasoning_limit for o in objects)
    return {
        "replies": len(gens),
        "parsed": len(objects),
        "lessons": len(lessons),
        "no_change": sum(not o["operations"] for o in objects),  # the curator's "nothing to add"
        "strings_cut": cut,  # lessons and reasonings
        "lessons_mid_sentence": sum(ends_mid_sentence(x) for x in lessons),
        "lesson_chars_mean": statistics.mean(map(len, lessons)) if lessons else 0.0,
        "lesson_chars_limit": limit,
        "reasoning_chars_mean": statistics.mean(len(o["reasoning"]) for o in objects)
        if objects
        else 0.0,
        "texts": [g.text for g in gens],
    }


def curation_prompts(tok, reflections: list[str], tasks: list[str], args) -> list[list[int]]:
    """The curator's prompts for these reflection replies (an empty playbook)."""
    stats = {"total": 0, "high_performing": 0, "problematic": 0, "unused": 0}
    out = []
    for reply, task in zip(reflections, tasks, strict=True):
        reflection = parse_reflection(reply)
        if reflection is not None:
            messages = curation_messages(stats, reflection.as_text(), "", task)
            out.append(chat_prompt_ids(tok, messages, args.max_prompt_tokens))
    return out


def measure(model, tok, env_name: str, args: argparse.Namespace) -> dict[str, Any]:
    prompts, tasks = reflection_prompts(model, tok, env_name, args)
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    schema = reflection_schema([], args.budget, count)
    eos = eos_token_ids(model, tok)
    row: dict[str, Any] = {"env": env_name, "reflections": len(prompts)}
    grammars = {arm: JsonGrammar(tok, model.config.vocab_size, eos, token_budget=token_budget,
                                 sentence_window=window) for arm, token_budget, window in ARMS}  # fmt: skip
    for arm, grammar in grammars.items():
        row[arm] = decode(model, tok, grammar, prompts, schema, args) if prompts else None
    if not prompts:
        return row
    # Every arm curates the same reflections (the default arm's), so that its lessons
    # differ by the budget alone; by default the curator must write at least one
    # (`--min-operations 1`); with 0 it may say "no change", and how often it does is the
    # measure of whether the grammar's forced text leaves it that choice.
    curations = curation_prompts(tok, row[ARMS[-1][0]]["texts"], tasks, args)
    schema = curation_schema([], args.curation_budget, count, min_operations=args.min_operations)
    row["curations"] = len(curations)
    for arm, grammar in grammars.items():
        row[f"{arm}_curation"] = curate(model, tok, grammar, curations, schema, args)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser, "benchmarks/results/field_budget.json")
    parser.set_defaults(envs=",".join(ENVS))  # this script's tasks
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--rollout-tokens", type=int, default=96)
    parser.add_argument("--budget", type=int, default=256, help="reflection_max_new_tokens")
    parser.add_argument("--curation-budget", type=int, default=192, help="curation_max_new_tokens")
    parser.add_argument(
        "--min-operations", type=int, default=1, help="the curator's min_operations"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.model = tiny_model("resd-budget-")
        args.dtype, args.items, args.batch, args.rollout_tokens = "float32", 3, 3, 6
    model, tok = load(args.model, args.dtype)
    rows = [measure(model, tok, env, args) for env in args.envs.split(",")]
    write_rows(args.out, args, rows)
    print(f"{'env':12s} {'arm':10s} {'parsed':>8s} {'cut':>9s} {'mid-sentence':>12s} "
          f"{'chars/field':>11s} {'tokens':>6s} {'max':>4s} {'s':>6s}")  # fmt: skip
    for r in rows:
        for arm, _, _ in ARMS:
            a = r[arm]
            if a is None:
                print(f"{r['env']:12s} {arm:10s} no failed rollout to reflect on")
                continue
            chars = statistics.mean(a["chars_mean"].values())
            print(f"{r['env']:12s} {arm:10s} {a['parsed']:>3d} / {a['replies']:<3d} "
                  f"{a['fields_cut']:>3d} / {a['fields']:<3d} "
                  f"{a['fields_mid_sentence']:>5d} / {a['fields']:<4d} {chars:11.0f} "
                  f"{a['reply_tokens_mean']:6.1f} {a['reply_tokens_max']:4d} {a['seconds']:6.1f}")  # fmt: skip
    print(f"\n{'env':12s} {'arm':10s} {'parsed':>8s} {'lessons':>7s} {'cut':>5s} "
          f"{'mid-sentence':>12s} {'chars/lesson':>12s} {'reasoning':>9s} {'no change':>9s}")  # fmt: skip
    for r in rows:
        for arm, _, _ in ARMS:
            c = r.get(f"{arm}_curation")
            if c is None:
                continue
            print(f"{r['env']:12s} {arm:10s} {c['parsed']:>3d} / {c['replies']:<3d} {c['lessons']:7d} "
                  f"{c['strings_cut']:5d} {c['lessons_mid_sentence']:>5d} / {c['lessons']:<4d} "
                  f"{c['lesson_chars_mean']:12.0f} {c['reasoning_chars_mean']:9.0f} {c['no_change']:9d}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
