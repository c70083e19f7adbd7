"""CodeEnv: extraction, exact scores and feedback, the built-in problems, JSONL loading."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from typing import Any

import pytest

from resd.envs import make_env
from resd.envs.base import Item
from resd.envs.code import CodeEnv, extract_code, load_problems, normalize_tests, values_match
from resd.envs.code_harness import assert_compare, assert_truth, decode_value
from resd.envs.code_problems import PROBLEMS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox targets Linux")


def fenced(code: str) -> str:
    return f"Here is my solution.\n\n```python\n{code}\n```\n"


@pytest.fixture(scope="module")
def env() -> CodeEnv:
    return CodeEnv(timeout_s=2)  # 0.5 s per test case keeps the timeout tests quick


@pytest.fixture(scope="module")
def two_sum(env):
    items = env.train_items() + env.test_items()
    return next(it for it in items if it.id == "code/two_sum")


# -- extraction ----------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block_after_thinking():
    response = (
        "<think>```python\nthinking = 1\n```</think>\n"
        "First try:\n```python\nx = 1\n```\nBetter:\n```Python\nx = 2\n```\nDone."
    )
    assert extract_code(response) == "x = 2\n"


def test_extract_code_fallbacks():
    assert extract_code("no code here") is None
    assert extract_code("```python\n\n```") is None
    assert extract_code("```\nplain = True\n```") == "plain = True\n"
    assert extract_code("```js\nlet a\n```\n```py\nb = 1\n```") == "b = 1\n"
    # ran out of tokens inside the block: still extracted, so the error is reported
    assert extract_code("```python\ndef f(:\n") == "def f(:\n"
    # the opening <think> was part of the prompt
    assert extract_code("```python\nno = 1\n```</think>```python\nyes = 1\n```") == "yes = 1\n"
    # reasoning that never ended contains no answer
    assert extract_code("<think>```python\nx = 1\n```") is None


def test_extract_code_language_tags_and_fences():
    # Catches a python tag dropped from the accepted set, a bare block preferred over a
    # tagged one, and indentation or longer fences mangled.
    for tag in ("python", "py", "python3", "py3", "PY3"):
        assert extract_code(f"```{tag}\nx = 1\n```") == "x = 1\n", tag
    assert extract_code("```python\na = 1\n```\n```\nb = 2\n```") == "a = 1\n"
    assert extract_code("```js\nlet a\n```") is None  # another language is not Python
    assert extract_code("````python\n    indented = 1\n````") == "    indented = 1\n"
    assert extract_code("```python\nx = 1\n```\nprose\n```python\n\n```") is None


# -- scoring -------------------------------------------------------------------------------


def test_correct_answer(env, two_sum):
    score = env.score(two_sum, two_sum.reference)
    assert (score.reward, score.score) == (1.0, 1.0)
    assert score.feedback == "All 5 tests passed."


def test_wrong_answer_lists_failing_calls(env, two_sum):
    score = env.score(two_sum, fenced("def two_sum(nums, target):\n    return [0, 1]"))
    assert score.reward == 0.0
    assert score.score == pytest.approx(2 / 5)
    fb = score.feedback
    assert fb.startswith("Passed 2/5 tests.")
    assert "Test 2: two_sum([3, 2, 4], 6)\n  expected: [1, 2]\n  got:      [0, 1]" in fb
    assert "Test 5: two_sum([0, 4, 3, 0], 0)" in fb
    assert "Test 1:" not in fb and "Test 3:" not in fb  # passing cases are not listed


def test_erroring_answer_shows_trimmed_traceback(env, two_sum):
    code = (
        "def two_sum(nums, target):\n    return helper(nums)\n\ndef helper(xs):\n    return xs[99]"
    )
    score = env.score(two_sum, fenced(code))
    assert (score.reward, score.score) == (0.0, 0.0)
    fb = score.feedback
    assert "raised IndexError: list index out of range" in fb
    assert 'File "solution.py", line 5, in helper' in fb
    assert "(same traceback as test 1)" in fb  # repeated tracebacks are not repeated
    assert "resd_cases" not in fb and "<string>" not in fb  # no harness frames
    assert "... and 2 more failing tests." in fb


def test_one_crashing_case_does_not_hide_the_others(env, two_sum):
    code = """
def two_sum(nums, target):
    if target == 0:
        raise ValueError("zero target")
    seen = {}
    for j, x in enumerate(nums):
        if target - x in seen:
            return [seen[target - x], j]
        seen[x] = j
"""
    score = env.score(two_sum, fenced(code))
    assert score.score == pytest.approx(4 / 5)
    assert "Test 5: two_sum([0, 4, 3, 0], 0)\n  raised ValueError: zero target" in score.feedback


def test_looping_case_times_out_alone(env, two_sum):
    code = """
def two_sum(nums, target):
    while target == 0:
        pass
    return [0, 1]
"""
    score = env.score(two_sum, fenced(code))
    assert score.score == pytest.approx(2 / 5)
    assert "Test 5: two_sum([0, 4, 3, 0], 0)\n  timed out (limit 0.5 s per test)" in score.feedback


def test_code_that_never_finishes_loading(env, two_sum):
    score = env.score(two_sum, fenced("while True:\n    pass"))
    assert (score.reward, score.score) == (0.0, 0.0)
    assert "Timed out while loading the code" in score.feedback


def test_catching_the_timeout_does_not_help(two_sum):
    code = """
