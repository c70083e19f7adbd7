"""Manufactoria: interpreter, parser errors, generated problems, scoring and loading."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from resd.envs import make_env
from resd.envs.manufactoria import (
    LOOP_REASON,
    MAX_VISITS,
    NO_PROGRAM_MESSAGE,
    ManufactoriaEnv,
    ParseError,
    Problem,
    TestCase,
    _cap,
    extract_program,
    generate_problems,
    load_problems,
    parse,
    run,
    save_problems,
    score_program,
    score_response,
)
from resd.envs.manufactoria_problems import ACCEPTANCE_TESTS, FAMILIES, LEVELS, TRANSFORM_TESTS

STARTS_WITH_R = """\
START start:
    NEXT first

# B and EMPTY are not written, so they go to NONE and reject
PULLER_RB first:
    [R] end

END end
"""


def fenced(program: str) -> str:
    return f"Here is my program.\n```manufactoria\n{program}\n```\n"


# --------------------------------------------------------------------------- interpreter


def test_spec_example_accepts_and_removes_the_pulled_symbol():
    result = run(STARTS_WITH_R, "RBB")
    assert result.accepted
    assert result.tape == "BB"
    assert result.reason == ""
    assert result.path == ["start", "first", "end"]
    assert result.loop_node is None
    assert result.front_symbol is None


def test_unwritten_branch_goes_to_none_and_keeps_the_symbol():
    result = run(STARTS_WITH_R, "BR")
    assert not result.accepted
    assert result.tape == "BR"  # a branch to NONE removes nothing
    assert result.path == ["start", "first"]
    assert result.front_symbol == "B"
    assert "[B]" in result.reason and "NONE" in result.reason
    assert "not written" in result.reason


def test_empty_tape_takes_the_empty_branch():
    result = run(STARTS_WITH_R, "")
    assert not result.accepted
    assert result.front_symbol == ""
    assert "[EMPTY]" in result.reason
    accept_empty = "START start:\n NEXT p\nPULLER_RB p:\n [EMPTY] end\nEND end"
    assert run(accept_empty, "").accepted
    assert not run(accept_empty, "R").accepted


def test_explicit_none_target_is_not_reported_as_unwritten():
    program = "START start:\n  NEXT p\nPULLER_RB p:\n  [R] NONE\n  [B] end\nEND end"
    result = run(program, "RB")
    assert not result.accepted
    assert "NONE" in result.reason and "not written" not in result.reason
    assert run(program, "BR").accepted
    next_none = run("START start:\n NEXT NONE\nEND end", "R")
    assert not next_none.accepted and "NEXT" in next_none.reason


def test_painters_append_at_the_back():
    program = """
    START start:
        NEXT take
    PULLER_RB take:
        [R] blue
    PAINTER_BLUE blue:
        NEXT green
    PAINTER_GREEN green:
        NEXT yellow
    PAINTER_YELLOW yellow:
        NEXT red
    PAINTER_RED red:
        NEXT end
    END end
    """
    result = run(program, "RR")
    assert result.accepted
    assert result.tape == "RBGYR"
    assert result.path == ["start", "take", "blue", "green", "yellow", "red", "end"]


def test_four_colour_pullers():
    # PULLER_RB sends Y/G to [EMPTY] without removing them; PULLER_YG then removes Y.
    program = """
    START start:
        NEXT rb
    PULLER_RB rb:
        [R] end
        [EMPTY] yg
    PULLER_YG yg:
        [Y] end
        [EMPTY] empty
    PAINTER_GREEN empty:
        NEXT end
    END end
    """
    assert run(program, "YR").tape == "R"
    assert run(program, "RY").tape == "Y"
    on_g = run(program, "GR")
    assert not on_g.accepted and on_g.front_symbol == "G" and on_g.path == ["start", "rb", "yg"]
    on_b = run(program, "B")
    assert not on_b.accepted and on_b.front_symbol == "B"
    assert run(program, "").tape == "G"  # truly empty: both pullers take [EMPTY]
    # PULLER_YG on an R front: the [EMPTY] branch, nothing removed.
    yg_first = "START start:\n NEXT yg\nPULLER_YG yg:\n [EMPTY] end\nEND end"
    assert run(yg_first, "RB").tape == "RB"


def test_infinite_loop_stops_at_the_visit_limit_and_names_the_node():
    result = run("START start:\n  NEXT spin\nPAINTER_RED spin:\n  NEXT spin\nEND end", "B")
    assert not result.accepted
    assert result.reason == LOOP_REASON
    assert result.loop_node == "spin"
    assert len(result.path) == MAX_VISITS == 1000
    assert result.tape == "B" + "R" * 999  # start once, then 999 paints
    assert result.front_symbol == "B"
    # A two-node cycle that reads nothing: the loop node is one of the cycle's nodes.
    cycle = "START start:\n NEXT a\nPULLER_RB a:\n [EMPTY] b\nPULLER_YG b:\n [EMPTY] a\nEND end"
    looped = run(cycle, "")
    assert looped.reason == LOOP_REASON and looped.loop_node in {"a", "b"}


def test_visit_limit_boundary_is_exactly_1000_visits():
    # start + (n + 1) visits of `eat` + end = n + 3 visits.
    eat = "START start:\n NEXT eat\nPULLER_RB eat:\n [R] eat\n [EMPTY] end\nEND end"
    program = parse(eat)
    fits = program.run("R" * 997)
    assert fits.accepted and fits.steps == 1000
    too_long = program.run("R" * 998)
    assert not too_long.accepted and too_long.reason == LOOP_REASON
    assert too_long.steps == 1000 and too_long.loop_node == "end"


def test_comments_free_indentation_and_forward_references():
    program = parse(
        """
        # leading comment
                START start:   # trailing comment
        NEXT node_2
          END end
          PULLER_RB   node_2 :
                  [B] end   # accept on B
              [R]   node_2
        """
    )
    assert program.run("RRB").accepted
    assert not program.run("RR").accepted
    assert run(program, "B").accepted  # run() takes an already parsed program too


def test_tapes_must_use_the_four_colours():
    with pytest.raises(ValueError, match="symbols"):
        run(STARTS_WITH_R, "RX")


# --------------------------------------------------------------------------- parse errors

PARSE_ERRORS = [
    (
        "START start:\n NEXT a\nPULER_RB a:\n [R] end\nEND end",
        3,
        "unknown node type 'PULER_RB' (known: START, END, PULLER_RB, PULLER_YG, PAINTER_RED,",
    ),
    ("START start:\n NEXT a\npuller_rb a:\n [R] end\nEND end", 3, "upper-case"),
    ("PULLER_RB a:\n [R] end\nEND end", 1, "missing START"),
    ("START start:\n NEXT a\nPULLER_RB a:\n [R] a\n", 4, "missing END"),
    ("START start:\n NEXT nowhere\nEND end", 2, "undefined node 'nowhere'"),
    (
        "START start:\n NEXT a\nPULLER_RB a:\n [R] end\n [B] gone\nEND end",
        5,
        "undefined node 'gone'",
    ),
    (
        "START start:\n NEXT a\nPULLER_RB a:\n [R] end\nPULLER_YG a:\n [Y] end\nEND end",
        5,
        "duplicate",
    ),
    ("START start:\n NEXT end\nEND end:", 3, "END takes no colon"),
    ("START start:\n NEXT a\nPULLER_RB a\n [R] end\nEND end", 3, "missing ':'"),
    ("START start\n NEXT end\nEND end", 1, "missing ':'"),
    ("START begin:\n NEXT end\nEND end", 1, "must be 'start'"),
    ("START start:\n NEXT end\nEND finish", 3, "must be 'end'"),
    (
        "START start:\n NEXT a\nPULLER_RB a:\n [Y] end\nEND end",
        4,
        "no [Y] branch (allowed: [R], [B], [EMPTY])",
    ),
    ("START start:\n NEXT a\nPULLER_RB a:\n [r] end\nEND end", 4, "upper-case"),
    ("START start:\n NEXT a\nPULLER_RB a:\n [R]\nEND end", 4, "needs a target"),
    ("START start:\n NEXT a\nPULLER_RB a:\n [R] end a\nEND end", 4, "bad target"),
    ("START start:\n NEXT a\nPULLER_RB a:\n R end\nEND end", 4, "unknown node type"),
    ("START start:\n NEXT a\nPULLER_RB a:\n [R end\nEND end", 4, "bad branch line"),
    ("START start:\n NEXT a\nPULLER_RB a:\n [R] end\n [R] a\nEND end", 5, "written twice"),
    (
        "START start:\n NEXT a\nPULLER_RB a:\n NEXT end\nEND end",
        4,
        "take branch lines [R]/[B]/[EMPTY], not NEXT",
    ),
    ("START start:\n NEXT p\nPAINTER_RED p:\n [R] end\nEND end", 4, "not branch lines"),
    ("START start:\n NEXT end\n NEXT end\nEND end", 3, "more than one NEXT"),
    ("START start:\n NEXT: end\nEND end", 2, "NEXT takes no colon"),
    ("NEXT a\nSTART start:\n NEXT end\nEND end", 1, "outside any node"),
    ("START start:\n NEXT end\nEND end\n NEXT start", 4, "END node takes no"),
    ("START start:\n  # no NEXT here\nEND end", 1, "has no NEXT line"),
    ("START start:\n NEXT NONE\nPAINTER_RED NONE:\n NEXT end\nEND end", 3, "reserved"),
    ("START start:\n NEXT end\nPAINTER_RED end:\n NEXT end", 3, "reserved"),
    ("START start:\n NEXT a\nPAINTER_RED a-b:\n NEXT end\nEND end", 3, "bad node header"),
    # A header with no id at all (was an IndexError, not a ParseError, if mis-split).
    ("START start:\n NEXT a\nPULLER_RB\n [R] end\nEND end", 3, "PULLER_RB needs a node id"),
    # Another node may not take the id 'start' (else it would become the entry point).
    ("PAINTER_RED start:\n NEXT end\nEND end", 1, "reserved for the START node"),
    ("START start:\n NEXT\nEND end", 2, "NEXT needs a target node id"),
    ("START start:\n next end\nEND end", 2, "keywords are upper-case"),
    ("START start:\n next: end\nEND end", 2, "keywords are upper-case"),
    # Several whole-program problems: the one on the earliest line is reported.
    ("START start:\n NEXT nowhere\nPAINTER_RED p:\nEND end", 2, "undefined node 'nowhere'"),
]


@pytest.mark.parametrize(("source", "line", "fragment"), PARSE_ERRORS)
def test_parse_errors_carry_the_line_number(source: str, line: int, fragment: str):
    with pytest.raises(ParseError) as info:
        parse(source)
    assert info.value.line == line
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"line {line}:")
    assert isinstance(info.value, ValueError)


def test_upper_case_hint_only_for_wrong_case():
    """An unknown upper-case token ('START:' with the colon glued on) must not be told that
    keywords are upper-case: the hint needs the case to be wrong (`and`, not `or`)."""
    with pytest.raises(ParseError) as info:
        parse("START: start\n NEXT end\nEND end")
    assert info.value.line == 1
    assert "unknown node type 'START:'" in info.value.message
    assert "upper-case" not in info.value.message


def test_run_raises_parse_error_for_malformed_program():
    with pytest.raises(ParseError):
        run("END end", "R")


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_reference_solution_passes_all_its_tests(seed: int):
    problems = generate_problems(seed, n_per_level=4)
    assert {p.family for p in problems} == set(FAMILIES)
    assert {p.level for p in problems} == set(LEVELS)
    for problem in problems:
        assert problem.solution is not None
        result = score_program(problem.solution, problem.test_cases)
        assert result.reward == 1.0, (problem.name, result.feedback)


def test_generated_problems_are_well_formed():
    problems = generate_problems(0, n_per_level=6)
    assert len({p.name for p in problems}) == len(problems)
    for problem in problems:
        tests = problem.test_cases
        inputs = [t.input for t in tests]
        assert "" in inputs, problem.name  # the empty tape is always an edge case
        assert len(set(inputs)) == len(inputs)
        allowed = set("RB") if problem.family == "prepend_sequence" else set(problem.colors)
        assert set("".join(inputs)) <= allowed, problem.name
        assert problem.colors == LEVELS[problem.level].colors
        if problem.family in ("append_sequence", "prepend_sequence"):
            assert all(t.check_output and t.expected_accepted for t in tests)
        else:
            verdicts = {t.expected_accepted for t in tests}
            assert verdicts == {True, False}, problem.name
            assert not any(t.check_output for t in tests)
    four_colour = [p for p in problems if p.level >= 3 and p.family == "contains_substring"]
    assert any(set("YG") & set(t.input) for p in four_colour for t in p.test_cases)


def test_tests_tell_problems_of_one_family_apart():
    """A reference for one pattern must fail another pattern's tests (near misses work)."""
    groups: dict[tuple[str, int], list[Problem]] = defaultdict(list)
    for problem in generate_problems(3, n_per_level=4):
        groups[(problem.family, problem.level)].append(problem)
    for group in groups.values():
        for mine in group:
            for other in group:
                if other is not mine:
                    assert other.solution is not None
                    score = score_program(other.solution, mine.test_cases)
                    assert score.reward == 0.0, (mine.name, other.name)


