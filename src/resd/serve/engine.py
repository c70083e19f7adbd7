"""The served model and the worker that generates with it.

Two concerns, kept apart:

* Which weights answer. `ModelHolder` holds one `ServedModel` (weights, tokenizer, version
  id, name) and replaces it with one reference assignment under a lock (`swap`). A
  request binds the model it will be answered by when it is *accepted* (`submit`), so a
  request in flight during a swap finishes on the version it started with, reports that
  version, and is recorded under it; every request accepted after the swap uses the new
  one. Nothing is copied and nothing waits: the learner builds the new model on the side
  and swaps the finished object in.

* Who runs the model. One worker thread owns generation (a model on one device gains
  nothing from two threads racing for it, and transformers' generation is not meant to
  be re-entered). It takes the first queued request, gathers what else arrives within
  `batch_wait_ms` (up to `max_batch` requests), groups them by model object and sampling
  settings, and runs each group as one batch through `resd.generation.hf.generate`, the
  same sampler training uses. Every row gets its own seed (the request's `seed`, or a
  fresh random one that is recorded), so with row-seeded sampling a reply depends on its
  prompt, settings and seed only, never on which other requests shared its batch; and the
  sampler records each sampled token's log-probability, which the learner needs for
  importance correction. Greedy decoding (temperature 0) has no sampler, so it records no
  log-probabilities.

Streaming is token by token, from inside the batch: `generate` hands every decoding
step's tokens to the worker, which decodes each streamed row's new text
(`StreamedCompletion.push`) for the server to send while the batch goes on. Text that may
still change is held back: a partial UTF-8 character, and the last characters that could
be the start of a stop sequence, so nothing streamed is ever taken back.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resd.generation.base import first_stop
from resd.generation.hf import chat_prompt_ids, eos_token_ids, generate, score_reply
from resd.generation.structured import JsonGrammar, StructuredOutputUnavailable
from resd.serve.tools import CALL_OPEN, ParsedReply, ToolCall, ToolUse

__all__ = [
    "Accepted",
    "Completion",
    "EngineStopped",
    "GenerationEngine",
    "ModelHolder",
    "PromptError",
    "SamplingSettings",
    "SchemaError",
    "ServedModel",
    "StreamedCompletion",
    "TokenLogprob",
    "load_served_model",
    "same_model",
    "token_bytes",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    """One set of weights as served: the model, its tokenizer (loaded by
    `resd.models.load_tokenizer`, so left-padded with a chat template), the version id it
    is recorded under (a `model_versions.id` in the store), its human-readable name and
    where its weights came from (a Hub id, folder or bundled alias; a learner's step)."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    version: str
    name: str
    source: str = ""


class ModelHolder:
    """The model currently served; `swap` replaces it atomically for new requests."""

    def __init__(self, served: ServedModel) -> None:
        self._lock = threading.Lock()
        self._served = served

    def current(self) -> ServedModel:
        with self._lock:
            return self._served

    def swap(self, new: ServedModel) -> ServedModel:
        """Serve `new` from the next accepted request on; returns the model it replaced
        (requests already accepted keep using that one until they finish)."""
        with self._lock:
            old, self._served = self._served, new
        log.info("serving model version %s (was %s)", new.version, old.version)
        return old


def same_model(a: str, b: str) -> bool:
    """Two model names for the same weights: equal, or folders that resolve alike
    (`tiny` served from its folder, `/abs/path/tiny` in the learner's config)."""
    return a == b or (Path(a).exists() and Path(a).resolve() == Path(b).resolve())


def load_served_model(
    model: str,
    *,
    version: str = "base",
    name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_length: int | None = None,
) -> ServedModel:
    """Load any Hugging Face id, local folder or bundled alias for serving.

    `dtype="auto"` loads bfloat16 weights where the device has fast bf16 kernels (as the
    trainer's sampler and `resd eval` do), else float32. Float32 weights under bf16
    autocast are cast anew in every `generate` call, about 1 s for the 0.5B model on
    2 CPU cores: bfloat16 weights served it 3.9x the tokens per second (docs/benchmarks.md)."""
    from resd.models import load_model, load_tokenizer, pick_device, resolve_dtype

    tokenizer = load_tokenizer(model, max_length)
    weights = load_model(model, dtype=resolve_dtype(dtype, pick_device(device)), device=device)
    weights.eval()
    return ServedModel(
        model=weights, tokenizer=tokenizer, version=version, name=name or model, source=model
    )


@dataclass(frozen=True)
class SamplingSettings:
    """What a batch must share: `generate` takes one temperature, top-p, top-k, min-p and
    length (and, for structured output, one JSON schema, compared as canonical JSON text,
    so one schema with its keys in another order shares the batch while each row keeps
    its own order; one set of stop strings; one pair of penalties; one logit bias)."""

    temperature: float
    top_p: float
    max_new_tokens: int
    top_k: int = 0
    min_p: float = 0.0
    json_schema: str | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # sorted (token id, bias) pairs


@dataclass(frozen=True)
class Completion:
    """One finished reply, with everything the store records about it."""

    version: str  # the model version that generated it
    model_name: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # cut after the first EOS (kept)
    text: str  # the reply as the model wrote it (and the store records it)
    content: str | None  # the reply as the client reads it: the text, less any tool calls
    logprobs: list[float] | None  # the sampler's log π per token; None when greedy
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    seed: int
    # OpenAI's `logprobs`, when asked for: one per reply token (the EOS it ended on left out)
    token_logprobs: list[TokenLogprob] | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # read from the reply, with a request's `tools`


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token as OpenAI's `logprobs` reports it: its text, its bytes (a token may
    hold part of a UTF-8 character), its log-probability, and the most likely tokens at
    its position as (text, bytes, log-probability), most likely first."""

    token: str
    bytes: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes (GPT-2's): printable bytes stand for themselves,
    the other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF = _byte_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=8)
def _vocabulary_kind(tokenizer: Any) -> tuple[bool, frozenset[int]]:
    """Whether the vocabulary is byte-level, and its special token ids: once per
    tokenizer, not once per token of every reply that asks for log-probs."""
    decoder = tokenizer.backend_tokenizer.decoder
    byte_level = decoder is not None and b'"ByteLevel"' in decoder.__getstate__()
    return byte_level, frozenset(tokenizer.all_special_ids)


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for: byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM)
    spell them in `_BYTE_OF`'s alphabet, SentencePiece ones write a space as "▁" and an
    unknown byte as "<0xNN>"; a special token is its own text."""
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    byte_level, special = _vocabulary_kind(tokenizer)
    if token_id in special:
        return piece.encode()
    if match := _BYTE_TOKEN.fullmatch(piece):
        return bytes([int(match[1], 16)])
    if byte_level and all(ch in _BYTE_OF for ch in piece):
        return bytes(_BYTE_OF[ch] for ch in piece)
    return piece.replace("\u2581", " ").encode()