def two_sum(nums, target):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
"""
    score = CodeEnv(timeout_s=1).score(two_sum, fenced(code))
    assert score.score == 0.0
    assert "Test 1: two_sum([2, 7, 11, 15], 9)\n  still running when the program was killed" in (
        score.feedback
    )
    assert "Tests 2, 3, 4, 5 were not run" in score.feedback


@pytest.mark.parametrize(
    ("response", "expected_text"),
    [
        ("I would use a hash map.", "No code block found"),
        (fenced("def two_sum(nums, target:\n    pass"), "SyntaxError"),
        (
            fenced("def twosum(nums, target):\n    return [0, 1]"),
            "does not define a function named `two_sum` (functions defined: twosum)",
        ),
        (
            fenced("import os\ndef two_sum(nums, target):\n    os._exit(0)"),
            "were not run: the program ended (exited with status 0)",
        ),
        (fenced("import sys\ndef two_sum(nums, target):\n    sys.exit(1)"), "raised SystemExit: 1"),
        (
            fenced("import os\ndef two_sum(nums, target):\n    os.system('ls')"),
            "PermissionError: sandbox",
        ),
        (
            fenced("def two_sum(nums, target):\n    return [0] * (10**10)"),
            "MemoryError (memory limit 512 MB)",
        ),
    ],
    ids=["no-code", "syntax", "missing", "os._exit", "sys.exit", "os.system", "memory"],
)
def test_failure_modes_have_specific_feedback(env, two_sum, response, expected_text):
    score = env.score(two_sum, response)
    assert (score.reward, score.score) == (0.0, 0.0)
    assert expected_text in score.feedback


def test_printed_output_appears_in_feedback(env, two_sum):
    code = "def two_sum(nums, target):\n    print('debug', nums)\n    return [9, 9]"
    score = env.score(two_sum, fenced(code))
    assert "printed: debug [2, 7, 11, 15]" in score.feedback


def test_fake_result_lines_do_not_count(env, two_sum):
    # The harness's marker carries a random nonce, and expected values never enter the
    # sandbox, so printing "passed" records achieves nothing.
    code = """
import json, os, sys
def two_sum(nums, target):
    for i in range(5):
        record = {"i": i, "status": "ok", "got": [0, 1], "passed": True}
        sys.__stdout__.write('@@resd-case-0000@@ ' + json.dumps(record) + '\\n')
    print(os.listdir('.'))  # the marker's file is already gone
    return None
