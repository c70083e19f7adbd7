"""Answer checkers shared by the file- and dataset-backed environments.

Three built-in scorers compare a model response with a gold value taken from the data:

* ``exact_match``: the response's final answer equals the gold answer (or one of a list
  of accepted answers) after SQuAD-style normalisation;
* ``numeric``: the last number of the response equals the gold number within a relative
  tolerance;
* ``regex``: the response matches a regular expression.

Each returns a `Score` whose feedback states what was expected (or, with the answer
hidden, what was found), since that sentence is all the teacher and the reflector learn
from; it does not repeat a wrong answer that it can correct. User-written scorers are
wrapped by `wrap_callable`, which accepts both TRL-style batched reward functions and
per-item functions (see its docstring for the rule that tells them apart).

A scorer call has a time limit (`time_limited`, the regex scorer's `timeout`): a user
function that hangs, or a pattern that backtracks without end on a long reply, raises
`ScorerTimeout` instead of hanging the run.

The answer-normalisation helpers live here rather than in ``qa.py`` so that the QA
environment and the dataset environment share them without importing each other.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import string
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from resd.envs.base import Item, Score, real_number
from resd.templating import strip_thinking

__all__ = [
    "BUILTIN_SCORERS",
    "ScorerTimeout",
    "answers_match",
    "exact_match",
    "extract_answer",
    "find_numbers",
    "gold_text",
    "normalize_answer",
    "numeric",
    "parse_gold_number",
    "regex",
    "resolve_scorer",
    "time_limited",
    "timeout_message",
    "to_score",
    "wrap_callable",
]

ScoreFn = Callable[[Item, str], Score]

# -- answer extraction and normalisation -----------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b(?![+#])")  # "A+" is a grade, not an article
_ANSWER_LINE = re.compile(
    r"^[\s*_#>-]*(?:the\s+)?(?:final\s+)?answer(?:\s+is)?\s*(?:\*\*|__)?\s*[:：]"
    r"\s*(?:\*\*|__)?\s*(.*)$",
    re.I,
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A number as people write it: optional sign, thousands separators, decimals, exponent.
# The look-behind keeps "3-5" from yielding -5 and "x2" or "v1.2" from yielding numbers; the
# look-ahead keeps "5.0.1", "12_000" and "2nd" from reading as 5.0, 12 and 2 (a version, a
# Python literal and an ordinal are not those numbers), while "10kg" still reads as 10.
_NUMBER = re.compile(
    r"(?<![\w.])[-−]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
    r"(?![\d_]|\.\d|(?i:st|nd|rd|th)\b)"
)
# What the punctuation stripping must keep, because it changes the answer: a sign before a
# number ("-5" is not "5", "-.5" is not ".5"), a decimal point inside or before one ("3.5"
# is not "3,5", ".5" is not "5"), and "+" or "#" closing a word ("C++" and "C#" are not "C").
_KEPT_MARK = re.compile(r"(?<![\w.])[-−](?=\.?\d)|(?<=\d)\.(?=\d)|(?<![\w.])\.(?=\d)|(?<=\w)[+#]+")
# Markdown emphasis with underscores around a number: "__5__", "_-3.5_", "___1,234___".
_UNDERSCORE_EMPHASIS = re.compile(r"(?<!\w)(_{1,3})([-−]?[\d.][\d.,]*)\1(?!\w)")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _strip_punctuation(text: str) -> str:
    """Punctuation becomes a space, except the marks `_KEPT_MARK` finds."""
    kept = {i for m in _KEPT_MARK.finditer(text) for i in range(m.start(), m.end())}
    return "".join(
        " " if _is_punctuation(ch) and i not in kept else ch for i, ch in enumerate(text)
    ).replace("−", "-")


def normalize_answer(text: Any) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace.

    SQuAD's normalisation, except that a number keeps its sign and decimal point and "C++"
    or "C#" keeps its "+" or "#": dropping those would make different answers equal.
    """
    text = _strip_punctuation(unicodedata.normalize("NFKC", str(text)).lower())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _answer_keys(text: Any) -> list[str]:
    """The forms of an answer from the fullest normalisation to the lightest.

    The lighter forms exist for golds that the full one empties: the multiple-choice
    option "A" (an article) or an answer that is all punctuation must not become "", which
    an empty reply also becomes.
    """
    lowered = unicodedata.normalize("NFKC", str(text)).lower()
    return [
        normalize_answer(lowered),
        " ".join(_strip_punctuation(lowered).split()),
        " ".join(lowered.split()),
    ]


