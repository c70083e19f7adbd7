"""The HTTP side of `resd serve`: an OpenAI-compatible API, feedback, health and a page.

    POST /v1/chat/completions   OpenAI's chat schema, plain or streamed (SSE)
    GET  /v1/models             the one served model
    POST /v1/feedback           reward / score / text on a completion id
    GET  /health                liveness, the served version, row counts, learner summary
    GET  /                      the HTML page (`resd.serve.page`)

Why the request bodies are read and validated by hand instead of by FastAPI's
parameters: an OpenAI client expects OpenAI's error body (`{"error": {"message", "type",
"param", "code"}}`) and a 400 for a malformed request, where FastAPI answers 422 in its
own shape; and a body has to be refused *while* it is read once it passes
`max_body_bytes` (413), before anything is parsed. Every check happens before the engine
or the database is touched, so a rejected request leaves no row behind; a completion is
stored before its response (or a stream's finishing chunk) leaves, so an id can take
feedback by the time its client has the whole reply, and a stream's completion is stored
even if its client leaves early.

Auth: with an API key, every endpoint but `/health` needs `Authorization: Bearer <key>`;
the page also takes HTTP Basic auth with the key as the password, so a browser can open
it. Without a key nothing is checked: `resd serve` then binds to a loopback address only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from resd.generation.structured import StructuredOutputUnavailable
from resd.serve import missing_extra
from resd.serve.engine import (
    Accepted,
    Completion,
    EngineStopped,
    GenerationEngine,
    ModelHolder,
    PromptError,
    SchemaError,
    StreamedCompletion,
)
from resd.serve.page import render_page
from resd.serve.store import FeedbackConflict, InvalidField, Store
from resd.serve.tools import ToolError, ToolUse, call_schema, plain_messages, tools_text

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import (
        BaseModel,
        ConfigDict,
        Field,
        StrictBool,
        StrictFloat,
        StrictInt,
        ValidationError,
    )
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise missing_extra(getattr(_exc, "name", None) or "fastapi and uvicorn", _exc) from _exc

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiError", "BackgroundServer", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1_000_000
RECENT_ON_PAGE = 50


# ---- errors ----------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        """The error object, also what a stream sends as its `error` event."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _validation_error(exc: ValidationError | RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(400, f"{param or 'body'}: {first.get('msg')}{more}", param=param,
                    code="invalid_value")  # fmt: skip


# ---- request schemas -------------------------------------------------------------------------------
# Numbers and flags are strict: `"max_tokens": "5"`, `"reward": true` or `"stream": "yes"` is a
# client bug that pydantic's lax mode would turn into 5, 1.0 and True; it gets a 400 instead.
# A JSON integer is still a valid float (`"temperature": 1`).
_Unit = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]  # reward, score: [0, 1]
_Positive = Annotated[StrictInt, Field(ge=1)]


class _Strict(BaseModel):
    # Unknown fields are refused, as OpenAI's API does: a silently ignored option
    # (audio, modalities, ...) would give a reply the caller did not ask for.
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON, as OpenAI writes it


