"""Instruction following (IFEval) as a RESD environment.

IFEval's checks are exact and cheap, and each failure has a concrete, measurable cause
(a comma, 212 words instead of 300), which is the kind of rich feedback RESD learns
from. Training must never see the evaluation prompts, so the train split is drawn from a
seeded generator of fresh prompts with 1-3 compatible constraints; the test split is
either generated from held-out topics or, with `path=`, the real IFEval records.

This module holds the record loader and the environment. The rest lives next to it and
is re-exported here: the verifiers in `resd.envs.ifeval_checks`, the prompt generator in
`resd.envs.ifeval_prompts`, the template references in `resd.envs.ifeval_reference`,
and the word banks both draw on in `resd.envs.ifeval_banks` (data in
``data/ifeval_banks.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resd.envs.base import Environment, Item, Score
from resd.envs.ifeval_checks import (
    INSTRUCTION_IDS,
    LANGUAGE_NAMES,
    InstructionResult,
    check_instruction,
    clean_kwargs,
    describe_instruction,
    detect_language,
    evaluate_instructions,
    explain_instruction,
)
from resd.envs.ifeval_prompts import CONFLICTS, generate_items
from resd.envs.ifeval_reference import build_reference
from resd.envs.loading import load_rows

__all__ = [
    "CONFLICTS",
    "INSTRUCTION_IDS",
    "LANGUAGE_NAMES",
    "IFEvalEnv",
    "IFEvalRecord",
    "InstructionResult",
    "build_reference",
    "check_instruction",
    "describe_instruction",
    "detect_language",
    "evaluate_instructions",
    "explain_instruction",
    "format_feedback",
    "generate_items",
    "load_ifeval_records",
    "strip_think",
]


# ---------------------------------------------------------------------------- loading


@dataclass
class IFEvalRecord:
    """One evaluation prompt with its instructions; kwargs are cleaned (no None values)."""

    key: str
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    messages: list[dict[str, str]]


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value.strip()[:1] in ("{", "["):
        return json.loads(value)
    return value


def _messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt is either plain text or a chat (possibly serialised as a JSON string)."""
    if isinstance(prompt, str):
        try:
            chat = json.loads(prompt) if prompt.lstrip().startswith("[") else None
        except ValueError:
            chat = None
        if not (isinstance(chat, list) and chat and all(isinstance(m, Mapping) for m in chat)):
            return [{"role": "user", "content": prompt}]
        prompt = chat
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def _parse_record(row: Mapping[str, Any], index: int, source: Path) -> IFEvalRecord:
    """Accept the original flat layout and the veRL layout (reward_model.ground_truth)."""
    spec: Any = row
    if "instruction_id_list" not in row:
        reward_model = _maybe_json(row.get("reward_model"))
        truth = _maybe_json(reward_model.get("ground_truth")) if reward_model else None
        if not isinstance(truth, Mapping) or "instruction_id_list" not in truth:
            raise ValueError(
                f"{source}: record {index} has no instruction_id_list (expected IFEval fields "
                "key/prompt/instruction_id_list/kwargs or reward_model.ground_truth)"
            )
        spec = truth
    extra = _maybe_json(row.get("extra_info"))
    key = row.get("key")
    if key is None and isinstance(extra, Mapping):
        key = extra.get("index")
    key = str(index if key is None else key)
    ids = [str(iid) for iid in spec["instruction_id_list"]]
    raw_kwargs = _maybe_json(spec.get("kwargs"))
    raw_kwargs = [None] * len(ids) if raw_kwargs is None else list(raw_kwargs)
    if len(raw_kwargs) != len(ids):
        raise ValueError(
            f"{source}: record {key} has {len(ids)} instruction ids but {len(raw_kwargs)} kwargs"
        )
    kwargs = [clean_kwargs(kw) for kw in raw_kwargs]
    messages = _messages(row.get("prompt", spec.get("prompt", "")))
    users = [m["content"] for m in messages if m["role"] == "user"]
    text = users[-1] if users else str(spec.get("prompt", ""))
    for iid, kw in zip(ids, kwargs, strict=True):
        try:
            describe_instruction(iid, kw)  # validates the id and its kwargs now, not mid-run
        except ValueError as exc:
            raise ValueError(f"{source}: record {key}: {exc}") from exc
    return IFEvalRecord(key, text, ids, kwargs, messages)