"""
    score = env.score(two_sum, fenced(code))
    assert score.score == 0.0
    assert "printed: ['" in score.feedback and "resd_cases.json" not in score.feedback


def test_feedback_is_capped(two_sum):
    env = CodeEnv(timeout_s=2, max_feedback_cases=5, max_feedback_chars=300)
    score = env.score(two_sum, fenced("def two_sum(nums, target):\n    return 'x' * 1000"))
    assert len(score.feedback) <= 300 and score.feedback.endswith("(truncated)")


# -- comparison of values ------------------------------------------------------------------


def test_values_match_rules():
    assert values_match(0.1 + 0.2, 0.3)
    assert values_match([1, 2], (1, 2))
    assert values_match({"a": [1.0]}, {"a": (1,)})
    assert values_match(float("nan"), float("nan"))
    assert values_match({1, 2}, {2, 1})
    assert values_match(None, None)
    assert not values_match(True, 1) and not values_match(0, False)
    assert not values_match([1, 2], [2, 1])
    assert not values_match(1.0, 1.01)
    assert not values_match("a", "A")


def test_values_match_tolerance_is_relative_with_an_absolute_floor():
    # Catches a tolerance that is only absolute, only relative, too loose or too strict.
    assert values_match(1e6, 1e6 + 0.5) and not values_match(1e6, 1e6 + 5)
    assert values_match(0.0, 1e-12) and not values_match(0.0, 1e-6)
    assert values_match(2, 2.0000001) and not values_match(2, 3)
    assert not values_match(float("nan"), 1.0) and not values_match(1.0, float("nan"))


def test_values_match_compares_whole_containers():
    # Catches containers compared only on a common prefix or on the expected keys.
    assert not values_match([1, 2], [1]) and not values_match([1], [1, 2])
    assert not values_match({"a": 1}, {"a": 1, "b": 2}) and not values_match({"a": 1}, {"b": 1})
    assert not values_match({"a": 1.0}, {"a": 2.0})
    assert values_match(False, False) and not values_match(True, False)
    assert not values_match([1, 2], decode_value({"$t": "repr", "v": "[1, 2]"}))
    assert not values_match(1.5, "1.5") and not values_match([1], 1)  # no TypeError either
    assert not values_match({"a": 1}, [("a", 1)]) and not values_match([1], {0: 1})


def test_large_shipped_values_compare_by_digest():
    # A value too large to ship arrives as the sha256 of its canonical JSON; catches a
    # digest compared only against another digest, or not counted as true.
    value = list(range(3))
    digest = hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()
    shipped = decode_value({"$t": "digest", "v": digest, "preview": "[0,1,2]"})
    assert values_match(value, shipped) and not values_match([0, 1], shipped)
    assert assert_compare("Eq", shipped, value) and assert_compare("Eq", value, shipped)
    assert assert_compare("Eq", shipped, shipped) and not assert_compare("Eq", shipped, [0, 1])
    assert assert_compare("NotEq", [0, 1], shipped) and assert_truth(shipped) is True
    opaque = decode_value({"$t": "repr", "v": "<Yes>"})
    assert not assert_compare("Eq", shipped, opaque) and not assert_compare(
        "NotEq", opaque, shipped
    )


def test_assert_operators_on_shipped_values():
    # The verdict of a one-line assert, reached in the trainer's process on plain values.
    assert assert_compare("Eq", [1, (2,)], [1, (2,)]) and not assert_compare("Eq", 1, 2)
    assert assert_compare("NotEq", 1, 2) and not assert_compare("NotEq", 1, 1)
    assert assert_compare("Is", None, None) and not assert_compare("Is", None, 0)
    assert assert_compare("IsNot", None, 0) and not assert_compare("IsNot", True, True)
    assert not assert_compare("Is", 1000, 1000)  # int identity does not survive the trip
    assert assert_compare("In", 2, [1, 2]) and not assert_compare("In", 3, [1, 2])
    assert assert_compare("NotIn", 3, [1, 2]) and not assert_compare("NotIn", 2, [1, 2])
    assert assert_compare("LtE", 1, 1) and not assert_compare("Lt", 1, 1)
    assert assert_compare("GtE", 2, 2) and not assert_compare("Gt", 2, 2)
    assert assert_compare("Lt", 1, 2) and assert_compare("Gt", 2, 1)
    assert not assert_compare("Lt", 1, "a")  # a comparison that raises fails
    opaque = decode_value({"$t": "repr", "v": "<Yes>"})  # an object only its repr survives
    for op in ("Eq", "NotEq", "Lt", "In", "NotIn", "Is", "IsNot"):
        assert not assert_compare(op, opaque, 1) and not assert_compare(op, 1, opaque), op
        assert not assert_compare(op, opaque, [1, 2]), op
    assert assert_truth([0]) is True and assert_truth([]) is False
    assert assert_truth(opaque) is None
    garbage = decode_value({"$t": "set", "v": 1})
    assert isinstance(garbage, type(opaque)) and repr(garbage) == "<malformed result>"


def test_return_types_survive_the_trip(tmp_path):
    problems = [
        {"prompt": "p", "entry_point": "f", "tests": [{"args": [], "expected": exp}]}
        for exp in ([1, 2], None, {"k": [1.5]}, 2**200, "text")
    ]
    bodies = ["(1, 2)", "None", "{'k': (1.5,)}", "2**200", "'text'"]
    path = tmp_path / "types.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in problems))
    env = CodeEnv(path=str(path), test_fraction=0.0)
    items = sorted(env.train_items() + env.test_items(), key=lambda it: it.id)
    for item, body in zip(items, bodies, strict=True):
        score = env.score(item, fenced(f"def f():\n    return {body}"))
        assert score.reward == 1.0, (body, score.feedback)


def test_large_return_values_are_compared_by_digest(tmp_path):
    path = tmp_path / "big.jsonl"
    tests = [{"args": [50_000], "expected": list(range(50_000))}]
    path.write_text(json.dumps({"prompt": "p", "entry_point": "f", "tests": tests}))
    env = CodeEnv(path=str(path))
    (item,) = env.train_items() + env.test_items()
    assert env.score(item, fenced("def f(n):\n    return list(range(n))")).reward == 1.0
    wrong = env.score(item, fenced("def f(n):\n    return list(range(1, n + 1))"))
    assert wrong.reward == 0.0 and "<large value" in wrong.feedback


# -- built-in problems ---------------------------------------------------------------------


def test_builtin_problem_set_is_well_formed():
    assert len(PROBLEMS) >= 40
    assert len({p.name for p in PROBLEMS}) == len(PROBLEMS)
    assert {p.difficulty for p in PROBLEMS} == {"easy", "medium", "hard"}
    for p in PROBLEMS:
        assert len(p.tests) >= 4, p.name
        assert f"`{p.entry_point}(" in p.prompt, p.name
        json.dumps(p.tests)  # plain JSON, so items can be logged and exported


@pytest.mark.parametrize(
    ("record", "named"),
    [({"name": "sum_two", "difficulty": "trivial"}, "sum_two"), ({"difficulty": None}, "?")],
)
def test_a_malformed_builtin_record_is_refused_naming_the_file_and_problem(
    record: dict, named: str
) -> None:
    """The shipped data file is read at import: a record with a difficulty outside
    easy/medium/hard (or none) fails there, naming the file and the problem (or `?`),
    instead of a problem the difficulty split would silently leave out."""
    from resd.envs.code_problems import _problem

    expected = (
        f"data/code_problems.json: {named}: difficulty must be one of ('easy', 'medium', 'hard')"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        _problem(record)


def test_every_builtin_reference_passes_all_its_tests():
    env = CodeEnv(timeout_s=5)
    items = env.train_items() + env.test_items()
    assert len(items) == len(PROBLEMS)
    failures = {}
    for item in items:
        score = env.score(item, item.reference)
        if score.reward != 1.0:
            failures[item.id] = score.feedback
    assert failures == {}


def test_split_and_difficulty_filter():
    a, b = CodeEnv(seed=3), CodeEnv(seed=3)
    assert [i.id for i in a.test_items()] == [i.id for i in b.test_items()]
    train_ids = {i.id for i in a.train_items()}
    test_ids = {i.id for i in a.test_items()}
    assert not train_ids & test_ids
    assert len(test_ids) == round(len(PROBLEMS) * 0.25)
    hard = CodeEnv(difficulty="hard", test_fraction=0.5)
    assert {i.meta["difficulty"] for i in hard.train_items() + hard.test_items()} == {"hard"}
    both = CodeEnv(difficulty=["easy", "medium"])
    assert len(both.train_items() + both.test_items()) == sum(
        p.difficulty != "hard" for p in PROBLEMS
    )
    with pytest.raises(ValueError, match="difficulty"):
        CodeEnv(difficulty="impossible")


def test_registry_builds_the_env():
    env = make_env("code", {"difficulty": "easy"})
    assert isinstance(env, CodeEnv) and env.name == "code"
    item = env.train_items()[0]
    assert "```python" in item.prompt_text and item.reference.startswith("```python\n")


# -- JSON-lines problems -------------------------------------------------------------------


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def f_problems(
    tmp_path, tests: dict[str, Any], name: str = "p", **env_args
) -> tuple[CodeEnv, dict[str, Item]]:
    """A code environment whose problems all ask for `f`, one per id with its tests, all of
    them for training (a 2 s budget unless `env_args` says otherwise), and its items by id."""
    records = [{"id": k, "prompt": "f", "entry_point": "f", "tests": t} for k, t in tests.items()]
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    env = CodeEnv(path=path, test_fraction=0.0, **{"timeout_s": 2, **env_args})
    return env, {it.meta["name"]: it for it in env.train_items() + env.test_items()}


def one_problem(tmp_path, tests, name: str = "p", **env_args) -> tuple[CodeEnv, Item]:
    """`f_problems` with one problem, and that problem's item."""
    env, items = f_problems(tmp_path, {"f": tests}, name, **env_args)
    (item,) = items.values()
    return env, item


