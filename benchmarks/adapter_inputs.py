"""A LoRA policy's forward and backward under bf16 autocast, with and without PEFT's
float32 cast of every adapter's input (`keep_adapter_inputs`).

PEFT widens each adapter's input to the adapter's dtype (float32) before `lora_A`; under
autocast the matmul then rounds it straight back to bf16, and backward pays both casts
on the gradient. The trainer leaves the input as it comes. Both arms run on the same
policy (the trainer's, with its frozen weights already in bf16), alternating, on one
micro-batch of random token ids; the logits and adapter gradients are compared bit for
bit.

    python benchmarks/adapter_inputs.py                              # the bundled 0.5B model
    python benchmarks/adapter_inputs.py --model smollm2-135m --tokens 256
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
    parser.add_argument("--rows", type=int, default=4, help="the micro-batch")
    parser.add_argument("--tokens", type=int, default=232, help="tokens per row")
    parser.add_argument(
        "--keep", type=int, default=129, help="positions whose logits the loss reads"
    )
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/adapter_inputs.json")
    args = parser.parse_args(argv)

    from peft.tuners.tuners_utils import BaseTunerLayer

    from resd.config import load_config
    from resd.models import autocast_context
    from resd.training.trainer import Trainer

    cfg = load_config(None, [f"model={args.model}", "lora={r: 16, alpha: 32}", "env=arithmetic",
                             "progress=false", f"output_dir={scratch_dir('resd-adapter-')}"])  # fmt: skip
    trainer = Trainer(cfg)
    model, device = trainer.model, trainer.device
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    ids = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip

    def forward_backward() -> tuple[float, float, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with autocast_context(device, cfg.autocast):
            logits = model(input_ids=ids, logits_to_keep=args.keep).logits
        loss = logits.float().logsumexp(-1).mean()
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return middle - start, end - middle, logits.detach(), grads

    arms = {"float32 input (PEFT's cast, before)": True, "input as it comes (after)": False}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
    outputs = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, cast in arms.items():
            for layer in layers:
                layer.cast_input_dtype_enabled = cast
            forward, backward, logits, grads = forward_backward()
            times[name].append((forward, backward))
            outputs[name] = (logits, grads)
    (la, ga), (lb, gb) = outputs.values()
    rows = [
        {"arm": name, "forward_s": statistics.median(t[0] for t in ts[1:]),
         "backward_s": statistics.median(t[1] for t in ts[1:]), "raw": ts}
        for name, ts in times.items()
    ]  # fmt: skip
    result = {"settings": vars(args), "autocast": str(cfg.autocast), "adapter_layers": len(layers),
              "same_logits": torch.equal(la, lb), "same_gradients": torch.equal(ga, gb), "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.model}, LoRA r=16 on {len(layers)} layers, {args.rows} x {args.tokens} tokens, "
          f"autocast {cfg.autocast}, median of {args.repeats}")  # fmt: skip
    print(f"{'adapter input':40s} {'forward s':>9s} {'backward s':>10s} {'total s':>8s}")
    for r in rows:
        total = r["forward_s"] + r["backward_s"]
        print(f"{r['arm']:40s} {r['forward_s']:9.3f} {r['backward_s']:10.3f} {total:8.3f}")
    print(
        f"same logits: {result['same_logits']}, same adapter gradients: {result['same_gradients']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
