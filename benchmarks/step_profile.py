"""One training step of the bundled 0.5B model on 2 CPU cores: phases and peak memory.

Each variant runs in a process of its own, so its peak resident memory is its own: one
warm-up step, then `--repeats` timed steps on the same batch of prompts (the K inner
updates of one batch), and the median of every phase the trainer times. The settings
are the ones the 0.5B experiments use: batch 8, replies of at most 128 tokens; on
arithmetic with two-digit operands the replies are short (~8 tokens), on generated
IFEval prompts they run to the cap.

Variants (`--variants`, comma-separated):

    full          full fine-tuning: fp32 master weights, bf16 autocast, a bf16 sampling copy
    full-chunk    the same with the chunked output head (`loss_chunk_size: 64`)
    lora          LoRA r = 16 on every linear layer; the EMA teacher is a second adapter,
                  sampling from a bf16 copy with the adapter merged in where bf16 is fast,
                  else from the policy itself (`generation_dtype: auto`)
    lora-chunk    the same with the chunked output head
    full-before   `full` without the contiguous head input (the step as it was before)
    lora-before   `lora` sampling through the unmerged fp32 adapters, without the
                  contiguous head input (the step as it was before)
    lora-one      `lora` with single-call lessons (`lesson_calls: one`: no curator pass)
    lora-conv     `lora` with reflections that continue the rollout's conversation
                  (`reflection_layout: conversation`), reusing its keys and values
    lora-one-conv both
    lora-int8     `lora` sampling from a merged copy with int8 decoding weights
                  (`generation_dtype: int8`, CPU)
    lora-sdpa     `lora` with transformers' own `sdpa` attention instead of `packed_sdpa`
                  (the step as it was before; differs only in unpadded decode batches)
    lora-uncast   `lora` with the frozen linear weights put back in float32, which
                  autocast then casts in every forward pass (the step as it was before
                  `cast_frozen_linears`; the same numbers, since autocast rounds them)
    lora-adapter-cast  `lora` with PEFT's cast of every adapter's input to float32 put
                  back (the step as it was before `keep_adapter_inputs`; the same numbers)
    lora-unpacked `lora` with every micro-batch padded (`pack_rows: false`), its shared
                  prompt computed once per row (the step as it was before packing)
    lora-freeing  `lora` with glibc returning freed memory to the kernel
                  (`keep_host_memory: false`, the step as it was before `resd.allocator`)

Besides seconds, each step records the process's minor page faults and system CPU seconds
(`getrusage`: pages the kernel had to map and zero for the step) and the memory resident
after it (`/proc/self/statm`).

    python benchmarks/step_profile.py                        # every variant, SDPO, both tasks
    python benchmarks/step_profile.py --algorithms sdpo,resd --variants lora --envs arithmetic

The table is printed last; the JSON (`--out`) holds every step of every variant.
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("rollout", "feedback", "reflect", "curate", "teacher", "update")
ENVS = {  # short replies (the experiments' arithmetic) and replies that run to the 128-token cap
    "arithmetic": ["env=arithmetic", "env_args.n_train=64", "env_args.n_test=4", "env_args.max_operand=99",
                   "env_args.mul_max_operand=99", "env_args.quote_answer=true"],  # as measured
    "ifeval": ["env=ifeval", "env_args.n_train=64", "env_args.n_test=4"],
    "house_rules": ["env=house_rules", "env_args.n_test=4"],  # the headline task
    "manufactoria": ["env=manufactoria", "max_prompt_tokens=2048"],  # ~1,500-token prompts
}  # fmt: skip
BASE = [
    "model=qwen2.5-coder-0.5b", "batch_size=8", "inner_updates=4",
    "micro_batch_size=4", "generation_batch_size=8", "max_new_tokens=128",
    "reflection_max_new_tokens=256", "curation_max_new_tokens=192", "lr=1e-5", "warmup_steps=0",
    "teacher_update_rate=0.05", "progress=false", "eval_items=1", "log_samples=0",
]  # fmt: skip
LORA = "lora={r: 16, alpha: 32}"
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "full-chunk": ["loss_chunk_size=64"],
    "lora": [LORA],
    "lora-chunk": [LORA, "loss_chunk_size=64"],
    "full-before": [],
    "lora-before": [LORA, "generation_dtype=float32"],
    "lora-one": [LORA, "lesson_calls=one"],
    "lora-conv": [LORA, "reflection_layout=conversation"],
    "lora-one-conv": [LORA, "lesson_calls=one", "reflection_layout=conversation"],
    "lora-int8": [LORA, "generation_dtype=int8"],
    "lora-uncast": [LORA],
    "lora-sdpa": [LORA],
    "lora-adapter-cast": [LORA],
    "lora-unpacked": [LORA, "pack_rows=false"],
    "lora-freeing": [LORA, "keep_host_memory=false"],
}


def scratch_dir(prefix: str) -> str:
    """A fresh folder under the system's temporary directory for a benchmark's own run or
    tiny model, removed when the process exits: the figures go to `--out`, and a folder
    left behind by every call (each smoke test of the suite made several) fills /tmp."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def phase_medians(steps: list[dict[str, Any]]) -> dict[str, float]:
    """The median of every phase the trainer times, of the whole step, and of its minor
    page faults and system seconds where `measured_step` counted them."""
    medians = {p: statistics.median(s[f"time_{p}"] for s in steps) for p in (*PHASES, "step")}
    for key in ("minor_faults", "system_s"):
        if all(key in s for s in steps):
            medians[key] = statistics.median(s[key] for s in steps)
    return medians


