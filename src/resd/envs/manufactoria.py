"""Manufactoria: the paper's main task (RL-Grok's tape-routing "robot factory" DSL).

The model writes a program: a graph of nodes that routes a robot carrying a tape of
colours (R, B, Y, G). Pullers read and remove the front symbol, painters append to the
back, so the tape is a queue and the machine is a queue automaton. A problem is a
description plus test tapes; the reward is 1 only if every test passes.

What matters for RESD is the feedback: for the two shortest failing tests it shows the
input, the actual and expected results and a debug block (last 15 nodes, rejection
reason, loop node, front symbol), which is what the teacher and the reflector learn from.

Layout of this module: answer extraction, scoring and feedback (`score_response`), the
JSON-lines loader, and `ManufactoriaEnv`. The parser and interpreter (`parse`, `run`) are
in `manufactoria_dsl`; problems and reference solutions are generated in
`manufactoria_problems`. Both are re-exported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, split_items, whole_number
from resd.envs.loading import load_rows
from resd.envs.manufactoria_dsl import (
    LOOP_REASON,
    MAX_VISITS,
    NODE_KINDS,
    NONE,
    PAINT_COLOR,
    PULLER_BRANCHES,
    TAPE_SYMBOLS,
    Node,
    ParseError,
    Program,
    RunResult,
    parse,
    run,
)
from resd.envs.manufactoria_problems import (
    FAMILIES,
    LEVELS,
    Problem,
    TestCase,
    generate_problems,
)

FEEDBACK_LIMIT = 2000
MAX_FAILURES_SHOWN = 2
TRACE_TAIL = 15


# --------------------------------------------------------------------------- answers

NO_PROGRAM_MESSAGE = (
    "No program found in your answer. Put your complete program in a fenced code block "
    "that starts with a line ```manufactoria and ends with a line ```."
)
TRUNCATED_MESSAGE = (
    "Your answer looks truncated: {detail}, so there was no complete program to test. "
    "Keep the reasoning shorter and finish with the whole program in a ```manufactoria "
    "code block closed by ```."
)
_FENCE_OPEN_RE = re.compile(r"\s*```+\s*([\w+-]*)\s*")
_FENCE_CLOSE_RE = re.compile(r"\s*```+\s*")


@dataclass
class Extraction:
    """The program text found in a response, or why none was found (`error`)."""

    program: str | None
    error: str = ""


def extract_program(response: str) -> Extraction:
    """Find the program the way the release did: a ```manufactoria block, else the last block.

    Reasoning is dropped first (everything up to the last </think>, which also covers
    chat templates that open the think block in the prompt), so that draft programs
    inside the reasoning are not graded. The last manufactoria block wins because models
    revise; an unclosed fence with nothing complete before it means a cut-off answer.
    """
    text = response
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        detail = "the reasoning (<think> block) never finished"
        return Extraction(None, TRUNCATED_MESSAGE.format(detail=detail))
    blocks: list[tuple[str, str]] = []
    open_lang: str | None = None
    body: list[str] = []
    for line in text.splitlines():
        if open_lang is None:
            match = _FENCE_OPEN_RE.fullmatch(line)
            if match:
                open_lang, body = match.group(1).lower(), []
        elif _FENCE_CLOSE_RE.fullmatch(line):
            blocks.append((open_lang, "\n".join(body)))
            open_lang = None
        else:
            body.append(line)
    tagged = [code for lang, code in blocks if lang == "manufactoria"]
    if tagged:
        return Extraction(tagged[-1])
    if open_lang is not None:
        detail = "the last code block was opened with ``` but never closed"
        return Extraction(None, TRUNCATED_MESSAGE.format(detail=detail))
    if blocks:
        return Extraction(blocks[-1][1])
    return Extraction(None, NO_PROGRAM_MESSAGE)


# --------------------------------------------------------------------------- scoring


@dataclass
class TestOutcome:
    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    index: int
    test: TestCase
    result: RunResult
    passed: bool

    @property
    def infinite_loop(self) -> bool:
        return self.result.loop_node is not None


def check_test(program: Program, test: TestCase, index: int = 0) -> TestOutcome:
    """A pass needs the right verdict and, for transformations, the exact final tape."""
    result = program.run(test.input)
    passed = result.accepted == test.expected_accepted
    if passed and test.check_output and test.expected_accepted:
        passed = result.tape == test.expected_output
    return TestOutcome(index, test, result, passed)


