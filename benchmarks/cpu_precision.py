"""Which precision should a CPU sample and score in? bf16 against fp32, side by side.

bf16 halves the bytes a decode step reads, which is why `generation_dtype: bfloat16` and
bf16 autocast were the CPU defaults. That only pays where the CPU has bf16 kernels
(oneDNN's AVX-512 paths, AMX); an AVX2-only CPU emulates bf16 and runs its matmuls
slower than fp32. This benchmark measures, on a random-init model of Qwen2.5-0.5B's
shape (speed does not depend on the weights' values), at batch 8:

- prefill of 512-token prompts and decoding of 32 new tokens (KV cache on), for fp32
  weights, fp32 weights under bf16 autocast, and bf16 weights;
- with a LoRA adapter (r = 16 on every linear), decoding through PEFT's unmerged fp32
  adapter against a merged fp32 copy.

    python benchmarks/cpu_precision.py              # prints a table, writes benchmarks/results/cpu_precision.json
    python benchmarks/cpu_precision.py --layers 4   # a quicker, shallower model

The arms are interleaved (each repeat runs every arm once), so a background load affects
all of them alike; read the ratios, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from resd.models import fast_bfloat16


def qwen_shape(layers: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def prefill_and_decode(
    model, ids: torch.Tensor, new_tokens: int, autocast: bool
) -> tuple[float, float]:
    """Seconds for the prompt's forward pass and for `new_tokens` greedy decode steps."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        out: dict[str, Any] = {}

        def prefill():
            out["o"] = model(input_ids=ids, use_cache=True)

        t_prefill = timed(prefill)

        def decode():
            past, nxt = out["o"].past_key_values, out["o"].logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                o = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)

        return t_prefill, timed(decode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/results/cpu_precision.json")
    args = parser.parse_args(argv)

    from peft import LoraConfig, get_peft_model

    fp32 = qwen_shape(args.layers)
    arms = {"fp32 weights": (fp32, False), "fp32 weights, bf16 autocast": (fp32, True)}
    import copy

    arms["bf16 weights"] = (copy.deepcopy(fp32).to(torch.bfloat16), False)
    lora = get_peft_model(
        copy.deepcopy(fp32), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    for module in lora.modules():  # a trained adapter is not zero: give B values
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.normal_(b.weight, std=1e-3)
    lora.eval()
    arms["LoRA, PEFT unmerged, fp32"] = (lora, False)
    arms["LoRA, merged copy, fp32"] = (copy.deepcopy(lora).merge_and_unload().eval(), False)

    ids = torch.randint(0, 151_000, (args.batch, args.prompt_tokens))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    for model, autocast in arms.values():  # warm-up: one short pass each
        prefill_and_decode(model, ids[:, :16], 2, autocast)
    for _ in range(args.repeats):
        for name, (model, autocast) in arms.items():
            times[name].append(prefill_and_decode(model, ids, args.new_tokens, autocast))

    rows = []
    base = min(t[0] for t in times["fp32 weights"]), min(t[1] for t in times["fp32 weights"])
    for name, ts in times.items():
        prefill, decode = min(t[0] for t in ts), min(t[1] for t in ts)
        rows.append({
            "arm": name, "prefill_s": prefill, "decode_s": decode,
            "prefill_tokens_per_s": args.batch * args.prompt_tokens / prefill,
            "decode_ms_per_step": 1000 * decode / args.new_tokens,
            "prefill_vs_fp32": prefill / base[0], "decode_vs_fp32": decode / base[1],
        })  # fmt: skip
    machine = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fast_bfloat16": fast_bfloat16(torch.device("cpu")),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"machine: {machine}")
    print(f"{'arm':30s} {'prefill s':>9s} {'x fp32':>6s} {'decode ms/step':>14s} {'x fp32':>6s}")
    for r in rows:
        print(f"{r['arm']:30s} {r['prefill_s']:9.2f} {r['prefill_vs_fp32']:6.2f} "
              f"{r['decode_ms_per_step']:14.1f} {r['decode_vs_fp32']:6.2f}")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"settings": vars(args), "machine": machine, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
