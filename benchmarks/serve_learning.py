"""Learning in deployment: a served model improved by its users' feedback, against the
same interaction budget trained offline.

Online: `resd serve`'s parts on loopback (the HTTP app, its store, the generation engine
and the learner). Simulated users are the house-rules environment: each asks one of its
training questions through the `openai` client and posts the environment's verdict and
feedback on the reply. Every `batch_size` interactions the learner makes one RESD step on
the stored rows, and its guard scores the held-out items; the curve is that score
against interactions, with the version actually served beside it.

Offline: `resd train` with the same config on the same questions in the same order, one
rollout per prompt and one update per batch (inner_updates = 1), evaluated after every
step: the same number of interactions, sampled by the trainer itself.

    python benchmarks/serve_learning.py                                   # smollm2-135m, 48 interactions
    python benchmarks/serve_learning.py --model qwen2.5-coder-0.5b --interactions 96 --out runs/serve_learning

Prints a table, writes --json and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

MODEL = "served"


def learn_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model, "algorithm": "resd", "env": "house_rules",
        "env_args": {"seed": 0, "rules_seed": 0, "n_rules": args.rules, "n_test": args.test_items},
        "batch_size": args.batch_size, "inner_updates": 1, "max_new_tokens": args.max_tokens,
        "reflection_max_new_tokens": 192, "curation_max_new_tokens": 160, "lr": args.lr,
        "warmup_steps": 0, "teacher": "ema", "teacher_update_rate": 0.05, "rollout_is_cap": 2.0,
        "temperature": args.temperature, "eval_items": args.test_items, "eval_samples": 1,
        "eval_temperature": 0.6, "save_every": 1, "keep_checkpoints": 1, "progress": False,
        "seed": args.seed, **({"lora": {"r": 16, "alpha": 32}} if args.lora else {}),
    }  # fmt: skip


def questions(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The environment and the questions the users ask, in their order."""
    from resd.envs.house_rules import HouseRulesEnv

    env = HouseRulesEnv(seed=0, rules_seed=0, n_rules=args.rules, n_test=args.test_items)
    items = list(env.train_items())
    random.Random(args.seed).shuffle(items)
    return env, items[: args.interactions]


def online(args: argparse.Namespace, out: Path, config_path: Path) -> list[dict[str, Any]]:
    import openai

    from resd.serve.app import BackgroundServer, create_app
    from resd.serve.engine import GenerationEngine, ModelHolder, load_served_model
    from resd.serve.learner import Learner
    from resd.serve.store import Store

    env, items = questions(args)
    store = Store(str(out / "resd.db"))
    served = load_served_model(args.model, version="base", name=MODEL, dtype="float32")
    store.add_version("base", parent=None, step=0, note="the starting model")
    holder = ModelHolder(served)
    engine = GenerationEngine(holder, max_new_tokens=args.max_tokens, max_batch=args.batch_size)
    learner = Learner.from_config(config_path, store=store, holder=holder, output_dir=out,
                                  guard_tolerance=args.guard_tolerance)  # fmt: skip
    curve = [{"interactions": 0, "accuracy": learner.status()["accuracy"][0]["accuracy"],
              "served_version": "base"}]  # fmt: skip
    app = create_app(holder, store, api_key=None, model_name=MODEL, learner=learner, engine=engine)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600
        )
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            for k, item in enumerate(
                batch
            ):  # users ask one by one; the engine batches what overlaps
                reply = client.chat.completions.create(model=MODEL, messages=item.messages,
                                                       temperature=args.temperature, seed=args.seed * 10**6 + start + k)  # fmt: skip
                text = reply.choices[0].message.content or ""
                verdict = env.score(item, text)
                store.record_feedback(reply.id, source="simulated-user", reward=verdict.reward,
                                      score=verdict.score, feedback=verdict.feedback)  # fmt: skip
            record = learner.step_once()
            if record is not None:
                curve.append({"interactions": start + len(batch), "accuracy": record["accuracy"],
                              "served_version": holder.current().version, "served": record["served"],
                              "train_reward": record["reward"], "playbook_size": record["playbook_size"]})  # fmt: skip
                print(f"online  {curve[-1]}", flush=True)
    store.close()
    return curve


def offline(args: argparse.Namespace, out: Path, config_path: Path) -> list[dict[str, Any]]:
    """`resd train` on the same questions in the same order (the env's train split with
    the same shuffle), evaluated after every step."""
    _, items = questions(args)
    steps = len(items) // args.batch_size
    subprocess.run([sys.executable, "-m", "resd.cli", "train", "--config", str(config_path),
                    f"output_dir={out}", f"steps={steps}", "eval_every=1"],
                   check=True)  # fmt: skip
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    return [
        {"interactions": e["step"] * args.batch_size, "accuracy": e[args.metric]} for e in evals
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--interactions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rules", type=int, default=3)
    parser.add_argument("--test-items", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--guard-tolerance", type=float, default=0.0)
    parser.add_argument("--metric", default="case_mean@k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/serve_learning")
    parser.add_argument("--json", default="benchmarks/results/serve_learning.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config_path = out / "learn.yaml"
    config_path.write_text(yaml.safe_dump(learn_config(args), sort_keys=False))

    # The offline run's stream is the online users' questions in their order: the trainer
    # shuffles the train split with random.Random(seed), as `questions` does.
    curves = {"online": online(args, out / "online", config_path),
              "offline": offline(args, out / "offline", config_path)}  # fmt: skip
    result = {"settings": vars(args), "metric": args.metric, "curves": curves}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n{args.metric} on {args.test_items} held-out house-rules items ({args.model})")
    print(f"{'interactions':>12s} {'online':>8s} {'served':>24s} {'offline':>8s}")
    offline_at = {p["interactions"]: p["accuracy"] for p in curves["offline"]}
    for p in curves["online"]:
        off = offline_at.get(p["interactions"])
        print(f"{p['interactions']:12d} {p['accuracy']:8.3f} {p['served_version']:>24s} "
              f"{off if off is None else round(off, 3)!s:>8s}")  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            ax.plot(
                [p["interactions"] for p in curve],
                [p["accuracy"] for p in curve],
                marker="o",
                label=name,
            )
        ax.set_xlabel("interactions (replies with feedback)")
        ax.set_ylabel(f"{args.metric}, held-out items")
        ax.set_title(f"learning in deployment vs offline ({args.model})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(Path(args.json).with_suffix(".png"), dpi=120)
    except ImportError:
        print("(matplotlib missing: no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