def reply_logprobs(
    served: ServedModel,
    prompt_ids: list[int],
    content_ids: list[int],
    top_k: int,
    autocast: str | None,
) -> list[TokenLogprob]:
    """OpenAI's `logprobs` of a reply, scored by the model that wrote it (`score_reply`)."""
    scores = score_reply(served.model, prompt_ids, content_ids, top_k=top_k, autocast=autocast)
    tok = served.tokenizer

    def spelled(token_id: int) -> tuple[str, bytes]:
        raw = token_bytes(tok, token_id)
        return raw.decode("utf-8", errors="replace"), raw

    out = []
    for token_id, logprob, top in zip(content_ids, scores.logprobs, scores.top, strict=True):
        text, raw = spelled(token_id)
        out.append(TokenLogprob(text, raw, logprob, [(*spelled(t), lp) for t, lp in top]))
    return out


class SchemaError(ValueError):
    """A `response_format` JSON schema that the grammar compiler cannot use."""


class PromptError(ValueError):
    """The messages could not be turned into a prompt (the chat template refused them)."""


class EngineStopped(RuntimeError):
    """The engine was stopped before the request ran."""


@dataclass
class _Job:
    served: ServedModel
    messages: list[dict[str, str]]
    settings: SamplingSettings
    future: Accepted  # its seed and version; a StreamedCompletion if streamed
    top_logprobs: int | None = None  # None: no logprobs asked for
    tools: ToolUse | None = None  # how the reply is read for tool calls; None: it is not
    # as the client wrote it: its key order is the order the reply writes the keys in
    json_schema: dict[str, Any] | None = None
    prompt_ids: list[int] = field(default_factory=list)


_STOP = object()


_STARTED = object()  # a streamed row drew its first token: the response can begin