def test_jsonl_call_and_assert_formats(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {
                "id": "add",
                "prompt": "Write add(a, b).",
                "entry_point": "add",
                "tests": [
                    {"args": [1, 2], "expected": 3},
                    {"args": [2], "kwargs": {"b": 0}, "expected": 2},
                ],
                "reference": "def add(a, b):\n    return a + b\n",
            },
            {
                "id": "mul",
                "prompt": "Write mul(a, b).",
                "entry_point": "mul",
                "tests": "import math\nassert mul(2, 3) == 6\nassert mul(0, 5) == 0\n"
                "assert math.isclose(mul(0.5, 0.5), 0.25)",
            },
            {
                "id": "neg",
                "prompt": "Write neg(x).",
                "entry_point": "neg",
                "tests": "def check(candidate):\n    assert candidate(1) == -1\n"
                "    for x in range(3):\n        assert candidate(x) == -x\n\ncheck(neg)\n",
            },
        ],
    )
    env = CodeEnv(path=path, test_fraction=0.0)
    items = {it.id: it for it in env.train_items() + env.test_items()}
    add, mul, neg = items["code/add"], items["code/mul"], items["code/neg"]

    assert env.score(add, add.reference).reward == 1.0
    half = env.score(add, fenced("def add(a, b):\n    return a - b"))
    assert half.score == 0.5 and "Test 1: add(1, 2)\n  expected: 3\n  got:      -1" in half.feedback

    assert len(mul.meta["tests"]) == 3 and mul.meta["prologue"] == "import math"
    assert env.score(mul, fenced("def mul(a, b):\n    return a * b")).reward == 1.0
    wrong = env.score(mul, fenced("def mul(a, b):\n    return a**b"))
    assert wrong.score == pytest.approx(1 / 3)
    assert "Test 1: assert mul(2, 3) == 6\n  expected: 6\n  got:      8" in wrong.feedback
    assert "Test 3: assert math.isclose(mul(0.5, 0.5), 0.25)\n  failed: AssertionError" in (
        wrong.feedback
    )

    assert len(neg.meta["tests"]) == 2  # the assert and the loop
    assert env.score(neg, fenced("def neg(x):\n    return -x")).reward == 1.0
    assert env.score(neg, fenced("def neg(x):\n    return x")).score == 0.0


def test_jsonl_errors_name_the_line(tmp_path):
    good = {"prompt": "p", "entry_point": "f", "tests": [{"args": [], "expected": 1}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"prompt": "p", "tests": []}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: need an object with .*\"entry_point\""):
        load_problems(path)
    with pytest.raises(ValueError, match="expected"):
        normalize_tests([{"args": [1]}])
    with pytest.raises(ValueError, match="no assert"):
        normalize_tests("x = 1")


# -- assert-style tests cannot be faked ----------------------------------------------------

ASSERT_TESTS = {
    "plain": "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n",
    "check": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
    "    assert candidate(2, 2) in (4, 5)\n\ncheck(add)\n",
}

FORGERIES = {
    "always-equal": """
class Yes:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    def __bool__(self):
        return True
    def __contains__(self, other):
        return True
    def __hash__(self):
        return 0
def add(a, b):
    return Yes()
""",
    "emit-results": """
import __main__, os
for i in range(len(__main__.CFG["cases"])):
    __main__.emit({"stage": "start", "i": i})
    __main__.emit({"i": i, "status": "ok", "passed": True, "values": [True]})
__main__.emit({"stage": "done"})
os._exit(0)
""",
    "replace-runner": """
import __main__
def fake(*args):
    return {"status": "ok", "passed": True, "values": [True]}
__main__.run_assert_case = __main__.run_eval_case = __main__.run_call_case = fake
def add(a, b):
    return 0
""",
}


@pytest.fixture(scope="module")
def assert_items(tmp_path_factory) -> tuple[CodeEnv, dict]:
    path = tmp_path_factory.mktemp("asserts") / "p.jsonl"
    write_jsonl(
        path,
        [
            {"id": name, "prompt": "Write add(a, b).", "entry_point": "add", "tests": tests}
            for name, tests in ASSERT_TESTS.items()
        ],
    )
    env = CodeEnv(path=str(path), test_fraction=0.0, timeout_s=2)
    return env, {it.meta["name"]: it for it in env.train_items() + env.test_items()}


@pytest.mark.parametrize("style", sorted(ASSERT_TESTS))
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_assert_tests_cannot_be_faked(assert_items, style, forgery):
    env, items = assert_items
    item = items[style]
    assert env.score(item, fenced("def add(a, b):\n    return a + b")).reward == 1.0
    score = env.score(item, fenced(FORGERIES[forgery]))
    assert score.reward == 0.0, score.feedback  # (a blind guess may still hit a case)


def test_expected_literals_never_enter_the_sandbox(assert_items):
    env, items = assert_items
    leak = "import __main__\ndef add(a, b):\n    print(__main__.CFG['cases'])\n    return 0"
    score = env.score(items["plain"], fenced(leak))
    assert "add(1, 2)" in score.feedback and "== 3" not in score.feedback.split("printed:")[1]


@pytest.mark.parametrize(
    ("test", "passes"),
    [
        ("assert f(1) == 1", True),
        ("assert f(1) == True", True),
        ("assert f(0) is None", False),
        ("assert f(2) > 1", True),
        ("assert f(2) < 1", False),
        ("assert not f(0)", True),
        ("assert f([1, 2]) == [1, 2]", True),
        ("assert f((1, 2)) == [1, 2]", False),
        ("assert f({1: 'a'}) == {1: 'a'}", True),
        ("assert f('a') in 'abc'", True),
        ("assert f(True) is True", True),
        ("assert f(1.5) == 1.5", True),
        ("assert f(10**30) == 10**30", True),
        ("assert True", True),
        ("assert f(3) == f(3)", True),
    ],
)
def test_assert_verdicts_match_python(tmp_path, test, passes):
    expected = eval(compile(test.replace("assert ", "", 1), "<t>", "eval"), {"f": lambda x: x})
    assert bool(expected) == passes  # the harness must agree with Python itself
    env, item = one_problem(tmp_path, test)
    score = env.score(item, fenced("def f(x):\n    return x"))
    assert score.reward == float(passes), score.feedback


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": -1}, "timeout_s"),
        ({"case_timeout_s": -0.5}, "case_timeout_s"),
        ({"memory_mb": 1}, "memory_mb"),
    ],
)
def test_unusable_limits_are_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CodeEnv(**kwargs)


