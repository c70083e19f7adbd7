"""Peak memory of the self-distillation loss: full logits vs chunked output head.

The loss needs student and teacher next-token distributions over the whole vocabulary.
Computed naively, a batch materialises `[B, T, V]` logits twice plus their fp32
log-softmax copies; with Qwen3's 151,936-token vocabulary that dominates memory. The
chunked path (`loss_chunk_size`) applies the output head a few positions at a time
inside activation checkpointing.

Each variant runs in a fresh subprocess, so its peak resident memory (CPU) or peak
CUDA allocation (GPU) is its own. Shapes are Qwen3-0.6B's output layer (hidden 1024,
vocabulary 151,936); the transformer body is left out because it is identical in both
paths.

    python benchmarks/loss_memory.py                     # CPU, 4 x 512 tokens
    python benchmarks/loss_memory.py --device cuda --batch 32 --seq 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from resd.training.losses import chunked_token_losses, self_distillation_loss, token_logprobs

    device = torch.device(args.device)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False, device=device, dtype=torch.bfloat16)
    s_h = torch.randn(
        args.batch, args.seq, args.hidden, device=device, dtype=torch.bfloat16, requires_grad=True
    )
    t_h = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()

    def sd(s_logits, t_logits, _ids, _logp):
        return self_distillation_loss(s_logits, t_logits, alpha=1.0, topk=100)

    if args.variant == "full":
        s_logits, t_logits = head(s_h), head(t_h).detach()
        tok, logp = sd(s_logits, t_logits, ids, None), token_logprobs(s_logits, ids)
    else:
        tok, logp, _ = chunked_token_losses(
            s_h,
            head,
            ids,
            chunk_size=args.chunk,
            teacher_hidden=t_h,
            teacher_head=head,
            token_loss=sd,
        )
    (tok.mean() + 0 * logp.mean()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        # ru_maxrss is KiB on Linux; subtract what the inputs and libraries already held.
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 2**20
    return {"variant": args.variant, "peak_gib": peak, "seconds": time.perf_counter() - start,
            "loss": float(tok.mean())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/loss_memory.json")
    args = parser.parse_args(argv)
    if args.variant:  # child process: measure one variant, print JSON
        print(json.dumps(run_variant(args)))
        return 0
    rows = []
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--variant", variant]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            continue
        # The naive variant is expected to run out of memory at large shapes: say so.
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        oom = "out of memory" in done.stderr.lower() or done.returncode in (-9, 137)
        rows.append({"variant": variant, "error": "out of memory" if oom else last[-300:]})
    setting = {k: getattr(args, k) for k in ("device", "batch", "seq", "hidden", "vocab", "chunk")}
    ok = all("error" not in r for r in rows)
    result = {
        "setting": setting,
        "rows": rows,
        "peak_ratio_chunked_over_full": rows[1]["peak_gib"] / rows[0]["peak_gib"] if ok else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"loss memory, {args.batch} x {args.seq} tokens, vocab {args.vocab}, device {args.device}"
    )
    print(f"{'variant':10s} {'peak GiB':>9s} {'seconds':>8s} {'loss':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:10s} {r['error']}")
            continue
        print(f"{r['variant']:10s} {r['peak_gib']:9.2f} {r['seconds']:8.2f} {r['loss']:10.5f}")
    if ok:
        print(f"chunked / full peak memory: {result['peak_ratio_chunked_over_full']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
