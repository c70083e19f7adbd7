"""Decode steps without a padding mask: transformers' `sdpa` against `packed_sdpa` (CPU).

A batch whose rows are all the same length (one request, GRPO's copies of a prompt,
evaluation samples) decodes without an attention mask, and then transformers asks
PyTorch's kernel to broadcast the grouped key/value heads, which is slow on a CPU;
`resd.generation.attention.packed_sdpa` packs a group's query heads instead. Equal work,
side by side in one process on one model: the same prompts, the same seeds, exactly
`--new-tokens` tokens per row in both arms, the arms alternating. A forward hook stamps the
end of every forward pass: a decode step is the time between two stamps (the forward, the
sampler and the bookkeeping between them), and the figure is the median step over all
calls of an arm, so a prefill's noise does not enter it. A padded batch (rows one token
apart: a mask, so both arms pack) is the control.

    python benchmarks/decode_attention.py                                # bundled 0.5B model
    python benchmarks/decode_attention.py --model smollm2-135m --contexts 64,512 --repeats 1

Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from resd.generation.attention import NAME
from resd.generation.hf import generate
from resd.models import load_model, load_tokenizer

TEXT = "The robot reads the tape from the left. A red symbol sends it to the upper branch. "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--contexts", default="64,256,1024", help="prompt tokens per row")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/decode_attention.json")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device="cpu").eval()
    ids = tokenizer(TEXT * 200)["input_ids"]
    arms = {"sdpa (transformers)": "sdpa", "packed_sdpa (resd)": NAME}

    stamps: list[float] = []
    model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))

    def call(prompts: list[list[int]], n: int) -> tuple[float, list[float], list[list[int]]]:
        """(prefill seconds, decode step seconds, tokens) of one `generate` call."""
        stamps.clear()
        start = time.perf_counter()
        out = generate(model, tokenizer, prompts, max_new_tokens=n, min_new_tokens=n, temperature=0.7,
                       top_p=0.95, seeds=list(range(len(prompts))), batch_size=len(prompts),
                       autocast="none")  # fmt: skip
        steps = [b - a for a, b in itertools.pairwise(stamps)]
        return stamps[0] - start, steps, [g.token_ids for g in out]

    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for padded in (False, True) if batch > 1 else (False,):
                prompts = [ids[i : i + context - (i % 2 if padded else 0)] for i in range(batch)]
                times: dict[str, dict[str, list[float]]] = {
                    a: {"prefill": [], "steps": []} for a in arms
                }
                tokens: dict[str, list[list[int]]] = {}
                call(prompts, 2)  # warm-up
                for r in range(args.repeats):
                    for arm in list(arms)[:: 1 if r % 2 == 0 else -1]:
                        model.set_attn_implementation(arms[arm])
                        prefill, steps, tokens[arm] = call(prompts, 1 + args.new_tokens)
                        times[arm]["prefill"].append(prefill)
                        times[arm]["steps"].extend(steps)
                first, second = tokens.values()
                row = {"context": context, "batch": batch, "padded": padded, "raw": times,
                       "same_tokens": first == second}  # fmt: skip
                for arm, t in times.items():
                    row[arm] = {"prefill_s": statistics.median(t["prefill"]),
                                "decode_ms": 1000 * statistics.median(t["steps"])}  # fmt: skip
                rows.append(row)
                print(f"context {context}, batch {batch}, padded {padded}: "
                      + ", ".join(f"{a} {row[a]['decode_ms']:.1f} ms" for a in arms), flush=True)  # fmt: skip
    model.set_attn_implementation(NAME)
    print(f"\n{args.model} ({args.dtype}), {args.new_tokens} new tokens per row, {args.repeats} calls an arm, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    print(
        "| prompt tokens | batch | padding mask | sdpa, ms/token | packed, ms/token | speed-up | same tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["sdpa (transformers)"]["decode_ms"], r["packed_sdpa (resd)"]["decode_ms"]
        print(f"| {r['context']} | {r['batch']} | {'yes' if r['padded'] else 'no'} | {a:.1f} | {b:.1f} | "
              f"{a / b:.2f}x | {r['same_tokens']} |")  # fmt: skip
    result = {
        "command": "python benchmarks/decode_attention.py " + " ".join(argv or []),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__},
        "settings": vars(args), "rows": rows,
    }  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
