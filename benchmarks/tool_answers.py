"""A task for a probe: answer the user once a tool's result is in.

`benchmarks/tool_calls.py` found that the bundled 0.5B model, given a request, its call
and the call's result in `resd serve`'s layout, does not answer: it writes the call again
and then a result of its own making. The feedback that says so can state exactly what the
reply should have held (the result the tool returned), and copying it is the right
thing to do: the opposite of the sanity check's quoting feedback, which the teacher
copied to its harm (`docs/results.md`, section 1). So this is a task on which
self-distillation from feedback can be tested where a small teacher might teach.

An item is the conversation as `resd serve` would record it (`plain_messages` with the
tools in the system message): a request, the model's call, the tool's result. A reply
succeeds when it writes no call and no JSON (the result echoed is not an answer either)
and states the result's facts. It is a user environment
(`module:Class`), run with this folder on the path:

    PYTHONPATH=benchmarks resd train --config configs/tool_answers_qwen.yaml
    python benchmarks/tool_answers.py runs/tool_answers/sdpo     # its evaluations, by kind of reply
    bash benchmarks/tool_answers_runs.sh list                     # every run of the probe
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tool_calls import FUNCTIONS, writes_a_call  # one set of tools, one notion of a call

from resd.envs import Environment, Item, Score
from resd.serve.tools import ToolUse, plain_messages, tools_text

CITIES = ["Paris", "Tokyo", "Cairo", "London", "Lima", "Oslo", "Delhi", "Sydney", "Quito",
          "Rome", "Seoul", "Dakar", "Toronto", "Madrid", "Hanoi", "Nairobi"]  # fmt: skip
SKIES = ["sunny", "cloudy", "rainy", "snowy", "foggy", "windy"]
WEATHER_ASKS = ["What's the weather like in {city} right now?", "Is it cold in {city} today?",
                "How warm is it in {city}?", "Should I take a coat in {city} today?"]  # fmt: skip
SUM_ASKS = ["Please add {a} and {b}.", "What is {a} plus {b}?", "Sum {a} and {b} for me."]
AIRPORTS = ["JFK", "LHR", "CDG", "NRT", "SFO", "DXB", "SIN", "FRA"]
FLIGHT_ASKS = ["Find me a flight from {origin} to {destination} on {date}.",
               "Any flights from {origin} to {destination} on {date}?"]  # fmt: skip


@dataclass(frozen=True)
class Case:
    """One request, the call it needs, what the tool returns, and how a user says it."""

    ask: str
    function: str
    arguments: dict[str, Any]
    result: dict[str, Any]
    facts: list[str]  # what an answer must state, as written
    said: str  # the result in words, for the feedback


def _weather(rng: random.Random) -> Case:
    city, sky, temp = rng.choice(CITIES), rng.choice(SKIES), rng.randint(-9, 38)
    return Case(rng.choice(WEATHER_ASKS).format(city=city), "get_weather", {"city": city},
                {"temperature_c": temp, "sky": sky}, [str(temp), sky], f"{temp} °C and {sky} in {city}")  # fmt: skip


def _sum(rng: random.Random) -> Case:
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    return Case(rng.choice(SUM_ASKS).format(a=a, b=b), "add", {"a": a, "b": b}, {"sum": a + b},
                [str(a + b)], f"the sum is {a + b}")  # fmt: skip


def _flight(rng: random.Random) -> Case:
    origin, destination = rng.sample(AIRPORTS, 2)
    date = f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    number = f"XY {rng.randint(100, 999)}"
    departs = f"{rng.randint(5, 22):02d}:{rng.choice(['05', '20', '40'])}"
    return Case(rng.choice(FLIGHT_ASKS).format(origin=origin, destination=destination, date=date),
                "search_flights", {"origin": origin, "destination": destination, "date": date},
                {"flights": [{"number": number, "departs": departs}]}, [number, departs],
                f"flight {number}, departing at {departs}")  # fmt: skip


class ToolAnswersEnv(Environment):
    """Requests with their call and its result; answer from the result."""

    name = "tool_answers"
    description = "Answer the user from a tool's result, in plain text"

    def __init__(self, seed: int = 0, n_train: int = 48, n_test: int = 24) -> None:
        rng = random.Random(seed)
        makers = [_weather, _sum, _flight]
        self.items = [self._item(i, makers[i % 3](rng)) for i in range(n_train + n_test)]
        self.n_train = n_train

    @staticmethod
    def _item(i: int, case: Case) -> Item:
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": case.function, "arguments": json.dumps(case.arguments)}}  # fmt: skip
        conversation = [
            {"role": "user", "content": case.ask},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps(case.result)},
        ]
        messages = plain_messages(conversation, tools_text(FUNCTIONS))
        return Item(id=f"tool_answers/{i}", messages=messages,
                    meta={"function": case.function, "result": json.dumps(case.result),
                          "facts": case.facts, "said": case.said})  # fmt: skip

    def train_items(self) -> list[Item]:
        return self.items[: self.n_train]

    def test_items(self) -> list[Item]:
        return self.items[self.n_train :]

    def score(self, item: Item, response: str) -> Score:
        """The feedback says what the result means in words (quoting its JSON would hand
        the teacher JSON to copy): what a user who read the tool's output would write."""
        facts, said = item.meta["facts"], item.meta["said"]
        called = ToolUse(tuple(f["name"] for f in FUNCTIONS)).read(response).calls
        if called or writes_a_call(response):
            return Score(0.0, 0.0, f"You called a function again instead of answering. It has "
                         f"already returned the answer: {said}. Tell the user that in a "
                         "sentence.")  # fmt: skip
        if "{" in response:  # the result echoed, or JSON of its own: not words for the user
            return Score(0.0, 0.0, f"You wrote JSON instead of an answer. The tool returned "
                         f"{said}: tell the user that in a sentence.")  # fmt: skip
        missing = [
            f for f in facts if not re.search(rf"(?<![\w.]){re.escape(f)}(?![\w])", response)
        ]
        if missing:
            return Score(0.0, 0.5, f"Your answer leaves out what the tool returned ({said}): "
                         f"it should state {' and '.join(missing)}.")  # fmt: skip
        return Score(1.0, 1.0, "")