def resident_gib() -> float | None:
    """The process's resident memory now (Linux), to see whether it creeps from step to step."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize() / 2**30


def measured_step(trainer, items) -> dict[str, Any]:
    """One training step's metrics, with the page faults and system time it cost and the
    memory resident after it."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    metrics = trainer.train_step(items)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {**metrics, "minor_faults": after.ru_minflt - before.ru_minflt,
            "system_s": after.ru_stime - before.ru_stime, "resident_gib": resident_gib()}  # fmt: skip


def _undo_head_fix(trainer) -> None:
    """Take the contiguous-input hook off every model the trainer holds (the 'before' step)."""
    from resd.models import _contiguous_first

    models = [trainer.model, trainer.sampler.generator, getattr(trainer.teacher, "copy", None)]
    for model in filter(None, models):
        head = model.get_output_embeddings()
        for key, hook in list(head._forward_pre_hooks.items()):
            if hook is _contiguous_first:
                del head._forward_pre_hooks[key]


def _plain_sdpa(trainer) -> None:
    """Put every model the trainer decodes or scores with back on transformers' `sdpa`."""
    models = [trainer.model, trainer.sampler.generator, getattr(trainer.teacher, "copy", None)]
    for model in filter(None, models):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation("sdpa")


def _uncast_frozen_linears(trainer) -> int:
    """Put the policy's frozen linear weights back in float32 (the 'uncast' step)."""
    from torch import nn

    from resd.training.policy import AutocastLinear

    count = 0
    for module in trainer.model.modules():
        if isinstance(module, AutocastLinear):
            module.weight.data = module.weight.data.float()
            if module.bias is not None:
                module.bias.data = module.bias.data.float()
            module.__class__ = nn.Linear
            count += 1
    return count