def load_ifeval_records(path: str | Path) -> list[IFEvalRecord]:
    """Read IFEval records from any file `resd.envs.loading.load_rows` reads (parquet,
    JSON lines, a .json list, ...).

    kwargs may be dicts padded with None (as in the released data), JSON strings, or a
    JSON string holding the whole list; unknown instruction ids fail here, naming the id.
    """
    source = Path(path)
    return [_parse_record(row, i, source) for i, row in enumerate(load_rows(source).records)]


def _record_item(record: IFEvalRecord, source: str) -> Item:
    return Item(
        id=f"ifeval/{record.key}",
        messages=record.messages,
        meta={
            "instruction_id_list": record.instruction_id_list,
            "kwargs": record.kwargs,
            "key": record.key,
            "source": source,
        },
    )


# ------------------------------------------------------------------------ environment


def strip_think(response: str) -> str:
    """Drop reasoning so only the answer is judged.

    Text after the last </think> is the answer (this also covers chat templates that
    open the block inside the prompt); an unterminated <think> means no answer yet.
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].strip()
    if "<think>" in response:
        return response.split("<think>", 1)[0].strip()
    return response


def format_feedback(
    results: Sequence[InstructionResult], kwargs: Sequence[Mapping[str, Any] | None]
) -> str:
    """One line per violated instruction: what it asks and what was measured."""
    failed = [(r, kw) for r, kw in zip(results, kwargs, strict=True) if not r.ok]
    if not failed:
        return f"All {len(results)} instructions followed."
    lines = [f"Followed {len(results) - len(failed)} of {len(results)} instructions. Violated:"]
    for result, kw in failed:
        what = describe_instruction(result.instruction_id, kw)
        lines.append(f"- {result.instruction_id} ({what}): {result.message}")
    return "\n".join(lines)


class IFEvalEnv(Environment):
    """IFEval-style instruction following with per-instruction feedback.

    reward is 1 only when every instruction passes; score is the fraction passed.
    Train prompts are always generated; test prompts are generated from held-out
    topics, or read from `path` (IFEval records in parquet or JSON lines).
    """

    name = "ifeval"
    description = "IFEval-style verifiable instruction following (25 instruction types)"

    def __init__(
        self,
        seed: int = 0,
        n_train: int = 256,
        n_test: int = 64,
        path: str | None = None,
        strict: bool = True,
        max_constraints: int = 3,
        references: bool = True,
    ) -> None:
        if n_train < 0 or n_test < 0:
            raise ValueError("env_args.n_train and env_args.n_test must be >= 0")
        if not 1 <= max_constraints <= 3:
            raise ValueError(f"env_args.max_constraints: must be 1, 2 or 3, got {max_constraints}")
        self.seed, self.n_train, self.n_test = seed, n_train, n_test
        self.strict, self.max_constraints, self.references = strict, max_constraints, references
        self.path = path
        # Read the file now so that a bad path or record fails at construction time.
        self._test: list[Item] | None = None
        if path is not None:
            records = load_ifeval_records(path)
            self._test = [_record_item(record, Path(path).name) for record in records]
        self._train: list[Item] | None = None

    def train_items(self) -> list[Item]:
        if self._train is None:
            self._train = generate_items(
                self.n_train, self.seed, "train", self.max_constraints, self.references
            )
        return self._train

    def test_items(self) -> list[Item]:
        if self._test is None:
            self._test = generate_items(
                self.n_test, self.seed, "test", self.max_constraints, self.references
            )
        return self._test

    def score(self, item: Item, response: str) -> Score:
        answer = strip_think(response)
        ids = item.meta["instruction_id_list"]
        kwargs = item.meta.get("kwargs") or [None] * len(ids)
        results = evaluate_instructions(ids, kwargs, answer, item.prompt_text, self.strict)
        if not results:
            return Score(1.0, 1.0, "No instructions to check.")
        passed = sum(result.ok for result in results)
        feedback = format_feedback(results, kwargs)
        if not answer.strip():
            feedback = "The response is empty (nothing outside <think>...</think>).\n" + feedback
        return Score(float(passed == len(results)), passed / len(results), feedback)
