"""Throughput and memory of one RESD step on a GPU, with random-init models of real shapes.

Model weights cannot travel to the lent GPU machine, and throughput does not depend on
the values of the weights, so the models are built from their published shapes with
random weights: SmolLM2-135M and Qwen3-0.6B. Measured per model:

- rollout generation (HF `generate`) in tokens/s at batch 8 and batch 64;
- teacher scoring (a no-grad forward over prompt + response) in tokens/s;
- one full step by phase: rollout, reflect, curate (generation with longer prompts),
  teacher forward, student forward + backward + AdamW with the chunked
  self-distillation loss; its peak memory; and its training TFLOP/s (6 · params ·
  tokens for the student, 2 · params · tokens for the teacher) against the ≈ 790 bf16
  TFLOP/s an H100/H200 can do.

    python benchmarks/gpu_bench.py                      # on the GPU, < 5 minutes
    python benchmarks/gpu_bench.py --device cpu --smoke # tiny shapes, seconds (used in tests)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

TINY = dict(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True,
)  # fmt: skip
SHAPES = {
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "tiny": TINY,
    # tiny with Qwen's vocabulary: the grammar's work per token at real size, on a CPU
    "tiny-151k": {**TINY, "vocab_size": 151936},
}  # fmt: skip
PEAK_TFLOPS = 790.0


def build(shape: str, device: torch.device, dtype: torch.dtype, **config_args):
    """A random-init model of `shape`; `config_args` add to its config (special token ids)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**SHAPES[shape], **config_args}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    with device:  # initialise where it runs: 0.6B normal_ draws on a CPU take most of a minute
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = config_args.get("pad_token_id", 0)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def gen_tokens_per_s(model, batch: int, prompt_len: int, new: int, device: torch.device) -> float:
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt_len), device=device)
    kwargs = dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=True, top_p=0.95, temperature=1.0
    )
    model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, do_sample=True)  # warm-up
    seconds, _ = timed(lambda: model.generate(ids, **kwargs), device)
    return batch * new / seconds


def bench_model(shape: str, args: argparse.Namespace, device: torch.device) -> dict:
    from resd.training.losses import chunked_token_losses, self_distillation_loss
    from resd.training.teacher import Teacher
    from resd.training.update import response_hidden

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = build(shape, device, dtype)
    student.eval()
    n_params = sum(p.numel() for p in student.parameters())
    row: dict = {"model": shape, "params_m": n_params / 1e6}
    with torch.inference_mode():
        for batch in args.gen_batches:
            row[f"gen_tok_s_b{batch}"] = gen_tokens_per_s(
                student, batch, args.prompt_len, args.new_tokens, device
            )

    teacher = Teacher(student, "ema", 1e-4)
    vocab = student.config.vocab_size
    b, p_len, r_len = args.train_batch, args.prompt_len, args.new_tokens
    seqs = torch.randint(1, vocab, (b, p_len + r_len)).tolist()
    teacher_seqs = [
        [*s[:p_len], *torch.randint(1, vocab, (args.teacher_extra,)).tolist(), *s[p_len:]]
        for s in seqs
    ]
    ids = torch.tensor([s[p_len:] for s in seqs], device=device)
    with torch.inference_mode():
        t_sec, _ = timed(lambda: response_hidden(teacher.copy, teacher_seqs, r_len, 0), device)
    row["teacher_tok_s"] = b * len(teacher_seqs[0]) / t_sec
    print(f"{shape}: {row}", flush=True)  # so far, in case the time limit stops the rest

    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = {}
    reflect_prompts = torch.randint(1, vocab, (b, args.reflect_prompt_len), device=device)
    gen = dict(
        do_sample=True, top_p=0.95, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens
    )
    with torch.inference_mode():
        student.eval()
        phases["rollout"], _ = timed(
            lambda: student.generate(reflect_prompts[:, :p_len], **gen), device
        )
        phases["reflect"], _ = timed(lambda: student.generate(reflect_prompts, **gen), device)
        phases["curate"], _ = timed(lambda: student.generate(reflect_prompts, **gen), device)
        student.train()
        phases["teacher"], t_hidden = timed(
            lambda: response_hidden(teacher.copy, teacher_seqs, r_len, 0), device
        )
    t_hidden = t_hidden.clone()

    def update():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            s_hidden = response_hidden(student, seqs, r_len, 0)
            tok, _, _ = chunked_token_losses(
                s_hidden, student.get_output_embeddings(), ids, chunk_size=args.chunk, teacher_hidden=t_hidden,
                teacher_head=teacher.head(student),
                token_loss=lambda s, t, _i, _l: self_distillation_loss(s, t, alpha=1.0, topk=100),
            )  # fmt: skip
        tok.mean().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        teacher.update(student)

    update()  # warm-up (optimizer state, kernels)
    phases["update"], _ = timed(update, device)
    row.update({f"time_{k}": v for k, v in phases.items()})
    print(f"{shape}: phases {phases}", flush=True)
    row["time_step"] = sum(phases.values())
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    student_tokens = b * (p_len + r_len)
    teacher_tokens = b * len(teacher_seqs[0])
    flops = 6 * n_params * student_tokens + 2 * n_params * teacher_tokens
    row["train_tflops"] = flops / (phases["update"] + phases["teacher"]) / 1e12
    row["train_mfu_vs_790"] = row["train_tflops"] / PEAK_TFLOPS
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="smollm2-135m,qwen3-0.6b")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and lengths (CPU test)")
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "gpu_bench.json")
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.gen_batches, args.prompt_len, args.new_tokens = "tiny", [2, 4], 16, 8
        args.train_batch, args.reflect_prompt_len, args.teacher_extra, args.chunk = 2, 32, 16, 4
    else:
        args.gen_batches, args.prompt_len, args.new_tokens = [8, 64], 256, 256
        args.train_batch, args.reflect_prompt_len, args.teacher_extra, args.chunk = (
            16,
            1024,
            512,
            256,
        )
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for shape in args.models.split(","):
        rows.append(bench_model(shape, args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model's tensors are gone with its frame
    result = {"device": name, "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    keys = [k for k in rows[0] if k != "model"]
    print(f"device: {name}")
    print(f"{'metric':22s}" + "".join(f"{r['model']:>16s}" for r in rows))
    for k in keys:
        print(f"{k:22s}" + "".join(f"{r.get(k, float('nan')):16.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
