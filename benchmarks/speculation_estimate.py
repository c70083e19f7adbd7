"""Would prompt-lookup speculative decoding shorten RESD's reflection pass on a CPU?

Reflections restate their prompt (the feedback, the attempt, the schema's keys), so
drafting the next tokens by finding the last n tokens earlier in the prompt or the reply
("prompt lookup") and checking the drafts in one forward pass is the usual way to decode
them in fewer passes. With this project's row-seeded sampler it would even be exact: a
row's sample at a position is a pure function of its logits, its seed and the position,
so a draft token is accepted exactly when it is the token the plain loop would sample.

Whether it pays depends on two numbers, measured here before building it:

1. **What checking k tokens per row costs**, against one, at batch 8 with a KV cache, on
   a random-init model of Qwen2.5-0.5B's shape (the cost does not depend on the weights).
2. **How many tokens a row would accept per pass**, replaying a run's logged reflection
   replies (samples.jsonl) with n-gram lookup (n = 3, 2, 1) over an approximation of the
   reflection prompt (the task, the attempt, the feedback and the schema's keys: the
   template's fixed instructions are not logged).

A batch decodes until its slowest row is done, and each pass checks as many drafts as
its longest draft, so the estimate replays rows in batches of 8: passes with the longest
draft of the pass priced by (1), against plain decoding's one pass per token of the
longest row.

    python benchmarks/speculation_estimate.py runs/grid/headline/resd-seed1/resd-seed1

Prints the tables and writes benchmarks/results/speculation_estimate.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, DynamicCache, Qwen2Config, Qwen2ForCausalLM

from resd.models import resolve_model_path
from resd.rundir import read_jsonl

SCHEMA_KEYS = (
    '{"reasoning":"","error_identification":"","root_cause_analysis":"",'
    '"correct_approach":"","key_insight":"","bullet_tags":[]}'
)
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)  # fmt: skip


@torch.inference_mode()
def verify_costs(drafts: list[int], batch: int, prompt: int, repeats: int) -> dict[int, float]:
    """Seconds of one cached forward pass of `batch` rows × (1 + k) tokens, per k."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B, tie_word_embeddings=True))
    model = model.to(torch.bfloat16).eval()
    prefix = model(input_ids=torch.randint(0, 1000, (batch, prompt)), use_cache=True)
    costs = {}
    for k in drafts:
        times = []
        for _ in range(repeats):
            cache = DynamicCache()
            for index, layer in enumerate(prefix.past_key_values.layers):
                cache.update(layer.keys.clone(), layer.values.clone(), index)
            ids = torch.randint(0, 1000, (batch, 1 + k))
            mask = torch.ones(batch, prompt + 1 + k, dtype=torch.long)
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            times.append(time.perf_counter() - start)
        costs[k] = min(times)
    return costs


def lookup(seq: list[int], k: int, longest: int = 3) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of seq's last n tokens."""
    for n in range(longest, 0, -1):
        if len(seq) <= n:
            continue
        tail = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start : start + n] == tail:
                return seq[start + n : start + n + k]
    return []


def replay(context: list[int], reply: list[int], k: int) -> list[tuple[int, int]]:
    """(draft length, tokens gained) of each pass that decodes `reply` with lookup drafts."""
    seq, done, passes = list(context), 0, []
    while done < len(reply):
        draft = lookup(seq, k)
        accepted = 0
        while (accepted < len(draft) and done + accepted < len(reply)
               and draft[accepted] == reply[done + accepted]):  # fmt: skip
            accepted += 1
        gained = min(accepted + 1, len(reply) - done)  # the accepted drafts and one sample
        passes.append((len(draft), gained))
        seq += reply[done : done + gained]
        done += gained
    return passes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a RESD run folder with samples.jsonl")
    parser.add_argument("--drafts", default="2,4,8", help="draft lengths k to try")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256, help="cached prefix per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/speculation_estimate.json")
    args = parser.parse_args(argv)
    drafts = [int(k) for k in args.drafts.split(",")]

    costs = verify_costs(sorted({0, *range(1, max(drafts) + 1)}), args.batch_size,
                         args.prompt_tokens, args.repeats)  # fmt: skip
    print(f"\nOne cached forward pass, batch {args.batch_size}, {args.prompt_tokens}-token prefix, "
          f"{torch.get_num_threads()} thread(s), bf16, Qwen2.5-0.5B's shape (random init):")  # fmt: skip
    print("| tokens per row | ms | ÷ one token |\n|---|---|---|")
    for k, cost in costs.items():
        print(f"| {1 + k} | {cost * 1000:.1f} | {cost / costs[0]:.2f} |")

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("qwen2.5-coder-0.5b"))
    logged = [s for s in read_jsonl(args.run / "samples.jsonl") if s.get("reflection_reply")]
    rows = []
    for s in logged:
        context = f"{s['prompt']}\n{s['response']}\n{s['feedback']}\n{SCHEMA_KEYS}"
        rows.append(
            (tokenizer(context)["input_ids"], tokenizer(s["reflection_reply"])["input_ids"])
        )
    estimates = []
    for k in drafts:
        tokens = passes = 0
        plain = speculative = 0.0
        for start in range(0, len(rows), args.batch_size):
            batch = [replay(c, r, k) for c, r in rows[start : start + args.batch_size]]
            tokens += sum(g for row in batch for _, g in row)
            passes += sum(len(row) for row in batch)
            plain += max(sum(g for _, g in row) for row in batch) * costs[0]
            for index in range(max(len(row) for row in batch)):
                longest = max((row[index][0] for row in batch if index < len(row)), default=0)
                speculative += costs[longest]
        estimates.append({"draft": k, "tokens_per_pass": tokens / passes,
                          "plain_s": plain, "speculative_s": speculative,
                          "speedup": plain / speculative})  # fmt: skip
    print(f"\n{len(rows)} logged reflection replies of {args.run}, replayed in batches of "
          f"{args.batch_size}:")  # fmt: skip
    print("| draft k | tokens per pass, per row | plain s | speculative s | speed-up |")
    print("|---|---|---|---|---|")
    for e in estimates:
        print(f"| {e['draft']} | {e['tokens_per_pass']:.2f} | {e['plain_s']:.1f} | "
              f"{e['speculative_s']:.1f} | {e['speedup']:.2f} |")  # fmt: skip
    out = {"run": str(args.run), "threads": torch.get_num_threads(), "batch": args.batch_size,
           "verify_seconds": {str(1 + k): c for k, c in costs.items()}, "estimates": estimates}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
