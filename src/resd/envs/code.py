"""Python programming environment: the model writes a function, hidden tests judge it.

Each answer runs once in `resd.envs.sandbox` together with a small harness. The harness calls
the function on every test case separately (each under its own time limit), so one
crashing or looping case does not hide the others, and streams one result line per case.
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
  Here the verdict comes from inside the sandbox: the result lines carry a random
  marker, but a program that digs through the harness's frames could forge them, so
  prefer call cases when training against a policy that might learn to cheat.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from resd.envs.base import Environment, Item, Score, split_items
from resd.envs.sandbox import SandboxResult, run_python
from resd.templating import strip_thinking

__all__ = ["CodeEnv", "extract_code", "load_problems", "normalize_tests", "values_match"]

# ---------------------------------------------------------------------------------------
# Shared by the harness (child) and the scorer (parent): how return values travel as
# JSON. Non-JSON types are tagged; values too large to ship are replaced by a digest of
# their canonical encoding, which the parent recomputes from the expected value.
_CODEC = r'''
import hashlib as _hashlib, json as _json, math as _math

_MAX_VALUE_CHARS = 100_000

def _canon(v):
    return _json.dumps(v, sort_keys=True, separators=(",", ":"))

def encode_value(x, depth=0):
    if depth > 60:
        return {"$t": "repr", "v": "<nested too deeply>"}
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return int(x) if x.bit_length() < 10_000 else {"$t": "bigint", "v": hex(x)}
    if isinstance(x, float):
        return float(x) if _math.isfinite(x) else {"$t": "float", "v": repr(float(x))}
    if isinstance(x, list):
        return [encode_value(v, depth + 1) for v in x]
    if isinstance(x, tuple):
        return {"$t": "tuple", "v": [encode_value(v, depth + 1) for v in x]}
    if isinstance(x, (set, frozenset)):
        return {"$t": "set", "v": sorted((encode_value(v, depth + 1) for v in x), key=_canon)}
    if isinstance(x, dict):
        items = [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in x.items()]
        return {"$t": "dict", "v": sorted(items, key=lambda kv: _canon(kv[0]))}
    if isinstance(x, (bytes, bytearray)):
        return {"$t": "bytes", "v": bytes(x).hex()}
    if type(x).__module__ == "numpy" and hasattr(x, "tolist"):
        return encode_value(x.tolist(), depth + 1)
    if hasattr(x, "__index__"):
        return encode_value(x.__index__(), depth)
    try:
        text = repr(x)
    except Exception:
        text = "<unrepresentable %s>" % type(x).__name__
    return {"$t": "repr", "v": text[:300]}

def ship_value(x):
    """encode_value, or a digest plus a preview when the encoding is too large."""
    enc = encode_value(x)
    text = _canon(enc)
    if len(text) <= _MAX_VALUE_CHARS:
        return enc
    digest = _hashlib.sha256(text.encode()).hexdigest()
    return {"$t": "digest", "v": digest, "preview": text[:200] + "..."}
'''

# The harness: runs as the sandbox's main program, next to solution.py and cases.json.
_HARNESS = (
    _CODEC
    + r'''
import ast, io, linecache, os, signal, sys, time, traceback, types


with open("resd_cases.json", encoding="utf-8") as _f:
    CFG = _json.load(_f)
os.remove("resd_cases.json")  # the marker is not left lying around for the code to read
MARK = CFG["marker"]
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)
# A private copy of stdout: results still arrive if the code closes or redirects it.
_OUT = os.fdopen(os.dup(1), "w", encoding="utf-8")
_T0 = time.monotonic()

def emit(record):
    _OUT.write(MARK + " " + _json.dumps(record) + "\n")
    _OUT.flush()

class CaseTimeout(BaseException):
    """BaseException so that the code's own `except Exception` does not swallow it."""

_armed = [False]

def _on_alarm(signum, frame):
    if _armed[0]:
        _armed[0] = False
        raise CaseTimeout()

signal.signal(signal.SIGALRM, _on_alarm)

class Capture(io.TextIOBase):
    """Collects what the code prints, up to a limit."""
    def __init__(self, limit=2000):
        self.parts, self.size, self.limit, self.dropped = [], 0, limit, 0
    def writable(self):
        return True
    def write(self, s):
        s = str(s)
        room = self.limit - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)
    def text(self):
        out = "".join(self.parts)
        return out + ("... [%d more characters]" % self.dropped if self.dropped else "")

USER_FILES = ("solution.py", "<test>")

def describe_error(exc):
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__, capture_locals=False)
    frames = [fr for fr in te.stack if fr.filename in USER_FILES]
    hidden = max(0, len(frames) - 6)
    te.stack[:] = frames[-6:]
    tb = "".join(te.format(chain=False))
    if hidden:
        tb = "(%d earlier frames omitted)\n%s" % (hidden, tb)
    if len(tb) > 2000:
        tb = tb[:600] + "\n...\n" + tb[-1300:]
    return {"error": "".join(te.format_exception_only()).strip()[-500:], "traceback": tb}

