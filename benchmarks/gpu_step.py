"""End-to-end training steps of the real trainer on a GPU: SDPO and RESD side by side.

`gpu_bench.py` times a RESD step assembled from its parts; this runs `Trainer.train_step`
itself, so the trainer's GPU path (device placement, the bf16 sampling copy, grammar
masks applied on the GPU, the reflection and curation passes, the chunked loss, the EMA
teacher) has run at least once, and gives its phase table. The weights cannot travel to
the lent GPU machine, so the model is random-init of a real shape (Qwen3-0.6B by
default) with a real tokenizer (`--tokenizer`, a folder or Hub id; Qwen3 and Qwen2.5 share
their vocabulary). A random model writes random text, so replies run to their caps: the
decoding is the worst case, the grammar keeps reflections valid JSON all the same.

The settings are the 0.5B headline's (`configs/headline_qwen.yaml`: house rules, batch 8,
K = 4 inner updates, LoRA r = 16, replies <= 96 tokens, reflections <= 256, curation
<= 192). Each algorithm runs in a process of its own (peak GPU memory is its own): one
warm-up step, then `--repeats` timed steps on the same batch; the table holds medians.

    python benchmarks/gpu_step.py --tokenizer DIR                       # on the GPU, ~3 minutes
    python benchmarks/gpu_step.py --smoke --tokenizer DIR --device cpu  # tiny shape (tests)
    python benchmarks/gpu_step.py --tokenizer DIR --device cpu --shape tiny-151k --algorithms resd
        # 2 layers with Qwen's vocabulary: the grammar at full vocabulary, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from step_profile import PHASES, phase_medians, scratch_dir  # this script's folder is on the path

HEADLINE = Path(__file__).resolve().parents[1] / "configs" / "headline_qwen.yaml"
SETTINGS = [
    "steps=4", "eval_every=0", "eval_items=1", "log_samples=0", "save_every=0",
    "progress=false", "structured_output=on",
]  # fmt: skip
SMOKE = ["max_new_tokens=8", "reflection_max_new_tokens=48", "curation_max_new_tokens=48",
         "batch_size=2", "micro_batch_size=2", "generation_batch_size=2", "inner_updates=2",
         "max_reflections_per_step=2"]  # fmt: skip


def build_model(shape: str, tokenizer: str, out: Path, device: str) -> Path:
    """A random-init model of `shape` (gpu_bench.SHAPES) saved beside `tokenizer`'s files."""
    import torch
    from gpu_bench import SHAPES, build  # this script's folder is on the path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > SHAPES[shape]["vocab_size"]:
        raise SystemExit(
            f"tokenizer has {len(tok)} tokens, more than {shape}'s {SHAPES[shape]['vocab_size']}"
        )
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
           "bos_token_id": tok.bos_token_id}  # fmt: skip
    build(shape, torch.device(device), torch.bfloat16, **ids).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def child(model_dir: str, algorithm: str, repeats: int, smoke: bool, device: str) -> dict[str, Any]:
    """In a fresh process: build the trainer, take 1 + `repeats` steps, report medians."""
    import torch

    from resd.config import load_config
    from resd.training.trainer import Trainer

    out = scratch_dir("resd-gpu-step-")
    overrides = [*SETTINGS, *(SMOKE if smoke else []), f"model={model_dir}", f"device={device}",
                 f"algorithm={algorithm}", f"output_dir={out}"]  # fmt: skip
    cfg = load_config(str(HEADLINE), overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    setup = time.perf_counter() - start
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    items = trainer.train_items[: cfg.batch_size]
    steps = []
    for _ in range(1 + repeats):
        steps.append(trainer.train_step(items))
        times = " ".join(f"{p} {steps[-1].get(f'time_{p}', 0.0):.2f}" for p in (*PHASES, "step"))
        print(f"{algorithm} step {len(steps)}: {times}", file=sys.stderr, flush=True)
    timed = steps[1:]
    reflections = sum(s.get("reflections", 0) for s in timed)
    return {
        "algorithm": algorithm, "setup_s": setup, "steps": steps,
        "median": phase_medians(timed),
        "response_tokens": statistics.mean(s["response_tokens"] for s in timed),
        "reflections": reflections,
        "reflections_parsed": sum(s.get("reflections_parsed", 0) for s in timed),
        "reflection_tokens": sum(s.get("reflection_tokens", 0) for s in timed),
        "curation_tokens": sum(s.get("curation_tokens", 0) for s in timed),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "structured_output": trainer.cfg.structured_output,
        "model_device": str(next(trainer.model.parameters()).device),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder or Hub id")
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--algorithms", default="sdpo,resd")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, short replies (CPU test)")
    parser.add_argument(
        "--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"), "gpu_step.json")
    )
    parser.add_argument(
        "--child", nargs=2, metavar=("MODEL_DIR", "ALGORITHM"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        row = child(*args.child, args.repeats, args.smoke, args.device)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    if args.smoke:
        args.shape = "tiny"
    import torch

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "shape": args.shape,
                              "settings": [str(HEADLINE), *SETTINGS, *(SMOKE if args.smoke else [])],
                              "repeats": args.repeats, "rows": [], "resd_over_sdpo": None}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="resd-gpu-model-"))
    try:
        start = time.perf_counter()
        model_dir = build_model(args.shape, args.tokenizer, work / args.shape, args.device)
        result["build_s"] = time.perf_counter() - start
        for algorithm in args.algorithms.split(","):
            cmd = [sys.executable, __file__, "--tokenizer", args.tokenizer, "--child", str(model_dir),
                   algorithm, "--repeats", str(args.repeats), "--device", args.device,
                   *(["--smoke"] if args.smoke else [])]  # fmt: skip
            # the child's log and per-step lines go straight through: a part stopped at its
            # time limit still shows how far it got
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{algorithm} failed (exit {done.returncode})")
            result["rows"].append(json.loads(lines[-1][len("RESULT ") :]))
            write(result, Path(args.out))  # after each algorithm, in case a later one fails
            print(f"done: {algorithm} {result['rows'][-1]['median']['step']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(result)
    return 0


def write(result: dict[str, Any], out: Path) -> None:
    """The JSON so far, with RESD / SDPO once both rows are in."""
    medians = {r["algorithm"]: r["median"]["step"] for r in result["rows"]}
    if {"resd", "sdpo"} <= medians.keys():
        result["resd_over_sdpo"] = medians["resd"] / medians["sdpo"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def print_table(result: dict[str, Any]) -> None:
    print(f"device: {result['device']}, model: random-init {result['shape']}, "
          f"medians of {result['repeats']} steps (s)")  # fmt: skip
    print(f"{'algorithm':9s} " + " ".join(f"{p:>8s}" for p in (*PHASES, "step"))
          + f" {'peak GiB':>8s} {'tokens':>6s} {'parsed':>7s}")  # fmt: skip
    for r in result["rows"]:
        cells = " ".join(f"{r['median'][p]:8.2f}" for p in (*PHASES, "step"))
        peak = f"{r['peak_gpu_gib']:8.2f}" if r["peak_gpu_gib"] is not None else f"{'-':>8s}"
        parsed = f"{r['reflections_parsed']}/{r['reflections']}"
        print(f"{r['algorithm']:9s} {cells} {peak} {r['response_tokens']:6.1f} {parsed:>7s}")
    if result["resd_over_sdpo"] is not None:
        print(f"RESD / SDPO per step: {result['resd_over_sdpo']:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