def test_generation_is_deterministic_and_independent_of_the_selection():
    first = [p.to_dict() for p in generate_problems(5, n_per_level=3)]
    # seed 0 by default, the pool the environment draws when no seed is given
    assert generate_problems(n_per_level=1) == generate_problems(0, n_per_level=1)
    again = [p.to_dict() for p in generate_problems(5, n_per_level=3)]
    assert first == again
    other = [p.to_dict() for p in generate_problems(6, n_per_level=3)]
    assert first != other
    only = [p.to_dict() for p in generate_problems(5, families=["ends_with"], n_per_level=3)]
    assert only == [p for p in first if p["family"] == "ends_with"]


def parameters(problem: Problem) -> str:
    """What a generated problem's name encodes between its family and its colour count."""
    head, tail = f"{problem.family}_", f"_{len(problem.colors)}c"
    assert problem.name.startswith(head) and problem.name.endswith(tail), problem.name
    return problem.name[len(head) : -len(tail)]


def count_rule(p: str) -> tuple[str, int, str]:
    """A contains_count problem's parameters: `exactly` or `atleast`, the count, the colour."""
    mode, k, colour = re.fullmatch(r"(exactly|atleast)(\d)([RBYG])", p).groups()
    return mode, int(k), colour


TASK_SENTENCE = {
    "starts_with": "Accept the tape if it starts with {p}; otherwise reject it.",
    "ends_with": "Accept the tape if it ends with {p}; otherwise reject it.",
    "exact_sequence": "Accept the tape only if it is exactly {p}, with nothing before or after",
    "contains_substring": "Accept the tape if it contains {p} as a contiguous sequence anywhere",
    "contains_ordered": "Accept the tape if it contains the colours {shown} in this order",
    "append_sequence": "Append {p} to the end of the tape",
    "prepend_sequence": "Put {p} in front of the tape",
}


