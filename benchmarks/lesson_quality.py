"""Lesson quality: do reflection and curation turn failures into usable playbook lessons?

A grid of short RESD runs: the two bundled models × structured output off / on × the
arithmetic and manufactoria tasks, 16 steps each. For every cell it reports the parse
rate of reflections (a whole JSON object, not the line fallback), the share of curation
replies that changed the playbook, the operations applied and skipped (with reasons),
the playbook's size at the end, lessons quoted verbatim, and the generation time per
token of the lesson phases. A second part measures the grammar's own cost per token:
the same prompts decoded with and without the JSON mask.

    python benchmarks/lesson_quality.py --out runs/lessons                   # the whole grid
    python benchmarks/lesson_quality.py --out runs/lessons --models smollm2-135m --envs arithmetic

The grid resumes: a finished cell is kept, an interrupted one continues from its last
checkpoint. Every cell is reported, finished or not. Results go to --json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# The demo's schedule (batches of 8, K = 4) with budgets that leave reflections room to
# say something. LoRA keeps the 0.5B model's step affordable on 2 cores; lesson quality
# does not depend on how the student's weights are updated.
BASE: dict[str, Any] = {
    "algorithm": "resd", "steps": 16, "batch_size": 8, "inner_updates": 4, "micro_batch_size": 4,
    "generation_batch_size": 8, "reflection_max_new_tokens": 256, "curation_max_new_tokens": 192,
    "max_reflections_per_step": 8, "lr": 1.0e-5, "warmup_steps": 2, "teacher_update_rate": 0.05,
    "lora": {"r": 16, "alpha": 32}, "eval_items": 4, "eval_samples": 1, "log_samples": 8,
    "playbook_max_entries": 120, "teacher_playbook_tokens": 1024, "save_every": 4, "keep_checkpoints": 1,
    "progress": False, "seed": 0,
}  # fmt: skip
ENVS: dict[str, dict[str, Any]] = {
    # two-digit sums and products: both models fail often enough to have something to reflect on
    "arithmetic": {"env": "arithmetic", "env_args": {"seed": 0, "n_train": 128, "n_test": 16,
                   "max_operand": 99, "mul_max_operand": 99, "quote_answer": True},  # as in the first cells
                   "max_new_tokens": 96},
    "manufactoria": {"env": "manufactoria", "max_new_tokens": 320, "max_prompt_tokens": 2048,
                     "max_teacher_prompt_tokens": 4096},
}  # fmt: skip
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
# Structured output off / on (the default grid). Three more modes, all with structured output
# on, are asked for by name (--modes on,one,conv,min1): "one", where the reflector also
# curates (`lesson_calls: one`), "conv" (`reflection_layout: conversation`) and "min1"
# (`curation_min_operations: 1`).
MODES = ("off", "on")
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "off": {"structured_output": "off"},
    "on": {"structured_output": "on"},
    "one": {"structured_output": "on", "lesson_calls": "one"},
    # the reflector reads its attempt as its own conversation continued (the prefix cache)
    "conv": {"structured_output": "on", "reflection_layout": "conversation"},
    # the curator must propose at least one operation (the schema's minItems): under the
    # grammar the 0.5B curator otherwise answers with an empty list almost every time
    "min1": {"structured_output": "on", "curation_min_operations": 1},
}


def cell_name(model: str, env: str, mode: str) -> str:
    return f"{model}-{env}-so_{mode}"


def run_cell(out: Path, model: str, env: str, mode: str) -> Path:
    """Train one cell in a subprocess (one model in memory at a time); resume if cut short."""
    run = out / cell_name(model, env, mode)
    if (run / "summary.json").exists():
        return run
    config = {
        **BASE,
        **ENVS[env],
        "model": model,
        **MODE_SETTINGS[mode],
        "output_dir": str(run),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    resume = ["--resume"] if (run / "metrics.jsonl").exists() else []
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "resd.cli", "train", "--config", str(path), *resume],
                   check=True)  # fmt: skip
    print(f"{run.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return run


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _not_paraphrases(lessons: list[str]) -> int:
    """How many lessons an empty playbook keeps when they are added in order under the
    default `playbook_similarity`: "distinct" as the trainer now counts it."""
    from resd.config import TrainConfig
    from resd.training.playbook import Playbook

    playbook = Playbook()
    playbook.apply_operations([{"type": "ADD", "section": "Others", "content": c} for c in lessons],
                              similarity=TrainConfig.playbook_similarity)  # fmt: skip
    return len(playbook)


def summarize(run: Path, quotes: int = 10) -> dict[str, Any]:
    """The cell's lesson figures from the files the run wrote."""
    metrics = _jsonl(run / "metrics.jsonl")
    total = {k: sum(m.get(k, 0) for m in metrics) for k in (
        "reflections", "reflections_parsed", "reflection_loose_parses", "reflection_parse_failures",
        "reflection_truncated", "curations", "curations_parsed", "curations_effective",
        "curation_truncated", "ops_applied", "ops_skipped", "reflection_tokens", "tag_tokens",
        "curation_tokens", "time_reflect", "time_curate",
    )}  # fmt: skip
    skipped = {
        k.removeprefix("ops_skipped_"): sum(m.get(k, 0) for m in metrics)
        for k in (metrics[0] if metrics else {})
        if k.startswith("ops_skipped_")
    }
    playbook_file = run / "playbook.json"
    entries = json.loads(playbook_file.read_text())["entries"] if playbook_file.exists() else []
    lessons = [e["content"] for e in entries]
    # Lessons pruned along the way are quoted from the curator replies that added them.
    for row in _jsonl(run / "samples.jsonl"):
        try:
            ops = json.loads(row.get("curation_reply") or "")["operations"]
        except (ValueError, KeyError, TypeError):
            continue
        lessons += [op["content"] for op in ops if isinstance(op, dict) and op.get("type") == "ADD"
                    and isinstance(op.get("content"), str)]  # fmt: skip
    tokens = total["reflection_tokens"] + total["tag_tokens"] + total["curation_tokens"]
    seconds = total["time_reflect"] + total["time_curate"]
    return {
        "run": run.name,
        "steps": len(metrics),
        "finished": (run / "summary.json").exists(),
        **total,
        "skipped_by_reason": {k: v for k, v in skipped.items() if v},
        "reflection_parse_rate": total["reflections_parsed"] / max(1, total["reflections"]),
        "curation_effective_rate": total["curations_effective"] / max(1, total["curations"]),
        "playbook_size_end": len(entries),
        "playbook_size_max": max((m.get("playbook_size", 0) for m in metrics), default=0),
        "lessons_added_distinct": len(dict.fromkeys(lessons)),
        "playbook_end_not_paraphrases": _not_paraphrases([e["content"] for e in entries]),
        "lesson_seconds_per_token": seconds / tokens if tokens else None,
        "lessons_quoted": list(dict.fromkeys(lessons))[:quotes],
    }


