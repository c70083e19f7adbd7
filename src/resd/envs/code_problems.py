"""Built-in problems for `CodeEnv`: small, self-checking, graded by difficulty.

The problems themselves live in ``data/code_problems.json``; this module only reads them.
Every problem has a reference solution and at least four test cases including edge cases
(empty input, single element, negative numbers, ties). All arguments and expected values
are plain JSON (lists, not tuples or sets), so items can be logged or exported as JSON
lines unchanged; problems whose natural answer is unordered ask for a sorted one.

The set is meant for smoke tests, demos and small-model runs, not as a benchmark: the
tasks are classic exercises a model may have seen, which is fine for checking that the
training loop improves per-test-case accuracy from rich feedback.

Data file layout: a JSON list of objects with ``name``, ``difficulty`` ("easy", "medium"
or "hard"), ``entry_point``, ``prompt`` (plain paragraphs), ``solution`` (a list of source
lines, so the file stays readable and diffs line by line) and ``tests`` (a list of
``{"args": [...], "expected": ...}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

__all__ = ["PROBLEMS", "CodeProblem", "builtin_problems"]

_DATA_FILE = "data/code_problems.json"
_DIFFICULTIES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class CodeProblem:
    name: str
    difficulty: str  # "easy" | "medium" | "hard"
    entry_point: str
    prompt: str
    solution: str
    tests: tuple[dict[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        """The form `CodeEnv` consumes (same as a loaded JSON-lines problem)."""
        return {
            "name": self.name,
            "difficulty": self.difficulty,
            "entry_point": self.entry_point,
            "prompt": self.prompt,
            "solution": self.solution,
            "prologue": "",
            "cases": [dict(t, kwargs={}) for t in self.tests],
        }


def _problem(record: dict[str, Any]) -> CodeProblem:
    """One record of the data file; a malformed one fails here, naming the problem."""
    name = record.get("name", "?")
    if record.get("difficulty") not in _DIFFICULTIES:
        raise ValueError(f"{_DATA_FILE}: {name}: difficulty must be one of {_DIFFICULTIES}")
    tests = tuple({"args": list(t["args"]), "expected": t["expected"]} for t in record["tests"])
    return CodeProblem(
        name=record["name"],
        difficulty=record["difficulty"],
        entry_point=record["entry_point"],
        prompt=record["prompt"],
        solution="\n".join(record["solution"]) + "\n",
        tests=tests,
    )


def _load() -> tuple[CodeProblem, ...]:
    """Read the shipped problem file; the order of the file is the order of the set."""
    text = resources.files("resd.envs").joinpath(_DATA_FILE).read_text(encoding="utf-8")
    return tuple(_problem(record) for record in json.loads(text))


PROBLEMS: tuple[CodeProblem, ...] = _load()


def builtin_problems() -> list[dict[str, Any]]:
    """All built-in problems in the dict form `CodeEnv` uses, in a fixed order."""
    return [p.as_dict() for p in PROBLEMS]
