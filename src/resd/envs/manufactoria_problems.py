"""Seeded Manufactoria problems, each with a reference solution that passes its tests.

The public Manufactoria data sets live on a hub this project cannot reach, so problems
are generated here with the same rules and the same JSON-lines schema (see
`resd.envs.manufactoria.load_problems`). Every generator draws its parameters and its
test inputs from a `random.Random` seeded by a string, so a seed always produces the
same problems regardless of which other families or levels are requested.

Reference solutions are *built*, not hand-written: each family compiles its parameters
into a small finite automaton and renders it as a program. They serve as SDFT
demonstrations and as proof that the verifier can give reward 1, so they carry comments
that explain the automaton's states.

Difficulty levels (shared by every family)::

    level 1: colours R, B          pattern length 1-2
    level 2: colours R, B          pattern length 3-5
    level 3: colours R, B, Y, G    pattern length 1-2
    level 4: colours R, B, Y, G    pattern length 3-5

Known limitation: `prepend_sequence` needs a marker colour that cannot occur in the input
(the machine can only write at the back, so it rotates the input behind the new prefix
and must see where the input ends). With all four colours in the input no colour is
free, so the four-colour levels of that family keep R/B inputs (the prefix itself may
use all four colours) and use Y as the marker. Full four-colour-input prepend is not
generated.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TWO_COLORS = "RB"
FOUR_COLORS = "RBYG"
PAINTER_OF = {
    "R": "PAINTER_RED",
    "B": "PAINTER_BLUE",
    "Y": "PAINTER_YELLOW",
    "G": "PAINTER_GREEN",
}
_COLOR_WORDS = {"RB": "R and B", "RBYG": "R, B, Y and G"}


@dataclass(frozen=True)
class TestCase:
    """One test in the public data set's schema.

    `expected_output` only matters when `check_output` is true (transformation
    problems); acceptance problems ignore the final tape.
    """

    __test__ = False  # not a pytest test class, despite the name

    input: str
    expected_accepted: bool
    expected_output: str = ""
    check_output: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "expected_output": self.expected_output,
            "expected_accepted": self.expected_accepted,
            "check_output": self.check_output,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestCase:
        # The data set may write null for "no output"; normalise so comparisons work.
        return cls(
            input=str(data.get("input") or ""),
            expected_accepted=bool(data["expected_accepted"]),
            expected_output=str(data.get("expected_output") or ""),
            check_output=bool(data.get("check_output", False)),
        )


@dataclass
class Problem:
    """A problem statement, its tests and (when known) a reference program."""

    name: str
    description: str
    test_cases: list[TestCase]
    solution: str | None = None
    family: str = ""
    level: int = 0
    colors: str = TWO_COLORS

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "test_cases": [t.to_dict() for t in self.test_cases],
        }
        if self.solution is not None:
            data["solution"] = self.solution
        if self.family:
            data["family"] = self.family
            data["level"] = self.level
        return data


@dataclass(frozen=True)
class Level:
    colors: str
    min_len: int
    max_len: int


LEVELS: dict[int, Level] = {
    1: Level(TWO_COLORS, 1, 2),
    2: Level(TWO_COLORS, 3, 5),
    3: Level(FOUR_COLORS, 1, 2),
    4: Level(FOUR_COLORS, 3, 5),
}

ACCEPTANCE_TESTS = 14
TRANSFORM_TESTS = 10


# --------------------------------------------------------------------------- program text


class _ProgramWriter:
    """Renders automata as DSL text, hiding the two-puller dance of four-colour reads."""

    def __init__(self, colors: str, title: str) -> None:
        self.colors = colors
        self.title = title
        self.blocks: list[str] = []
        self.start_target = "NONE"

    def painter(self, node_id: str, color: str, target: str, note: str = "") -> None:
        self._add(note, f"{PAINTER_OF[color]} {node_id}:", [f"NEXT {target}"])

    def reader(self, node_id: str, targets: dict[str, str], note: str = "") -> None:
        """Branch on the front symbol (removing it) or on the empty tape.

        `targets` maps R/B/Y/G/EMPTY to node ids; missing keys mean NONE and are left
        unwritten. In four-colour problems PULLER_RB sends Y, G and the empty tape alike
        to [EMPTY], so a PULLER_YG behind it tells them apart. That second puller is
        skipped only when Y, G and EMPTY all reject: routing them straight to another
        node would skip removing the Y/G symbol.
        """
        rb = {k: targets[k] for k in ("R", "B") if k in targets}
        yg = {k: targets[k] for k in ("Y", "G", "EMPTY") if k in targets}
        if self.colors == TWO_COLORS:
            if "EMPTY" in targets:
                rb["EMPTY"] = targets["EMPTY"]
            self._add(note, f"PULLER_RB {node_id}:", _branch_lines(rb))
            return
        if yg:
            rb["EMPTY"] = f"{node_id}_yg"
        self._add(note, f"PULLER_RB {node_id}:", _branch_lines(rb))
        if yg:
            self._add("", f"PULLER_YG {node_id}_yg:", _branch_lines(yg))

    def render(self) -> str:
        parts = [f"# {self.title}", f"START start:\n    NEXT {self.start_target}", *self.blocks]
        parts.append("END end")
        return "\n\n".join(parts) + "\n"

    def _add(self, note: str, header: str, lines: list[str]) -> None:
        text = (f"# {note}\n" if note else "") + header
        text += "".join(f"\n    {line}" for line in lines)
        self.blocks.append(text)


def _branch_lines(targets: dict[str, str]) -> list[str]:
    order = ["R", "B", "Y", "G", "EMPTY"]
    return [f"[{k}] {targets[k]}" for k in order if k in targets]


# --------------------------------------------------------------------------- automata


def _kmp_step(pattern: str, matched: int, symbol: str) -> int:
    """Longest prefix of `pattern` that is a suffix of pattern[:matched] + symbol.

    This is the KMP automaton's transition, computed naively (patterns are short).
    Resetting to 0 on a mismatch instead would miss e.g. RRB inside RRRB.
    """
    text = pattern[:matched] + symbol
    for k in range(min(len(pattern), len(text)), -1, -1):
        if text.endswith(pattern[:k]):
            return k
    return 0  # unreachable: k = 0 always matches


def _state(i: int) -> str:
    return f"s{i}"


def _solve_prefix(pattern: str, colors: str, exact: bool, title: str) -> str:
    """starts_with / exact_sequence: check the symbols one by one, reject on the first miss."""
    w = _ProgramWriter(colors, title)
    w.start_target = _state(0)
    m = len(pattern)
    for i, symbol in enumerate(pattern):
        target = _state(i + 1) if (exact or i + 1 < m) else "end"
        w.reader(_state(i), {symbol: target}, note=f"{_state(i)}: read {pattern[:i] or 'nothing'}")
    if exact:
        w.reader(
            _state(m), {"EMPTY": "end"}, note=f"{_state(m)}: whole pattern read, tape must end"
        )
    return w.render()


def _solve_kmp(pattern: str, colors: str, need_end: bool, title: str) -> str:
    """contains_substring (need_end=False) and ends_with (need_end=True).

    State i = the longest prefix of the pattern that the tape read so far ends with.
    For `contains`, reaching the full pattern accepts at once; for `ends_with` it keeps
    reading and accepts only if the tape runs out in the full-match state.
    """
    w = _ProgramWriter(colors, title)
    w.start_target = _state(0)
    m = len(pattern)
    last = m if need_end else m - 1
    for i in range(last + 1):
        targets = {}
        for symbol in colors:
            nxt = _kmp_step(pattern, i, symbol)
            targets[symbol] = "end" if (nxt == m and not need_end) else _state(nxt)
        if need_end and i == m:
            targets["EMPTY"] = "end"
        w.reader(
            _state(i),
            targets,
            note=f"{_state(i)}: the symbols read so far end with {pattern[:i] or 'no part of the pattern'}",
        )
    return w.render()


def _solve_ordered(pattern: str, colors: str, title: str) -> str:
    """contains_ordered: wait for the next wanted symbol, skipping everything else."""
    w = _ProgramWriter(colors, title)
    w.start_target = _state(0)
    m = len(pattern)
    for i, wanted in enumerate(pattern):
        targets = {c: _state(i) for c in colors}
        targets[wanted] = "end" if i + 1 == m else _state(i + 1)
        w.reader(
            _state(i),
            targets,
            note=f"{_state(i)}: found {pattern[:i] or 'nothing'}, waiting for {wanted}",
        )
    return w.render()


def _solve_count(color: str, k: int, exactly: bool, colors: str, title: str) -> str:
    """contains_count: state i = number of `color` symbols seen so far (capped)."""
    w = _ProgramWriter(colors, title)
    w.start_target = _state(0)
    for i in range(k + 1 if exactly else k):
        targets = {c: _state(i) for c in colors if c != color}
        if exactly:
            if i < k:
                targets[color] = _state(i + 1)  # one more; a (k+1)-th goes to NONE
            if i == k:
                targets["EMPTY"] = "end"
        else:
            targets[color] = "end" if i + 1 == k else _state(i + 1)
        w.reader(_state(i), targets, note=f"{_state(i)}: {i} {color} seen so far")
    return w.render()


def _solve_append(suffix: str, colors: str, title: str) -> str:
    w = _ProgramWriter(colors, title)
    ids = [f"paint{i}" for i in range(len(suffix))]
    w.start_target = ids[0]
    for i, color in enumerate(suffix):
        w.painter(ids[i], color, ids[i + 1] if i + 1 < len(suffix) else "end")
    return w.render()


def _solve_prepend(prefix: str, colors: str, title: str) -> str:
    """Rotate the tape: mark its end with Y, write the prefix, then move the input behind it.

    Start: x. After the marker and the prefix: x Y P. Copying every R/B from the front
    to the back gives Y P x; removing the Y leaves P x. This relies on the input being
    R/B only: a Y inside the input would be mistaken for the marker.
    """
    w = _ProgramWriter(colors, title)
    w.start_target = "mark"
    ids = [f"prefix{i}" for i in range(len(prefix))]
    w.painter("mark", "Y", ids[0], note="mark where the input ends")
    for i, color in enumerate(prefix):
        note = "write the new prefix behind the marker" if i == 0 else ""
        w.painter(ids[i], color, ids[i + 1] if i + 1 < len(prefix) else "copy", note=note)
    w.blocks.append(
        "# move the input, symbol by symbol, from the front to the back\n"
        "PULLER_RB copy:\n    [R] copy_r\n    [B] copy_b\n    [EMPTY] unmark\n\n"
        "PAINTER_RED copy_r:\n    NEXT copy\n\n"
        "PAINTER_BLUE copy_b:\n    NEXT copy\n\n"
        "# the marker is at the front now: drop it and stop\n"
        "PULLER_YG unmark:\n    [Y] end"
    )
    return w.render()


# --------------------------------------------------------------------------- tests


def _word(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def _mutate(rng: random.Random, word: str, alphabet: str) -> str:
    """The same word with one symbol changed: the typical near miss."""
    i = rng.randrange(len(word))
    other = rng.choice([c for c in alphabet if c != word[i]])
    return word[:i] + other + word[i + 1 :]


def _acceptance_tests(
    rng: random.Random,
    alphabet: str,
    accepts: Callable[[str], bool],
    specials: list[str],
    max_len: int,
) -> list[TestCase]:
    """Edge cases first (kept even beyond the quota), then random tapes up to the quota.

    Expected results always come from `accepts`, the plain-Python rule, never from the
    reference program: the tests must be able to catch a wrong reference.
    """
    inputs: list[str] = []
    for tape in ["", *specials]:
        if tape not in inputs:
            inputs.append(tape)
    for _ in range(50 * ACCEPTANCE_TESTS):
        if len(inputs) >= ACCEPTANCE_TESTS:
            break
        tape = _word(rng, alphabet, rng.randint(1, max_len))
        if tape not in inputs:
            inputs.append(tape)
    return [TestCase(tape, accepts(tape)) for tape in inputs]


def _transform_tests(
    rng: random.Random, alphabet: str, transform: Callable[[str], str], specials: list[str]
) -> list[TestCase]:
    inputs: list[str] = []
    for tape in ["", *specials]:
        if tape not in inputs:
            inputs.append(tape)
    for _ in range(50 * TRANSFORM_TESTS):
        if len(inputs) >= TRANSFORM_TESTS:
            break
        tape = _word(rng, alphabet, rng.randint(1, 8))
        if tape not in inputs:
            inputs.append(tape)
    return [TestCase(t, True, transform(t), check_output=True) for t in inputs]


def _colours_sentence(alphabet: str) -> str:
    return f"Input tapes contain only the colours {_COLOR_WORDS[alphabet]}."


def _examples_sentence(tests: list[TestCase]) -> str:
    """One accepted and one rejected example make a description unambiguous."""
    yes = next((t.input for t in tests if t.expected_accepted and t.input), None)
    no = next((t.input for t in tests if not t.expected_accepted and t.input), None)
    parts = []
    if yes:
        parts.append(f"{yes} is accepted")
    if no:
        parts.append(f"{no} is rejected")
    return f" For example, {' and '.join(parts)}." if parts else ""


# --------------------------------------------------------------------------- families

# A family draws its parameters from `rng` and returns a finished Problem. The problem
# name encodes every parameter, so equal names mean equal problems (used to dedupe).
Family = Callable[[random.Random, int], Problem]


def _pattern(rng: random.Random, level: int) -> str:
    spec = LEVELS[level]
    return _word(rng, spec.colors, rng.randint(spec.min_len, spec.max_len))


def _pattern_problem(rng: random.Random, level: int, family: str) -> Problem:
    """The four families whose answer depends on one contiguous pattern."""
    alphabet = LEVELS[level].colors
    p = _pattern(rng, level)
    m = len(p)

    def junk() -> str:
        return _word(rng, alphabet, rng.randint(1, max(2, m)))

    near = _mutate(rng, p, alphabet)
    specials = [p, near, p[:-1], p[1:]]
    accepts: Callable[[str], bool]
    if family == "starts_with":
        specials += [p + junk(), p + junk(), junk() + p, near + junk()]
        text = f"Accept the tape if it starts with {p}; otherwise reject it."
        title = f"accept iff the tape starts with {p}"
        solution = _solve_prefix(p, alphabet, exact=False, title=title)

        def accepts(t: str) -> bool:
            return t.startswith(p)

    elif family == "ends_with":
        specials += [junk() + p, junk() + p, p + junk(), junk() + near, p + p]
        text = f"Accept the tape if it ends with {p}; otherwise reject it."
        title = f"accept iff the tape ends with {p} (KMP automaton)"
        solution = _solve_kmp(p, alphabet, need_end=True, title=title)

        def accepts(t: str) -> bool:
            return t.endswith(p)

    elif family == "exact_sequence":
        specials += [p + rng.choice(alphabet), rng.choice(alphabet) + p, p + p, near + p]
        text = (
            f"Accept the tape only if it is exactly {p}, with nothing before or after it; "
            "reject every other tape."
        )
        title = f"accept iff the tape is exactly {p}"
        solution = _solve_prefix(p, alphabet, exact=True, title=title)

        def accepts(t: str) -> bool:
            return t == p

    else:  # contains_substring, the paper's HAS task
        # p[:k] + p: a partial match that breaks off, then the real one. A machine that
        # restarts from scratch after a mismatch (instead of KMP fallback) fails these.
        traps = [p[: rng.randint(1, m - 1)] + p for _ in range(2)] if m > 1 else []
        specials += [junk() + p + junk(), junk() + p, p + junk(), junk() + near + junk(), *traps]
        text = (
            f"Accept the tape if it contains {p} as a contiguous sequence anywhere; "
            "otherwise reject it."
        )
        title = f"accept iff the tape contains {p} (KMP automaton)"
        solution = _solve_kmp(p, alphabet, need_end=False, title=title)

        def accepts(t: str) -> bool:
            return p in t

    tests = _acceptance_tests(rng, alphabet, accepts, specials, max_len=m + 6)
    description = f"{text} {_colours_sentence(alphabet)}{_examples_sentence(tests)}"
    name = f"{family}_{p}_{len(alphabet)}c"
    return Problem(name, description, tests, solution, family, level, alphabet)


def _starts_with(rng: random.Random, level: int) -> Problem:
    return _pattern_problem(rng, level, "starts_with")


def _ends_with(rng: random.Random, level: int) -> Problem:
    return _pattern_problem(rng, level, "ends_with")


def _exact_sequence(rng: random.Random, level: int) -> Problem:
    return _pattern_problem(rng, level, "exact_sequence")


def _contains_substring(rng: random.Random, level: int) -> Problem:
    return _pattern_problem(rng, level, "contains_substring")


def _is_subsequence(pattern: str, tape: str) -> bool:
    rest = iter(tape)
    return all(symbol in rest for symbol in pattern)


def _contains_ordered(rng: random.Random, level: int) -> Problem:
    alphabet = LEVELS[level].colors
    p = _pattern(rng, level)

    def spread(word: str) -> str:
        return "".join(_word(rng, alphabet, rng.randint(0, 2)) + c for c in word)

    specials = [p, spread(p), spread(p) + _word(rng, alphabet, 2), p[::-1], p[:-1], spread(p[1:])]
    specials += [spread(_mutate(rng, p, alphabet)), spread(p)]
    tests = _acceptance_tests(
        rng, alphabet, lambda t: _is_subsequence(p, t), specials, max_len=2 * len(p) + 4
    )
    shown = ", ".join(p)
    text = (
        f"Accept the tape if it contains the colours {shown} in this order, not necessarily "
        "next to each other (other symbols may come in between); otherwise reject it."
    )
    title = f"accept iff {shown} occur in this order"
    description = f"{text} {_colours_sentence(alphabet)}{_examples_sentence(tests)}"
    solution = _solve_ordered(p, alphabet, title)
    name = f"contains_ordered_{p}_{len(alphabet)}c"
    return Problem(name, description, tests, solution, "contains_ordered", level, alphabet)


def _contains_count(rng: random.Random, level: int) -> Problem:
    spec = LEVELS[level]
    alphabet = spec.colors
    k = rng.randint(spec.min_len, spec.max_len)
    color = rng.choice(alphabet)
    exactly = rng.random() < 0.5
    others = "".join(c for c in alphabet if c != color)

    def with_count(n: int) -> str:
        symbols = [color] * n + [rng.choice(others) for _ in range(rng.randint(0, 4))]
        rng.shuffle(symbols)
        return "".join(symbols)

    rule = f"exactly {k}" if exactly else f"at least {k}"

    def accepts(t: str) -> bool:
        n = t.count(color)
        return n == k if exactly else n >= k

    specials = [color * k, color * (k - 1), color * (k + 1), with_count(k), with_count(k)]
    specials += [with_count(k - 1), with_count(k + 1), with_count(k + 2), others * 2]
    tests = _acceptance_tests(rng, alphabet, accepts, specials, max_len=k + 6)
    text = f"Accept the tape if it contains {rule} {color} symbols (anywhere on the tape); otherwise reject it."
    description = f"{text} {_colours_sentence(alphabet)}{_examples_sentence(tests)}"
    title = f"accept iff the tape holds {rule} {color}"
    solution = _solve_count(color, k, exactly, alphabet, title)
    mode = "exactly" if exactly else "atleast"
    name = f"contains_count_{mode}{k}{color}_{len(alphabet)}c"
    return Problem(name, description, tests, solution, "contains_count", level, alphabet)


def _append_sequence(rng: random.Random, level: int) -> Problem:
    alphabet = LEVELS[level].colors
    s = _pattern(rng, level)
    tests = _transform_tests(rng, alphabet, lambda t: t + s, [s, _word(rng, alphabet, 3)])
    example = next(t for t in tests if t.input)
    description = (
        f"Append {s} to the end of the tape: accept every tape and leave exactly the input "
        f"followed by {s} on it. {_colours_sentence(alphabet)} For example, "
        f"{example.input} must become {example.expected_output}. The final tape is checked."
    )
    solution = _solve_append(s, alphabet, f"append {s} to the tape")
    name = f"append_sequence_{s}_{len(alphabet)}c"
    return Problem(name, description, tests, solution, "append_sequence", level, alphabet)


def _prepend_sequence(rng: random.Random, level: int) -> Problem:
    palette = LEVELS[level].colors
    inputs = TWO_COLORS  # see the module docstring: the marker needs a colour of its own
    s = _pattern(rng, level)
    tests = _transform_tests(rng, inputs, lambda t: s + t, [_word(rng, inputs, 2), "RB" * 3])
    example = next(t for t in tests if t.input)
    description = (
        f"Put {s} in front of the tape: accept every tape and leave exactly {s} followed by "
        "the original input on it. Input tapes contain only the colours R and B; the program "
        "may paint any of R, B, Y and G along the way. "
        f"For example, {example.input} must become {example.expected_output}. "
        "The final tape is checked."
    )
    solution = _solve_prepend(s, FOUR_COLORS, f"prepend {s} to the tape")
    name = f"prepend_sequence_{s}_{len(palette)}c"
    return Problem(name, description, tests, solution, "prepend_sequence", level, palette)


FAMILIES: dict[str, Family] = {
    "starts_with": _starts_with,
    "ends_with": _ends_with,
    "exact_sequence": _exact_sequence,
    "contains_substring": _contains_substring,
    "contains_ordered": _contains_ordered,
    "contains_count": _contains_count,
    "append_sequence": _append_sequence,
    "prepend_sequence": _prepend_sequence,
}


def generate_problems(
    seed: int = 0,
    families: Sequence[str] | str | None = None,
    levels: Sequence[int] | int | None = None,
    n_per_level: int = 10,
) -> list[Problem]:
    """Up to `n_per_level` distinct problems per (family, level), in a stable order.

    Small levels have few distinct patterns (two-colour, length 1-2: six), so a level
    can yield fewer problems than asked; names are unique across the whole result.
    Each (family, level) gets its own RNG so selections do not shift each other.
    """
    chosen = _as_list(families, list(FAMILIES))
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise ValueError(f"families: unknown {unknown}; known: {sorted(FAMILIES)}")
    try:
        wanted_levels = [int(x) for x in _as_list(levels, list(LEVELS))]
    except (TypeError, ValueError):
        raise ValueError(
            f"levels: expected numbers from {sorted(LEVELS)}, got {levels!r}"
        ) from None
    bad = [x for x in wanted_levels if x not in LEVELS]
    if bad:
        raise ValueError(f"levels: unknown {bad}; known: {sorted(LEVELS)}")
    problems: list[Problem] = []
    seen: set[str] = set()
    for family in chosen:
        for level in wanted_levels:
            rng = random.Random(f"manufactoria:{seed}:{family}:{level}")
            made = misses = 0
            # Stop after a run of repeats: the level has no new patterns left.
            while made < n_per_level and misses < 200:
                problem = FAMILIES[family](rng, level)
                if problem.name in seen:
                    misses += 1
                    continue
                seen.add(problem.name)
                problems.append(problem)
                made += 1
                misses = 0
    return problems


def _as_list(value: Any, default: list[Any]) -> list[Any]:
    """Config files give one family as a plain string; treat it as a one-item list."""
    if value is None:
        return default
    if isinstance(value, (str, int)):
        return [value]
    return list(value)