def test_each_problem_says_what_its_name_and_tests_hold():
    """The model reads only the description, and SDFT shows it the reference solution:
    both must state the problem's own parameters, its colours, and examples that its
    tests agree with. Catches a description or title that lost its rule, pattern,
    colours or an example, an example given the wrong verdict, a family built as another
    (a starts_with problem that checks `contains`), and a name that no longer encodes
    the parameters (names dedupe the pool)."""
    colour_words = {"RB": "R and B", "RBYG": "R, B, Y and G"}
    for problem in generate_problems(0, n_per_level=4):
        p, family = parameters(problem), problem.family
        text, first_line = problem.description, problem.solution.splitlines()[0]
        if family == "contains_count":
            mode, k, colour = count_rule(p)
            rule = f"{'exactly' if mode == 'exactly' else 'at least'} {k}"
            assert text.startswith(f"Accept the tape if it contains {rule} {colour} symbols")
            assert first_line == f"# accept iff the tape holds {rule} {colour}"
        else:
            assert text.startswith(TASK_SENTENCE[family].format(p=p, shown=", ".join(p)))
            assert first_line.startswith("# ") and p in first_line.replace(", ", "")
        if family == "prepend_sequence":
            assert "Input tapes contain only the colours R and B;" in text
        else:
            assert f"Input tapes contain only the colours {colour_words[problem.colors]}." in text
        verdicts = {t.input: t for t in problem.test_cases}
        if family in ("append_sequence", "prepend_sequence"):
            before, after = re.search(r"For example, (\w+) must become (\w+)\.", text).groups()
            assert verdicts[before].expected_output == after
        else:
            yes, no = re.search(
                r"For example, (\w+) is accepted and (\w+) is rejected\.", text
            ).groups()
            assert verdicts[yes].expected_accepted and not verdicts[no].expected_accepted
        assert text.endswith(".") and "None" not in text