class Accepted(Future):
    """The future of an accepted request, with what was bound when it was accepted: the
    model version that will answer it and its seed (a stream's first chunk names the
    version before the completion exists)."""

    def __init__(self, version: str, seed: int) -> None:
        super().__init__()
        self.version = version
        self.seed = seed


class StreamedCompletion(Accepted):
    """The future of a streamed request, and its text as it is decoded.

    The worker `push`es each token the row draws; the reader gets, in order: `STARTED`
    once the row has drawn its first token (until then a failure can still be an HTTP
    error), then pieces of text, then None when the completion is set, or the exception
    it failed with. A thread reads them with `next_piece`; an event loop with `listen`,
    which hands each to a callback instead of parking a thread per stream. The pieces
    join to the completion's content: a partial UTF-8 character and the last
    `len(longest stop) - 1` characters wait for the tokens after them, and a stop ends
    the pieces before it. With `tools`, text from `tools.held_from` on waits (a call is
    not text), and so does trailing whitespace (text before a call may be no content at
    all); the completion's content, known at the end, says what of the rest is text.
    """

    STARTED = _STARTED

    def __init__(
        self,
        version: str,
        seed: int,
        tokenizer: Any,
        stops: Sequence[str],
        eos: Sequence[int],
        tools: ToolUse | None = None,
    ) -> None:
        super().__init__(version, seed)
        self._tokenizer = tokenizer
        self._stops = list(stops)
        self._tools = tools
        marks = [*stops, *([CALL_OPEN] if tools is not None else [])]
        self._hold = max(0, max((len(mark) for mark in marks), default=0) - 1)
        self._eos = set(eos)
        self._tokens: list[int] = []
        self._prefix = self._read = 0  # the incremental decoder's token offsets
        self._text = ""  # decoded so far, whole characters only
        self._sent = 0  # characters handed out
        self._ended = False
        self._pieces: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._listener: Callable[[Any], None] | None = None
        self.add_done_callback(self._close)

    def _emit(self, item: Any) -> None:
        with self._lock:
            if self._listener is None:
                self._pieces.put(item)
                return
            try:
                self._listener(item)
            except Exception:  # a reader gone wrong must not fail the batch it rides in
                log.exception("a stream's listener failed; its reader gets nothing more")
                self._listener = lambda _item: None

    def listen(self, callback: Callable[[Any], None]) -> None:
        """Hand every item to `callback` (called on the worker's thread), those already
        produced first, in order."""
        with self._lock:
            while not self._pieces.empty():
                callback(self._pieces.get_nowait())
            self._listener = callback

    def push(self, token: int) -> None:
        """One more token of the row (the worker's thread)."""
        if not self._tokens and not self._ended:
            self._emit(_STARTED)
        if self._ended or token in self._eos:
            self._ended = True
            return
        self._tokens.append(token)
        decode = self._tokenizer.decode
        before = decode(self._tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self._tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # nothing new yet, or a character still incomplete
        self._text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._tokens)
        ready = len(self._text) - self._hold
        first = first_stop(self._text, self._stops, max(0, self._sent - self._hold))
        if first is not None:  # the same stop `cut_at_stop` cuts the record at
            ready, self._ended = first[1], True
        if self._tools is not None:  # text up to a call, less whitespace that may end it
            held = self._tools.held_from(self._text)
            ready = len(self._text[: max(0, ready if held is None else min(ready, held))].rstrip())
        if ready > self._sent:
            self._emit(self._text[self._sent : ready])
            self._sent = ready

    def next_piece(self, timeout: float | None = None) -> Any:
        """`STARTED`, a piece of text, None at the end, or the exception it failed with
        (for a reader that is not `listen`ing)."""
        return self._pieces.get(timeout=timeout)

    def _close(self, future: Future[Completion]) -> None:
        if future.cancelled():  # its waiter went away (a server shutting down)
            self._emit(EngineStopped("the request was cancelled"))
            return
        exc = future.exception()
        if exc is not None:
            self._emit(exc)
            return
        text, sent = future.result().content or "", self._text[: self._sent]
        if not self._tokens and not self._ended:
            self._emit(_STARTED)  # a reply of no tokens but its EOS
        if text.startswith(sent):
            if len(text) > len(sent):
                self._emit(text[len(sent) :])
        else:  # a tokenizer whose clean-up rewrote text already sent: the record wins
            log.warning("a streamed reply's pieces differ from its recorded text")
        self._emit(None)


