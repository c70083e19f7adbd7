"""Whole training steps with packed rows against padded ones, alternating in one process.

`step_profile.py` runs each variant in a process of its own, and on this machine two
processes doing the same work differ by up to 4 s a step; packing saves about 2 s.
Here one trainer (the profile's settings: the bundled 0.5B model, LoRA r = 16, batch 8,
replies <= 128 tokens) takes a warm-up step, then alternates steps with packing on and
off (`Update.packing`) on the same prompts, and reports the median of each phase per
arm, with the forward and backward passes of the update timed on their own.

Both arms do the same work: the learning rate is held at 0, every step takes the same
step number (so the same sampling seeds), and the playbook and solution buffer are put
back as they were before each step, so every step draws the same replies, writes the
same lessons and builds the same teacher contexts; only the update's forwards differ.
The script checks that the arms' reply tokens agree.

    python benchmarks/packed_steps.py --run ifeval/sdpo
    python benchmarks/packed_steps.py --run ifeval/grpo --set rollouts_per_prompt=8 --set batch_size=2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import BASE, ENVS, LORA, scratch_dir

PARTS = ("rollout", "reflect", "curate", "teacher", "update", "forward", "backward", "step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="ifeval/sdpo", help="ENV/ALGORITHM")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env, algorithm = args.run.split("/")

    import torch

    from resd.config import load_config
    from resd.training import update as update_module
    from resd.training.trainer import Trainer

    overrides = [*BASE, *ENVS[env], LORA, f"algorithm={algorithm}",
                 f"output_dir={scratch_dir('resd-packed-steps-')}", *args.set]  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    clocks: dict[str, float] = {}

    def timed(function: Callable, key: str, only_with_grad: bool = False) -> Callable:
        def wrapper(*a, **k):
            if only_with_grad and not torch.is_grad_enabled():
                return function(*a, **k)
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                clocks[key] = clocks.get(key, 0.0) + time.perf_counter() - start

        return wrapper

    # The student's forwards (those with gradients: the teacher's and the reference's run
    # without, and are left out) and the backwards, inside the update phase.
    update_module.response_logits = timed(update_module.response_logits, "forward", True)
    update_module.response_hidden = timed(update_module.response_hidden, "forward", True)
    trainer.parallel.backward = timed(trainer.parallel.backward, "backward")
    packing = trainer.update.packing
    if packing is None:
        raise SystemExit("this model's forwards cannot be packed")
    trainer.update.lr = lambda step: 0.0  # the weights, and so the replies, stay as they are
    lessons = trainer.lessons
    saved = copy.deepcopy((lessons.playbook.__dict__, lessons.buffer.__dict__))

    def same_step(arm: str) -> dict:
        lessons.playbook.__dict__.update(copy.deepcopy(saved[0]))
        lessons.buffer.__dict__.update(copy.deepcopy(saved[1]))
        trainer.step = 0
        trainer.update.packing = packing if arm == "packed" else None
        clocks.clear()
        return trainer.train_step(items)

    items = trainer.train_items[: trainer.cfg.batch_size]
    same_step("packed")  # warm-up
    steps: dict[str, list[dict[str, float]]] = {"padded": [], "packed": []}
    for index in range(2 * args.steps):
        arm = "padded" if index % 2 == 0 else "packed"
        metrics = same_step(arm)
        steps[arm].append({**{f"time_{k}": v for k, v in clocks.items()}, **{
            k: float(v) for k, v in metrics.items() if k.startswith("time_") or k == "response_tokens"}})  # fmt: skip
    tokens = {arm: {s["response_tokens"] for s in rows} for arm, rows in steps.items()}
    if len(tokens["padded"] | tokens["packed"]) != 1:
        raise SystemExit(f"the arms drew different replies: {tokens}")
    medians = {
        arm: {p: statistics.median(s.get(f"time_{p}", 0.0) for s in rows) for p in PARTS}
        | {"reply_tokens": statistics.mean(s["response_tokens"] for s in rows)}
        for arm, rows in steps.items()
    }
    out = args.out or f"benchmarks/results/packed_rows/steps_{env}_{algorithm}.json"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"run": args.run, "settings": overrides, "steps": steps,
                                     "medians": medians, "torch_threads": torch.get_num_threads()}, indent=1))  # fmt: skip
    print(f"{args.run}, {' '.join(args.set) or 'profile settings'}, median of {args.steps} steps per arm, "
          f"alternating")  # fmt: skip
    print(f"{'arm':8s}" + "".join(f"{p:>9s}" for p in PARTS) + f"{'tokens':>8s}")
    for arm, row in medians.items():
        print(
            f"{arm:8s}" + "".join(f"{row[p]:9.2f}" for p in PARTS) + f"{row['reply_tokens']:8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