def test_each_family_tests_its_edge_cases():
    """Tests begin with the empty tape and the family's edge cases (the pattern, a near
    miss of one changed symbol, the pattern cut short at either end, the pattern doubled
    or with one more symbol, counts either side of the limit), then random tapes up to the
    quota. Catches an edge case dropped or miscut, and random tapes that never arrive."""
    for problem in generate_problems(0, n_per_level=4):
        p, family = parameters(problem), problem.family
        inputs = [t.input for t in problem.test_cases]
        assert inputs[0] == ""
        if family in ("append_sequence", "prepend_sequence"):
            assert len(inputs) == TRANSFORM_TESTS
            assert ("RB" * 3 if family == "prepend_sequence" else p) in inputs
            continue
        assert len(inputs) == ACCEPTANCE_TESTS
        if family == "contains_count":
            _, k, colour = count_rule(p)
            others = "".join(c for c in problem.colors if c != colour)
            for count in (k - 1, k, k + 1):
                assert colour * count in inputs, problem.name
            assert others * 2 in inputs
            continue
        assert inputs[1] == p and p[:-1] in inputs, problem.name
        if family == "contains_ordered":
            assert p[::-1] in inputs
            continue
        assert p[1:] in inputs, problem.name
        near = inputs[2]
        assert len(near) == len(p) and sum(a != b for a, b in zip(near, p, strict=True)) == 1, (
            problem.name
        )
        longer = [t for t in inputs if len(t) > len(p)]
        if family == "starts_with":
            assert any(t.startswith(p) for t in longer)
        elif family == "ends_with":
            assert p + p in inputs and any(t.endswith(p) and t != p + p for t in longer)
        elif family == "exact_sequence":
            assert p + p in inputs
            assert any(p + c in inputs for c in problem.colors)
            assert any(c + p in inputs for c in problem.colors)
        else:  # contains_substring: a partial match that breaks off, then the real one
            traps = {p[:k] + p for k in range(1, len(p))}
            assert len(p) == 1 or traps & set(inputs), problem.name
            assert any(p in t[1:-1] for t in longer)
    with pytest.raises(dataclasses.FrozenInstanceError):  # shared by every consumer
        problem.test_cases[0].input = "R"


def test_levels_are_the_documented_table_and_each_gets_what_was_asked():
    """The module's table of levels, patterns drawn within their level's lengths, and
    `n_per_level` problems for every (family, level) that has that many."""
    assert {n: (v.colors, v.min_len, v.max_len) for n, v in LEVELS.items()} == {
        1: ("RB", 1, 2), 2: ("RB", 3, 5), 3: ("RBYG", 1, 2), 4: ("RBYG", 3, 5),
    }  # fmt: skip
    counts: dict[tuple[str, int], int] = defaultdict(int)
    for problem in generate_problems(1, n_per_level=3):
        counts[(problem.family, problem.level)] += 1
        if problem.family != "contains_count":
            level = LEVELS[problem.level]
            assert level.min_len <= len(parameters(problem)) <= level.max_len, problem.name
    assert counts == {(f, level): 3 for f in FAMILIES for level in LEVELS}


def test_reference_solutions_explain_their_states():
    """The reference programs are SDFT's demonstrations: every state of an automaton
    carries a comment saying what it has seen, and the prepend program says where it
    writes the prefix. Catches a note lost or attached to the wrong block."""
    for problem in generate_problems(2, n_per_level=2):
        for block in problem.solution.split("\n\n"):
            nodes = [line for line in block.splitlines() if not line.startswith("#")]
            if not nodes:  # the title
                continue
            node = nodes[0].split()[1].rstrip(":")
            if re.fullmatch(r"s\d+", node):
                assert block.startswith(f"# {node}: "), (problem.name, block)
            elif node == "prefix0":
                assert block.startswith("# write the new prefix behind the marker\n")
            elif node.startswith("prefix"):
                assert not block.startswith("#"), (problem.name, block)


def test_the_generated_pool_is_the_one_runs_were_made_on():
    """Seed 0's first problems of every family and level, with their descriptions, tests
    and reference solutions, byte for byte as the generator has made them since 537402e
    (the code of every recorded manufactoria run). Catches a change to the generator
    that would silently give a seed other problems, so that runs before and after it are
    no longer comparable; a deliberate change updates this digest and says so in
    docs/results.md."""
    pool = json.dumps([p.to_dict() for p in generate_problems(0, n_per_level=3)], sort_keys=True)
    digest = hashlib.sha256(pool.encode()).hexdigest()
    assert digest == "2bad85f653c260e9dbecb1125e0d03784881b3878e31f610fdebe695618559f9"