def answers_match(answer: str, accepted: list[str]) -> bool:
    """Whether `answer` equals one of the `accepted` answers after normalisation.

    Each accepted answer is compared at the fullest normalisation that leaves it
    non-empty (see `_answer_keys`), and an answer that is empty at that level matches
    nothing, so an empty reply or "Answer: The" never earns the reward.
    """
    keys = _answer_keys(answer)
    for gold in accepted:
        for level, gold_key in enumerate(_answer_keys(gold)):
            if gold_key:
                if keys[level] and keys[level] == gold_key:
                    return True
                break
    return False


def gold_text(value: Any) -> str:
    """A gold value as text: a float as a person writes it (3, not 3.0), anything else str().

    The environments show this text as `Item.answer` and in feedback, so the scorer must
    compare against the same text: a parquet column of floats holds 3.0 for "3".
    """
    if isinstance(value, float) and math.isfinite(value):
        return format_number(value)
    return str(value)


def extract_answer(response: str) -> tuple[str, bool]:
    """The answer part of a response, and whether it came from an explicit answer line.

    Looks (after removing <think>...</think>, and a block the reply never closed) for the
    last line starting with "Answer:" (also "Final answer:", markdown bold allowed), then
    for the last \\boxed{...}, and otherwise takes the last non-empty line.
    """
    text = strip_thinking(response)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _ANSWER_LINE.match(line)
        if m:
            return _clean(m.group(1)), True
    boxed = _BOXED.findall(text)
    if boxed:
        return _clean(boxed[-1]), True
    return (_clean(lines[-1]) if lines else ""), False


def _clean(answer: str) -> str:
    answer = answer.strip()
    for wrapper in ("**", "__"):  # the closing half of "**Answer: x**"
        if answer.endswith(wrapper) and answer.count(wrapper) % 2 == 1:
            answer = answer[: -len(wrapper)].strip()
    for wrapper in ("**", "__", "`", "*"):
        if (
            answer.startswith(wrapper)
            and answer.endswith(wrapper)
            and len(answer) > 2 * len(wrapper)
        ):
            answer = answer[len(wrapper) : -len(wrapper)].strip()
    return answer.strip()


def find_numbers(text: str) -> list[tuple[str, float]]:
    """Every number in `text`, as written and as a float, in order of appearance.

    Markdown emphasis with underscores ("__5__", "_5_") is read through, as "**5**" is:
    `_NUMBER` takes "_" for part of a word, so without this "the total is __5__" held no
    number. An underscore inside a word or literal ("12_000", "x_1_") is not emphasis.
    """
    text = _UNDERSCORE_EMPHASIS.sub(lambda m: m.group(2).center(len(m.group(0))), text)
    found = []
    for m in _NUMBER.finditer(text):
        token = m.group(0)
        try:
            found.append((token, float(token.replace(",", "").replace("−", "-"))))
        except ValueError:  # pragma: no cover - the pattern only matches parsable numbers
            continue
    return found


def parse_gold_number(gold: Any) -> float | None:
    """The gold value of a numeric answer: the number itself, or the last number in a text.

    Taking the last number lets a GSM8K-style answer column ("... #### 72") be used as is.
    Returns None when there is no number (the environment reports that at load time).
    """
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (int, float)):
        return float(gold) if math.isfinite(gold) else None
    numbers = find_numbers(str(gold))
    return numbers[-1][1] if numbers else None