def score_program(program_text: str, tests: Sequence[TestCase]) -> Score:
    """Reward 1 iff all tests pass; score = fraction passed; feedback only on failure."""
    if not tests:
        return Score(0.0, 0.0, "This problem has no test cases, so nothing could be checked.")
    try:
        program = parse(program_text)
    except ParseError as err:
        return Score(0.0, 0.0, _parse_feedback(err, program_text, len(tests)))
    outcomes = [check_test(program, test, i) for i, test in enumerate(tests)]
    passed = sum(o.passed for o in outcomes)
    if passed == len(outcomes):
        return Score(1.0, 1.0, "")
    return Score(0.0, passed / len(outcomes), failure_feedback(outcomes))


def score_response(response: str, tests: Sequence[TestCase]) -> Score:
    extraction = extract_program(response)
    if extraction.program is None:
        return Score(0.0, 0.0, extraction.error)
    return score_program(extraction.program, tests)


def failure_feedback(outcomes: Sequence[TestOutcome]) -> str:
    """Describe at most two failing tests: infinite loops first, then the shortest inputs.

    Loops come first because they are runtime errors that the model cannot see from a
    plain "rejected"; short inputs come next because they are the easiest to trace by
    hand. The text is capped so that it fits the teacher and reflector prompts.
    """
    failing = [o for o in outcomes if not o.passed]
    failing.sort(key=lambda o: (not o.infinite_loop, len(o.test.input), o.index))
    shown = failing[:MAX_FAILURES_SHOWN]
    passed = len(outcomes) - len(failing)
    order = (
        "infinite loops first, then the shortest inputs"
        if shown[0].infinite_loop
        else "the shortest inputs"
    )
    header = (
        f"Passed {passed}/{len(outcomes)} tests. {len(failing)} failed; "
        f"showing {len(shown)} ({order}):"
    )
    blocks = [header] + [_failure_block(o) for o in shown]
    return _cap("\n\n".join(blocks))


def _failure_block(outcome: TestOutcome) -> str:
    test, result = outcome.test, outcome.result
    wants_tape = test.check_output and test.expected_accepted
    trace = " -> ".join(result.path[-TRACE_TAIL:])
    if len(result.path) > TRACE_TAIL:
        trace = "... -> " + trace
    if not result.accepted and result.loop_node is None:
        trace += " -> NONE"
    shown_nodes = min(TRACE_TAIL, len(result.path))
    lines = [
        f"Input: {_show_tape(test.input)}",
        f"  Actual:   {_verdict(result.accepted, result.tape, wants_tape)}",
        f"  Expected: {_verdict(test.expected_accepted, test.expected_output, wants_tape)}",
        "  Debug:",
        f"    last {shown_nodes} of {len(result.path)} visited nodes: {trace}",
    ]
    if not result.accepted:
        lines.append(f"    rejection reason: {result.reason}")
        if result.loop_node is not None:
            lines.append(f"    infinite loop detected at node: {result.loop_node}")
        lines.append(f"    front tape symbol at rejection: {result.front_symbol or '(tape empty)'}")
        lines.append(f"    tape at rejection: {_show_tape(result.tape)}")
    return "\n".join(lines)


def _verdict(accepted: bool, tape: str, with_tape: bool) -> str:
    if not accepted:
        return "rejected"
    return f"accepted, final tape {_show_tape(tape)}" if with_tape else "accepted"


def _show_tape(tape: str) -> str:
    return tape if tape else "(empty tape)"


def _parse_feedback(err: ParseError, source: str, n_tests: int) -> str:
    lines = source.splitlines()
    text = f"Parse error on line {err.line}: {err.message}"
    if 1 <= err.line <= len(lines):
        text += f"\n  {err.line} | {lines[err.line - 1].strip()}"
    text += f"\nThe program could not run, so all {n_tests} tests failed."
    return _cap(text)


def _cap(text: str) -> str:
    if len(text) <= FEEDBACK_LIMIT:
        return text
    marker = "\n... (feedback truncated)"
    return text[: FEEDBACK_LIMIT - len(marker)] + marker


# --------------------------------------------------------------------------- data files