def test_tagged_return_values_are_decoded_at_any_depth(tmp_path):
    # Catches a decoder that leaves tags inside lists, or loses sets, bytes, dicts with
    # non-string keys, infinities or ints too big for JSON (each would fail a right answer).
    values = {
        "set": "{1, 2}",
        "bytes": "b'ab'",
        "dict": "{1: 'a', (2, 3): [4]}",
        "nested": "[(1, 2), {3}, [float('inf')]]",
        "big": "2 ** 10000 + 1",
    }
    tests = "\n".join(f"assert f({k!r}) == {v}" for k, v in values.items())
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": "f", "prompt": "f", "entry_point": "f", "tests": tests},
            {
                "id": "g",
                "prompt": "g",
                "entry_point": "g",
                "tests": [
                    {"args": [], "expected": [[1, 2], [3.5]]},
                    {"args": [1], "expected": 2**10000},
                ],
            },
        ],
    )
    env = CodeEnv(path=path, test_fraction=0.0, timeout_s=2)
    items = {it.meta["name"]: it for it in env.train_items() + env.test_items()}
    body = ", ".join(f"{k!r}: {v}" for k, v in values.items())
    score = env.score(items["f"], fenced(f"def f(kind):\n    return {{{body}}}[kind]"))
    assert score.reward == 1.0, score.feedback
    code = "def g(n=0):\n    return 2**10000 if n else [(1, 2), (3.5,)]"
    assert env.score(items["g"], fenced(code)).reward == 1.0
    wrong = env.score(items["g"], fenced("def g(n=0):\n    return 2**10000 + n if n else [(1, 2)]"))
    assert wrong.score == 0.0, wrong.feedback


def test_assert_feedback_shows_expected_and_got_the_right_way_round(tmp_path):
    # `assert 1 == f(2)`: the literal is what was expected, whichever side it is on;
    # other failed asserts name the operand values.
    tests = "assert 1 == f(2)\nassert f(2) != 2\nassert not f(2)\nassert f(0)\nassert f(1) == 1"
    env, item = one_problem(tmp_path, tests, max_feedback_cases=5)
    score = env.score(item, fenced("def f(x):\n    return x"))
    assert (score.reward, score.score) == (0.0, pytest.approx(1 / 5))
    fb = score.feedback
    assert "Test 1: assert 1 == f(2)\n  expected: 1\n  got:      2" in fb
    assert "Test 2: assert f(2) != 2\n  failed: AssertionError (2, 2)" in fb
    assert "Test 3: assert not f(2)\n  failed: AssertionError\n" in fb
    assert "Test 4: assert f(0)\n  failed: AssertionError" in fb and "Test 5" not in fb


def test_large_values_in_asserts_are_compared_by_digest(tmp_path):
    # Catches digests compared wrongly against the literal or shipped side, and a
    # preview missing from the feedback.
    tests = "assert f(50000) == list(range(50000))\nassert f(50000)"
    env, item = one_problem(tmp_path, tests)
    assert env.score(item, fenced("def f(n):\n    return list(range(n))")).reward == 1.0
    wrong = env.score(item, fenced("def f(n):\n    return list(range(1, n + 1))"))
    assert wrong.score == 0.5 and "got:      <large value [1,2,3," in wrong.feedback


def test_a_program_that_exits_names_the_running_test_and_the_ones_not_run(tmp_path):
    # Catches the running case misattributed, the not-run list miscounted or not cut at 20.
    tests = [{"args": [k], "expected": k} for k in range(25)]
    env, item = one_problem(tmp_path, tests)
    score = env.score(
        item, fenced("import os\ndef f(x):\n    if x == 1:\n        os._exit(3)\n    return x")
    )
    assert (score.reward, score.score) == (0.0, pytest.approx(1 / 25))
    fb = score.feedback
    assert fb.startswith(
        "Passed 1/25 tests.\nTest 2: f(1)\n  the program ended (exited with status 3)"
    )
    numbers = ", ".join(str(k) for k in range(3, 23))
    assert f"Tests {numbers} ... were not run: the program ended (exited with status 3)" in fb
    late = env.score(
        item, fenced("import os\ndef f(x):\n    if x == 23:\n        os._exit(3)\n    return x")
    )
    assert "Tests 25 were not run: the program ended (exited with status 3)" in late.feedback


def test_an_error_while_loading_shows_the_traceback_and_what_was_printed(env, two_sum):
    score = env.score(two_sum, fenced("print('hello')\nraise ValueError('boom')"))
    assert (score.reward, score.score) == (0.0, 0.0)
    fb = score.feedback
    assert fb.startswith("Passed 0/5 tests.\nError while loading the code:\n")
    assert 'File "solution.py", line 2' in fb and "ValueError: boom" in fb
    assert fb.endswith("\n  printed: hello") and "Test 1" not in fb


def test_a_returned_object_that_equals_everything_fails_call_cases(env, two_sum):
    # Only the returned object's repr crosses back, so its `__eq__` is never asked.
    code = "class Yes:\n    def __eq__(self, other):\n        return True\n\n"
    score = env.score(two_sum, fenced(code + "def two_sum(nums, target):\n    return Yes()"))
    assert (score.reward, score.score) == (0.0, 0.0)


def test_forged_and_setup_failures_are_reported_not_raised(tmp_path):
    # A non-object result line must not crash `score`; a failing test setup is named as
    # such; a multi-line assert's own message reaches the feedback.
    tests = "import json\nfor x in range(2):\n    assert f(x) == x, f'off at {x}'"
    broken = "import no_such_module_for_resd\nassert f(1) == 1"
    env, items = f_problems(tmp_path, {"loop": tests, "broken": broken})
    forged = "import __main__\n__main__.emit(5)\ndef f(x):\n    return x + 1"
    score = env.score(items["loop"], fenced(forged))
    assert score.reward == 0.0 and "failed: AssertionError: off at 0" in score.feedback
    setup = env.score(items["broken"], fenced("def f(x):\n    return x"))
    assert setup.reward == 0.0 and "Error while the test setup" in setup.feedback