def grammar_cost(model_name: str, new_tokens: int = 96, rows: int = 8) -> dict[str, Any]:
    """Decode the same reflection-like prompts with and without the JSON mask."""
    import torch

    from resd.generation.hf import chat_prompt_ids, eos_token_ids, generate
    from resd.generation.schemas import reflection_schema
    from resd.generation.structured import JsonGrammar
    from resd.models import load_model, load_tokenizer

    tok, model = load_tokenizer(model_name), load_model(model_name, dtype="bfloat16")
    grammar = JsonGrammar(tok, model.config.vocab_size, eos_token_ids(model, tok))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Reflect on attempt {i} as JSON."}])
               for i in range(rows)]  # fmt: skip
    # Large string bounds: every row keeps decoding for the whole budget in both variants.
    schema = reflection_schema(["strat-00001", "err-00002"], new_tokens * 8)
    result = {}
    for name, kwargs in (
        ("free", {}),
        ("grammar", {"grammar": grammar, "json_schemas": [schema] * rows}),
    ):
        warm = {"grammar": grammar, "json_schemas": [schema] * min(2, rows)} if kwargs else {}
        generate(model, tok, prompts[:2], max_new_tokens=4, temperature=1.0, seeds=[0, 1][:rows],
                 autocast="none", **warm)  # fmt: skip
        torch.manual_seed(0)
        start = time.perf_counter()
        gens = generate(model, tok, prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=0.95,
                        seeds=list(range(rows)), batch_size=rows, autocast="none", **kwargs)  # fmt: skip
        seconds = time.perf_counter() - start
        # A batch decodes until its longest row ends: that is the number of decode steps.
        # (Dividing by the mean row length instead, as this script first did, charged the
        # free-text arm, whose rows stop early, for steps it did not take alone.)
        steps = max(len(g.token_ids) for g in gens)
        result[name] = {
            "seconds": seconds,
            "tokens": sum(len(g.token_ids) for g in gens),
            "decode_steps": steps,
            "ms_per_token_step": 1000 * seconds / steps,
        }
    result["overhead_ms_per_token_step"] = (
        result["grammar"]["ms_per_token_step"] - result["free"]["ms_per_token_step"]
    )
    result["ratio"] = result["grammar"]["ms_per_token_step"] / result["free"]["ms_per_token_step"]
    return {"model": model_name, "rows": rows, "vocab": model.config.vocab_size, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lessons")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--envs", default=",".join(ENVS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--summary-only", action="store_true", help="report what exists, train nothing"
    )
    parser.add_argument("--no-grammar-cost", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/lesson_quality.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    cells = [(m, e, s) for m in args.models.split(",") for e in args.envs.split(",")
             for s in args.modes.split(",")]  # fmt: skip
    if not args.summary_only:
        for cell in cells:
            run_cell(out, *cell)
    rows = [summarize(out / cell_name(*c)) for c in cells]
    costs = [] if args.no_grammar_cost else [grammar_cost(m) for m in args.models.split(",")]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"base": BASE, "envs": ENVS, "cells": rows, "grammar_cost": costs},
                                          indent=1))  # fmt: skip
    head = f"{'run':40s} {'steps':>5s} {'refl':>5s} {'parsed':>7s} {'cur':>4s} {'eff':>6s} {'applied':>7s} {'skipped':>7s} {'pb end':>6s} {'ms/tok':>7s}"
    print(head)
    for r in rows:
        ms = (
            f"{1000 * r['lesson_seconds_per_token']:7.1f}"
            if r["lesson_seconds_per_token"]
            else "      -"
        )
        print(f"{r['run']:40s} {r['steps']:5d} {r['reflections']:5d} {r['reflection_parse_rate']:7.0%} "
              f"{r['curations']:4d} {r['curation_effective_rate']:6.0%} {r['ops_applied']:7d} "
              f"{r['ops_skipped']:7d} {r['playbook_size_end']:6d} {ms}")  # fmt: skip
    for c in costs:
        print(f"grammar cost {c['model']}: {c['free']['ms_per_token_step']:.1f} -> "
              f"{c['grammar']['ms_per_token_step']:.1f} ms per decode step of {c['rows']} rows "
              f"({c['ratio']:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
