"""Generation batching on CPU: one call per prompt vs one batched call, sorted or not.

A RESD step generates rollouts, then one reflection per failed rollout, then one
curation per reflection. Issuing those prompts one at a time leaves the matrix units
idle; batching them is the main speed lever on both CPU and GPU. Prompt lengths vary
(the reflection prompt holds the task, the answer, the feedback and the playbook), so
batches are formed from length-sorted prompts to cut padding.

    python benchmarks/generation_batching.py            # bundled SmolLM2-135M, ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from resd.generation.hf import generate
from resd.models import load_model, load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/generation_batching.json")
    args = parser.parse_args(argv)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype="bfloat16")
    torch.manual_seed(0)
    # reflection-like prompts of mixed lengths (64 .. 512 tokens), interleaved short/long
    lengths = [64, 512, 96, 448, 128, 384, 160, 320][: args.prompts]
    prompts = [torch.randint(100, 40000, (n,)).tolist() for n in lengths]
    seeds = list(range(len(prompts)))
    common = dict(
        max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, autocast="none", seeds=seeds
    )
    generate(model, tok, prompts[:2], **{**common, "seeds": seeds[:2]}, batch_size=2)  # warm-up

    def run(name: str, fn) -> dict:
        start = time.perf_counter()
        gens = fn()
        seconds = time.perf_counter() - start
        tokens = sum(len(g.token_ids) for g in gens)
        return {"variant": name, "seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}

    rows = [
        run("one call per prompt", lambda: [
            generate(model, tok, [p], **{**common, "seeds": [s]})[0] for p, s in zip(prompts, seeds, strict=True)
        ]),
        run("batch 4, unsorted", lambda: generate(model, tok, prompts, **common, batch_size=4, sort_by_length=False)),
        run("batch 4, length-sorted", lambda: generate(model, tok, prompts, **common, batch_size=4)),
        run("one batch of 8", lambda: generate(model, tok, prompts, **common, batch_size=8)),
    ]  # fmt: skip
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = base / r["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"setting": vars(args), "prompt_lengths": lengths, "rows": rows}, indent=1)
    )
    print(
        f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, {args.new_tokens} new tokens, bf16, CPU"
    )
    print(f"{'variant':24s} {'seconds':>8s} {'tok/s':>7s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['variant']:24s} {r['seconds']:8.1f} {r['tok_s']:7.1f} {r['speedup']:7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