# -- gaps found by mutation testing --------------------------------------------------------


def test_a_truth_assert_cannot_be_passed_by_an_object_that_says_true(tmp_path):
    # `assert f(x)` is judged here on the shipped value: an object whose `__bool__` says
    # yes crosses back as an opaque repr and fails. Catches truth asserts sent back to
    # the sandbox for a verdict the program controls.
    env, item = one_problem(tmp_path, "assert f(0)\nassert not f(1)")
    assert env.score(item, fenced("def f(x):\n    return x == 0")).reward == 1.0
    liar = "class Yes:\n    def __bool__(self):\n        return True\n\n"
    liar += "class No:\n    def __bool__(self):\n        return False\n\n"
    score = env.score(item, fenced(liar + "def f(x):\n    return No() if x else Yes()"))
    assert (score.reward, score.score) == (0.0, 0.0), score.feedback


def test_a_forged_result_with_the_wrong_number_of_values_is_an_error(assert_items):
    # The harness ships one value per non-literal operand; a replaced runner that ships
    # none must fail the case with a clear error, not pass it or crash `score`.
    env, items = assert_items
    forged = (
        "import __main__\n"
        "def fake(*args):\n"
        "    return {'status': 'ok', 'passed': True, 'values': []}\n"
        "__main__.run_eval_case = fake\n"
        "def add(a, b):\n"
        "    return a + b\n"
    )
    score = env.score(items["plain"], fenced(forged))
    assert (score.reward, score.score) == (0.0, 0.0)
    assert "Test 1: assert add(1, 2) == 3\n  raised malformed result" in score.feedback
    outcomes, _ = env.run_tests(extract_code(fenced(forged)), items["plain"].meta)
    assert [o["status"] for o in outcomes] == ["error", "error"]


def test_run_tests_reports_each_cases_status(tmp_path):
    # `run_tests` is what callers read for per-case results; catches "passed"/"failed"
    # swapped or blanked, for asserts judged here and for call cases.
    tests = "assert f(1) == 1\nassert f(2) == 3\nassert f(0)\nassert f(3) > 2"
    calls = [{"args": [1], "expected": 1}, {"args": [2], "expected": 3}]
    env, items = f_problems(tmp_path, {"a": tests, "c": calls})
    outcomes, result = env.run_tests("def f(x):\n    return x\n", items["a"].meta)
    assert [(o["passed"], o["status"]) for o in outcomes] == [
        (True, "passed"),
        (False, "failed"),
        (False, "failed"),
        (True, "passed"),
    ]
    assert all(isinstance(o["time_s"], float) and o["time_s"] >= 0 for o in outcomes)
    assert result.ok
    outcomes, _ = env.run_tests("def f(x):\n    return x\n", items["c"].meta)
    assert [(o["passed"], o["status"], o["got"]) for o in outcomes] == [
        (True, "passed", 1),
        (False, "failed", 2),
    ]


def test_a_result_line_with_a_guessed_marker_of_the_right_length_is_ignored(tmp_path):
    # Result lines must carry the exact random marker; catches lines that are only
    # sliced at the marker's length. A multi-line assert case trusts the harness's
    # "passed", so a forged line accepted here would pass it.
    tests = "for x in range(2):\n    assert f(x) == x + 1"
    env, item = one_problem(tmp_path, tests)
    guesses = ["@@resd-case-" + "0" * 16 + "@@", "@@resd-case-@@"]  # a nonce is needed
    forged = (
        "import json, os, sys\n"
        f"for mark in {guesses!r}:\n"
        "    for rec in ({'stage': 'start', 'i': 0}, {'i': 0, 'status': 'ok', 'passed': True}):\n"
        "        sys.__stdout__.write(mark + ' ' + json.dumps(rec) + '\\n')\n"
        "sys.__stdout__.flush()\n"
        "os._exit(0)\n"
    )
    score = env.score(item, fenced(forged))
    assert (score.reward, score.score) == (0.0, 0.0), score.feedback


def test_tests_past_the_total_time_budget_are_not_run_and_say_why(tmp_path):
    # Each case is within its own limit, but together they use up `timeout_s`: the
    # remaining ones are reported as not run because of the budget (catches that
    # branch crashing or blamed on the program).
    tests = [{"args": [k], "expected": k} for k in range(8)]
    # 8 cases of 0.5 s need 4 s; the first passes unless the child takes 1.5 s to start.
    env, item = one_problem(tmp_path, tests, case_timeout_s=1)
    slow = "import time\ndef f(x):\n    time.sleep(0.5)\n    return x"
    score = env.score(item, fenced(slow))
    assert 0.0 < score.score < 1.0, score.feedback
    assert "were not run: the time budget of 2 s for all tests was used up" in score.feedback


def test_a_program_that_exits_while_loading_runs_no_test_and_shows_its_stderr(env, two_sum):
    # Catches the first test blamed for an exit before any test started, and stderr
    # left out (or a dangling ":" added when there is none); stderr is cut to its end.
    code = "import os\nos.write(2, b'x' * 700 + b'bye')\nos._exit(3)"
    score = env.score(two_sum, fenced(code))
    assert (score.reward, score.score) == (0.0, 0.0)
    head = "Passed 0/5 tests.\nTests 1, 2, 3, 4, 5 were not run: the program ended "
    assert score.feedback == head + "(exited with status 3) before reaching them:\n" + (
        "x" * 597 + "bye"
    )
    quiet = env.score(two_sum, fenced("import os\nos._exit(3)"))
    assert quiet.feedback == head + "(exited with status 3) before reaching them"


def test_feedback_details_at_most_max_feedback_cases_with_indented_tracebacks(env, two_sum):
    # Catches one case too many detailed, and tracebacks not indented under their test.
    code = "def two_sum(nums, target):\n    return nums[99]"
    fb = env.score(two_sum, fenced(code)).feedback
    assert "Test 3:" in fb and "Test 4:" not in fb and "... and 2 more failing tests." in fb
    assert "  raised IndexError: list index out of range\n    Traceback" in fb
    assert '\n      File "solution.py", line 2, in two_sum\n' in fb
    assert "memory limit" not in fb  # only a MemoryError mentions the memory limit
    # exactly as many failing tests as are detailed: no "... and 0 more"
    fb = env.score(two_sum, fenced("def two_sum(nums, target):\n    return [0, 1]")).feedback
    assert fb.count("\nTest ") == 3 and "more failing" not in fb