def format_number(value: float) -> str:
    """A float the way a person would write it: 42, not 42.0; 0.125, not 1.25e-01."""
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _quote(text: str, limit: int = 120) -> str:
    """A piece of model output, shortened, for a feedback sentence."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the built-in scorers --------------------------------------------------------------------


def exact_match(gold: Any, response: str, *, reveal_answer: bool = True) -> Score:
    """Normalised exact match of the response's final answer against `gold`.

    `gold` is one answer or a list of accepted answers (the first is the one the feedback
    names). The final answer is the last "Answer:" line, else the last \\boxed{}, else the
    last non-empty line; when no explicit answer is found the feedback says so, because a
    model that rambles on after its answer needs to hear that, not just "wrong".
    """
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    accepted = [gold_text(g) for g in golds]
    answer, explicit = extract_answer(response)
    if answers_match(answer, accepted):
        return Score(1.0, 1.0, "")
    note = "" if explicit else "No 'Answer:' line found; the last line was used. "
    if not answer:
        expected = f' The correct answer is "{accepted[0]}".' if reveal_answer else ""
        return Score(0.0, 0.0, "The response contains no answer." + expected)
    if not reveal_answer:
        return Score(0.0, 0.0, note + f'Incorrect: "{_quote(answer)}" is not the expected answer.')
    also = ""
    if len(accepted) > 1:
        also = " (also accepted: " + ", ".join(f'"{a}"' for a in accepted[1:4]) + ")"
    # The wrong answer is not repeated: a teacher that reads it in its context copies it.
    feedback = f'Incorrect. The correct answer is "{accepted[0]}"'
    return Score(0.0, 0.0, note + feedback + also + ".")


def numeric(
    gold: Any,
    response: str,
    *,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    reveal_answer: bool = True,
) -> Score:
    """The last number of the response against the gold number, within a relative tolerance.

    The number is taken from the explicit answer ("Answer:" line or \\boxed{}) when there
    is one, else from the whole response (thinking removed), so "Answer: 3 + 4 = 7" means
    7 and a trailing remark with a number in it would win: the feedback then says where
    the number was read. It names the number only when it cannot name the expected value
    (`reveal_answer=False`): a teacher that reads the wrong number in its context copies
    it. Thousands separators are allowed ("1,234").
    `abs_tol` only matters when the gold value is 0, where no relative tolerance can help.
    A list `gold` accepts any of its numbers.
    """
    golds = [parse_gold_number(g) for g in (gold if isinstance(gold, (list, tuple)) else [gold])]
    values = [g for g in golds if g is not None]
    if not values:  # the environment checks the data at load time; never raise on scoring
        return Score(0.0, 0.0, f"The checker has no valid gold number (got {gold!r}).")
    answer, explicit = extract_answer(response)
    where = "your answer line" if explicit else "the response"
    numbers = find_numbers(answer) if explicit else []
    if not numbers:
        where = "the response"
        numbers = find_numbers(strip_thinking(response))
    expected = format_number(values[0])
    tol = f" (relative tolerance {rel_tol:g})" if rel_tol > 0 else ""
    if not numbers:
        said = f"; the expected value is {expected}." if reveal_answer else "."
        return Score(0.0, 0.0, "The response contains no number" + said)
    token, value = numbers[-1]
    if any(math.isclose(value, g, rel_tol=rel_tol, abs_tol=abs_tol) for g in values):
        return Score(1.0, 1.0, "")
    if reveal_answer:
        feedback = f"Incorrect: the last number in {where} should be {expected}{tol}."
    else:
        feedback = (
            f"Incorrect: the last number in {where} is {token}, which is not the expected value."
        )
    return Score(0.0, 0.0, feedback)


def regex(
    pattern: Any,
    response: str,
    *,
    fullmatch: bool = False,
    reveal_answer: bool = True,
    timeout: float | None = None,
) -> Score:
    """Whether the response matches a regular expression (`re.search`, or `re.fullmatch`).

    The whole response is searched, thinking included, so format rewards of the kind TRL
    examples use (`^<think>.*?</think>...`) work; write inline flags such as `(?s)` or
    `(?i)` into the pattern. The feedback shows the end of the response, where a format
    usually goes wrong.

    `timeout` (seconds; None or 0: none) bounds the match, and a match that runs past it
    raises `TimeoutError`. With a limit the matching is done by the `regex` package
    (`re`-compatible), because `re` cannot be stopped: it holds the GIL, so not even a
    watchdog thread gets to run until a catastrophic backtrack ends. Without one, `re`
    matches, as it always did.
    """
    compiled = re.compile(str(pattern))
    text = response.strip() if fullmatch else response
    engine = _interruptible(compiled.pattern) if timeout else None
    if engine is None:  # no limit, or a pattern only `re` reads
        hit = compiled.fullmatch(text) if fullmatch else compiled.search(text)
    else:
        try:
            hit = (
                engine.fullmatch(text, timeout=timeout)
                if fullmatch
                else engine.search(text, timeout=timeout)
            )
        except TimeoutError as exc:
            raise TimeoutError(
                f"the pattern {compiled.pattern!r} did not finish in time on a reply of "
                f"{len(text)} characters (catastrophic backtracking?)"
            ) from exc
    if hit:
        return Score(1.0, 1.0, "")
    how = "as a whole " if fullmatch else ""
    wanted = f"the pattern {compiled.pattern!r}" if reveal_answer else "the required form"
    if not response.strip():
        return Score(0.0, 0.0, f"The response is empty; it must match {how}{wanted}.")
    tail = _quote(response.strip()[-120:])
    return Score(0.0, 0.0, f'The response does not match {how}{wanted}; it ends with "{tail}".')


def _interruptible(pattern: str) -> Any:
    """`pattern` compiled by the `regex` package, whose matching takes a timeout; None
    where that package reads the pattern differently from `re`."""
    import regex as regex_package

    try:
        return regex_package.compile(pattern)
    except (regex_package.error, ValueError, TypeError):
        return None


BUILTIN_SCORERS: dict[str, Callable[..., Score]] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "regex": regex,
}


def resolve_scorer(spec: str | Callable[..., Any], field: str = "env_args.scorer") -> Any:
    """A built-in scorer's name stays a name; "package.module:function" becomes the function.

    Returning the name (not the function) for built-ins lets the environment bind the
    gold value from its answer column, which a built-in needs and a user function does not.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"{field}: expected a scorer name or a callable, got {spec!r}")
    if spec in BUILTIN_SCORERS:
        return spec
    if ":" not in spec:
        known = ", ".join(sorted(BUILTIN_SCORERS))
        raise ValueError(
            f"{field}: unknown scorer {spec!r}; use one of {known} or 'module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{field}: cannot import module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{field}: module {module_name!r} has no function {attr!r}")
    return fn


