"""Sampling with int8 decoding weights (`generation_dtype: int8`) against fp32, on the CPU.

Equal work, side by side in one process: the same prompts, the same seeds, exactly
`--new-tokens` new tokens per row in both arms (end-of-sequence held off), the arms'
order alternating, median of `--repeats`. "prefill" decodes one token; "decode" is the
rest per new token. Then closeness: the fp32 model's greedy continuation of 8 chat
prompts is fed back one token at a time, as sampling does (prefill in fp32, each step
through the int8 weights), and the per-token KL from fp32 and the share of positions
where both pick the same top token are reported.

    python benchmarks/int8_sampling.py                      # bundled 0.5B and 135M models
    python benchmarks/int8_sampling.py --models smollm2-135m --prompt-tokens 64 --repeats 1
    python benchmarks/int8_sampling.py --layers             # one layer, by rows: the crossover

`--layers` times single linear layers of Qwen2.5-0.5B's shapes (random weights) in fp32
and through the int8 path at 1 to 256 rows: where int8 wins, which sets `DECODE_ROWS`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from resd.generation.hf import chat_prompt_ids, generate
from resd.generation.int8 import Int8DecodeLinear, quantize_for_decoding
from resd.models import load_model, load_tokenizer

TEXT = (
    "The robot reads the tape from the left. A red symbol sends it to the upper branch, "
    "a blue one to the lower, and an empty tape is accepted only at the end node. "
)
QUESTIONS = [
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What is 967 * 19? End your reply with a line of the form 'Answer: <number>'.",
    "Summarise the rules of chess in three sentences, all lowercase.",
    "The previous attempt accepted a tape with an odd number of blue symbols. Why was it wrong?",
    "Give a one-line definition of a hash table.",
    "Rewrite 'the cat sat on the mat' in the passive voice.",
    "Name three rivers in Europe and one fact about each.",
    "Explain what a unit test is to a new programmer in two sentences.",
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(models, tokenizer, prompt_tokens: int, new_tokens: int, batch: int, repeats: int):
    """Median prefill seconds and decode ms per token for each arm, interleaved."""
    ids = tokenizer(TEXT * (prompt_tokens // 20 + 2))["input_ids"]
    prompts = [ids[i : i + prompt_tokens] for i in range(batch)]  # distinct rows, one length
    seeds = list(range(batch))

    def run(model, n):
        generate(model, tokenizer, prompts, max_new_tokens=n, min_new_tokens=n, temperature=0.7,
                 top_p=0.95, seeds=seeds, batch_size=batch, autocast="none")  # fmt: skip

    times: dict[str, dict[str, list[float]]] = {a: {"prefill": [], "full": []} for a in models}
    for model in models.values():  # warm-up
        run(model, 2)
    for r in range(repeats):
        for arm in list(models)[:: 1 if r % 2 == 0 else -1]:
            times[arm]["prefill"].append(timed(lambda m=models[arm]: run(m, 1)))
            times[arm]["full"].append(timed(lambda m=models[arm]: run(m, new_tokens)))
    out = {}
    for arm, t in times.items():
        prefill, full = statistics.median(t["prefill"]), statistics.median(t["full"])
        out[arm] = {
            "prefill_s": prefill, "full_s": full,
            "decode_ms_per_token": 1000 * (full - prefill) / (new_tokens - 1),
            "raw": t,
        }  # fmt: skip
    return out


@torch.no_grad()
def stepwise_logprobs(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-probs of each next token as sampling computes them: the prompt in one forward,
    then one token per forward with the KV cache."""
    out = model(torch.tensor([prompt]), use_cache=True)
    rows, cache = [out.logits[0, -1]], out.cache
    for token in continuation[:-1]:
        out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
        rows.append(out.logits[0, -1])
        cache = out.cache
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


def closeness(reference, quantized, tokenizer, new_tokens: int) -> dict[str, float]:
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    greedy = generate(reference, tokenizer, prompts, max_new_tokens=new_tokens, temperature=0,
                      autocast="none")  # fmt: skip
    kls, same = [], []
    for prompt, g in zip(prompts, greedy, strict=True):
        if len(g.token_ids) < 2:
            continue
        p = stepwise_logprobs(reference, prompt, g.token_ids)
        q = stepwise_logprobs(quantized, prompt, g.token_ids)
        kls.extend((p.exp() * (p - q)).sum(-1).tolist())
        same.extend((p.argmax(-1) == q.argmax(-1)).tolist())
    return {"mean_kl": statistics.fmean(kls), "max_kl": max(kls),
            "same_top_token": statistics.fmean(same), "positions": len(kls)}  # fmt: skip


