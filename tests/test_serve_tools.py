"""Function calling in `resd serve`: OpenAI's `tools`, `tool_choice` and tool messages.

The pure parts (`resd.serve.tools`) are checked on text. End to end, a tiny model that
writes tool calls is needed, and a random-init one never does: `caller` is the tiny
Llama taught, by a few dozen real optimizer steps, the two replies of one conversation
(a call, then an answer from its result), so that greedy decoding writes them; a forced
call (`tool_choice: "required"`) needs no teaching, since the grammar makes any model
write one.
"""

from __future__ import annotations

import contextlib
import json
import queue
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'resd[serve]'")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import build_tiny_model  # noqa: E402
from resd.generation.hf import chat_prompt_ids  # noqa: E402
from resd.serve.engine import Completion, StreamedCompletion, load_served_model  # noqa: E402
from resd.serve.learner import given_rollout  # noqa: E402
from resd.serve.tools import (  # noqa: E402
    CALL_OPEN,
    ToolCall,
    ToolError,
    ToolUse,
    call_schema,
    plain_messages,
    tools_text,
)
from test_serve import MODEL, Running, _counts, start_server  # noqa: E402

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}  # fmt: skip
ADD = {
    "name": "add",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False},
}  # fmt: skip
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": ADD}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALLED = {"role": "assistant", "content": "Let me check.\n", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
]}  # fmt: skip
ANSWERED = [*ASK, CALLED, {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
ANSWER_TEXT = "It is sunny."


def _called_with(**changes: Any) -> dict[str, Any]:
    """`CALLED` with its one call changed: another id, or other arguments."""
    return {**CALLED, "tool_calls": [{**CALLED["tool_calls"][0], **changes}]}


def _weather_with(arguments: str) -> dict[str, Any]:
    return {"name": "get_weather", "arguments": arguments}


# ---- the pure parts ------------------------------------------------------------------------------
def test_tools_go_into_the_system_message_and_earlier_calls_into_their_turns() -> None:
    """Catches the tools dropped or put in a second system message, an earlier call's
    arguments written as an escaped string (the model would learn to write strings), and
    the results of one turn split into two user turns or put out of order, and text
    outside ASCII written as escapes."""
    note = tools_text([WEATHER, ADD])
    assert json.dumps(WEATHER["parameters"]) in note and '"name": "add"' in note
    two_calls = {"role": "assistant", "content": "Two things.", "tool_calls": [
        CALLED["tool_calls"][0],
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
    ]}  # fmt: skip
    messages = [
        {"role": "developer", "content": "Be brief."},
        *ASK,
        two_calls,
        {"role": "tool", "tool_call_id": "call_2", "content": "3"},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "user", "content": "Thanks"},
    ]
    plain = plain_messages(messages, note)
    assert plain == [
        {"role": "system", "content": f"Be brief.\n\n{note}"},
        ASK[0],
        {"role": "assistant", "content": (
            'Two things.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')},
        {"role": "user", "content": (
            "<tool_response>\n3\n</tool_response>\n<tool_response>\nsunny\n</tool_response>")},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    # without a system message the note becomes one; without a note nothing is added
    assert plain_messages(ASK, note) == [{"role": "system", "content": note}, *ASK]
    assert plain_messages(ASK) == ASK
    chat = [*ASK, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert plain_messages(chat) == chat  # a turn without calls is left as it is
    zurich = _called_with(function=_weather_with('{"city": "Zürich"}'))
    assert '"Zürich"' in plain_messages([*ASK, zurich, ANSWERED[2]])[1]["content"]
    # an earlier turn is written as the model wrote it: a reply read as calls round-trips
    assert plain_messages(ANSWERED)[1]["content"] == CALL_TEXT
    calls_only = [ASK[0], {**CALLED, "content": None}, ANSWERED[2]]
    assert plain_messages(calls_only)[1]["content"] == CALL_TEXT.removeprefix("Let me check.\n")
    assert "at most one call" in tools_text([WEATHER], parallel=False)
    assert "at most one call" not in note
    # the functions as JSON the model reads as text: a description's accents, not \u escapes
    assert "Météo à Paris" in tools_text([{**WEATHER, "description": "Météo à Paris"}])


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "tool_call_id": "call_1", "content": "x"}], "messages.0.tool_call_id"),
        ([*ASK, CALLED, {"role": "tool", "tool_call_id": "call_9", "content": "x"}], "messages.2.tool_call_id"),
        ([*ASK, CALLED, {"role": "user", "content": "and?"}], "messages.2"),
        ([*ASK, CALLED, _called_with(id="call_2")], "messages.2"),
        ([*ASK, {"role": "assistant", "content": None}], "messages.1.content"),
        ([*ASK, CALLED], "messages"),
        ([*ANSWERED, {"role": "tool", "tool_call_id": "call_1", "content": "again"}], "messages.3.tool_call_id"),
        ([{"role": "user", "content": None}], "messages.0.content"),
        ([{"role": "user", "content": "x", "tool_call_id": "call_1"}], "messages.0.tool_call_id"),
        ([{"role": "tool", "content": "x"}], "messages.0.tool_call_id"),
        ([{"role": "user", "content": "x", "tool_calls": CALLED["tool_calls"]}], "messages.0.tool_calls"),
        ([*ASK, {**CALLED, "tool_calls": CALLED["tool_calls"] * 2}], "messages.1.tool_calls"),
        ([*ASK, _called_with(function=_weather_with('["Paris"]'))], "messages.1.tool_calls.0.function.arguments"),
        ([*ASK, _called_with(function=_weather_with("city=Paris"))], "messages.1.tool_calls.0.function.arguments"),
    ],
)  # fmt: skip
def test_tool_messages_must_answer_the_calls_just_before_them(
    messages: list[dict[str, Any]], param: str
) -> None:
    """OpenAI's rules for a conversation with calls, each refused naming the field: a
    result answers a call of the assistant turn just before it, once; every call has its
    result before the conversation goes on; only tool messages carry a call id, only the
    assistant makes calls (with distinct ids and arguments that are a JSON object), and
    only a turn of calls may have no content."""
    with pytest.raises(ToolError) as caught:
        plain_messages(messages)
    assert caught.value.param == param, str(caught.value)
    assert str(caught.value).startswith(param), str(caught.value)  # its text names it first