# -- the time limit ----------------------------------------------------------------------


class ScorerTimeout(ValueError):
    """A scorer call ran past its time limit (`env_args.scorer_timeout`).

    A ValueError, the kind of error `resd train` reports in one line. Code that turns a
    scorer's errors into a failed score should let this one through: a scorer that hangs
    on one reply usually hangs on the next, each such call costs the whole limit, and
    each leaves its thread behind.
    """


def timeout_message(name: str, item_id: str, limit: float, what: str = "") -> str:
    """The one-line error of a scorer call that ran past `limit` seconds."""
    why = f": {what}" if what else ""
    return (
        f"env_args.scorer_timeout: the scorer {name} took longer than {limit:g} s on item "
        f"{item_id!r}{why}; raise env_args.scorer_timeout (0 or null: no limit) if it is "
        "just slow, or fix the scorer"
    )


def time_limited(score: ScoreFn, limit: float | None, name: str) -> ScoreFn:
    """`score`, raising `ScorerTimeout` when one call takes longer than `limit` seconds
    (None or 0: no limit, and no overhead).

    Each call runs in a daemon thread that the caller waits on with `join(limit)`. Not
    SIGALRM: a signal handler can only be set, and only runs, on the main thread, and
    scoring also runs elsewhere (the background learner and worker threads of `resd
    serve`). Python cannot kill a thread, so a call that hangs is left running, as a
    daemon that does not hold up the interpreter's exit, while the caller gets the error.
    A call stuck in C code that holds the GIL (`re` backtracking) cannot be waited out
    either: the limit is then enforced when it returns, which is why the regex scorer
    bounds its own matching. Starting a thread costs some 0.1 ms per call, nothing next
    to generating the reply.
    """
    if not limit:
        return score

    def limited(item: Item, response: str) -> Score:
        box: dict[str, Any] = {}

        def call() -> None:
            start = time.perf_counter()
            try:
                box["score"] = score(item, response)
            except BaseException as exc:  # handed to the caller's thread below
                box["error"] = exc
            box["seconds"] = time.perf_counter() - start

        worker = threading.Thread(target=call, name=f"resd-scorer-{name}", daemon=True)
        worker.start()
        worker.join(limit)
        if worker.is_alive() or box.get("seconds", 0.0) > limit:
            raise ScorerTimeout(timeout_message(name, item.id, limit))
        if "error" in box:
            raise box["error"]
        return box["score"]

    return limited


