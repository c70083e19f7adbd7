"""Tool calls from a small model: `resd serve`'s layout against the chat template's own.

`resd serve` writes the tools into the system message itself (`resd.serve.tools` says
why: the record must say what the model read). A chat template that takes `tools=`
renders them its own way, in its own words. This script puts one fixed set of requests to
the model both ways, greedy, with the model and weights `resd serve` would load, and
reads every reply with the server's own parser (`ToolUse.read`):

- requests that need a call: is the reply a call of the right function, and are its
  arguments the expected ones?
- requests that need none, and a request with its call and the call's result: is the
  reply an answer, text with no call in it? Not a call `ToolUse.read` takes, and nothing
  shaped like one anywhere (`writes_a_call`): a model that calls a function it made up,
  or writes the call again and then a result of its own making, has not answered.

A template that ignores `tools=` (it renders the same text with and without them) has no
row of its own. `--smoke` runs the tiny random model: it proves the script runs, nothing
about calls.

    python benchmarks/tool_calls.py                          # the bundled Qwen2.5-Coder-0.5B
    python benchmarks/tool_calls.py --model Qwen/Qwen3-0.6B
    python benchmarks/tool_calls.py --smoke
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

import torch
from prefix_cache import tiny_model, write_rows  # the benchmarks' shared plumbing

from resd.generation.hf import generate
from resd.serve.engine import load_served_model
from resd.serve.tools import ToolUse, plain_messages, tools_text

FUNCTIONS = [
    {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"]}},
    {"name": "search_flights", "description": "Find flights between two airports on a date",
     "parameters": {"type": "object", "required": ["origin", "destination", "date"],
                    "properties": {"origin": {"type": "string"}, "destination": {"type": "string"},
                                   "date": {"type": "string", "description": "YYYY-MM-DD"}}}},
]  # fmt: skip
NEEDS_A_CALL = [  # (request, the call it needs)
    ("What's the weather like in Paris right now?", "get_weather", {"city": "Paris"}),
    ("Is it raining in Tokyo?", "get_weather", {"city": "Tokyo"}),
    ("How warm is it in Cairo today?", "get_weather", {"city": "Cairo"}),
    ("Do I need an umbrella in London today?", "get_weather", {"city": "London"}),
    ("Please add 1234 and 5678.", "add", {"a": 1234, "b": 5678}),
    ("What is 987 plus 13?", "add", {"a": 987, "b": 13}),
    ("Find me a flight from JFK to LHR on 2027-01-05.", "search_flights",
     {"origin": "JFK", "destination": "LHR", "date": "2027-01-05"}),
    ("Any flights from SFO to NRT on 2027-03-03?", "search_flights",
     {"origin": "SFO", "destination": "NRT", "date": "2027-03-03"}),
]  # fmt: skip
NEEDS_NONE = [
    "Say hello in French.",
    "Write a Python function that reverses a string.",
    "What is the capital of Italy?",
    "Explain what a list comprehension is in one sentence.",
]
RESULTS = {  # what each function returns, for the turn after the call
    "get_weather": '{"temperature_c": 21, "sky": "sunny", "rain": false}',
    "add": '{"sum": %d}',
    "search_flights": '{"flights": [{"number": "XY 101", "departs": "09:40"}]}',
}


def result_of(name: str, arguments: dict[str, Any]) -> str:
    return RESULTS[name] % (arguments["a"] + arguments["b"]) if name == "add" else RESULTS[name]


_CALL_SHAPED = re.compile(r'"name"\s*:\s*"[^"]*"\s*,\s*"(arguments|parameters)"\s*:')


def writes_a_call(text: str) -> bool:
    """Whether the text holds something shaped like a call, `{"name": …, "arguments": …`,
    of any function, offered or made up, whether the server reads it as a call or not."""
    return _CALL_SHAPED.search(text) is not None


def conversations() -> list[tuple[str, list[dict[str, Any]]]]:
    """(kind, OpenAI messages) of every request the script sends."""
    out = [("call", [{"role": "user", "content": ask}]) for ask, _, _ in NEEDS_A_CALL]
    out += [("none", [{"role": "user", "content": ask}]) for ask in NEEDS_NONE]
    for i, (ask, name, arguments) in enumerate(NEEDS_A_CALL):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}  # fmt: skip
        out.append(("result", [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": result_of(name, arguments)},
        ]))  # fmt: skip
    return out


def ours(tok: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt `resd serve` builds."""
    plain = plain_messages(messages, tools_text(FUNCTIONS))
    return tok.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


