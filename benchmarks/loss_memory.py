"""Peak memory and time of the self-distillation loss: whole, in chunks, head in chunks.

The loss needs student and teacher next-token distributions over the whole vocabulary.
Three ways to compute it, forward and backward:

- `full`: on whole `[B, T, V]` logits, which materialises fp32 copies, log-softmaxes and
  masks of that size (the trainer's default path until the twentieth session);
- `logits`: the head applied once, the loss then computed a few positions at a time under
  activation checkpointing (`chunked_token_losses` without a head: the default path for
  objectives other than top-k with the tail);
- `fused`: the head applied once, the top-k loss with the tail through `support_logprobs`'
  hand-written backward (`topk_distillation_terms`: the default path);
- `chunked`: the output head applied a few positions at a time as well
  (`loss_chunk_size`), so not even the logits exist whole.

Each variant runs in a fresh subprocess, so its peak resident memory (CPU) or peak
CUDA allocation (GPU) is its own. Shapes are Qwen3-0.6B's output layer (hidden 1024,
vocabulary 151,936); the transformer body is left out because it is the same in every
variant.

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

VARIANTS = ("full", "logits", "fused", "chunked")


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    from resd.training.losses import (
        chunked_token_losses,
        loss_chunk_positions,
        self_distillation_loss,
        token_logprobs,
        topk_distillation_terms,
    )

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

    def sd(s_logits, t_logits, _ids, _logp):
        return self_distillation_loss(s_logits, t_logits, alpha=1.0, topk=100)

    def forward_backward() -> torch.Tensor:
        if args.variant == "full":
            s_logits, t_logits = head(s_h), head(t_h).detach()
            tok, logp = sd(s_logits, t_logits, ids, None), token_logprobs(s_logits, ids)
        elif args.variant == "fused":
            s_logits, t_logits = head(s_h), head(t_h).detach()
            tok, logp, _ = topk_distillation_terms(s_logits, t_logits, ids, topk=100, alpha=1.0,
                                                   min_ratio=0.2)  # fmt: skip
        elif args.variant == "logits":
            s_logits, t_logits = head(s_h), head(t_h).detach()
            tok, logp, _ = chunked_token_losses(
                s_logits, None, ids, chunk_size=loss_chunk_positions(s_logits),
                teacher_hidden=t_logits, token_loss=sd,
            )  # fmt: skip
        else:
            tok, logp, _ = chunked_token_losses(
                s_h, head, ids, chunk_size=args.chunk, teacher_hidden=t_h, teacher_head=head,
                token_loss=sd,
            )  # fmt: skip
        (tok.mean() + 0 * logp.mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tok

    # The first call pays for fresh memory; a training step is a later one (`--repeats`).
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        tok = forward_backward()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        # ru_maxrss is KiB on Linux; subtract what the inputs and libraries already held.
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 2**20
    later = sorted(times[1:])
    return {"variant": args.variant, "peak_gib": peak, "seconds": times[0],
            "seconds_later": later[len(later) // 2] if later else None,
            "loss": float(tok.mean())}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="forward-backward calls per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/loss_memory.json")
    args = parser.parse_args(argv)
    if args.variant:  # child process: measure one variant, print JSON
        print(json.dumps(run_variant(args)))
        return 0
    if args.vocab <= 100:
        parser.error("--vocab: must exceed the loss's top-k, 100")
    chosen = [v for v in args.variants.split(",") if v]
    if unknown := sorted(set(chosen) - set(VARIANTS)):
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    rows = []
    for variant in chosen:
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
    setting = {
        k: getattr(args, k)
        for k in ("device", "batch", "seq", "hidden", "vocab", "chunk", "repeats")
    }
    peak = {r["variant"]: r["peak_gib"] for r in rows if "error" not in r}
    ratios = {
        f"peak_ratio_{v}_over_full": peak[v] / peak["full"]
        for v in peak if v != "full" and "full" in peak
    }  # fmt: skip
    result = {"setting": setting, "rows": rows, **ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(
        f"loss memory, {args.batch} x {args.seq} tokens, vocab {args.vocab}, device {args.device}"
    )
    print(f"{'variant':10s} {'peak GiB':>9s} {'1st call s':>10s} {'later s':>8s} {'loss':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:10s} {r['error']}")
            continue
        later = f"{r['seconds_later']:8.2f}" if r["seconds_later"] is not None else f"{'-':>8s}"
        print(
            f"{r['variant']:10s} {r['peak_gib']:9.2f} {r['seconds']:10.2f} {later} {r['loss']:10.5f}"
        )
    for key, ratio in ratios.items():
        variant = key.removeprefix("peak_ratio_").removesuffix("_over_full")
        print(f"{variant} / full peak memory: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