def test_a_missing_entry_point_lists_what_was_defined(env, two_sum):
    # Catches the defined names run together, or "none" lost when nothing was defined.
    both = "def helper():\n    pass\n\ndef twosum(nums, target):\n    return [0, 1]"
    fb = env.score(two_sum, fenced(both)).feedback
    assert "(functions defined: helper, twosum)." in fb
    fb = env.score(two_sum, fenced("x = 1")).feedback
    assert "does not define a function named `two_sum` (functions defined: none)." in fb


def test_assert_tests_keep_every_setup_statement(tmp_path):
    # Statements around the asserts (imports, helpers; top-level ones next to a
    # HumanEval `check`) run before the cases, in order and each on its own line.
    flat = "import math\nimport json\nassert f(2) == math.sqrt(4)\n"
    flat += "assert f(3) == len(json.dumps([1]))"
    check = (
        "import math\nSCALE = 2\n\ndef check(candidate):\n"
        "    assert math.isclose(candidate(2), 2 * SCALE / 2)\n\ncheck(f)\n"
    )
    env, items = f_problems(tmp_path, {"flat": flat, "check": check})
    assert items["flat"].meta["prologue"] == "import math\nimport json"
    assert items["check"].meta["prologue"] == "import math\nSCALE = 2\ncandidate = __resd_entry__"
    for name, item in items.items():
        score = env.score(item, fenced("def f(x):\n    return float(x)"))
        assert score.reward == 1.0, (name, score.feedback)
        assert env.score(item, fenced("def f(x):\n    return x + 1")).reward == 0.0, name


def test_a_bad_tests_field_in_a_file_names_its_row(tmp_path):
    # Catches the error of an unusable "tests" value losing the file and line it is on.
    good = {"prompt": "p", "entry_point": "f", "tests": [{"args": [], "expected": 1}]}
    bad = {"prompt": "p", "entry_point": "f", "tests": "x = 1"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: tests: the assert code contains no"):
        load_problems(path)


def test_a_single_case_not_wrapped_in_a_list_is_refused_as_such():
    # A dict (one case without its list) or an empty list gets the message about the
    # list, not one about assert code (catches the two checks joined with `and`).
    with pytest.raises(ValueError, match="non-empty list"):
        normalize_tests({"args": [1], "expected": 2})
    with pytest.raises(ValueError, match="non-empty list"):
        normalize_tests([])


@pytest.mark.parametrize("case", [{"args": 5}, {"args": "ab"}, {"args": [], "kwargs": [1]}])
def test_call_cases_need_a_list_of_args_and_a_dict_of_kwargs(case):
    # Catches either check dropped (then a string's letters became the arguments).
    with pytest.raises(ValueError, match="'args' must be a list and 'kwargs' a dict"):
        normalize_tests([{**case, "expected": 1}])


def test_problems_without_an_id_are_named_by_their_line(tmp_path):
    # Catches JSON-lines problems named by row number (blank and comment lines shift it).
    rec = {"prompt": "p", "entry_point": "f", "tests": [{"args": [], "expected": 1}]}
    path = tmp_path / "p.jsonl"
    path.write_text("# two problems\n\n" + json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    assert [p["name"] for p in load_problems(path)] == ["line3", "line4"]
    path.write_text(json.dumps({**rec, "name": "named"}) + "\n")
    assert [p["name"] for p in load_problems(path)] == ["named"]  # "name" stands for "id"


def test_a_files_difficulties_are_kept_and_filter_its_problems(tmp_path):
    # Catches the "difficulty" column dropped: `difficulty=` must work for files too.
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"id": k, "difficulty": d, "prompt": "p", "entry_point": "f", "tests": "assert f()"}
            for k, d in (("a", "easy"), ("b", "hard"), ("c", "easy"))
        ],
    )
    env = CodeEnv(path=path, difficulty="easy", test_fraction=0.0)
    items = env.train_items() + env.test_items()
    assert sorted((it.id, it.meta["difficulty"]) for it in items) == [
        ("code/a", "easy"),
        ("code/c", "easy"),
    ]


def test_long_values_in_feedback_are_cut_to_300_characters_with_their_length(env, two_sum):
    # Catches the cut one character off, so a capped value is longer than its limit.
    fb = env.score(two_sum, fenced("def two_sum(nums, target):\n    return 'x' * 500")).feedback
    got = next(line for line in fb.splitlines() if line.startswith("  got:"))
    shown = got[len("  got:      ") :]
    assert len(shown) == 300 and shown.endswith("... (502 chars)")
    fb = env.score(two_sum, fenced("def two_sum(nums, target):\n    return 'x' * 298")).feedback
    assert f"  got:      '{'x' * 298}'\n" in fb + "\n"  # exactly 300: shown whole
    # a length of four digits or more still fits the limit (it ran 1-4 characters over)
    fb = env.score(two_sum, fenced("def two_sum(nums, target):\n    return 'x' * 5000")).feedback
    got = next(line for line in fb.splitlines() if line.startswith("  got:"))
    shown = got[len("  got:      ") :]
    assert len(shown) == 300 and shown.endswith("... (5002 chars)")


def test_documented_limits_and_defaults():
    # The memory floor is 64 MB inclusive; a test case gets a quarter of the budget
    # unless told otherwise; the default budget is 5 s.
    assert CodeEnv(memory_mb=64, difficulty="easy").memory_mb == 64
    with pytest.raises(ValueError, match="memory_mb"):
        CodeEnv(memory_mb=63)
    env = CodeEnv(difficulty="easy")
    assert (env.timeout_s, env.case_timeout_s) == (5.0, 1.25)
    assert (env.max_feedback_cases, env.max_feedback_chars, env.memory_mb) == (3, 2500, 512)
    # a budget of 0 is refused even when the per-case limit is usable
    with pytest.raises(ValueError, match=r"env_args\.timeout_s must be > 0"):
        CodeEnv(timeout_s=0, case_timeout_s=1)
    assert CodeEnv(timeout_s=2, case_timeout_s=1.5, difficulty="easy").case_timeout_s == 1.5
    # the default split is the one of seed 0
    assert [i.id for i in CodeEnv().test_items()] == [i.id for i in CodeEnv(seed=0).test_items()]
    assert [i.id for i in CodeEnv().test_items()] != [i.id for i in CodeEnv(seed=1).test_items()]