def native(tok: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt the chat template builds from `tools=` (arguments as objects, as
    transformers' templates take them)."""
    converted = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [{"type": "function", "function": {"name": c["function"]["name"],
                      "arguments": json.loads(c["function"]["arguments"])}}
                     for c in message["tool_calls"]]  # fmt: skip
            converted.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            converted.append({k: v for k, v in message.items() if k != "tool_call_id"})
    tools = [{"type": "function", "function": function} for function in FUNCTIONS]
    return tok.apply_chat_template(
        converted, tools=tools, add_generation_prompt=True, tokenize=False
    )


def takes_tools(tok: Any) -> bool:
    ask = [{"role": "user", "content": "hi"}]
    plain = tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=False)
    return native(tok, ask) != plain


def measure(served: Any, layout: str, args: argparse.Namespace) -> dict[str, Any]:
    tok, model = served.tokenizer, served.model
    render = ours if layout == "ours" else native
    asked = conversations()
    prompts = [
        tok(render(tok, messages), add_special_tokens=False)["input_ids"] for _, messages in asked
    ]
    start = time.perf_counter()
    outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, temperature=0.0,
                    batch_size=args.batch, autocast="auto")  # fmt: skip
    seconds = time.perf_counter() - start
    use = ToolUse(tuple(f["name"] for f in FUNCTIONS))
    expected = {ask: (name, arguments) for ask, name, arguments in NEEDS_A_CALL}
    counts = {"call": [0, 0], "none": 0, "result": 0}
    replies = []
    for (kind, messages), out in zip(asked, outs, strict=True):
        calls = use.read(out.text).calls
        if kind == "call":
            name, arguments = expected[messages[0]["content"]]
            right = [c for c in calls if c.name == name]
            counts["call"][0] += bool(right)
            counts["call"][1] += any(c.arguments == arguments for c in right)
        else:
            counts[kind] += not calls and not writes_a_call(out.text)
        replies.append({"kind": kind, "ask": messages[0]["content"], "reply": out.text,
                        "calls": [[c.name, c.arguments] for c in calls]})  # fmt: skip
    return {
        "layout": layout, "model": args.model,
        "right_function": counts["call"][0], "right_arguments": counts["call"][1],
        "needs_a_call": len(NEEDS_A_CALL), "answers_when_none_needed": counts["none"],
        "needs_none": len(NEEDS_NONE), "answers_after_a_result": counts["result"],
        "results": len(NEEDS_A_CALL), "prompt_tokens": sum(map(len, prompts)),
        "reply_tokens": sum(len(o.token_ids) for o in outs), "seconds": round(seconds, 1),
        "replies": replies,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", default="auto", help="as `resd serve --dtype`")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few tokens")
    parser.add_argument("--out", default="benchmarks/results/tool_calls.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.model, args.max_new_tokens = tiny_model("resd-tools-"), 4
    served = load_served_model(args.model, dtype=args.dtype)
    layouts = ["ours", "native"] if takes_tools(served.tokenizer) else ["ours"]
    rows = [measure(served, layout, args) for layout in layouts]
    print(f"\n{args.model}, greedy, replies <= {args.max_new_tokens} tokens\n")
    print(
        "| layout | right function | right arguments | answers when none needed | answers after a result | reply tokens | s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["needs_a_call"]
        print(f"| {r['layout']} | {r['right_function']}/{n} | {r['right_arguments']}/{n} | "
              f"{r['answers_when_none_needed']}/{r['needs_none']} | {r['answers_after_a_result']}/{r['results']} | "
              f"{r['reply_tokens']} | {r['seconds']} |")  # fmt: skip
    if len(layouts) == 1:
        print("(the chat template ignores `tools=`: no native row)")
    write_rows(args.out, args, rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
