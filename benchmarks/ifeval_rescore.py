"""Score the committed IFEval forgetting replies again, with the verifiers as they are now.

The forgetting figures of `docs/results.md` (section 2) were scored when the replies were
generated. When a verifier changes, this says whether any recorded figure would change:
each evaluation file under `benchmarks/results/forgetting_qwen/` keeps every reply, so
scoring them again needs no model. A file that points at another check (`same_as`) holds
no replies and is skipped.

    python benchmarks/ifeval_rescore.py        # table; JSON in benchmarks/results/

Run from the repository root: the records' `env_args.path` (the IFEval prompts, in
`../shared/data/`) is relative to it.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from resd.envs.ifeval import IFEvalEnv


@functools.cache
def _environment(env_args: str) -> tuple[IFEvalEnv, dict[str, Any]]:
    """The IFEval environment of a record and its items by id, read once for all records
    that share it (every forgetting check reads the same prompts)."""
    env = IFEvalEnv(**json.loads(env_args))
    return env, {item.id: item for item in env.test_items()}


def rescore(record: dict[str, Any]) -> dict[str, float]:
    """The record's replies scored again: task and case mean, beside the recorded ones."""
    env, items = _environment(json.dumps(record["env_args"], sort_keys=True))
    scores = [env.score(items[s["item"]], s["response"]) for s in record["samples"]]
    n = len(scores)
    return {
        "replies": n,
        "task_recorded": record["metrics"]["task_mean@k"],
        "task_now": sum(s.reward for s in scores) / n,
        "case_recorded": record["metrics"]["case_mean@k"],
        "case_now": sum(s.score for s in scores) / n,
        "replies_changed": sum(
            s.reward != reward or abs(s.score - score) > 1e-12
            for s, reward, score in zip(
                scores, _recorded(record, "rewards"), _recorded(record, "scores"), strict=True
            )
        ),
    }


def _recorded(record: dict[str, Any], key: str) -> list[float]:
    """The recorded reward or score of each reply, in the order of `samples`."""
    by_item = {row["item"]: row[key] for row in record["per_item"]}
    return [by_item[s["item"]][s["sample"]] for s in record["samples"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="benchmarks/results/forgetting_qwen")
    parser.add_argument("--out", default="benchmarks/results/ifeval_rescore.json")
    args = parser.parse_args()
    rows = {}
    for path in sorted(Path(args.results).glob("*.json")):
        record = json.loads(path.read_text())
        if "samples" in record:
            rows[path.stem] = rescore(record)
    print(f"{'evaluation':28s} {'replies':>7s} {'task then':>9s} {'task now':>8s} "
          f"{'case then':>9s} {'case now':>8s} {'changed':>7s}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:28s} {r['replies']:7d} {r['task_recorded']:9.3f} {r['task_now']:8.3f} "
              f"{r['case_recorded']:9.4f} {r['case_now']:8.4f} {r['replies_changed']:7d}")  # fmt: skip
    changed = sum(r["replies_changed"] for r in rows.values())
    print(f"{len(rows)} evaluations, {sum(r['replies'] for r in rows.values())} replies, "
          f"{changed} scored differently now")  # fmt: skip
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