def guarded(fn, seconds):
    """Run fn with a wall-clock limit, capturing prints. Returns a partial record."""
    cap = Capture()
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = cap
    start = time.monotonic()
    record = {}
    try:
        try:
            _armed[0] = True
            signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
            record["value"] = fn()
            _armed[0] = False
            record["status"] = "ok"
        finally:
            _armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.stdout, sys.stderr = saved
    except CaseTimeout:
        record["status"] = "timeout"
    except BaseException as exc:
        record["status"] = "error"
        record.update(describe_error(exc))
    record["time_s"] = round(time.monotonic() - start, 4)
    output = cap.text()
    if output:
        record["output"] = output
    return record

def remaining():
    return CFG["budget_s"] - (time.monotonic() - _T0)

def case_limit():
    return min(CFG["case_timeout_s"], remaining())

def register(name, source):
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)

def find_entry(module, name):
    ns = module.__dict__
    if "." in name:
        cls_name, _, meth = name.partition(".")
        cls = ns.get(cls_name)
        return getattr(cls(), meth) if isinstance(cls, type) else None
    fn = ns.get(name)
    if fn is None and isinstance(ns.get("Solution"), type) and hasattr(ns["Solution"], name):
        fn = getattr(ns["Solution"](), name)  # LeetCode style
    return fn

def load():
    with open("solution.py", encoding="utf-8") as f:
        source = f.read()
    register("solution.py", source)
    module = types.ModuleType("solution")
    module.__file__ = "solution.py"
    sys.modules["solution"] = module  # dataclasses and pickle look modules up here
    rec = guarded(lambda: exec(compile(source, "solution.py", "exec"), module.__dict__),
                  case_limit())
    if rec["status"] != "ok":
        rec.pop("value", None)
        return None, rec
    entry = None
    if CFG["entry_point"]:
        rec2 = guarded(lambda: find_entry(module, CFG["entry_point"]), case_limit())
        entry = rec2.get("value")
        if not callable(entry):
            defined = sorted(k for k, v in module.__dict__.items()
                             if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == "solution")
            return None, {"status": "missing", "defined": defined[:20]}
    return (module, entry), {"status": "ok"}

def run_call_case(entry, case):
    args, kwargs = case.get("args", []), case.get("kwargs", {})
    rec = guarded(lambda: ship_value(entry(*args, **kwargs)), case_limit())
    if "value" in rec:
        rec["got"] = rec.pop("value")
    return rec

def run_assert_case(ns, source):
    tree = ast.parse(source, "<test>")
    stmt = tree.body[0] if len(tree.body) == 1 else None
    register("<test>", source)
    test = stmt.test if isinstance(stmt, ast.Assert) else None
    if (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq)):
        left = compile(ast.Expression(test.left), "<test>", "eval")
        right = compile(ast.Expression(test.comparators[0]), "<test>", "eval")
        def check():
            got, expected = eval(left, ns), eval(right, ns)
            return [got == expected, ship_value(got), ship_value(expected)]
        rec = guarded(check, case_limit())
        if rec["status"] == "ok":
            passed, rec["got"], rec["expected"] = rec.pop("value")
            rec["passed"] = bool(passed)
        return rec
    code = compile(source, "<test>", "exec")
    rec = guarded(lambda: exec(code, ns), case_limit())
    rec.pop("value", None)
    if rec["status"] == "error" and rec["error"].startswith("AssertionError"):
        rec["status"] = "failed"
    elif rec["status"] == "ok":
        rec["passed"] = True
    return rec

def main():
    loaded, rec = load()
    if loaded is None:
        emit(dict(rec, stage="load"))
        return
    module, entry = loaded
    ns = module.__dict__
    ns["__resd_entry__"] = entry  # what `candidate` means in check()-style tests
    if CFG["prologue"]:
        register("<test>", CFG["prologue"])
        code = compile(CFG["prologue"], "<test>", "exec")
        rec = guarded(lambda: exec(code, ns), case_limit())
        if rec["status"] != "ok":
            rec.pop("value", None)
            emit(dict(rec, stage="prologue"))
            return
    for i, case in enumerate(CFG["cases"]):
        if remaining() <= 0:
            emit({"stage": "budget", "i": i})
            return
        emit({"stage": "start", "i": i})
        if "assert" in case:
            rec = run_assert_case(ns, case["assert"])
        else:
            rec = run_call_case(entry, case)
        emit(dict(rec, i=i))
    emit({"stage": "done"})

