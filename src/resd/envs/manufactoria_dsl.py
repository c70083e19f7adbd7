"""The Manufactoria language: parser and interpreter.

A program is a graph of nodes that routes a robot carrying a tape of colours (R, B, Y,
G). Pullers read and remove the front symbol, painters append to the back, so the tape
is a queue and the machine is a queue automaton. `parse` turns program text into a
`Program` (or raises `ParseError` with the line of the first mistake, phrased for the
model); `Program.run` routes one tape and records the path, which the feedback in
`resd.envs.manufactoria` turns into its debug block.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "LOOP_REASON",
    "MAX_VISITS",
    "NODE_KINDS",
    "NONE",
    "PAINT_COLOR",
    "PULLER_BRANCHES",
    "TAPE_SYMBOLS",
    "Node",
    "ParseError",
    "Program",
    "RunResult",
    "parse",
    "run",
]

MAX_VISITS = 1000
LOOP_REASON = "maximum iterations exceeded (possible infinite loop)"
TAPE_SYMBOLS = "RBYG"

# Node kind -> the branch labels it accepts; START/END/painters use NEXT (or nothing).
PULLER_BRANCHES = {"PULLER_RB": ("R", "B", "EMPTY"), "PULLER_YG": ("Y", "G", "EMPTY")}
PAINT_COLOR = {
    "PAINTER_RED": "R",
    "PAINTER_BLUE": "B",
    "PAINTER_YELLOW": "Y",
    "PAINTER_GREEN": "G",
}
NODE_KINDS = ("START", "END", *PULLER_BRANCHES, *PAINT_COLOR)
NONE = "NONE"
_ID_RE = re.compile(r"[A-Za-z0-9_]+")
_BRANCH_RE = re.compile(r"\[([^\]]*)\]\s*(.*)")


# --------------------------------------------------------------------------- parsing


class ParseError(ValueError):
    """A malformed program; `line` is 1-based so the model can find its mistake."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass
class Node:
    kind: str
    id: str
    line: int
    next: str | None = None  # START and painters
    branches: dict[str, str] = field(default_factory=dict)  # pullers: label -> target
    # "NEXT" / "[R]" ... -> the line it was written on, to report undefined targets there
    target_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class RunResult:
    """What happened to one tape. `reason` is "" when accepted.

    `front_symbol` is the symbol at the front of the tape when the robot was rejected
    ("" for an empty tape, None when accepted); `loop_node` is set only when the visit
    limit stopped the robot.
    """

    accepted: bool
    tape: str
    reason: str
    path: list[str]
    loop_node: str | None = None
    front_symbol: str | None = None

    @property
    def steps(self) -> int:
        return len(self.path)


@dataclass
class Program:
    """A parsed program; parse once, then `run` it on as many tapes as needed."""

    nodes: dict[str, Node]
    source: str = ""

    def run(self, tape: str) -> RunResult:
        """Route the robot until END, NONE or the visit limit.

        A symbol outside R/B/Y/G raises ValueError: that is a broken test file, not a
        wrong program, and must not be scored as the model's failure.
        """
        bad = sorted(set(tape) - set(TAPE_SYMBOLS))
        if bad:
            raise ValueError(f"tape {tape!r} holds symbols other than R, B, Y, G: {bad}")
        queue = deque(tape)
        path: list[str] = []
        current = "start"
        while True:
            if len(path) >= MAX_VISITS:
                return self._reject(queue, path, LOOP_REASON, loop_node=current)
            path.append(current)
            node = self.nodes[current]
            if node.kind == "END":
                return RunResult(True, "".join(queue), "", path)
            if node.kind in PULLER_BRANCHES:
                front = queue[0] if queue else ""
                label = front if front in PULLER_BRANCHES[node.kind] else "EMPTY"
                target = node.branches.get(label, NONE)
                if target == NONE:
                    unwritten = "" if label in node.branches else " (branch not written)"
                    reason = f"[{label}] branch of {node.kind} '{node.id}' leads to NONE{unwritten}"
                    return self._reject(queue, path, reason)
                if label != "EMPTY":
                    queue.popleft()
            else:
                if node.kind in PAINT_COLOR:
                    queue.append(PAINT_COLOR[node.kind])
                target = node.next or NONE
                if target == NONE:
                    reason = f"NEXT of {node.kind} '{node.id}' leads to NONE"
                    return self._reject(queue, path, reason)
            current = target

    @staticmethod
    def _reject(
        queue: deque[str], path: list[str], reason: str, loop_node: str | None = None
    ) -> RunResult:
        front = queue[0] if queue else ""
        return RunResult(False, "".join(queue), reason, path, loop_node, front)