def test_small_levels_run_out_of_distinct_patterns():
    problems = generate_problems(0, families="starts_with", levels=1, n_per_level=50)
    # Two colours, length 1-2: R, B, RR, RB, BR, BB.
    assert sorted(p.name for p in problems) == sorted(
        f"starts_with_{w}_2c" for w in ["R", "B", "RR", "RB", "BR", "BB"]
    )


def test_unknown_family_or_level_is_rejected():
    with pytest.raises(ValueError, match="families"):
        generate_problems(0, families=["nope"])
    with pytest.raises(ValueError, match="levels"):
        generate_problems(0, levels=[9])


# --------------------------------------------------------------------------- scoring

STARTS_WITH_R_TESTS = [
    TestCase("", False),
    TestCase("R", True),
    TestCase("B", False),
    TestCase("RB", True),
    TestCase("BRB", False),
    TestCase("RRR", True),
]


def test_correct_answer_gets_full_reward_and_no_feedback():
    score = score_response(fenced(STARTS_WITH_R), STARTS_WITH_R_TESTS)
    assert (score.reward, score.score, score.feedback) == (1.0, 1.0, "")


def test_wrong_answer_lists_the_two_shortest_failures():
    accept_all = "START start:\n    NEXT end\nEND end"
    score = score_response(fenced(accept_all), STARTS_WITH_R_TESTS)
    assert score.reward == 0.0
    assert score.score == pytest.approx(3 / 6)
    fb = score.feedback
    assert fb.startswith("Passed 3/6 tests. 3 failed; showing 2")
    assert fb.count("Input:") == 2
    assert "Input: (empty tape)\n" in fb and "Input: B\n" in fb
    assert "BRB" not in fb  # the longest failing input is left out
    assert "Actual:   accepted" in fb and "Expected: rejected" in fb
    assert "start -> end" in fb


def test_failure_debug_block_shows_trace_reason_and_front_symbol():
    starts_with_b = "START start:\n NEXT first\nPULLER_RB first:\n [B] end\nEND end"
    score = score_response(fenced(starts_with_b), STARTS_WITH_R_TESTS)
    assert score.score == pytest.approx(1 / 6)  # only the empty tape is right
    fb = score.feedback
    assert fb.index("Input: R\n") < fb.index("Input: B\n")  # equal length: test order
    assert "last 2 of 2 visited nodes: start -> first -> NONE" in fb
    assert "rejection reason: [R] branch of PULLER_RB 'first' leads to NONE" in fb
    assert "front tape symbol at rejection: R" in fb
    assert "infinite loop" not in fb


def test_infinite_loops_are_listed_before_shorter_failures():
    contains_b = [
        TestCase("", False),
        TestCase("R", False),
        TestCase("B", True),
        TestCase("RR", False),
        TestCase("RRRB", True),
        TestCase("BRRR", True),
    ]
    program = """
    START start:
        NEXT first
    PULLER_RB first:
        [R] end
        [B] spin
    PAINTER_RED spin:
        NEXT spin
    END end
    """
    score = score_response(fenced(program), contains_b)
    assert score.score == pytest.approx(2 / 6)
    fb = score.feedback
    assert "infinite loops first" in fb
    assert fb.count("Input:") == 2
    assert "Input: B\n" in fb and "Input: BRRR\n" in fb
    assert "Input: R\n" not in fb and "Input: RR\n" not in fb
    assert f"rejection reason: {LOOP_REASON}" in fb
    assert "infinite loop detected at node: spin" in fb
    assert "last 15 of 1000 visited nodes: ... -> spin -> spin" in fb


def test_feedback_is_capped_at_2000_characters():
    long_id = "a_very_long_node_name_that_fills_the_trace_quickly"
    program = f"START start:\n NEXT {long_id}\nPAINTER_RED {long_id}:\n NEXT {long_id}\nEND end"
    score = score_response(fenced(program), [TestCase("", True), TestCase("B", True)])
    assert len(score.feedback) <= 2000
    assert score.feedback.endswith("(feedback truncated)")


def test_failure_feedback_is_exactly_as_documented():
    """The whole feedback text, worked out by hand: catches a dropped "tape at rejection"
    line, an empty "(tape empty)"/"the shortest inputs"/"Debug:" label, blocks glued
    without a blank line, a truncation marker on short feedback, a final tape shown for an
    acceptance test (`check_output or expected_accepted`) and a NONE appended to the trace
    of an accepted run (`not accepted or loop_node is None`)."""
    tests = [
        TestCase("", True),  # rejected: [EMPTY] is not written
        TestCase("R", True),  # passes
        TestCase("RB", False),  # accepted, but should be rejected
        TestCase("BRB", False),  # passes
    ]
    score = score_response(fenced(STARTS_WITH_R), tests)
    assert (score.reward, score.score) == (0.0, 0.5)
    assert score.feedback == (
        "Passed 2/4 tests. 2 failed; showing 2 (the shortest inputs):\n"
        "\n"
        "Input: (empty tape)\n"
        "  Actual:   rejected\n"
        "  Expected: accepted\n"
        "  Debug:\n"
        "    last 2 of 2 visited nodes: start -> first -> NONE\n"
        "    rejection reason: [EMPTY] branch of PULLER_RB 'first' leads to NONE"
        " (branch not written)\n"
        "    front tape symbol at rejection: (tape empty)\n"
        "    tape at rejection: (empty tape)\n"
        "\n"
        "Input: RB\n"
        "  Actual:   accepted\n"
        "  Expected: rejected\n"
        "  Debug:\n"
        "    last 3 of 3 visited nodes: start -> first -> end"
    )


