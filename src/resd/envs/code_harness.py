"""The sandbox side of `CodeEnv`: the test harness and how values cross the process boundary.

`HARNESS` is the program the sandbox runs: it loads ``solution.py``, calls the entry point
once per test case (each under its own time limit) and streams one marked JSON line per
case. Return values travel as JSON; types JSON lacks (tuples, sets, non-string dict keys,
huge ints, infinities) are tagged, and values too large to ship are sent as a digest. The
same codec runs in the trainer's process, so `values_match` can decode what came back and
compare it with the expected value there, where the tested program cannot interfere.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable
from typing import Any

__all__ = ["HARNESS", "assert_compare", "assert_truth", "decode_value", "values_match"]

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
HARNESS = (
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

def run_eval_case(ns, sources):
    """Evaluate an assert's operands and ship their values; the verdict is the trainer's."""
    register("<test>", "\n".join(sources))
    codes = []
    for k, src in enumerate(sources):
        tree = ast.parse(src, "<test>", mode="eval")
        ast.increment_lineno(tree, k)
        codes.append(compile(tree, "<test>", "eval"))
    rec = guarded(lambda: [ship_value(eval(c, ns)) for c in codes], case_limit())
    if "value" in rec:
        rec["values"] = rec.pop("value")
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
        if "eval" in case:
            rec = run_eval_case(ns, case["eval"])
        elif "assert" in case:
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


def decode_value(v: Any) -> Any:
    """A value as the harness shipped it, back in Python form; garbage becomes an opaque repr."""
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
        return _digest_of(expected) == got.digest
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
# Assert verdicts reached in the trainer's process


def _is_plain(v: Any) -> bool:
    """Only builtin data: its ``==`` and ordering cannot be code the tested program wrote."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return True
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(map(_is_plain, v))
    if isinstance(v, dict):
        return all(_is_plain(k) and _is_plain(x) for k, x in v.items())
    return False


def _digest_of(v: Any) -> str:
    return hashlib.sha256(_canon(_codec_ns["encode_value"](v)).encode()).hexdigest()


def _equal(a: Any, b: Any) -> bool | None:
    """Python's ``==`` on decoded values; None when it cannot be decided (opaque objects)."""
    if isinstance(a, _Digest) or isinstance(b, _Digest):
        da = a.digest if isinstance(a, _Digest) else _digest_of(a) if _is_plain(a) else None
        db = b.digest if isinstance(b, _Digest) else _digest_of(b) if _is_plain(b) else None
        return None if da is None or db is None else da == db
    if not (_is_plain(a) and _is_plain(b)):
        return None
    return bool(a == b)


_ORDER: dict[str, Callable[[Any, Any], Any]] = {
    "Lt": operator.lt,
    "LtE": operator.le,
    "Gt": operator.gt,
    "GtE": operator.ge,
    "In": lambda a, b: a in b,
    "NotIn": lambda a, b: a not in b,
}


def assert_compare(op: str, a: Any, b: Any) -> bool:
    """``a <op> b`` for decoded values (`ast.cmpop` class names), as an assert means it.

    The operands are plain data rebuilt here, so a returned object whose ``__eq__`` (or
    ``__lt__``, ``__contains__``...) always says yes has become an opaque repr and fails.
    Whatever cannot be decided fails too.
    """
    if op in ("Eq", "NotEq"):
        eq = _equal(a, b)
        return eq is not None and eq == (op == "Eq")
    if op in ("Is", "IsNot"):  # only None and the bools keep their identity over the trip
        decidable = (
            _is_plain(a) and _is_plain(b) and any(v is None or isinstance(v, bool) for v in (a, b))
        )
        return decidable and (a is b) == (op == "Is")
    if op not in _ORDER or not (_is_plain(a) and _is_plain(b)):
        return False
    try:
        return bool(_ORDER[op](a, b))
    except Exception:
        return False


def assert_truth(v: Any) -> bool | None:
    """The truth value of a decoded value; None for an opaque object (whose ``__bool__``
    was the tested program's)."""
    if isinstance(v, _Digest):
        return True  # only large, hence non-empty, values are shipped as a digest
    return bool(v) if _is_plain(v) else None