def kind(score: Score, response: str) -> str:
    """What a reply was, read off its score (the feedback names it). An answer inside a
    code block ("When you run this code, it will output: 15711") passes the verifier but
    is no plain answer: it is counted apart."""
    if score.success:
        return "answered in code" if "```" in response else "answered"
    if score.feedback.startswith("You called"):
        return "called again"
    return "JSON" if score.feedback.startswith("You wrote JSON") else "text, facts missing"


def evaluations(path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, replies) of a run folder's evaluations (`eval-step-*.jsonl`, labelled by
    step) or of one `resd eval --out` file (labelled by its name)."""
    if path.is_file():
        return [(path.stem, json.loads(path.read_text())["samples"])]
    return [
        (str(int(each.stem.rsplit("-", 1)[1])),
         [json.loads(line) for line in each.read_text().splitlines()])
        for each in sorted(path.glob("eval-step-*.jsonl"))
    ]  # fmt: skip


def main() -> None:
    """Each evaluation of a run, its replies scored again and counted by kind."""
    parser = argparse.ArgumentParser(
        description="a tool_answers run's evaluations, by kind of reply"
    )
    parser.add_argument("run", type=Path, nargs="+", help="run folders or `resd eval --out` files")
    parser.add_argument("--env-args", type=json.loads, default={},
                        help="the environment's arguments, as JSON, where a run folder's "
                        "config.yaml does not give them (default: none, the environment's defaults)")  # fmt: skip
    args = parser.parse_args()
    kinds = ["answered", "answered in code", "called again", "JSON", "text, facts missing"]
    print("| evaluation | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for run in args.run:
        config = run / "config.yaml"
        env_args = args.env_args
        if config.exists():
            env_args = yaml.safe_load(config.read_text())["env_args"]
        env = ToolAnswersEnv(**env_args)
        items = {item.id: item for item in env.train_items() + env.test_items()}
        for label, rows in evaluations(run):
            counts = Counter(
                kind(env.score(items[r["item"]], r["response"]), r["response"]) for r in rows
            )
            name = f"{run} step {label}" if run.is_dir() else str(run)
            print(f"| {name} | " + " | ".join(f"{counts[k]}/{len(rows)}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