def test_trace_tail_boundary_at_15_nodes():
    """A trace of exactly 15 nodes is shown whole, without "..."; one of 16 drops the first
    node and shows exactly 15 (catches `> TRACE_TAIL` -> `>=` and an off-by-one slice)."""
    eat = "START start:\n NEXT eat\nPULLER_RB eat:\n [R] eat\nEND end"  # [EMPTY] -> NONE
    # "R" * n visits start once and eat n + 1 times (the last visit finds the tape empty).
    score = score_response(fenced(eat), [TestCase("R" * 13, True), TestCase("R" * 14, True)])
    fifteen = "start" + " -> eat" * 14 + " -> NONE"
    sixteen = "... -> eat" + " -> eat" * 14 + " -> NONE"
    assert f"    last 15 of 15 visited nodes: {fifteen}\n" in score.feedback
    assert f"    last 15 of 16 visited nodes: {sixteen}\n" in score.feedback


def test_feedback_cap_boundary():
    """Text of exactly 2000 characters is kept whole; longer text is cut to exactly 2000
    with the marker (catches `<=` -> `<` and a cut one character short)."""
    assert _cap("x" * 2000) == "x" * 2000
    marker = "\n... (feedback truncated)"
    assert _cap("x" * 2001) == "x" * (2000 - 25) + marker
    assert len(marker) == 25


def test_no_test_cases_is_never_a_pass():
    """With no tests, "all tests pass" is vacuously true: that must not become reward 1."""
    score = score_program(STARTS_WITH_R, [])
    assert (score.reward, score.score) == (0.0, 0.0)
    assert score.feedback == "This problem has no test cases, so nothing could be checked."


def test_parse_error_quotes_the_first_and_the_last_line():
    """The offending line is quoted also when it is line 1 or the program's last line
    (catches `1 <= line <= len(lines)` with either bound made strict)."""
    first = score_response(fenced("START begin:\n NEXT end\nEND end"), STARTS_WITH_R_TESTS)
    assert first.feedback.startswith(
        "Parse error on line 1: the START node's id must be 'start', not 'begin'\n"
        "  1 | START begin:\n"
    )
    last = score_response(fenced("START start:\n NEXT end\nEND end:"), STARTS_WITH_R_TESTS)
    assert last.feedback.startswith(
        "Parse error on line 3: END takes no colon: write 'END end'\n  3 | END end:\n"
    )


def test_transformation_tests_compare_the_final_tape():
    tests = [TestCase("", True, "BR", True), TestCase("R", True, "RBR", True)]
    paint_b = "START start:\n NEXT b\nPAINTER_BLUE b:\n NEXT end\nEND end"
    score = score_response(fenced(paint_b), tests)
    assert score.score == 0.0
    assert "Actual:   accepted, final tape B\n" in score.feedback
    assert "Expected: accepted, final tape BR\n" in score.feedback
    good = "START start:\n NEXT b\nPAINTER_BLUE b:\n NEXT r\nPAINTER_RED r:\n NEXT end\nEND end"
    assert score_response(fenced(good), tests).reward == 1.0


def test_acceptance_tests_ignore_the_final_tape():
    tests = [TestCase("R", True, "something else", False), TestCase("B", False, "B", True)]
    paints = "START start:\n NEXT p\nPULLER_RB p:\n [R] g\nPAINTER_GREEN g:\n NEXT end\nEND end"
    assert score_response(fenced(paints), tests).reward == 1.0


def test_parse_error_feedback_names_the_line():
    broken = "START start:\n    NEXT first\nPULLER_RB first\n    [R] end\nEND end"
    score = score_response(fenced(broken), STARTS_WITH_R_TESTS)
    assert (score.reward, score.score) == (0.0, 0.0)
    assert score.feedback.startswith("Parse error on line 3: missing ':'")
    assert "3 | PULLER_RB first" in score.feedback
    assert "all 6 tests failed" in score.feedback


def test_missing_fence_gets_the_format_message():
    score = score_response(STARTS_WITH_R, STARTS_WITH_R_TESTS)
    assert (score.reward, score.score) == (0.0, 0.0)
    assert score.feedback == NO_PROGRAM_MESSAGE
    assert "```manufactoria" in score.feedback


def test_truncated_answers_get_their_own_message():
    cut_block = "Answer:\n```manufactoria\nSTART start:\n    NEXT fi"
    assert "truncated" in score_response(cut_block, STARTS_WITH_R_TESTS).feedback
    cut_thinking = "<think>I should pull R first and then"
    assert "truncated" in score_response(cut_thinking, STARTS_WITH_R_TESTS).feedback


def test_extraction_prefers_manufactoria_block_then_last_block():
    other = "```python\nprint('not this')\n```\n"
    assert extract_program(fenced("A") + other).program == "A"
    assert extract_program(fenced("A") + fenced("B")).program == "B"  # models revise
    plain = f"```\n{STARTS_WITH_R}```"
    assert score_response(plain, STARTS_WITH_R_TESTS).reward == 1.0