# -- user functions ----------------------------------------------------------------------


def to_score(value: Any, threshold: float = 1.0, name: str = "the scorer") -> Score:
    """A user function's result as a Score.

    A Score passes through once checked: a reward outside [0, 1] (or NaN, or infinite) or
    a feedback that is not text is a bug in the function named `name`, and is refused
    rather than trained on. A number v becomes Score(reward=1 if v >= threshold else 0,
    score=v clipped to [0, 1], feedback="The reward function gave v."): the only fact
    there is to report. None (TRL's "not applicable") counts as a failure that says so.
    """
    if isinstance(value, Score):
        if not (math.isfinite(value.reward) and 0.0 <= value.reward <= 1.0):
            raise ValueError(
                f"{name} returned a Score with reward {value.reward!r}; it must be in [0, 1]"
            )
        if not isinstance(value.feedback, str):
            raise TypeError(
                f"{name} returned a Score whose feedback is {type(value.feedback).__name__}, "
                'not text (use "" for no feedback)'
            )
        return value
    if value is None:
        return Score(0.0, 0.0, "The reward function gave no reward (None) for this response.")
    if isinstance(value, (bool, int, float)) or hasattr(value, "__float__"):
        v = float(value)
        if math.isnan(v):
            return Score(0.0, 0.0, "The reward function gave no reward (NaN) for this response.")
        shown = format_number(v) if math.isfinite(v) else str(v)
        return Score(float(v >= threshold), v, f"The reward function gave {shown}.")
    raise TypeError(f"{name} must return a Score or a number, got {type(value).__name__}")


_NOT_SUPPLIED = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def resolve_reward_functions(
    spec: list[Any], weights: list[Any] | None, field: str = "env_args.scorer"
) -> tuple[list[Callable[..., Any]], list[float]]:
    """A list of user scorers, as TRL's `reward_funcs`, with their `scorer_weights` (TRL's
    `reward_weights`; default 1 each), each checked now."""
    if not spec:
        raise ValueError(f"{field}: an empty list of reward functions")
    fns = [resolve_scorer(one, f"{field}[{i}]") for i, one in enumerate(spec)]
    builtin = next((fn for fn in fns if isinstance(fn, str)), None)
    if builtin is not None:
        raise ValueError(f"{field}: the built-in scorer {builtin!r} goes alone, not in a list "
                         "(a list holds your reward functions)")  # fmt: skip
    if weights is None:
        return fns, [1.0] * len(fns)
    if not isinstance(weights, (list, tuple)) or len(weights) != len(fns):
        raise ValueError(f"env_args.scorer_weights: one weight per reward function "
                         f"({len(fns)}), got {weights!r}")  # fmt: skip
    checked = [real_number(w, f"env_args.scorer_weights[{i}]", negative_ok=False)
               for i, w in enumerate(weights)]  # fmt: skip
    if not sum(checked) > 0:
        raise ValueError(f"env_args.scorer_weights: need a weight above 0, got {weights!r}")
    return fns, checked