main()
'''
)

_codec_ns: dict[str, Any] = {}
exec(_CODEC, _codec_ns)
_ship_value = _codec_ns["ship_value"]
_canon = _codec_ns["_canon"]


# ---------------------------------------------------------------------------------------
# Values coming back from the harness


class _Opaque:
    """A returned object without a JSON form; only its repr survives the trip."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


class _Digest:
    """A returned value too large to ship; compared by hash of its canonical encoding."""

    def __init__(self, digest: str, preview: str) -> None:
        self.digest, self.preview = digest, preview

    def __repr__(self) -> str:
        return f"<large value {self.preview}>"


def _decode(v: Any) -> Any:
    try:
        return _decode_tagged(v)
    except (TypeError, ValueError, AttributeError):
        return _Opaque("<malformed result>")


def _decode_tagged(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode_tagged(x) for x in v]
    if not isinstance(v, dict):
        return v
    tag, payload = v.get("$t"), v.get("v")
    if tag == "tuple":
        return tuple(_decode_tagged(x) for x in payload)
    if tag == "set":
        return {_decode_tagged(x) for x in payload}
    if tag == "dict":
        return {_decode_tagged(k): _decode_tagged(x) for k, x in payload}
    if tag == "float":
        return float(payload)
    if tag == "bigint":
        return int(payload, 16)
    if tag == "bytes":
        return bytes.fromhex(payload)
    if tag == "digest":
        return _Digest(payload, v.get("preview", ""))
    return _Opaque(str(payload))


def values_match(expected: Any, got: Any) -> bool:
    """Is `got` an acceptable result for `expected`?

    Floats compare with rel. tolerance 1e-6 (abs 1e-9), NaN equals NaN; lists and tuples
    are interchangeable (JSON has no tuples); bools are not ints (True is not 1).
    """
    if isinstance(got, _Digest):
        encoded = _canon(_codec_ns["encode_value"](expected)).encode()
        return hashlib.sha256(encoded).hexdigest() == got.digest
    if isinstance(got, _Opaque):
        return False
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, float) or isinstance(got, float):
            if math.isnan(expected) and math.isnan(got):
                return True
            return math.isclose(expected, got, rel_tol=1e-6, abs_tol=1e-9)
        return expected == got
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(expected) == len(got) and all(map(values_match, expected, got))
    if isinstance(expected, dict) and isinstance(got, dict):
        return expected.keys() == got.keys() and all(
            values_match(expected[k], got[k]) for k in expected
        )
    try:
        return bool(expected == got)
    except Exception:
        return False


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


def load_problems(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON-lines problems: one ``{"prompt", "tests", "entry_point"}`` per line.

    Optional keys: ``id``/``name``, ``difficulty``, ``reference`` (a solution, used as
    `Item.reference`). Blank lines and lines starting with ``#`` are skipped.
    """
    problems = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON: {exc}") from exc
            missing = [k for k in ("prompt", "tests", "entry_point") if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
            try:
                prologue, cases = normalize_tests(rec["tests"])
            except (ValueError, SyntaxError) as exc:
                raise ValueError(f"{where}: {exc}") from exc
            problems.append(
                {
                    "name": str(rec.get("id", rec.get("name", f"line{lineno}"))),
                    "difficulty": rec.get("difficulty"),
                    "prompt": rec["prompt"],
                    "entry_point": rec["entry_point"],
                    "solution": rec.get("reference", rec.get("solution")),
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


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 15] + f"... ({len(text)} chars)"


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
        memory_mb: memory (address-space) limit of the sandbox.
        difficulty: keep only these built-in difficulties ("easy", "medium", "hard";
            a string or a list).
        case_timeout_s: limit per test case (default timeout_s / 4), so that one
            looping case leaves time for the others.
        max_feedback_cases: how many failing cases the feedback details.
        max_feedback_chars: cap on the feedback text.
    """

    name: ClassVar[str] = "code"
    description: ClassVar[str] = "Python functions checked by unit tests in a sandbox"
    task_hint: ClassVar[str] = (
        "Python programming: write a function that passes hidden unit tests. The feedback "
        "lists failing test calls with expected and actual results, or the traceback."
    )

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
        self.case_timeout_s = float(case_timeout_s or self.timeout_s / 4)
        self.max_feedback_cases = int(max_feedback_cases)
        self.max_feedback_chars = int(max_feedback_chars)
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
        marker = f"@@resd-case-{secrets.token_hex(8)}@@"
        config = {
            "marker": marker,
            "entry_point": meta["entry_point"],
            "prologue": meta.get("prologue", ""),
            "cases": [{k: v for k, v in c.items() if k != "expected"} for c in cases],
            "budget_s": self.timeout_s,
            "case_timeout_s": self.case_timeout_s,
        }
        result = run_python(
            _HARNESS,
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
            outcomes.append(self._judge(case, rec, stage, result))
        return outcomes, result

    def _judge(
        self, case: dict, rec: dict | None, stage: dict | None, result: SandboxResult
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
        if "assert" in case:
            passed = bool(rec.get("passed"))
            if "got" in rec:
                out["got"] = _decode(rec["got"])
                out["expected"] = _decode(rec["expected"])
        else:
            out["got"] = _decode(rec.get("got"))
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
        limit = self.max_feedback_chars
        return text if len(text) <= limit else text[: limit - 20] + "\n... (truncated)"


def _pick(rec: dict, *keys: str) -> dict:
    return {k: rec[k] for k in keys if k in rec}