class GenerationEngine:
    """The single generation worker (see the module docstring).

    `max_new_tokens` is the server's ceiling: a request asking for more gets this many.
    Prompts longer than `max_prompt_tokens` keep their end (`chat_prompt_ids`).
    """

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_batch: int = 8,
        batch_wait_ms: float = 10.0,
        max_new_tokens: int = 256,
        max_prompt_tokens: int = 2048,
        autocast: str | None = "auto",
    ) -> None:
        if max_batch < 1 or max_new_tokens < 1 or max_prompt_tokens < 1 or batch_wait_ms < 0:
            raise ValueError(
                "engine: max_batch, max_new_tokens and max_prompt_tokens must be >= 1 and "
                "batch_wait_ms >= 0"
            )
        self.holder = holder
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.autocast = autocast
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._resume = threading.Event()
        self._resume.set()
        self.batch_sizes: list[int] = []  # rows per `generate` call, newest last (last 1000)
        self._grammars: dict[int, JsonGrammar] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker (a no-op when it runs already)."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name="resd-generation", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail what is still queued, end the worker."""
        thread = self._thread
        if thread is None:
            return
        self._resume.set()
        self._queue.put(_STOP)
        thread.join(timeout)
        self._thread = None
        self._fail_queued(EngineStopped("the server is shutting down"))

    @property
    def pending(self) -> int:
        """Requests accepted and not yet finished (queued or generating)."""
        with self._lock:
            return self._pending

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold back new batches while the block runs (e.g. while a learner needs the
        device to itself); requests queue up and are bound to the version current when
        they were accepted. The batch already generating finishes first."""
        self._resume.clear()
        try:
            yield
        finally:
            self._resume.set()

    # ---- requests ------------------------------------------------------------------------------
    def submit(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        max_tokens: int | None = None,
        seed: int | None = None,
        stream: bool = False,
        json_schema: dict[str, Any] | None = None,
        stop: Sequence[str] = (),
        top_logprobs: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        tools: ToolUse | None = None,
    ) -> Accepted:
        """Accept a request: it will be answered by the model served *now*. With
        `json_schema` the reply is decoded under it (xgrammar), so it is valid JSON of
        that shape; a schema the grammar compiler refuses raises `SchemaError` here.
        `top_k` and `min_p` (0: off) filter as vLLM's extensions of the API do.
        `stop` strings end the reply as OpenAI's `stop` does (not with a schema).
        `top_logprobs` (0 or more) asks for OpenAI's `logprobs`, with that many
        alternatives per token; None asks for none. The penalties and `logit_bias` are
        OpenAI's (`resd.generation.hf.Penalties`, `LogitBias`); a bias names token ids of
        the served model's vocabulary (else ValueError). With `tools` the reply is read
        for tool calls (`ToolUse.read`: the completion's `content` and `tool_calls`); a
        forced call comes with its `call_schema` as `json_schema`."""
        if self._thread is None:
            raise EngineStopped("the generation engine is not running")
        if stop and (json_schema is not None or not all(stop)):
            raise ValueError("stop strings must be non-empty, and not with a JSON schema")
        if top_k < 0 or not 0 <= min_p <= 1:
            raise ValueError(f"top_k must be >= 0 and min_p in [0, 1] (0 turns either off); "
                             f"got {top_k} and {min_p}")  # fmt: skip
        limit = self.max_new_tokens if max_tokens is None else min(max_tokens, self.max_new_tokens)
        served = self.holder.current()
        vocab = served.model.config.vocab_size
        if logit_bias and not all(0 <= int(token) < vocab for token in logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab})")
        schema_text = None
        if json_schema is not None:
            schema_text = json.dumps(json_schema, sort_keys=True)
            try:
                self._grammar(served).compile(json_schema)  # cached; fails now, not mid-batch
            except StructuredOutputUnavailable:
                raise
            except Exception as exc:  # the compiler's reason, without its C++ source location
                reason = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(exc)).strip()
                raise SchemaError(f"the JSON schema cannot be used: {reason}") from exc
        seed = secrets.randbits(63) if seed is None else int(seed)
        if stream:
            eos = eos_token_ids(served.model, served.tokenizer)
            future: Accepted = StreamedCompletion(
                served.version, seed, served.tokenizer, stop, eos, tools
            )
        else:
            future = Accepted(served.version, seed)
        job = _Job(
            served=served,
            messages=messages,
            settings=SamplingSettings(
                temperature=float(temperature),
                top_p=float(top_p),
                max_new_tokens=int(limit),
                top_k=int(top_k),
                min_p=float(min_p),
                json_schema=schema_text,
                stop=tuple(stop),
                presence_penalty=float(presence_penalty),
                frequency_penalty=float(frequency_penalty),
                logit_bias=tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items())),
            ),
            future=future,
            top_logprobs=top_logprobs,
            tools=tools,
            json_schema=json_schema,
        )
        with self._lock:
            self._pending += 1
        job.future.add_done_callback(self._finished)
        self._queue.put(job)
        return job.future

    def _grammar(self, served: ServedModel) -> JsonGrammar:
        """One grammar compiler per served model (a swap brings a new one); it caches
        compiled schemas. A client's schema is held to the letter: its `maxLength`s stay
        character limits (no token budget, which would lift them)."""
        with self._lock:
            if self._grammars.get(id(served)) is None:
                self._grammars = {id(served): JsonGrammar(
                    served.tokenizer, served.model.config.vocab_size,
                    eos_token_ids(served.model, served.tokenizer), token_budget=False,
                )}  # fmt: skip
            return self._grammars[id(served)]

    def _finished(self, _future: Future[Completion]) -> None:
        with self._lock:
            self._pending -= 1

    # ---- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            self._resume.wait()
            jobs, stop = self._gather(first)
            groups: dict[tuple[int, SamplingSettings], list[_Job]] = {}
            for job in jobs:
                if job.future.set_running_or_notify_cancel() and self._tokenize(job):
                    groups.setdefault((id(job.served), job.settings), []).append(job)
            for group in groups.values():
                self._generate(group)
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job and whatever else arrives within the wait, up to max_batch."""
        jobs = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _tokenize(self, job: _Job) -> bool:
        try:
            job.prompt_ids = chat_prompt_ids(
                job.served.tokenizer, job.messages, self.max_prompt_tokens
            )
        except Exception as exc:  # the template's own checks (roles, order) raise anything
            job.future.set_exception(
                PromptError(f"messages: the chat template refused them: {exc}")
            )
            return False
        return True

    def _generate(self, group: list[_Job]) -> None:
        served, settings = group[0].served, group[0].settings
        # one schema, canonically, for the batch; each row decodes under its own key order
        schemas = [job.json_schema for job in group] if settings.json_schema else None
        try:
            outputs = generate(
                served.model, served.tokenizer, [job.prompt_ids for job in group],
                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                top_p=settings.top_p, top_k=settings.top_k, min_p=settings.min_p,
                batch_size=self.max_batch, autocast=self.autocast,
                seeds=[job.future.seed for job in group], return_logprobs=True,
                grammar=self._grammar(served) if schemas else None,
                json_schemas=schemas, stop_strings=settings.stop,
                on_tokens=self._streamer(group), presence_penalty=settings.presence_penalty,
                frequency_penalty=settings.frequency_penalty, logit_bias=dict(settings.logit_bias),
            )  # fmt: skip
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(group))
            for job in group:
                job.future.set_exception(exc)
            return
        self.batch_sizes = [*self.batch_sizes[-999:], len(group)]
        for job, out in zip(group, outputs, strict=True):
            try:
                asked = job.top_logprobs
                scored = (
                    reply_logprobs(served, job.prompt_ids, out.content_ids, asked, self.autocast)
                    if asked is not None
                    else None
                )
                reply = job.tools.read(out.text) if job.tools is not None else ParsedReply(out.text)
                job.future.set_result(Completion(
                    version=served.version, model_name=served.name, prompt_token_ids=job.prompt_ids,
                    token_ids=out.token_ids, text=out.text, content=reply.content,
                    logprobs=out.logprobs, finish_reason="stop" if out.finished else "length",
                    seed=job.future.seed, token_logprobs=scored, tool_calls=reply.calls,
                ))  # fmt: skip
            except Exception as exc:
                job.future.set_exception(exc)

    @staticmethod
    def _streamer(group: list[_Job]) -> Callable[[list[int], list[int]], None] | None:
        """`generate`'s step callback, feeding the group's streamed rows; None if none is."""
        streamed = {
            i: job.future
            for i, job in enumerate(group)
            if isinstance(job.future, StreamedCompletion)
        }
        if not streamed:
            return None

        def on_tokens(indices: list[int], tokens: list[int]) -> None:
            for index, token in zip(indices, tokens, strict=True):
                if index in streamed:
                    streamed[index].push(token)

        return on_tokens

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
