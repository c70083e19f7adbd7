"""Python programming environment: the model writes a function, hidden tests judge it.

Each answer runs once in `resd.envs.sandbox` together with a small harness
(`resd.envs.code_harness`). The harness calls the function on every test case separately
(each under its own time limit), so one crashing or looping case does not hide the others,
and streams one result line per case.
The feedback then names the failing calls with expected and actual values, or the
trimmed traceback, which is what the RESD teacher and reflector need.

Two test formats are understood (for built-in problems and for JSON-lines files):

* call cases: a list of ``{"args": [...], "kwargs": {...}, "expected": ...}``
  (``kwargs`` optional). The harness only ever sees the arguments; the return value is
  sent back and compared with ``expected`` *in the trainer's process*, so the program
  cannot fake a pass by printing results. Comparison: floats with a relative tolerance
  of 1e-6, lists and tuples alike, bools distinct from ints;
* assert statements: a string of Python code (or a list of strings) such as
  ``"assert add(1, 2) == 3"``; every statement containing an assert is one case, other
  statements (imports, helpers) run first. A HumanEval-style ``def check(candidate)``
  is unpacked: each assert in its body is a case and ``candidate`` is the entry point.
  A one-line assert (``A == B``, other single comparisons, ``E``, ``not E``) is judged
  here on the shipped operand values, and literal operands never enter the sandbox;
  any other assert still gets its verdict from inside the sandbox, where the program
  can forge it (see `_assert_plan` and docs/environments.md), so prefer call cases
  when training against a policy that might learn to cheat.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, split_items, whole_number
from resd.envs.code_harness import (
    HARNESS,
    assert_compare,
    assert_truth,
    decode_value,
    values_match,
)
from resd.envs.loading import Rows, load_rows
from resd.envs.sandbox import SandboxResult, run_python
from resd.templating import strip_thinking

__all__ = ["CodeEnv", "extract_code", "load_problems", "normalize_tests", "values_match"]


# ---------------------------------------------------------------------------------------
# Extraction and test formats

_FENCE = re.compile(r"^\s*```+\s*([\w+#.-]*)")
_PY_LANGS = {"python", "py", "python3", "py3"}


def extract_code(response: str) -> str | None:
    """The last ```python fenced block of `response` (reasoning in <think> removed).

    A bare ``` block is used when there is no python-tagged one; an unclosed final
    block (the model ran out of tokens) counts, so the feedback can point at the syntax
    error instead of only saying that no code was found.
    """
    text = strip_thinking(response)
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        m = _FENCE.match(line)
        if current is None:
            if m:
                current = []
                blocks.append((m.group(1).lower(), current))
        elif m and not m.group(1):
            current = None
        else:
            current.append(line)
    tagged = [body for lang, body in blocks if lang in _PY_LANGS]
    bare = [body for lang, body in blocks if not lang]
    chosen = tagged or bare
    if not chosen:
        return None
    code = "\n".join(chosen[-1]).strip("\n")
    return code + "\n" if code.strip() else None


_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)


def _split_assert_source(source: str) -> tuple[str, list[str]]:
    """Turn assert-style test code into (prologue, one source per case)."""
    tree = ast.parse(source)
    prologue: list[ast.stmt] = []
    cases: list[str] = []

    def classify(stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            defines = isinstance(stmt, _DEFINITIONS)
            if not defines and any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
                cases.append(ast.unparse(stmt))
            else:
                prologue.append(stmt)

    check = next(
        (
            s
            for s in tree.body
            if isinstance(s, ast.FunctionDef) and s.name == "check" and len(s.args.args) == 1
        ),
        None,
    )
    if check is not None:
        param = check.args.args[0].arg
        for stmt in tree.body:
            is_check_call = (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name)
                and stmt.value.func.id == "check"
            )
            if stmt is not check and not is_check_call:
                prologue.append(stmt)
        prologue.append(ast.parse(f"{param} = __resd_entry__").body[0])
        classify(check.body)
    else:
        classify(tree.body)
    return "\n".join(ast.unparse(s) for s in prologue), cases


def normalize_tests(tests: Any) -> tuple[str, list[dict[str, Any]]]:
    """Validate a problem's tests; return (prologue, cases) as stored in `Item.meta`.

    Accepts a list of ``{"args", "kwargs"?, "expected"}`` dicts, or assert code as a
    string or a list of strings.
    """
    if isinstance(tests, str):
        tests = [tests]
    if not isinstance(tests, list) or not tests:
        raise ValueError("tests must be a non-empty list of cases or a string of asserts")
    if all(isinstance(t, str) for t in tests):
        prologue, sources = _split_assert_source("\n".join(tests))
        if not sources:
            raise ValueError("tests: the assert code contains no assert statement")
        return prologue, [{"assert": s} for s in sources]
    cases = []
    for k, t in enumerate(tests):
        if not isinstance(t, dict) or "expected" not in t:
            raise ValueError(f"tests[{k}]: expected a dict with 'args' and 'expected'")
        args = t.get("args", [])
        kwargs = t.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError(f"tests[{k}]: 'args' must be a list and 'kwargs' a dict")
        cases.append({"args": list(args), "kwargs": dict(kwargs), "expected": t["expected"]})
    return "", cases


def _row_name(rows: Rows, i: int) -> str:
    """A name for a problem without an id: its line in JSON lines, its row otherwise."""
    return f"line{rows.lines[i]}" if rows.lines is not None else f"row{i}"


def load_problems(path: str | Path) -> list[dict[str, Any]]:
    """Read problems, one ``{"prompt", "tests", "entry_point"}`` per row.

    Any file `resd.envs.loading.load_rows` reads will do (JSON lines, parquet, csv, ...).
    Optional keys: ``id``/``name``, ``difficulty``, ``reference`` (a solution, used as
    `Item.reference`). In JSON lines, blank lines and lines starting with ``#`` are skipped.
    """
    rows = load_rows(path, required=("prompt", "tests", "entry_point"))
    problems = []
    for i, rec in enumerate(rows.records):
        where = rows.where(i)
        try:
            prologue, cases = normalize_tests(rec["tests"])
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        name = rec.get("id") if rec.get("id") is not None else rec.get("name")
        solution = rec.get("reference") if rec.get("reference") is not None else rec.get("solution")
        problems.append(
            {
                "name": str(name if name is not None else _row_name(rows, i)),
                "difficulty": rec.get("difficulty"),
                "prompt": rec["prompt"],
                "entry_point": rec["entry_point"],
                "solution": solution,
                "prologue": prologue,
                "cases": cases,
            }
        )
    if not problems:
        raise ValueError(f"{path}: no problems found")
    return problems


# ---------------------------------------------------------------------------------------
# The environment

_INSTRUCTIONS = (
    "Reply with the complete solution in a single ```python code block. Use only the "
    "standard library. The function `{entry}` is called directly by the tests, so do not "
    "read input or print the result."
)

_NO_CODE = (
    "No code block found in the response. Put the complete solution, defining "
    "`{entry}`, in one fenced block that starts with ```python and ends with ```."
)


def _operand(node: ast.expr) -> dict[str, Any]:
    """A literal stays in the trainer's process; anything else is evaluated in the sandbox."""
    try:
        return {"const": ast.literal_eval(node)}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return {"src": ast.unparse(node)}


