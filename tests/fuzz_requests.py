"""Random chat-completion requests against `resd serve` on the tests' tiny model: every
answer must be a 200 of the right shape or a 4xx naming the parameter, never a 500 nor
an error event inside a 200 stream. Not part of the suite; turn a finding into a test.

    python tests/fuzz_requests.py 300 --seed 1     # starts its own server on a free port

Each request draws its messages (system or developer, empty, long, multi-part, an
assistant turn with or without a tool call and its result) and, each with probability
0.35, OpenAI parameters (`n`, `stream`, `stop`, `logprobs`, `top_logprobs`, penalties,
`logit_bias`, `seed`, `response_format`, `tools`, `tool_choice`, ...), some of them out
of range or clashing. It prints each refusal's status and message, each finding in full,
and a count of both.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TESTS = Path(__file__).resolve().parent
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}  # fmt: skip
OPTIONS: dict[str, list[Any]] = {
    "max_tokens": [1, 5, 20, 0, 100000],
    "max_completion_tokens": [3],
    "temperature": [0, 0.7, 2.0],
    "top_p": [0.5, 1.0],
    "n": [1, 2, 3],
    "stream": [False, True],
    "stop": ["a", ["\n", "the"], []],
    "logprobs": [True, False],
    "top_logprobs": [0, 3, 20],
    "presence_penalty": [0.5, -2.0],
    "frequency_penalty": [1.0],
    "logit_bias": [{"5": 100}, {"7": -100}],
    "seed": [1, 42],
    "response_format": [
        {"type": "text"},
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
    ],
    "tools": [TOOLS],
    "tool_choice": ["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}],
    "stream_options": [{"include_usage": True}],
    "user": ["u1"],
    "parallel_tool_calls": [False],
}  # fmt: skip


def messages(rng: random.Random) -> list[dict[str, Any]]:
    said: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        said.append({"role": rng.choice(["system", "developer"]), "content": "Be brief."})
    texts = ["hi", "What is 2+2?", "", '{"a": 1}', "é" * 50, "x " * 300]
    said.append({"role": "user", "content": rng.choice(texts)})
    if rng.random() < 0.3:
        turn: dict[str, Any] = {"role": "assistant", "content": rng.choice(["ok", None, ""])}
        if rng.random() < 0.5:
            turn["tool_calls"] = [CALL]
        said.append(turn)
        if rng.random() < 0.5:
            said.append({"role": "tool", "tool_call_id": "call_1", "content": "sunny"})
        said.append({"role": "user", "content": "and?"})
    if rng.random() < 0.1:
        said[-1]["content"] = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    return said


def finding(body: dict[str, Any], status: int, text: str) -> str | None:
    """What is wrong with this answer, or None."""
    if status >= 500 or status < 0:
        return f"HTTP {status}"
    if status != 200:
        return None if '"param"' in text else "a refusal that names no parameter"
    if body.get("stream"):
        events = [json.loads(x[len("data: ") :]) for x in text.splitlines()
                  if x.startswith("data: ") and x != "data: [DONE]"]  # fmt: skip
        return "an error event in a 200 stream" if any("error" in e for e in events) else None
    choices = json.loads(text)["choices"]
    if len(choices) != body.get("n", 1) or not all("message" in c for c in choices):
        return "choices missing"
    if body.get("logprobs") and not all(c.get("logprobs") for c in choices):
        return "logprobs missing"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from conftest import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="resd-fuzz-requests-"))
    model = build_tiny_model(work / "tiny-model")
    port = free_port()
    resd = Path(sys.executable).with_name("resd")
    server = subprocess.Popen(
        [str(resd), "serve", "--model", str(model), "--served-model-name", "tiny", "--port",
         str(port), "--output-dir", str(work / "serve"), "--max-new-tokens", "64"],
        stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("w"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(args.seed)
    found = refused = 0
    try:
        with httpx.Client(timeout=120) as client:
            for _ in range(120):  # the model loads
                try:
                    if client.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(1)
            for index in range(args.requests):
                body: dict[str, Any] = {"model": "tiny", "messages": messages(rng)}
                for key, values in OPTIONS.items():
                    if rng.random() < 0.35:
                        body[key] = rng.choice(values)
                # mostly what they need, so that most requests get past validation
                if {"tool_choice", "parallel_tool_calls"} & body.keys() and rng.random() < 0.8:
                    body["tools"] = TOOLS
                if "top_logprobs" in body and rng.random() < 0.8:
                    body["logprobs"] = True
                try:
                    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                        status, text = r.status_code, r.read().decode()
                except httpx.HTTPError as exc:
                    status, text = -1, repr(exc)
                if problem := finding(body, status, text):
                    found += 1
                    print(f"FINDING {index}: {problem}\n  {json.dumps(body)}\n  -> {text[:800]}")
                elif status != 200:
                    refused += 1
                    print(f"refused {index}: {status} {text[:200]}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    errors = [x for x in (work / "server.log").read_text().splitlines() if "Traceback" in x]
    kept = f" ({work / 'server.log'})" if found or errors else ""
    print(f"{args.requests} requests: {refused} refused, {found} findings, "
          f"{len(errors)} tracebacks in the server's log{kept}")  # fmt: skip
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if found or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
