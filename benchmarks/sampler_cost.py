"""The row-seeded sampler's own cost per decode step, against an earlier implementation.

`RowSeededSampler` runs once per generated token on the whole batch's logits. The first
implementation drew each row's Gumbel noise from its own `torch.Generator`, a
vocabulary's worth of numbers per row per token, in a Python loop over rows; the current
one hashes (seed, position, token id) for the top candidates of every row at once.
Both are loaded here, the old one from git history, and timed on the same logits; the
current one also with top-k and min-p (what the two filters add to a step).

    python benchmarks/sampler_cost.py                        # against commit f3a2eb3
    python benchmarks/sampler_cost.py --model smollm2-135m --rows 16

The logits are the model's own next-token logits for a batch of chat prompts (a real
nucleus: random logits would be far flatter than a language model's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from resd.generation.hf import RowSeededSampler

ROOT = Path(__file__).resolve().parents[1]


def load_old(commit: str) -> type:
    """`RowSeededSampler` as it was at `commit` (read with `git show`, run in a fresh module)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:src/resd/generation.py"],
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    module = types.ModuleType(f"generation_{commit}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{commit}:generation.py", "exec"), module.__dict__)
    return module.RowSeededSampler


@torch.no_grad()
def model_logits(name: str, rows: int) -> torch.Tensor:
    from resd.generation.hf import chat_prompt_ids, left_pad
    from resd.models import load_model, load_tokenizer

    tok, model = load_tokenizer(name), load_model(name, dtype="bfloat16")
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": f"Tell me fact number {i} about the sea."}])
               for i in range(rows)]  # fmt: skip
    ids, mask = left_pad(prompts, tok.pad_token_id, torch.device("cpu"))
    return model(input_ids=ids, attention_mask=mask).logits[:, -1].float()


def time_sampler(
    cls: type, logits: torch.Tensor, steps: int, top_p: float, **filters: float
) -> list[float]:
    rows = logits.shape[0]
    sampler = cls(list(range(rows)), 1.0, top_p, logits.device, **filters)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sampler(None, logits.clone())
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="f3a2eb3", help="commit holding the old sampler")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/sampler_cost.json")
    args = parser.parse_args(argv)
    logits = model_logits(args.model, args.rows)
    old = load_old(args.baseline)
    result = {"settings": vars(args), "rows": []}
    for top_p in (0.95, 1.0):
        for name, cls in (
            ("generator per row (old)", old),
            ("counter hash, batched (new)", RowSeededSampler),
        ):
            times = time_sampler(cls, logits, args.steps, top_p)
            result["rows"].append({"sampler": name, "top_p": top_p, "top_k": 0, "min_p": 0.0,
                                   "ms_median": 1000 * statistics.median(times)})  # fmt: skip
    for top_p, top_k, min_p in ((0.95, 20, 0.0), (1.0, 0, 0.05), (0.95, 20, 0.05)):
        times = time_sampler(RowSeededSampler, logits, args.steps, top_p, top_k=top_k, min_p=min_p)
        result["rows"].append({"sampler": "counter hash, batched (new)", "top_p": top_p,
                               "top_k": top_k, "min_p": min_p,
                               "ms_median": 1000 * statistics.median(times)})  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"{args.rows} rows x {logits.shape[1]} vocabulary ({args.model}), median of {args.steps} decode steps"
    )
    print(f"{'sampler':30s} {'top_p':>5s} {'top_k':>5s} {'min_p':>5s} {'ms/step':>8s}")
    for r in result["rows"]:
        print(f"{r['sampler']:30s} {r['top_p']:5.2f} {r['top_k']:5d} {r['min_p']:5.2f} "
              f"{r['ms_median']:8.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