LAYER_SHAPES = {"mlp up (896 -> 4864)": (4864, 896), "attention out (896 -> 896)": (896, 896),
                "head (896 -> 151936)": (151936, 896)}  # fmt: skip


def layer_table(repeats: int) -> list[dict]:
    """Seconds per call of one layer, fp32 against int8, by rows; the arms interleaved."""
    torch.manual_seed(0)
    rows = []
    for label, (out_features, in_features) in LAYER_SHAPES.items():
        fp32 = torch.nn.Linear(in_features, out_features, bias=False).eval()
        int8 = Int8DecodeLinear.wrap(fp32)
        int8.max_rows = 1 << 30  # force the int8 path at every size
        for n in (1, 8, 16, 32, 64, 256):
            if out_features > 100_000 and n > 16:
                continue  # the head only ever sees the last position of each row
            x = torch.randn(n, in_features)
            calls = max(2, int(2e8 / (n * in_features * out_features)))
            times = {"fp32": [], "int8": []}
            with torch.no_grad():
                for _ in range(repeats):
                    for arm, layer in (("fp32", fp32), ("int8", int8)):
                        layer(x)
                        times[arm].append(
                            timed(lambda la=layer, x=x, k=calls: [la(x) for _ in range(k)]) / calls
                        )
            f, q = statistics.median(times["fp32"]), statistics.median(times["int8"])
            rows.append({"layer": label, "rows": n, "fp32_ms": 1000 * f, "int8_ms": 1000 * q})
    print("| layer | rows | fp32 ms | int8 ms | int8 ÷ fp32 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['rows']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
              f"{r['int8_ms'] / r['fp32_ms']:.2f} |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-coder-0.5b,smollm2-135m")
    parser.add_argument("--prompt-tokens", default="64,512")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="single layers by rows only")
    parser.add_argument("--json", default=None, help="(default benchmarks/results/int8_sampling.json, "
                        "or int8_layers.json with --layers)")  # fmt: skip
    args = parser.parse_args(argv)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}  # fmt: skip
    if args.layers:
        out = Path(args.json or "benchmarks/results/int8_layers.json")
        result = {"command": "python benchmarks/int8_sampling.py " + " ".join(argv or []),
                  "machine": machine, "repeats": args.repeats, "layers": layer_table(args.repeats)}  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        return 0
    result = {
        "command": "python benchmarks/int8_sampling.py " + " ".join(argv or []),
        "machine": machine, "settings": vars(args), "models": {},
    }  # fmt: skip
    rows = []
    for name in args.models.split(","):
        tokenizer = load_tokenizer(name)
        fp32 = load_model(name, dtype="float32").eval()
        int8 = copy.deepcopy(fp32)
        layers = quantize_for_decoding(int8)
        extra = sum(m.weight_int8.numel() + 2 * m.weight_scale.numel()
                    for m in int8.modules() if isinstance(m, Int8DecodeLinear))  # fmt: skip
        entry = {"int8_layers": layers, "int8_extra_mib": extra / 2**20, "speed": {}}
        for n in [int(x) for x in args.prompt_tokens.split(",")]:
            s = speed(
                {"fp32": fp32, "int8": int8},
                tokenizer,
                n,
                args.new_tokens,
                args.batch,
                args.repeats,
            )
            entry["speed"][str(n)] = s
            for arm in ("fp32", "int8"):
                rows.append((name, n, arm, s[arm]["prefill_s"], s[arm]["decode_ms_per_token"],
                             s["fp32"]["decode_ms_per_token"] / s[arm]["decode_ms_per_token"],
                             s["fp32"]["full_s"] / s[arm]["full_s"]))  # fmt: skip
        entry["closeness"] = closeness(fp32, int8, tokenizer, 48)
        result["models"][name] = entry
        del fp32, int8
    print(f"batch {args.batch}, {args.new_tokens} new tokens per row, median of {args.repeats}\n")
    print(
        "| model | prompt tokens | weights | prefill s | decode ms/token | decode speed-up | whole call speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, n, arm, prefill, decode, up, whole in rows:
        print(f"| {name} | {n} | {arm} | {prefill:.2f} | {decode:.0f} | {up:.2f}x | {whole:.2f}x |")
    print(
        "\n| model | int8 layers | extra MiB | mean KL per token | max KL | same top token | positions |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, e in result["models"].items():
        c = e["closeness"]
        print(f"| {name} | {e['int8_layers']} | {e['int8_extra_mib']:.0f} | {c['mean_kl']:.4f} | "
              f"{c['max_kl']:.3f} | {100 * c['same_top_token']:.1f} % | {c['positions']} |")  # fmt: skip
    out = Path(args.json or "benchmarks/results/int8_sampling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