def test_not_run_tests_are_listed_up_to_twenty(tmp_path):
    # Exactly 20 not-run tests are all listed; from 21 on, 20 are listed and " ...".
    # Keyword arguments are part of each test's call text.
    for n_cases, more in ((21, ""), (22, " ...")):
        tests = [{"args": [k], "kwargs": {"flag": True}, "expected": k} for k in range(n_cases)]
        env, item = one_problem(tmp_path, tests, name=f"p{n_cases}")
        score = env.score(item, fenced("import os\ndef f(x, flag):\n    os._exit(3)"))
        numbers = ", ".join(str(k) for k in range(2, 22))
        assert f"Tests {numbers}{more} were not run:" in score.feedback
        assert "Test 1: f(0, flag=True)\n  the program ended" in score.feedback
        assert "\nTest 2:" not in score.feedback  # not-run tests are listed, not detailed


def test_extracted_code_loses_surrounding_blank_lines_only():
    # Catches blank lines around the block kept (or inner newlines lost).
    assert extract_code("```python\n\n\nx = 1\n\ny = 2\n\n```") == "x = 1\n\ny = 2\n"


def test_feedback_at_its_cap_is_kept_whole(env, two_sum):
    # Feedback exactly as long as `max_feedback_chars` is not truncated; one more is.
    answer = fenced("def two_sum(nums, target):\n    return [0, 1]")
    full = env.score(two_sum, answer).feedback
    at_cap = CodeEnv(timeout_s=2, max_feedback_chars=len(full), difficulty="easy")
    assert at_cap.score(two_sum, answer).feedback == full
    below = CodeEnv(timeout_s=2, max_feedback_chars=len(full) - 1, difficulty="easy")
    assert below.score(two_sum, answer).feedback.endswith("\n... (truncated)")
    assert len(below.score(two_sum, answer).feedback) == len(full) - 1
    # a cap shorter than the marker keeps the first characters (a cap of 1 was 19 short of
    # the whole text: a negative slice), and 0 leaves none
    for cap in (0, 1, 16):
        tiny = CodeEnv(timeout_s=2, max_feedback_chars=cap, difficulty="easy")
        assert tiny.score(two_sum, answer).feedback == full[:cap]


def test_feedback_limits_below_zero_are_refused_and_zero_is_zero():
    """-1 cases sliced the last failing case off and counted one too many in "... and N
    more"; a per-case limit of 0 was read as "the default" (`or`)."""
    for name in ("max_feedback_cases", "max_feedback_chars"):
        with pytest.raises(ValueError, match=rf"^env_args\.{name}: expected a whole number >= 0"):
            CodeEnv(difficulty="easy", **{name: -1})
    with pytest.raises(ValueError, match=r"env_args\.case_timeout_s must be > 0, got 0"):
        CodeEnv(difficulty="easy", case_timeout_s=0)


def test_a_file_without_problems_is_refused(tmp_path):
    # Catches an empty problem list accepted (every later step would have nothing to do).
    path = tmp_path / "empty.jsonl"
    path.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems found"):
        load_problems(path)


def test_assert_tests_may_be_a_list_of_strings():
    # Each string is its own statement (catches the strings run together).
    prologue, cases = normalize_tests(["import math", "assert f(1) == 1", "assert f(4) == 2"])
    assert prologue == "import math"
    assert cases == [{"assert": "assert f(1) == 1"}, {"assert": "assert f(4) == 2"}]


def test_a_solution_column_is_the_items_reference(tmp_path):
    # "solution" stands for "reference" (catches it ignored: no reference answer).
    rec = {"prompt": "p", "entry_point": "f", "tests": [{"args": [], "expected": 1}]}
    path = write_jsonl(tmp_path / "p.jsonl", [{**rec, "solution": "def f():\n    return 1\n"}])
    env = CodeEnv(path=path, test_fraction=0.0)
    (item,) = env.train_items() + env.test_items()
    assert item.reference == "```python\ndef f():\n    return 1\n```"
    assert env.score(item, item.reference).reward == 1.0


def test_expected_values_of_call_cases_never_enter_the_sandbox(env, two_sum):
    # The program sees the arguments only; catches "expected" shipped with the cases.
    leak = "import __main__\ndef two_sum(nums, target):\n    print(__main__.CFG['cases'])\n"
    fb = env.score(two_sum, fenced(leak + "    return [0, 1]")).feedback
    printed = fb.split("printed: ", 1)[1].split("\n", 1)[0]
    assert "'args'" in printed and "expected" not in printed


def test_long_printed_output_is_cut_to_300_characters(env, two_sum):
    # Catches the printed-output cap off by one, in a failing test and while loading.
    noisy = "def two_sum(nums, target):\n    print('p' * 500)\n    return None"
    for code in (noisy, "print('p' * 500)\nraise ValueError"):
        fb = env.score(two_sum, fenced(code)).feedback
        printed = next(ln for ln in fb.splitlines() if ln.startswith("  printed: "))
        assert printed == "  printed: " + "p" * 285 + "... (500 chars)"


def test_failed_assert_operands_are_cut_to_100_characters(tmp_path):
    # Catches the operand cap in "AssertionError (a, b)" off by one.
    env, item = one_problem(tmp_path, "assert f(1) != 'y' * 200")
    fb = env.score(item, fenced("def f(x):\n    return 'y' * 200")).feedback
    shown = "'" + "y" * 84 + "... (202 chars)"
    assert f"  failed: AssertionError ({shown}, {shown})" in fb