def parse(source: str) -> Program:
    """Parse program text; raises ParseError at the first problem.

    Syntax errors are reported in line order as they are met; errors that need the
    whole program (missing START/END/NEXT, undefined targets) come after them.
    """
    nodes: dict[str, Node] = {}
    current: Node | None = None
    last_line = 1
    for number, raw in enumerate(source.splitlines(), start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        last_line = number
        if text.startswith("[") or text.split()[0] in ("NEXT", "NEXT:"):
            if current is None:
                raise ParseError(
                    number, f"{text!r} is outside any node; put it under a node header"
                )
            _parse_body_line(current, text, number)
            continue
        current = _parse_header(text, number)
        if current.id in nodes:
            first = nodes[current.id].line
            raise ParseError(
                number, f"duplicate node id '{current.id}' (first defined on line {first})"
            )
        nodes[current.id] = current
    _check_structure(nodes, last_line)
    return Program(nodes, source)


def _parse_header(text: str, number: int) -> Node:
    parts = text.split(None, 1)
    kind = parts[0]
    if kind not in NODE_KINDS:
        hint = ""
        if kind != kind.upper() and kind.upper().rstrip(":") in (*NODE_KINDS, "NEXT"):
            hint = "; keywords are upper-case"
        known = ", ".join(NODE_KINDS)
        raise ParseError(number, f"unknown node type {kind!r}{hint} (known: {known})")
    rest = parts[1].strip() if len(parts) > 1 else ""
    has_colon = rest.endswith(":")
    node_id = rest[:-1].rstrip() if has_colon else rest
    if kind == "END":
        if has_colon:
            raise ParseError(number, "END takes no colon: write 'END end'")
        if node_id != "end":
            raise ParseError(number, f"the END node's id must be 'end', not {node_id!r}")
        return Node(kind, node_id, number)
    if not node_id:
        raise ParseError(number, f"{kind} needs a node id: write '{kind} <id>:'")
    if not _ID_RE.fullmatch(node_id):
        raise ParseError(
            number,
            f"bad node header {text!r}: expected '{kind} <id>:' with an id of letters, "
            "digits and _ (the node's lines go on the following lines)",
        )
    if not has_colon:
        raise ParseError(number, f"missing ':' after the node id: write '{kind} {node_id}:'")
    if node_id == NONE:
        raise ParseError(number, "'NONE' is reserved for rejection and cannot be a node id")
    if kind == "START" and node_id != "start":
        raise ParseError(number, f"the START node's id must be 'start', not {node_id!r}")
    if kind != "START" and node_id in ("start", "end"):
        raise ParseError(number, f"the id {node_id!r} is reserved for the {node_id.upper()} node")
    return Node(kind, node_id, number)


def _parse_body_line(node: Node, text: str, number: int) -> None:
    if node.kind == "END":
        raise ParseError(number, "the END node takes no NEXT or branch lines")
    if text.startswith("["):
        if node.kind not in PULLER_BRANCHES:
            raise ParseError(number, f"{node.kind} nodes take 'NEXT <node>', not branch lines")
        match = _BRANCH_RE.fullmatch(text)
        if not match:
            raise ParseError(number, f"bad branch line {text!r}: expected '[R] <node>'")
        label, target = match.group(1), match.group(2).strip()
        allowed = PULLER_BRANCHES[node.kind]
        if label not in allowed:
            shown = ", ".join(f"[{a}]" for a in allowed)
            hint = "; colours are upper-case" if label.upper() in allowed else ""
            raise ParseError(
                number, f"{node.kind} has no [{label}] branch (allowed: {shown}){hint}"
            )
        if label in node.branches:
            raise ParseError(number, f"branch [{label}] of '{node.id}' is written twice")
        node.branches[label] = _parse_target(target, f"[{label}]", number)
        node.target_lines[f"[{label}]"] = number
        return
    if node.kind in PULLER_BRANCHES:
        shown = "/".join(f"[{a}]" for a in PULLER_BRANCHES[node.kind])
        raise ParseError(number, f"{node.kind} nodes take branch lines {shown}, not NEXT")
    if text.startswith("NEXT:"):
        raise ParseError(number, "NEXT takes no colon: write 'NEXT <node>'")
    if node.next is not None:
        raise ParseError(number, f"node '{node.id}' has more than one NEXT line")
    node.next = _parse_target(text[len("NEXT") :].strip(), "NEXT", number)
    node.target_lines["NEXT"] = number


def _parse_target(target: str, what: str, number: int) -> str:
    if not target:
        raise ParseError(number, f"{what} needs a target node id")
    if not _ID_RE.fullmatch(target):
        raise ParseError(number, f"bad target {target!r} after {what}: expected one node id")
    return target


def _check_structure(nodes: dict[str, Node], last_line: int) -> None:
    if "start" not in nodes:
        raise ParseError(1, "missing START node: the program must begin at 'START start:'")
    if "end" not in nodes:
        raise ParseError(last_line, "missing END node: add a line 'END end'")
    problems: list[tuple[int, str]] = []
    for node in nodes.values():
        if node.kind not in PULLER_BRANCHES and node.kind != "END" and node.next is None:
            problems.append((node.line, f"{node.kind} '{node.id}' has no NEXT line"))
    # Targets are checked afterwards so that forward references are fine.
    for node in nodes.values():
        targets = [("NEXT", node.next)] + [(f"[{k}]", v) for k, v in node.branches.items()]
        for what, target in targets:
            if target is not None and target != NONE and target not in nodes:
                line = node.target_lines.get(what, node.line)
                problems.append((line, f"{what} of '{node.id}' goes to undefined node '{target}'"))
    if problems:
        line, message = min(problems)
        raise ParseError(line, message)


def run(program: str | Program, tape: str) -> RunResult:
    """Convenience: parse (if needed) and run one tape. Raises ParseError if malformed."""
    parsed = program if isinstance(program, Program) else parse(program)
    return parsed.run(tape)