def test_last_untagged_block_and_text_after_the_last_think_close():
    """Without a ```manufactoria block the LAST block is graded (not the first); with two
    </think> tags only the text after the last one counts (a draft between them is not
    graded: `rsplit(..., 1)[1]`)."""
    assert extract_program("```\nA\n```\ntext\n```text\nB\n```").program == "B"
    twice = "<think>plan</think>\n```manufactoria\nA\n```\n</think>\n```manufactoria\nB\n```"
    assert extract_program(twice).program == "B"


def test_thinking_is_stripped_before_extraction():
    wrong = "START start:\n NEXT end\nEND end"
    response = f"<think>draft:\n{fenced(wrong)}</think>\n{fenced(STARTS_WITH_R)}"
    assert score_response(response, STARTS_WITH_R_TESTS).reward == 1.0
    only_in_thinking = f"<think>{fenced(STARTS_WITH_R)}</think>\nDone."
    assert score_response(only_in_thinking, STARTS_WITH_R_TESTS).feedback == NO_PROGRAM_MESSAGE
    # Chat templates may open <think> in the prompt: only the closing tag is generated.
    assert (
        score_response(
            f"draft {fenced(wrong)}</think>{fenced(STARTS_WITH_R)}", STARTS_WITH_R_TESTS
        ).reward
        == 1.0
    )


# --------------------------------------------------------------------------- loader