def load_problems(path: str | Path) -> list[Problem]:
    """Read problems in the public data set's JSON-lines schema (or any file
    `resd.envs.loading.load_rows` reads with the same columns).

    Each line: `name`, `description`, `test_cases` (a list, or a JSON string holding
    one, as some hub exports do) of {input, expected_output, expected_accepted,
    check_output}; optional `solution`, `family`, `level`. Errors name the line so a bad
    file is easy to fix.
    """
    rows = load_rows(path)  # JSON lines here; parquet and the rest through `datasets`
    problems: list[Problem] = []
    names: set[str] = set()
    for i, data in enumerate(rows.records):
        where = rows.where(i)
        problem = _problem_from_dict(data, where)
        if problem.name in names:
            raise ValueError(f"{where}: duplicate problem name {problem.name!r}")
        names.add(problem.name)
        problems.append(problem)
    return problems


def _problem_from_dict(data: Any, where: str) -> Problem:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    missing = [k for k in ("name", "description", "test_cases") if data.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    raw_tests = data["test_cases"]
    if isinstance(raw_tests, str):
        raw_tests = json.loads(raw_tests)
    try:
        tests = [TestCase.from_dict(t) for t in raw_tests]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where}: malformed test case: {exc!r}") from exc
    if not tests:
        raise ValueError(f"{where}: problem {data['name']!r} has no test cases")
    used = set().union(*(set(t.input) | set(t.expected_output) for t in tests))
    if used - set(TAPE_SYMBOLS):
        raise ValueError(f"{where}: tapes may only hold R, B, Y, G; found {sorted(used)}")
    return Problem(
        name=str(data["name"]),
        description=str(data["description"]),
        test_cases=tests,
        solution=data.get("solution") or None,
        family=str(data.get("family") or ""),
        level=int(data.get("level") or 0),
        colors="RBYG" if used & {"Y", "G"} else "RB",
    )


def save_problems(problems: Sequence[Problem], path: str | Path) -> None:
    """Write problems in the same schema `load_problems` reads (e.g. to freeze a split)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.to_dict()) + "\n")


# --------------------------------------------------------------------------- environment

SYSTEM_PROMPT = """\
You write programs for Manufactoria, a robot factory. A robot carries a tape of colours \
(R red, B blue, Y yellow, G green) through a graph of nodes. Each node is a header line \
followed by its own lines:

START start:          entry point; the id must be start
    NEXT <id>
END end               accept; the id must be end; no colon
PULLER_RB <id>:       if the FRONT symbol is R or B, REMOVE it and follow that branch;
    [R] <id>          if the tape is empty or starts with Y or G, follow [EMPTY]
    [B] <id>          and remove nothing
    [EMPTY] <id>
PULLER_YG <id>:       the same for Y and G, with branches [Y], [G], [EMPTY]
PAINTER_RED <id>:     APPEND R to the BACK of the tape, then go to NEXT
    NEXT <id>         (likewise PAINTER_BLUE, PAINTER_YELLOW, PAINTER_GREEN)

Rules: a branch that is not written goes to NONE, which rejects; NONE may also be \
written as a target. The robot accepts on reaching end and rejects at NONE or after \
1000 node visits (infinite loop). Ids use letters, digits and _; # starts a comment; \
indentation is free. Problems either accept/reject tapes or transform them (then the \
final tape must match exactly).

Example (accept iff the tape starts with R):
```manufactoria
START start:
    NEXT first

# B and EMPTY are not written, so they go to NONE and reject
PULLER_RB first:
    [R] end

END end
```"""

USER_SUFFIX = (
    "Write a Manufactoria program that solves this problem. Put the complete program in a "
    "single ```manufactoria code block."
)


def problem_to_item(problem: Problem) -> Item:
    """Items carry the tests in `meta` so scoring needs nothing but the item itself."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{problem.description}\n\n{USER_SUFFIX}"},
    ]
    meta = {
        "name": problem.name,
        "family": problem.family,
        "level": problem.level,
        "colors": problem.colors,
        "test_cases": [t.to_dict() for t in problem.test_cases],
    }
    reference = _fenced(problem.solution) if problem.solution else None
    return Item(f"manufactoria/{problem.name}", messages, meta, reference)


def _fenced(solution: str) -> str:
    if "```" in solution:
        return solution
    return f"```manufactoria\n{solution.strip()}\n```"