def combine_scores(parts: list[ScoreFn], names: list[str], weights: list[float]) -> ScoreFn:
    """Several reward functions as one scorer. The reply succeeds when every function's
    reward does (a format check AND the answer); its partial score is the weighted mean of
    their scores (TRL sums `reward_weights` × rewards for GRPO's advantage: GRPO here with
    `pg_reward: score` follows that, up to its scale); the feedback names each function
    that did not give the reward, with what it said."""
    total = sum(weights)

    def combined(item: Item, response: str) -> Score:
        scores = [part(item, response) for part in parts]
        failed = [f"{name}: {s.feedback}" if s.feedback else name
                  for name, s in zip(names, scores, strict=True) if not s.success]  # fmt: skip
        return Score(
            reward=float(not failed),
            score=sum(w * s.score for w, s in zip(weights, scores, strict=True)) / total,
            feedback=" ".join(failed),
            parts={name: s.score for name, s in zip(names, scores, strict=True)},
        )

    return combined


def wrap_callable(
    fn: Callable[..., Any],
    *,
    columns: list[str],
    conversational: bool,
    threshold: float = 1.0,
    field: str = "env_args.scorer",
    timeout: float | None = None,
) -> ScoreFn:
    """Turn a user scorer into `(item, response) -> Score`, checking its signature now.

    Rule: if `fn` has a parameter named ``completions`` it is a TRL-style reward function
    and is called as ``fn(prompts=[p], completions=[c], **{column: [value]})`` with lists
    of one element, the columns being those kept in `Item.meta` (passed all at once if it
    takes ``**kwargs``, else only those it names), prompts and completions in TRL's
    conversational form (message lists) when the data is conversational, else as
    strings; it must return a list of one number (or None). Any other callable is called
    as ``fn(item, response)`` and returns a Score or a number. Numbers go through
    `to_score` with `threshold`. A parameter that cannot be supplied (a missing column, or
    TRL's ``completion_ids``, which a text-level scorer does not have) is an error here,
    not at the first rollout. Either kind of call is bounded by `timeout` seconds (see
    `time_limited`; None or 0: no limit).
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and "completions" in params:
        batched = _wrap_batched(fn, name, params, columns, conversational, threshold, field)
        return time_limited(batched, timeout, name)
    if params is not None:
        try:
            inspect.signature(fn).bind(None, "")
        except TypeError as exc:
            raise ValueError(
                f"{field}: {name} must take (item, response), or be a TRL reward function "
                f"with a 'completions' parameter: {exc}"
            ) from exc

    def per_item(item: Item, response: str) -> Score:
        return to_score(fn(item, response), threshold, name)

    return time_limited(per_item, timeout, name)


def _wrap_batched(
    fn: Callable[..., Any],
    name: str,
    params: Mapping[str, inspect.Parameter],
    columns: list[str],
    conversational: bool,
    threshold: float,
    field: str,
) -> ScoreFn:
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for pname, p in params.items():
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if p.default is not inspect.Parameter.empty or pname in ("prompts", "completions"):
            continue
        if pname in _NOT_SUPPLIED:
            raise ValueError(f"{field}: {name} needs {pname!r}, which RESD does not supply")
        if pname not in columns:
            raise ValueError(
                f"{field}: {name} needs the column {pname!r}, which the items do not carry; "
                f"columns available to it: {', '.join(columns) or '(none)'} "
                "(see env_args.meta_columns)"
            )
    passed = [c for c in columns if takes_all or c in params]
    pass_prompts = takes_all or "prompts" in params

    def batched(item: Item, response: str) -> Score:
        if conversational:
            prompt: Any = item.messages
            completion: Any = [{"role": "assistant", "content": response}]
        else:
            prompt, completion = item.prompt_text, response
        kwargs = {c: [item.meta.get(c)] for c in passed}
        if pass_prompts:
            kwargs["prompts"] = [prompt]
        out = fn(completions=[completion], **kwargs)
        if isinstance(out, (str, bytes)) or not hasattr(out, "__len__") or len(out) != 1:
            raise TypeError(
                f"{name} must return a list with one reward per completion, got {out!r}"
            )
        return to_score(out[0], threshold, name)

    return batched