def _assert_plan(source: str) -> dict[str, Any] | None:
    """How to judge a one-line ``assert`` outside the sandbox, or None if it cannot be.

    ``assert A <op> B``, ``assert E`` and ``assert not ...`` are split into operands:
    the sandbox only evaluates the non-literal ones and ships their values, and the
    verdict is reached here on the decoded (plain) values. So the program cannot answer
    with an object whose ``__eq__`` always says yes, and forging result lines needs the
    expected values, which never enter the sandbox when they are literals.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test, negate = tree.body[0].test, False
    while isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test, negate = test.operand, not negate
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        operands = [_operand(test.left), _operand(test.comparators[0])]
        return {"op": type(test.ops[0]).__name__, "operands": operands, "negate": negate}
    return {"op": "truth", "operands": [_operand(test)], "negate": negate}


def _judge_plan(plan: dict[str, Any], values: Any) -> dict[str, Any]:
    """The verdict on an assert from the values the sandbox shipped (see `_assert_plan`)."""
    wanted = sum("src" in o for o in plan["operands"])
    if not isinstance(values, list) or len(values) != wanted:
        return {"passed": False, "status": "error", "error": "malformed result"}
    shipped = iter(values)
    operands = [
        o["const"] if "const" in o else decode_value(next(shipped)) for o in plan["operands"]
    ]
    if plan["op"] == "truth":
        truth = assert_truth(operands[0])
        passed = truth is not None and truth != plan["negate"]
    else:
        passed = assert_compare(plan["op"], *operands) != plan["negate"]
    out: dict[str, Any] = {"passed": passed, "status": "passed" if passed else "failed"}
    if plan["op"] == "Eq" and not plan["negate"]:
        got, expected = operands
        if "const" in plan["operands"][0] and "src" in plan["operands"][1]:
            got, expected = expected, got
        out.update(got=got, expected=expected)
    elif not passed:
        shown = ", ".join(_short(repr(v), 100) for v in operands)
        out["error"] = "AssertionError" if plan["op"] == "truth" else f"AssertionError ({shown})"
    return out


# The interpreter plus the harness need about 24 MB of address space; the margin covers
# other Python builds and the solution's own modules.
_MIN_MEMORY_MB = 64


def _short(text: str, limit: int = 300) -> str:
    """`text`, or its head and its length in at most `limit` characters: the suffix is
    sized first, since a length of four digits or more needs more room than three."""
    if len(text) <= limit:
        return text
    suffix = f"... ({len(text)} chars)"
    return text[: limit - len(suffix)] + suffix


def _call_text(entry: str, case: dict[str, Any]) -> str:
    if "assert" in case:
        return _short(case["assert"])
    parts = [repr(a) for a in case.get("args", [])]
    parts += [f"{k}={v!r}" for k, v in case.get("kwargs", {}).items()]
    return _short(f"{entry}({', '.join(parts)})")


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


class CodeEnv(Environment):
    """Write a Python function that passes unit tests (built-in problems or a JSONL file).

    Args:
        path: JSON-lines problems (see `load_problems`); None for the built-in set.
        seed, test_fraction: deterministic train/test split (`split_items`).
        timeout_s: wall-clock budget for running all tests of one answer.
        memory_mb: memory (address-space) limit of the sandbox; at least 64.
        difficulty: keep only these built-in difficulties ("easy", "medium", "hard";
            a string or a list).
        case_timeout_s: limit per test case (default timeout_s / 4), so that one
            looping case leaves time for the others.
        max_feedback_cases: how many failing cases the feedback details.
        max_feedback_chars: cap on the feedback text.
    """

    name: ClassVar[str] = "code"
    description: ClassVar[str] = "Python functions checked by unit tests in a sandbox"

    def __init__(
        self,
        path: str | None = None,
        seed: int = 0,
        test_fraction: float = 0.25,
        timeout_s: float = 5,
        memory_mb: int = 512,
        difficulty: str | Sequence[str] | None = None,
        case_timeout_s: float | None = None,
        max_feedback_cases: int = 3,
        max_feedback_chars: int = 2500,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        # `is None`, not `or`: a limit of 0 was read as the default
        self.case_timeout_s = float(
            self.timeout_s / 4 if case_timeout_s is None else case_timeout_s
        )
        # Checked here, not at the first score: a bad value would otherwise turn every
        # answer into a zero reward with feedback about the harness, not the code.
        if not self.timeout_s > 0:
            raise ValueError(f"env_args.timeout_s must be > 0, got {timeout_s!r}")
        if not self.case_timeout_s > 0:
            raise ValueError(f"env_args.case_timeout_s must be > 0, got {case_timeout_s!r}")
        if self.memory_mb < _MIN_MEMORY_MB:
            raise ValueError(
                f"env_args.memory_mb must be at least {_MIN_MEMORY_MB} (the interpreter and "
                f"the test harness need that much), got {memory_mb!r}"
            )
        # -1 sliced the last failing case off the feedback (and counted one case too many)
        self.max_feedback_cases = whole_number(max_feedback_cases, "env_args.max_feedback_cases")
        self.max_feedback_chars = whole_number(max_feedback_chars, "env_args.max_feedback_chars")
        if path is None:
            from resd.envs.code_problems import builtin_problems

            problems = builtin_problems()
        else:
            problems = load_problems(path)
        if difficulty is not None:
            wanted = {difficulty} if isinstance(difficulty, str) else set(difficulty)
            problems = [p for p in problems if p["difficulty"] in wanted]
            if not problems:
                raise ValueError(f"env_args.difficulty: no problems with difficulty {wanted}")
        self._items = [self._make_item(p) for p in problems]
        self._train, self._test = split_items(self._items, test_fraction, seed)

    @staticmethod
    def _make_item(problem: dict[str, Any]) -> Item:
        entry = problem["entry_point"]
        prompt = f"{problem['prompt'].rstrip()}\n\n{_INSTRUCTIONS.format(entry=entry)}"
        solution = problem.get("solution")
        return Item(
            id=f"code/{problem['name']}",
            messages=[{"role": "user", "content": prompt}],
            meta={
                "name": problem["name"],
                "difficulty": problem.get("difficulty"),
                "entry_point": entry,
                "prologue": problem.get("prologue", ""),
                "tests": problem["cases"],
            },
            reference=f"```python\n{solution.strip()}\n```" if solution else None,
        )

    def train_items(self) -> list[Item]:
        return list(self._train)

    def test_items(self) -> list[Item]:
        return list(self._test)

    # -- scoring ------------------------------------------------------------------------

    def run_tests(self, code: str, meta: dict[str, Any]) -> tuple[list[dict], SandboxResult]:
        """Run the harness on `code`; return one outcome per case plus the raw run.

        Each outcome has ``passed`` (bool) and ``status``: "passed", "failed" (wrong
        value or assertion), "error", "timeout" (the case's own limit), "died" (the
        process ended or was killed during the case), "not_run" or "load_error", with
        the details the feedback needs.
        """
        cases = meta["tests"]
        plans = [_assert_plan(c["assert"]) if "assert" in c else None for c in cases]
        child_cases = [
            {"eval": [o["src"] for o in plan["operands"] if "src" in o]}
            if plan is not None
            else {k: v for k, v in case.items() if k != "expected"}
            for case, plan in zip(cases, plans, strict=True)
        ]
        marker = f"@@resd-case-{secrets.token_hex(8)}@@"
        config = {
            "marker": marker,
            "entry_point": meta["entry_point"],
            "prologue": meta.get("prologue", ""),
            "cases": child_cases,
            "budget_s": self.timeout_s,
            "case_timeout_s": self.case_timeout_s,
        }
        result = run_python(
            HARNESS,
            files={"solution.py": code, "resd_cases.json": json.dumps(config)},
            timeout_s=self.timeout_s + 1.0,  # + interpreter start; the harness keeps time
            memory_mb=self.memory_mb,
            max_output_bytes=2_000_000,
        )
        records: dict[int, dict] = {}
        stage: dict | None = None
        started = -1
        for line in result.stdout.splitlines():
            if not line.startswith(marker + " "):
                continue
            try:
                rec = json.loads(line[len(marker) + 1 :])
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            if "i" in rec and "stage" not in rec:
                records[rec["i"]] = rec
            elif rec.get("stage") == "start":
                started = rec["i"]
            elif rec.get("stage") != "done":
                stage = rec
        outcomes = []
        for i, case in enumerate(cases):
            rec = records.get(i)
            if rec is None and i == started and stage is None:
                # the case that was running when the process died
                why = "killed" if result.timed_out else result.describe()
                rec = {"status": "died", "reason": why}
            outcomes.append(self._judge(case, rec, stage, result, plans[i]))
        return outcomes, result

    def _judge(
        self,
        case: dict,
        rec: dict | None,
        stage: dict | None,
        result: SandboxResult,
        plan: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if rec is None:
            if stage is not None and stage.get("stage") in ("load", "prologue"):
                return {"passed": False, "status": "load_error", "stage": stage}
            if stage is not None and stage.get("stage") == "budget":
                why = f"the time budget of {self.timeout_s:g} s for all tests was used up"
            elif result.timed_out:
                why = f"the program was killed after {self.timeout_s:g} s"
            else:
                why = f"the program ended ({result.describe()}) before reaching them"
                if result.stderr.strip():
                    why += ":\n" + _short(result.stderr.strip()[-600:], 600)
            return {"passed": False, "status": "not_run", "reason": why}
        out: dict[str, Any] = {"output": rec.get("output", ""), "time_s": rec.get("time_s")}
        status = rec.get("status")
        if status == "timeout":
            return {**out, "passed": False, "status": "timeout"}
        if status == "died":
            return {**out, "passed": False, "status": "died", "reason": rec["reason"]}
        if status == "error":
            return {**out, "passed": False, "status": "error", **_pick(rec, "error", "traceback")}
        if status == "failed":  # an assert statement that is not `a == b`
            return {**out, "passed": False, "status": "failed", **_pick(rec, "error")}
        if plan is not None:
            return {**out, **_judge_plan(plan, rec.get("values"))}
        if "assert" in case:
            passed = bool(rec.get("passed"))
            if "got" in rec:
                out["got"] = decode_value(rec["got"])
                out["expected"] = decode_value(rec["expected"])
        else:
            out["got"] = decode_value(rec.get("got"))
            out["expected"] = case["expected"]
            passed = values_match(case["expected"], out["got"])
        return {**out, "passed": passed, "status": "passed" if passed else "failed"}

    def score(self, item: Item, response: str) -> Score:
        meta = item.meta
        entry = meta["entry_point"]
        code = extract_code(response)
        if code is None:
            return Score(0.0, 0.0, _NO_CODE.format(entry=entry))
        outcomes, _result = self.run_tests(code, meta)
        n = len(outcomes)
        n_pass = sum(o["passed"] for o in outcomes)
        if n_pass == n:
            return Score(1.0, 1.0, f"All {n} tests passed.")
        return Score(0.0, n_pass / n, self._feedback(meta, outcomes))

    # -- feedback -----------------------------------------------------------------------

    def _feedback(self, meta: dict, outcomes: list[dict]) -> str:
        entry = meta["entry_point"]
        cases = meta["tests"]
        n = len(outcomes)
        n_pass = sum(o["passed"] for o in outcomes)
        lines = [f"Passed {n_pass}/{n} tests."]
        load_errors = [o for o in outcomes if o["status"] == "load_error"]
        if load_errors:
            lines.append(self._load_error_text(entry, load_errors[0]["stage"]))
            return self._cap("\n".join(lines))
        failing = [(i, o) for i, o in enumerate(outcomes) if not o["passed"]]
        shown = [(i, o) for i, o in failing if o["status"] != "not_run"]
        not_run = [(i, o) for i, o in failing if o["status"] == "not_run"]
        seen_tracebacks: dict[str, int] = {}
        for i, o in shown[: self.max_feedback_cases]:
            lines.append(self._case_text(i, entry, cases[i], o, seen_tracebacks))
        if len(shown) > self.max_feedback_cases:
            lines.append(f"... and {len(shown) - self.max_feedback_cases} more failing tests.")
        if not_run:
            numbers = ", ".join(str(i + 1) for i, _ in not_run[:20])
            more = " ..." if len(not_run) > 20 else ""
            lines.append(f"Tests {numbers}{more} were not run: {not_run[0][1]['reason']}")
        return self._cap("\n".join(lines))

    def _case_text(
        self, i: int, entry: str, case: dict, o: dict, seen_tracebacks: dict[str, int]
    ) -> str:
        head = f"Test {i + 1}: {_call_text(entry, case)}"
        status = o["status"]
        if status == "timeout":
            body = f"  timed out (limit {self.case_timeout_s:g} s per test)"
        elif status == "died" and o["reason"] == "killed":
            body = f"  still running when the program was killed at the {self.timeout_s:g} s limit"
        elif status == "died":
            body = f"  the program ended ({o['reason']}) while running this test"
        elif status == "error":
            body = f"  raised {o.get('error', 'an exception')}"
            if "MemoryError" in o.get("error", ""):
                body += f" (memory limit {self.memory_mb} MB)"
            tb = o.get("traceback")
            if tb and tb in seen_tracebacks:
                body += f" (same traceback as test {seen_tracebacks[tb] + 1})"
            elif tb:
                seen_tracebacks[tb] = i
                body += "\n" + _indent(tb)
        elif "got" in o:
            body = (
                f"  expected: {_short(repr(o['expected']))}\n  got:      {_short(repr(o['got']))}"
            )
        else:
            body = f"  failed: {o.get('error', 'AssertionError')}"
        if o.get("output"):
            body += "\n  printed: " + _short(o["output"].strip(), 300)
        return f"{head}\n{body}"

    def _load_error_text(self, entry: str, rec: dict) -> str:
        stage, status = rec.get("stage"), rec.get("status")
        if status == "missing":
            defined = ", ".join(rec.get("defined", [])) or "none"
            return (
                f"The code does not define a function named `{entry}` "
                f"(functions defined: {defined})."
            )
        where = "the test setup" if stage == "prologue" else "loading the code"
        if status == "timeout":
            return f"Timed out while {where} (top-level code that never finishes?)."
        if rec.get("traceback"):
            text = f"Error while {where}:\n" + _indent(rec["traceback"])
        else:
            text = f"Error while {where}: {rec.get('error', 'unknown error')}"
        if rec.get("output"):
            text += "\n  printed: " + _short(rec["output"].strip(), 300)
        return text

    def _cap(self, text: str) -> str:
        limit, marker = self.max_feedback_chars, "\n... (truncated)"
        if len(text) <= limit:
            return text
        if limit <= len(marker):  # no room for the marker: the text's first `limit` characters
            return text[:limit]
        return text[: limit - len(marker)] + marker


def _pick(rec: dict, *keys: str) -> dict:
    return {k: rec[k] for k in keys if k in rec}
