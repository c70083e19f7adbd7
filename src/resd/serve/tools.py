"""Function calling for `resd serve`: OpenAI's `tools` written into plain chat messages,
and the calls read back out of the reply.

Why plain messages, and not a chat template's own `tools=` argument: the learner trains on
what the server recorded, the conversation as {role, content} messages and the reply's
tokens, and renders the teacher's context from those messages again. Tools that reached
the model only through the template would be missing from both. So the server writes the
tools into the system message itself, and the tool calls and results of earlier turns
into the turns' text, in the layout known as Hermes (function signatures between
`<tools></tools>`, each call a JSON object between `<tool_call></tool_call>`, each
result between `<tool_response></tool_response>` in a user turn), which Qwen2.5, Qwen3,
Hermes and many other open models are tuned on. Every chat template then renders it
alike, and what was recorded is what the model read.

How a reply becomes calls is chosen once per request (`ToolUse`):

* `tool_choice: "auto"` (the default with tools): the model writes freely and the
  `<tool_call>` blocks it wrote are read, or the whole reply when it is one call without
  the tags. If a block is not a JSON object naming an offered function, none is taken:
  the reply goes back as text, so the client sees what the model wrote.
* `"required"`, or one named function: the reply is decoded under the JSON schema of one
  call, `{"name", "arguments"}` with the function's `parameters` (`call_schema`), so it
  is a call by construction; it is one call, never several.
* `"none"`: the tools are not shown and nothing is read; earlier calls and results in the
  conversation are still written out.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "ParsedReply",
    "ToolCall",
    "ToolError",
    "ToolUse",
    "call_schema",
    "plain_messages",
    "tools_text",
]

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
# a block, or an unclosed one at the very end (a model that ends its turn instead of closing)
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.S)
_FENCE = re.compile(r"```[A-Za-z]*\n(.*?)\n?```", re.S)


class ToolError(ValueError):
    """A request whose tools or tool messages cannot be used; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: OpenAI's `tool_calls[]` entry once `openai()` writes it."""

    id: str
    name: str
    arguments: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": arguments}}  # fmt: skip


@dataclass(frozen=True)
class ParsedReply:
    """A reply as the client gets it: its text (None when it is only calls) and its calls."""

    content: str | None
    calls: tuple[ToolCall, ...] = ()


def _unfenced(text: str) -> str:
    """The text inside a Markdown code fence (```json … ```), if the text is one."""
    match = _FENCE.fullmatch(text.strip())
    return match[1] if match else text


def _may_be_one_call(text: str) -> bool:
    """Whether a reply that begins with `text` may still turn out to be one call written
    whole: nothing but a JSON object, or one in a code fence, so far."""
    head = text.lstrip()
    if "```".startswith(head):  # nothing yet, or a fence begun
        return True
    if head.startswith("```"):
        language, newline, body = head[3:].partition("\n")
        if language and not (language.isascii() and language.isalpha()):  # ```json, or ```
            return False
        return not newline or not body.lstrip() or body.lstrip().startswith("{")
    return head.startswith("{")


@dataclass(frozen=True)
class ToolUse:
    """How one request's replies are read for calls (see the module docstring).

    `forced`: the reply is one call decoded under `call_schema`. Else a reply's calls are
    its `<tool_call>` blocks, or the whole reply when it is one call written bare (a JSON
    object naming an offered function, alone or in a code fence): small models often drop
    the tags (Qwen2.5-Coder-0.5B does, under its own template too). `parallel` False keeps
    a reply's first call only (the system text asks for one at a time)."""

    names: tuple[str, ...]
    forced: bool = False
    parallel: bool = True

    def held_from(self, text: str) -> int | None:
        """Where a streamed reply's text must stop going out as text, given the reply so
        far: at its first `<tool_call>`, or from the start while the reply may still be
        one call written whole (and always, for a forced call). None: nowhere yet."""
        if self.forced or _may_be_one_call(text):
            return 0
        start = text.find(CALL_OPEN)
        return start if start >= 0 else None

    def read(self, text: str) -> ParsedReply:
        """The reply's content and calls; a reply that does not read as calls is all text."""
        start = text.find(CALL_OPEN)
        if self.forced or start < 0:
            call = self._call(text if self.forced else _unfenced(text))
            return ParsedReply(None, (call,)) if call else ParsedReply(text)
        read = [self._call(match[1]) for match in _BLOCK.finditer(text, start)]
        calls = tuple(call for call in read if call is not None)
        if len(calls) < len(read):
            return ParsedReply(text)
        content = text[:start]
        return ParsedReply(
            content if content.strip() else None, calls if self.parallel else calls[:1]
        )

    def _call(self, text: str) -> ToolCall | None:
        """One call: a JSON object of an offered `name` and its `arguments` (or
        `parameters`, Llama 3.1's word), an object or one written as a JSON string;
        nothing else, so that a JSON answer that has a `name` is not taken for a call."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        if set(value) - {"name"} not in ({"arguments"}, {"parameters"}, set()):
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], arguments)


# ---- the request side --------------------------------------------------------------------------
def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def tools_text(functions: list[dict[str, Any]], *, parallel: bool = True) -> str:
    """The system message's part that offers the tools. `functions` are OpenAI's
    `tools[].function` objects ({name, description, parameters})."""
    lines = "\n".join(
        json.dumps({"type": "function", "function": {**function, "parameters": _parameters(function)}},
                   ensure_ascii=False)
        for function in functions
    )  # fmt: skip
    how_many = "one or more calls" if parallel else "at most one call"
    return (
        "# Tools\n\n"
        "Functions are available to help with the request. Each is described by one JSON "
        f"line between <tools> and </tools>:\n<tools>\n{lines}\n</tools>\n\n"
        f"To use them, write {how_many}, each as a JSON object with the function's name "
        "and its arguments between the tags <tool_call> and </tool_call>:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<the arguments>}}}}\n'
        f"{CALL_CLOSE}\n"
        "The results come back between <tool_response> and </tool_response>. Call a "
        "function whenever it can answer better than you can alone (live data, exact "
        "computation); otherwise answer in plain text."
    )


def call_schema(functions: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call: of the function `name`, or of any of `functions`."""

    def one(function: dict[str, Any]) -> dict[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": function["name"]},
                               "arguments": _parameters(function)}}  # fmt: skip

    chosen = [f for f in functions if name is None or f["name"] == name]
    return one(chosen[0]) if len(chosen) == 1 else {"anyOf": [one(f) for f in chosen]}


