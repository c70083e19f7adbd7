"""Per-process training memory: full replicas (ddp) vs FSDP2 vs DeepSpeed ZeRO-2/3.

What FSDP buys is that the policy's weights, gradients and AdamW state, and the EMA
teacher's weights, are split over the processes; what it costs is a full copy of the
weights to sample from (in the generation dtype) and a gather after every step to
refresh it. This counts the bytes each rank actually holds in those tensors after one
optimizer step (local shards only; for DeepSpeed the optimizer column includes its fp32
master partitions, and gradients live in its own buffers, so only the peak resident
memory of the process tells the whole story), and times the step and the refresh,
using the trainer's own pieces (the strategy's `shard_model` / `prepare` / `backward` /
`step` / `full_parameters`, and `Teacher`).

Each configuration is a fresh `torch.distributed.run` launch on this machine (gloo on
CPU, nccl on GPU). The model is random-init with SmolLM2-135M's shape by default.

    python benchmarks/sharding_memory.py                        # 1 and 2 processes, CPU
    python benchmarks/sharding_memory.py --smoke                # a 2-layer toy shape, for the tests
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, 151936),
    "tiny": (64, 2, 4, 2, 128, 4096),  # --smoke: what is counted, not how much
}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if type(t).__name__ == "DTensor" else t
        local = getattr(local, "ds_tensor", local)  # ZeRO-3: this rank's partition
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from resd.parallel import make_parallel
    from resd.training.teacher import Teacher

    strategy, _, stage = args.strategy.partition("-zero")
    dist = make_parallel(strategy, int(stage) if stage else None)
    device = torch.device(f"cuda:{dist.local_rank}" if args.device == "cuda" else "cpu")
    hidden, layers, heads, kv, inter, vocab = SHAPES[args.shape]
    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=args.layers or layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    teacher = Teacher(model, "ema", update_rate=0.01)
    generator = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    for module in (model, teacher.copy):
        dist.shard_model(module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dist.prepare(model, optimizer, 1.0)
    policy = dist.policy(model)
    params = list(model.parameters())
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = policy(input_ids=ids).logits
        dist.backward(logits.float().logsumexp(-1).mean())
        dist.step(optimizer, params, 1.0)
        teacher.update(model, dist.teacher_source(model))  # as the trainer: one at a time
        mid = time.perf_counter()
        with torch.no_grad():
            sampling = dict(generator.named_parameters())
            for name, tensor in dist.full_parameters(model):
                sampling[name].copy_(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return mid - start, time.perf_counter() - mid

    step()  # warm-up: allocates optimizer state
    times = [step() for _ in range(args.repeats)]
    engine = getattr(dist, "engine", None)
    inner = engine.optimizer.optimizer if engine is not None else optimizer
    master = [] if inner is optimizer else [p for g in inner.param_groups for p in g["params"]]
    report = {
        "strategy": dist.name,
        "world_size": dist.world_size,
        "gib": {
            "params": _local_bytes(model.parameters()) / 2**30,
            # DeepSpeed keeps gradients in its own flat buffers, not in `.grad`
            "grads": None
            if engine is not None
            else _local_bytes(p.grad for p in model.parameters()) / 2**30,
            "optimizer": (
                _local_bytes(t for s in inner.state.values() for t in s.values() if t.dim())
                + _local_bytes(master)
            )
            / 2**30,
            "teacher": _local_bytes(teacher.copy.parameters()) / 2**30,
            "generator": _local_bytes(generator.parameters()) / 2**30,
        },
        "step_s": sorted(t[0] for t in times)[len(times) // 2],
        "refresh_s": sorted(t[1] for t in times)[len(times) // 2],
    }
    report["gib"]["total"] = sum(v for v in report["gib"].values() if v is not None)
    report["gib"]["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    reports = dist.gather(report)
    if dist.is_main:
        Path(args.out).write_text(json.dumps(reports))
    dist.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, strategy: str, processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={_free_port()}", __file__, "--worker", "--strategy", strategy,
               "--out", str(out), "--shape", args.shape, "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats),
               "--device", args.device]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // processes)))
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 and not out.exists():
            raise RuntimeError(done.stderr[-3000:])
        if done.returncode != 0:  # every rank had reported: the failure came in teardown
            print(f"warning: {strategy} x {processes} failed after its report was written "
                  f"(exit {done.returncode}):\n{done.stderr[-1000:]}", file=sys.stderr)  # fmt: skip
        ranks = json.loads(out.read_text())
    return {"strategy": strategy, "processes": processes, "rank0": ranks[0], "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", default="benchmarks/results/sharding_memory.json")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0 = real)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="tiny settings, for the tests")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.shape, args.batch, args.seq, args.repeats = "tiny", 1, 16, 1
    strategies = ["ddp", "fsdp"]
    if importlib.util.find_spec("deepspeed") is not None:
        strategies += ["deepspeed-zero2", "deepspeed-zero3"]
    runs = [launch(args, "ddp", 1)] + [launch(args, s, args.processes) for s in strategies]
    columns = ("params", "grads", "optimizer", "teacher", "generator", "total", "peak_rss")
    header = f"{'strategy':<16}{'procs':>6}" + "".join(f"{k:>11}" for k in columns)
    header += f"{'step s':>9}{'refresh s':>11}"
    lines = [f"per-rank GiB, {args.shape} ({args.layers or 'all'} layers), "
             f"batch {args.batch} x {args.seq}, {args.device}", header]  # fmt: skip
    for run in runs:
        r0 = run["rank0"]
        lines.append(
            f"{run['strategy']:<16}{run['processes']:>6}"
            + "".join(
                f"{r0['gib'][k]:>11.3f}" if r0["gib"][k] is not None else f"{'n/a':>11}"
                for k in columns
            )
            + f"{r0['step_s']:>9.2f}{r0['refresh_s']:>11.3f}"
        )
    result = {"settings": vars(args), "command": " ".join(["python", *sys.argv]), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