class ManufactoriaEnv(Environment):
    """Manufactoria problems, generated from a seed or loaded from a JSON-lines file.

    Splits are deterministic for a seed. `n_train` / `n_test` cut the split to size; when
    they are given without `n_per_level`, enough problems are generated to fill them
    (as far as the chosen families and levels have distinct problems). With `path`,
    `families` keeps problems whose `family` field or name prefix matches.
    """

    name: ClassVar[str] = "manufactoria"
    description: ClassVar[str] = (
        "Manufactoria: write tape-routing robot-factory programs that accept, reject or "
        "transform colour tapes."
    )

    def __init__(
        self,
        seed: int = 0,
        families: Sequence[str] | str | None = None,
        levels: Sequence[int] | int | None = None,
        n_per_level: int | None = None,
        n_train: int | None = None,
        n_test: int | None = None,
        test_fraction: float = 0.15,
        path: str | None = None,
    ) -> None:
        self.seed = seed
        n_train = whole_number(n_train, "env_args.n_train")
        n_test = whole_number(n_test, "env_args.n_test")
        n_per_level = whole_number(n_per_level, "env_args.n_per_level", negative_ok=True)
        if n_per_level is not None and n_per_level < 1:  # 0 was read as the default, 10
            raise ValueError(
                f"env_args.n_per_level: expected a whole number >= 1 or null, got {n_per_level}"
            )
        if path is not None:
            problems = load_problems(path)
            if families is not None:
                wanted = [families] if isinstance(families, str) else list(families)
                problems = [p for p in problems if _matches_family(p, wanted)]
        else:
            try:
                problems = self._generate(seed, families, levels, n_per_level, n_train, n_test)
            except ValueError as exc:  # generate_problems names its argument
                raise ValueError(f"env_args.{exc}") from None
        if not problems:
            raise ValueError("manufactoria: no problems (check families, levels and path)")
        items = [problem_to_item(p) for p in problems]
        if n_test is not None:
            test_fraction = min(1.0, n_test / len(items))
        train, test = split_items(items, test_fraction, seed)
        self._train = train[:n_train] if n_train is not None else train
        self._test = test[:n_test] if n_test is not None else test

    @staticmethod
    def _generate(
        seed: int,
        families: Sequence[str] | str | None,
        levels: Sequence[int] | int | None,
        n_per_level: int | None,
        n_train: int | None,
        n_test: int | None,
    ) -> list[Problem]:
        if n_per_level is not None or (n_train is None and n_test is None):
            return generate_problems(seed, families, levels, n_per_level or 10)  # None: 10
        # Size the pool from the requested split; low levels run out of distinct
        # patterns, so keep doubling until the pool is big enough or stops growing.
        target = (n_train or 0) + (n_test or 0)
        n_families = 1 if isinstance(families, str) else len(families or FAMILIES)
        n_levels = 1 if isinstance(levels, int) else len(levels or LEVELS)
        per_level = max(1, -(-target // (n_families * n_levels)))
        problems = generate_problems(seed, families, levels, per_level)
        while len(problems) < target:
            per_level *= 2
            bigger = generate_problems(seed, families, levels, per_level)
            if len(bigger) == len(problems):
                break
            problems = bigger
        return problems

    def train_items(self) -> list[Item]:
        return list(self._train)

    def test_items(self) -> list[Item]:
        return list(self._test)

    def score(self, item: Item, response: str) -> Score:
        tests = [TestCase.from_dict(t) for t in item.meta["test_cases"]]
        return score_response(response, tests)


def _matches_family(problem: Problem, wanted: list[str]) -> bool:
    return problem.family in wanted or any(problem.name.startswith(w) for w in wanted)


__all__ = [
    "LOOP_REASON",
    "MAX_VISITS",
    "NODE_KINDS",
    "NONE",
    "PAINT_COLOR",
    "PULLER_BRANCHES",
    "TAPE_SYMBOLS",
    "Extraction",
    "ManufactoriaEnv",
    "Node",
    "ParseError",
    "Problem",
    "Program",
    "RunResult",
    "TestCase",
    "TestOutcome",
    "extract_program",
    "generate_problems",
    "load_problems",
    "parse",
    "problem_to_item",
    "run",
    "save_problems",
    "score_program",
    "score_response",
]