def _write_jsonl(path: Path, rows: list[object]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")


def test_loader_reads_the_public_schema(tmp_path: Path):
    tests = [t.to_dict() for t in STARTS_WITH_R_TESTS]
    rows = [
        {
            "name": "starts_r",
            "description": "Accept tapes starting with R.",
            "test_cases": tests,
            "solution": STARTS_WITH_R,
        },
        {
            "name": "yellow_end",
            "description": "Append Y.",
            "test_cases": json.dumps(
                [
                    {
                        "input": "R",
                        "expected_output": "RY",
                        "expected_accepted": True,
                        "check_output": True,
                    }
                ]
            ),
        },
    ]
    path = tmp_path / "problems.jsonl"
    _write_jsonl(path, rows)
    problems = load_problems(path)
    assert [p.name for p in problems] == ["starts_r", "yellow_end"]
    assert problems[0].test_cases == STARTS_WITH_R_TESTS
    assert problems[0].colors == "RB" and problems[1].colors == "RBYG"
    assert problems[1].solution is None
    # the public rows need only input and verdict: no output check, no family or level
    # (catches a missing check_output read as true, which would compare final tapes)
    bare_path = tmp_path / "bare.jsonl"
    bare_path.write_text(json.dumps({"name": "bare", "description": "Accept R.",
                                     "test_cases": [{"input": "R", "expected_accepted": True}]}))  # fmt: skip
    [bare] = load_problems(bare_path)
    assert bare.test_cases == [TestCase("R", True, "", check_output=False)]
    assert (bare.family, bare.level) == ("", 0)
    assert problems[1].test_cases == [TestCase("R", True, "RY", True)]

    env = ManufactoriaEnv(path=str(path), test_fraction=0.5)
    items = {item.id: item for item in env.train_items() + env.test_items()}
    assert set(items) == {"manufactoria/starts_r", "manufactoria/yellow_end"}
    starts_r = items["manufactoria/starts_r"]
    assert starts_r.reference is not None and starts_r.reference.startswith("```manufactoria\n")
    assert env.score(starts_r, starts_r.reference).reward == 1.0
    assert items["manufactoria/yellow_end"].reference is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"name": "a", "description": "d", "test_cases": [{"input": "", '
            '"expected_accepted": false}]}\n{not json',
            ":2: not valid JSON",
        ),
        ('{"name": "a", "test_cases": []}', "missing keys"),
        ('{"name": "a", "description": "d", "test_cases": []}', "no test cases"),
        (
            '{"name": "a", "description": "d", "test_cases": [{"input": "X", "expected_accepted": true}]}',
            "R, B, Y, G",
        ),
        (
            '{"name": "a", "description": "d", "test_cases": [{"input": "R"}]}',
            "malformed test case",
        ),
        (
            '{"name": "a", "description": "d", "test_cases": [{"input": "", "expected_accepted": true}]}\n'
            '{"name": "a", "description": "e", "test_cases": [{"input": "", "expected_accepted": true}]}',
            ":2: duplicate problem name 'a'",
        ),
    ],
)
def test_loader_reports_bad_lines(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_problems(path)


def test_loader_colours_defaults_fenced_solutions_and_family_filter(tmp_path: Path):
    """A G-only file is four-colour (not just Y); missing family/level read as ""/0; an
    already fenced solution is the reference as it is (not fenced twice, which would not
    parse); with `path`, `families` keeps a problem by family or by name prefix and an
    empty selection is refused."""
    rows = [
        {
            "name": "starts_r",
            "description": "Accept tapes starting with R.",
            "test_cases": [t.to_dict() for t in STARTS_WITH_R_TESTS],
            "solution": fenced(STARTS_WITH_R),
            "family": "starts_with",
            "level": 2,
        },
        {
            "name": "ends_with_G",
            "description": "Accept tapes ending with G.",
            "test_cases": [
                {"input": "G", "expected_accepted": True},
                {"input": "", "expected_accepted": False},
            ],
        },
    ]
    path = tmp_path / "problems.jsonl"
    _write_jsonl(path, rows)
    problems = load_problems(path)
    assert [p.colors for p in problems] == ["RB", "RBYG"]
    assert [(p.family, p.level) for p in problems] == [("starts_with", 2), ("", 0)]

    def ids(env: ManufactoriaEnv) -> set[str]:
        return {i.id for i in env.train_items() + env.test_items()}

    by_family = ManufactoriaEnv(path=str(path), families="starts_with", test_fraction=0.0)
    assert ids(by_family) == {"manufactoria/starts_r"}
    (item,) = by_family.train_items() + by_family.test_items()
    assert item.reference == fenced(STARTS_WITH_R)
    assert by_family.score(item, item.reference).reward == 1.0
    by_prefix = ManufactoriaEnv(path=str(path), families=["ends_with", "nope"])
    assert ids(by_prefix) == {"manufactoria/ends_with_G"}
    with pytest.raises(ValueError, match="no problems"):
        ManufactoriaEnv(path=str(path), families="contains_count")


def test_saved_problems_load_back_unchanged(tmp_path: Path):
    problems = generate_problems(
        2, families=["contains_substring", "prepend_sequence"], n_per_level=2
    )
    path = tmp_path / "generated.jsonl"
    save_problems(problems, path)
    loaded = load_problems(path)
    assert [p.to_dict() for p in loaded] == [p.to_dict() for p in problems]


# --------------------------------------------------------------------------- environment


def test_environment_items_and_scoring():
    env = ManufactoriaEnv(seed=0, n_per_level=2, test_fraction=0.25)
    train, test = env.train_items(), env.test_items()
    ids = [item.id for item in train + test]
    assert len(ids) == len(set(ids)) and all(i.startswith("manufactoria/") for i in ids)
    assert set(ids) == {f"manufactoria/{p.name}" for p in generate_problems(0, n_per_level=2)}
    again = ManufactoriaEnv(seed=0, n_per_level=2, test_fraction=0.25)
    assert [i.id for i in again.train_items()] == [i.id for i in train]
    assert len(test) == round(len(ids) * 0.25)
    item = train[0]
    assert [m["role"] for m in item.messages] == ["system", "user"]
    assert "PULLER_RB" in item.messages[0]["content"] and "NONE" in item.messages[0]["content"]
    assert "```manufactoria" in item.prompt_text
    assert item.meta["test_cases"] and "expected_accepted" in item.meta["test_cases"][0]
    for each in train + test:
        assert each.reference is not None
        assert env.score(each, each.reference).reward == 1.0, each.id
    assert env.score(item, "no program here").feedback == NO_PROGRAM_MESSAGE
    problems = {p.name: p for p in generate_problems(0, n_per_level=2)}
    for each in train + test:  # the meta names the problem, its level and its colours
        problem = problems[each.id.removeprefix("manufactoria/")]
        assert each.meta["name"] == problem.name
        assert (each.meta["family"], each.meta["level"]) == (problem.family, problem.level)
        assert each.meta["colors"] == problem.colors
    assert ManufactoriaEnv.name == "manufactoria"
    assert ManufactoriaEnv.description


def test_environment_split_sizes_and_registry():
    env = make_env(
        "manufactoria", {"seed": 1, "families": "contains_substring", "n_train": 60, "n_test": 12}
    )
    assert isinstance(env, ManufactoriaEnv)
    assert len(env.train_items()) == 60 and len(env.test_items()) == 12
    train_ids = {i.id for i in env.train_items()}
    assert not train_ids & {i.id for i in env.test_items()}
    assert all(i.meta["family"] == "contains_substring" for i in env.train_items())
    with pytest.raises(ValueError):
        ManufactoriaEnv(families=["no_such_family"])


def test_a_negative_count_is_refused():
    from resd.envs.manufactoria import ManufactoriaEnv

    with pytest.raises(ValueError, match=r"^env_args\.n_train: expected a whole number"):
        ManufactoriaEnv(n_train=-1)  # was: the last training problem dropped
    with pytest.raises(ValueError, match=r"^env_args\.n_test: expected a whole number"):
        ManufactoriaEnv(n_test=-1)
    # each generator argument named under env_args: n_per_level 0 was read as the default
    # (10 per level), -1 as "no problems", and a level that is not a number failed in int()
    at_least_one = "n_per_level: expected a whole number >= 1 or null"
    for args, named in [({"n_per_level": 0}, at_least_one), ({"n_per_level": -1}, at_least_one),
                        ({"n_per_level": "many"}, "n_per_level: "), ({"levels": [0]}, "levels: "),
                        ({"levels": "high"}, "levels: "), ({"families": ""}, "families: ")]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"^env_args\.{named}"):
            ManufactoriaEnv(**args)
    one_each = ManufactoriaEnv(n_per_level=1, levels=1, test_fraction=0.0).train_items()
    assert one_each and len({i.meta["family"] for i in one_each}) == len(one_each)


def test_default_environment_holds_the_default_generated_pool():
    """With no size asked for, the environment holds exactly `generate_problems(seed)` (the
    sizing path for n_train / n_test must not be taken: it would build a 1-per-level pool)."""
    env = ManufactoriaEnv(seed=4)
    ids = {i.id for i in env.train_items() + env.test_items()}
    assert ids == {f"manufactoria/{p.name}" for p in generate_problems(4)}


def test_asking_for_more_problems_than_exist_stops():
    """starts_with at level 1 has only 6 distinct problems: asking for 12 must stop growing
    the pool once it stops growing (the `break`), not loop for ever, and keep n_test."""
    env = ManufactoriaEnv(families="starts_with", levels=1, n_train=10, n_test=2)
    assert len(env.test_items()) == 2 and len(env.train_items()) == 4