class ToolCallMessage(_Strict):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant turn of calls only
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class ChosenFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    """OpenAI's structured output: plain text, any JSON object, or JSON of one schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def to_schema(self) -> dict[str, Any] | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ApiError(400, "response_format.json_schema: required with type "
                               "json_schema", param="response_format.json_schema",
                               code="invalid_value")  # fmt: skip
            return self.json_schema.schema_
        return {"type": "object"} if self.type == "json_object" else None


class ChatRequest(_Strict):
    """The accepted subset of OpenAI's chat-completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    # vLLM's extensions (the openai client sends them in extra_body); top_k -1 or 0 is off
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    min_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    max_tokens: _Positive | None = None
    max_completion_tokens: _Positive | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] | None = None
    # the sampler reduces seeds mod 2**63: outside [0, 2**63) two seeds would draw alike
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[StrictFloat, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None


class FeedbackRequest(_Strict):
    completion_id: str = Field(min_length=1, max_length=100)
    # in [0, 1] as the trainer's `Score` reads them: a reward of 5 would count as a success
    # and scale the policy gradient fivefold; a score of 7 would be clamped to 1 unseen
    reward: _Unit | None = None
    score: _Unit | None = None
    feedback: str | None = ""  # null is read as no text
    source: str = Field(default="user", min_length=1, max_length=100)


def _incompatible(chat: ChatRequest) -> ApiError | None:
    """Options that cannot be honoured together: refused rather than one ignored (a stop
    under a JSON format is `_stops`')."""
    if chat.top_logprobs is not None and not chat.logprobs:
        return ApiError(400, "top_logprobs: needs logprobs: true", param="top_logprobs",
                        code="invalid_value")  # fmt: skip
    return None


def _stops(chat: ChatRequest, conversation: _Conversation) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or up to 4; "" and [] mean none. An empty string in a
    list would end every reply at once, and a stop inside a JSON reply would cut what
    `response_format` or a required tool call promises to be whole: both are a 400."""
    if isinstance(chat.stop, str):
        stops = [chat.stop] if chat.stop else []
    else:
        stops = list(chat.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop: at most 4 sequences, got {len(stops)}", param="stop",
                       code="invalid_value")  # fmt: skip
    if not all(stops):
        raise ApiError(400, "stop: a stop sequence must not be empty", param="stop",
                       code="invalid_value")  # fmt: skip
    if stops and chat.response_format is not None and chat.response_format.to_schema():
        raise ApiError(400, "stop: not with a JSON response_format (a stop would cut the "
                       "JSON the schema holds whole)", param="stop",
                       code="unsupported_value")  # fmt: skip
    if stops and conversation.tools is not None and conversation.tools.forced:
        raise ApiError(400, "stop: not with a required tool call (a stop would cut the call)",
                       param="stop", code="unsupported_value")  # fmt: skip
    return tuple(stops)


def _logit_bias(chat: ChatRequest, vocab_size: int) -> dict[int, float]:
    """OpenAI's `logit_bias`: token ids (JSON keys, so strings) of the served model's
    vocabulary, each with a bias in [-100, 100]."""
    bias = {}
    for key, value in (chat.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model "
                           f"(0 to {vocab_size - 1})", param="logit_bias",
                           code="invalid_value")  # fmt: skip
        bias[int(key)] = value
    return bias


@dataclass(frozen=True)
class _Conversation:
    """A request as the engine takes it: the messages as the model reads them (and the
    store records them), how its replies are read for tool calls (None: they are not), and
    the JSON schema a reply is decoded under (`response_format`'s, or a forced call's)."""

    messages: list[dict[str, str]]
    tools: ToolUse | None
    json_schema: dict[str, Any] | None


def _conversation(chat: ChatRequest) -> _Conversation:
    """The messages as plain text turns, with the tools offered in the system message
    (`resd.serve.tools` says why, and how each `tool_choice` reads a reply)."""
    functions = [tool.function.model_dump(exclude_none=True) for tool in chat.tools or []]
    for param in ("tool_choice", "parallel_tool_calls"):
        if not functions and getattr(chat, param) is not None:
            raise ApiError(400, f"{param}: only with tools", param=param, code="invalid_value")
    for i, function in enumerate(functions):  # a call's arguments are a JSON object
        if function.get("parameters", {}).get("type", "object") != "object":
            raise ApiError(400, f"tools.{i}.function.parameters: must describe a JSON object "
                           '({"type": "object", ...})', param=f"tools.{i}.function.parameters",
                           code="invalid_value")  # fmt: skip
    names = [function["name"] for function in functions]
    if len(set(names)) < len(names):
        raise ApiError(400, "tools: two functions share a name", param="tools",
                       code="invalid_value")  # fmt: skip
    choice = chat.tool_choice or ("auto" if functions else "none")
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in names:
        raise ApiError(400, f"tool_choice: {named!r} is not one of the tools", param="tool_choice",
                       code="invalid_value")  # fmt: skip
    schema = chat.response_format.to_schema() if chat.response_format else None
    use, note = None, None
    if choice != "none":
        if schema is not None:
            raise ApiError(400, "tools: not with a JSON response_format (a reply is either "
                           "calls or the JSON of the format)", param="tools",
                           code="unsupported_value")  # fmt: skip
        use = ToolUse(
            tuple(names), forced=choice != "auto", parallel=chat.parallel_tool_calls is not False
        )
        note = tools_text(functions, parallel=use.parallel)
        if use.forced:
            schema = call_schema(functions, named)
    try:
        messages = plain_messages([m.model_dump(exclude_none=True) for m in chat.messages], note)
    except ToolError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_value") from exc
    return _Conversation(messages, use, schema)


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 as soon as it passes `limit` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body too large ({declared} bytes; the limit is {limit})",
                       code="request_too_large")  # fmt: skip
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body too large (the limit is {limit} bytes)",
                           code="request_too_large")  # fmt: skip

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError as exc:  # `[[[[…` a few thousand deep: bad input, not a 500
        raise ApiError(400, "the body is not valid JSON: nested too deeply",
                       code="invalid_json") from exc  # fmt: skip


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_text(payload: Any) -> None:
    """Refuse a string holding a lone UTF-16 surrogate (`"a\\ud800"`, valid JSON escapes
    but not Unicode text): it cannot be encoded as UTF-8, so the tokenizer would refuse it
    with a puzzling message and the database with a 500 after the request was accepted.
    Walks the whole body, keys included, without recursion (the body's depth is the
    client's choice); the error names the field, never echoing the unencodable text."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(payload, ())]
    while stack:
        value, path = stack.pop()
        where = ".".join(path) or None
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise ApiError(400, f"{where or 'body'}: contains a lone UTF-16 surrogate (an "
                               "unpaired \\ud800-\\udfff escape), which is not valid Unicode "
                               "text", param=where, code="invalid_value")  # fmt: skip
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if _SURROGATE.search(key):
                    raise ApiError(400, f"{where or 'body'}: a key contains a lone UTF-16 "
                                   "surrogate, which is not valid Unicode text", param=where,
                                   code="invalid_value")  # fmt: skip
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, str(i))) for i, item in reversed(list(enumerate(value))))


