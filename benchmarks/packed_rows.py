"""A micro-batch's forward (and backward) padded against packed into one row.

The trainer's update runs each micro-batch of rollouts through the policy, and the
teacher's forward runs it again in the teacher's context. A micro-batch is usually the K
rollouts of one prompt, so the padded batch computes that prompt K times, plus the
padding up to its longest reply; packed (`resd.training.packing`), the prompt runs once
and nothing is padded. This script measures both on real rollouts: the bundled 0.5B
policy (LoRA r = 16, bf16 autocast, as the trainer builds it) samples K replies to each of
a few IFEval prompts, then each group of K runs as one micro-batch, padded and packed,
alternating, as a training forward and backward and as a forward without gradients (the
teacher's kind). Reply logits and adapter gradients of the two arms are compared.

    python benchmarks/packed_rows.py                     # 2 prompts x K = 4, replies <= 128
    python benchmarks/packed_rows.py --prompts 1 --repeats 2 --max-new-tokens 16   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import scratch_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--env", default="ifeval")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=4, help="K: rows per micro-batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/packed_rows.json")
    args = parser.parse_args(argv)

    from resd.config import load_config
    from resd.generation.hf import chat_prompt_ids, generate
    from resd.models import autocast_context
    from resd.training.packing import Packing, common_prefix
    from resd.training.trainer import Trainer
    from resd.training.update import response_logits, right_aligned_mask

    cfg = load_config(None, [f"model={args.model}", "lora={r: 16, alpha: 32}", f"env={args.env}",
                             "env_args.n_train=16", "env_args.n_test=2", "progress=false",
                             f"output_dir={scratch_dir('resd-packed-')}"])  # fmt: skip
    trainer = Trainer(cfg)
    model, device, tok = trainer.model, trainer.device, trainer.tokenizer
    packing = Packing.for_model(model)
    assert packing is not None, "this model's attention cannot take a packed row"
    groups = []
    for item in trainer.train_items[: args.prompts]:
        prompt = chat_prompt_ids(tok, item.messages, max_tokens=cfg.max_prompt_tokens)
        with torch.no_grad(), autocast_context(device, cfg.autocast):
            replies = generate(model, tok, [prompt] * args.rollouts, max_new_tokens=args.max_new_tokens,
                               temperature=1.0, top_p=0.95, batch_size=args.rollouts,
                               seeds=list(range(args.rollouts)))  # fmt: skip
        groups.append((len(prompt), [prompt + g.token_ids for g in replies if g.token_ids]))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(
        seqs: list[list[int]], width: int, packed: bool, grad: bool
    ) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """One forward (and backward) of the replies' logits; seconds, logits, gradients."""
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with torch.set_grad_enabled(grad), autocast_context(device, cfg.autocast):
            logits = response_logits(
                model, seqs, width, tok.pad_token_id, packing if packed else None
            )
        if grad:
            logits.float().logsumexp(-1).mean().backward()
        seconds = time.perf_counter() - start
        grads = torch.cat([p.grad.flatten() for p in params]) if grad else None
        return seconds, logits.detach(), grads

    rows = []
    for index, (prompt_len, seqs) in enumerate(groups):
        prefix = common_prefix(seqs)
        replies = [len(s) - prompt_len for s in seqs]
        width = max(replies)
        plan = packing.plan(seqs, width, device)
        record = {"group": index, "rows": len(seqs), "prompt": prompt_len, "replies": replies, "prefix": prefix,
                  "padded_positions": len(seqs) * max(len(s) for s in seqs),
                  "packed_positions": prefix + sum(len(s) - prefix for s in seqs),
                  "packing_pays": plan is not None}  # fmt: skip
        for grad in (True, False):
            times: dict[str, list[float]] = {"padded": [], "packed": []}
            out = {}
            for _ in range(args.repeats + 1):  # the first round warms up
                for arm in times:
                    seconds, logits, grads = run(seqs, width, arm == "packed", grad)
                    times[arm].append(seconds)
                    out[arm] = (logits, grads)
            (lp, gp), (lk, gk) = out["padded"], out["packed"]
            valid = right_aligned_mask(replies, width, device).bool()
            kind = "forward_backward" if grad else "forward"
            record[kind] = {
                "padded_s": statistics.median(times["padded"][1:]),
                "packed_s": statistics.median(times["packed"][1:]),
                "raw": times,
                "max_logit_diff": float((lp.float() - lk.float()).abs()[valid].max()),
                "max_logit": float(lp.float().abs()[valid].max()),
                "grad_rel_diff": float((gp - gk).abs().max() / gp.abs().max()) if grad else None,
            }  # fmt: skip
        rows.append(record)
    result = {"settings": vars(args), "autocast": str(cfg.autocast), "torch_threads": torch.get_num_threads(),
              "groups": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.model}, LoRA r=16, {args.env}, K = {args.rollouts}, replies <= {args.max_new_tokens} "
          f"tokens, autocast {cfg.autocast}, median of {args.repeats}")  # fmt: skip
    print(f"{'group':>5s} {'prompt':>6s} {'replies':>16s} {'prefix':>6s} {'positions':>15s} "
          f"{'fwd+bwd padded':>14s} {'packed':>7s} {'fwd padded':>10s} {'packed':>7s} "
          f"{'max |dlogit|':>12s} {'grad rel':>9s}")  # fmt: skip
    for r in rows:
        fb, f = r["forward_backward"], r["forward"]
        replies = ",".join(str(n) for n in r["replies"])
        positions = f"{r['padded_positions']}->{r['packed_positions']}"
        print(f"{r['group']:5d} {r['prompt']:6d} {replies:>16s} {r['prefix']:6d} {positions:>15s} "
              f"{fb['padded_s']:14.3f} {fb['packed_s']:7.3f} {f['padded_s']:10.3f} {f['packed_s']:7.3f} "
              f"{max(fb['max_logit_diff'], f['max_logit_diff']):12.4f} {fb['grad_rel_diff']:9.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