def _text(content: Any) -> str:
    """A message's content as text: a string, a list of text parts, or nothing."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _written_call(call: dict[str, Any], where: str) -> str:
    """An earlier call, as the model would have written it. Arguments that are not a JSON
    object are refused: the model is shown calls it could have made."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ToolError(f"{where}.function.arguments: must be a JSON object written as a "
                        "string", param=f"{where}.function.arguments")  # fmt: skip
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def _all_answered(open_calls: set[str], where: str) -> None:
    if open_calls:
        raise ToolError(f"{where}: calls {sorted(open_calls)} have no result: each call needs "
                        "a tool message right after the assistant message that made it",
                        param=where)  # fmt: skip


def plain_messages(
    messages: list[dict[str, Any]], tools_note: str | None = None
) -> list[dict[str, str]]:
    """OpenAI's messages as the chat template takes them, {role, content} strings.

    'developer' is the system role under its newer name. `tools_note` (`tools_text`) is
    added to the system message, or becomes one. An assistant's `tool_calls` are written
    after its text; `tool` messages become one user turn of results, each answering a call
    of the assistant turn just before (else a `ToolError`, as OpenAI refuses them)."""
    out: list[dict[str, str]] = []
    open_calls: set[str] = set()  # ids the assistant turn before asked, not yet answered
    for i, message in enumerate(messages):
        role, where = message["role"], f"messages.{i}"
        content = message.get("content")
        calls = message.get("tool_calls") or []
        if content is None and not (role == "assistant" and calls):
            raise ToolError(f"{where}.content: required (only an assistant message with "
                            "tool_calls may leave it out)", param=f"{where}.content")  # fmt: skip
        if calls and role != "assistant":
            raise ToolError(f"{where}.tool_calls: only an assistant message makes calls",
                            param=f"{where}.tool_calls")  # fmt: skip
        if (message.get("tool_call_id") is None) != (role != "tool"):
            raise ToolError(f"{where}.tool_call_id: a tool message needs one, and only a "
                            "tool message has one", param=f"{where}.tool_call_id")  # fmt: skip
        if role == "tool":
            call_id = message["tool_call_id"]
            if call_id not in open_calls:
                raise ToolError(f"{where}.tool_call_id: {call_id!r} answers no call of the "
                                "assistant message before it", param=f"{where}.tool_call_id")  # fmt: skip
            open_calls.discard(call_id)
            result = f"{RESPONSE_OPEN}\n{_text(content)}\n{RESPONSE_CLOSE}"
            if out and out[-1]["role"] == "user" and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + result  # the results of one turn, together
            else:
                out.append({"role": "user", "content": result})
            continue
        if role == "assistant" and calls:
            ids = [call["id"] for call in calls]
            if len(set(ids)) != len(ids):
                raise ToolError(f"{where}.tool_calls: two calls share an id",
                                param=f"{where}.tool_calls")  # fmt: skip
            written = [
                _written_call(call, f"{where}.tool_calls.{j}") for j, call in enumerate(calls)
            ]
            before = _text(content)  # as the model wrote it: text, a newline, the calls
            if before and not before.endswith("\n"):
                before += "\n"
            text = before + "\n".join(written)
            out.append({"role": "assistant", "content": text})
            _all_answered(open_calls, where)
            open_calls = set(ids)
            continue
        _all_answered(open_calls, where)
        open_calls = set()
        out.append({"role": "system" if role == "developer" else role, "content": _text(content)})
    _all_answered(open_calls, "messages")
    if tools_note:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_note}"}
        else:
            out.insert(0, {"role": "system", "content": tools_note})
    return out