def _parse(schema: type[_Strict], payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_value")
    _check_text(payload)
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


# ---- auth ---------------------------------------------------------------------------------------------
def _key_matches(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode(), key.encode())


def _check_auth(request: Request, api_key: str | None, *, allow_basic: bool = False) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and _key_matches(value.strip(), api_key):
        return
    if allow_basic and scheme.lower() == "basic":
        try:
            _user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            password = ""
        if _key_matches(password, api_key):
            return
    challenge = 'Basic realm="resd serve"' if allow_basic else "Bearer"
    message = "missing API key" if not header else "invalid API key"
    raise ApiError(401, f"{message}: send 'Authorization: Bearer <key>'", type="authentication_error",
                   code="invalid_api_key", headers={"WWW-Authenticate": challenge})  # fmt: skip


# ---- responses -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reply:
    """The names a response goes out under; its chunks and body are built from them and
    the completions (a stream's first chunks leave before the completions exist). Choice
    `i` of `n` is stored under `choice_ids[i]`: the response id for the first, the id
    with `-i` after it for the others, each a key for feedback."""

    completion_id: str
    created: int
    model_name: str
    version: str  # the model version answering, bound when the request was accepted
    n: int = 1

    @property
    def choice_ids(self) -> list[str]:
        return [self.completion_id] + [f"{self.completion_id}-{i}" for i in range(1, self.n)]

    def head(self) -> dict[str, Any]:
        return {"id": self.completion_id, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.version, "resd_model_version": self.version}  # fmt: skip

    @staticmethod
    def usage(completions: list[Completion]) -> dict[str, int]:
        """The prompt counted once (the choices share it), every choice's reply tokens."""
        prompt = len(completions[0].prompt_token_ids)
        reply = sum(len(completion.token_ids) for completion in completions)
        return {"prompt_tokens": prompt, "completion_tokens": reply, "total_tokens": prompt + reply}

    @staticmethod
    def logprobs(completion: Completion) -> dict[str, Any] | None:
        """OpenAI's `choices[].logprobs`, when they were asked for."""
        scored = completion.token_logprobs
        if scored is None:
            return None

        def entry(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(raw)}

        content = [{**entry(t.token, t.bytes, t.logprob), "top_logprobs": [entry(*a) for a in t.top]}
                   for t in scored]  # fmt: skip
        return {"content": content, "refusal": None}

    @staticmethod
    def message(completion: Completion) -> dict[str, Any]:
        message = {"role": "assistant", "content": completion.content}
        if completion.tool_calls:
            message["tool_calls"] = [call.openai() for call in completion.tool_calls]
        return message

    @staticmethod
    def finish_reason(completion: Completion) -> str:
        """OpenAI's: `tool_calls` when the reply is calls; the store keeps the engine's
        (`stop` or `length`), which says whether the model ended its turn."""
        return "tool_calls" if completion.tool_calls else completion.finish_reason

    def body(self, completions: list[Completion]) -> dict[str, Any]:
        choices = [
            {"index": i, "message": self.message(completion), "logprobs": self.logprobs(completion),
             "finish_reason": self.finish_reason(completion), "resd_completion_id": self.choice_ids[i]}
            for i, completion in enumerate(completions)
        ]  # fmt: skip
        return {
            **self.head(),
            "object": "chat.completion",
            "choices": choices,
            "usage": self.usage(completions),
        }

    def chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        return {**self.head(), "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}  # fmt: skip

    def opening(self) -> list[dict[str, Any]]:
        """A stream's first chunks: each choice's role, and the id its feedback goes to."""
        chunks = [self.chunk(i, {"role": "assistant", "content": ""}) for i in range(self.n)]
        for chunk, choice_id in zip(chunks, self.choice_ids, strict=True):
            chunk["choices"][0]["resd_completion_id"] = choice_id
        return chunks

    def closing(self, completions: list[Completion], include_usage: bool) -> list[dict[str, Any]]:
        """A stream's last chunks: each choice's tool calls, whole, if it made any, and its
        finish (with its log-probs, whole, when asked for: a client that joins the chunks'
        `logprobs.content` gets every token's), then the usage if `include_usage`."""
        out = []
        for i, completion in enumerate(completions):
            if completion.tool_calls:
                calls = [
                    {"index": j, **call.openai()} for j, call in enumerate(completion.tool_calls)
                ]
                out.append(self.chunk(i, {"tool_calls": calls}))
            out.append(self.chunk(i, {}, self.finish_reason(completion), self.logprobs(completion)))
        if include_usage:
            out.append({**self.head(), "object": "chat.completion.chunk", "choices": [],
                        "usage": self.usage(completions)})  # fmt: skip
        return out


def _event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


def _pieces(futures: list[StreamedCompletion]) -> asyncio.Queue[tuple[int, Any]]:
    """The streams' items, as (choice, item), on this event loop, put there from the
    worker's thread."""
    loop, items = asyncio.get_running_loop(), asyncio.Queue()

    def listener(index: int) -> Callable[[Any], None]:
        def put(item: Any) -> None:
            if not loop.is_closed():  # else the server has stopped: nobody reads
                loop.call_soon_threadsafe(items.put_nowait, (index, item))

        return put

    for index, future in enumerate(futures):
        future.listen(listener(index))
    return items


async def _started(pieces: asyncio.Queue[tuple[int, Any]], n: int) -> None:
    """Wait until every choice has drawn its first token; raise what one failed with
    before (a failure then is still an HTTP error). Pieces that came meanwhile are put
    back, in order, ahead of those that came after the last start (already queued)."""
    early: list[tuple[int, Any]] = []
    started: set[int] = set()
    while len(started) < n:
        index, item = await pieces.get()
        if isinstance(item, BaseException):
            raise item
        if item is StreamedCompletion.STARTED:
            started.add(index)
        else:
            early.append((index, item))
    # no await from here on: the worker's items reach the queue through this event loop,
    # so none can arrive between taking the queue's contents and putting them back
    while not pieces.empty():
        early.append(pieces.get_nowait())
    for entry in early:
        pieces.put_nowait(entry)


async def _stream(
    reply: _Reply,
    futures: list[StreamedCompletion],
    pieces: asyncio.Queue[tuple[int, Any]],
    recorded: asyncio.Future[None],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """Server-sent events as the worker decodes: each choice's role, the text piece by
    piece, then, once the completions are stored (so their ids take feedback), the
    finishes and `[DONE]`. A failure after the first token (to generate, or to store the
    completion) can no longer be an HTTP status: it is an `error` event."""
    for chunk in reply.opening():
        yield _event(chunk)
    ended = 0
    while ended < len(futures):
        index, piece = await pieces.get()
        if piece is None:
            ended += 1
        elif isinstance(piece, BaseException):
            log.error("a streamed reply failed: %r", piece)
            yield _event(_server_error(f"generation failed: {type(piece).__name__}"))
            return
        elif piece is not StreamedCompletion.STARTED:
            yield _event(reply.chunk(index, {"content": piece}))
    try:
        await asyncio.shield(recorded)
    except Exception as exc:  # logged by `_log_failure`; the client is told, not cut off
        yield _event(_server_error(f"the completion could not be stored: {type(exc).__name__}"))
        return
    for chunk in reply.closing([future.result() for future in futures], include_usage):
        yield _event(chunk)
    yield b"data: [DONE]\n\n"


def _server_error(message: str) -> dict[str, Any]:
    """A stream's `error` event: the body an HTTP 500 would have had."""
    return ApiError(500, message, type="server_error").body()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a streamed completion could not be recorded", exc_info=task.exception())


def _learner_summary(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """For /health: the learner's scalar fields and its last step, not the playbook."""
    if status is None:
        return None
    steps = status.get("steps") or []
    summary = {k: v for k, v in status.items() if isinstance(v, str | int | float | bool)
               and k != "playbook_markdown"}  # fmt: skip
    summary.update(steps=len(steps), last_step=steps[-1] if steps else None)
    accuracy = status.get("accuracy") or []
    summary["accuracy"] = accuracy[-1] if accuracy else None
    return summary


# ---- the app -------------------------------------------------------------------------------------------
def create_app(
    holder: ModelHolder,
    store: Store,
    *,
    api_key: str | None,
    model_name: str,
    learner: Any = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    engine: GenerationEngine | None = None,
    page_refresh_s: int = 10,
) -> FastAPI:
    """The server. `engine` defaults to a `GenerationEngine(holder)` with its defaults;
    the app starts it on startup and stops it on shutdown either way. `learner`, if
    given, is anything with a `status() -> dict` (see `resd.serve.page`). The version
    being served is registered in the store if it is not there yet."""
    if api_key is not None and not api_key:
        raise ValueError("api_key: an empty key would accept 'Bearer ' alone; pass None for no key")
    if not model_name.strip():
        raise ValueError("model_name: an empty name could not be asked for by any client")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes: must be >= 1, got {max_body_bytes} (every POST "
                         "would be refused with a 413)")  # fmt: skip
    engine = engine or GenerationEngine(holder)
    if engine.holder is not holder:
        raise ValueError("engine: it must generate from the same ModelHolder the app serves")
    known_versions: set[str] = set()
    versions_lock = threading.Lock()

    def ensure_version(version: str) -> None:
        """A version swapped in without `Store.add_version` is registered on first use
        (the learner's later `add_version` fills in its parent and step), so its
        completions are still recorded rather than refused by the foreign key."""
        with versions_lock:
            if version in known_versions:
                return
            if version not in {v["id"] for v in store.versions()}:
                log.warning("model version %s was not registered; registering it now", version)
                store.add_version(version, parent=None, step=0, note="registered by the server")
            known_versions.add(version)

    ensure_version(holder.current().version)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="resd serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.store, app.state.holder = engine, store, holder

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return ApiError(
            500, f"internal error: {type(exc).__name__}", type="server_error"
        ).response()

    def learner_status() -> dict[str, Any] | None:
        return None if learner is None else learner.status()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _check_auth(request, api_key)
        chat = _parse(ChatRequest, await _read_json(request, max_body_bytes))
        problem = _incompatible(chat)
        if problem is not None:
            raise problem
        if chat.model != model_name:
            raise ApiError(404, f"model {chat.model!r} is not served here (this server serves "
                           f"{model_name!r})", param="model", code="model_not_found")  # fmt: skip
        conversation = _conversation(chat)
        messages = conversation.messages
        stop = _stops(chat, conversation)
        bias = _logit_bias(chat, holder.current().model.config.vocab_size)
        temperature = 1.0 if chat.temperature is None else chat.temperature
        top_p = 1.0 if chat.top_p is None else chat.top_p
        n = chat.n or 1
        # choice i of a seeded request draws from seed + i: each reply can be regenerated
        seeds = [None if chat.seed is None else (chat.seed + i) % 2**63 for i in range(n)]
        try:
            futures = [engine.submit(
                messages, temperature=temperature, top_p=top_p, seed=seed,
                top_k=max(chat.top_k or 0, 0), min_p=chat.min_p or 0.0,
                max_tokens=chat.max_completion_tokens or chat.max_tokens, stream=bool(chat.stream),
                json_schema=conversation.json_schema, tools=conversation.tools, stop=stop, top_logprobs=(chat.top_logprobs or 0) if chat.logprobs else None,
                presence_penalty=chat.presence_penalty or 0.0,
                frequency_penalty=chat.frequency_penalty or 0.0, logit_bias=bias,
            ) for seed in seeds]  # fmt: skip
            if chat.stream:  # wait for the first tokens: until then a failure is an HTTP error
                pieces = _pieces(futures)
                await _started(pieces, n)
            else:
                await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        except PromptError as exc:
            raise ApiError(400, str(exc), param="messages", code="invalid_messages") from exc
        except SchemaError as exc:  # a forced call's schema is built from the tools'
            param = "tools" if conversation.tools is not None else "response_format"
            raise ApiError(400, f"{param}: {exc}", param=param, code="invalid_schema") from exc
        except StructuredOutputUnavailable as exc:
            param = "tool_choice" if conversation.tools is not None else "response_format"
            raise ApiError(400, f"{param}: {exc}", param=param,
                           code="unsupported_value") from exc  # fmt: skip
        except EngineStopped as exc:
            raise ApiError(503, str(exc), type="server_error", code="unavailable") from exc
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_name,
                       futures[0].version, n)  # fmt: skip
        params = {"temperature": temperature, "top_p": top_p,
                  "max_tokens": _max_tokens_used(chat, engine),
                  "stream": bool(chat.stream)}  # fmt: skip
        if stop:
            params["stop"] = list(stop)
        if chat.logprobs:
            params["logprobs"], params["top_logprobs"] = True, chat.top_logprobs or 0
        for name in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "logit_bias"):
            if getattr(chat, name):
                params[name] = getattr(chat, name)
        if chat.response_format is not None:  # what it was decoded under, to regenerate it
            params["response_format"] = chat.response_format.model_dump(
                exclude_none=True, by_alias=True
            )
        if conversation.tools is not None:  # the tools themselves are in the messages
            params["tool_choice"] = (chat.tool_choice.model_dump()
                                     if isinstance(chat.tool_choice, NamedToolChoice)
                                     else chat.tool_choice or "auto")  # fmt: skip
            params["parallel_tool_calls"] = conversation.tools.parallel
        if n > 1:  # which of the request's choices a row is
            params["n"] = n

        async def record(future: Accepted, completion_id: str, index: int) -> None:
            completion = await asyncio.wrap_future(future)
            await run_in_threadpool(ensure_version, completion.version)
            choice = {"choice": index} if n > 1 else {}
            await run_in_threadpool(
                store.record_interaction, completion_id=completion_id,
                model_version=completion.version, model_name=completion.model_name, messages=messages,
                params={**params, "seed": completion.seed, **choice}, response=completion.text,
                prompt_token_ids=completion.prompt_token_ids, response_token_ids=completion.token_ids,
                response_logprobs=completion.logprobs, finish_reason=completion.finish_reason,
            )  # fmt: skip

        async def record_all() -> None:
            pairs = zip(futures, reply.choice_ids, strict=True)
            results = await asyncio.gather(
                *(record(future, cid, i) for i, (future, cid) in enumerate(pairs)),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        if chat.stream:  # recorded even if the client leaves mid-stream
            recorded = asyncio.ensure_future(record_all())
            recorded.add_done_callback(_log_failure)
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(_stream(reply, futures, pieces, recorded, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        await record_all()
        return JSONResponse(reply.body([future.result() for future in futures]))

    @app.post("/v1/feedback")
    async def post_feedback(request: Request) -> JSONResponse:
        _check_auth(request, api_key)
        note = _parse(FeedbackRequest, await _read_json(request, max_body_bytes))
        text = note.feedback or ""
        if note.reward is None and note.score is None and not text.strip():
            raise ApiError(
                400, "give at least one of reward, score or feedback", code="invalid_value"
            )
        try:
            row, created = await run_in_threadpool(
                store.record_feedback, note.completion_id, source=note.source,
                reward=note.reward, score=note.score, feedback=text,
            )  # fmt: skip
        except KeyError as exc:
            raise ApiError(404, f"no completion with id {note.completion_id!r}",
                           param="completion_id", code="completion_not_found") from exc  # fmt: skip
        except FeedbackConflict as exc:
            raise ApiError(409, str(exc), param="completion_id", code="feedback_consumed") from exc
        except InvalidField as exc:  # text no database column can hold (a NUL), say
            raise ApiError(400, str(exc), param=exc.field, code="invalid_value") from exc
        return JSONResponse({"object": "resd.feedback", **row}, status_code=201 if created else 200)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": 0, "owned_by": "resd",
                "resd_model_version": holder.current().version}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        _check_auth(request, api_key)
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        _check_auth(request, api_key)
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here", param="model",
                           code="model_not_found")  # fmt: skip
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            counts = await run_in_threadpool(store.counts)
            status = await run_in_threadpool(learner_status)
        except Exception as exc:  # the database is down: say so, with a 503
            log.exception("health check failed")
            return JSONResponse({"status": "error", "error": f"{type(exc).__name__}: {exc}"},
                                status_code=503)  # fmt: skip
        return JSONResponse({
            "status": "ok", "model": model_name, "model_version": holder.current().version,
            "counts": counts, "queue": engine.pending, "learner": _learner_summary(status),
        })  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, refresh: int = page_refresh_s) -> HTMLResponse:
        _check_auth(request, api_key, allow_basic=True)

        def render() -> str:
            return render_page(
                model_name=model_name, version=holder.current().version, counts=store.counts(),
                versions=store.versions(), recent=store.recent(RECENT_ON_PAGE),
                learner_status=learner_status(), refresh_s=max(0, refresh),
            )  # fmt: skip

        return HTMLResponse(await run_in_threadpool(render))

    return app


def _max_tokens_used(chat: ChatRequest, engine: GenerationEngine) -> int:
    """The max_tokens a completion was generated with (the request's, capped by the server)."""
    asked = chat.max_completion_tokens or chat.max_tokens
    return engine.max_new_tokens if asked is None else min(asked, engine.max_new_tokens)


# ---- running it in a thread (tests, notebooks) ------------------------------------------------------------
@dataclass
class BackgroundServer:
    """A real uvicorn server for `app` on a free loopback port, in a daemon thread:

        with BackgroundServer(app) as server:
            OpenAI(base_url=f"{server.url}/v1", api_key=...)

    The socket is bound before the thread starts, so `url` is valid at once and no other
    process can take the port in between."""

    app: Any
    host: str = "127.0.0.1"
    port: int = 0
    log_level: str = "warning"
    startup_timeout_s: float = 60.0
    _server: Any = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _socket: socket.socket | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="resd-serve", daemon=True)  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def on_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (the only place an unauthenticated server may bind)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