def test_a_reply_is_calls_only_when_every_block_is_a_call_of_an_offered_function() -> None:
    """Catches a malformed or unknown call taken (or silently dropped while the others are
    taken), the text before the calls lost, an unclosed last block missed, a reply that
    opens with its block read as text, `parallel_tool_calls: false` ignored, and the
    arguments sent back with their accents escaped."""
    use = ToolUse(("get_weather", "add"))
    second = '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
    read = use.read(f"{CALL_TEXT}\n{second}")
    assert read.content == "Let me check.\n"
    assert [(c.name, c.arguments) for c in read.calls] == [
        ("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})
    ]  # fmt: skip
    ids = [c.id for c in read.calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert read.calls[1].openai() == {"id": ids[1], "type": "function",
                                      "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}  # fmt: skip
    assert (
        len(ToolUse(("get_weather", "add"), parallel=False).read(f"{CALL_TEXT}\n{second}").calls)
        == 1
    )
    # a call only, its block unclosed (the model ended its turn instead): no content
    only = use.read('\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}')
    assert only.content is None and only.calls[0].arguments == {"a": 1, "b": 2}
    assert use.read(CALL_TEXT.removeprefix("Let me check.\n")).calls[0].name == "get_weather"
    # arguments go back to the client as JSON text, accents and all
    assert '"Zürich"' in ToolCall("c", "f", {"city": "Zürich"}).openai()["function"]["arguments"]
    for text in [
        "No call here.",
        CALL_TEXT.replace("get_weather", "get_news"),  # not offered
        CALL_TEXT.replace('"Paris"}', '"Paris"'),  # not JSON
        CALL_TEXT.replace('{"city": "Paris"}', '["Paris"]'),  # arguments not an object
        f"{CALL_TEXT}\n<tool_call>\n[1]\n</tool_call>",  # one good block, one bad
        f"{CALL_OPEN}\n",
    ]:
        assert use.read(text).content == text and use.read(text).calls == (), text
    forced = ToolUse(("add",), forced=True)
    call = forced.read('{"name":"add","arguments":{"a":1,"b":2}}')
    assert call.content is None and call.calls[0].arguments == {"a": 1, "b": 2}
    assert forced.read('{"name":"add","arguments":{"a":1,').calls == ()  # cut at max_tokens


def test_a_reply_that_is_one_call_without_the_tags_is_that_call() -> None:
    """Small models drop the tags (Qwen2.5-Coder-0.5B writes the bare object, sometimes in
    a code fence): a reply that is nothing but a call is read as one. Catches a JSON
    answer with a `name` taken for a call, and a streamed reply held back for good when
    it cannot be a call any more (or let out while it still may be one)."""
    use = ToolUse(("get_weather", "add"))
    bare = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    for text in [bare, f"  {bare}\n", f"```json\n{bare}\n```", f"```\n{bare}```",
                 '{"name": "add", "parameters": {"a": 1, "b": 2}}']:  # fmt: skip
        read = use.read(text)
        assert read.content is None and [(c.name, c.arguments) for c in read.calls] == [
            ("add", {"a": 1, "b": 2})
        ], text
    for text in ['{"name": "add", "arguments": {"a": 1}, "note": "x"}', '{"name": "Paris"}',
                 f"Sure: {bare}", f"```python\n{bare}\n```\nThat is it."]:  # fmt: skip
        assert use.read(text) == (text, ()) or use.read(text).calls == (), text
        assert use.read(text).content == text, text
    for text, held in [("", 0), ("  {", 0), ("``", 0), ("```json", 0), ("```json\n", 0),
                       ("```json\n {", 0), ("```python\nprint", None), ("`x`", None),
                       ("Hello", None), (f"Hi {CALL_OPEN}", 3), ("``` \n{", None),
                       (f"{CALL_OPEN}\n{{", 0)]:  # fmt: skip
        assert use.held_from(text) == held, text
    assert ToolUse(("add",), forced=True).held_from("Hello") == 0


def test_a_forced_call_is_one_of_the_offered_functions_or_the_named_one() -> None:
    named = call_schema([WEATHER, ADD], "add")
    assert named["properties"] == {"name": {"const": "add"}, "arguments": ADD["parameters"]}
    assert named["required"] == ["name", "arguments"] and named["additionalProperties"] is False
    either = call_schema([WEATHER, ADD])
    assert [s["properties"]["name"]["const"] for s in either["anyOf"]] == ["get_weather", "add"]
    bare = call_schema([{"name": "ping"}])
    assert bare["properties"]["arguments"] == {"type": "object", "properties": {}}


def test_a_streamed_reply_stops_its_text_where_a_call_begins(caller: Running) -> None:
    """The engine's streaming with tools: the text before a call goes out as it is decoded,
    nothing of the call does (tagged, bare, fenced or forced), and whitespace before the
    call waits, to go out at the end only if the content keeps it. Catches a call streamed
    as text, pieces that would not join to the content, and plain text or code held back
    to the end."""
    tok = caller.holder.current().tokenizer
    auto = ToolUse(("get_weather", "add"))

    def streamed(text: str, use: ToolUse) -> tuple[str, list[str]]:
        """What goes out while `text` is decoded, and the pieces after its end."""
        ids = tok(text, add_special_tokens=False)["input_ids"]
        future = StreamedCompletion("v1", 0, tok, (), [tok.eos_token_id], use)
        for token in ids:
            future.push(token)
        before = []
        with contextlib.suppress(queue.Empty):
            while True:
                before.append(future.next_piece(timeout=0))
        content = use.read(text).content
        future.set_result(Completion("v1", MODEL, [], ids, text, content, None, "stop", 0))
        after = list(iter(lambda: future.next_piece(timeout=5), None))
        return "".join(p for p in before if p is not StreamedCompletion.STARTED), after

    assert streamed(CALL_TEXT, auto) == ("Let me check.", ["\n"])
    bare = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    for call in [bare, f"\n```json\n{bare}\n```", f"\n\n{CALL_TEXT.split(chr(10), 1)[1]}"]:
        assert streamed(call, auto) == ("", []), call  # a call is never text
    assert streamed(bare, ToolUse(("add",), forced=True)) == ("", [])
    for text in ["Hello there, my friend, how are you?", "```python\nprint('a long line of code')\n```",
                 CALL_TEXT.replace("get_weather", "get_news"), '{"answer": 1}']:  # fmt: skip
        before, after = streamed(text, auto)
        assert before + "".join(after) == text, text  # text, and all of it
        if not text.startswith("{") and CALL_OPEN not in text:  # out as it came, not at the end
            assert len(before) >= len(text) // 2, (text, before)


# ---- end to end ---------------------------------------------------------------------------------
def _teach(path: Path) -> Path:
    """The tiny model, taught to write `CALL_TEXT` when asked `ASK` with the tools, and
    `ANSWER_TEXT` once the call's result is in: Adam on the two replies until greedy
    decoding of each, teacher-forced, is right at every token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(path, hidden=64)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    note = tools_text([WEATHER, ADD])
    rows = []
    for messages, reply in [(ASK, CALL_TEXT), (ANSWERED, ANSWER_TEXT)]:
        prompt = chat_prompt_ids(tok, plain_messages(messages, note))
        target = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((torch.tensor([prompt + target]), len(prompt), torch.tensor(target)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(1000):
        loss, learned = 0.0, True
        for ids, start, target in rows:
            labels = ids.clone()
            labels[0, :start] = -100
            out = model(input_ids=ids, labels=labels)
            loss = loss + out.loss
            learned &= bool((out.logits[0, start - 1 : -1].argmax(-1) == target).all())
        if learned:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert learned, "the tiny model did not learn its two replies"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def caller(tmp_path_factory: pytest.TempPathFactory) -> Running:
    path = _teach(tmp_path_factory.mktemp("caller"))
    served = load_served_model(str(path), version="v1", name=MODEL, dtype="float32")
    with start_server(
        served, tmp_path_factory.mktemp("tools") / "resd.db", max_new_tokens=128
    ) as running:
        yield running


def _create(running: Running, **kwargs: Any) -> Any:
    args = {"model": MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0, **kwargs}
    return running.client().chat.completions.create(**args)


def test_a_call_the_model_writes_comes_back_as_a_tool_call_and_its_result_is_answered(
    caller: Running,
) -> None:
    """`tool_choice: "auto"`, through the `openai` client: the model's `<tool_call>` block is
    a `tool_calls` entry with `finish_reason` "tool_calls", the text before it the content;
    the store keeps what the model read (the tools in the system message) and wrote (the
    block, the engine's finish "stop"), so the learner trains on it as it was. The client
    then sends the call back with its result, as OpenAI's clients do, and the model
    answers in text."""
    reply = _create(caller)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    row = caller.store.interaction(reply.id)
    assert row["response"] == CALL_TEXT and row["finish_reason"] == "stop"
    assert row["messages"] == plain_messages(ASK, tools_text([WEATHER, ADD]))
    assert row["params"]["tool_choice"] == "auto" and row["params"]["parallel_tool_calls"] is True
    single = _create(caller, parallel_tool_calls=False, max_tokens=4)  # asks for one call at most
    one = caller.store.interaction(single.id)
    assert one["messages"] == plain_messages(ASK, tools_text([WEATHER, ADD], parallel=False))
    assert one["messages"] != row["messages"] and one["params"]["parallel_tool_calls"] is False
    # the learner's input is what the model read: the recorded messages render to its prompt
    caller.post("/v1/feedback", {"completion_id": reply.id, "reward": 1.0, "feedback": "good call"})
    rows = caller.store.unconsumed(100)
    rollout = given_rollout(next(r for r in rows if r.completion_id == reply.id))
    tok = caller.holder.current().tokenizer
    assert (
        chat_prompt_ids(tok, rollout.item.messages) == rollout.prompt_ids == row["prompt_token_ids"]
    )
    assert rollout.gen.text == CALL_TEXT and rollout.score.reward == 1.0

    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    assert plain_messages(history)[1]["content"] == row["response"]  # the turn round-trips
    answer = _create(caller, messages=history).choices[0]
    assert (answer.message.content, answer.message.tool_calls) == (ANSWER_TEXT, None)
    assert answer.finish_reason == "stop"

    # streamed: the text as pieces, the call whole at the end, under the same finish
    chunks = list(_create(caller, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    text = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert text == "Let me check.\n" and [tc.function.name for tc in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"} and calls[0].id.startswith(
        "call_"
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(CALL_OPEN not in (d.content or "") for d in deltas)


def test_tool_choice_none_shows_no_tools_and_reads_no_calls(caller: Running) -> None:
    """Catches `none` still offering the tools to the model, or still reading its reply."""
    reply = _create(caller, tool_choice="none", max_tokens=64)
    row = caller.store.interaction(reply.id)
    assert row["messages"] == ASK and "tool_choice" not in row["params"]
    choice = reply.choices[0]
    assert choice.message.tool_calls is None and choice.message.content == row["response"]
    assert choice.finish_reason == row["finish_reason"]


def test_a_required_call_is_decoded_under_its_functions_schema(caller: Running) -> None:
    """`required` and a named function make the random-ish model write a call by
    construction: a JSON object naming an offered function (the named one) with arguments
    of its schema, one call per choice, streamed as one `tool_calls` delta with no text.
    Catches the schema not applied, the name not held to the choice, and a forced call's
    JSON streamed as content."""
    pytest.importorskip("xgrammar", reason="forced calls need the structured extra")
    history = [{"role": "user", "content": "What is 2 + 3?"}]
    named = {"type": "function", "function": {"name": "add"}}
    for seed in range(3):
        reply = _create(caller, messages=history, tool_choice=named, temperature=1.0, seed=seed,
                        n=2, max_tokens=64)  # fmt: skip
        for choice in reply.choices:
            if choice.message.tool_calls is None:  # cut at max_tokens before it closed
                assert choice.finish_reason == "length", choice
                continue
            (call,) = choice.message.tool_calls
            arguments = json.loads(call.function.arguments)
            assert call.function.name == "add" and choice.message.content is None
            assert set(arguments) == {"a", "b"} and all(type(v) is int for v in arguments.values())
            assert choice.finish_reason == "tool_calls"
        required = _create(caller, messages=history, tool_choice="required", temperature=1.0,
                           seed=seed, max_tokens=64).choices[0]  # fmt: skip
        if required.message.tool_calls:
            (call,) = required.message.tool_calls
            arguments = json.loads(call.function.arguments)
            keys = {"get_weather": {"city"}, "add": {"a", "b"}}[call.function.name]
            assert keys <= set(arguments)
    row = caller.store.interaction(reply.id)
    assert row["params"]["tool_choice"] == named and row["finish_reason"] in {"stop", "length"}

    finishes = []
    for seed in range(5):  # a call is never text; a reply cut before it closed is all text
        chunks = list(_create(caller, messages=history, tool_choice=named, stream=True,
                              temperature=1.0, seed=seed, max_tokens=64))  # fmt: skip
        deltas = [c.choices[0].delta for c in chunks]
        text = "".join(d.content or "" for d in deltas)
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        finishes.append(chunks[-1].choices[0].finish_reason)
        if finishes[-1] == "tool_calls":
            assert text == "" and [tc.function.name for tc in calls] == ["add"]
        else:
            assert finishes[-1] == "length" and text.startswith('{"name":"add"') and not calls
    assert "tool_calls" in finishes, finishes


def test_tool_requests_that_cannot_be_honoured_are_refused_by_name(caller: Running) -> None:
    """Each a 400 naming the field, with OpenAI's code for what is wrong (a value, options
    this server does not take together, a schema the grammar compiler refuses), and
    nothing recorded."""
    before = _counts(caller)
    good = {"model": MODEL, "messages": ASK, "max_tokens": 4}
    broken_schema = [
        {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}
    ]
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    cases = [  # (extra fields, the param named, OpenAI's code)
        ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", "invalid_value"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "invalid_value"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "invalid_value"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools.0.function.name",
         "invalid_value"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools", "unsupported_value"),
        ({"tools": TOOLS, "tool_choice": "required", "stop": "}"}, "stop", "unsupported_value"),
        ({"tools": TOOLS, "messages": [*ASK, CALLED]}, "messages", "invalid_value"),
        ({"tools": TOOLS, "messages": [*ASK, _called_with(id="")]}, "messages.1.tool_calls.0.id", "invalid_value"),
        ({"tools": TOOLS, "messages": [{"role": "tool", "tool_call_id": "x", "content": "r"}]},
         "messages.0.tool_call_id", "invalid_value"),
        ({"tools": broken_schema, "tool_choice": "required"}, "tools", "invalid_schema"),
        ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}]}, "tools.1.function.parameters", "invalid_value"),
        ({"tools": many}, "tools", "invalid_value"),  # OpenAI's limit is 128 functions
    ]  # fmt: skip
    for extra, param, code in cases:
        response = caller.post("/v1/chat/completions", {**good, **extra})
        assert response.status_code == 400, (extra, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (extra, error)
    # a JSON format with tool_choice "none" is fine: the tools are not in play
    fine = caller.post("/v1/chat/completions", {**good, "tools": TOOLS, "tool_choice": "none"})
    assert fine.status_code == 200, fine.text
    most = caller.post("/v1/chat/completions", {**good, "tools": many[:128], "tool_choice": "none"})
    assert most.status_code == 200, most.text
    short_id = [
        *ASK,
        _called_with(id="c"),
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
    ]
    answered = caller.post("/v1/chat/completions", {**good, "tools": TOOLS, "messages": short_id})
    assert answered.status_code == 200, answered.text  # a call's id may be one character
    assert _counts(caller) == (before[0] + 3, before[1])
