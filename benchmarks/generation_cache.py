"""Generation KV cache: dynamic (default) vs static vs static + torch.compile, side by side.

The transformers backend can pre-allocate the KV cache (`generation_cache: static`) and
compile the decode step (`generation_compile: true`). On a GPU that removes per-step
allocation and Python/kernel-launch overhead (CUDA graphs); on a CPU the decode step is
bound by matmuls, and a static cache makes every step attend over the full pre-allocated
length, so it can be slower. This script measures all three on the same prompts with the
trainer's sampler (seeded temperature/top-p sampling, length-sorted batches) and counts
the rows whose tokens equal the dynamic cache's: in bf16, a fused compiled kernel can
round differently and flip a near-tied sample, after which that row diverges.

Throughput does not depend on the weights' values, so the default model is random-init
with SmolLM2-135M's shapes, built from a config (nothing is downloaded).

    python benchmarks/generation_cache.py --device cuda                  # GPU, full 30 layers
    python benchmarks/generation_cache.py --device cpu --layers 4 --new-tokens 64 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from resd.generation.hf import generate
from resd.models import DTYPES

SMOLLM2_135M = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
VARIANTS = [  # (name, cache_implementation, compile)
    ("dynamic cache (default)", None, False),
    ("static cache", "static", False),
    ("static cache + compile", "static", True),
]


def build_model(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer): random-init SmolLM2-135M shapes, or a local/bundled model."""
    dtype = DTYPES[args.dtype]
    if args.model != "random-smollm2-135m":
        from resd.models import load_model, load_tokenizer

        return load_model(args.model, dtype=args.dtype, device=str(device)), load_tokenizer(
            args.model
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    # generate() only needs the special ids and decode(); the text of random weights is noise
    tokenizer = SimpleNamespace(
        eos_token_id=2, pad_token_id=2, decode=lambda ids, skip_special_tokens=True: ""
    )
    return model, tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-smollm2-135m",
                        help="random-smollm2-135m (default) or a model folder / alias")  # fmt: skip
    parser.add_argument("--layers", type=int, default=30, help="shrink the random model (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip static + compile")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default); 1 is steadier on a busy machine")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/generation_cache.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = build_model(args, device)

    torch.manual_seed(0)
    # rollout/reflection-like prompts of mixed lengths, interleaved short/long
    lengths = [64, 512, 96, 448, 128, 384, 160, 320][: args.prompts]
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab - 100, (n,)).tolist() for n in lengths]
    seeds = list(range(len(prompts)))
    common = dict(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, autocast="none",
                  seeds=seeds, batch_size=args.batch_size)  # fmt: skip

    variants = [v for v in VARIANTS if not (v[2] and args.no_compile)]
    rows = [{"variant": n, "cache_implementation": c, "compile": k, "times": []}
            for n, c, k in variants]  # fmt: skip

    def run(row: dict) -> list[list[int]]:
        gens = generate(model, tok, prompts, **common,
                        cache_implementation=row["cache_implementation"], compile=row["compile"])  # fmt: skip
        sync(device)
        return [g.token_ids for g in gens]

    for row in rows:  # warm-up: allocations, and compilation for the compiled variant
        start = time.perf_counter()
        try:
            run(row)
        except Exception as exc:  # e.g. no C compiler for inductor: report, keep the rest
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["warmup_seconds"] = time.perf_counter() - start
        # as it goes: a run stopped at a time limit still shows how far it got
        print(f"warm-up: {row['variant']} {row['warmup_seconds']:.1f} s", flush=True)
    live = [r for r in rows if "error" not in r]
    reference = None
    # Round-robin repeats: a machine shared with other jobs slows all variants alike.
    for _ in range(args.repeats):
        for row in live:
            start = time.perf_counter()
            tokens = run(row)
            row["times"].append(time.perf_counter() - start)
            print(f"timed: {row['variant']} {row['times'][-1]:.2f} s", flush=True)
            reference = tokens if reference is None else reference
            row["tokens"] = sum(len(t) for t in tokens)
            same = sum(a == b for a, b in zip(tokens, reference, strict=True))
            row["rows_same_as_dynamic"] = min(row.get("rows_same_as_dynamic", same), same)
    for row in live:
        row["seconds"] = statistics.median(row["times"])
        row["tok_s"] = row["tokens"] / row["seconds"]
    base = next((r["seconds"] for r in rows if "seconds" in r), None)
    for r in rows:
        if "seconds" in r and base:
            r["speedup"] = base / r["seconds"]

    setting = {**vars(args), "layers": model.config.num_hidden_layers, "torch": torch.__version__}
    if device.type == "cuda":
        setting["gpu"] = torch.cuda.get_device_name(device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"setting": setting, "prompt_lengths": lengths, "rows": rows}, indent=1)
    )
    print(
        f"{args.model}, {model.config.num_hidden_layers} layers, {args.dtype}, {device.type}: "
        f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, batch {args.batch_size}, "
        f"{args.new_tokens} new tokens, median of {args.repeats}"
    )
    print("| variant | warm-up s | seconds | tokens/s | speed-up | rows with the dynamic tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
            continue
        print(
            f"| {r['variant']} | {r['warmup_seconds']:.1f} | {r['seconds']:.2f} | {r['tok_s']:.1f} "
            f"| {r['speedup']:.2f}× | {r['rows_same_as_dynamic']}/{len(prompts)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