def _cast_adapter_inputs(trainer) -> int:
    """Put PEFT's float32 cast of every adapter's input back (the 'adapter-cast' step)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [
        m for m in trainer.model.modules()
        if isinstance(m, BaseTunerLayer) and not m.cast_input_dtype_enabled
    ]  # fmt: skip
    for layer in layers:
        layer.cast_input_dtype_enabled = True
    return len(layers)


def child(
    variant: str, algorithm: str, env: str, repeats: int, extra: list[str] | None = None
) -> dict[str, Any]:
    """Run in a fresh process: build the trainer, take 1 + `repeats` steps, report."""
    from resd.config import load_config
    from resd.training.trainer import Trainer

    out = scratch_dir("resd-profile-")
    overrides = [
        *BASE,
        *ENVS[env],
        *VARIANTS[variant],
        f"algorithm={algorithm}",
        f"output_dir={out}",
        *(extra or []),
    ]
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - start
    if variant.endswith("-before"):
        _undo_head_fix(trainer)
    if variant == "lora-sdpa":
        _plain_sdpa(trainer)
    if variant == "lora-uncast" and not _uncast_frozen_linears(trainer):
        raise SystemExit("lora-uncast: no frozen linear was cast (is autocast off here?)")
    if variant == "lora-adapter-cast" and not _cast_adapter_inputs(trainer):
        raise SystemExit("lora-adapter-cast: no adapter input was left uncast (autocast off?)")
    items = trainer.train_items[: cfg.batch_size]
    steps = [measured_step(trainer, items) for _ in range(1 + repeats)]
    timed = steps[1:]
    row = {
        "variant": variant, "algorithm": algorithm, "env": env, "setup_s": setup, "steps": timed,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "median": phase_medians(timed),
        "response_tokens": statistics.mean(s["response_tokens"] for s in timed),
        "reflections": sum(s.get("reflections", 0) for s in timed),
        "reflection_cache_hits": sum(s.get("reflection_cache_hits", 0) for s in timed),
        "reflection_cached_tokens": sum(s.get("reflection_cached_tokens", 0) for s in timed),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }  # fmt: skip
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--algorithms", default="sdpo")
    parser.add_argument("--envs", default="arithmetic,ifeval")
    parser.add_argument("--runs", default=None,
                        help="explicit env/algorithm/variant triples, comma-separated (instead of the grid)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/step_profile.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. rollouts_per_prompt=8)")  # fmt: skip
    parser.add_argument(
        "--child", nargs=3, metavar=("VARIANT", "ALGORITHM", "ENV"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.repeats, args.set)), flush=True)
        return 0
    plan = (
        [tuple(run.split("/")) for run in args.runs.split(",")]
        if args.runs
        else [(e, a, v) for e in args.envs.split(",") for a in args.algorithms.split(",")
              for v in args.variants.split(",")]
    )  # fmt: skip
    rows = []
    for env, algorithm, variant in plan:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            algorithm,
            env,
            "--repeats",
            str(args.repeats),
            *(f"--set={kv}" for kv in args.set),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{env}/{algorithm}/{variant} failed")
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
        print(f"done: {env} {algorithm} {variant} {rows[-1]['median']['step']:.1f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": BASE + args.set, "envs": ENVS, "variants": VARIANTS, "repeats": args.repeats,
                                          "machine": platform.processor() or platform.machine(),
                                          "rows": rows}, indent=1))  # fmt: skip
    head = f"{'env':11s} {'algorithm':9s} {'variant':12s} " + " ".join(
        f"{p:>8s}" for p in (*PHASES, "step")
    )
    print(
        head
        + f" {'faults k':>8s} {'sys s':>6s} {'peak GiB':>8s} {'tokens':>6s} {'hits':>7s} {'cached/refl':>11s}"
    )
    for r in rows:
        cells = " ".join(f"{r['median'][p]:8.2f}" for p in (*PHASES, "step"))
        refl = r.get("reflections", 0)
        hits = f"{r.get('reflection_cache_hits', 0)}/{refl}"
        cached = r.get("reflection_cached_tokens", 0) / refl if refl else 0.0
        faults = f"{r['median']['minor_faults'] / 1000:8.1f} {r['median']['system_s']:6.2f}"
        print(f"{r['env']:11s} {r['algorithm']:9s} {r['variant']:12s} {cells} {faults} {r['peak_rss_gib']:8.2f} "
              f"{r['response_tokens']:6.1f} {hits:>7s} {cached:11.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
